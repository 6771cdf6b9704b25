"""The fold loop on a tiny random-weight Llama and the toy family: learning, exact resume, NaN stop."""

import importlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engines.base import LentBase
from engines.hf import HFEngine
from engines.prefix import prefix_groups
from envs import make_family
from envs.base import Message
from learners.fold import FoldConfig, FoldError, FoldItem, fold
from learners.teacher import Teacher, _merged
from learners.views import episode_views
from tests.tiny import build_model

fold_module = importlib.import_module("learners.fold")  # the module (learners exports the function `fold`)
passes = importlib.import_module("learners.passes")
policies = importlib.import_module("learners.policies")

CONTEXT = [Message(role="user", content="Say the word: apple"), Message(role="assistant", content="apple")]


def make_engine(tokenizer):
    return HFEngine(build_model(tokenizer), tokenizer, model_name="tiny", batch_size=8)


def config(**overrides) -> FoldConfig:
    values = dict(steps=4, batch_size=4, learning_rate=5e-3, lora_rank=4, lora_alpha=8, checkpoint_every=2,
                  sampling={"temperature": 1.0, "max_new_tokens": 8})
    values.update(overrides)
    return FoldConfig(**values)


def items(family, count=12, anchors=0):
    skilled = [FoldItem(family=family.name, index=i, context=CONTEXT) for i in range(count)]
    return skilled + [FoldItem(family=family.name, index=i, anchor=True) for i in range(anchors)]


def heldout_kl(engine, family) -> float:
    """Mean student-teacher reverse KL over trained tokens of fixed greedy eval episodes."""
    from engines.base import SamplingParams
    from learners.rollout import run_episodes

    environments = [family.make("eval", index) for index in range(6)]
    trajectories = run_episodes(engine, environments, SamplingParams(max_new_tokens=8), split="eval")
    total, count = 0.0, 0
    for trajectory in trajectories:
        views = episode_views(engine.tokenizer, trajectory.messages(), CONTEXT, engine.stop_ids)
        with torch.no_grad():
            s = torch.log_softmax(engine.model(torch.tensor([views.student.input_ids])).logits[0].float(), -1)
            t = torch.log_softmax(engine.base_model(torch.tensor([views.teacher.input_ids])).logits[0].float(), -1)
        for ps, pt in zip(views.student.trained_positions, views.teacher.trained_positions, strict=True):
            total += float((s[ps - 1].exp() * (s[ps - 1] - t[pt - 1])).sum())
            count += 1
    return total / count


def test_views_train_the_same_tokens_and_not_the_context(tiny_tokenizer):
    messages = [Message(role="user", content="Say the word: river"), Message(role="assistant", content="river"),
                Message(role="user", content="again"), Message(role="assistant", content="river river")]
    views = episode_views(tiny_tokenizer, messages, CONTEXT, {tiny_tokenizer.eos_token_id})
    student = [views.student.input_ids[p] for p in views.student.trained_positions]
    teacher = [views.teacher.input_ids[p] for p in views.teacher.trained_positions]
    assert student == teacher
    assert tiny_tokenizer.decode(student) == "river<|im_end|>river river<|im_end|>"
    assert len(views.teacher.input_ids) > len(views.student.input_ids)
    # the teacher's own length limit drops context, never the episode
    short = episode_views(tiny_tokenizer, messages, CONTEXT, {tiny_tokenizer.eos_token_id},
                          teacher_max_tokens=len(views.student.input_ids))
    assert short.context_messages_kept == 0 and short.teacher.input_ids == views.student.input_ids


def test_fold_moves_the_student_toward_the_teacher(tiny_tokenizer, tmp_path):
    engine = make_engine(tiny_tokenizer)
    family = make_family("toy")
    before = heldout_kl(engine, family)
    result = fold(engine, {family.name: family}, items(family), config(steps=10), tmp_path / "run")
    assert engine.adapter == result.adapter and Path(result.adapter, "adapter_config.json").is_file()
    after = heldout_kl(engine, family)
    assert after < before * 0.8, (before, after)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 10


def test_adapter_is_a_standard_peft_directory(tiny_tokenizer, tmp_path):
    from peft import PeftModel

    engine = make_engine(tiny_tokenizer)
    family = make_family("toy")
    result = fold(engine, {family.name: family}, items(family), config(steps=2), tmp_path / "run")
    model = PeftModel.from_pretrained(build_model(tiny_tokenizer), result.adapter)
    assert sum("lora" in name for name, _ in model.named_parameters()) > 0


class Killed(RuntimeError):
    pass


@pytest.mark.parametrize("teacher", ["self-frozen", "self-ema"])
def test_a_killed_fold_resumes_exactly(tiny_tokenizer, tmp_path, teacher):
    family = make_family("toy:2")
    straight = fold(make_engine(tiny_tokenizer), {family.name: family}, items(family, anchors=4),
                    config(anchor_fraction=0.25, teacher=teacher), tmp_path / "straight")

    def kill_at_three(record):
        if record["step"] == 3:
            raise Killed()

    with pytest.raises(Killed):
        fold(make_engine(tiny_tokenizer), {family.name: family}, items(family, anchors=4),
             config(anchor_fraction=0.25, teacher=teacher), tmp_path / "killed", on_step=kill_at_three)
    assert (tmp_path / "killed" / "step-000002" / "state.json").is_file()
    resumed = fold(make_engine(tiny_tokenizer), {family.name: family}, items(family, anchors=4),
                   config(anchor_fraction=0.25, teacher=teacher), tmp_path / "killed", resume=True)
    assert resumed.resumed_from == 2
    expected = load_file(str(Path(straight.adapter) / "adapter_model.safetensors"))
    actual = load_file(str(Path(resumed.adapter) / "adapter_model.safetensors"))
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name  # bit for bit (tests/unit/test_resume.py)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tiny_tokenizer, tmp_path, monkeypatch):
    engine = make_engine(tiny_tokenizer)
    family = make_family("toy")
    real = policies.chunked_generalized_jsd
    done = {"steps": 0}

    def poisoned(*args, **kwargs):
        value = real(*args, **kwargs)
        return value * float("nan") if done["steps"] >= 2 else value

    def count(record):
        done["steps"] = record["step"]

    monkeypatch.setattr(policies, "chunked_generalized_jsd", poisoned)
    with pytest.raises(FoldError, match="loss became nan at step 3"):
        fold(engine, {family.name: family}, items(family), config(steps=4), tmp_path / "run", on_step=count)
    assert (tmp_path / "run" / "step-000002").is_dir()
    assert not (tmp_path / "run" / "step-000003").exists()


@pytest.mark.parametrize("method", ["speculative", "trb"])
def test_guided_methods_fold_and_log_the_teacher_token_share(tiny_tokenizer, tmp_path, method):
    import json

    engine = make_engine(tiny_tokenizer)
    family = make_family("toy")
    result = fold(engine, {family.name: family}, items(family, anchors=2),
                  config(steps=2, method=method, trb_mix=1.0, trb_warmup_steps=2, speculative_top_k=1,
                         anchor_fraction=0.25), tmp_path / "run")
    assert Path(result.adapter, "adapter_config.json").is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2]
    for record in records:
        assert 0.0 <= record["teacher_token_share"] <= 1.0 and record["loss"] == record["loss"]
    assert records[0]["teacher_token_share"] > 0
    if method == "trb":
        assert [record["trb_mix"] for record in records] == [1.0, 0.5]


def test_speculative_fold_with_an_external_teacher(tiny_tokenizer, tmp_path):
    import json

    engine = make_engine(tiny_tokenizer)
    family = make_family("toy")
    fold(engine, {family.name: family}, items(family), config(steps=1, method="speculative", teacher="external",
                                                               speculative_top_k=1), tmp_path / "run",
         external_teacher=build_model(tiny_tokenizer, seed=1))
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["teacher_token_share"] > 0


def test_trb_anneals_to_pure_student_rollouts(tiny_tokenizer, tmp_path):
    from learners.policies import mixture_weight as trb_mix_at

    schedule = config(method="trb", trb_mix=0.6, trb_warmup_steps=3)
    assert [trb_mix_at(schedule, step) for step in range(5)] == pytest.approx([0.6, 0.4, 0.2, 0.0, 0.0])
    assert policies.guided_rollout(policies.parts_of(schedule), make_engine(tiny_tokenizer), None, schedule, 3) is None
    assert trb_mix_at(config(method="trb", trb_warmup_steps=0), 0) == 0.0


def test_no_items_is_a_clear_error(tiny_tokenizer, tmp_path):
    with pytest.raises(FoldError, match="no fold prompts"):
        fold(make_engine(tiny_tokenizer), {}, [], config(), tmp_path / "run")


def test_measure_kl_falls_after_a_fold_and_eval_items_are_never_folded(tiny_tokenizer, tmp_path):
    from learners.fold import FoldError, measure_kl

    engine = make_engine(tiny_tokenizer)
    family = make_family("toy")
    greedy = config(sampling={"max_new_tokens": 8})
    held_out = [FoldItem(family=family.name, index=i, context=CONTEXT, split="eval") for i in range(6)]
    before = measure_kl(engine, {family.name: family}, held_out, greedy)
    assert before["tokens"] > 0 and before["kl"] > 0
    with pytest.raises(FoldError, match="train-split"):
        fold(engine, {family.name: family}, held_out, config(steps=1), tmp_path / "refused")
    fold(engine, {family.name: family}, items(family), config(steps=10), tmp_path / "run")
    after = measure_kl(engine, {family.name: family}, held_out, greedy)
    assert engine.adapter is not None  # measuring put the adapter back
    assert after["kl"] < before["kl"] * 0.8, (before, after)


def test_episode_normalization_weighs_every_episode_equally(tiny_tokenizer, tmp_path):
    from learners.policies import episode_weights as _episode_weights

    weights = _episode_weights([1, 3], "cpu")
    assert torch.allclose(weights, torch.tensor([[1.0, 1 / 3, 1 / 3, 1 / 3]]))
    losses = torch.tensor([[4.0, 1.0, 1.0, 1.0]])  # episode means 4 and 1
    assert float((losses * weights).sum() / weights.sum()) == pytest.approx(2.5)  # not the token mean 1.75
    engine = make_engine(tiny_tokenizer)
    family = make_family("toy")
    before = heldout_kl(engine, family)
    fold(engine, {family.name: family}, items(family), config(steps=10, normalize="episode"), tmp_path / "run")
    assert heldout_kl(engine, family) < before * 0.8


def test_gradient_checkpointing_gives_the_same_update(tiny_tokenizer, tmp_path):
    from learners.passes import checkpointing

    results = []
    for recompute in (False, True):
        engine = make_engine(tiny_tokenizer)
        family = make_family("toy")
        fold(engine, {family.name: family}, items(family),
             config(steps=2, gradient_checkpointing=recompute), tmp_path / f"run-{recompute}")
        losses = [json.loads(line)["loss"] for line in (tmp_path / f"run-{recompute}" / "metrics.jsonl").open()]
        results.append(losses)
        assert not checkpointing(engine.base_model)  # serving is unaffected
    assert results[0] == pytest.approx(results[1], rel=1e-4, abs=1e-6)
    from learners.student import attach_student

    student = attach_student(build_model(tiny_tokenizer), config(gradient_checkpointing=True), None)
    assert checkpointing(student)


def test_prefix_groups_by_hand():
    sequences = [[1, 2, 3, 4, 9], [1, 2, 3, 5, 9], [7, 7, 7], [1, 2, 3, 4, 8], [7, 7, 6]]
    groups = prefix_groups(sequences, limits=[10] * 5, min_prefix=2)
    assert sorted((sorted(rows), prefix) for rows, prefix in groups) == [([0, 1, 3], 3), ([2, 4], 2)]
    # a limit (the first wanted position) cuts the prefix; under min_prefix a row stands alone
    groups = prefix_groups(sequences, limits=[10, 10, 1, 10, 10], min_prefix=2)
    assert sorted((sorted(rows), prefix) for rows, prefix in groups) == [([0, 1, 3], 3), ([2], 0), ([4], 0)]
    assert prefix_groups([[1, 2]], [5], 1) == [([0], 0)]


def test_shared_prefix_forward_equals_the_plain_one(tiny_tokenizer):
    model = build_model(tiny_tokenizer).eval()
    torch.manual_seed(0)
    shared = torch.randint(5, 300, (20,)).tolist()
    sequences = [shared + torch.randint(5, 300, (n,)).tolist() for n in (6, 11, 3)]
    sequences += [torch.randint(5, 300, (14,)).tolist(), shared[:10] + [1, 2, 3, 4, 5, 6]]
    positions = [list(range(len(seq) - 3, len(seq))) for seq in sequences]
    positions[1] = [21, 25, 30]
    expected = passes.hidden_at(model, sequences, positions)
    got = passes.shared_prefix_hidden_at(model, sequences, positions, min_prefix=4)
    groups = prefix_groups(sequences, [min(p) - 1 for p in positions], 4)
    assert any(prefix >= 10 and len(rows) >= 3 for rows, prefix in groups)  # the shared path ran
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)


def lora_student(tokenizer):
    from learners.student import attach_student

    student = attach_student(build_model(tokenizer), FoldConfig(lora_rank=4, lora_alpha=8), None)
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    return student


def test_shared_prefix_student_pass_has_the_plain_passes_values_and_gradients(tiny_tokenizer):
    student = lora_student(tiny_tokenizer).train()
    torch.manual_seed(1)
    shared = torch.randint(5, 300, (24,)).tolist()
    sequences = [shared + torch.randint(5, 300, (n,)).tolist() for n in (7, 12, 4)] + [torch.randint(5, 300, (9,)).tolist()]
    positions = [list(range(len(seq) - 3, len(seq))) for seq in sequences]
    trained = [parameter for parameter in student.parameters() if parameter.requires_grad]

    def run(function):
        student.zero_grad(set_to_none=True)
        hidden = function(student, sequences, positions)
        (hidden.pow(2).sum() + hidden[:, :3].sum()).backward()
        return hidden.detach(), [parameter.grad.clone() for parameter in trained]

    plain, plain_grads = run(passes.hidden_at)
    shared_hidden, shared_grads = run(lambda *a: passes.shared_prefix_hidden_at(*a, min_prefix=8))
    assert any(prefix >= 20 for _, prefix in prefix_groups(sequences, [min(p) - 1 for p in positions], 8))
    assert torch.allclose(shared_hidden, plain, atol=1e-5)
    for expected, got in zip(plain_grads, shared_grads, strict=True):
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows_per_pass", [1, 2, 0])
def test_passes_give_the_whole_batchs_gradients(tiny_tokenizer, rows_per_pass):
    student = lora_student(tiny_tokenizer).train()
    torch.manual_seed(2)
    shared = torch.randint(5, 300, (24,)).tolist()
    sequences = [shared + torch.randint(5, 300, (n,)).tolist() for n in (7, 12, 4, 9)]
    sequences += [torch.randint(5, 300, (9,)).tolist(), torch.randint(5, 300, (6,)).tolist()]
    positions = [list(range(len(seq) - 3, len(seq))) for seq in sequences]
    trained = [parameter for parameter in student.parameters() if parameter.requires_grad]
    projection = torch.randn(student.config.hidden_size)

    def row_loss(hidden):  # (n, H) -> a scalar that is a sum over positions
        return (hidden.pow(2).sum(-1) + hidden @ projection).sum()

    student.zero_grad(set_to_none=True)
    row_loss(passes.hidden_at(student, sequences, positions)).backward()
    expected = [parameter.grad.clone() for parameter in trained]
    student.zero_grad(set_to_none=True)
    seen = []

    def loss_of(rows, hidden):
        seen.append(list(rows))
        assert hidden.shape[0] == sum(len(positions[row]) for row in rows)
        return row_loss(hidden)

    passes.backward_in_passes(student, sequences, positions, rows_per_pass, loss_of, min_prefix=8)
    assert sorted(row for rows in seen for row in rows) == list(range(len(sequences)))
    if rows_per_pass:
        assert max(len(rows) for rows in seen) <= rows_per_pass
    assert any(prefix >= 20 for _, prefix in prefix_groups(sequences, [min(p) - 1 for p in positions], 8))
    for want, parameter in zip(expected, trained, strict=True):
        assert torch.allclose(parameter.grad, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("normalize", ["token", "episode"])
def test_micro_batches_give_the_same_fold(tiny_tokenizer, tmp_path, normalize):
    runs = []
    for micro_batch in (0, 1, 3):
        engine = make_engine(tiny_tokenizer)
        family = make_family("toy")
        run_dir = tmp_path / f"run-{normalize}-{micro_batch}"
        fold(engine, {family.name: family}, items(family),
             config(steps=2, micro_batch=micro_batch, normalize=normalize, learning_rate=1e-3), run_dir)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
        runs.append(([r["loss"] for r in records], [r["kl"] for r in records],
                     load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))))
    for losses, kls, adapter in runs[1:]:
        assert losses == pytest.approx(runs[0][0], rel=1e-4, abs=1e-6)
        assert kls == pytest.approx(runs[0][1], rel=1e-4, abs=1e-6)
        for name, value in runs[0][2].items():
            assert torch.allclose(adapter[name], value, atol=1e-5), name


@pytest.mark.parametrize("micro_batch,normalize,anchors", [(0, "token", 0), (1, "token", 0), (3, "episode", 0),
                                                           (1, "token", 2), (3, "episode", 2)])
def test_a_fold_steps_gradient_is_that_of_the_batch_loss(tiny_tokenizer, monkeypatch, micro_batch, normalize,
                                                        anchors):
    """With anchors in the batch, per token, each group (anchors, the rest) weighs its share of the episodes."""
    from learners.losses import chunked_generalized_jsd

    engine = make_engine(tiny_tokenizer)
    family, replayed = make_family("toy:3" if anchors else "toy"), make_family("toy")  # games of 3 turns, 1-turn anchors
    families = {family.name: family, replayed.name: replayed}
    step_config = config(micro_batch=micro_batch, normalize=normalize, max_grad_norm=1e9)
    student = lora_student(tiny_tokenizer)
    engine.serve_trained(student)  # as fold() does: the base layers packed, LoRA beside them
    teacher = Teacher(student, step_config)
    trained = [parameter for parameter in student.parameters() if parameter.requires_grad]
    real_episodes, captured = fold_module.run_episodes, {}

    def recording(*args, **kwargs):
        captured["trajectories"] = real_episodes(*args, **kwargs)
        return captured["trajectories"]

    class Recorder:  # an optimizer that keeps the gradients and leaves the weights as they are
        def step(self):
            self.grads = [parameter.grad.clone() for parameter in trained]

        def zero_grad(self, set_to_none=True):
            student.zero_grad(set_to_none=set_to_none)

    monkeypatch.setattr(fold_module, "run_episodes", recording)
    batch = items(family)[:5 - anchors] + [FoldItem(family=replayed.name, index=i, anchor=True) for i in range(anchors)]
    recorder = Recorder()
    record = fold_module.fold_step(engine, student, teacher, families, batch, step_config, recorder, 0,
                                   base=LentBase(student, engine.tokenizer, engine.stop_ids))
    # the batch loss computed in one piece, by hand: every trained token of every episode at once
    views, _ = fold_module._views(engine.tokenizer, engine.stop_ids, batch, captured["trajectories"], step_config)
    student.train()
    teacher_hidden, teacher_weight = teacher.hidden(views)
    hidden = passes.hidden_at(student, [v.student.input_ids for v in views],
                                   [v.student.trained_positions for v in views])
    lengths = [len(v.student.trained_positions) for v in views]
    mask = policies.episode_weights(lengths, "cpu") if normalize == "episode" else torch.ones((1, sum(lengths)))
    if anchors and normalize == "token":  # by hand: group g's tokens weigh (n_g / B) / (T_g / T)
        flags = [item.anchor for item in batch]
        assert sum(flags) == anchors and len(views) == len(batch)
        share = {flag: (flags.count(flag) / len(flags))
                 / (sum(n for n, f in zip(lengths, flags, strict=True) if f == flag) / sum(lengths)) for flag in (True, False)}
        mask = torch.cat([torch.full((n,), share[flag]) for n, flag in zip(lengths, flags, strict=True)])[None]
        assert abs(share[True] - 1) > 0.05  # the anchors' answers are not as long as the rest: weights differ
    weight = passes.causal_lm(student).get_output_embeddings().weight
    loss = chunked_generalized_jsd(hidden[None], weight, teacher_hidden[None], 1.0, mask,
                                   teacher_lm_head_weight=teacher_weight, chunk_size=step_config.chunk_size)
    loss.backward()
    assert record["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert record["trained_tokens"] == sum(lengths)
    for parameter, got in zip(trained, recorder.grads, strict=True):
        assert torch.allclose(got, parameter.grad, atol=1e-5, rtol=1e-4)


def test_merged_serves_the_same_model_and_restores_it(tiny_tokenizer):
    student = lora_student(tiny_tokenizer).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    before = {name: parameter.detach().clone() for name, parameter in student.named_parameters()}
    with torch.no_grad():
        plain = student(ids).logits
        with _merged(student):
            inside = student(ids).logits
            assert any(getattr(module, "merged", False) for module in student.modules())
        after = student(ids).logits
    # the merged weights are W + s·BA up to float rounding; unmerged, they are W again bit for bit
    assert torch.allclose(inside, plain, atol=1e-5) and torch.equal(after, plain)
    for name, parameter in student.named_parameters():
        assert torch.equal(parameter, before[name]), name


def test_teacher_hidden_is_the_snapshot_model_with_its_context(tiny_tokenizer, monkeypatch):

    student = lora_student(tiny_tokenizer)
    teacher = Teacher(student, FoldConfig())
    with torch.no_grad():
        for parameter in student.parameters():
            if parameter.requires_grad:
                parameter.add_(1.0)  # the student moves on; the teacher must not
    views = [episode_views(tiny_tokenizer, [Message(role="user", content=f"what is {n} + 3 ?"),
                                            Message(role="assistant", content="ANSWER : 5")], CONTEXT, {2})
             for n in range(4)]
    student.train()
    runs = []
    real = passes.cached_prefix
    monkeypatch.setattr(passes, "cached_prefix", lambda *args, **kwargs: runs.append(1) or real(*args, **kwargs))
    hidden, _ = teacher.hidden(views)
    assert student.training  # given back in train mode
    assert len(runs) == 1 and len(teacher.prefixes) == 1  # the context prefix, run once
    again, _ = teacher.hidden(views)
    assert torch.equal(again, hidden) and len(runs) == 1  # the next step's pass: its keys and values kept
    # reference: the LoRA model at its starting weights, unmerged, plain forward
    reference = lora_student(tiny_tokenizer)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if name in teacher.snapshot:
                parameter.copy_(teacher.snapshot[name])
    expected = passes.hidden_at(reference.eval(), [v.teacher.input_ids for v in views],
                                     [v.teacher.trained_positions for v in views])
    assert torch.allclose(hidden, expected, atol=1e-4)


@pytest.mark.parametrize("packed", [False, True])
def test_a_fresh_adapters_teacher_is_the_base_model_run_without_its_adapters(tiny_tokenizer, packed):
    from engines.onednn import available, pack_linears, unpack_linears
    from learners.student import attach_student

    if packed and not available():
        pytest.skip("oneDNN is not available")
    base = build_model(tiny_tokenizer)
    views = [episode_views(tiny_tokenizer, [Message(role="user", content=f"what is {n} + 3 ?"),
                                            Message(role="assistant", content="ANSWER : 5")], CONTEXT, {2})
             for n in range(4)]
    sequences, positions = [v.teacher.input_ids for v in views], [v.teacher.trained_positions for v in views]
    with torch.no_grad():
        expected = passes.shared_prefix_hidden_at(base.eval(), sequences, positions)  # the base model, no LoRA
    config = FoldConfig(lora_rank=4, lora_alpha=8, teacher="self-ema")
    student = attach_student(base, config, None)
    if packed:
        pack_linears(student)
    teacher = Teacher(student, config)
    assert teacher.silent  # peft starts B at zero: the adapter adds nothing yet
    trained = {name: parameter.requires_grad for name, parameter in student.named_parameters()}
    layers = [module for module in student.modules() if hasattr(module, "lora_A")]
    calls = []
    for layer in layers:
        layer.lora_A["default"].register_forward_hook(lambda *_: calls.append(1))
    student.train()
    hidden, _ = teacher.hidden(views)
    assert torch.equal(hidden, expected)  # the same numbers as the base model, bit for bit
    assert not calls  # and no LoRA pair ran
    assert {name: parameter.requires_grad for name, parameter in student.named_parameters()} == trained
    assert not any(layer.disable_adapters for layer in layers) and student.training

    with torch.no_grad():  # one step on: B is no longer zero, the EMA teacher takes a share of it
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    assert teacher.prefixes
    teacher.after_step()
    assert not teacher.silent and not teacher.prefixes  # the EMA moved: its kept prefixes went with it
    moved, _ = teacher.hidden(views)
    assert not torch.allclose(moved, expected, atol=1e-4)  # (merged or beside packed layers)
    if packed:
        unpack_linears(student)
