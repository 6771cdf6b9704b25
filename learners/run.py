"""One trainer run, whatever trains in it (the fold, SFT, GRPO): the harness they share.

`trainer_run(...)` opens a run and yields a `TrainerRun`: the seeds set, the run directory made and
cleaned of what a killed write left, the config written, the base weights borrowed from the engine
(`learners.student.borrow`), the student attached (LoRA, or every weight where the engine shares its
weights), AdamW over its trained parameters, and, with `resume`, the newest checkpoint loaded and the
metrics of its steps kept. Inside the block the trainer runs its steps (`log` a step's metrics,
`checkpoint` atomically); `finish()` saves the adapter and has the engine serve it. Any exception (a
NaN loss, an interrupt, a bad checkpoint) gives the engine back what it served before the run, with
nothing saved; `abandon()` does that on purpose (nothing to train on).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engines.base import Engine, LentBase
from learners.checkpoint import (
    CheckpointError,
    clean_scratch,
    keep_metrics,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from learners.student import Loan, abandon, adapter_parameters, attach_student, borrow, finish_training


@dataclass
class TrainerRun:
    """A run in progress: the loan, the student and its optimizer, where a resume starts."""

    config: Any  # the trainer's config: its LoRA shape, full_finetune, heap_threshold_kib (a FoldConfig's)
    run_dir: Path
    loan: Loan
    previous_adapter: str | None
    student: Any = None
    optimizer: Any = None
    start_step: int = 0
    saved: dict[str, Any] = field(default_factory=dict)  # the loaded checkpoint's state (empty on a new start)
    kept: list[dict[str, Any]] = field(default_factory=list)  # metrics of the checkpoint's steps
    done: bool = False

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def log(self, record: dict[str, Any]) -> None:
        """Append one step's metrics to `metrics.jsonl`."""
        with open(self.metrics_path, "a") as sink:
            sink.write(json.dumps(record) + "\n")

    def checkpoint(self, step: int, state: dict[str, Any], tensors: dict[str, Any] | None = None,
                   snapshot: bool = False) -> None:
        """An atomic checkpoint of the student and optimizer after `step` (`learners.checkpoint`); `snapshot`
        keeps its adapter after the checkpoint is pruned."""
        save_checkpoint(self.run_dir, step, self.student, self.optimizer, state, tensors=tensors, snapshot=snapshot)

    def finish(self) -> Path:
        """Save the adapter to `run_dir/adapter` and have the engine serve it; returns its directory."""
        adapter_dir = finish_training(self.loan, self.student, self.config, self.run_dir)
        self.done = True
        return adapter_dir

    def abandon(self) -> None:
        """End the run with nothing saved: the engine serves what it served before."""
        self.done = True
        abandon(self.loan, self.student, self.config, self.previous_adapter)


@contextmanager
def trainer_run(
    engine: Engine,
    config: Any,
    run_dir: Path,
    *,
    seed: int,
    base: LentBase | None = None,
    resume: bool = False,
    what: str,
    fail: Callable[[str], Exception],
    config_file: str | None = None,
    config_json: str | None = None,
    prepare: Callable[[TrainerRun], None] | None = None,
    learning_rate: float | None = None,
) -> Iterator[TrainerRun]:
    """Open a trainer run (see the module's docstring). `seed` seeds torch and `random` first; `what`
    names the trainer in messages ("fold", "SFT", "GRPO run"); `fail(message)` is the trainer's own
    error; `config_json` is written to `run_dir/config_file`; `prepare(run)` runs after the student
    and optimizer exist and before a checkpoint is loaded (a frozen teacher or reference takes the
    student's starting state there)."""
    torch.manual_seed(seed)
    random.seed(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_scratch(run_dir)  # what a killed write left: checkpoint and adapter scratch, a metrics rewrite
    if config_file is not None and config_json is not None:
        (run_dir / config_file).write_text(config_json)
    previous = engine.adapter
    loan = borrow(engine, base, heap_threshold_kib=config.heap_threshold_kib, scratch=run_dir)
    run = TrainerRun(config=config, run_dir=run_dir, loan=loan, previous_adapter=previous)
    try:
        if config.full_finetune and not loan.shared:
            raise fail("a full fine-tune is served only by an engine that shares its weights (the HF engine); use "
                       "a LoRA adapter (full_finetune=false)")
        run.student = attach_student(loan.base.model, config, previous)
        run.optimizer = torch.optim.AdamW([parameter for _, parameter in adapter_parameters(run.student)],
                                          lr=config.learning_rate if learning_rate is None else learning_rate,
                                          weight_decay=config.weight_decay)
        if prepare is not None:
            prepare(run)
        checkpoint_path = latest_checkpoint(run_dir) if resume else None
        if checkpoint_path is not None:
            try:
                run.saved = load_checkpoint(checkpoint_path, run.student, run.optimizer)
            except CheckpointError as error:
                raise fail(f"cannot resume the {what} in {run_dir}: {error}") from None
            run.start_step = run.saved["step"]
        run.kept = keep_metrics(run.metrics_path, run.start_step)  # none on a new start
        yield run
    except BaseException:
        if not run.done:
            run.abandon()  # the engine serves what it served before
        raise
