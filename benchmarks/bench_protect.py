"""What a fold does to what it does not train, with protection by default and without, side by side.

The scenario of issue 20, as a new user runs it, every step a `skillfold` command:
  1. `skillfold run --env rg:chain_sum+calc --episodes E` (the fast path: skills in a fresh memory);
  2. `skillfold fold --steps S --no-protect` (no anchor named: what a fold did before protection);
  3. `skillfold fold --steps S` (protection by default: the general set replayed, the retention check),
     from the same memory and the same base model (`--adapter none`);
  4. `skillfold eval`, memory off, on the first `--items` eval items of the trained family and of
     `rg:letter_counting` (not trained; also in the general set, whose check uses the last 64 eval
     items, so these never decide anything): the base model and both adapters, 95% Wilson intervals.
Prints the table, the folds' times (the anchor share's cost) and the check's time and verdict.

    .venv/bin/python benchmarks/bench_protect.py [--steps 24] [--episodes 32] [--items 100] [--out F.json]
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

SKILLFOLD = [sys.executable, "-m", "agent.cli"]
TRAINED, OTHER = "rg:chain_sum+calc", "rg:letter_counting"


def skillfold(*args: object, ok: tuple[int, ...] = (0,)) -> tuple[dict, float]:
    started = time.perf_counter()
    done = subprocess.run([*SKILLFOLD, *map(str, args), "--json"], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode not in ok:
        sys.exit(f"skillfold {' '.join(map(str, args))} exited {done.returncode}:\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.strip().startswith("{")]
    return json.loads(lines[-1]), seconds


def accuracy(home: Path, adapter: str, items: int) -> dict[str, tuple[int, int]]:
    summary, _ = skillfold("eval", "--env", TRAINED, "--env", OTHER, "--items", items, "--adapter", adapter,
                           "--memory", "off", "--home", home)
    return {row["env"]: (row["successes"], row["items"]) for row in summary["families"]}


def cell(successes: int, items: int) -> str:
    low, high = wilson_interval(successes, items)
    return f"{successes}/{items} = {successes / items:.1%} ({100 * low:.0f}-{100 * high:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--home", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="bench-protect-"))
    print(f"home: {home}", flush=True)
    rows: dict = {"steps": args.steps, "episodes": args.episodes, "items": args.items}

    run, rows["run_seconds"] = skillfold("run", "--env", TRAINED, "--episodes", args.episodes, "--home", home,
                                         "--run-id", "fast")
    rows["run"] = run
    print(f"run: {run.get('episodes')} episodes, {run.get('successes')} successes, {run.get('skills_added')} skills "
          f"({rows['run_seconds']:.0f} s)", flush=True)
    plain, rows["plain_seconds"] = skillfold("fold", "--home", home, "--steps", args.steps, "--adapter", "none",
                                             "--run-id", "plain", "--no-protect")
    print(f"fold --no-protect: {plain['seconds']:.0f} s in the fold ({rows['plain_seconds']:.0f} s command)", flush=True)
    protected, rows["protected_seconds"] = skillfold("fold", "--home", home, "--steps", args.steps, "--adapter",
                                                     "none", "--run-id", "protected", ok=(0, 1))
    check = protected["retention"]
    print(f"fold (protected): {protected['seconds']:.0f} s in the fold, the check {check['seconds_before']:.0f} + "
          f"{check['seconds_after']:.0f} s ({rows['protected_seconds']:.0f} s command); promoted: "
          f"{protected['promoted']}", flush=True)
    rows |= {"plain": plain, "protected": protected}
    adapters = {"base model": "none", "fold --no-protect": plain["adapter"], "fold (protected)": protected["adapter"]}
    table = {name: accuracy(home, adapter, args.items) for name, adapter in adapters.items()}
    rows["accuracy"] = {name: {family: list(value) for family, value in result.items()} for name, result in table.items()}

    print(f"\nmemory off, eval items 0-{args.items - 1}, greedy; {args.episodes} fast-path episodes, folds of "
          f"{args.steps} steps from the base model\n")
    print(f"| model | {TRAINED} (trained) | {OTHER} (not trained) |")
    print("|---|---|---|")
    for name, result in table.items():
        print(f"| {name} | {cell(*result[TRAINED])} | {cell(*result[OTHER])} |")
    print(f"\nfold time: {plain['seconds']:.0f} s without protection, {protected['seconds']:.0f} s with it "
          f"({protected['seconds'] / plain['seconds']:.2f}x); the retention check {check['seconds_before']:.0f} s "
          f"before + {check['seconds_after']:.0f} s after")
    print("retention check of the protected fold (last 64 eval items):")
    for family in check["families"]:
        print(f"  {family['family']}: {family['before']}/{family['items']} -> {family['after']}/{family['items']}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
