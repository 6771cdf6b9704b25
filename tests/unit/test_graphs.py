"""engines.graphs: the static-buffer decode step a CUDA graph captures, checked on the CPU.

The step itself runs anywhere; only the capture needs CUDA (tests/unit/test_cuda.py). Here: it equals
the model's own forward over a decode (padded and unpadded batches, padding rows, a LoRA adapter), it
reads nothing back to the host (what a capture forbids), `generate` gives the same tokens and
log-probs through it, multi-turn rows kept from it continue as from the plain path, and a changed
model (weights swapped, an adapter merged or disabled) gets a new decoder.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engines.base import SamplingParams
from engines.graphs import (
    CAPACITY_STEP,
    DecodeGraphs,
    StaticDecoder,
    capacity_for,
    graphable,
    rows_for,
    signature,
)
from engines.prefix import prefill, with_room
from tests.unit.test_engine_hf import PROMPTS


def _decode_both(engine, prompts, steps: int = 6, rows: int | None = None):
    """Logits of `steps` greedy decode steps from two identical prefills: the model's forward, and the
    static decoder (with `rows` rows, padding included)."""
    results = []
    for static_on in (False, True):
        with torch.inference_mode():
            encoded = sorted(engine.encode(prompt) for prompt in prompts)
            filled = prefill(engine.model, engine._cache_kwarg, encoded, engine.pad_id)
            cache, mask, positions = filled.cache, filled.attention_mask, filled.next_positions
            batch, width = mask.shape
            decoder = None
            if static_on:
                decoder = StaticDecoder(engine.model, rows or batch, capacity_for(width + steps + 1))
                decoder.load(cache, mask, positions, engine.pad_id)
            else:
                with_room(cache, steps)
            chosen = filled.logits.argmax(-1)
            logits = []
            for _ in range(steps):
                if static_on:
                    decoder.feed(chosen)
                    step = decoder.run()[:batch].clone()
                else:
                    mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=-1)
                    step = engine.model(input_ids=chosen[:, None], attention_mask=mask, position_ids=positions,
                                        use_cache=True, logits_to_keep=1,
                                        **{engine._cache_kwarg: cache}).logits[:, -1].float()
                    positions = positions + 1
                logits.append(step)
                chosen = step.argmax(-1)
        results.append(torch.stack(logits))
    return results


@pytest.mark.parametrize(("prompts", "rows"), [(PROMPTS, None), (PROMPTS[:3], 4), ([PROMPTS[1], PROMPTS[1]], 2)],
                         ids=["padded", "padding-rows", "unpadded"])
def test_static_step_equals_the_model_forward(tiny_engine, prompts, rows):
    expected, got = _decode_both(tiny_engine, prompts, rows=rows)
    assert torch.allclose(expected, got, atol=1e-5, rtol=0)


def test_static_step_runs_a_lora_adapter_as_the_forward_does(tiny_engine):
    from peft import LoraConfig, get_peft_model

    without, _ = _decode_both(tiny_engine, PROMPTS)
    torch.manual_seed(1)
    model = get_peft_model(tiny_engine.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                            "down_proj"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)  # B = 0 would hide a wrong LoRA path
    model.eval()
    tiny_engine.model = model
    try:
        expected, got = _decode_both(tiny_engine, PROMPTS)
    finally:
        tiny_engine.model = model.unload()
    assert torch.allclose(expected, got, atol=1e-5, rtol=0)
    assert not torch.allclose(without, got, atol=1e-3)  # the adapter did change the logits


class _HostReads(TorchDispatchMode):
    """Records the ops that read a device value back to the host or size a tensor by its data: what a
    CUDA graph capture forbids."""

    FORBIDDEN = {"_local_scalar_dense", "is_nonzero", "item", "equal", "nonzero", "masked_select", "unique", "_unique2"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.FORBIDDEN:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_static_step_reads_nothing_back_to_the_host(tiny_engine):
    with torch.inference_mode():
        encoded = sorted(tiny_engine.encode(prompt) for prompt in PROMPTS)
        filled = prefill(tiny_engine.model, tiny_engine._cache_kwarg, encoded, tiny_engine.pad_id)
        decoder = StaticDecoder(tiny_engine.model, 8, CAPACITY_STEP)
        decoder.load(filled.cache, filled.attention_mask, filled.next_positions, tiny_engine.pad_id)
        decoder.feed(filled.logits.argmax(-1))
        with _HostReads() as reads:
            decoder.step()
        assert reads.seen == []
        # the probe does see a host read (a mask test of the kind the lean step does)
        with _HostReads() as reads:
            bool(decoder.mask.all())
        assert reads.seen


def _engine(tokenizer, graphs: bool, batch_size: int = 4):
    """A CPU engine over a fresh tiny model without the CPU's own lean step (which the graphs replace on
    CUDA); with `graphs`, the CUDA path's static decoders, run uncaptured."""
    from engines.hf import HFEngine
    from tests.tiny import build_model

    engine = HFEngine(build_model(tokenizer), tokenizer, batch_size=batch_size, packed_weights=False)
    engine._lean = False
    if graphs:
        engine._graphs = DecodeGraphs(capture=False)
    return engine


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=9),
    SamplingParams(max_new_tokens=9, temperature=1.0, seed=5, stop=["apple"]),
    SamplingParams(max_new_tokens=7, temperature=0.8, top_p=0.9, seed=3, min_tokens=3),
    SamplingParams(max_new_tokens=10, temperature=1.0, seed=0, stop=["e"]),
], ids=["greedy", "sampled-stops", "top-p-min-tokens", "rows-stop-mid-batch"])
def test_generate_is_the_same_through_the_static_decoder(tiny_tokenizer, params):
    plain_engine, static_engine = _engine(tiny_tokenizer, False, 3), _engine(tiny_tokenizer, True, 3)
    plain = plain_engine.generate(PROMPTS, params)
    static = static_engine.generate(PROMPTS, params)
    assert static_engine._graphs.captures >= 1  # it did decode through the static decoder (4 prompts: 3 + 1 rows)
    if params.stop == ["e"]:  # rows that stop while others go on (finished rows run on in a graph, unread)
        assert len({len(generation.token_ids) for generation in plain}) > 1
    for one, other in zip(static, plain, strict=True):
        assert one.token_ids == other.token_ids and one.finish_reason == other.finish_reason and one.text == other.text
        assert one.logprobs == pytest.approx(other.logprobs, abs=1e-5)


def test_kept_turns_continue_the_same_from_the_static_decoder(tiny_tokenizer):
    """A multi-turn episode's second turn reuses the rows the first turn kept: the same results whether the
    first turn's rows were kept from the static buffers or from the plain cache."""
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=2)
    outputs = []
    for graphs in (False, True):
        engine = _engine(tiny_tokenizer, graphs)
        first_chats = [[{"role": "user", "content": prompt}] for prompt in PROMPTS]
        first = engine.generate(first_chats, params)
        assert engine.turns.stats()["kept_rows"] > 0
        assert not graphs or engine._graphs.captures >= 1
        second_chats = [chat + [{"role": "assistant", "content": generation.text},
                                {"role": "user", "content": "and again"}]
                        for chat, generation in zip(first_chats, first, strict=True)]
        before = engine.turns.reused_tokens
        second = engine.generate(second_chats, params)
        assert engine.turns.reused_tokens > before  # the second turn did continue kept rows
        outputs.append((first, second))
    (plain_first, plain_second), (static_first, static_second) = outputs
    for one, other in zip(static_first + static_second, plain_first + plain_second, strict=True):
        assert one.token_ids == other.token_ids
        assert one.logprobs == pytest.approx(other.logprobs, abs=1e-5)


def test_a_changed_model_gets_a_new_decoder(tiny_engine):
    from peft import LoraConfig, get_peft_model

    graphs = DecodeGraphs(capture=False, kept=8)
    model = tiny_engine.model
    first = graphs.decoder(model, 3, 40)
    assert graphs.decoder(model, 4, 100) is first  # same rows bucket (4), capacity bucket, model
    assert graphs.decoder(model, 5, 100) is not first  # 8 rows
    assert graphs.decoder(model, 4, CAPACITY_STEP) is not first  # the next capacity bucket
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])).eval()
    try:
        lora = graphs.decoder(peft_model, 4, 40)
        assert lora is not None and lora is not first
        key = signature(peft_model)
        peft_model.base_model.model.model.layers[0].self_attn.q_proj.merge()
        assert signature(peft_model) != key  # merged: the LoRA branch is skipped, another graph
        peft_model.base_model.model.model.layers[0].self_attn.q_proj.unmerge()
        assert signature(peft_model) == key
        with peft_model.disable_adapter():
            assert signature(peft_model) != key
        # in-place writes (an optimizer step) keep the graph; a new tensor does not
        with torch.no_grad():
            peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.add_(1.0)
        assert signature(peft_model) == key
        layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]
        layer.weight = torch.nn.Parameter(layer.weight.detach().clone())
        assert signature(peft_model) != key
    finally:
        peft_model.unload()


def test_buckets_and_what_is_not_covered(tiny_engine):
    assert [rows_for(batch) for batch in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert capacity_for(1) == capacity_for(CAPACITY_STEP) == CAPACITY_STEP
    assert capacity_for(CAPACITY_STEP + 1) == 2 * CAPACITY_STEP
    model = tiny_engine.model
    assert graphable(model) is model
    model.train()
    assert graphable(model) is None and DecodeGraphs(capture=False).decoder(model, 2, 10) is None
    model.eval()
    model.model.rotary_emb.rope_type = "dynamic"  # frequencies recomputed from the positions: a host read
    try:
        assert graphable(model) is None
    finally:
        model.model.rotary_emb.rope_type = "default"
    assert graphable(torch.nn.Linear(2, 2)) is None
    kept = DecodeGraphs(capture=False, kept=2)
    decoders = [kept.decoder(model, 1, CAPACITY_STEP * size) for size in (1, 2, 3)]
    assert len(kept._decoders) == 2 and decoders[0] not in kept._decoders.values()  # the oldest went


@pytest.mark.parametrize("policy", ["speculative", "mixture", "pedagogical"])
@pytest.mark.parametrize("teacher", ["scope", "model", "same"])
def test_guided_rollouts_are_the_same_through_static_decoders(tiny_tokenizer, policy, teacher):
    """Both views of a guided rollout (student, teacher) decode through their own static decoders: the same
    tokens, sources and log-probs as without, with the teacher's weights swapped in by a scope, as another
    model, or the same model on its own prompts (the two views' decoders kept apart)."""
    from tests.tiny import build_model
    from tests.unit.test_guided import PROMPTS as GUIDED_PROMPTS
    from tests.unit.test_guided import swapped, teacher_prompts

    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=0, stop=["e"], min_tokens=1)
    options = {"speculative": dict(top_k=3), "mixture": dict(mix=0.5), "pedagogical": dict(surprisal=4.0)}[policy]
    outputs = []
    for graphs in (False, True):
        engine = _engine(tiny_tokenizer, graphs)
        other = build_model(tiny_tokenizer, seed=1).eval()
        extra = {"scope": dict(teacher_scope=lambda engine=engine, other=other: swapped(engine.model, other)),
                 "model": dict(teacher_model=other), "same": {}}[teacher]
        outputs.append(engine.generate_guided(GUIDED_PROMPTS, teacher_prompts(), params, policy=policy, **options,
                                              **extra))
        if graphs:
            roles = {key[3] for key in engine._graphs._decoders}
            assert roles == {"student", "teacher"}  # each view decoded through its own decoder
    plain, static = outputs
    lengths = [len(generation.token_ids) for generation in plain]
    assert any(later > earlier for earlier, later in zip(lengths, lengths[1:], strict=False))  # rows left mid-batch
    for one, other in zip(static, plain, strict=True):
        assert one.token_ids == other.token_ids and one.sources == other.sources and one.text == other.text
        assert one.logprobs == pytest.approx(other.logprobs, abs=1e-5)
        assert one.behaviour_logprobs == pytest.approx(other.behaviour_logprobs, abs=1e-5)
        assert one.teacher_logprobs == pytest.approx(other.teacher_logprobs, abs=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_fold_through_the_static_decoder_trains_the_same_adapter(tiny_tokenizer, tmp_path, checkpointing):
    """The fold's rollouts through the graphs' decoders (the trainer's live module served, its optimizer
    stepping the LoRA tensors in place between steps, multi-turn rows kept) train the adapter the plain
    decode trains: the same losses and tensors."""
    from safetensors.torch import load_file

    from envs import make_family
    from envs.base import Message
    from learners.fold import FoldConfig, FoldItem, fold

    family = make_family("toy")
    items = [FoldItem(family=family.name, index=index, context=[Message(role="user", content="Say the word: apple"),
                                                                Message(role="assistant", content="apple")])
             for index in range(8)]
    config = FoldConfig(steps=3, batch_size=4, learning_rate=5e-3, lora_rank=4, lora_alpha=8, checkpoint_every=3,
                        anchor_fraction=0.0, gradient_checkpointing=checkpointing,
                        sampling={"temperature": 1.0, "max_new_tokens": 8})
    runs = []
    for graphs in (False, True):
        engine = _engine(tiny_tokenizer, graphs)
        records = []
        result = fold(engine, {family.name: family}, items, config, tmp_path / f"run-{graphs}", on_step=records.append)
        if graphs:
            assert engine._graphs.captures >= 1
        runs.append(([record["loss"] for record in records], load_file(f"{result.adapter}/adapter_model.safetensors")))
    (plain_loss, plain_adapter), (graph_loss, graph_adapter) = runs
    assert graph_loss == pytest.approx(plain_loss, rel=1e-4, abs=1e-6)
    assert plain_adapter.keys() == graph_adapter.keys()
    for name in plain_adapter:
        assert torch.allclose(plain_adapter[name], graph_adapter[name], atol=1e-5), name
