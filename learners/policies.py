"""A fold method as a composition of parts: rollout policy x token mask x loss.

- rollout policy: who chooses the tokens of the episodes the student learns from: `student` (its own
  samples, on-policy), `speculative` (SKD: a student token outside the teacher's top-k is replaced by
  a teacher sample), `mixture` (TRB: samples from S^(1-α)·T^α, α annealed to 0) or `pedagogical`
  (the teacher writes the rollout; a teacher token too surprising to the student is replaced by a
  student sample, under a surprisal budget that widens, episode by episode, only as far as success
  needs: `play`). The last three need an engine that declares guided generation
  (`engines.base.GuidedEngine`).
- token mask: which trained tokens carry the loss: `completion` (every token the model wrote) or
  `relevance` (RMSD: each episode's tokens where student and teacher disagree most).
- loss: `reverse_kl` (full vocabulary), `jsd` (generalized JSD(β)), `sampled` (sampled-token reverse
  KL) or `imitation` (surprisal-weighted imitation of the rollout's tokens, no teacher pass), from
  `learners.losses`.
`FoldConfig.method` names a preset of these parts (`METHODS`); `rollout`, `mask` and `loss` override it.
The fold step asks the parts, never the method's name.

RL methods compose the same way, with the environment's reward in place of a teacher (`RL_METHODS`):
`grpo` is the student's own samples (n per prompt) x the completion mask x `policy_gradient` (GRPO's
group-relative advantages and clipped surrogate, `learners.losses.chunked_policy_gradient`), trained by
`learners.grpo`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from engines.base import Engine, GuidedEngine
from learners.losses import (
    Projection,
    chunked_generalized_jsd,
    chunked_policy_gradient,
    chunked_sampled_token_reverse_kl,
    chunked_surprisal_weighted_imitation,
)
from learners.masks import top_positions
from learners.passes import sampled_log_probs

Rollout = Literal["student", "speculative", "mixture", "pedagogical"]
Mask = Literal["completion", "relevance"]
Loss = Literal["reverse_kl", "jsd", "sampled", "imitation"]

# method -> (rollout policy, token mask, loss); the teacher (self or external) is its own setting
METHODS: dict[str, tuple[Rollout, Mask, Loss]] = {
    "opsd": ("student", "completion", "reverse_kl"),
    "opd": ("student", "completion", "reverse_kl"),
    "rmsd": ("student", "relevance", "reverse_kl"),
    "speculative": ("speculative", "completion", "reverse_kl"),
    "trb": ("mixture", "completion", "reverse_kl"),
    "pedagogical": ("pedagogical", "completion", "imitation"),
}


class MethodError(ValueError):
    """A method whose parts this engine or configuration cannot run."""


@dataclass(frozen=True)
class Parts:
    rollout: Rollout
    mask: Mask
    loss: str


# RL method -> its parts: the reward-driven loss is the method's own (no teacher to choose)
RL_METHODS: dict[str, Parts] = {
    "grpo": Parts(rollout="student", mask="completion", loss="policy_gradient"),
}


def method_names() -> dict[str, str]:
    """Every method and the command that trains it (for error messages naming the choices)."""
    return {**{name: "fold" for name in METHODS}, **{name: "train" for name in RL_METHODS}}


def parts_of(config) -> Parts:
    """The parts a `FoldConfig` composes: its method's preset, with `rollout` / `mask` / `loss` overriding it."""
    rollout, mask, loss = METHODS[config.method]
    return Parts(rollout=config.rollout or rollout, mask=config.mask or mask, loss=config.loss or loss)


def needs_teacher_pass(parts: Parts) -> bool:
    """Whether a step scores its trained tokens with the teacher (the distillation losses, and the
    relevance mask, read the teacher's distribution; imitation learns the rollout's tokens alone)."""
    return parts.loss != "imitation" or parts.mask == "relevance"


def check_engine(parts: Parts, engine: Engine) -> None:
    """Refuse, before a fold starts, a rollout policy the engine cannot run."""
    if parts.rollout != "student" and not isinstance(engine, GuidedEngine):
        raise MethodError(
            f"the {parts.rollout} rollout policy needs an engine with guided generation; "
            f"{type(engine).__name__} has none. Use the HF engine, or fold.rollout=student"
        )


# ----------------------------------------------------------------------------- rollout policies
def mixture_weight(config, step: int) -> float:
    """The mixture policy's teacher weight at (0-based) `step`: `trb_mix` annealed linearly to 0."""
    if config.trb_warmup_steps == 0:
        return 0.0
    return config.trb_mix * max(0.0, 1.0 - step / config.trb_warmup_steps)


def surprisal_budgets(parts: Parts, config) -> list[float | None]:
    """The rungs a rollout policy plays an item at, in order: one (None: the policy's only setting) for
    every policy but `pedagogical`, whose rungs are its surprisal limits, widening, then the teacher
    alone (inf)."""
    if parts.rollout != "pedagogical":
        return [None]
    return [*sorted(config.pedagogical_surprisal), math.inf]


def play(parts: Parts, engine: Engine, teacher, config, step: int, anchors: Sequence[bool],
         episodes: Callable[[Sequence[int], Any], list]) -> list:
    """Step `step`'s rollouts under the rollout policy: `episodes(rows, guided)` plays the batch rows
    `rows` (fresh environments of their items) and returns their scored trajectories.

    The pedagogical policy plays every row at its narrowest surprisal budget, then each row whose
    episode failed (anchors excepted: they only keep the student where it is) again, from a fresh
    environment, at the next wider budget, and last with the teacher alone: the teacher's surprising
    tokens stay only where success needed them. A row's final trajectory records in `info` the
    `attempts` it took, the `surprisal_budget` it succeeded (or last failed) at, and the tokens of its
    discarded attempts (`discarded_tokens`), which the step counts as spent."""
    budgets = surprisal_budgets(parts, config)
    final: list = [None] * len(anchors)
    discarded = [0] * len(anchors)
    rows = list(range(len(anchors)))
    for attempt, budget in enumerate(budgets, start=1):
        played = episodes(rows, guided_rollout(parts, engine, teacher, config, step, surprisal=budget))
        for row, trajectory in zip(rows, played, strict=True):
            if final[row] is not None:
                discarded[row] += final[row].completion_tokens
            final[row] = trajectory
            if budget is not None:
                trajectory.info.update(attempts=attempt, surprisal_budget=budget, discarded_tokens=discarded[row])
        rows = [row for row in rows if not final[row].success and not anchors[row]]
        if not rows:
            break
    return final


def imitated(parts: Parts, trajectory, anchor: bool) -> bool:
    """Whether a step learns from this episode: a pedagogical rollout that failed at every budget (the
    teacher alone included) is not imitated; every other episode is trained on as the loss says."""
    return parts.rollout != "pedagogical" or anchor or trajectory.success


def guided_rollout(parts: Parts, engine: Engine, teacher, config, step: int, surprisal: float | None = None):
    """The rollout policy as a `run_episodes(guided=...)` callable, or None for the student's own
    samples (the `student` policy, and `mixture` once its warm-up is over). `surprisal`: the
    pedagogical policy's budget for this attempt (nats; inf = the teacher alone).

    The teacher view runs the student's model under the teacher's weights (`Teacher._teacher_weights`:
    the frozen or EMA adapter state), or the external teacher model, with the skills in its prompt.
    """
    if parts.rollout == "speculative":
        policy: dict[str, Any] = {"policy": "speculative", "top_k": config.speculative_top_k}
    elif parts.rollout == "mixture":
        mix = mixture_weight(config, step)
        if mix == 0.0:
            return None
        policy = {"policy": "mixture", "mix": mix}
    elif parts.rollout == "pedagogical":
        policy = {"policy": "pedagogical", "surprisal": math.inf if surprisal is None else surprisal}
    else:
        return None
    if not isinstance(engine, GuidedEngine):
        raise MethodError(f"the {parts.rollout} rollout policy needs an engine with guided generation")
    scope = teacher._teacher_weights if teacher.external is None else None

    def guided(student_chats, teacher_chats, params):
        return engine.generate_guided(student_chats, teacher_chats, params, teacher_scope=scope,
                                      teacher_model=teacher.external, **policy)

    return guided


# ----------------------------------------------------------------------------------- token masks
def token_mask(parts: Parts, config, targets: torch.Tensor, lengths: Sequence[int], teacher_hidden: torch.Tensor,
               teacher_weight: torch.Tensor, student_hidden: torch.Tensor, weight: torch.Tensor,
               project: Projection, scales: Sequence[float] | None = None) -> torch.Tensor:
    """(1, N) weights of one pass's N trained tokens (episodes flattened in order, `lengths` each);
    `scales`: a weight for each episode's tokens (`anchor_balance`)."""
    device = targets.device
    mask = torch.ones((1, targets.numel()), dtype=torch.bool, device=device)
    if parts.mask == "relevance":
        disagreement = (
            sampled_log_probs(teacher_hidden, teacher_weight, targets, config.chunk_size, project)
            - sampled_log_probs(student_hidden.detach(), weight.detach(), targets, config.chunk_size, project)
        ).abs()
        mask = top_per_episode(disagreement, lengths, config.relevance_top)
    if config.normalize == "episode":
        mask = mask * episode_weights(lengths, device)
    if scales is not None:
        mask = mask * torch.cat([torch.full((length,), scale, device=device)
                                 for length, scale in zip(lengths, scales, strict=True)])[None]
    return mask


def anchor_balance(lengths: Sequence[int], anchors: Sequence[bool]) -> list[float] | None:
    """Each episode's token weight in a per-token loss so that the replayed anchors weigh their share of the
    batch's episodes, not of its tokens: a group g (anchors, the rest) of n_g of B episodes and T_g of T
    tokens gets (n_g / B) * T / T_g a token (the weights still sum to T). A game of 8 moves has ~75 trained
    tokens and an anchor's answer ~16: by tokens, 2 anchors of 8 episodes were ~4% of the loss. None where
    the batch is all anchors or none."""
    if all(anchors) or not any(anchors):
        return None
    total, episodes = sum(lengths), len(lengths)
    scale = {}
    for group in (True, False):
        tokens = sum(length for length, anchor in zip(lengths, anchors, strict=True) if anchor == group)
        count = sum(anchor == group for anchor in anchors)
        scale[group] = count / episodes * total / tokens if tokens else 0.0
    return [scale[anchor] for anchor in anchors]


def episode_weights(lengths: Sequence[int], device) -> torch.Tensor:
    """(1, N) token weights 1/length of the token's episode: the masked mean becomes a mean of episode means."""
    return torch.cat([torch.full((length,), 1.0 / length, device=device) for length in lengths])[None]


def top_per_episode(scores: torch.Tensor, lengths: Sequence[int], top: int) -> torch.Tensor:
    """RMSD's relevance mask on flattened episodes: each episode's `top` highest-scoring tokens (1, N)."""
    width = max(lengths)
    padded = torch.zeros((len(lengths), width), dtype=scores.dtype, device=scores.device)
    valid = torch.zeros((len(lengths), width), dtype=torch.bool, device=scores.device)
    start = 0
    for row, length in enumerate(lengths):
        padded[row, :length] = scores[start:start + length]
        valid[row, :length] = True
        start += length
    chosen = top_positions(padded, valid, top)  # (E, L)
    return chosen[valid][None]  # (1, N), in the flattened order


# ------------------------------------------------------------------------------------------ losses
def token_loss(parts: Parts, config, student_hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
               teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, mask: torch.Tensor,
               project: Projection, behaviour: torch.Tensor | None = None) -> torch.Tensor:
    """The masked mean of the per-token loss over one pass's N tokens: (N, H) hidden states in.
    `behaviour` (N,): the log-probs the tokens were sampled with (NaN where unknown), for the sampled
    loss's importance ratios when the rollouts came from another adapter version than the student's.
    The imitation loss reads no teacher (its hidden states may be None)."""
    if parts.loss == "imitation":
        loss, _ = chunked_surprisal_weighted_imitation(
            student_hidden[None], weight, targets[None], mask, surprisal=config.imitation_surprisal,
            chunk_size=config.chunk_size, project=project,
        )
        return loss
    if parts.loss == "sampled":
        teacher_log_probs = sampled_log_probs(teacher_hidden, teacher_weight, targets, config.chunk_size, project)
        loss, _ = chunked_sampled_token_reverse_kl(
            student_hidden[None], weight, targets[None], teacher_log_probs[None], mask,
            behaviour_logprobs=None if behaviour is None else behaviour[None],
            chunk_size=config.chunk_size, project=project,
        )
        return loss
    beta = 1.0 if parts.loss == "reverse_kl" else config.beta
    return chunked_generalized_jsd(
        student_hidden[None], weight, teacher_hidden[None], beta, mask,
        teacher_lm_head_weight=teacher_weight, chunk_size=config.chunk_size, project=project,
    )


def loss_is_kl(parts: Parts, config) -> bool:
    """Whether the loss is itself the full-vocabulary KL over every trained token at weight 1 (the fold
    then logs it as the KL instead of computing the KL again)."""
    return parts.loss == "reverse_kl" and parts.mask == "completion" and config.normalize == "token"


def reward_loss(parts: Parts, config, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                advantages: torch.Tensor, mask: torch.Tensor, project: Projection,
                behaviour: torch.Tensor | None = None, reference: torch.Tensor | None = None):
    """An RL method's loss over one pass's N tokens ((N, H) hidden states in): the masked mean of the
    per-token loss, and its metrics. `advantages` (N,) per token (its episode's); `behaviour` (N,) the
    sampled tokens' behaviour log-probs (NaN where unknown); `reference` (N,) the reference policy's, for
    the KL term and metric. `config` is a `learners.grpo.GrpoConfig`."""
    if parts.loss != "policy_gradient":
        raise MethodError(f"{parts.loss} is not a reward-driven loss")
    return chunked_policy_gradient(
        hidden[None], weight, targets[None], advantages[None], mask,
        behaviour_logprobs=None if behaviour is None else behaviour[None],
        reference_logprobs=None if reference is None else reference[None],
        kl_coef=config.kl_coef, clip_low=config.clip_low, clip_high=config.clip_high,
        chunk_size=config.chunk_size, project=project,
    )
