"""Token masks: which positions of a (B, T) batch a loss trains on. Pure torch, composable with `combine`.

Every mask is a bool tensor (B, T), True = trained. A loss takes the AND of the masks that apply
(research/algorithms.md section 9: `TokenMask` = product of masks): what the student wrote
(`completion_mask`), minus special tokens (`special_token_mask`), optionally only where teacher and
student disagree most (`relevance_mask`, RMSD), narrowed by a judge (`judge_narrow`), and, for
speculative rollouts, only the tokens the student proposed and kept (`accepted_mask`, SpecKD).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from enum import IntEnum

import torch
from torch import Tensor


class Segment(IntEnum):
    """What produced a token, per position (B, T); only assistant tokens are trained by default."""

    PADDING = -1
    PROMPT = 0  # system and user messages, privileged context, chat-template headers
    ASSISTANT = 1  # the model's own turns, its end-of-turn token included
    ENVIRONMENT = 2  # observations and feedback appended by the environment
    TOOL = 3  # tool results


class Source(IntEnum):
    """Who chose a token of a speculative rollout (SKD: the teacher replaces rejected proposals)."""

    STUDENT = 0
    TEACHER = 1


def completion_mask(segment_ids: Tensor, trained: Iterable[int] = (Segment.ASSISTANT,)) -> Tensor:
    """m_t = [segment_t ∈ trained]: the model's own tokens (every assistant turn of a multi-turn
    episode, NOTES.md section 10), not prompt, environment, tool or padding tokens. (B, T) -> (B, T)."""
    allowed = torch.tensor(
        [int(segment) for segment in trained], dtype=segment_ids.dtype, device=segment_ids.device
    )
    return torch.isin(segment_ids, allowed)


def special_token_mask(token_ids: Tensor, special_ids: Iterable[int], keep_ids: Iterable[int] = ()) -> Tensor:
    """m_t = [y_t ∉ special_ids ∖ keep_ids]: drops special tokens (chat-template markers, padding;
    Revisiting OPD's special-token mismatch). Pass the end-of-turn id in `keep_ids` to keep training
    it where the model must learn to stop. (B, T) -> (B, T)."""
    kept = {int(token) for token in keep_ids}
    excluded = [int(token) for token in special_ids if int(token) not in kept]
    if not excluded:
        return torch.ones_like(token_ids, dtype=torch.bool)
    return ~torch.isin(token_ids, torch.tensor(excluded, dtype=token_ids.dtype, device=token_ids.device))


def top_positions(scores: Tensor, mask: Tensor, top_t: int) -> Tensor:
    """Per sequence, the `top_t` unmasked positions with the largest score (all of them when fewer).
    Ties are broken by the lower position. (B, T) -> (B, T)."""
    if top_t < 0:
        raise ValueError(f"top_t must be >= 0, got {top_t}")
    length = scores.shape[-1]
    if top_t == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    # stable sort on the score, masked positions last: the first top_t of each row win
    ranked = torch.where(mask, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float32))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[
        ..., : min(top_t, length)
    ]  # (B, t)
    chosen = torch.zeros_like(mask, dtype=torch.bool).scatter(-1, order, True)
    return chosen & mask


def relevance_mask(student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor, top_t: int) -> Tensor:
    """RMSD's first stage: per sequence, keep the `top_t` unmasked positions with the largest
    teacher–student disagreement |log T(y_t) − log S(y_t)| on the sampled token (the measure is our
    choice; the blog's is unverified). Narrow further with `judge_narrow`. (B, T) -> (B, T)."""
    disagreement = (teacher_logprobs - student_logprobs).abs().detach()  # (B, T)
    return top_positions(disagreement, mask, top_t)


def judge_narrow(mask: Tensor, judge: Callable[[int, list[int]], Collection[int]]) -> Tensor:
    """RMSD's second stage: `judge(sequence_index, candidate_positions)` returns the positions that
    matter for the target behaviour (an LLM judge reading that rollout); the result keeps only those,
    and only among the candidates (a judge can narrow a mask, never widen it). One call per sequence
    with at least one candidate. (B, T) -> (B, T)."""
    narrowed = torch.zeros_like(mask, dtype=torch.bool)
    for sequence in range(mask.shape[0]):
        candidates = torch.nonzero(mask[sequence], as_tuple=False).flatten().tolist()
        if not candidates:
            continue
        chosen = sorted(set(candidates) & {int(position) for position in judge(sequence, candidates)})
        if chosen:
            narrowed[sequence, chosen] = True
    return narrowed


def accepted_mask(sources: Tensor) -> Tensor:
    """SpecKD: m_t = [source_t = student], the tokens the student proposed and the teacher accepted;
    positions where the teacher replaced the student's proposal are not trained. (B, T) -> (B, T)."""
    return sources == Source.STUDENT


def combine(*masks: Tensor) -> Tensor:
    """m = m¹ ∧ m² ∧ ... (bool masks of one shape)."""
    if not masks:
        raise ValueError("combine needs at least one mask")
    result = masks[0]
    for mask in masks:
        if mask.dtype != torch.bool:
            raise TypeError(f"masks must be bool, got {mask.dtype}")
        if mask.shape != result.shape:
            raise ValueError(f"mask shapes differ: {tuple(mask.shape)} vs {tuple(result.shape)}")
    for mask in masks[1:]:
        result = result & mask
    return result
