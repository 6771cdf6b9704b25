"""The CUDA path on a tiny random-weight Llama in bf16: generation, the fold, rmsd, EMA resume.

Every test is marked `cuda`: skipped where torch.cuda.is_available() is false (tests/unit/conftest.py);
benchmarks/gpu_check.py runs them on a GPU. Written against the public API only (HFEngine, fold and
its config, the run directory's files), so they hold whatever the fold's internals become.
"""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engines.base import SamplingParams
from engines.hf import HFEngine
from envs import make_family
from envs.base import Message
from learners.fold import FoldConfig, FoldItem, fold
from tests.tiny import build_model

pytestmark = pytest.mark.cuda

CONTEXT = [Message(role="user", content="Say the word: apple"), Message(role="assistant", content="apple")]
PROMPTS = ["Say the word: apple", "what is 2 + 3 ? respond with only the final answer .",
           "how many legs does a spider have ?", "the quick brown fox"]


def cuda_engine(tokenizer, batch_size: int = 4):
    """A tiny model on the GPU in bf16, served by the HF engine (no CPU packing); the model too."""
    model = build_model(tokenizer).to("cuda", torch.bfloat16)
    return HFEngine(model, tokenizer, model_name="tiny-cuda", batch_size=batch_size, packed_weights=False), model


def config(**overrides) -> FoldConfig:
    values = dict(steps=2, batch_size=4, learning_rate=5e-3, lora_rank=4, lora_alpha=8, checkpoint_every=1,
                  anchor_fraction=0.0, sampling={"temperature": 1.0, "max_new_tokens": 8})
    values.update(overrides)
    return FoldConfig(**values)


def items(family, count: int = 8):
    return [FoldItem(family=family.name, index=index, context=CONTEXT) for index in range(count)]


def floating_state_tensors(optimizer_state: dict) -> list[torch.Tensor]:
    """The per-parameter tensors (exp_avg, exp_avg_sq, ...) of an optimizer state dict, not the step counts."""
    return [value for state in optimizer_state["state"].values() for value in state.values()
            if isinstance(value, torch.Tensor) and value.dim() > 0]


def test_greedy_generation_batched_equals_one_by_one(tiny_tokenizer):
    engine, model = cuda_engine(tiny_tokenizer)
    params = SamplingParams(max_new_tokens=12)
    chats = [[{"role": "user", "content": prompt}] for prompt in PROMPTS]
    batched = engine.generate(chats, params)
    single = [engine.generate([chat], params)[0] for chat in chats]
    assert [generation.token_ids for generation in batched] == [generation.token_ids for generation in single]
    for generation in batched:
        assert len(generation.token_ids) == len(generation.logprobs) > 0
        assert all(math.isfinite(value) and value <= 1e-3 for value in generation.logprobs)
    assert {(parameter.dtype, parameter.device.type) for parameter in model.parameters()} == {(torch.bfloat16, "cuda")}


def test_fold_trains_fp32_lora_and_adamw_state_over_bf16_base_weights(tiny_tokenizer, tmp_path):
    engine, model = cuda_engine(tiny_tokenizer)
    family = make_family("toy")
    seen = []

    def on_step(record):
        # the student shares the engine's base weights (the HF engine lends them): look at them mid-fold
        trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
        frozen = [parameter for parameter in model.parameters() if not parameter.requires_grad]
        seen.append({"loss": record["loss"], "trained": {(p.dtype, p.device.type) for p in trained},
                     "frozen": {(p.dtype, p.device.type) for p in frozen}})

    result = fold(engine, {family.name: family}, items(family), config(), tmp_path / "run", on_step=on_step)
    assert len(seen) == 2
    assert all(math.isfinite(step["loss"]) for step in seen)
    assert math.isfinite(result.loss_last)
    for step in seen:
        assert step["trained"] in (set(), {(torch.float32, "cuda")})  # empty only if the trainer has its own copy
        assert step["frozen"] == {(torch.bfloat16, "cuda")}
    adapter = load_file(str(Path(result.adapter) / "adapter_model.safetensors"))
    assert adapter and {tensor.dtype for tensor in adapter.values()} == {torch.float32}
    optimizer_files = sorted(Path(result.run_dir).rglob("optimizer.pt"))
    assert optimizer_files, "no optimizer state saved in the run directory"
    state = floating_state_tensors(torch.load(optimizer_files[-1], map_location="cpu", weights_only=False))
    assert state and {tensor.dtype for tensor in state} == {torch.float32}
    # the engine serves the trained adapter afterwards, on the GPU, base weights still bf16
    assert engine.adapter is not None
    generation = engine.generate([[{"role": "user", "content": PROMPTS[0]}]], SamplingParams(max_new_tokens=4))[0]
    assert generation.token_ids
    base = [parameter for name, parameter in model.named_parameters() if "lora_" not in name]
    assert {(parameter.dtype, parameter.device.type) for parameter in base} == {(torch.bfloat16, "cuda")}


def test_a_fold_leaves_the_bf16_base_weights_as_they_were(tiny_tokenizer, tmp_path):
    """Merging a LoRA adapter into bf16 weights and unmerging it again rounds them: a fold (or serving
    an adapter) must not change the frozen base weights, which are also the frozen teacher."""
    engine, model = cuda_engine(tiny_tokenizer)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    family = make_family("toy")
    fold(engine, {family.name: family}, items(family), config(steps=3, checkpoint_every=3, teacher="self-ema"),
         tmp_path / "run")
    engine.unload_adapter()
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert not changed, f"{len(changed)} base tensors changed, e.g. {changed[:3]}"


def test_rmsd_folds_on_cuda(tiny_tokenizer, tmp_path):
    engine, _ = cuda_engine(tiny_tokenizer)
    family = make_family("toy")
    result = fold(engine, {family.name: family}, items(family), config(method="rmsd", relevance_top=2),
                  tmp_path / "run")
    assert math.isfinite(result.loss_first) and math.isfinite(result.loss_last)


class Killed(RuntimeError):
    pass


def test_a_killed_self_ema_fold_resumes_on_cuda(tiny_tokenizer, tmp_path):
    family = make_family("toy")
    ema = config(steps=3, teacher="self-ema", checkpoint_every=1)
    straight_records = []
    straight = fold(cuda_engine(tiny_tokenizer)[0], {family.name: family}, items(family), ema, tmp_path / "straight",
                    on_step=straight_records.append)

    def kill_at_three(record):
        if record["step"] == 3:
            raise Killed()

    with pytest.raises(Killed):
        fold(cuda_engine(tiny_tokenizer)[0], {family.name: family}, items(family), ema, tmp_path / "killed",
             on_step=kill_at_three)
    resumed_records = []
    resumed = fold(cuda_engine(tiny_tokenizer)[0], {family.name: family}, items(family), ema, tmp_path / "killed",
                   resume=True, on_step=resumed_records.append)
    assert resumed.resumed_from == 2
    assert [record["step"] for record in resumed_records] == [3]
    assert math.isfinite(resumed_records[0]["loss"])
    # the same step 3 as the straight run (its EMA teacher restored); loose: bf16 and atomics on a GPU
    assert resumed_records[0]["loss"] == pytest.approx(straight_records[2]["loss"], rel=0.05, abs=1e-4)
    expected = load_file(str(Path(straight.adapter) / "adapter_model.safetensors"))
    actual = load_file(str(Path(resumed.adapter) / "adapter_model.safetensors"))
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.allclose(expected[name], actual[name], rtol=1e-2, atol=1e-3), name


def _fp32_engines(tokenizer):
    """Two engines over the same fp32 tiny model weights on the GPU: decode graphs on, and off."""
    engines = []
    for graphs in (True, False):
        model = build_model(tokenizer).to("cuda")
        engines.append(HFEngine(model, tokenizer, model_name="tiny-cuda-fp32", batch_size=3, packed_weights=False,
                                cuda_graphs=graphs))
    return engines


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=12),
                                    SamplingParams(max_new_tokens=12, temperature=1.0, seed=4, stop=["apple"])],
                         ids=["greedy", "sampled"])
def test_decode_graphs_give_the_plain_decode(tiny_tokenizer, params):
    from engines.graphs import CapturedDecoder

    graphed, plain = _fp32_engines(tiny_tokenizer)
    chats = [[{"role": "user", "content": prompt}] for prompt in PROMPTS]  # 4 prompts: batches of 3 and 1
    expected = plain.generate(chats, params)
    got = graphed.generate(chats, params)
    again = graphed.generate(chats, params)  # the captured graphs replayed for a second call
    assert graphed._graphs.captures >= 1 and all(isinstance(decoder, CapturedDecoder)
                                                 for decoder in graphed._graphs._decoders.values())
    assert not graphed._graphs.failed
    for one, other, third in zip(got, expected, again, strict=True):
        assert one.token_ids == other.token_ids == third.token_ids
        assert one.logprobs == pytest.approx(other.logprobs, abs=1e-4)


@pytest.mark.parametrize("merging", [True, False], ids=["merged", "lora-branch"])
def test_decode_graphs_read_a_trainers_in_place_updates(tiny_tokenizer, monkeypatch, merging):
    """A trainer's optimizer writes the LoRA tensors in place between hand-offs: the captured graph replays
    over the same tensors, so it decodes with the new values, as the plain path does. fp32 weights decode
    with the adapter merged in (`HFEngine._decoding`); half-precision ones through the LoRA branch, which
    `merging=False` takes here in fp32."""
    from peft import LoraConfig, get_peft_model

    if not merging:
        monkeypatch.setattr("engines.hf.mergeable", lambda module: False)

    graphed, plain = _fp32_engines(tiny_tokenizer)
    params = SamplingParams(max_new_tokens=10)
    chats = [[{"role": "user", "content": prompt}] for prompt in PROMPTS[:3]]
    students = []
    for engine in (graphed, plain):
        torch.manual_seed(3)
        student = get_peft_model(engine.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
        student.eval()
        engine.serve_trained(student)
        students.append(student)
    before = graphed.generate(chats, params)
    assert [g.token_ids for g in before] == [g.token_ids for g in plain.generate(chats, params)]
    captures = graphed._graphs.captures
    for student in students:  # the same in-place "optimizer step" on both
        torch.manual_seed(5)
        with torch.no_grad():
            for name, parameter in student.named_parameters():
                if "lora_B" in name:
                    parameter.add_(torch.randn_like(parameter) * 0.5)
        (graphed if student is students[0] else plain).serve_trained(student)
    after = graphed.generate(chats, params)
    expected = plain.generate(chats, params)
    assert graphed._graphs.captures == captures  # replayed, not captured again
    assert [g.token_ids for g in after] == [g.token_ids for g in expected]
    assert [g.token_ids for g in after] != [g.token_ids for g in before]  # the update did change the decode
    for one, other in zip(after, expected, strict=True):
        assert one.logprobs == pytest.approx(other.logprobs, abs=1e-4)


@pytest.mark.parametrize("policy", ["speculative", "mixture"])
def test_guided_rollouts_through_decode_graphs(tiny_tokenizer, policy):
    """A guided rollout's two views (student; teacher = another model) each replay their own graph."""
    from engines.graphs import CapturedDecoder

    graphed, plain = _fp32_engines(tiny_tokenizer)
    teacher = build_model(tiny_tokenizer, seed=1).to("cuda")
    chats = [[{"role": "user", "content": prompt}] for prompt in PROMPTS]
    teacher_chats = [[{"role": "user", "content": "say the word : apple"}, *chat] for chat in chats]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=2, stop=["e"])
    options = dict(policy=policy, top_k=3, mix=0.5, teacher_model=teacher)
    expected = plain.generate_guided(chats, teacher_chats, params, **options)
    got = graphed.generate_guided(chats, teacher_chats, params, **options)
    decoders = graphed._graphs._decoders
    assert {key[3] for key in decoders} == {"student", "teacher"}
    assert all(isinstance(decoder, CapturedDecoder) for decoder in decoders.values())
    for one, other in zip(got, expected, strict=True):
        assert one.token_ids == other.token_ids and one.sources == other.sources
        assert one.logprobs == pytest.approx(other.logprobs, abs=1e-4)
        assert one.teacher_logprobs == pytest.approx(other.teacher_logprobs, abs=1e-4)
