"""Multi-turn evaluation with each row's KV cache kept between turns (`engines.turns`) against running
every turn's whole conversation again, side by side in one process on the same engine.

A held-out evaluation of `--items` games of each `--env` (greedy, `--turns` turns, `--tokens` tokens a
move, `--batch` rows a forward pass, as experiments/games.toml evaluates): once with the turn cache off
(`turn_cache_mib` 0), once on, alternating `--repeats` times; prints seconds (best of the repeats), the
ratio, the prompt tokens kept, peak memory, and how many episodes played the same moves both ways (the
cache equals a plain run up to float rounding, so greedy moves agree unless two tokens nearly tie).

    .venv/bin/python benchmarks/bench_turns.py [--env twx:coin] [--items 100] [--threads 1] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", action="append", help="a multi-turn family (repeatable; default twx:coin)")
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--budget-mib", type=int, default=4096, help="the turn cache's budget when on")
    parser.add_argument("--out", type=Path)
    arguments = parser.parse_args()

    from agent.evaluate import evaluate
    from engines.base import SamplingParams
    from engines.hf import HFEngine
    from envs.registry import make_family

    engine = HFEngine.load(threads=arguments.threads, batch_size=arguments.batch)
    params = SamplingParams(max_new_tokens=arguments.tokens)
    rows = []
    for spec in arguments.env or ["twx:coin"]:
        family = make_family(spec)
        evaluate(engine, family, 2, params, max_turns=2)  # warm-up: the game's JVM, packed weights
        best: dict[str, float] = {}
        moves: dict[str, list] = {}
        accuracy: dict[str, float] = {}
        kept = 0.0
        for _ in range(arguments.repeats):
            for setting, budget in (("plain", 0), ("kept", arguments.budget_mib)):
                from engines.turns import TurnCache

                engine.turns = TurnCache(budget * 2**20)
                started = time.perf_counter()
                result, episodes = evaluate(engine, family, arguments.items, params, max_turns=arguments.turns)
                seconds = time.perf_counter() - started
                best[setting] = min(best.get(setting, seconds), seconds)
                moves[setting] = [[turn.token_ids for turn in episode.turns] for episode in episodes]
                accuracy[setting] = result.accuracy
                if budget:
                    kept = engine.turns.reused_tokens / max(engine.turns.prompt_tokens, 1)
                engine.turns.clear()
        same = sum(a == b for a, b in zip(moves["plain"], moves["kept"], strict=True))
        row = {"env": spec, "items": arguments.items, "plain_s": round(best["plain"], 1),
               "kept_s": round(best["kept"], 1), "speedup": round(best["plain"] / best["kept"], 2),
               "prompt_tokens_kept": round(kept, 3), "same_moves": same,
               "accuracy_plain": accuracy["plain"], "accuracy_kept": accuracy["kept"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    summary = {"rows": rows, "peak_rss_gib": round(peak, 2), "threads": arguments.threads, "batch": arguments.batch,
               "turns": arguments.turns, "tokens": arguments.tokens, "machine": platform.processor() or platform.machine()}
    print(f"peak RSS {peak:.2f} GiB (both settings, one process)")
    for row in rows:
        print(f"{row['env']}: {row['items']} games, plain {row['plain_s']} s, kept {row['kept_s']} s: "
              f"{row['speedup']}x; {row['prompt_tokens_kept']:.0%} of prompt tokens kept; "
              f"{row['same_moves']}/{row['items']} episodes the same moves; accuracy {row['accuracy_plain']:.0%} "
              f"vs {row['accuracy_kept']:.0%}")
    if arguments.out:
        arguments.out.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
