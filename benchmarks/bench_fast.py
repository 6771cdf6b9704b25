"""Fast adaptation: held-out accuracy with memory off vs on, after N train episodes per family.

For each family: a fresh memory, `episodes` train episodes through the agent loop (skills distilled
and verified on probe items as in `skillfold run`), then the first `items` eval-split items (never
seen in training) with greedy decoding, once without skills and once with retrieved skills. Prints
a markdown table with 95% Wilson intervals, the gain, and the mean gain over families.

    .venv/bin/python benchmarks/bench_fast.py [--episodes 32] [--items 100] [--families ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

DEFAULT_FAMILIES = ["rg:basic_arithmetic+calc", "facts+lookup", "rg:chain_sum+calc", "rg:leg_counting"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--families", nargs="+", default=DEFAULT_FAMILIES)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    arguments = parser.parse_args()

    import transformers

    from agent.config import LoopSettings
    from agent.evaluate import evaluate, memory_contexts
    from agent.loop import Runtime, run_loop
    from engines.base import SamplingParams
    from engines.hf import HFEngine
    from envs import make_family
    from memory import Memory

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    engine = HFEngine.load(batch_size=32)
    greedy = SamplingParams(max_new_tokens=64)
    rows = []
    for spec in arguments.families:
        family = make_family(spec)
        with tempfile.TemporaryDirectory() as home:
            memory = Memory.open(home=Path(home))
            started = time.perf_counter()
            settings = LoopSettings(episodes=arguments.episodes, batch_size=16, reflect_every=0)
            state = run_loop(Runtime(engine=engine, memory=memory, family=family, settings=settings, run_id="bench"),
                             Path(home) / "agent.sqlite")
            train_seconds = time.perf_counter() - started
            off, _ = evaluate(engine, family, arguments.items, greedy)
            contexts = memory_contexts(engine, memory, family, arguments.items, token_budget=600, k=3)
            on, _ = evaluate(engine, family, arguments.items, greedy,
                             contexts=[context for context, _ in contexts], skill_ids=[ids for _, ids in contexts])
            rows.append({
                "family": spec,
                "episodes": state.get("episodes", 0),
                "train_successes": state.get("successes", 0),
                "skills": memory.stats()["skills"]["active"],
                "rejected": state.get("skills_rejected", 0),
                "items": arguments.items,
                "off": off.accuracy, "off_ci": [off.ci_low, off.ci_high],
                "on": on.accuracy, "on_ci": [on.ci_low, on.ci_high],
                "gain": on.accuracy - off.accuracy,
                "train_seconds": train_seconds, "eval_seconds": off.seconds + on.seconds,
            })
            print(json.dumps(rows[-1]), flush=True)

    print("\n| family | train episodes (successes) | skills kept (rejected) | held-out items | memory off [95% CI] | memory on [95% CI] | gain | train s | eval s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['family']} | {row['episodes']} ({row['train_successes']}) | {row['skills']} ({row['rejected']}) "
            f"| {row['items']} | {row['off']:.1%} [{row['off_ci'][0]:.1%}, {row['off_ci'][1]:.1%}] "
            f"| {row['on']:.1%} [{row['on_ci'][0]:.1%}, {row['on_ci'][1]:.1%}] | {row['gain'] * 100:+.1f} pts "
            f"| {row['train_seconds']:.0f} | {row['eval_seconds']:.0f} |"
        )
    mean_gain = sum(row["gain"] for row in rows) / len(rows)
    print(f"\nmean gain over {len(rows)} families: {mean_gain * 100:+.1f} points (target: +15)")
    if arguments.out:
        arguments.out.write_text(json.dumps({"rows": rows, "mean_gain": mean_gain}, indent=2))


if __name__ == "__main__":
    main()
