"""Guided rollouts (HFEngine.generate_guided) on tiny random-weight Llamas: speculative (SKD) and
mixture (TRB) policies against plain generation and plain forward passes."""

import math
from contextlib import contextmanager

import pytest
import torch

from engines.base import GuidedGeneration, SamplingParams
from engines.hf import HFEngine
from engines.prefix import prefix_groups
from envs import make_family
from envs.base import Message
from learners.rollout import run_episodes
from tests.tiny import build_model

PROMPTS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "what is 2 + 3 ? respond with only the final answer ."}],
    [{"role": "system", "content": "the quick brown fox"}, {"role": "user", "content": "say the word : apple"}],
    [{"role": "user", "content": "how many legs does a spider have ?"}],
    [{"role": "user", "content": "CALC ( 12 * 7 )"}],
]
SKILL = {"role": "user", "content": "say the word : banana cherry . ANSWER : 5"}


def teacher_prompts(prompts=PROMPTS):
    """The same prompts with privileged context after the leading system messages."""
    out = []
    for prompt in prompts:
        leading = sum(1 for message in prompt if message["role"] == "system")
        out.append([*prompt[:leading], SKILL, *prompt[leading:]])
    return out


@contextmanager
def swapped(model, other):
    """Run `model` with the weights of `other` (same architecture): a teacher scope."""
    replacement = dict(other.named_parameters())
    saved = {}
    for name, parameter in model.named_parameters():
        saved[name] = parameter.data
        parameter.data = replacement[name].data
    try:
        yield
    finally:
        for name, parameter in model.named_parameters():
            parameter.data = saved[name]


@pytest.fixture()
def other_model(tiny_tokenizer):
    return build_model(tiny_tokenizer, seed=1)


def plain_log_probs(engine: HFEngine, model, prompt, completion: list[int]) -> torch.Tensor:
    """(len(completion), V) log-probs predicting each completion token: an unpadded forward pass."""
    ids = engine.encode(prompt) + completion
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    start = len(ids) - len(completion)
    return log_probs[start - 1: len(ids) - 1]


def chosen(log_probs: torch.Tensor, tokens: list[int]) -> list[float]:
    return log_probs.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1).tolist()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_mixture_at_zero_is_plain_generation(tiny_engine, other_model, temperature):
    params = SamplingParams(max_new_tokens=12, temperature=temperature, seed=7)
    plain = tiny_engine.generate(PROMPTS, params)
    guided = tiny_engine.generate_guided(PROMPTS, teacher_prompts(), params, policy="mixture", mix=0.0,
                                         teacher_scope=lambda: swapped(tiny_engine.model, other_model))
    for expected, output in zip(plain, guided, strict=True):
        assert isinstance(output, GuidedGeneration)
        assert output.token_ids == expected.token_ids and output.text == expected.text
        assert output.logprobs == pytest.approx(expected.logprobs, abs=1e-6)
        assert output.behaviour_logprobs == pytest.approx(expected.logprobs, abs=1e-5)
        assert output.sources == [0] * len(output.token_ids)
        assert output.prompt_tokens == expected.prompt_tokens


def test_speculative_with_full_top_k_never_uses_the_teacher(tiny_engine, tiny_tokenizer, other_model):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3)
    plain = tiny_engine.generate(PROMPTS, params)
    guided = tiny_engine.generate_guided(PROMPTS, teacher_prompts(), params, policy="speculative",
                                         top_k=len(tiny_tokenizer),
                                         teacher_scope=lambda: swapped(tiny_engine.model, other_model))
    for expected, output in zip(plain, guided, strict=True):
        assert output.token_ids == expected.token_ids
        assert sum(output.sources) == 0
        assert output.behaviour_logprobs == pytest.approx(output.logprobs, abs=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("teacher_kind", ["context", "weights"])
def test_speculative_top_1_keeps_only_teacher_top_tokens(tiny_engine, other_model, temperature, teacher_kind):
    """Teacher = the student's weights with context in its prompt, or other weights as well."""
    params = SamplingParams(max_new_tokens=10, temperature=temperature, seed=5)
    teachers = teacher_prompts()
    teacher_model = tiny_engine.model if teacher_kind == "context" else other_model
    scope = None if teacher_kind == "context" else (lambda: swapped(tiny_engine.model, other_model))
    guided = tiny_engine.generate_guided(PROMPTS, teachers, params, policy="speculative", top_k=1,
                                         teacher_scope=scope)
    assert sum(sum(output.sources) for output in guided) > 0
    if teacher_kind == "context" and temperature == 0:  # both branches happen
        assert 0 in [source for output in guided for source in output.sources]
    for prompt, teacher_prompt, output in zip(PROMPTS, teachers, guided, strict=True):
        student = plain_log_probs(tiny_engine, tiny_engine.model, prompt, output.token_ids)
        teacher = plain_log_probs(tiny_engine, teacher_model, teacher_prompt, output.token_ids)
        assert output.logprobs == pytest.approx(chosen(student, output.token_ids), abs=1e-4)
        assert output.teacher_logprobs == pytest.approx(chosen(teacher, output.token_ids), abs=1e-4)
        for position, (token, source) in enumerate(zip(output.token_ids, output.sources, strict=True)):
            teacher_top = int(teacher[position].argmax())
            student_top = int(student[position].argmax())
            if source == 0:  # accepted: the student's proposal is the teacher's top-1
                assert token == teacher_top
            elif temperature == 0:  # rejected: the greedy teacher's replacement
                assert student_top != teacher_top and token == teacher_top
            # μ(y) = S(y)·[y = top1 T] + (1 − S(top1 T))·T(y)
            accepted_mass = float(student[position, teacher_top].exp())
            expected = (accepted_mass if token == teacher_top else 0.0) + (1 - accepted_mass) * float(
                teacher[position, token].exp())
            assert output.behaviour_logprobs[position] == pytest.approx(float(torch.tensor(expected).log()), abs=1e-4)


def test_mixture_at_one_samples_from_the_teacher(tiny_engine, tiny_tokenizer, other_model):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=9)
    teachers = teacher_prompts()
    guided = tiny_engine.generate_guided(PROMPTS, teachers, params, policy="mixture", mix=1.0,
                                         teacher_scope=lambda: swapped(tiny_engine.model, other_model))
    teacher_alone = HFEngine(other_model, tiny_tokenizer, batch_size=4).generate(teachers, params)
    for prompt, output, expected in zip(PROMPTS, guided, teacher_alone, strict=True):
        assert output.token_ids == expected.token_ids
        assert output.behaviour_logprobs == pytest.approx(expected.logprobs, abs=1e-4)
        assert output.teacher_logprobs == pytest.approx(expected.logprobs, abs=1e-4)
        student = chosen(plain_log_probs(tiny_engine, tiny_engine.model, prompt, output.token_ids), output.token_ids)
        assert output.logprobs == pytest.approx(student, abs=1e-4)
        # a teacher token: the teacher likes it better than the student does
        assert output.sources == [int(t > s) for t, s in zip(output.teacher_logprobs, output.logprobs, strict=True)]


def test_mixture_behaviour_is_the_geometric_mixture(tiny_engine, other_model):
    mix = 0.3
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=2)
    teachers = teacher_prompts()
    guided = tiny_engine.generate_guided(PROMPTS, teachers, params, policy="mixture", mix=mix,
                                         teacher_scope=lambda: swapped(tiny_engine.model, other_model))
    for prompt, teacher_prompt, output in zip(PROMPTS, teachers, guided, strict=True):
        student = plain_log_probs(tiny_engine, tiny_engine.model, prompt, output.token_ids)
        teacher = plain_log_probs(tiny_engine, other_model, teacher_prompt, output.token_ids)
        mixture = torch.log_softmax((1 - mix) * student + mix * teacher, dim=-1)
        assert output.behaviour_logprobs == pytest.approx(chosen(mixture, output.token_ids), abs=1e-4)
        assert output.logprobs == pytest.approx(chosen(student, output.token_ids), abs=1e-4)
        assert output.teacher_logprobs == pytest.approx(chosen(teacher, output.token_ids), abs=1e-4)


def test_teacher_weights_of_a_fold_serve_the_teacher_view(tiny_tokenizer):
    """With the fold's Teacher scope (the adapter's state at the start: the base model), mix 1 is the base."""
    from learners.fold import FoldConfig
    from learners.student import attach_student
    from learners.teacher import Teacher

    engine = HFEngine(build_model(tiny_tokenizer), tiny_tokenizer, batch_size=4)
    student = attach_student(engine.lend_base().model, FoldConfig(lora_rank=4, lora_alpha=8), None)
    teacher = Teacher(student, FoldConfig())
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    engine.serve_trained(student.eval())
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=4)
    base = HFEngine(build_model(tiny_tokenizer), tiny_tokenizer, batch_size=4).generate(PROMPTS, params)
    guided = engine.generate_guided(PROMPTS, PROMPTS, params, policy="mixture", mix=1.0,
                                    teacher_scope=teacher._teacher_weights)
    assert [output.token_ids for output in guided] == [output.token_ids for output in base]
    # the scope restored the trained adapter: the student view is the student
    student_only = engine.generate(PROMPTS, params)
    mixed_zero = engine.generate_guided(PROMPTS, PROMPTS, params, policy="mixture", mix=0.0,
                                        teacher_scope=teacher._teacher_weights)
    assert [output.token_ids for output in mixed_zero] == [output.token_ids for output in student_only]
    assert [output.token_ids for output in student_only] != [output.token_ids for output in base]


def test_stops_drop_rows_from_both_views(tiny_engine, tiny_tokenizer, other_model):
    greedy = SamplingParams(max_new_tokens=16)
    full = tiny_engine.generate(PROMPTS, greedy)
    stop = full[0].text[4:7]
    assert stop and stop in full[0].text
    params = SamplingParams(max_new_tokens=16, stop=(stop,))
    plain = tiny_engine.generate(PROMPTS, params)
    guided = tiny_engine.generate_guided(PROMPTS, teacher_prompts(), params, policy="speculative",
                                         top_k=len(tiny_tokenizer),
                                         teacher_scope=lambda: swapped(tiny_engine.model, other_model))
    assert guided[0].finish_reason == "stop" and guided[0].text == full[0].text[: full[0].text.find(stop)]
    assert len({len(output.token_ids) for output in guided}) > 1  # rows finished at different steps
    for expected, output in zip(plain, guided, strict=True):
        assert output.token_ids == expected.token_ids and output.finish_reason == expected.finish_reason
        assert output.text == expected.text
    # with the teacher steering, every row's log-probs still match plain forwards after rows dropped
    steered = tiny_engine.generate_guided(PROMPTS, teacher_prompts(), params, policy="speculative", top_k=1,
                                          teacher_scope=lambda: swapped(tiny_engine.model, other_model))
    for prompt, teacher_prompt, output in zip(PROMPTS, teacher_prompts(), steered, strict=True):
        student = plain_log_probs(tiny_engine, tiny_engine.model, prompt, output.token_ids)
        teacher = plain_log_probs(tiny_engine, other_model, teacher_prompt, output.token_ids)
        assert output.logprobs == pytest.approx(chosen(student, output.token_ids), abs=1e-4)
        assert output.teacher_logprobs == pytest.approx(chosen(teacher, output.token_ids), abs=1e-4)


def test_min_tokens_in_guided_rollouts_matches_plain_generation(tiny_engine, tiny_tokenizer, other_model):
    free = tiny_engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, temperature=1.0, seed=3))
    tiny_engine.stop_ids = {token for output in free for token in output.token_ids[:3]}
    params = SamplingParams(max_new_tokens=16, min_tokens=10, temperature=1.0, seed=3)
    plain = tiny_engine.generate(PROMPTS, params)
    guided = tiny_engine.generate_guided(PROMPTS, teacher_prompts(), params, policy="speculative",
                                         top_k=len(tiny_tokenizer),
                                         teacher_scope=lambda: swapped(tiny_engine.model, other_model))
    for prompt, teacher_prompt, expected, output in zip(PROMPTS, teacher_prompts(), plain, guided, strict=True):
        assert output.token_ids == expected.token_ids and len(output.token_ids) >= 10
        assert not set(output.token_ids[:10]) & tiny_engine.stop_ids
        student = plain_log_probs(tiny_engine, tiny_engine.model, prompt, output.token_ids)
        teacher = plain_log_probs(tiny_engine, other_model, teacher_prompt, output.token_ids)
        assert output.logprobs == pytest.approx(chosen(student, output.token_ids), abs=1e-4)
        assert output.teacher_logprobs == pytest.approx(chosen(teacher, output.token_ids), abs=1e-4)


def test_guided_rejects_bad_arguments(tiny_engine):
    params = SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match="2 student prompts but 1 teacher"):
        tiny_engine.generate_guided(PROMPTS[:2], PROMPTS[:1], params, policy="mixture")
    with pytest.raises(ValueError, match="top_k"):
        tiny_engine.generate_guided(PROMPTS[:1], PROMPTS[:1], params, policy="speculative", top_k=0)
    with pytest.raises(ValueError, match="mix"):
        tiny_engine.generate_guided(PROMPTS[:1], PROMPTS[:1], params, policy="mixture", mix=1.5)


def test_run_episodes_with_a_guided_policy_records_teacher_tokens(tiny_engine, other_model):
    family = make_family("toy")
    context = [Message(role="user", content="Say the word: apple"), Message(role="assistant", content="apple")]
    seen = []

    def guided(student_chats, teacher_chats, params):
        seen.append((student_chats, teacher_chats))
        return tiny_engine.generate_guided(student_chats, teacher_chats, params, policy="speculative", top_k=1,
                                           teacher_scope=lambda: swapped(tiny_engine.model, other_model))

    environments = [family.make("train", index) for index in range(3)]
    trajectories = run_episodes(tiny_engine, environments, SamplingParams(max_new_tokens=6, temperature=1.0),
                                split="train", teacher_contexts=[context] * 3, guided=guided)
    student_chats, teacher_chats = seen[0]
    assert student_chats[0] == [m.as_dict() for m in trajectories[0].messages()][: len(student_chats[0])]
    leading = sum(1 for message in student_chats[0] if message["role"] == "system")
    assert teacher_chats[0] == [*student_chats[0][:leading], *(m.as_dict() for m in context),
                                *student_chats[0][leading:]]
    turns = [turn for trajectory in trajectories for turn in trajectory.turns]
    assert turns and all(turn.info["generated_tokens"] == turn.completion_tokens for turn in turns)
    assert sum(turn.info["teacher_tokens"] for turn in turns) > 0
    assert all("correct" in turn.info for turn in turns)  # the environment's info is kept too
    plain = run_episodes(tiny_engine, [family.make("train", 0)], SamplingParams(max_new_tokens=6), split="train")
    assert "teacher_tokens" not in plain[0].turns[0].info


def test_an_external_teacher_model_serves_the_teacher_view(tiny_engine, other_model):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=6)
    swapped_in = tiny_engine.generate_guided(PROMPTS, teacher_prompts(), params, policy="speculative", top_k=3,
                                             teacher_scope=lambda: swapped(tiny_engine.model, other_model))
    external = tiny_engine.generate_guided(PROMPTS, teacher_prompts(), params, policy="speculative", top_k=3,
                                           teacher_model=other_model)
    for first, second in zip(swapped_in, external, strict=True):
        assert first.token_ids == second.token_ids and first.sources == second.sources
        assert first.behaviour_logprobs == pytest.approx(second.behaviour_logprobs, abs=1e-5)


def test_shared_prefixes_run_in_each_views_own_weights(tiny_engine, other_model):
    """Prompts sharing a long system prompt: each view runs the prefix once, the teacher's under its scope."""
    system = {"role": "system", "content": "rule : call CALC ( a * b ) then answer . " * 4}
    prompts = [[system, *prompt] for prompt in PROMPTS if prompt[0]["role"] != "system"]
    teachers = teacher_prompts(prompts)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=2)
    rows = [tiny_engine.encode(p) for p in teachers]
    assert any(prefix for _, prefix in prefix_groups(rows, [len(r) - 1 for r in rows], 16))  # shared here
    guided = tiny_engine.generate_guided(prompts, teachers, params, policy="speculative", top_k=2,
                                         teacher_scope=lambda: swapped(tiny_engine.model, other_model))
    for prompt, teacher, output in zip(prompts, teachers, guided, strict=True):
        student = plain_log_probs(tiny_engine, tiny_engine.model, prompt, output.token_ids)
        reference = plain_log_probs(tiny_engine, other_model, teacher, output.token_ids)
        assert output.logprobs == pytest.approx(chosen(student, output.token_ids), abs=1e-4)
        assert output.teacher_logprobs == pytest.approx(chosen(reference, output.token_ids), abs=1e-4)


def test_pedagogical_without_a_limit_samples_from_the_teacher(tiny_engine, tiny_tokenizer, other_model):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=9)
    teachers = teacher_prompts()
    guided = tiny_engine.generate_guided(PROMPTS, teachers, params, policy="pedagogical",
                                         teacher_scope=lambda: swapped(tiny_engine.model, other_model))
    teacher_alone = HFEngine(other_model, tiny_tokenizer, batch_size=4).generate(teachers, params)
    for prompt, output, expected in zip(PROMPTS, guided, teacher_alone, strict=True):
        assert output.token_ids == expected.token_ids
        assert output.sources == [1] * len(output.token_ids)  # every proposal kept
        assert output.behaviour_logprobs == pytest.approx(expected.logprobs, abs=1e-4)
        student = chosen(plain_log_probs(tiny_engine, tiny_engine.model, prompt, output.token_ids), output.token_ids)
        assert output.logprobs == pytest.approx(student, abs=1e-4)


def test_pedagogical_at_zero_surprisal_is_the_student_alone(tiny_engine, other_model):
    """No teacher token is plausible enough at 0 nats (the student's log-prob of any token is < 0)."""
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3)
    guided = tiny_engine.generate_guided(PROMPTS, teacher_prompts(), params, policy="pedagogical", surprisal=0.0,
                                         teacher_scope=lambda: swapped(tiny_engine.model, other_model))
    for output in guided:
        assert sum(output.sources) == 0
        assert output.behaviour_logprobs == pytest.approx(output.logprobs, abs=1e-5)  # μ = S when A is empty


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_pedagogical_keeps_a_teacher_token_only_within_the_students_surprisal(tiny_engine, other_model, temperature):
    surprisal = 6.0
    params = SamplingParams(max_new_tokens=10, temperature=temperature, seed=5)
    teachers = teacher_prompts()
    guided = tiny_engine.generate_guided(PROMPTS, teachers, params, policy="pedagogical", surprisal=surprisal,
                                         teacher_scope=lambda: swapped(tiny_engine.model, other_model))
    sources = [source for output in guided for source in output.sources]
    assert 0 in sources and 1 in sources  # both branches happen
    for prompt, teacher_prompt, output in zip(PROMPTS, teachers, guided, strict=True):
        student = plain_log_probs(tiny_engine, tiny_engine.model, prompt, output.token_ids)
        teacher = plain_log_probs(tiny_engine, other_model, teacher_prompt, output.token_ids)
        assert output.teacher_logprobs == pytest.approx(chosen(teacher, output.token_ids), abs=1e-4)
        for position, (token, source) in enumerate(zip(output.token_ids, output.sources, strict=True)):
            plausible = student[position] >= -surprisal  # A
            if source == 1:  # a kept proposal: plausible to the student
                assert bool(plausible[token])
                if temperature == 0:
                    assert token == int(teacher[position].argmax())
            elif temperature == 0:  # the greedy teacher's choice was refused: the greedy student's
                assert not bool(plausible[int(teacher[position].argmax())])
                assert token == int(student[position].argmax())
            # μ(y) = T(y)·[y ∈ A] + T(V ∖ A)·S(y)
            teacher_probs, student_probs = teacher[position].exp(), student[position].exp()
            expected = (float(teacher_probs[token]) if bool(plausible[token]) else 0.0) + float(
                teacher_probs[~plausible].sum()) * float(student_probs[token])
            assert output.behaviour_logprobs[position] == pytest.approx(math.log(expected), abs=1e-4)


def test_pedagogical_rejects_a_negative_surprisal(tiny_engine):
    with pytest.raises(ValueError, match="surprisal"):
        tiny_engine.generate_guided(PROMPTS[:1], PROMPTS[:1], SamplingParams(max_new_tokens=2),
                                    policy="pedagogical", surprisal=-1.0)
