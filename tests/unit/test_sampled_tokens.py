"""Trainers train on exactly the tokens the engine sampled, with the log-probs they were sampled with."""

import math

import pytest
import torch

from envs.base import Message, Trajectory, Turn
from learners.losses import sampled_token_reverse_kl
from learners.views import episode_views, sampled_ids, token_view

CONTEXT = [Message(role="user", content="Say the word: apple"), Message(role="assistant", content="apple")]


def _trajectory(tokenizer, text: str, token_ids: list[int], logprobs: list[float]) -> Trajectory:
    return Trajectory(env="toy", item_id="0", split="train", prompt=[Message(role="user", content="what is 2 + 3 ?")],
                      turns=[Turn(action=text, token_ids=token_ids, logprobs=logprobs)])


def test_views_use_the_sampled_ids_and_their_logprobs_where_they_make_the_text(tiny_tokenizer):
    text = "ANSWER : 5"
    canonical = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    # the same text, sampled one character at a time: a tokenisation the text alone would never give
    spelled = [tiny_tokenizer.convert_tokens_to_ids(piece) for piece in tiny_tokenizer.tokenize(text[0])] + \
        tiny_tokenizer(text[1:], add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(spelled) == text and spelled != canonical
    end = tiny_tokenizer.eos_token_id
    logprobs = [-0.5 - 0.1 * i for i in range(len(spelled) + 1)]
    trajectory = _trajectory(tiny_tokenizer, text, spelled + [end], logprobs)
    views = episode_views(tiny_tokenizer, trajectory.messages(), CONTEXT, {end}, sampled=sampled_ids(trajectory))
    for view in (views.student, views.teacher):
        trained = [view.input_ids[p] for p in view.trained_positions]
        assert trained == spelled + [end]  # the sampled ids and the end token, not a re-tokenisation
        assert [view.behaviour[p] for p in view.trained_positions] == pytest.approx(logprobs)
    plain = token_view(tiny_tokenizer, trajectory.messages(), {end})  # without them: the text tokenised
    assert [plain.input_ids[p] for p in plain.trained_positions] == canonical + [end] and plain.behaviour is None


def test_sampled_ids_that_do_not_make_the_text_are_not_used(tiny_tokenizer):
    text = "ANSWER : 5"
    end = tiny_tokenizer.eos_token_id
    other = tiny_tokenizer("apple", add_special_tokens=False)["input_ids"]  # e.g. a completion cut at a stop string
    trajectory = _trajectory(tiny_tokenizer, text, other, [-1.0] * len(other))
    view = token_view(tiny_tokenizer, trajectory.messages(), {end}, sampled=sampled_ids(trajectory))
    assert [view.input_ids[p] for p in view.trained_positions] == \
        tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [end]
    assert view.behaviour is None


def test_unknown_behaviour_logprobs_count_as_on_policy():
    torch.manual_seed(0)
    student = torch.randn(2, 5, requires_grad=True)
    teacher = torch.randn(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    on_policy, _ = sampled_token_reverse_kl(student, teacher, mask)
    unknown, _ = sampled_token_reverse_kl(student, teacher, mask, behaviour_logprobs=torch.full((2, 5), math.nan))
    assert torch.equal(on_policy, unknown)
    (grad_on,) = torch.autograd.grad(on_policy, student)
    (grad_unknown,) = torch.autograd.grad(unknown, student)
    assert torch.equal(grad_on, grad_unknown)
    stale = torch.where(torch.arange(5) < 2, student.detach() - 0.3, torch.full((2, 5), math.nan))
    off, metrics = sampled_token_reverse_kl(student, teacher, mask, behaviour_logprobs=stale)
    assert metrics["ratio"] > 1.0  # the known, older tokens are weighed by their importance ratio


def test_a_fold_with_the_sampled_loss_trains_on_the_behaviour_logprobs(tiny_tokenizer, tmp_path):
    import json

    from engines.hf import HFEngine
    from envs import make_family
    from learners.fold import FoldConfig, FoldItem, fold
    from tests.tiny import build_model

    engine = HFEngine(build_model(tiny_tokenizer), tiny_tokenizer, model_name="tiny", batch_size=8)
    family = make_family("toy")
    items = [FoldItem(family=family.name, index=i, context=CONTEXT) for i in range(8)]
    fold(engine, {family.name: family}, items,
         FoldConfig(steps=2, batch_size=4, learning_rate=5e-3, lora_rank=4, lora_alpha=8, loss="sampled",
                    sampling={"temperature": 1.0, "max_new_tokens": 8}), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2]
    assert all(math.isfinite(record["loss"]) and record["trained_tokens"] > 0 for record in records)


def test_relevance_mask_is_made_on_the_scores_device():
    """RMSD's mask builds its tensors on the device of the scores (a tensor made without a device would
    land on the default one: with CUDA scores, on the CPU). A default device of `meta` stands in."""
    from learners.policies import episode_weights, top_per_episode

    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7])
    with torch.device("meta"):
        mask = top_per_episode(scores, [3, 4], 2)
        weights = episode_weights([3, 4], scores.device)
    assert mask.device == scores.device == weights.device
    assert mask.tolist() == [[False, True, True, False, True, False, True]]
