"""The pedagogical fold method: the surprisal-weighted imitation loss by hand and chunked, the widening
surprisal budgets (`learners.policies.play`), and the fold on the tiny model (no teacher pass, replays
counted as spent, what no budget solved left out, learning the teacher's answer, exact resume)."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engines.base import SamplingParams
from engines.hf import HFEngine
from envs.base import Message, StepResult, Trajectory, Turn
from learners import policies
from learners.fold import FoldConfig, FoldItem, fold
from learners.losses import chunked_surprisal_weighted_imitation, surprisal_weighted_imitation
from learners.teacher import Teacher
from tests.tiny import build_model


# ------------------------------------------------------------------------------------ loss
def test_imitation_loss_by_hand():
    logprobs = torch.tensor([[-0.5, -4.0, -8.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True, False]])
    loss, weight = surprisal_weighted_imitation(logprobs, mask, surprisal=2.0)
    # s = 0.5, 4, 8 (the 4th masked); w = 1, 2/4, 2/8; ℓ = 0.5, 2, 2
    assert weight[0, :3].tolist() == pytest.approx([1.0, 0.5, 0.25])
    assert loss.item() == pytest.approx((0.5 + 2.0 + 2.0) / 3)
    loss.backward()
    # ∂L/∂log S = −w / 3: an easy token fully, a hard one gently, a masked one not at all
    assert logprobs.grad[0].tolist() == pytest.approx([-1 / 3, -0.5 / 3, -0.25 / 3, 0.0])
    with pytest.raises(ValueError, match="surprisal"):
        surprisal_weighted_imitation(logprobs, mask, surprisal=0.0)


def test_at_a_large_scale_imitation_is_the_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 9, generator=generator)
    ids = torch.randint(0, 9, (2, 5), generator=generator)
    logprobs = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    mask = torch.ones(2, 5, dtype=torch.bool)
    loss, weight = surprisal_weighted_imitation(logprobs, mask, surprisal=1e6)
    assert torch.all(weight == 1.0)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits.view(-1, 9), ids.view(-1)).item())


def test_the_chunked_imitation_equals_the_plain_one_in_value_gradient_and_metrics():
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 9, 16, generator=generator, requires_grad=True)
    weight = (torch.randn(300, 16, generator=generator) * 0.5).requires_grad_(True)
    ids = torch.randint(0, 300, (2, 9), generator=generator)
    mask = torch.rand(2, 9, generator=generator) > 0.3
    logprobs = torch.log_softmax(hidden @ weight.T, -1).gather(-1, ids[..., None])[..., 0]
    plain, plain_weight = surprisal_weighted_imitation(logprobs, mask, surprisal=4.0)
    chunked, metrics = chunked_surprisal_weighted_imitation(hidden, weight, ids, mask, surprisal=4.0, chunk_size=4)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    assert 0 < metrics["imitation_weight"] < 1  # the case has hard tokens
    assert metrics["imitation_weight"] == pytest.approx(plain_weight[mask].mean().item(), rel=1e-5)
    assert metrics["surprisal"] == pytest.approx((-logprobs)[mask].mean().item(), rel=1e-5)
    for left, right in zip(torch.autograd.grad(chunked, (hidden, weight)), torch.autograd.grad(plain, (hidden, weight)),
                           strict=True):
        assert torch.allclose(left, right, rtol=1e-4, atol=1e-6), (left - right).abs().max()


# ------------------------------------------------------------------------ the method's parts
def test_the_method_composes_its_parts_and_each_part_overrides():
    parts = policies.parts_of(FoldConfig(method="pedagogical"))
    assert (parts.rollout, parts.mask, parts.loss) == ("pedagogical", "completion", "imitation")
    assert not policies.needs_teacher_pass(parts)
    assert FoldConfig(method="pedagogical").loss == "imitation" and FoldConfig().loss == "reverse_kl"
    mixed = policies.parts_of(FoldConfig(method="pedagogical", loss="reverse_kl"))  # pedagogical rollouts, OPSD's loss
    assert mixed.loss == "reverse_kl" and policies.needs_teacher_pass(mixed)
    assert policies.needs_teacher_pass(policies.parts_of(FoldConfig(method="opsd", loss="imitation", mask="relevance")))
    assert policies.surprisal_budgets(parts, FoldConfig(pedagogical_surprisal=[4.0, 1.0])) == [1.0, 4.0, math.inf]
    assert policies.surprisal_budgets(policies.parts_of(FoldConfig()), FoldConfig()) == [None]
    with pytest.raises(ValueError, match="finite number of nats"):
        FoldConfig(pedagogical_surprisal=[1.0, math.inf])
    with pytest.raises(ValueError):
        FoldConfig(pedagogical_surprisal=[])


def scripted(successes: dict[float, set[int]], tokens: int = 5):
    """An `episodes(rows, guided)` that succeeds for the rows listed at the guided call's budget."""
    calls = []

    def episodes(rows, guided):
        budget = guided.budget
        calls.append((budget, list(rows)))
        return [Trajectory(env="t", item_id=str(row), split="train", prompt=[], success=row in successes.get(budget, ()),
                           turns=[Turn(action="x", completion_tokens=tokens)]) for row in rows]

    return episodes, calls


def test_failed_episodes_are_replayed_at_wider_budgets_and_anchors_never(monkeypatch):
    monkeypatch.setattr(policies, "guided_rollout", lambda *args, surprisal=None, **kwargs: type(
        "Guided", (), {"budget": surprisal})())
    config = FoldConfig(method="pedagogical", pedagogical_surprisal=[2.0, 4.0])
    episodes, calls = scripted({2.0: {0}, 4.0: {1}, math.inf: {2}})
    anchors = [False, False, False, False, True]
    final = policies.play(policies.parts_of(config), None, None, config, 0, anchors, episodes)
    assert calls == [(2.0, [0, 1, 2, 3, 4]), (4.0, [1, 2, 3]), (math.inf, [2, 3])]
    assert [t.success for t in final] == [True, True, True, False, False]
    assert [t.info["attempts"] for t in final] == [1, 2, 3, 3, 1]
    assert [t.info["surprisal_budget"] for t in final] == [2.0, 4.0, math.inf, math.inf, 2.0]
    assert [t.info["discarded_tokens"] for t in final] == [0, 5, 10, 10, 0]
    parts = policies.parts_of(config)
    assert [policies.imitated(parts, t, anchor) for t, anchor in zip(final, anchors, strict=True)] == [
        True, True, True, False, True]  # what no budget solved is not imitated; anchors always are
    other = FoldConfig()
    episodes, calls = scripted({})
    final = policies.play(policies.parts_of(other), None, None, other, 0, [False, False], episodes)
    assert calls == [(None, [0, 1])] and all("attempts" not in t.info for t in final)  # one play, as before
    assert policies.imitated(policies.parts_of(other), final[0], False)


# ---------------------------------------------------------------------------- the fold
class AnswerEnvironment:
    """One turn: success when the action holds the secret word, which only the teacher's context names."""

    def __init__(self, family: str, split: str, index: int, word: str) -> None:
        self.family, self.item_id, self.word = family, f"{split}-{index}", word

    def initial_observation(self):
        return [Message(role="user", content="Say the secret word.")]

    def step(self, action: str) -> StepResult:
        found = self.word in action
        return StepResult(observation=[], reward=1.0 if found else 0.0, done=True)


class AnswerFamily:
    success_threshold = 1.0

    def __init__(self, word: str) -> None:
        self.word, self.name = word, "secret"

    def split_size(self, split) -> int:
        return 32

    def make(self, split, index):
        return AnswerEnvironment(self.name, split, index, self.word)


def make_engine(tokenizer):
    return HFEngine(build_model(tokenizer), tokenizer, model_name="tiny", batch_size=8)


def config(**overrides) -> FoldConfig:
    values = dict(method="pedagogical", steps=3, batch_size=4, learning_rate=2e-2, lora_rank=4, lora_alpha=8,
                  checkpoint_every=2, sampling={"temperature": 1.0, "max_new_tokens": 4}, max_turns=1)
    values.update(overrides)
    return FoldConfig(**values)


def secret_setup(tokenizer):
    """A word the tiny teacher can say: the first completion token of its greedy answer with the context."""
    engine = make_engine(tokenizer)
    context = [Message(role="user", content="The secret word is banana."), Message(role="assistant", content="ok")]
    prompt = [*(message.as_dict() for message in context), {"role": "user", "content": "Say the secret word."}]
    greedy = engine.generate([prompt], SamplingParams(max_new_tokens=1))[0]
    return engine, AnswerFamily(greedy.text.strip() or greedy.text), context


def items(family, context, anchors=0):
    return ([FoldItem(family=family.name, index=i, context=context) for i in range(8)]
            + [FoldItem(family=family.name, index=i, anchor=True) for i in range(anchors)])


def answer_log_prob(engine, family) -> float:
    """The student's log-prob of the secret word after the plain prompt (no context)."""
    prompt = engine.encode([{"role": "user", "content": "Say the secret word."}])
    word = engine.tokenizer.encode(family.word, add_special_tokens=False)
    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt + word])).logits[0].float()
    log_probs = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
    return float(log_probs.gather(-1, torch.tensor(word)[:, None]).sum())


def test_a_pedagogical_fold_learns_what_only_the_teacher_knew_without_a_teacher_pass(tiny_tokenizer, tmp_path,
                                                                                   monkeypatch):
    engine, family, context = secret_setup(tiny_tokenizer)
    assert family.word.strip()
    before = answer_log_prob(engine, family)

    def no_teacher_pass(self, views):
        raise AssertionError("the imitation loss runs no teacher pass")

    monkeypatch.setattr(Teacher, "hidden", no_teacher_pass)
    result = fold(engine, {family.name: family}, items(family, context), config(steps=8), tmp_path / "run")
    after = answer_log_prob(engine, family)
    assert after > before + 1.0, (before, after)  # nats
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == list(range(1, 9))
    for record in records:
        assert record["kl"] is None and record["rollouts"] >= record["episodes"] == 4
        assert record["generated_tokens"] >= record["trained_tokens"] - 4 * 1  # replays count; end tokens are trained
        assert 0 <= record["unsolved"] <= 4 and record["surprisal_budget"] >= 2.0
    assert records[0]["teacher_token_share"] > 0  # the teacher wrote the rollouts
    assert result.kl_first is None and Path(result.adapter, "adapter_config.json").is_file()


def test_what_no_budget_solves_is_not_imitated(tiny_tokenizer, tmp_path):
    engine = make_engine(tiny_tokenizer)
    family = AnswerFamily("zqxjv-never")  # nobody says it
    fold(engine, {family.name: family}, items(family, []), config(steps=1), tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["unsolved"] == 4 and record["trained_tokens"] == 0 and record["loss"] == 0.0
    assert record["rollouts"] == 4 * 3  # every item played at 2 nats, at 4, and by the teacher alone
    assert record["surprisal_budget"] == math.inf


def test_anchors_are_played_once_and_imitated(tiny_tokenizer, tmp_path):
    engine = make_engine(tiny_tokenizer)
    family = AnswerFamily("zqxjv-never")
    fold(engine, {family.name: family}, items(family, [], anchors=4), config(steps=1, anchor_fraction=0.5),
         tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["anchors"] == 2 and record["unsolved"] == 2 and record["trained_tokens"] > 0
    assert record["rollouts"] == 2 * 3 + 2


def test_a_killed_pedagogical_fold_resumes_to_the_same_adapter(tiny_tokenizer, tmp_path):
    _, family, context = secret_setup(tiny_tokenizer)
    straight = fold(make_engine(tiny_tokenizer), {family.name: family}, items(family, context), config(steps=4),
                    tmp_path / "straight")

    class Killed(RuntimeError):
        pass

    def kill_at_three(record):
        if record["step"] == 3:
            raise Killed()

    with pytest.raises(Killed):
        fold(make_engine(tiny_tokenizer), {family.name: family}, items(family, context), config(steps=4),
             tmp_path / "killed", on_step=kill_at_three)
    resumed = fold(make_engine(tiny_tokenizer), {family.name: family}, items(family, context), config(steps=4),
                   tmp_path / "killed", resume=True)
    assert resumed.resumed_from == 2
    expected = load_file(str(Path(straight.adapter) / "adapter_model.safetensors"))
    actual = load_file(str(Path(resumed.adapter) / "adapter_model.safetensors"))
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_an_engine_without_guided_generation_is_refused_before_the_fold(tiny_tokenizer, tmp_path):
    from learners.fold import FoldError

    class Plain:  # an engine with no generate_guided (a vLLM server's)
        adapter = None

    with pytest.raises(FoldError, match="pedagogical rollout policy needs an engine with guided generation"):
        fold(Plain(), {}, [FoldItem(family="secret", index=0)], config(), tmp_path / "run")
