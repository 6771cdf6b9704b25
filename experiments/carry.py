"""Pack a `skillfold experiment` output directory to resume it on another machine, and unpack it.

A long stream (experiments/games.toml: hours a seed) may have to move between machines that share no disk.
`pack` writes one .tar.xz of what the run reads again when it resumes: the config, every unit and its
episodes, the evaluations on file, and the home (memory, evolve state, fold records, adapters) of each arm
and seed not yet finished, with an unfinished fold's (SFT's, GRPO's) newest checkpoint (none with
`--no-checkpoints`: the run starts again). Left out, as nothing reads them to resume: the homes of arms and
seeds whose every phase is on file (the run skips them; the report and `--check` read units and episodes
only), the adapters of the evolve loop's finished folds that LATEST does not name (refused by the
retention check, or superseded), finished runs' checkpoints, and the experiment's store of folds kept for
reuse by another arm (`out/folds`: without it an identical fold is run again, not reused). Stop every
process writing the directory first: a pack of a directory being written is not a consistent snapshot.

    .venv/bin/python experiments/carry.py pack runs/games carry.tar.xz
    .venv/bin/python experiments/carry.py unpack carry.tar.xz runs/games      (then run the same command again)
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path


def wanted(out: Path, checkpoints: bool = True) -> list[Path]:
    """The files of `out` a resumed run reads, relative to `out`: of an unfinished run's checkpoints the newest
    only (it resumes from that), none with `checkpoints=False` (the run starts again)."""
    files: list[Path] = []
    done = finished(out)
    for path in sorted(out.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        relative = path.relative_to(out)
        parts = relative.parts
        if parts[0] == "folds" or path.name == ".lock":
            continue
        if parts[0] == "homes" and len(parts) > 2 and parts[1] in done:
            continue
        if parts[0] == "homes" and len(parts) > 3:
            home = out / parts[0] / parts[1]
            if parts[2] == "adapters" and parts[3] in superseded(home):
                continue
            if parts[2] in ("folds", "sft", "grpo") and len(parts) > 4 and parts[4].startswith("step-"):
                run = home / parts[2] / parts[3]
                if (run / "result.json").is_file() or not checkpoints:  # finished, or to start again
                    continue
                if parts[4] != max(path.name for path in run.glob("step-*") if path.is_dir()):  # not the newest
                    continue
        files.append(relative)
    return files


def finished(out: Path) -> set[str]:
    """The home names (`<arm>-seed<s>`) of the arms and seeds whose every phase's unit is on file."""
    phases = len(json.loads((out / "config.json").read_text())["stream"]["phases"])
    return {f"{arm.name}-seed{seed.name.removeprefix('seed-')}"
            for arm in (out / "units").glob("*") for seed in arm.glob("seed-*")
            if all((seed / f"phase-{phase}.json").is_file() for phase in range(phases))}


def superseded(home: Path) -> set[str]:
    """Adapters of an arm's home that a resumed run never serves again: those of the evolve loop's finished
    folds (`<run>-fold-<n>`, n up to the folds its state has counted) other than the one LATEST names.
    Any other adapter (SFT's, GRPO's, a routed arm's, a fold registered before its stage was saved) is kept."""
    latest = home / "adapters" / "LATEST"
    served = latest.read_text().strip() if latest.is_file() else None
    names: set[str] = set()
    for state in (home / "evolve").glob("*/state.json"):
        folds = json.loads(state.read_text()).get("folds", 0)
        names |= {f"{state.parent.name}-fold-{number}" for number in range(1, folds + 1)}
    return names - {served}


def pack(out: Path, archive: Path, checkpoints: bool = True) -> None:
    if not (out / "config.json").is_file():
        raise SystemExit(f"{out} is not an experiment output directory (no config.json)")
    files = wanted(out, checkpoints)
    partial = archive.with_name(f".{archive.name}.partial")
    with tarfile.open(partial, "w:xz") as tar:
        for relative in files:
            tar.add(out / relative, arcname=str(relative), recursive=False)
    partial.replace(archive)
    print(f"{archive}: {len(files)} files, {archive.stat().st_size / 2**20:.1f} MiB")


def unpack(archive: Path, out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: unpack into a new directory")
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:xz") as tar:
        tar.extractall(out, filter="data")
    print(f"{out}: unpacked; run the same `skillfold experiment ... --out {out}` command to resume")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack")
    packing.add_argument("out", type=Path)
    packing.add_argument("archive", type=Path)
    packing.add_argument("--no-checkpoints", action="store_true",
                         help="leave out the checkpoints of unfinished runs too (~60 MB each for the default model's "
                         "LoRA): those runs start again")
    unpacking = commands.add_parser("unpack")
    unpacking.add_argument("archive", type=Path)
    unpacking.add_argument("out", type=Path)
    arguments = parser.parse_args()
    if arguments.command == "pack":
        pack(arguments.out, arguments.archive, not arguments.no_checkpoints)
    else:
        unpack(arguments.archive, arguments.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
