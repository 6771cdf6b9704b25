"""Rejection-sampling fine-tuning, the experiment's `sft` arm: LoRA SFT on the agent's own successes.

The data are the successful train episodes of a phase, seen as the student sees them: the task
prompt and every turn, *without* the skills that were in the prompt. Token masks come from
`learners.views.token_view`: every assistant token and its end-of-turn token is trained; prompts,
tool results and environment text are not. The loss is plain cross-entropy over a batch's trained
tokens,

    L = -(1/N) Σ_{(b,t) trained} log p_θ(x_{b,t} | x_{b,<t}),

computed from final hidden states in chunks (`learners.losses.chunked_head_loss`), so the
(tokens x vocabulary) logits are never whole. For equal compute with the fold, the steps, batch
size, LoRA shape, weight decay and grad-norm clip are the fold's (`FoldConfig`); only the learning
rate is the SFT's own. Batches cycle through a seeded shuffle of the episodes; a later phase trains
the adapter of the earlier ones further. Checkpoints and resume as the fold's (`learners.checkpoint`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from engines.base import Engine, LentBase
from envs.base import Trajectory
from learners.fold import FoldConfig
from learners.losses import Projection, chunked_head_loss, linear_head
from learners.passes import causal_lm, projection, shared_prefix_hidden_at
from learners.run import trainer_run
from learners.student import adapter_parameters
from learners.views import TemplateError, TokenView, sampled_ids, token_view

log = logging.getLogger(__name__)


class SftError(RuntimeError):
    """An SFT run that cannot go on (a checkpoint that cannot be restored)."""


class SftConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    learning_rate: float = Field(default=1e-4, gt=0, description="AdamW learning rate (the rest is the fold's)")
    max_tokens: int = Field(default=2048, ge=16, description="longer episodes are left out")


class SftResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    episodes: int
    steps: int
    trained_tokens: int
    loss_first: float | None
    loss_last: float | None
    adapter: str | None = Field(description="the new adapter directory; None when there was nothing to train on")
    seconds: float


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood: logits (n, V), targets (n,) -> (n,), (n,)."""
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    return nll, nll.detach()


def sft_loss(model, views: Sequence[TokenView], chunk_size: int = 128,
             project: Projection = linear_head) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the trained tokens of `views`, and how many there were."""
    positions = [view.trained_positions for view in views]
    hidden = shared_prefix_hidden_at(model, [view.input_ids for view in views], positions)  # (N, H)
    targets = torch.tensor(
        [view.input_ids[p] for view, row in zip(views, positions, strict=True) for p in row], device=hidden.device
    )  # (N,)
    weight = causal_lm(model).get_output_embeddings().weight  # (V, H)
    mask = torch.ones((1, targets.numel()), dtype=torch.bool, device=hidden.device)  # (1, N)
    loss, _ = chunked_head_loss(hidden[None], weight, mask, _cross_entropy, (targets[None],), chunk_size, project)
    return loss, int(targets.numel())


def training_views(tokenizer, stop_ids: set[int], trajectories: Sequence[Trajectory],
                   max_tokens: int) -> list[TokenView]:
    """Student views (no skills in the prompt) of the successful episodes that fit, on their sampled tokens."""
    views = []
    for trajectory in trajectories:
        if not trajectory.success or not trajectory.turns:
            continue
        try:
            view = token_view(tokenizer, trajectory.messages(), stop_ids, sampled=sampled_ids(trajectory))
        except TemplateError as error:
            log.warning("skipping episode %s: %s", trajectory.id, error)
            continue
        if view.trained_positions and len(view.input_ids) <= max_tokens:
            views.append(view)
    return views


def sft(engine: Engine, trajectories: Sequence[Trajectory], fold_config: FoldConfig, config: SftConfig,
        run_dir: Path, seed: int = 0, base: LentBase | None = None, *, resume: bool = False,
        on_step: Callable[[dict[str, Any]], None] | None = None) -> SftResult:
    """Fine-tune the engine's model on the successes; the engine serves the new adapter afterwards
    (trained on its lent weights where it shares them, else on `base` or the model loaded again).

    Every `fold_config.checkpoint_every` steps (and after the last) an atomic checkpoint goes to
    `run_dir` (`learners.checkpoint`); `resume` continues from the newest one, to the same adapter
    bit for bit as a run never stopped, and `run_dir/metrics.jsonl` continues after its step.
    Raises `SftError` on a checkpoint that cannot be restored (the engine serves what it served before)."""
    started = time.perf_counter()
    if not any(trajectory.success and trajectory.turns for trajectory in trajectories):
        return SftResult(episodes=0, steps=0, trained_tokens=0, loss_first=None, loss_last=None, adapter=None,
                         seconds=time.perf_counter() - started)
    with trainer_run(engine, fold_config, run_dir, seed=seed, base=base, resume=resume, what="SFT", fail=SftError,
                     learning_rate=config.learning_rate) as run:
        views = training_views(run.loan.base.tokenizer, run.loan.base.stop_ids, trajectories, config.max_tokens)
        if not views:
            run.abandon()  # the engine serves what it served before
            return SftResult(episodes=0, steps=0, trained_tokens=0, loss_first=None, loss_last=None, adapter=None,
                             seconds=time.perf_counter() - started)
        order = list(range(len(views)))
        random.Random(seed).shuffle(order)
        student, optimizer, start_step = run.student, run.optimizer, run.start_step
        if run.saved:
            log.info("resumed SFT from %s (step %d)", run_dir, start_step)
        project = projection(student)
        parameters = [parameter for _, parameter in adapter_parameters(student)]
        losses = [record["loss"] for record in run.kept]  # the checkpoint's steps; none on a new start
        trained = sum(record["trained_tokens"] for record in run.kept)
        student.train()
        for step in range(start_step, fold_config.steps):
            batch = [views[order[(step * fold_config.batch_size + i) % len(order)]]
                     for i in range(fold_config.batch_size)]
            loss, tokens = sft_loss(student, batch, fold_config.chunk_size, project)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, fold_config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            trained += tokens
            record = {"step": step + 1, "loss": losses[-1], "trained_tokens": tokens}
            run.log(record)
            if on_step:
                on_step(record)
            if (step + 1) % fold_config.checkpoint_every == 0 or step + 1 == fold_config.steps:
                run.checkpoint(step + 1, {"config": config.model_dump(mode="json"),
                                          "fold": fold_config.model_dump(mode="json")})
        student.eval()
        adapter_dir = run.finish()
    return SftResult(episodes=len(views), steps=fold_config.steps, trained_tokens=trained,
                     loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
                     adapter=str(adapter_dir), seconds=time.perf_counter() - started)
