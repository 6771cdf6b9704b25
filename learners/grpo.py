"""GRPO: reinforcement learning on the environment's reward, with the fold's trainer parts.

Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath), outcome rewards, one policy
update per batch of rollouts. One step, for `prompts_per_step` train items:
  1. rollout: the engine plays each item `group_size` times to the end (multi-turn, with the
     environment's tools; the student's own samples, current adapter, no context), each row its own
     sampling seed (`learners.rollout.run_episodes`);
  2. reward: each episode's summed environment reward (`score_trajectory`); advantages are relative to
     the episode's group (`learners.losses.group_advantages`): a group whose rewards are all equal
     carries no signal (counted as `zero_variance_groups`, and its episodes skip the backward pass
     unless a KL term needs them);
  3. views: the episode as the student saw it, on the very token ids it sampled, with the behaviour
     log-probs the engine recorded on each turn (`learners.views.token_view`): every assistant token of
     every turn is trained (its end-of-turn token too), tool results and environment text never;
  4. reference (optional): the policy at the run's start (the base model when the run starts without
     an adapter: the adapters switched off), scored in the trainer's process (`learners.teacher.Teacher`,
     the fold's frozen self-teacher, with no context), for the k3 KL term and metric;
  5. loss: the clipped surrogate with importance ratios against the behaviour log-probs, plus β·k3
     (`learners.policies.reward_loss` -> `learners.losses.chunked_policy_gradient`), from final hidden
     states in chunks, `micro_batch` episodes per forward/backward pass (`learners.passes`);
  6. AdamW step; the new adapter handed to the engine (`learners.student.hand_off`); an atomic
     checkpoint every `checkpoint_every` steps (`learners.checkpoint`), so a killed run resumes to the
     adapter an uninterrupted one would have given.
The trainer settings (steps, LoRA shape, optimizer, sampling, turns, passes) default to the fold's
(`FoldConfig`), and `GrpoConfig.like_fold` takes them from a fold's config with as many rollouts per
step (`prompts_per_step x group_size = batch_size`): the same rollouts and optimizer steps.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from engines.base import Engine, LentBase, SamplingParams
from envs.base import TaskFamily, Trajectory
from learners.fold import FoldConfig, FoldItem
from learners.losses import group_advantages
from learners.passes import attention, backward_in_passes, causal_lm, projection, sampled_log_probs
from learners.policies import RL_METHODS, Parts, episode_weights, reward_loss
from learners.rollout import run_episodes, score_trajectory
from learners.run import TrainerRun, trainer_run
from learners.student import ALL_LINEAR, adapter_parameters, hand_off
from learners.teacher import Teacher
from learners.views import EpisodeViews, TemplateError, TokenView, sampled_ids, token_view

log = logging.getLogger(__name__)

__all__ = ["GrpoConfig", "GrpoError", "GrpoResult", "GrpoSettings", "grpo", "grpo_step", "train_items"]

# the trainer settings GRPO shares with the fold (same names, same defaults, same meaning)
SHARED_WITH_FOLD = (
    "steps", "weight_decay", "max_grad_norm", "full_finetune", "lora_rank", "lora_alpha", "lora_dropout",
    "target_modules", "sampling", "max_turns", "checkpoint_every", "chunk_size", "micro_batch",
    "gradient_checkpointing", "heap_threshold_kib", "seed",
)


class GrpoError(RuntimeError):
    """A GRPO run that cannot go on (a NaN loss, no prompts, a bad checkpoint); the last good checkpoint is kept."""


class GrpoSettings(BaseModel):
    """GRPO's own settings (the experiment's `grpo` section, where the trainer settings are the fold's)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    group_size: int = Field(default=4, ge=2, description="samples per prompt whose rewards are compared (n)")
    learning_rate: float = Field(default=5e-4, gt=0, description="AdamW learning rate (the fold's default)")
    clip_low: float = Field(default=0.2, ge=0, lt=1, description="ε_low: ratios below 1 - ε_low are clipped")
    clip_high: float = Field(default=0.28, ge=0, description="ε_high: ratios above 1 + ε_high are clipped "
                             "(DAPO's clip-higher; 0.2 = the symmetric PPO/GRPO clip)")
    kl_coef: float = Field(default=0.0, ge=0, description="β of the k3 KL to the run's starting policy "
                           "(0: none, as DAPO and Dr. GRPO; DeepSeekMath used 0.04)")
    log_kl: bool = Field(default=True, description="score the reference every step for the `kl` metric even "
                         "when kl_coef is 0 (one no-grad pass over the trained episodes)")
    scale_rewards: bool = Field(default=True, description="divide advantages by the group's reward std "
                                "(GRPO); false: reward minus the group mean only (Dr. GRPO)")
    std_eps: float = Field(default=1e-4, gt=0, description="added to the group std before dividing")
    normalize: Literal["token", "episode"] = Field(
        default="token", description="token: the loss is the mean over every trained token of the batch (DAPO); "
        "episode: the mean over episodes of each episode's token mean (the GRPO paper's)")


class GrpoConfig(GrpoSettings):
    """A GRPO run: its own settings, the batch's shape, and the trainer settings it shares with the fold."""

    steps: int = Field(default=32, ge=1, description="optimizer steps (one per batch of rollouts)")
    prompts_per_step: int = Field(default=2, ge=1, description="prompts per step; rollouts per step = "
                                  "prompts_per_step x group_size (the fold's batch_size by default: 2 x 4 = 8)")
    weight_decay: float = 0.0
    max_grad_norm: float = Field(default=1.0, gt=0)
    full_finetune: bool = Field(default=False, description="train every weight instead of a LoRA adapter")
    lora_rank: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_LINEAR))
    sampling: SamplingParams = Field(
        default_factory=lambda: SamplingParams(temperature=1.0, max_new_tokens=16),
        description="per assistant turn (the fold's); the loss's log-probs are at temperature 1, as the "
        "engine's behaviour log-probs are: sample at 1 for the exact on-policy gradient")
    max_turns: int = Field(default=3, ge=1)
    checkpoint_every: int = Field(default=5, ge=1)
    chunk_size: int = Field(default=128, ge=1, description="positions per logits chunk")
    micro_batch: int | None = Field(default=None, ge=0, description="episodes per forward/backward pass (0 = all at "
                                    "once; None = by device: 1 on a CPU, all at once on a GPU, as the fold's)")
    gradient_checkpointing: bool = False
    heap_threshold_kib: int = Field(default=0, ge=0, description="as FoldConfig.heap_threshold_kib")
    seed: int = 0

    @model_validator(mode="after")
    def _seeds_fit(self) -> GrpoConfig:
        if self.prompts_per_step * self.group_size > 1000:
            raise ValueError("prompts_per_step x group_size must be at most 1000 (each step's rows take seeds "
                             "seed + 1000·step + row)")
        return self

    @property
    def rollouts_per_step(self) -> int:
        return self.prompts_per_step * self.group_size

    @classmethod
    def like_fold(cls, fold: FoldConfig, settings: GrpoSettings | None = None) -> GrpoConfig:
        """GRPO with the fold's compute: its steps, trainer settings and seed, and as many rollouts per
        step as the fold's batch (`prompts_per_step = batch_size / group_size`)."""
        settings = settings or GrpoSettings()
        if fold.batch_size % settings.group_size:
            raise ValueError(f"the fold's batch_size {fold.batch_size} is not a whole number of GRPO groups of "
                             f"{settings.group_size}; set grpo.group_size to a divisor of it (2, 4 or 8 for 8)")
        shared = {name: getattr(fold, name) for name in SHARED_WITH_FOLD}
        return cls(**settings.model_dump(), **shared, prompts_per_step=fold.batch_size // settings.group_size)


class GrpoResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int
    optimizer_steps: int = Field(description="optimizer steps taken, the resumed run's earlier ones included")
    rollouts: int = Field(description="episodes played for training, the resumed run's earlier ones included")
    group_size: int
    prompts_per_step: int
    reward_first: float | None
    reward_last: float | None
    success_first: float | None
    success_last: float | None
    loss_first: float | None
    loss_last: float | None
    kl_last: float | None
    zero_variance_groups: int = Field(description="groups whose rewards were all equal, over every step")
    generated_tokens: int
    adapter: str
    run_dir: str
    seconds: float
    resumed_from: int = 0


def train_items(families: dict[str, TaskFamily], per_family: int, probes: int = 0, seed: int = 0) -> list[FoldItem]:
    """Train-split prompts: `per_family` items of each family drawn (seeded) from its train split,
    leaving out the last `probes` (kept for verifying skills). No context: GRPO trains the model alone."""
    rng = random.Random(seed)
    items: list[FoldItem] = []
    for name, family in families.items():
        available = family.split_size("train") - probes
        if available < 1:
            raise GrpoError(f"{name} has {family.split_size('train')} train items and {probes} are kept as probes: "
                            "none left to train on; lower probes")
        items += [FoldItem(family=name, index=index) for index in rng.sample(range(available), min(per_family, available))]
    return items


def grpo(
    engine: Engine,
    families: dict[str, TaskFamily],
    items: Sequence[FoldItem],
    config: GrpoConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    base: LentBase | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> GrpoResult:
    """Train the engine's model (LoRA, or every weight) with GRPO on the items' families; returns where
    the adapter is. The engine serves the adapter as trained after every step, and the saved one at the
    end. Metrics go to `run_dir/metrics.jsonl`; checkpoints to `run_dir/step-N`; `resume` continues
    from the newest one."""
    if not items:
        raise GrpoError("no training prompts: name a family with train items")
    if any(item.split != "train" for item in items):
        raise GrpoError("GRPO prompts must be train-split items; held-out items are for measuring only")
    if any(item.context or item.anchor for item in items):
        raise GrpoError("GRPO trains the model alone: its prompts carry no context and no anchors")
    unknown = sorted({item.family for item in items} - set(families))
    if unknown:
        raise GrpoError(f"prompts of {', '.join(unknown)} but no such family was given")
    parts = RL_METHODS["grpo"]
    started = time.perf_counter()
    state: dict[str, Any] = {}

    def prepare(run: TrainerRun) -> None:  # the policy at the run's start, frozen, before a resume loads over it
        state["reference"] = (Teacher(run.student, FoldConfig(teacher="self-frozen", full_finetune=config.full_finetune))
                              if config.kl_coef > 0 or config.log_kl else None)

    with trainer_run(engine, config, run_dir, seed=config.seed, base=base, resume=resume, what="GRPO run",
                     fail=GrpoError, config_file="grpo_config.json", config_json=config.model_dump_json(indent=2),
                     prepare=prepare) as run:
        loan, student, optimizer, reference = run.loan, run.student, run.optimizer, state["reference"]
        start_step, kept = run.start_step, run.kept  # kept: the lines of the checkpoint's steps
        if run.saved:
            log.info("resumed GRPO from %s (step %d)", run_dir, start_step)
        rollouts = kept[-1]["rollouts"] if kept else 0
        zero_variance = sum(record["zero_variance_groups"] for record in kept)
        generated = sum(record["generated_tokens"] for record in kept)
        order = list(items)
        random.Random(config.seed).shuffle(order)
        project = projection(student)
        handoff_seconds = hand_off(loan, student)
        first: dict[str, Any] = kept[0] if kept else {}
        last: dict[str, Any] = kept[-1] if kept else {}
        for step in range(start_step, config.steps):
            step_started = time.perf_counter()
            batch = [order[(step * config.prompts_per_step + offset) % len(order)]
                     for offset in range(config.prompts_per_step)]
            record = grpo_step(engine, student, families, batch, config, optimizer, step, base=loan.base,
                               parts=parts, project=project, reference=reference)
            handoff_seconds = hand_off(loan, student)
            rollouts += record["episodes"]
            zero_variance += record["zero_variance_groups"]
            generated += record["generated_tokens"]
            record.update(rollouts=rollouts, optimizer_steps=step + 1, handoff_seconds=handoff_seconds,
                          seconds=time.perf_counter() - step_started)
            if not math.isfinite(record["loss"]):
                raise GrpoError(f"the loss became {record['loss']} at step {step + 1}; stopped. The last good "
                                f"checkpoint is in {run_dir}; lower learning_rate and resume with --resume")
            run.log(record)
            first = first or record
            last = record
            if on_step:
                on_step(record)
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                run.checkpoint(step + 1, {"config": config.model_dump(mode="json")})
        adapter_dir = run.finish()
    return GrpoResult(
        steps=config.steps, optimizer_steps=last.get("optimizer_steps", 0), rollouts=rollouts,
        group_size=config.group_size, prompts_per_step=config.prompts_per_step,
        reward_first=first.get("reward_mean"), reward_last=last.get("reward_mean"),
        success_first=first.get("success_rate"), success_last=last.get("success_rate"),
        loss_first=first.get("loss"), loss_last=last.get("loss"), kl_last=last.get("kl"),
        zero_variance_groups=zero_variance, generated_tokens=generated, adapter=str(adapter_dir),
        run_dir=str(run_dir), seconds=time.perf_counter() - started, resumed_from=start_step,
    )


def rollout_groups(engine: Engine, families: dict[str, TaskFamily], batch: Sequence[FoldItem], config: GrpoConfig,
                   step: int) -> list[Trajectory]:
    """Step `step`'s rollouts: every prompt of the batch played `group_size` times (consecutive rows),
    each row sampling from its own seed, scored with its family's success threshold."""
    environments = [families[item.family].make("train", item.index) for item in batch
                    for _ in range(config.group_size)]
    sampling = config.sampling.model_copy(update={"seed": config.seed + step * 1000})
    trajectories = run_episodes(engine, environments, sampling, split="train", max_turns=config.max_turns)
    for row, trajectory in enumerate(trajectories):
        score_trajectory(trajectory, families[batch[row // config.group_size].family].success_threshold)
    return trajectories


def trained_view(tokenizer, stop_ids: set[int], trajectory: Trajectory) -> TokenView | None:
    """The episode as the student saw it, on its sampled token ids and their behaviour log-probs; None
    when it has nothing to train (no turn: the environment failed first; or a template it cannot render)."""
    if not trajectory.turns:
        return None
    try:
        view = token_view(tokenizer, trajectory.messages(), stop_ids, sampled=sampled_ids(trajectory))
    except TemplateError as error:
        log.warning("skipping an episode of %s: %s", trajectory.env, error)
        return None
    if not view.trained_positions:
        return None
    return same_context(tokenizer, trajectory, view)


def same_context(tokenizer, trajectory: Trajectory, view: TokenView) -> TokenView:
    """The view with the behaviour log-probs kept only for turns the trainer sees in the very context the
    engine sampled them in; the others' become unknown (NaN: their ratio is taken on-policy, 1).

    The engine's prompt for turn k is the chat so far rendered and tokenised whole, so an earlier turn is
    there as its text re-tokenised; the view keeps that turn's sampled ids. Where those differ (a model
    may sample a non-canonical split of its text: a random model often does), turn k's log-probs in the
    view are of another context than its behaviour log-probs, and their ratio is not an importance
    ratio. The check: the view's tokens before turn k's first trained token equal the engine's prompt."""
    if view.behaviour is None:
        return view
    messages = trajectory.messages()
    assistant = [index for index, message in enumerate(messages) if message.role == "assistant"]
    trained = view.trained_positions
    starts = [position for previous, position in zip([-2, *trained], trained, strict=False) if position != previous + 1]
    behaviour = list(view.behaviour)
    if len(starts) != len(assistant):  # turns the view cannot be lined up with: nothing is trusted
        return view.model_copy(update={"behaviour": None})
    ends = [*starts[1:], len(view.input_ids)]
    for index, start, end in zip(assistant, starts, ends, strict=True):
        text = tokenizer.apply_chat_template([message.as_dict() for message in messages[:index]],
                                             add_generation_prompt=True, tokenize=False)
        if tokenizer(text, add_special_tokens=False)["input_ids"] != view.input_ids[:start]:
            behaviour[start:end] = [math.nan] * (end - start)
    known = any(not math.isnan(value) for value in behaviour)
    return view.model_copy(update={"behaviour": behaviour if known else None})


def grpo_step(engine: Engine, student, families: dict[str, TaskFamily], batch: Sequence[FoldItem],
              config: GrpoConfig, optimizer, step: int, *, base: LentBase, parts: Parts, project,
              reference: Teacher | None) -> dict[str, Any]:
    """One rollout -> advantages -> loss -> update step; returns its metrics."""
    student.eval()  # no dropout while sampling
    trajectories = rollout_groups(engine, families, batch, config, step)
    rewards = torch.tensor([trajectory.reward for trajectory in trajectories], dtype=torch.float64)
    advantages, informative = group_advantages(rewards, config.group_size, scale=config.scale_rewards,
                                               eps=config.std_eps)
    views = [trained_view(base.tokenizer, base.stop_ids, trajectory) for trajectory in trajectories]
    record: dict[str, Any] = {
        "step": step + 1,
        "prompts": len(batch),
        "episodes": len(trajectories),
        "groups": int(informative.numel()),
        "zero_variance_groups": int((~informative).sum()),
        "reward_mean": float(rewards.mean()),
        "success_rate": sum(trajectory.success for trajectory in trajectories) / len(trajectories),
        "turns": sum(len(trajectory.turns) for trajectory in trajectories) / len(trajectories),
        "tool_calls": sum(len(turn.tool_calls) for trajectory in trajectories for turn in trajectory.turns),
        "generated_tokens": sum(trajectory.completion_tokens for trajectory in trajectories),
    }
    viewed = [row for row, view in enumerate(views) if view is not None]
    # the loss is a mean over every viewed episode's tokens (or episodes); an episode of a group with equal
    # rewards adds exactly 0 to it and to its gradient, so it skips the passes unless the KL term needs it
    trained = [row for row in viewed if config.kl_coef > 0 or float(advantages[row]) != 0.0]
    total_weight = (float(len(viewed)) if config.normalize == "episode"
                    else float(sum(len(views[row].trained_positions) for row in viewed)))  # type: ignore[union-attr]
    record.update(loss=0.0, kl=None, clip_fraction=0.0, ratio=1.0, trained_episodes=len(trained), trained_tokens=0,
                  behaviour_known=0.0)
    if not trained:
        optimizer.zero_grad(set_to_none=True)  # nothing to learn from this batch: the step changes nothing
        return record
    if parts.mask != "completion":
        raise ValueError(f"GRPO trains the completion mask, not {parts.mask}")
    chosen = [views[row] for row in trained]  # type: ignore[misc]
    device = next(student.parameters()).device
    targets = torch.tensor([view.input_ids[p] for view in chosen for p in view.trained_positions], device=device)
    lengths = [len(view.trained_positions) for view in chosen]
    token_advantages = torch.cat([torch.full((length,), float(advantages[row]), device=device)
                                  for row, length in zip(trained, lengths, strict=True)])
    behaviour = None  # (N,) the sampled tokens' behaviour log-probs, for the importance ratios
    if any(view.behaviour for view in chosen):
        behaviour = torch.tensor([view.behaviour[p] if view.behaviour else math.nan
                                  for view in chosen for p in view.trained_positions], device=device)
    known = 0 if behaviour is None else int((~torch.isnan(behaviour)).sum())
    reference_logprobs = None
    if reference is not None:
        with attention(student):
            hidden, weight = reference.hidden([EpisodeViews(student=view, teacher=view, context_messages_kept=0)
                                               for view in chosen])
        reference_logprobs = sampled_log_probs(hidden, weight, targets, config.chunk_size, project)
        del hidden
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    head = causal_lm(student).get_output_embeddings().weight  # (V, H)
    totals = {"loss": 0.0, "weight": 0.0, "clip": 0.0, "ratio": 0.0, "kl": 0.0}

    def loss_of(rows: list[int], hidden: torch.Tensor) -> torch.Tensor:
        """One pass's share of the batch loss, Σ_t m_t·ℓ_t over its rows' tokens (normalised below)."""
        index = torch.cat([torch.arange(offsets[row], offsets[row + 1]) for row in rows]).to(device)
        mask = (episode_weights([lengths[row] for row in rows], device) if config.normalize == "episode"
                else torch.ones((1, index.numel()), device=device))
        loss, metrics = reward_loss(
            parts, config, hidden, head, targets[index], token_advantages[index], mask, project,
            None if behaviour is None else behaviour[index],
            None if reference_logprobs is None else reference_logprobs[index])
        mass = float(mask.sum())
        totals["loss"] += float(loss.detach()) * mass
        totals["weight"] += mass
        totals["clip"] += metrics["clip_fraction"] * mass
        totals["ratio"] += metrics["ratio"] * mass
        totals["kl"] += (metrics["kl"] or 0.0) * mass
        return loss * mass

    student.train()
    with attention(student):  # the batch's shared prompt prefix runs once
        backward_in_passes(student, [view.input_ids for view in chosen], [view.trained_positions for view in chosen],
                           config.micro_batch, loss_of)
    parameters = [parameter for _, parameter in adapter_parameters(student)]
    for parameter in parameters:
        if parameter.grad is not None:
            parameter.grad.div_(total_weight)  # Σ over passes of Σ_t m_t·∇ℓ_t -> the batch mean's gradient
    torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    student.eval()
    record.update(
        loss=totals["loss"] / total_weight,
        kl=totals["kl"] / totals["weight"] if reference_logprobs is not None else None,
        clip_fraction=totals["clip"] / totals["weight"], ratio=totals["ratio"] / totals["weight"],
        trained_tokens=int(targets.numel()), behaviour_known=known / targets.numel(),
    )
    return record
