"""What the folds and experiments pages read from files: fold runs, adapters, evolve events, reports.

A fold run is `<home>/folds/<name>/` (its `fold_config.json` or `config.json`, `metrics.jsonl`,
`result.json`); adapters are `<home>/adapters/<name>/` with `LATEST` naming the newest; the
decisions of evolve runs are the lines of `<home>/evolve/<run>/evolve.jsonl`. An experiment is the
directory `skillfold experiment --out` wrote (`metrics.json`, its episodes under `units/`).
Nothing here writes; a file that cannot be read is shown as such, never raised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.folding import LATEST, adapters_dir

CURVES = ("loss", "kl", "teacher_token_share", "tokens_per_second", "rollout_success")


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, one per step (a step written twice, by a resume, keeps its last)."""
    by_step: dict[int, dict[str, Any]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


@dataclass
class FoldRun:
    name: str
    path: Path
    config: dict[str, Any] | None
    result: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    adapter: Path | None
    latest: bool
    events: list[dict[str, Any]] = field(default_factory=list)
    retention: dict[str, Any] | None = None  # agent.protection's check: before/after on the protected families

    @property
    def steps(self) -> int:
        return self.metrics[-1]["step"] if self.metrics else 0


def latest_adapter(home: Path) -> str | None:
    pointer = adapters_dir(home) / LATEST
    try:
        return pointer.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def adapters(home: Path) -> list[dict[str, Any]]:
    root = adapters_dir(home)
    latest = latest_adapter(home)
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")]
    return [
        {"name": path.name, "path": path, "latest": path.name == latest, "has_fold": (home / "folds" / path.name).is_dir()}
        for path in sorted(found, key=lambda path: path.stat().st_mtime, reverse=True)
    ]


def fold_names(home: Path) -> list[str]:
    root = home / "folds"
    if not root.is_dir():
        return []
    runs = [path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")]
    return [path.name for path in sorted(runs, key=lambda path: path.stat().st_mtime, reverse=True)]


def evolve_events(home: Path) -> list[dict[str, Any]]:
    """Every line of every evolve.jsonl under the home, with its run's name under "run"."""
    root = home / "evolve"
    events: list[dict[str, Any]] = []
    if not root.is_dir():
        return events
    for log in sorted(root.glob("*/evolve.jsonl")):
        try:
            lines = log.read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append({**event, "run": log.parent.name})
    return events


def fold_run(home: Path, name: str) -> FoldRun | None:
    path = home / "folds" / name
    if "/" in name or name.startswith(".") or not path.is_dir():
        return None
    adapter = adapters_dir(home) / name
    config = _json(path / "config.json") or _json(path / "fold_config.json")
    target = str(adapter)
    events = [
        event for event in evolve_events(home)
        if str(event.get("evidence", {}).get("adapter", "")) in (target, name)
    ]
    return FoldRun(
        name=name,
        path=path,
        config=config,
        result=_json(path / "result.json"),
        metrics=read_metrics(path / "metrics.jsonl"),
        adapter=adapter if adapter.is_dir() else None,
        latest=latest_adapter(home) == name,
        events=events,
        retention=_json(path / "retention.json"),
    )


# ------------------------------------------------------------------------------ experiments
@dataclass
class Experiment:
    out: Path
    metrics: Any  # agent.experiment.Metrics
    summary: Any  # agent.report.Summary
    matrices: list[dict[str, Any]]  # one per arm (and memory off for the folding arms)


def read_experiment(out: Path) -> Experiment:
    """The experiment in `out`, its numbers recomputed by agent.report; ConfigError if unreadable."""
    from agent.experiment import FOLDING, MEMORY_ON
    from agent.report import load_metrics, summarize, units_by_key

    metrics = load_metrics(out)
    summary = summarize(metrics)
    units = units_by_key(metrics)
    matrices = []
    for arm in metrics.config.arms:
        for off in (False, True) if arm in FOLDING else (False,):
            rows = []
            for family in metrics.families:
                cells = []
                for phase in range(len(metrics.phases)):
                    evals = []
                    for seed in metrics.config.seeds:
                        unit = units.get((arm, seed, phase))
                        if unit is None:
                            continue
                        evals += [(seed, e) for e in (unit.evals_off if off else unit.evals) if e.family == family]
                    successes, count = sum(e.successes for _, e in evals), sum(e.items for _, e in evals)
                    cells.append({
                        "accuracy": successes / count if count else None,
                        "successes": successes,
                        "count": count,
                        "episodes": [(seed, e.trajectories, experiment_episodes(out, e.trajectories) is not None)
                                     for seed, e in evals],
                    })
                rows.append({"family": family, "cells": cells})
            memory_on = MEMORY_ON[arm] and not off
            matrices.append({"arm": arm, "off": off, "memory": memory_on, "rows": rows})
    return Experiment(out=out, metrics=metrics, summary=summary, matrices=matrices)


def experiment_episodes(out: Path, relative: str) -> Path | None:
    """The episodes file `relative` names, if it lies inside the experiment directory and exists."""
    root = out.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root) or path.suffix != ".jsonl" or not path.is_file():
        return None
    return path
