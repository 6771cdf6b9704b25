"""Protection by default: a fold keeps the model where it was on everything it does not train.

Two parts, both on unless turned off (`ProtectionSettings`, `protection.*` on fold, evolve, experiment):

1. Replay (`protected_families`). The fold's anchor items come from every family in memory that the fold
   does not train, from the general prompt set shipped with skillfold (`general`: everyday instructions;
   reasoning-gym families the default model can partly do), and from any family named with `--anchor`.
   An anchor item is played by the student with no skills and distilled toward the model as it was
   before the fold (the frozen teacher, no context): a KL-to-base term on replayed prompts, at
   `fold.anchor_fraction` of every batch.
2. The retention check (`measure_before`, `check_after`). Before the fold, memory-off accuracy on the
   last `gate_items` eval items of every protected family that has a score, with the adapter the fold
   starts from; after it, the same with the new adapter. If any drops by more than `tolerance`, the
   adapter is not promoted (`latest` and the served adapter stay as they were) unless `force`; the
   evidence is `retention.json` in the fold's run directory, written before and after (a killed fold
   resumes without measuring again).
3. The fallback (`fallback`, on by default). When the fold's last adapter fails, the adapters its
   checkpoints kept (`fold.keep_adapters`: every `fold.checkpoint_every` steps) are checked the same way,
   newest first, and the first that passes is promoted: the fold keeps what it learned before the damage
   began. Every adapter tried is in the evidence (`attempts`). The gate's items decide among several
   adapters, so their accuracy on those items flatters the one chosen; reports measure on other items.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from agent.config import ProtectionSettings, write_atomic
from agent.evaluate import evaluate
from engines.base import Engine, SamplingParams
from envs import make_family
from envs.base import TaskFamily
from learners.checkpoint import adapter_snapshots

log = logging.getLogger(__name__)

RETENTION = "retention.json"


class FamilyRetention(BaseModel):
    model_config = ConfigDict(extra="forbid")

    family: str
    first_item: int = Field(description="the eval index of the first item")
    items: int
    before: int = Field(description="successes with the adapter the fold started from")
    after: int | None = Field(default=None, description="successes with the new adapter")

    @property
    def drop(self) -> float | None:
        return None if self.after is None else (self.before - self.after) / self.items


class Attempt(BaseModel):
    """One adapter of a fold measured on the protected families' gate items."""

    model_config = ConfigDict(extra="forbid")

    step: int | None = Field(description="the checkpoint's step; None: the fold's last adapter")
    adapter: str
    after: dict[str, int] = Field(description="successes per family")
    passed: bool


class RetentionCheck(BaseModel):
    """The evidence behind a promotion: accuracies before and after a fold on the protected families."""

    model_config = ConfigDict(extra="forbid")

    tolerance: float
    adapter_before: str | None
    adapter_after: str | None = Field(default=None, description="the adapter the verdict is about: the fold's last, "
                                      "or the earlier checkpoint's the fallback chose (`step`)")
    step: int | None = Field(default=None, description="the checkpoint step of `adapter_after` when the fallback "
                             "chose it; None: the fold's last adapter")
    families: list[FamilyRetention]
    passed: bool | None = Field(default=None, description="None until the new adapter is measured")
    forced: bool = Field(default=False, description="promoted although it failed (--force)")
    attempts: list[Attempt] = Field(default_factory=list, description="every adapter measured, the last first")
    seconds_before: float = 0.0
    seconds_after: float = 0.0

    def failures(self) -> list[FamilyRetention]:
        return [row for row in self.families if row.drop is not None and row.drop > self.tolerance + 1e-9]

    @property
    def promoted(self) -> bool:
        return bool(self.passed) or self.forced

    def lines(self) -> list[str]:
        rows = []
        for row in self.families:
            after = "?" if row.after is None else f"{row.after}/{row.items} = {row.after / row.items:.1%}"
            verdict = "" if row.drop is None else (" DROPPED" if row in self.failures() else " kept")
            rows.append(f"  {row.family}: {row.before}/{row.items} = {row.before / row.items:.1%} -> {after}{verdict}")
        return rows

    def summary(self) -> str:
        if not self.families:
            return "retention check: no protected family has a score"
        if self.passed is None:
            return "retention check: not finished"
        failed = self.failures()
        if not failed:
            passed = (f"retention check passed: no protected family dropped more than {100 * self.tolerance:.0f} "
                      f"points ({', '.join(row.family for row in self.families)})")
            if self.step is None:
                return passed
            last = self.with_after(self.attempts[0].after)
            return (f"{passed} with the adapter of step {self.step}: the fold's last adapter dropped "
                    f"({_dropped(last.failures())}), so the newest checkpoint that keeps them is promoted")
        verdict = "promoted anyway (--force)" if self.forced else "not promoted"
        return (f"retention check FAILED ({_dropped(failed)}; tolerance {100 * self.tolerance:.0f} points): "
                f"{verdict}")

    def with_after(self, after: dict[str, int]) -> RetentionCheck:
        """This check with `after` (successes per family) as the new adapter's."""
        return self.model_copy(update={"families": [row.model_copy(update={"after": after[row.family]})
                                                    for row in self.families]})

    def promoted_adapter(self, last: str) -> str:
        """The adapter to register: the earlier checkpoint's the fallback chose, else `last` (the fold's)."""
        return self.adapter_after or last


def _dropped(rows: Sequence[FamilyRetention]) -> str:
    return ", ".join(f"{row.family} {row.before / row.items:.1%} -> {row.after / row.items:.1%}"  # type: ignore[operator]
                     for row in rows)


def protected_families(memory, trained: Collection[str], anchors: Sequence[str],
                       settings: ProtectionSettings) -> dict[str, TaskFamily]:
    """The families a fold keeps as they are: `anchors` (always), then, with protection on, every family in
    memory and the general set; none that the fold trains. A family in memory that can no longer be made
    (a plug-in file gone) is skipped with a warning; a bad anchor or general spec raises EnvSpecError."""
    named = list(anchors) + (list(settings.general) if settings.enabled else [])
    stored = list(memory.families()) if settings.enabled and settings.memory_families else []
    families: dict[str, TaskFamily] = {}
    for spec in dict.fromkeys(named + stored):
        if spec in trained or spec in families:
            continue
        try:
            family = make_family(spec)
        except Exception as error:
            if spec in named:
                raise
            log.warning("not protecting %s, a family in memory that cannot be made: %s", spec, error)
            continue
        if family.name not in trained:
            families[family.name] = family
    return families


def scored(families: dict[str, TaskFamily]) -> dict[str, TaskFamily]:
    """The families with a score (what the retention check measures)."""
    return {name: family for name, family in families.items() if getattr(family, "scored", True)}


def gate_window(family: TaskFamily, items: int) -> tuple[int, int]:
    """(first eval index, items): the last `items` of the eval split (all of it when it is smaller)."""
    size = family.split_size("eval")
    count = min(items, size)
    return size - count, count


def _successes(engine: Engine, family: TaskFamily, first: int, items: int, sampling: SamplingParams,
               max_turns: int) -> int:
    result, _ = evaluate(engine, family, items, sampling, max_turns=max_turns, offset=first)
    return result.successes


def measure_before(engine: Engine, families: dict[str, TaskFamily], settings: ProtectionSettings, run_dir: Path,
                   sampling: SamplingParams, max_turns: int = 8) -> RetentionCheck | None:
    """Memory-off successes of the scored protected families with the engine's adapter now, saved as
    `run_dir/retention.json` (read back when a resumed fold has it). None when the check is off."""
    if not (settings.enabled and settings.gate):
        return None
    saved = run_dir / RETENTION
    if saved.is_file():
        return RetentionCheck.model_validate_json(saved.read_text())
    started = time.perf_counter()
    rows = []
    for name, family in scored(families).items():
        first, items = gate_window(family, settings.gate_items)
        rows.append(FamilyRetention(family=name, first_item=first, items=items,
                                    before=_successes(engine, family, first, items, sampling, max_turns)))
    check = RetentionCheck(tolerance=settings.tolerance, adapter_before=engine.adapter, families=rows,
                           seconds_before=time.perf_counter() - started)
    write_atomic(saved, check.model_dump_json(indent=2))
    return check


def check_after(engine: Engine, check: RetentionCheck, families: dict[str, TaskFamily], settings: ProtectionSettings,
                run_dir: Path, adapter: str, sampling: SamplingParams, max_turns: int = 8,
                steps: int | None = None) -> RetentionCheck:
    """The same items with `adapter` (the fold's last, after `steps` steps) served: fills in `after` and the
    verdict, saves it. If it fails, with `settings.fallback` and without `force`, the adapters the fold's
    checkpoints kept before step `steps` are measured newest first, and the first that passes is the verdict's
    (`adapter_after`, `step`): the caller promotes that one. The engine is left serving the adapter the fold
    started from. A check already finished is returned."""
    if check.passed is not None:
        if not check.passed and settings.force and not check.forced:  # --force on a fold that failed before
            check = check.model_copy(update={"forced": True})
            write_atomic(run_dir / RETENTION, check.model_dump_json(indent=2))
        return check
    started = time.perf_counter()
    candidates: list[tuple[int | None, str]] = [(None, adapter)]
    if settings.fallback and not settings.force:
        candidates += [(step, str(path)) for step, path in reversed(adapter_snapshots(run_dir))
                       if steps is None or step < steps]
    attempts: list[Attempt] = []
    done = check
    try:
        for step, candidate in candidates:
            serve(engine, candidate)
            after = {row.family: _successes(engine, families[row.family], row.first_item, row.items, sampling,
                                            max_turns) for row in check.families}
            measured = check.with_after(after).model_copy(update={"adapter_after": candidate, "step": step})
            attempts.append(Attempt(step=step, adapter=candidate, passed=not measured.failures(), after=after))
            if step is None or attempts[-1].passed:  # the verdict: the last adapter's, or the fallback's
                done = measured
            if attempts[-1].passed:
                break
    finally:
        serve(engine, check.adapter_before)
    passed = not done.failures()
    done = done.model_copy(update={"passed": passed, "forced": not passed and settings.force, "attempts": attempts,
                                   "seconds_after": time.perf_counter() - started})
    write_atomic(run_dir / RETENTION, done.model_dump_json(indent=2))
    return done


def serve(engine: Engine, adapter: str | None) -> None:
    """Make the engine serve `adapter` (None: the base weights)."""
    if engine.adapter == adapter:
        return
    engine.unload_adapter()
    if adapter:
        engine.load_adapter(adapter)
