"""Choosing what to fold, and where adapters live in the skillfold home.

`fold_items` turns memory into fold prompts: train-split items of every family with active skills,
each with its teacher's privileged context (the family's skills retrieved for that item, rendered as
in a memory-on prompt, oldest skill first), plus anchor items of other families with no context. Probe items (the last
train items, kept for skill verification) and every eval item are never used.

Adapters are registered under `home/adapters/<name>/`; `home/adapters/LATEST` names the newest.
A fold run registers its adapter with `register_fold`, which a kill at any point leaves resumable.
`resolve_adapter("latest" | "none" | PATH, home)` is what `--adapter` means on every command.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TypeVar

from agent.skills import render_context, retrieve_for
from engines.base import Engine
from envs.base import TaskFamily, item_prompt
from learners.fold import FoldItem, FoldResult
from learners.grpo import GrpoResult
from memory import Memory

LATEST = "LATEST"
ResultT = TypeVar("ResultT", FoldResult, GrpoResult)
PENDING_RESULT = "result.pending.json"


def fold_items(
    memory: Memory,
    engine: Engine,
    families: dict[str, TaskFamily],
    anchors: dict[str, TaskFamily],
    items_per_family: int,
    probes: int,
    token_budget: int = 600,
    k: int = 3,
    seed: int = 0,
) -> list[FoldItem]:
    rng = random.Random(seed)
    items: list[FoldItem] = []
    for name, family in families.items():
        available = family.split_size("train") - probes
        indices = rng.sample(range(available), min(items_per_family, available))
        for index in indices:
            prompt = item_prompt(family, "train", index)
            if prompt is None:  # an environment that fails teaches nothing
                continue
            # rendered oldest first: items whose retrieval picks the same skills give the teacher the
            # same context, a prefix its passes compute once per batch
            skills = retrieve_for(memory, engine, name, prompt, token_budget, k)
            if skills:
                items.append(FoldItem(family=name, index=index, context=render_context(skills)))
    for name, family in anchors.items():
        available = family.split_size("train") - probes
        for index in rng.sample(range(available), min(items_per_family, available)):
            items.append(FoldItem(family=name, index=index, anchor=True))
    return items


def adapters_dir(home: Path) -> Path:
    return home / "adapters"


def register_adapter(home: Path, name: str, adapter_dir: Path, *, latest: bool = True) -> Path:
    """Move a finished adapter into `home/adapters/<name>` and point LATEST at it (atomically); with
    `latest=False` (a fold that failed its retention check) LATEST stays where it was."""
    target = adapters_dir(home) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if adapter_dir.resolve() != target.resolve():
        if target.exists():
            raise FileExistsError(f"an adapter named {name} is already registered in {target.parent}")
        os.replace(adapter_dir, target)
    if not latest:
        return target
    pointer = target.parent / f".{LATEST}.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, target.parent / LATEST)
    return target


def register_fold(home: Path, name: str, run_dir: Path, result: ResultT, *, latest: bool = True) -> ResultT:
    """Register a finished fold's adapter as `name` and write its `result.json`, in an order a kill at any
    point leaves resumable: the result goes to `result.pending.json` first, then the adapter is registered
    (moved, then `latest`), and the rename to `result.json` marks it all done (`finish_registration`).
    `result`: a `FoldResult`, or any trainer's result with an `adapter` (`GrpoResult`)."""
    trained = Path(result.adapter)
    result = result.model_copy(update={"adapter": str(adapters_dir(home) / name)})
    pending, scratch = run_dir / PENDING_RESULT, run_dir / f".{PENDING_RESULT}.tmp"
    scratch.write_text(result.model_dump_json(indent=2))
    os.replace(scratch, pending)
    register_adapter(home, name, trained, latest=latest)
    os.replace(pending, run_dir / "result.json")
    return result


def finish_registration(home: Path, name: str, run_dir: Path, *, latest: bool = True) -> bool:
    """Finish what a kill cut short in `register_fold` after the adapter was moved: `latest` points at it
    and `result.json` is written. True when there was something to finish."""
    pending = run_dir / PENDING_RESULT
    if (run_dir / "result.json").is_file() or not pending.is_file():
        return False
    register_adapter(home, name, adapters_dir(home) / name, latest=latest)
    os.replace(pending, run_dir / "result.json")
    return True


def resolve_adapter(spec: str | None, home: Path) -> str | None:
    """`none`/None -> no adapter; `latest` -> the newest registered one (None if there is none); else a path."""
    if spec in (None, "none"):
        return None
    if spec == "latest":
        pointer = adapters_dir(home) / LATEST
        if not pointer.is_file():
            return None
        return str(adapters_dir(home) / pointer.read_text().strip())
    return spec
