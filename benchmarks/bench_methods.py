"""The fold methods side by side on one family: held-out gain and what each spent to get it.

Every step a `skillfold` command, as a user runs them:
  1. `skillfold run --env FAMILY --episodes E` (the fast path: skills in a fresh memory);
  2. for each method, `skillfold fold --method M --steps S --adapter none --no-protect` from the same
     memory and the same base model (protection off: the method alone is compared; its cost is measured
     in docs/benchmarks.md "Protection by default");
  3. `skillfold eval --memory off` on the first `--items` eval items of FAMILY: the base model and
     every method's adapter, 95% Wilson intervals.
Prints, per method: held-out accuracy and gain over the base model, the fold's rollouts (episodes played,
a pedagogical fold's replays included), rollout tokens, trained tokens, teacher-scored tokens (the
tokens a teacher pass read: every trained token for the distillation losses, none for imitation) and
the fold's seconds (comparable only when the machine was otherwise idle).

    .venv/bin/python benchmarks/bench_methods.py [--env rg:chain_sum+calc] [--steps 16] [--items 100]
        [--methods opsd,rmsd,speculative,trb,pedagogical] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.evaluate import wilson_interval  # noqa: E402
from learners.fold import FoldConfig  # noqa: E402
from learners.policies import needs_teacher_pass, parts_of  # noqa: E402

SKILLFOLD = [sys.executable, "-m", "agent.cli"]


def skillfold(*args: object) -> tuple[dict, float]:
    started = time.perf_counter()
    done = subprocess.run([*SKILLFOLD, *map(str, args), "--json"], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"skillfold {' '.join(map(str, args))} exited {done.returncode}:\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.strip().startswith("{")]
    return json.loads(lines[-1]), seconds


def accuracy(home: Path, env: str, adapter: str, items: int) -> tuple[int, int]:
    summary, _ = skillfold("eval", "--env", env, "--items", items, "--adapter", adapter, "--memory", "off",
                           "--home", home)
    row = summary["families"][0] if "families" in summary else summary  # one family: its row alone
    return row["successes"], row["items"]


def spent(run_dir: Path, method: str) -> dict[str, float]:
    """A fold's totals from its metrics.jsonl (a step written twice, by a resume, counts once)."""
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["step"]] = record
    teacher_pass = needs_teacher_pass(parts_of(FoldConfig(method=method)))
    trained = sum(record.get("trained_tokens", 0) for record in records.values())
    return {
        "rollouts": sum(record.get("rollouts", record["episodes"]) for record in records.values()),
        "generated_tokens": sum(record["generated_tokens"] for record in records.values()),
        "trained_tokens": trained,
        "teacher_scored_tokens": trained if teacher_pass else 0,
        "rollout_success": sum(record["rollout_success"] for record in records.values()) / len(records),
        "seconds": sum(record["seconds"] for record in records.values()),
    }


def cell(successes: int, items: int) -> str:
    low, high = wilson_interval(successes, items)
    return f"{successes}/{items} = {successes / items:.0%} ({100 * low:.0f}-{100 * high:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="rg:chain_sum+calc")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--methods", default="opsd,rmsd,speculative,trb,pedagogical")
    parser.add_argument("--home", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    methods = [method.strip() for method in args.methods.split(",") if method.strip()]
    home = args.home or Path(tempfile.mkdtemp(prefix="bench-methods-"))
    print(f"home: {home}", flush=True)
    rows: dict = {"env": args.env, "steps": args.steps, "episodes": args.episodes, "items": args.items, "methods": {}}
    run, seconds = skillfold("run", "--env", args.env, "--episodes", args.episodes, "--home", home, "--run-id", "fast")
    print(f"run: {run.get('episodes')} episodes, {run.get('successes')} successes, {run.get('skills_added')} skills "
          f"({seconds:.0f} s)", flush=True)
    rows["base"] = accuracy(home, args.env, "none", args.items)
    print(f"base model, memory off: {cell(*rows['base'])}", flush=True)
    for method in methods:
        result, seconds = skillfold("fold", "--home", home, "--steps", args.steps, "--adapter", "none", "--run-id",
                                    method, "--method", method, "--no-protect")
        row = spent(Path(result["run_dir"]), method) | {"command_seconds": seconds}
        row["accuracy"] = accuracy(home, args.env, result["adapter"], args.items)
        rows["methods"][method] = row
        print(f"{method}: {cell(*row['accuracy'])}, {row['rollouts']} rollouts, {row['generated_tokens']} rollout "
              f"tokens, {row['seconds']:.0f} s", flush=True)

    base_successes, items = rows["base"]
    print(f"\n{args.env}, memory off, eval items 0-{args.items - 1}, greedy; {args.episodes} fast-path episodes, "
          f"folds of {args.steps} steps x 8 episodes from the base model, no protection\n")
    print("| method | held-out (95% CI) | gain, points | rollouts | rollout tokens | trained tokens | "
          "teacher-scored tokens | rollout success | fold s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| base model | {cell(base_successes, items)} | | | | | | | |")
    for method, row in rows["methods"].items():
        successes, count = row["accuracy"]
        gain = 100 * (successes / count - base_successes / items)
        print(f"| {method} | {cell(successes, count)} | {gain:+.0f} | {row['rollouts']} | {row['generated_tokens']} | "
              f"{row['trained_tokens']} | {row['teacher_scored_tokens']} | {row['rollout_success']:.0%} | "
              f"{row['seconds']:.0f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
