"""The fold loop: on-policy self-distillation of skills into a LoRA adapter (or all weights).

One step, for `batch_size` train items drawn from families with active skills:
  1. rollout: the engine plays each item to the end (multi-turn, real environment and tool
     observations) under the method's rollout policy (`learners.policies`): the student alone (its
     current adapter, *no skills in its prompt*), or guided by its teacher;
  2. views: the same episode rendered for the student and for the teacher (privileged context, i.e.
     the family's skills, put in its prompt; its own length limit), on exactly the sampled tokens;
  3. teacher (`learners.teacher`): scores every trained token (all assistant turns, not env/tool text);
  4. the method's token mask and loss over the trained tokens, from final hidden states in chunks of
     positions (`learners.passes`), `micro_batch` episodes per forward/backward pass;
  5. AdamW step; the new adapter handed to the engine (`learners.student.hand_off`); an atomic
     checkpoint every `checkpoint_every` steps.
The trainer owns the student, the optimizer, the teacher's passes and checkpoints; it reaches the
engine only through the protocol (`engines.base`). "Anchor" items (families without skills) are
distilled toward the plain base model with no context: "stay as you are" where no skill applies.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engines.base import Engine, LentBase, SamplingParams, SharesWeights
from envs.base import Message, TaskFamily, Trajectory
from learners.checkpoint import ensure_snapshots
from learners.passes import (
    attention,
    backward_in_passes,
    causal_lm,
    projection,
    reverse_kl,
    shared_prefix_hidden_at,
)
from learners.policies import (
    METHODS,
    MethodError,
    Parts,
    anchor_balance,
    check_engine,
    imitated,
    loss_is_kl,
    mixture_weight,
    needs_teacher_pass,
    parts_of,
    play,
    token_loss,
    token_mask,
)
from learners.rollout import run_episodes, score_trajectory
from learners.run import TrainerRun, trainer_run
from learners.student import ALL_LINEAR, adapter_parameters, hand_off, load_base
from learners.teacher import Teacher
from learners.views import TemplateError, episode_views, sampled_ids

log = logging.getLogger(__name__)

__all__ = ["ALL_LINEAR", "FoldConfig", "FoldError", "FoldItem", "FoldResult", "fold", "fold_step", "measure_kl"]


class FoldError(RuntimeError):
    """A fold that cannot go on (a NaN loss, no prompts); the last good checkpoint is kept."""


class FoldConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["opsd", "opd", "rmsd", "speculative", "trb", "pedagogical"] = Field(
        default="opsd",
        description="opsd: self teacher with skills; opd: external teacher; rmsd: opsd on the top disagreement "
        "tokens; speculative: opsd on SKD rollouts (teacher replaces tokens outside its top-k); trb: opsd on "
        "rollouts from a student-teacher mixture annealed to pure student; pedagogical: the teacher writes the "
        "rollouts within a surprisal budget to the student that widens only as far as success needs, and the "
        "student imitates them weighted by its own surprisal (docs/methods.md)",
    )
    steps: int = Field(default=32, ge=1, description="measured: the calculator skill clicks at step ~25 of 32 (docs/benchmarks.md)")
    batch_size: int = Field(default=8, ge=1, description="episodes per optimizer step")
    learning_rate: float = Field(default=5e-4, gt=0)
    weight_decay: float = 0.0
    max_grad_norm: float = Field(default=1.0, gt=0)
    full_finetune: bool = Field(default=False, description="train every weight instead of a LoRA adapter")
    lora_rank: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_LINEAR))
    loss: Literal["reverse_kl", "jsd", "sampled", "imitation"] = Field(
        default="reverse_kl", description="per-token objective; left out, the method's (imitation for pedagogical, "
        "reverse_kl for the others)")
    beta: float = Field(default=1.0, ge=0, le=1, description="JSD beta: 1 = reverse KL, 0 = forward KL")
    teacher: Literal["self-frozen", "self-ema", "external"] = "self-frozen"
    teacher_model: str | None = Field(default=None, description="model id/dir of the external teacher")
    ema_decay: float = Field(default=0.95, ge=0, lt=1)
    teacher_max_tokens: int = Field(default=2048, ge=64, description="the teacher view's own length limit")
    sampling: SamplingParams = Field(
        default_factory=lambda: SamplingParams(temperature=1.0, max_new_tokens=16),
        description="per assistant turn; short turns keep the decisive first tokens a large share of the loss",
    )
    rollout: Literal["student", "speculative", "mixture", "pedagogical"] | None = Field(
        default=None, description="the rollout policy; None = the method's (learners.policies.METHODS)")
    mask: Literal["completion", "relevance"] | None = Field(
        default=None, description="the token mask; None = the method's (relevance for rmsd)")
    sync_every: int = Field(
        default=1, ge=1, description="optimizer steps between adapter hand-offs to the engine (1 = on-policy); "
        "an engine that shares its weights serves the live adapter whatever this is")
    max_staleness: int = Field(
        default=0, ge=0, description="optimizer steps by which rollouts may lag the adapter being trained (0 = "
        "on-policy). With an engine that does not share its weights (vLLM servers), sync_every - 1 of lag comes "
        "from the hand-off interval, and a lag of sync_every or more lets the next step's rollouts run on the "
        "servers while this step trains; the sampled loss weighs stale tokens by their behaviour log-probs")
    max_turns: int = Field(default=3, ge=1)
    relevance_top: int = Field(default=8, ge=1, description="rmsd: positions kept per episode")
    speculative_top_k: int = Field(default=20, ge=1, description="speculative: the teacher's top-k that accepts a student token")
    trb_mix: float = Field(default=0.5, ge=0, le=1, description="trb: the teacher's weight in the rollout mixture at step 1")
    trb_warmup_steps: int = Field(default=10, ge=0, description="trb: steps over which the mixture anneals linearly to pure student")
    pedagogical_surprisal: list[float] = Field(
        default_factory=lambda: [2.0, 4.0], min_length=1,
        description="pedagogical: the surprisal budgets (nats, widening) within which a teacher token is kept; a "
        "teacher token the student finds more surprising is replaced by a student sample. An episode that fails "
        "at one budget is played again at the next, and last by the teacher alone")
    imitation_surprisal: float = Field(
        default=2.0, gt=0, description="imitation loss: tokens up to this surprisal to the student (nats) are "
        "learned fully, harder ones with weight (this / their surprisal)")
    anchor_fraction: float = Field(default=0.25, ge=0, lt=1, description="share of each batch from anchor items, and "
                                   "of its loss (per token, anchors weigh their share of the episodes: `anchor_balance`)")
    checkpoint_every: int = Field(default=5, ge=1)
    keep_adapters: bool = Field(default=True, description="keep every checkpoint's adapter in run_dir/snapshots "
                                "(hard links while the checkpoint lives): a fold whose last adapter fails the "
                                "retention check falls back to the newest of them that passes "
                                "(protection.fallback)")
    chunk_size: int = Field(default=128, ge=1, description="positions per logits chunk")
    micro_batch: int | None = Field(
        default=None, ge=0,
        description="episodes per student forward/backward pass (their gradients add up to the batch's): the "
        "activations kept for the backward pass are most of a step's memory and scale with this (default model, "
        "8 x 64 tokens, 2-core AVX2 machine: peak RSS ~1.45-1.5 GiB at 1, ~1.6 at 2), the time per step less "
        "(at most ~10% from 1 to 2); 0 = the whole batch in one pass; None = by the model's device: 1 on a CPU, "
        "0 on a GPU (one H200, 135M model, 8 x 256: 13.9 s a step at 0, 22-25 s at 1, the same peak memory)",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="recompute each layer's activations in the backward pass: less memory, more time"
    )
    normalize: Literal["token", "episode"] = Field(
        default="token",
        description="token: the loss is the mean over every trained token of the batch; episode: the mean over "
        "episodes of each episode's token mean (a short episode, where the decisive first tokens are most of "
        "what is trained, weighs as much as a long one)",
    )
    heap_threshold_kib: int = Field(
        default=0, ge=0,
        description="glibc only (engines.allocator): blocks of this many KiB and more are mmap'd and freed back "
        "to the system. With the whole batch in one pass (micro_batch 0) and checkpointing, 128 took a step's peak "
        "RSS from ~2.1 to ~1.4 GiB on the default model at ~1.3-1.6x the step time (page faults); with passes of "
        "one episode (the default) there is little left for it to save. 0 = leave malloc as it is. Set, it also "
        "keeps the output head unpacked for the fold (engines.onednn packs a 113 MiB copy of a tied head)",
    )
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _method_loss(cls, data: Any) -> Any:
        """A config that names no loss takes its method's (`learners.policies.METHODS`)."""
        if isinstance(data, dict) and data.get("loss") is None:
            preset = METHODS.get(data.get("method", "opsd"))
            if preset is not None:
                data = {**data, "loss": preset[2]}
        return data

    @field_validator("pedagogical_surprisal")
    @classmethod
    def _budgets(cls, budgets: list[float]) -> list[float]:
        if any(not 0 <= budget < math.inf for budget in budgets):
            raise ValueError("each surprisal budget must be a finite number of nats >= 0 (the teacher alone comes "
                             "after the last)")
        return budgets


class FoldItem(BaseModel):
    """One training prompt: a train-split item of a family and the privileged context of its teacher."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: str
    index: int
    context: list[Message] = Field(default_factory=list)
    anchor: bool = False
    split: Literal["train", "eval"] = Field(default="train", description="eval only to measure (measure_kl)")


class FoldResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int
    loss_first: float | None
    loss_last: float | None
    kl_first: float | None
    kl_last: float | None
    adapter: str
    run_dir: str
    seconds: float
    resumed_from: int = 0
    reused_from: str | None = Field(default=None, description="an identical earlier fold whose adapter this is "
                                    "(the experiment harness reuses a fold of the same start, items and config)")



def fold(
    engine: Engine,
    families: dict[str, TaskFamily],
    items: Sequence[FoldItem],
    config: FoldConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    external_teacher=None,
    base: LentBase | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> FoldResult:
    """Distil the items' privileged context into the engine's model; returns where the adapter is.

    The student trains on the engine's base weights where the engine shares them (the HF engine),
    else on `base` (or the engine's model loaded again); after every `sync_every` steps the engine
    serves the new adapter, and at the end the saved one. Metrics go to `run_dir/metrics.jsonl`.
    """
    if not items:
        raise FoldError("no fold prompts: no family has active skills (run `skillfold run` first)")
    if any(item.split != "train" for item in items):
        raise FoldError("fold prompts must be train-split items; held-out items are for measuring only")
    parts = parts_of(config)
    try:
        check_engine(parts, engine)
    except MethodError as error:
        raise FoldError(str(error)) from None
    shares = base is None and isinstance(engine, SharesWeights)  # else the engine serves hand-offs from disk
    if not shares and config.sync_every - 1 > config.max_staleness:
        raise FoldError(f"fold.sync_every={config.sync_every} lets rollouts lag {config.sync_every - 1} steps "
                        f"behind the adapter, past fold.max_staleness={config.max_staleness}; raise "
                        "fold.max_staleness or lower fold.sync_every")
    started = time.perf_counter()
    state: dict[str, Any] = {}

    def prepare(run: TrainerRun) -> None:  # the teacher takes the student's starting state, before a resume
        teacher_model = external_teacher
        if config.teacher == "external" and teacher_model is None:
            if not config.teacher_model:
                raise FoldError("an external teacher needs fold.teacher_model (a model id or directory)")
            teacher_model = load_base(config.teacher_model).model  # the trainer's own: it scores, never serves
        if teacher_model is not None and (teacher_model.get_input_embeddings().weight.shape[0]
                                          != causal_lm(run.student).get_input_embeddings().weight.shape[0]):
            raise FoldError("the external teacher's vocabulary differs from the student's; pick a teacher of the "
                            "same family")
        state["teacher"] = Teacher(run.student, config, teacher_model)

    pipeline: ThreadPoolExecutor | None = None
    with trainer_run(engine, config, run_dir, seed=config.seed, base=base, resume=resume, what="fold",
                     fail=FoldError, config_file="fold_config.json", config_json=config.model_dump_json(indent=2),
                     prepare=prepare) as run:
        loan, student, optimizer, teacher = run.loan, run.student, run.optimizer, state["teacher"]
        start_step = resumed_from = run.start_step
        if config.keep_adapters:  # a kill between a checkpoint and its snapshot left one without
            ensure_snapshots(run_dir)
        if run.saved:
            if config.teacher == "self-ema":
                teacher.snapshot = run.saved["tensors"]["ema"]
                teacher.silent = teacher._adds_nothing()  # an EMA that has moved is no longer the base model
            log.info("resumed fold from %s (step %d)", run_dir, start_step)
        kept = run.kept  # the lines of the checkpoint's steps; none on a new start
        writer = _tensorboard(run_dir, purge_step=start_step + 1 if resume else None)
        order = _item_order(items, config)
        handoff_seconds = hand_off(loan, student)
        trained_at = {getattr(engine, "adapter_version", None): start_step}  # adapter version -> its steps
        project = projection(student)
        first: dict[str, float] = {}
        last: dict[str, float] = {}

        def batch_of(step: int) -> list[FoldItem]:
            return [order[(step * config.batch_size + offset) % len(order)] for offset in range(config.batch_size)]

        # the next step's rollouts run on the servers while this step trains (an engine apart from the trainer)
        if not loan.shared and config.max_staleness >= config.sync_every:
            pipeline = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollouts")
        upcoming: Future | None = None
        try:
            for step in range(start_step, config.steps):
                step_started = time.perf_counter()
                batch = batch_of(step)
                student.eval()  # no dropout while sampling
                trajectories = (upcoming.result() if upcoming is not None
                                else collect(engine, teacher, families, batch, config, step, parts))
                rollout_seconds = time.perf_counter() - step_started  # (waiting for them, where pipelined)
                upcoming = None
                if pipeline is not None and step + 1 < config.steps:
                    upcoming = pipeline.submit(collect, engine, teacher, families, batch_of(step + 1), config,
                                               step + 1, parts)
                record = fold_step(engine, student, teacher, families, batch, config, optimizer, step,
                                   base=loan.base, parts=parts, project=project, trajectories=trajectories)
                record["rollout_lag"] = 0 if loan.shared else _lag(trajectories, trained_at, step)
                if (step + 1) % config.sync_every == 0:
                    handoff_seconds = hand_off(loan, student)
                    trained_at[getattr(engine, "adapter_version", None)] = step + 1
                record["handoff_seconds"] = handoff_seconds
                record["rollout_seconds"] = rollout_seconds
                record["seconds"] = time.perf_counter() - step_started
                record["tokens_per_second"] = (record["generated_tokens"] + record["trained_tokens"]) / record["seconds"]
                if not math.isfinite(record["loss"]):
                    raise FoldError(
                        f"the loss became {record['loss']} at step {step + 1}; stopped. The last good checkpoint is "
                        f"in {run_dir}; lower fold.learning_rate and resume with --resume"
                    )
                run.log(record)
                if writer is not None:
                    for key in ("loss", "kl", "rollout_success", "tokens_per_second", "teacher_token_share"):
                        if record[key] is not None:
                            writer.add_scalar(f"fold/{key}", record[key], step + 1)
                first = first or record
                last = record
                if on_step:
                    on_step(record)
                if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                    ema = {"ema": teacher.snapshot} if config.teacher == "self-ema" and teacher.snapshot else None
                    run.checkpoint(step + 1, {"config": config.model_dump(mode="json")}, tensors=ema,
                                   snapshot=config.keep_adapters)
        finally:
            if writer is not None:
                writer.close()
            if pipeline is not None:  # rollouts in flight finish (or are cancelled) before the engine changes hands
                pipeline.shutdown(wait=True, cancel_futures=True)
        adapter_dir = run.finish()
    if kept:  # resumed: the first steps (and, with none left to run, the last) are the checkpoint's
        first, last = kept[0], last or kept[-1]
    return FoldResult(
        steps=config.steps,
        loss_first=first.get("loss"),
        loss_last=last.get("loss"),
        kl_first=first.get("kl"),
        kl_last=last.get("kl"),
        adapter=str(adapter_dir),
        run_dir=str(run_dir),
        seconds=time.perf_counter() - started,
        resumed_from=resumed_from,
    )


def collect(engine: Engine, teacher: Teacher, families, batch: Sequence[FoldItem], config: FoldConfig, step: int,
            parts: Parts) -> list[Trajectory]:
    """Step `step`'s rollouts: the batch's train items played to the end under the rollout policy."""
    sampling = config.sampling.model_copy(update={"seed": config.seed + step * 1000})

    def episodes(rows: Sequence[int], guided) -> list[Trajectory]:
        chosen = [batch[row] for row in rows]
        environments = [families[item.family].make("train", item.index) for item in chosen]
        trajectories = run_episodes(
            engine, environments, sampling, split="train", max_turns=config.max_turns,
            teacher_contexts=[[] if item.anchor else list(item.context) for item in chosen], guided=guided,
        )
        for item, trajectory in zip(chosen, trajectories, strict=True):  # a batch mixes families: each its own bar
            score_trajectory(trajectory, families[item.family].success_threshold)
        return trajectories

    return play(parts, engine, teacher, config, step, [item.anchor for item in batch], episodes)


def _lag(trajectories: Sequence[Trajectory], trained_at: dict[Any, int], step: int) -> int:
    """Steps between the adapter being trained and the oldest adapter that sampled these rollouts."""
    versions = {turn.adapter_version for trajectory in trajectories for turn in trajectory.turns}
    return max((step - trained_at[version] for version in versions if version in trained_at), default=0)


def _wait_for(device: torch.device) -> None:
    """Wait for a GPU's queued work (for a phase's time); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fold_step(engine: Engine, student, teacher: Teacher, families, batch: Sequence[FoldItem], config: FoldConfig,
              optimizer, step: int, *, base: LentBase, parts: Parts | None = None, project=None,
              trajectories: Sequence[Trajectory] | None = None) -> dict[str, Any]:
    """One rollout -> score -> mask -> loss -> update step; returns its metrics. `base`: the student's
    base weights as lent (its tokenizer and end tokens render the views); `trajectories`: the step's
    rollouts where they were collected already (`collect`)."""
    parts = parts or parts_of(config)
    project = project or projection(student)
    tokenizer, stop_ids = base.tokenizer, base.stop_ids
    if trajectories is None:
        student.eval()  # no dropout while sampling
        trajectories = collect(engine, teacher, families, batch, config, step, parts)
    learned = [(item, trajectory) for item, trajectory in zip(batch, trajectories, strict=True)
               if imitated(parts, trajectory, item.anchor)]
    views, kept_items = _views(tokenizer, stop_ids, [item for item, _ in learned], [t for _, t in learned], config)
    final_tokens = sum(t.completion_tokens for t in trajectories)
    generated = final_tokens + sum(t.info.get("discarded_tokens", 0) for t in trajectories)
    teacher_tokens = sum(turn.info.get("teacher_tokens", 0) for t in trajectories for turn in t.turns)
    record: dict[str, Any] = {
        "step": step + 1,
        "episodes": len(batch),
        "rollouts": sum(t.info.get("attempts", 1) for t in trajectories),
        "rollout_success": sum(t.success for t in trajectories) / len(trajectories),
        "generated_tokens": generated,
        "teacher_token_share": teacher_tokens / final_tokens if final_tokens else 0.0,
    }
    if parts.rollout == "mixture":
        record["trb_mix"] = mixture_weight(config, step)
    if parts.rollout == "pedagogical":  # how wide the budgets had to go, and what no budget solved
        record["surprisal_budget"] = sum(t.info["surprisal_budget"] for t in trajectories) / len(trajectories)
        record["unsolved"] = len(batch) - len(learned)
    teacher_pass = needs_teacher_pass(parts)
    if not views:
        record.update(loss=0.0, kl=0.0 if teacher_pass else None, trained_tokens=0)
        return record
    student.train()
    weight = causal_lm(student).get_output_embeddings().weight  # (V, H)
    teacher_hidden = teacher_weight = None
    teacher_started = time.perf_counter()
    if teacher_pass:
        with attention(student):  # CPU: attention reads grouped key/value heads (no repeat_kv copies)
            teacher_hidden, teacher_weight = teacher.hidden(views)  # (N, H'), (V, H')
    _wait_for(weight.device)  # (a GPU's queued work counted in the phase that queued it)
    update_started = time.perf_counter()
    targets = torch.tensor(
        [v.student.input_ids[p] for v in views for p in v.student.trained_positions], device=weight.device
    )  # (N,)
    behaviour = None  # (N,) the sampled tokens' behaviour log-probs, for the sampled loss's ratios
    if parts.loss == "sampled" and any(v.student.behaviour for v in views):
        behaviour = torch.tensor([v.student.behaviour[p] if v.student.behaviour else math.nan
                                  for v in views for p in v.student.trained_positions], device=targets.device)
    lengths = [len(v.student.trained_positions) for v in views]
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    totals = {"loss": 0.0, "kl": 0.0, "weight": 0.0, "distilled": 0}
    # per token, the anchors weigh their share of the batch's episodes (per episode they do already)
    scales = anchor_balance(lengths, [item.anchor for item in kept_items]) if config.normalize == "token" else None
    loss_is_the_kl = loss_is_kl(parts, config) and scales is None

    def loss_of(rows: list[int], student_hidden: torch.Tensor) -> torch.Tensor:
        """One pass's share of the batch loss, Σ_t m_t·ℓ_t over its rows' tokens (normalised below)."""
        index = torch.cat([torch.arange(offsets[row], offsets[row + 1]) for row in rows]).to(targets.device)
        row_targets = targets[index]
        row_teacher = None if teacher_hidden is None else teacher_hidden[index]
        mask = token_mask(parts, config, row_targets, [lengths[row] for row in rows], row_teacher, teacher_weight,
                          student_hidden, weight, project, None if scales is None else [scales[row] for row in rows])
        loss = token_loss(parts, config, student_hidden, weight, row_targets, row_teacher, teacher_weight, mask,
                          project, None if behaviour is None else behaviour[index])
        mass = float(mask.float().sum())
        if loss_is_the_kl:
            kl = float(loss.detach())  # the loss is this very KL: every trained token, weight 1
        elif row_teacher is None:
            kl = 0.0  # no teacher pass (imitation): the step reports no KL
        else:
            kl = float(reverse_kl(student_hidden, weight, row_teacher, teacher_weight, config.chunk_size, project))
        totals["loss"] += float(loss.detach()) * mass
        totals["kl"] += kl * index.numel()
        totals["weight"] += mass
        totals["distilled"] += int((mask != 0).sum())
        return loss * mass

    with attention(student):  # the batch's shared prompt prefix runs once
        backward_in_passes(student, [v.student.input_ids for v in views],
                           [v.student.trained_positions for v in views], config.micro_batch, loss_of)
    parameters = [parameter for _, parameter in adapter_parameters(student)]
    if totals["weight"] > 0:
        for parameter in parameters:
            if parameter.grad is not None:
                parameter.grad.div_(totals["weight"])  # Σ over passes of Σ_t m_t·∇ℓ_t -> the masked mean's gradient
    loss_value = totals["loss"] / totals["weight"] if totals["weight"] > 0 else 0.0
    torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    teacher.after_step()
    student.eval()
    _wait_for(weight.device)
    record.update(teacher_seconds=update_started - teacher_started, update_seconds=time.perf_counter() - update_started)
    record.update(loss=loss_value, kl=totals["kl"] / targets.numel() if teacher_pass else None,
                  trained_tokens=int(targets.numel()),
                  distilled_tokens=totals["distilled"], anchors=sum(item.anchor for item in kept_items))
    return record


def _views(tokenizer, stop_ids, batch, trajectories: Sequence[Trajectory], config: FoldConfig):
    views, kept_items = [], []
    for item, trajectory in zip(batch, trajectories, strict=True):
        if not trajectory.turns:
            continue  # the environment failed before the model acted
        context = [] if item.anchor else item.context
        try:
            view = episode_views(tokenizer, trajectory.messages(), context, stop_ids, config.teacher_max_tokens,
                                 sampled=sampled_ids(trajectory))
        except TemplateError as error:
            log.warning("skipping an episode of %s: %s", item.family, error)
            continue
        if view.student.trained_positions:
            views.append(view)
            kept_items.append(item)
    return views, kept_items


def _item_order(items: Sequence[FoldItem], config: FoldConfig) -> list[FoldItem]:
    """A seeded shuffle with anchors at (about) `anchor_fraction` of every batch."""
    rng = random.Random(config.seed)
    skilled = [item for item in items if not item.anchor]
    anchors = [item for item in items if item.anchor]
    rng.shuffle(skilled)
    rng.shuffle(anchors)
    if not anchors or config.anchor_fraction == 0:
        return skilled or anchors
    per_batch = max(1, round(config.batch_size * config.anchor_fraction))
    order, skilled_index, anchor_index = [], 0, 0
    for _ in range(max(len(skilled), 1) * 4):
        for _ in range(config.batch_size - per_batch):
            order.append(skilled[skilled_index % len(skilled)] if skilled else anchors[anchor_index % len(anchors)])
            skilled_index += 1
        for _ in range(per_batch):
            order.append(anchors[anchor_index % len(anchors)])
            anchor_index += 1
    return order


def _tensorboard(run_dir: Path, purge_step: int | None = None):
    """A TensorBoard writer where it is installed; `purge_step` hides the events a killed run wrote
    from that step on (a resume writes them again)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)


def measure_kl(engine: Engine, families: dict[str, TaskFamily], items: Sequence[FoldItem],
               config: FoldConfig) -> dict[str, float]:
    """Per-token KL(student || skill-conditioned teacher) on the student's own episodes of `items`.

    The student is the engine as it serves now (its adapter, no context); the teacher is the base
    weights (no adapter) with each item's privileged context, i.e. what a first fold distils toward.
    Use held-out items to see how much of the skills' effect the weights carry. Returns
    {"kl", "tokens", "success"} (success: the student's rollout success on these items). Needs an
    engine that shares its weights (the passes run on them, with and without its adapter).
    """
    from learners.teacher import adapters_off

    if not isinstance(engine, SharesWeights):
        raise FoldError(f"measure_kl needs an engine that shares its weights; {type(engine).__name__} does not")
    environments = [families[item.family].make(item.split, item.index) for item in items]
    sampling = config.sampling.model_copy(update={"seed": config.seed})
    trajectories = run_episodes(engine, environments, sampling, split="eval", max_turns=config.max_turns)
    adapter = engine.adapter
    lent = engine.lend_base()
    views, _ = _views(lent.tokenizer, lent.stop_ids, items, trajectories, config)
    success = sum(t.success for t in trajectories) / max(len(trajectories), 1)
    model = lent.model
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(lent.model, adapter).eval()
    try:
        if not views:
            return {"kl": 0.0, "tokens": 0, "success": success}
        with torch.no_grad():
            student_hidden = shared_prefix_hidden_at(model, [v.student.input_ids for v in views],
                                                     [v.student.trained_positions for v in views])
            weight = causal_lm(model).get_output_embeddings().weight
            with adapters_off(model):
                teacher_hidden = shared_prefix_hidden_at(model, [v.teacher.input_ids for v in views],
                                                         [v.teacher.trained_positions for v in views])
            kl = reverse_kl(student_hidden, weight, teacher_hidden, weight, config.chunk_size)
        return {"kl": float(kl), "tokens": int(student_hidden.shape[0]), "success": success}
    finally:
        engine.reclaim(model.unload() if adapter else model, adapter)
