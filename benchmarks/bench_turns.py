"""Multi-turn evaluation with each row's KV cache kept between turns (`engines.turns`) against running
every turn's whole conversation again, side by side in one process on the same engine.

A held-out evaluation of `--items` games of each `--env` (greedy, `--turns` turns, `--tokens` tokens a
move, `--batch` rows a forward pass, as experiments/games.toml evaluates): once with the turn cache off
(`turn_cache_mib` 0), once on, alternating `--repeats` times; prints seconds (best of the repeats), the
ratio, the prompt tokens kept, peak memory, and how many episodes played the same moves both ways (the
cache equals a plain run up to float rounding, so greedy moves agree unless two tokens nearly tie).

    .venv/bin/python benchmarks/bench_turns.py [--env twx:coin] [--items 100] [--threads 1] [--out F.json]

`--fold STEPS`: instead, a fold of the games (experiments/games.toml's fold: `--fold-batch` games a step,
`--turns` turns, `--tokens` tokens a move, temperature 0.7, every move trained, a skill in the teacher's
prompt), run twice from the same base and seed, the turn cache off then on: the trainer's live module is
served, and its rollouts keep each game's cache between turns within a step. Prints seconds a step, the
ratio, and in how many steps the rollouts sampled as many tokens both ways (the same samples, but for
float rounding).

    .venv/bin/python benchmarks/bench_turns.py --fold 6 [--env twx:coin] [--threads 1]
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
    parser.add_argument("--fold", type=int, default=0, metavar="STEPS", help="time a fold of this many steps instead")
    parser.add_argument("--fold-batch", type=int, default=8, help="games a fold step")
    arguments = parser.parse_args()
    if arguments.fold:
        return bench_fold(arguments)

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


SKILL = ("Skill (a won game): read the valid actions first; take the action the task names, word for word; "
         "if it is not there, move to another room and look again.")


def bench_fold(arguments) -> int:
    import tempfile

    from agent.evaluate import evaluate
    from engines.base import SamplingParams
    from engines.hf import HFEngine
    from engines.turns import TurnCache
    from envs.base import Message
    from envs.registry import make_family
    from learners.fold import FoldConfig, FoldItem, fold

    engine = HFEngine.load(threads=arguments.threads, batch_size=arguments.batch)
    rows = []
    for spec in arguments.env or ["twx:coin"]:
        family = make_family(spec)
        evaluate(engine, family, 2, SamplingParams(max_new_tokens=arguments.tokens), max_turns=2)  # the JVM, packing
        context = [Message(role="system", content=SKILL)]
        items = [FoldItem(family=spec, index=index, context=context) for index in range(arguments.fold * arguments.fold_batch)]
        config = FoldConfig(steps=arguments.fold, batch_size=arguments.fold_batch, max_turns=arguments.turns,
                            anchor_fraction=0.0, checkpoint_every=arguments.fold,
                            sampling=SamplingParams(temperature=0.7, max_new_tokens=arguments.tokens))
        seconds: dict[str, list[float]] = {}
        generated: dict[str, list[int]] = {}
        kept = 0.0
        for setting, budget in (("plain", 0), ("kept", arguments.budget_mib)):
            engine.turns = TurnCache(budget * 2**20)
            steps: list[dict] = []
            with tempfile.TemporaryDirectory() as scratch:
                fold(engine, {spec: family}, items, config, Path(scratch) / "fold",
                     on_step=lambda record, steps=steps: steps.append(dict(record)))
            engine.unload_adapter()
            seconds[setting] = [record["seconds"] for record in steps]
            generated[setting] = [record["generated_tokens"] for record in steps]
            if budget:
                kept = engine.turns.reused_tokens / max(engine.turns.prompt_tokens, 1)
        plain, with_cache = sum(seconds["plain"]), sum(seconds["kept"])
        row = {"env": spec, "steps": arguments.fold, "games_a_step": arguments.fold_batch,
               "plain_s_a_step": round(plain / arguments.fold, 1), "kept_s_a_step": round(with_cache / arguments.fold, 1),
               "speedup": round(plain / with_cache, 2), "prompt_tokens_kept": round(kept, 3),
               "same_generated_tokens": sum(a == b for a, b in zip(generated["plain"], generated["kept"], strict=True)),
               "plain_steps_s": [round(value, 1) for value in seconds["plain"]],
               "kept_steps_s": [round(value, 1) for value in seconds["kept"]]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {peak:.2f} GiB (both folds, one process)")
    for row in rows:
        print(f"{row['env']}: a fold of {row['steps']} steps x {row['games_a_step']} games: plain {row['plain_s_a_step']} "
              f"s a step, kept {row['kept_s_a_step']} s a step: {row['speedup']}x; {row['prompt_tokens_kept']:.0%} of "
              f"rollout prompt tokens kept; {row['same_generated_tokens']}/{row['steps']} steps sampled as many tokens "
              "both ways")
    if arguments.out:
        arguments.out.write_text(json.dumps({"rows": rows, "peak_rss_gib": round(peak, 2),
                                             "threads": arguments.threads}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
