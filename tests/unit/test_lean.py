"""engines.lean: the lean decode step equals the model's own forward, and steps aside where it does not apply."""

import pytest
import torch

from engines.base import SamplingParams
from engines.lean import LeanDecoder
from engines.onednn import available, pack_linears, unpack_linears
from engines.prefix import prefill, with_room
from tests.tiny import build_model
from tests.unit.test_engine_hf import PROMPTS


def _prefilled(engine, prompts):
    rows = sorted(engine.encode(prompt) for prompt in prompts)
    return prefill(engine.model, engine._cache_kwarg, rows, engine.pad_id)


def _decode_both(engine, prompts, steps: int = 5):
    """Logits of `steps` greedy decode steps from two identical prefills: through the model's forward and
    through the lean step."""
    results = []
    for lean_on in (False, True):
        with torch.inference_mode():
            filled = _prefilled(engine, prompts)
            cache, mask, positions = filled.cache, filled.attention_mask, filled.next_positions
            with_room(cache, steps)
            lean = LeanDecoder.build(engine.model, cache)
            assert lean is not None or not lean_on
            chosen = filled.logits.argmax(-1)
            logits = []
            for _ in range(steps):
                mask = torch.cat([mask, mask.new_ones((len(chosen), 1))], dim=-1)
                if lean_on:
                    step = lean.step(chosen[:, None], mask, positions)
                else:
                    step = engine.model(input_ids=chosen[:, None], attention_mask=mask, position_ids=positions,
                                        use_cache=True, logits_to_keep=1, **{engine._cache_kwarg: cache}).logits[:, -1]
                logits.append(step)
                chosen, positions = step.argmax(-1), positions + 1
        results.append(torch.stack(logits))
    return results


@pytest.mark.parametrize("prompts", [PROMPTS, [PROMPTS[1], PROMPTS[1]]], ids=["padded", "unpadded"])
def test_lean_step_equals_the_model_forward(tiny_engine, prompts):
    # a padded batch (boolean mask, query packed onto the key/value heads) and an unpadded one (no mask,
    # SDPA's own grouped-query expansion): the same ops as transformers' forward, so the same logits
    expected, got = _decode_both(tiny_engine, prompts)
    assert torch.allclose(expected, got, atol=1e-6, rtol=0)


@pytest.mark.skipif(not available(), reason="no oneDNN packed-linear kernels in this PyTorch build")
def test_lean_step_runs_lora_and_packed_layers_as_the_forward_does(tiny_engine):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(tiny_engine.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)  # a trained-looking adapter: B = 0 would hide a wrong LoRA path
    model.eval()
    tiny_engine.model = model
    assert pack_linears(model) > 0
    try:
        expected, got = _decode_both(tiny_engine, PROMPTS)
    finally:
        unpack_linears(model)
    assert torch.allclose(expected, got, atol=1e-5, rtol=0)


def test_generate_is_the_same_with_and_without_the_lean_step(tiny_engine, monkeypatch):
    params = SamplingParams(max_new_tokens=9, temperature=1.0, seed=5, stop=["apple"])
    built = []
    original = LeanDecoder.build.__func__

    def counting(cls, model, cache):
        decoder = original(cls, model, cache)
        built.append(decoder)
        return decoder

    monkeypatch.setattr(LeanDecoder, "build", classmethod(counting))
    lean = tiny_engine.generate(PROMPTS, params)
    assert built and all(decoder is not None for decoder in built)  # the lean step did run
    monkeypatch.setattr(LeanDecoder, "build", classmethod(lambda cls, model, cache: None))
    plain = tiny_engine.generate(PROMPTS, params)
    for one, other in zip(lean, plain, strict=True):
        assert one.token_ids == other.token_ids and one.finish_reason == other.finish_reason
        assert one.logprobs == pytest.approx(other.logprobs, abs=1e-6)


def test_lean_step_steps_aside_where_it_does_not_apply(tiny_engine):
    with torch.inference_mode():
        cache = _prefilled(tiny_engine, PROMPTS[:2]).cache
    model = tiny_engine.model
    assert LeanDecoder.build(model, cache) is not None
    model.train()
    assert LeanDecoder.build(model, cache) is None  # training mode (dropout)
    model.eval()
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *args: None)
    assert LeanDecoder.build(model, cache) is None  # a hook the lean step would skip
    handle.remove()
    model.config._attn_implementation = "eager"
    assert LeanDecoder.build(model, cache) is None  # another attention implementation
    model.config._attn_implementation = "sdpa"
    from transformers import DynamicCache

    assert LeanDecoder.build(model, DynamicCache()) is None  # not one cache layer per decoder layer
    assert LeanDecoder.build(torch.nn.Linear(2, 2), cache) is None  # not a Llama
    assert LeanDecoder.build(model, cache) is not None


def test_grouped_sdpa_gives_the_same_states_and_restores_the_switch(tiny_tokenizer, monkeypatch):
    import os

    from engines.lean import grouped_sdpa

    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    model = build_model(tiny_tokenizer).eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped heads to read
    ids = torch.tensor([[3, 7, 11, 5, 9, 2], [4, 8, 12, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])  # padded: transformers repeats K/V itself
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with grouped_sdpa(model):
            assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "1"
            grouped = model(input_ids=ids, attention_mask=mask).logits
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
    assert torch.allclose(grouped, plain, atol=1e-6)
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "0")
    with grouped_sdpa(model):
        pass
    assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "0"
