"""Distillation and policy-gradient losses: pure torch functions, each with its formula in its docstring.

Notation (research/algorithms.md): S = π_θ the student, T the teacher, μ the behaviour policy that
sampled the rollout, y_t the token at position t, m_t the token mask (bool, or float weights),
sg stop-gradient. Per-position inputs are (B, T); distributions are over the last dim (V, or K+1
buckets). Every loss is a mean over unmasked tokens, Σ_t m_t·ℓ_t / Σ_t m_t (0 when nothing is
unmasked: a batch with no trained token gives a zero loss with a valid graph, not NaN).

Four families:
- sampled-token reverse KL, an RL loss on the log-probs of the sampled tokens only (B, T);
- the generalized JSD(β) over the full vocabulary or over the teacher's top-k plus a tail bucket;
- GRPO's group-relative advantages and clipped policy-gradient surrogate, with an optional k3 KL to a
  reference policy (the environment's reward, not a teacher, makes the signal);
- surprisal-weighted imitation of a rollout's tokens (the pedagogical method: the teacher wrote them).

The (B, T, V) logits are the memory and time hog of a training step (8 x 256 x 49,152 fp32 is
0.4 GB per copy, NOTES.md section 3). `chunked_head_loss` computes a loss from the final hidden
states and the lm head weight a chunk of positions at a time, so neither the forward nor the backward
ever holds more than a few (chunk_size, V) tensors, and masked positions cost nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# hidden (n, H) @ weightᵀ (V, H) -> logits (n, V): how the chunked losses project onto the vocabulary.
# The plain matmul by default; a trainer may pass a faster one for the same product (a prepacked head).
Projection = Callable[[Tensor, Tensor], Tensor]


def linear_head(hidden: Tensor, weight: Tensor) -> Tensor:
    """hidden @ weightᵀ, (n, H) x (V, H) -> (n, V), in fp32: half-precision inputs (a bf16 model on a GPU)
    are multiplied with fp32 accumulation and output, so the losses never see logits rounded to bf16."""
    if hidden.dtype == torch.float32 and weight.dtype == torch.float32:
        return hidden @ weight.T
    if hidden.is_cuda:
        return torch.mm(hidden, weight.T, out_dtype=torch.float32)
    return hidden.float() @ weight.float().T


# A per-token loss for `chunked_head_loss`: (logits (n, V) fp32, *extras (n, ...)) -> (loss (n,), stat (n,)).
TokenLoss = Callable[..., tuple[Tensor, Tensor]]

# log-probabilities of empty buckets are floored here, so that 0·log 0 terms stay finite
_LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)  # ≈ −87.3


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Σ_t m_t·v_t / Σ_t m_t over all positions; 0 when Σ_t m_t = 0. `mask` bool or float weights."""
    weights = mask.to(values.dtype)
    total = weights.sum()
    weighted = torch.where(weights != 0, values * weights, torch.zeros_like(values))
    return weighted.sum() / torch.where(total > 0, total, torch.ones_like(total))


# --- sampled-token reverse KL (RL form) ----------------------------------------------------------


def _sampled_token_terms(
    student_logprobs: Tensor, teacher_logprobs: Tensor, behaviour_logprobs: Tensor | None, clip: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token loss, ratio and clipped flag of `sampled_token_reverse_kl` (all the input's shape)."""
    advantage = (teacher_logprobs - student_logprobs).detach()
    reference = student_logprobs.detach() if behaviour_logprobs is None else behaviour_logprobs.detach()
    if behaviour_logprobs is not None:  # NaN: the token's behaviour log-prob is unknown, taken as on-policy
        reference = torch.where(torch.isnan(reference), student_logprobs.detach(), reference)
    ratio = torch.exp(student_logprobs - reference)  # 1 on-policy, with gradient ∇log S
    unclipped = ratio * advantage
    if clip is None:
        return -unclipped, ratio, torch.zeros_like(unclipped, dtype=torch.bool)
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * advantage
    return -torch.minimum(unclipped, clipped), ratio, clipped < unclipped


def _sampled_token_metrics(
    student_logprobs: Tensor, teacher_logprobs: Tensor, ratio: Tensor, clipped: Tensor, mask: Tensor
) -> dict[str, float]:
    with torch.no_grad():
        return {
            "kl": masked_mean(student_logprobs - teacher_logprobs, mask).item(),
            "clip_fraction": masked_mean(clipped.to(ratio.dtype), mask).item(),
            "ratio": masked_mean(ratio, mask).item(),
        }


def sampled_token_reverse_kl(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    *,
    behaviour_logprobs: Tensor | None = None,
    clip: float | None = 0.2,
) -> tuple[Tensor, dict[str, float]]:
    """Reverse KL on the sampled tokens as a per-token advantage, PPO-clipped (Thinking Machines OPD,
    tinker `incorporate_kl_penalty`; the OPSD sampled-token mode).

        A_t = sg(log T(y_t) − log S(y_t))                  (−1 x the k1 estimate of KL(S‖T) at y_t)
        r_t = exp(log S(y_t) − sg(log μ(y_t)))             (μ = None, or NaN at t: on-policy, r_t = 1, ∇r_t = ∇log S)
        ℓ_t = −min(r_t·A_t, clip(r_t, 1−ε, 1+ε)·A_t)       (ε = `clip`; None: no clipping)
        L   = Σ_t m_t·ℓ_t / Σ_t m_t

    On-policy the gradient is −Σ_t m_t·A_t·∇log S(y_t) / Σ m: descent raises log S(y_t) where the teacher
    gives y_t more probability than the student, and lowers it where less. A clipped token (the
    clipped term is the strict minimum) gets no gradient. All inputs (B, T); the teacher and behaviour
    log-probs are constants. Metrics (floats): `kl` = masked mean of log S − log T (the k1 estimate of
    KL(S‖T) when μ = S), `clip_fraction` = share of unmasked tokens clipped, `ratio` = mean r_t.
    """
    loss_t, ratio, clipped = _sampled_token_terms(
        student_logprobs, teacher_logprobs, behaviour_logprobs, clip
    )
    loss = masked_mean(loss_t, mask)
    return loss, _sampled_token_metrics(student_logprobs, teacher_logprobs, ratio, clipped, mask)


# --- generalized JSD(β) ----------------------------------------------------------------------------


def _kl(p_logprobs: Tensor, q_logprobs: Tensor) -> Tensor:
    """KL(p‖q) = Σ_v p_v·(log p_v − log q_v) over the last dim, with 0·log(0/q) = 0 (and no NaN grads)."""
    p = p_logprobs.exp()
    difference = torch.where(p > 0, p_logprobs - q_logprobs, torch.zeros_like(p))
    return (p * difference).sum(-1)


def token_jsd(student_logprobs: Tensor, teacher_logprobs: Tensor, beta: float) -> Tensor:
    """Generalized JSD(β) per position over the last dim, (..., V) -> (...), as TRL's GKD:

        M   = β·T + (1−β)·S
        D_β = β·KL(T‖M) + (1−β)·KL(S‖M)          0 < β < 1
        D_0 = KL(T‖S)   (forward, mode-covering)     D_1 = KL(S‖T)   (reverse, mode-seeking)

    β = 0 and β = 1 are defined separately (as in TRL): the formula itself tends to β·KL(T‖S) as
    β → 0 and (1−β)·KL(S‖T) as β → 1, so it vanishes at the ends; the special cases keep the scale.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return _kl(teacher_logprobs, student_logprobs)
    if beta == 1.0:
        return _kl(student_logprobs, teacher_logprobs)
    log_mixture = torch.logaddexp(student_logprobs + math.log1p(-beta), teacher_logprobs + math.log(beta))
    return beta * _kl(teacher_logprobs, log_mixture) + (1.0 - beta) * _kl(student_logprobs, log_mixture)


def kl_and_grad(student_logits: Tensor, teacher_logits: Tensor, *, reverse: bool,
                temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-row KL and its gradient in the student's logits, (n, V) -> (n,), (n, V), written into the
    inputs' own buffers (both are overwritten): two (n, V) tensors where autograd through `token_jsd`
    keeps about eight, and no backward graph. With s = log softmax(z/τ), t = log softmax(z_T/τ):

        reverse  KL(S‖T) = Σ_v e^{s_v}·(s_v − t_v)     ∂/∂z_v = e^{s_v}·(s_v − t_v − KL(S‖T)) / τ
        forward  KL(T‖S) = Σ_v e^{t_v}·(t_v − s_v)     ∂/∂z_v = (e^{s_v} − e^{t_v}) / τ

    Same values as `token_jsd(s, t, 1.0)` and `token_jsd(s, t, 0.0)`, and the gradients autograd gives
    through them. The teacher is a constant. Both inputs fp32 (n, V), finite.
    """
    student = student_logits if temperature == 1.0 else student_logits.div_(temperature)
    teacher = teacher_logits if temperature == 1.0 else teacher_logits.div_(temperature)
    student.sub_(torch.logsumexp(student, dim=-1, keepdim=True))  # s
    teacher.sub_(torch.logsumexp(teacher, dim=-1, keepdim=True))  # t
    if reverse:
        difference = teacher.sub_(student).neg_()  # s − t
        probabilities = student.exp_()  # e^s
        divergence = torch.bmm(probabilities[:, None, :], difference[:, :, None])[:, 0, 0]  # (n,)
        grad = difference.sub_(divergence[:, None]).mul_(probabilities)
    else:
        difference = student.sub_(teacher).neg_()  # t − s
        teacher_probabilities = teacher.exp_()  # e^t
        divergence = torch.bmm(teacher_probabilities[:, None, :], difference[:, :, None])[:, 0, 0]
        grad = difference.neg_().exp_().mul_(teacher_probabilities).sub_(teacher_probabilities)  # e^s − e^t
    if temperature != 1.0:
        grad.div_(temperature)
    return divergence, grad


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """logits / τ in fp32 (no copy when the logits are fp32 and τ = 1)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def generalized_jsd(
    student_logits: Tensor, teacher_logits: Tensor, beta: float, mask: Tensor, temperature: float = 1.0
) -> Tensor:
    """Generalized JSD(β) over the full vocabulary, mean over unmasked tokens (GKD, Agarwal et al. 2024):

        S = softmax(student_logits / τ),  T = softmax(teacher_logits / τ)          (B, T, V)
        L = Σ_t m_t·D_β(S_t, T_t) / Σ_t m_t                                         (`token_jsd`)

    β = 0 is forward KL(T‖S), β = 1 reverse KL(S‖T). Same value as TRL's
    `GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature)` with
    labels = −100 where the mask is False (its default reduction "batchmean" divides by the unmasked
    token count when labels are given; without labels it divides the sum by B instead). Computed in
    fp32. The teacher is not detached here: pass teacher logits computed under `torch.no_grad()`.
    """
    student = F.log_softmax(_scaled(student_logits, temperature), dim=-1)  # (B, T, V)
    teacher = F.log_softmax(_scaled(teacher_logits, temperature), dim=-1)  # (B, T, V)
    return masked_mean(token_jsd(student, teacher, beta), mask)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x ≤ 0, accurate at both ends (Mächler 2012); x is clamped to ≤ 0 first."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_buckets(
    student_logits: Tensor, teacher_topk_ids: Tensor, teacher_topk_logprobs: Tensor
) -> tuple[Tensor, Tensor]:
    """Both distributions restricted to the teacher's top-k tokens plus one tail bucket, (..., K+1):

        S_k = S(v_k)  for the teacher's top-k ids v_1..v_K,  S_tail = 1 − Σ_k S_k  (exact: from the logits
        of the tokens outside the top-k);  T_k as given,  T_tail = 1 − Σ_k T_k.

    Each tail's log-probability is floored at log(float32 tiny) ≈ −87.3: with K = V both tails are empty
    (and contribute 0); a teacher whose top-k mass rounds to 1 gets a tail of e^−87.3, so a reverse KL
    stays finite. `student_logits` (..., V); the teacher's ids and log-probs (..., K), as an engine's
    `score(top_k=K)` returns them (distinct ids; log-probs normalized over the full vocabulary).
    """
    student_logits = student_logits.float()
    vocabulary = student_logits.shape[-1]
    teacher_topk_logprobs = teacher_topk_logprobs.float()
    normalizer = torch.logsumexp(student_logits, dim=-1, keepdim=True)  # (..., 1)
    student_topk = student_logits.gather(-1, teacher_topk_ids) - normalizer  # (..., K)
    if teacher_topk_ids.shape[-1] >= vocabulary:  # nothing outside the top-k
        student_tail = torch.full_like(normalizer, _LOG_FLOOR)
        teacher_tail = torch.full_like(student_tail, _LOG_FLOOR)
    else:
        outside = student_logits.scatter(-1, teacher_topk_ids, float("-inf"))  # (..., V)
        student_tail = (torch.logsumexp(outside, dim=-1, keepdim=True) - normalizer).clamp(min=_LOG_FLOOR)
        teacher_mass = torch.logsumexp(teacher_topk_logprobs, dim=-1, keepdim=True)  # (..., 1)
        teacher_tail = _log1mexp(teacher_mass).clamp(min=_LOG_FLOOR)
    return torch.cat([student_topk, student_tail], dim=-1), torch.cat(
        [teacher_topk_logprobs, teacher_tail], dim=-1
    )


def topk_jsd(
    student_logits: Tensor, teacher_topk_ids: Tensor, teacher_topk_logprobs: Tensor, beta: float, mask: Tensor
) -> Tensor:
    """Generalized JSD(β) over the teacher's top-k tokens plus a tail bucket (SDPO's top-k + tail; the
    "teacher top-K" fix of Revisiting OPD), mean over unmasked tokens:

        (S', T') = `topk_buckets`(...)                                                (B, T, K+1)
        L = Σ_t m_t·D_β(S'_t, T'_t) / Σ_t m_t                                          (`token_jsd`)

    The teacher needs only K log-probs per position. With K = V this equals `generalized_jsd`. Student
    logits (B, T, V), teacher ids and log-probs (B, T, K), no temperature (the teacher's log-probs come
    at whatever temperature they were scored at). The gradient flows through the student's top-k and
    tail probabilities; the teacher side is a constant.
    """
    student, teacher = topk_buckets(student_logits, teacher_topk_ids, teacher_topk_logprobs)  # (B, T, K+1)
    return masked_mean(token_jsd(student, teacher, beta), mask)


# --- chunked over positions, from hidden states ---------------------------------------------------


class _ChunkedHeadLoss(torch.autograd.Function):
    """Σ_n w_n·loss_n over rows, with logits = hidden @ weightᵀ made one chunk of rows at a time.

    The gradient is computed in the forward pass, chunk by chunk (autograd on the chunk's logits, then
    ∂hidden = ∂logits @ W and ∂W += ∂logitsᵀ @ hidden), so the backward pass only scales the stored
    (N, H) and (V, H) gradients: one logits matmul per chunk instead of two with recomputation.
    """

    @staticmethod
    def forward(ctx, hidden, weight, row_weights, token_loss, chunk_size, need_hidden, need_weight, project,
                *extras):
        ctx.extra_count = len(extras)
        rows = hidden.shape[0]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None  # (N, H)
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        )
        stats = torch.zeros(rows, dtype=torch.float32, device=hidden.device)  # (N,)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, chunk_size):
            end = min(start + chunk_size, rows)
            chunk_hidden = hidden[start:end]  # (n, H)
            logits = project(chunk_hidden, weight).float()  # (n, V): hidden @ weightᵀ
            chunk_extras = [extra[start:end] for extra in extras]
            grad_logits = None  # (n, V): ∂(Σ_n w_n·ℓ_n)/∂logits, when a gradient is wanted
            if getattr(token_loss, "analytic", False):  # its own gradient, in place in its buffers
                loss, stat, grad_logits = token_loss(logits, *chunk_extras)  # (n,), (n,), (n, V)
                chunk_total = (loss * row_weights[start:end]).sum()
                grad_logits = grad_logits.mul_(row_weights[start:end, None]) if need_hidden or need_weight else None
            elif need_hidden or need_weight:
                logits.requires_grad_(True)
                with torch.enable_grad():
                    loss, stat = token_loss(logits, *chunk_extras)  # (n,), (n,)
                    chunk_total = (loss * row_weights[start:end]).sum()
                (grad_logits,) = torch.autograd.grad(chunk_total, logits)
            else:
                loss, stat = token_loss(logits, *chunk_extras)
                chunk_total = (loss * row_weights[start:end]).sum()
            if grad_logits is not None:
                grad_logits = grad_logits.to(weight.dtype)
                if need_hidden:
                    grad_hidden[start:end] = grad_logits @ weight
                if need_weight:
                    grad_weight.addmm_(grad_logits.T.float(), chunk_hidden.float())
                del grad_logits
            del logits
            total += chunk_total.detach()
            stats[start:end] = stat.detach().float()
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(stats)
        return total, stats

    @staticmethod
    def backward(ctx, grad_total, _grad_stats):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_total
        return (
            None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
            None if grad_weight is None else grad_weight * scale.to(grad_weight.dtype),
            *([None] * (6 + ctx.extra_count)),
        )


def chunked_head_loss(
    hidden_states: Tensor,
    lm_head_weight: Tensor,
    mask: Tensor,
    token_loss: TokenLoss,
    extras: Sequence[Tensor] = (),
    chunk_size: int = 512,
    project: Projection = linear_head,
) -> tuple[Tensor, Tensor]:
    """L = Σ_t m_t·ℓ(h_t Wᵀ, e_t) / Σ_t m_t without materialising the (B, T, V) logits.

    Only the unmasked positions are computed, `chunk_size` of them (rows of B·T) at a time: the peak is
    a few (chunk_size, V) fp32 tensors in forward and none in backward. Same value and gradients (with
    respect to `hidden_states` and `lm_head_weight`) as applying `token_loss` to the full logits.

    `hidden_states` (B, T, H): the final hidden states after the last norm, position t already aligned
    with what it predicts (shift before calling). `lm_head_weight` (V, H), bias-free head. `mask` (B, T)
    bool or float weights. `token_loss(logits (n, V) fp32, *extras (n, ...))` returns the per-token loss
    ℓ and a per-token statistic (n,) (returned detached, scattered to (B, T), 0 where masked). `extras`
    (B, T, ...) are per-position constants (no gradient flows to them). `project(hidden, weight)` makes
    a chunk's logits (the plain matmul unless a trainer passes an equal, faster one).
    Returns (loss, statistic (B, T)). The gradient is computed during this call whenever grad mode is
    on and an input requires it (the backward pass only scales it): evaluate under `torch.no_grad()`.
    Not twice differentiable.
    """
    rows = mask != 0  # (B, T)
    weights = mask.to(torch.float32)
    total_weight = weights.sum()
    row_weights = weights[rows] / torch.where(
        total_weight > 0, total_weight, torch.ones_like(total_weight)
    )  # (N,)
    hidden = hidden_states[rows]  # (N, H)
    row_extras = [extra[rows].detach() for extra in extras]  # (N, ...)
    grad_enabled = torch.is_grad_enabled()
    need_hidden = grad_enabled and hidden.requires_grad
    need_weight = grad_enabled and lm_head_weight.requires_grad
    loss, row_stats = _ChunkedHeadLoss.apply(
        hidden, lm_head_weight, row_weights, token_loss, chunk_size, need_hidden, need_weight, project, *row_extras
    )
    stats = torch.zeros(mask.shape, dtype=torch.float32, device=hidden_states.device)  # (B, T)
    stats[rows] = row_stats
    return loss, stats


def chunked_generalized_jsd(
    hidden_states: Tensor,
    lm_head_weight: Tensor,
    teacher_hidden_states: Tensor,
    beta: float,
    mask: Tensor,
    *,
    teacher_lm_head_weight: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 512,
    project: Projection = linear_head,
) -> Tensor:
    """`generalized_jsd` from hidden states, chunked (`chunked_head_loss`): neither the student's nor
    the teacher's (B, T, V) logits are ever whole.

        S_t = softmax(h_t Wᵀ / τ),  T_t = softmax(sg(h'_t W'ᵀ) / τ),  L = Σ_t m_t·D_β(S_t, T_t) / Σ_t m_t

    `teacher_hidden_states` (B, T, H') aligned with the student's positions; `teacher_lm_head_weight`
    (V, H') defaults to the student's (self-distillation with a LoRA student). The teacher is a
    stop-gradient target. β = 1 is the full-vocabulary reverse KL(S‖T) of the fold probe (NOTES §10).
    """
    teacher_weight = (lm_head_weight if teacher_lm_head_weight is None else teacher_lm_head_weight).detach()
    if beta in (0.0, 1.0):
        def analytic(logits: Tensor, teacher_hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            with torch.no_grad():
                teacher_logits = project(teacher_hidden, teacher_weight).float()  # (n, V)
            divergence, grad = kl_and_grad(logits, teacher_logits, reverse=beta == 1.0, temperature=temperature)
            return divergence, divergence, grad

        analytic.analytic = True  # chunked_head_loss: the function returns ∂ℓ/∂logits itself
        loss, _ = chunked_head_loss(hidden_states, lm_head_weight, mask, analytic, [teacher_hidden_states], chunk_size,
                                    project)
        return loss

    def token_loss(logits: Tensor, teacher_hidden: Tensor) -> tuple[Tensor, Tensor]:
        student = F.log_softmax(_scaled(logits, temperature), dim=-1)  # (n, V)
        with torch.no_grad():
            teacher_logits = project(teacher_hidden, teacher_weight).float()  # (n, V)
            teacher = F.log_softmax(_scaled(teacher_logits, temperature), dim=-1)
        divergence = token_jsd(student, teacher, beta)  # (n,)
        return divergence, divergence

    loss, _ = chunked_head_loss(
        hidden_states, lm_head_weight, mask, token_loss, [teacher_hidden_states], chunk_size, project
    )
    return loss


def chunked_topk_jsd(
    hidden_states: Tensor,
    lm_head_weight: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    beta: float,
    mask: Tensor,
    *,
    chunk_size: int = 512,
    project: Projection = linear_head,
) -> Tensor:
    """`topk_jsd` from hidden states, chunked (`chunked_head_loss`): L = Σ_t m_t·D_β(S'_t, T'_t) / Σ_t m_t
    over the teacher's top-k + tail buckets, S_t = softmax(h_t Wᵀ). Teacher ids, log-probs (B, T, K)."""

    def token_loss(logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor) -> tuple[Tensor, Tensor]:
        student, teacher = topk_buckets(logits, topk_ids, topk_logprobs)  # (n, K+1)
        divergence = token_jsd(student, teacher, beta)  # (n,)
        return divergence, divergence

    extras = [teacher_topk_ids, teacher_topk_logprobs]
    loss, _ = chunked_head_loss(hidden_states, lm_head_weight, mask, token_loss, extras, chunk_size, project)
    return loss


def chunked_sampled_token_reverse_kl(
    hidden_states: Tensor,
    lm_head_weight: Tensor,
    token_ids: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    *,
    behaviour_logprobs: Tensor | None = None,
    clip: float | None = 0.2,
    temperature: float = 1.0,
    chunk_size: int = 512,
    project: Projection = linear_head,
) -> tuple[Tensor, dict[str, float]]:
    """`sampled_token_reverse_kl` from hidden states, chunked (`chunked_head_loss`), with
    log S(y_t) = log_softmax(h_t Wᵀ / τ)[y_t]. `token_ids` are the sampled y_t (B, T); teacher and
    behaviour log-probs (B, T). Same loss, gradients and metrics as the unchunked function."""
    on_policy = behaviour_logprobs is None

    def token_loss(logits: Tensor, ids: Tensor, teacher: Tensor, *behaviour: Tensor) -> tuple[Tensor, Tensor]:
        scaled = _scaled(logits, temperature)  # (n, V)
        student = scaled.gather(-1, ids[:, None])[:, 0] - torch.logsumexp(scaled, dim=-1)  # (n,)
        loss, _, _ = _sampled_token_terms(student, teacher, None if on_policy else behaviour[0], clip)
        return loss, student

    extras = [token_ids, teacher_logprobs] + ([] if on_policy else [behaviour_logprobs])
    loss, student_logprobs = chunked_head_loss(
        hidden_states, lm_head_weight, mask, token_loss, extras, chunk_size, project
    )
    with torch.no_grad():
        _, ratio, clipped = _sampled_token_terms(
            student_logprobs,
            teacher_logprobs.float(),
            None if on_policy else behaviour_logprobs.float(),
            clip,
        )
    return loss, _sampled_token_metrics(student_logprobs, teacher_logprobs.float(), ratio, clipped, mask)


# --- group-relative policy gradient (GRPO) ---------------------------------------------------------


def group_advantages(rewards: Tensor, group_size: int, *, scale: bool = True,
                     eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath, outcome supervision):

        rewards r (G·n,), consecutive groups of n samples of one prompt
        Â_i = (r_i − mean(r_group)) / (std(r_group) + eps)      std: the sample (n − 1) standard deviation
        Â_i = r_i − mean(r_group)                                 with `scale` False (Dr. GRPO's choice)

    A group whose rewards are all equal (max − min ≤ 1e-9·max(1, |r|)) carries no signal: its
    advantages are exactly 0 (not a rounding residue divided by eps). Returns (advantages (G·n,),
    informative (G,) bool: the groups whose rewards differ).
    """
    if group_size < 2:
        raise ValueError(f"a group needs at least 2 samples to compare, got group_size={group_size}")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be a flat tensor of whole groups of {group_size}, got shape "
                         f"{tuple(rewards.shape)}")
    grouped = rewards.double().view(-1, group_size)  # (G, n)
    spread = grouped.max(-1).values - grouped.min(-1).values  # (G,)
    informative = spread > 1e-9 * grouped.abs().max(-1).values.clamp(min=1.0)
    advantages = grouped - grouped.mean(-1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(-1, keepdim=True) + eps)
    advantages = torch.where(informative[:, None], advantages, torch.zeros_like(advantages))
    return advantages.view(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32), informative


def _policy_gradient_terms(
    logprobs: Tensor, advantages: Tensor, behaviour_logprobs: Tensor | None, reference_logprobs: Tensor | None,
    kl_coef: float, clip_low: float, clip_high: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token loss, ratio, clipped flag and k3 KL of `policy_gradient_loss` (all the input's shape)."""
    advantages = advantages.detach().to(logprobs.dtype)
    old = logprobs.detach()
    if behaviour_logprobs is not None:  # NaN: the token's behaviour log-prob is unknown, taken as on-policy
        behaviour = behaviour_logprobs.detach().to(logprobs.dtype)
        old = torch.where(torch.isnan(behaviour), old, behaviour)
    ratio = torch.exp(logprobs - old)  # 1 on-policy, with gradient ∇log π_θ
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    if reference_logprobs is not None:
        delta = reference_logprobs.detach().to(logprobs.dtype) - logprobs  # log π_ref − log π_θ
        k3 = torch.exp(delta) - delta - 1.0
        if kl_coef:
            loss = loss + kl_coef * k3
    else:
        k3 = torch.zeros_like(logprobs)
    return loss, ratio, clipped < unclipped, k3


def _policy_gradient_metrics(ratio: Tensor, clipped: Tensor, k3: Tensor, mask: Tensor,
                             reference_known: bool) -> dict[str, float | None]:
    with torch.no_grad():
        return {
            "clip_fraction": masked_mean(clipped.to(ratio.dtype), mask).item(),
            "ratio": masked_mean(ratio, mask).item(),
            "kl": masked_mean(k3, mask).item() if reference_known else None,
        }


def policy_gradient_loss(
    logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    behaviour_logprobs: Tensor | None = None,
    reference_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> tuple[Tensor, dict[str, float | None]]:
    """GRPO's clipped surrogate on the sampled tokens, with an optional k3 KL to a reference policy:

        r_t  = exp(log π_θ(y_t) − sg(log μ(y_t)))             (μ: behaviour; None, or NaN at t: r_t = 1, ∇r_t = ∇log π_θ)
        ℓ_t  = −min(r_t·Â_t, clip(r_t, 1−ε_low, 1+ε_high)·Â_t) + β·k3_t
        k3_t = exp(δ_t) − δ_t − 1,  δ_t = sg(log π_ref(y_t)) − log π_θ(y_t)     (Schulman's k3 ≥ 0, of KL(π_θ‖π_ref))
        L    = Σ_t m_t·ℓ_t / Σ_t m_t

    Â_t is the advantage of the episode the token belongs to (`group_advantages`), the same for every
    token of every assistant turn of it; β = `kl_coef`. ε_high > ε_low is DAPO's clip-higher. On-policy
    the gradient is −Σ_t m_t·Â_t·∇log π_θ(y_t) / Σ m (+ β·Σ m_t·(1 − exp δ_t)·∇log π_θ / Σ m): descent
    raises the log-prob of the tokens of episodes better than their group. A clipped token (the clipped
    term the strict minimum) gets no policy-gradient gradient. Inputs (B, T); advantages, behaviour and
    reference are constants. Metrics: `clip_fraction` (share of unmasked tokens clipped), `ratio` (mean
    r_t), `kl` (mean k3_t; None without a reference).
    """
    loss_t, ratio, clipped, k3 = _policy_gradient_terms(
        logprobs, advantages, behaviour_logprobs, reference_logprobs, kl_coef, clip_low, clip_high)
    return masked_mean(loss_t, mask), _policy_gradient_metrics(ratio, clipped, k3, mask, reference_logprobs is not None)


def chunked_policy_gradient(
    hidden_states: Tensor,
    lm_head_weight: Tensor,
    token_ids: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    behaviour_logprobs: Tensor | None = None,
    reference_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    chunk_size: int = 512,
    project: Projection = linear_head,
) -> tuple[Tensor, dict[str, float | None]]:
    """`policy_gradient_loss` from hidden states, chunked (`chunked_head_loss`): log π_θ(y_t) =
    log_softmax(h_t Wᵀ)[y_t] (temperature 1, as the engine's behaviour log-probs are), never the
    (B, T, V) logits whole. `token_ids` the sampled y_t (B, T); advantages, behaviour and reference
    log-probs (B, T). Same loss, gradients and metrics as the unchunked function."""
    optional = [("behaviour", behaviour_logprobs), ("reference", reference_logprobs)]
    present = [name for name, tensor in optional if tensor is not None]

    def token_loss(logits: Tensor, ids: Tensor, advantage: Tensor, *rest: Tensor) -> tuple[Tensor, Tensor]:
        given = dict(zip(present, rest, strict=True))
        logprobs = logits.gather(-1, ids[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)  # (n,)
        loss, _, _, _ = _policy_gradient_terms(logprobs, advantage, given.get("behaviour"), given.get("reference"),
                                               kl_coef, clip_low, clip_high)
        return loss, logprobs

    extras = [token_ids, advantages.float()] + [tensor.float() for _, tensor in optional if tensor is not None]
    loss, logprobs = chunked_head_loss(hidden_states, lm_head_weight, mask, token_loss, extras, chunk_size, project)
    with torch.no_grad():
        _, ratio, clipped, k3 = _policy_gradient_terms(
            logprobs, advantages.float(), None if behaviour_logprobs is None else behaviour_logprobs.float(),
            None if reference_logprobs is None else reference_logprobs.float(), kl_coef, clip_low, clip_high)
    return loss, _policy_gradient_metrics(ratio, clipped, k3, mask, reference_logprobs is not None)


# --- surprisal-weighted imitation (the pedagogical method) -----------------------------------------


def _imitation_terms(logprobs: Tensor, surprisal: float) -> tuple[Tensor, Tensor]:
    """Per-token loss and weight of `surprisal_weighted_imitation` (the input's shape)."""
    nll = -logprobs  # s_t, with gradient
    weight = (surprisal / nll.detach().clamp(min=1e-12)).clamp(max=1.0)  # w_t = min(1, τ / s_t), a constant
    return weight * nll, weight


def surprisal_weighted_imitation(logprobs: Tensor, mask: Tensor, *, surprisal: float = 2.0) -> tuple[Tensor, Tensor]:
    """Imitation of the rollout's tokens, weighted by how surprising each is to the student:

        s_t = −log S(y_t)                       (the student's surprisal of the token it imitates)
        w_t = min(1, τ / sg(s_t))               (τ = `surprisal`, nats)
        ℓ_t = w_t · s_t,   L = Σ_t m_t·ℓ_t / Σ_t m_t

    A token the student already finds plausible (s_t ≤ τ) is learned fully, as in SFT; a harder one
    with weight τ/s_t, so that its gradient w_t·∇s_t is at most τ/s_t of the plain cross-entropy's
    and its loss contribution is capped at τ: easy tokens fully, hard ones gently. Inputs (B, T);
    returns (L, w (B, T)) with w detached."""
    if not surprisal > 0:
        raise ValueError(f"the imitation's surprisal scale must be > 0 nats, got {surprisal}")
    loss_t, weight = _imitation_terms(logprobs, surprisal)
    return masked_mean(loss_t, mask), weight


def chunked_surprisal_weighted_imitation(
    hidden_states: Tensor,
    lm_head_weight: Tensor,
    token_ids: Tensor,
    mask: Tensor,
    *,
    surprisal: float = 2.0,
    chunk_size: int = 512,
    project: Projection = linear_head,
) -> tuple[Tensor, dict[str, float]]:
    """`surprisal_weighted_imitation` from hidden states, chunked (`chunked_head_loss`), with
    log S(y_t) = log_softmax(h_t Wᵀ)[y_t] (temperature 1). `token_ids` the imitated y_t (B, T). Same
    loss and gradients as the unchunked function. Metrics: `surprisal` (mean s_t) and `imitation_weight`
    (mean w_t) over the unmasked tokens."""
    if not surprisal > 0:
        raise ValueError(f"the imitation's surprisal scale must be > 0 nats, got {surprisal}")

    def token_loss(logits: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        logprobs = logits.gather(-1, ids[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)  # (n,)
        loss, _ = _imitation_terms(logprobs, surprisal)
        return loss, -logprobs

    loss, nll = chunked_head_loss(hidden_states, lm_head_weight, mask, token_loss, [token_ids], chunk_size, project)
    with torch.no_grad():
        _, weight = _imitation_terms(-nll, surprisal)
        return loss, {"surprisal": masked_mean(nll, mask).item(), "imitation_weight": masked_mean(weight, mask).item()}
