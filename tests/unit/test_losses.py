"""learners.losses: hand computations on tiny tensors, the β limits, TRL's GKD loss on the same logits,
top-k with k = V and the tail bucket, the sampled-token loss's gradient and clipping, and chunked ==
unchunked (loss and gradients)."""

import math

import pytest
import torch
import torch.nn.functional as F

from learners.losses import (
    chunked_generalized_jsd,
    chunked_head_loss,
    chunked_sampled_token_reverse_kl,
    chunked_topk_jsd,
    generalized_jsd,
    kl_and_grad,
    masked_mean,
    sampled_token_reverse_kl,
    token_jsd,
    topk_buckets,
    topk_jsd,
)


def kl(p, q):
    """KL(p‖q) of two probability lists, by hand."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def logits_of(probabilities):
    """(1, 1, V) logits whose softmax is `probabilities` (log-probs are valid logits)."""
    return torch.tensor(probabilities, dtype=torch.float32).log().view(1, 1, -1)


def random_case(seed=0, batch=2, length=7, vocabulary=11, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, vocabulary, generator=generator) * scale
    teacher = torch.randn(batch, length, vocabulary, generator=generator) * scale
    mask = torch.rand(batch, length, generator=generator) > 0.3
    mask[0, 0] = True
    return student, teacher, mask


ONE = torch.ones(1, 1, dtype=torch.bool)


# --- masked mean ---------------------------------------------------------------------------------


def test_masked_mean_ignores_masked_values_and_is_zero_when_empty():
    values = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 5.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert masked_mean(values, torch.tensor([[0.5, 1.5, 0.0], [0.0, 0.0, 0.0]])).item() == pytest.approx(1.75)
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


# --- sampled-token reverse KL --------------------------------------------------------------------


STUDENT = [[-1.0, -2.0, -0.5, -1.0]]
TEACHER = [[-0.5, -3.0, -0.25, 0.0]]  # advantages A = T − S = [0.5, −1.0, 0.25, 1.0]
BEHAVIOUR = [[-1.5, -1.5, -0.5, -1.0 + math.log(2.0)]]  # ratios r = [e^0.5, e^−0.5, 1, 0.5]


def test_sampled_token_on_policy_by_hand_and_gradient_direction():
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER)
    mask = torch.tensor([[True, True, True, False]])
    loss, metrics = sampled_token_reverse_kl(student, teacher, mask)
    # on-policy r = 1: ℓ = −A, mean over the 3 unmasked tokens
    assert loss.item() == pytest.approx((-0.5 + 1.0 - 0.25) / 3)
    assert metrics["kl"] == pytest.approx((-0.5 + 1.0 - 0.25) / 3)  # mean of S − T
    assert metrics["clip_fraction"] == 0.0 and metrics["ratio"] == pytest.approx(1.0)
    loss.backward()
    # ∂L/∂log S = −A / 3 (A detached); the masked token gets nothing
    assert student.grad.tolist()[0] == pytest.approx([-0.5 / 3, 1.0 / 3, -0.25 / 3, 0.0])
    # a gradient-descent step raises log S where the teacher is above the student, lowers it where below
    stepped = student.detach() - student.grad
    assert stepped[0, 0] > student[0, 0] and stepped[0, 2] > student[0, 2] and stepped[0, 1] < student[0, 1]


def test_sampled_token_clipping_is_pessimistic_by_hand():
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher, behaviour = torch.tensor(TEACHER), torch.tensor(BEHAVIOUR)
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, metrics = sampled_token_reverse_kl(student, teacher, mask, behaviour_logprobs=behaviour, clip=0.2)
    # token 0: r=1.65, A>0 -> clipped to 1.2 (ℓ = −0.6); token 1: r=0.61, A<0 -> clipped to 0.8 (ℓ = 0.8);
    # token 2: r=1 (ℓ = −0.25); token 3: r=0.5 < 0.8 but A>0, the unclipped term is smaller (ℓ = −0.5)
    assert loss.item() == pytest.approx((-0.6 + 0.8 - 0.25 - 0.5) / 4)
    assert metrics["clip_fraction"] == pytest.approx(0.5)
    assert metrics["ratio"] == pytest.approx((math.exp(0.5) + math.exp(-0.5) + 1.0 + 0.5) / 4, rel=1e-6)
    loss.backward()
    # clipped tokens get no gradient; ∂ℓ/∂log S = −r·A elsewhere
    assert student.grad.tolist()[0] == pytest.approx([0.0, 0.0, -0.25 / 4, -0.5 / 4])

    unclipped, metrics = sampled_token_reverse_kl(
        student, teacher, mask, behaviour_logprobs=behaviour, clip=None
    )
    expected = -(math.exp(0.5) * 0.5 - math.exp(-0.5) + 0.25 + 0.5) / 4
    assert unclipped.item() == pytest.approx(expected, rel=1e-6) and metrics["clip_fraction"] == 0.0


# --- generalized JSD ------------------------------------------------------------------------------


S3 = [0.5, 0.3, 0.2]
T3 = [0.2, 0.2, 0.6]


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_generalized_jsd_by_hand_on_three_tokens(beta):
    if beta == 0.0:
        expected = kl(T3, S3)  # forward
    elif beta == 1.0:
        expected = kl(S3, T3)  # reverse
    else:
        mixture = [beta * t + (1 - beta) * s for s, t in zip(S3, T3, strict=True)]  # M = βT + (1−β)S
        expected = beta * kl(T3, mixture) + (1 - beta) * kl(S3, mixture)
    assert generalized_jsd(logits_of(S3), logits_of(T3), beta, ONE).item() == pytest.approx(
        expected, rel=1e-5
    )


def test_jsd_limits_are_forward_and_reverse_kl_and_small_beta_scales_forward_kl():
    student, teacher, mask = random_case()
    log_student, log_teacher = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    forward = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)  # (B, T) KL(T‖S)
    reverse = (log_student.exp() * (log_student - log_teacher)).sum(-1)  # (B, T) KL(S‖T)
    count = mask.sum()
    assert generalized_jsd(student, teacher, 0.0, mask).item() == pytest.approx(
        (forward[mask].sum() / count).item()
    )
    assert generalized_jsd(student, teacher, 1.0, mask).item() == pytest.approx(
        (reverse[mask].sum() / count).item()
    )
    # the interpolated formula vanishes at the ends: D_β ≈ β·KL(T‖S) near 0, (1−β)·KL(S‖T) near 1
    small = 1e-6
    near_zero = token_jsd(log_student.double(), log_teacher.double(), small) / small
    near_one = token_jsd(log_student.double(), log_teacher.double(), 1 - small) / small
    assert torch.allclose(near_zero.float(), forward, rtol=1e-3)
    assert torch.allclose(near_one.float(), reverse, rtol=1e-3)
    with pytest.raises(ValueError):
        token_jsd(log_student, log_teacher, 1.5)


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
@pytest.mark.parametrize(
    ("beta", "temperature"), [(0.0, 1.0), (0.1, 1.0), (0.5, 2.0), (0.9, 0.7), (1.0, 1.5)]
)
def test_generalized_jsd_matches_trl_gkd(beta, temperature):
    pytest.importorskip("trl")
    from trl.experimental.gkd import GKDTrainer

    student, teacher, mask = random_case(seed=3, batch=3, length=6, vocabulary=17)
    labels = torch.where(
        mask, torch.zeros_like(mask, dtype=torch.long), torch.full_like(mask, -100, dtype=torch.long)
    )
    ours_logits = student.clone().requires_grad_(True)
    trl_logits = student.clone().requires_grad_(True)
    ours = generalized_jsd(ours_logits, teacher, beta, mask, temperature=temperature)
    theirs = GKDTrainer.generalized_jsd_loss(
        trl_logits, teacher, labels=labels, beta=beta, temperature=temperature
    )
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
    ours.backward()
    theirs.backward()
    assert torch.allclose(ours_logits.grad, trl_logits.grad, rtol=1e-4, atol=1e-7)


# --- top-k + tail ---------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_topk_with_k_equal_vocabulary_is_the_full_jsd(beta):
    student, teacher, mask = random_case(seed=5)
    log_teacher = F.log_softmax(teacher, -1)
    ids = log_teacher.argsort(dim=-1, descending=True)  # (B, T, V): every token
    full_logits = student.clone().requires_grad_(True)
    topk_logits = student.clone().requires_grad_(True)
    full = generalized_jsd(full_logits, teacher, beta, mask)
    top = topk_jsd(topk_logits, ids, log_teacher.gather(-1, ids), beta, mask)
    assert top.item() == pytest.approx(full.item(), rel=1e-5)
    full.backward()
    top.backward()
    assert torch.allclose(topk_logits.grad, full_logits.grad, atol=1e-6)


def test_tail_bucket_by_hand():
    student_probabilities = [0.4, 0.3, 0.2, 0.1]
    ids = torch.tensor([[[1, 2]]])  # the teacher's top 2
    teacher_topk = torch.tensor([[[math.log(0.6), math.log(0.25)]]])
    student, teacher = topk_buckets(logits_of(student_probabilities), ids, teacher_topk)
    assert student.exp().tolist()[0][0] == pytest.approx([0.3, 0.2, 0.5])  # tail = 0.4 + 0.1
    assert teacher.exp().tolist()[0][0] == pytest.approx([0.6, 0.25, 0.15])  # tail = 1 − 0.85
    for beta in (0.0, 1.0):
        expected = (
            kl([0.6, 0.25, 0.15], [0.3, 0.2, 0.5]) if beta == 0.0 else kl([0.3, 0.2, 0.5], [0.6, 0.25, 0.15])
        )
        loss = topk_jsd(logits_of(student_probabilities), ids, teacher_topk, beta, ONE)
        assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_tail_bucket_sees_only_the_tail_mass_and_stays_finite_when_the_teacher_has_none():
    ids = torch.tensor([[[1, 2]]])
    teacher_topk = torch.tensor([[[math.log(0.6), math.log(0.25)]]])
    one = topk_jsd(logits_of([0.4, 0.3, 0.2, 0.1]), ids, teacher_topk, 0.5, ONE)
    moved = topk_jsd(logits_of([0.1, 0.3, 0.2, 0.4]), ids, teacher_topk, 0.5, ONE)  # same tail total
    changed = topk_jsd(logits_of([0.1, 0.6, 0.2, 0.1]), ids, teacher_topk, 0.5, ONE)
    assert moved.item() == pytest.approx(one.item(), rel=1e-6)
    assert changed.item() != pytest.approx(one.item(), rel=1e-3)
    # top-k mass rounding to ≥ 1: the teacher's tail is floored, the reverse KL stays finite
    full_mass = torch.tensor([[[math.log(0.75), math.log(0.25) + 1e-6]]])
    logits = logits_of([0.4, 0.3, 0.2, 0.1]).requires_grad_(True)
    loss = topk_jsd(logits, ids, full_mass, 1.0, ONE)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 10 and torch.isfinite(logits.grad).all()


# --- chunked --------------------------------------------------------------------------------------


def chunk_case(seed=0, batch=3, length=10, hidden=16, vocabulary=1000):
    generator = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(batch, length, hidden, generator=generator)
    weight = torch.randn(vocabulary, hidden, generator=generator) * 0.5
    teacher_hidden = torch.randn(batch, length, hidden, generator=generator)
    teacher_weight = torch.randn(vocabulary, hidden, generator=generator) * 0.5
    mask = torch.rand(batch, length, generator=generator) > 0.4
    return hidden_states, weight, teacher_hidden, teacher_weight, mask


def gradients(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def assert_close(left, right, atol=1e-6):
    assert torch.allclose(left, right, rtol=1e-5, atol=atol), (left - right).abs().max()


@pytest.mark.parametrize(
    ("beta", "temperature", "own_teacher_head"),
    [(0.0, 1.0, True), (0.5, 1.3, True), (1.0, 1.0, False), (1.0, 0.7, True), (0.0, 2.0, False)],
)
def test_chunked_jsd_equals_unchunked_loss_and_gradients(beta, temperature, own_teacher_head):
    hidden_states, weight, teacher_hidden, teacher_weight, mask = chunk_case()
    hidden_states.requires_grad_(True)
    weight.requires_grad_(True)
    teacher_head = teacher_weight if own_teacher_head else weight
    reference = generalized_jsd(
        hidden_states @ weight.T, (teacher_hidden @ teacher_head.T).detach(), beta, mask, temperature
    )
    chunked = chunked_generalized_jsd(
        hidden_states,
        weight,
        teacher_hidden,
        beta,
        mask,
        teacher_lm_head_weight=teacher_weight if own_teacher_head else None,
        temperature=temperature,
        chunk_size=7,
    )
    assert chunked.item() == pytest.approx(reference.item(), rel=1e-5)
    for left, right in zip(
        gradients(chunked, hidden_states, weight), gradients(reference, hidden_states, weight), strict=True
    ):
        assert_close(left, right, atol=1e-5)  # β 0 and 1: the analytic gradient, fp32 rounding ~2e-6 here


@pytest.mark.parametrize("reverse", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_kl_and_grad_equal_autograd_through_token_jsd(reverse, temperature):
    torch.manual_seed(3)
    student_logits = (torch.randn(5, 300) * 4).double().requires_grad_(True)  # the reference in float64
    teacher_logits = torch.randn(5, 300).double() * 4
    student = F.log_softmax(student_logits / temperature, -1)
    teacher = F.log_softmax(teacher_logits / temperature, -1)
    expected = token_jsd(student, teacher, 1.0 if reverse else 0.0)  # (5,), KL ~10 nats
    weights = torch.rand(5).double()
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), student_logits)
    divergence, grad = kl_and_grad(student_logits.detach().float(), teacher_logits.float(), reverse=reverse,
                                   temperature=temperature)
    assert divergence.dtype == grad.dtype == torch.float32
    assert_close(divergence.double(), expected.detach(), atol=2e-5)
    assert_close((grad.double() * weights[:, None]), expected_grad, atol=2e-5)


def test_chunked_topk_equals_unchunked():
    hidden_states, weight, teacher_hidden, teacher_weight, mask = chunk_case(seed=1)
    hidden_states.requires_grad_(True)
    weight.requires_grad_(True)
    teacher = F.log_softmax(teacher_hidden @ teacher_weight.T, -1).topk(20, dim=-1)
    reference = topk_jsd(hidden_states @ weight.T, teacher.indices, teacher.values, 0.5, mask)
    chunked = chunked_topk_jsd(
        hidden_states, weight, teacher.indices, teacher.values, 0.5, mask, chunk_size=4
    )
    assert chunked.item() == pytest.approx(reference.item(), rel=1e-5)
    for left, right in zip(
        gradients(chunked, hidden_states, weight), gradients(reference, hidden_states, weight), strict=True
    ):
        assert_close(left, right, atol=1e-5)  # β 0 and 1: the analytic gradient, fp32 rounding ~2e-6 here


@pytest.mark.parametrize("off_policy", [False, True])
def test_chunked_sampled_token_equals_unchunked(off_policy):
    hidden_states, weight, _, _, mask = chunk_case(seed=2)
    hidden_states.requires_grad_(True)
    weight.requires_grad_(True)
    generator = torch.Generator().manual_seed(7)
    token_ids = torch.randint(0, weight.shape[0], mask.shape, generator=generator)
    log_student = F.log_softmax(hidden_states @ weight.T / 1.1, -1).gather(-1, token_ids[..., None])[..., 0]
    teacher = log_student.detach() + torch.randn(mask.shape, generator=generator)
    behaviour = (
        log_student.detach() + 0.3 * torch.randn(mask.shape, generator=generator) if off_policy else None
    )
    reference, reference_metrics = sampled_token_reverse_kl(
        log_student, teacher, mask, behaviour_logprobs=behaviour
    )
    chunked, metrics = chunked_sampled_token_reverse_kl(
        hidden_states,
        weight,
        token_ids,
        teacher,
        mask,
        behaviour_logprobs=behaviour,
        temperature=1.1,
        chunk_size=5,
    )
    assert chunked.item() == pytest.approx(reference.item(), rel=1e-5)
    assert metrics == pytest.approx(reference_metrics, rel=1e-5)
    if off_policy:
        assert 0 < metrics["clip_fraction"] < 1  # the case exercises clipping
    for left, right in zip(
        gradients(chunked, hidden_states, weight), gradients(reference, hidden_states, weight), strict=True
    ):
        assert_close(left, right)


def test_chunked_head_loss_only_ever_sees_chunks_of_unmasked_rows():
    hidden_states, weight, _, _, mask = chunk_case(seed=3)
    hidden_states.requires_grad_(True)
    seen = []

    def token_loss(logits, positions):
        seen.append(logits.shape)
        return logits.logsumexp(-1), positions.float()

    positions = torch.arange(mask.numel()).view(mask.shape)
    loss, stats = chunked_head_loss(hidden_states, weight, mask, token_loss, [positions], chunk_size=4)
    assert sum(shape[0] for shape in seen) == mask.sum().item() and max(shape[0] for shape in seen) <= 4
    assert all(shape[1] == weight.shape[0] for shape in seen)
    assert torch.equal(stats, torch.where(mask, positions.float(), 0.0))  # statistics back in place
    (grad,) = gradients(loss, hidden_states)
    assert (grad[~mask] == 0).all() and (grad[mask].abs().sum(-1) > 0).all()
    # the lm head frozen (a LoRA student): still the same hidden-state gradient
    reference = masked_mean((hidden_states @ weight.T).logsumexp(-1), mask)
    assert_close(grad, gradients(reference, hidden_states)[0])


def test_chunked_without_grad_and_with_nothing_unmasked():
    hidden_states, weight, teacher_hidden, _, mask = chunk_case(seed=4)
    with torch.no_grad():
        value = chunked_generalized_jsd(hidden_states, weight, teacher_hidden, 1.0, mask, chunk_size=3)
    expected = generalized_jsd(hidden_states @ weight.T, teacher_hidden @ weight.T, 1.0, mask)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    hidden_states.requires_grad_(True)
    empty = chunked_generalized_jsd(hidden_states, weight, teacher_hidden, 1.0, torch.zeros_like(mask))
    (grad,) = gradients(empty, hidden_states)
    assert empty.item() == 0.0 and (grad == 0).all()
