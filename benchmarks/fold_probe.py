"""Does a fold move a family's skills into the weights, and what does it cost the other families?

On the embedded default model (or --model): a fresh memory gets a tool family's verified skills
(the fast path: `run_loop` for --episodes train episodes), then held-out accuracy is measured with
memory off and on, the fold runs, and held-out accuracy (memory off) and the held-out
student-teacher KL are measured again, on the skill family and on every --other family.

Usage: python benchmarks/fold_probe.py [--family rg:basic_arithmetic+calc] [--other rg:letter_counting]
       [--items 100] [--steps 20] [key=value ... (FoldConfig fields, e.g. learning_rate=3e-4)]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.config import LoopSettings, parse_value  # noqa: E402
from agent.evaluate import evaluate, memory_contexts  # noqa: E402
from agent.folding import fold_items  # noqa: E402
from agent.loop import Runtime, run_loop  # noqa: E402
from engines.base import SamplingParams  # noqa: E402
from engines.hf import HFEngine  # noqa: E402
from engines.models import resolve_model  # noqa: E402
from envs import make_family  # noqa: E402
from learners.fold import FoldConfig, FoldItem, fold, measure_kl  # noqa: E402
from memory import Memory  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="rg:basic_arithmetic+calc")
    parser.add_argument("--other", action="append", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--items", type=int, default=100, help="held-out items per family")
    parser.add_argument("--episodes", type=int, default=32, help="fast-path train episodes")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--kl-items", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("overrides", nargs="*", help="FoldConfig fields as key=value")
    args = parser.parse_args()
    others = args.other or ["rg:letter_counting"]
    fold_fields = {}
    for override in args.overrides:
        key, _, value = override.partition("=")
        fold_fields[key] = parse_value(value)
    config = FoldConfig(**{"steps": args.steps, **fold_fields})

    engine = HFEngine.load(resolve_model(args.model))
    greedy = SamplingParams(max_new_tokens=64)
    family = make_family(args.family)
    anchors = {name: make_family(name) for name in others}
    figures: dict = {"config": config.model_dump(mode="json"), "items": args.items}

    def accuracy(name, fam, **kwargs):
        result = evaluate(engine, fam, args.items, greedy, **kwargs)[0]
        print(f"  {name}: {fam.name} {result.successes}/{result.items} = {result.accuracy:.1%} "
              f"[{result.ci_low:.1%}, {result.ci_high:.1%}]", flush=True)
        return result.accuracy

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        memory = Memory.open(home=home)
        started = time.perf_counter()
        run_loop(Runtime(engine=engine, memory=memory, family=family,
                         settings=LoopSettings(episodes=args.episodes, batch_size=16, reflect_every=0), run_id="probe"),
                 home / "agent.sqlite")
        print(f"fast path: {len(memory.list_skills(family=family.name))} skills in {time.perf_counter() - started:.0f}s")
        contexts = memory_contexts(engine, memory, family, args.items, token_budget=600, k=3)
        figures["before"] = {
            "memory_off": accuracy("memory off", family),
            "memory_on": accuracy("memory on", family, contexts=[c for c, _ in contexts]),
            **{name: accuracy("other", fam) for name, fam in anchors.items()},
        }
        held_out = [FoldItem(family=family.name, index=index, context=context, split="eval")
                    for index, (context, _) in enumerate(contexts[: args.kl_items])]
        figures["before"]["kl"] = measure_kl(engine, {family.name: family}, held_out, config)
        print(f"  held-out KL before: {figures['before']['kl']}")

        items = fold_items(memory, engine, {family.name: family}, anchors, items_per_family=64, probes=8)
        started = time.perf_counter()

        def on_step(record):
            print(f"  step {record['step']}: loss {record['loss']:.4f} kl {record['kl']:.4f} rollout "
                  f"{record['rollout_success']:.2f} tokens {record['trained_tokens']} {record['seconds']:.1f}s",
                  flush=True)

        result = fold(engine, {family.name: family, **anchors}, items, config, home / "fold", on_step=on_step)
        figures["fold_seconds"] = time.perf_counter() - started
        print(f"fold: {config.steps} steps in {figures['fold_seconds']:.0f}s")
        figures["after"] = {
            "memory_off": accuracy("folded, memory off", family),
            **{name: accuracy("other", fam) for name, fam in anchors.items()},
        }
        figures["after"]["kl"] = measure_kl(engine, {family.name: family}, held_out, config)
        print(f"  held-out KL after: {figures['after']['kl']}")
        figures["loss"] = [result.loss_first, result.loss_last]
    print(json.dumps(figures))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
