"""The HF engine on a tiny random-weight Llama: log-probs, padding independence, sampling, stops, adapters."""

import pytest
import torch

from engines.base import Engine, SamplingParams
from engines.hf import AdapterError, HFEngine

PROMPTS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "what is 2 + 3 ? respond with only the final answer ."}],
    [{"role": "system", "content": "the quick brown fox"}, {"role": "user", "content": "say the word : apple"}],
    [{"role": "user", "content": "how many legs does a spider have ?"}],
    [{"role": "user", "content": "CALC ( 12 * 7 )"}],
]


def reference_logprobs(engine: HFEngine, prompt, completion: list[int]) -> list[float]:
    """A plain, unpadded forward pass and log_softmax: what every engine log-prob must match."""
    ids = engine.encode(prompt) + completion
    with torch.no_grad():
        log_probs = torch.log_softmax(engine.model(torch.tensor([ids])).logits[0].float(), dim=-1)
    start = len(ids) - len(completion)
    return [log_probs[start + offset - 1, token].item() for offset, token in enumerate(completion)]


def test_engine_satisfies_protocol(tiny_engine):
    assert isinstance(tiny_engine, Engine)


def test_generate_logprobs_match_plain_forward(tiny_engine):
    outputs = tiny_engine.generate(PROMPTS, SamplingParams(max_new_tokens=12))
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert len(output.token_ids) == 12 and output.finish_reason == "length"
        reference = reference_logprobs(tiny_engine, prompt, output.token_ids)
        assert output.logprobs == pytest.approx(reference, abs=1e-4)
        assert output.prompt_tokens == tiny_engine.count_tokens(prompt)


def test_sampled_logprobs_match_plain_forward(tiny_engine):
    outputs = tiny_engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.0, seed=3))
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert output.logprobs == pytest.approx(reference_logprobs(tiny_engine, prompt, output.token_ids), abs=1e-4)


def test_generation_does_not_depend_on_batch_composition(tiny_engine):
    params = SamplingParams(max_new_tokens=10)
    batched = tiny_engine.generate(PROMPTS, params)
    for prompt, together in zip(PROMPTS, batched, strict=True):
        alone = tiny_engine.generate([prompt], params)[0]
        assert alone.token_ids == together.token_ids
        assert alone.logprobs == pytest.approx(together.logprobs, abs=1e-4)


def test_score_matches_plain_forward_and_padding(tiny_engine):
    completions = [output.token_ids for output in tiny_engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0))]
    completions[0] = completions[0][:3]  # ragged lengths exercise the padding layout
    scores = tiny_engine.score(PROMPTS, completions, top_k=5)
    for prompt, completion, scored in zip(PROMPTS, completions, scores, strict=True):
        assert scored.token_ids == completion
        reference = reference_logprobs(tiny_engine, prompt, completion)
        assert scored.logprobs == pytest.approx(reference, abs=1e-4)
        alone = tiny_engine.score([prompt], [completion])[0]
        assert alone.logprobs == pytest.approx(scored.logprobs, abs=1e-4)
        for position, top in enumerate(scored.topk_logprobs):
            assert top == sorted(top, reverse=True)
            assert top[0] >= scored.logprobs[position] - 1e-6


def test_score_rejects_mismatched_lengths(tiny_engine):
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        tiny_engine.score(PROMPTS[:2], [[1, 2]])


def test_sampling_is_seeded_per_row(tiny_engine):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=11)
    first = tiny_engine.generate(PROMPTS, params)
    again = tiny_engine.generate(PROMPTS, params)
    assert [output.token_ids for output in first] == [output.token_ids for output in again]
    # Row 0 samples from seed + 0 whatever else is in the batch.
    assert tiny_engine.generate(PROMPTS[:1], params)[0].token_ids == first[0].token_ids
    other_seed = tiny_engine.generate(PROMPTS, params.model_copy(update={"seed": 12}))
    assert [output.token_ids for output in other_seed] != [output.token_ids for output in first]


def test_tiny_top_p_is_greedy(tiny_engine):
    greedy = tiny_engine.generate(PROMPTS, SamplingParams(max_new_tokens=8))
    nucleus = tiny_engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=5))
    assert [output.token_ids for output in nucleus] == [output.token_ids for output in greedy]


def test_stop_string_cuts_text_and_ends_row(tiny_engine):
    full = tiny_engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=16))[0]
    stop = full.text[4:7]
    assert stop and stop in full.text
    stopped = tiny_engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=16, stop=(stop,)))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.find(stop)]
    assert len(stopped.token_ids) < len(full.token_ids)
    assert stopped.token_ids == full.token_ids[: len(stopped.token_ids)]


def test_eos_token_ends_generation_and_is_kept(tiny_engine):
    first_token = tiny_engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=4))[0].token_ids[0]
    tiny_engine.stop_ids = {first_token}
    output = tiny_engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=4))[0]
    assert output.token_ids == [first_token] and output.finish_reason == "stop"


def test_progress_reports_every_row(tiny_engine):
    seen = []
    tiny_engine.generate(PROMPTS, SamplingParams(max_new_tokens=2), progress=seen.append)
    assert sum(seen) == len(PROMPTS) and len(seen) == 2  # batch_size 4: two micro-batches


def _save_adapter(model, path, rank=4):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    peft_model.save_pretrained(str(path))


def test_adapter_load_changes_outputs_and_unload_restores(tiny_tokenizer, tmp_path):
    from tests.tiny import build_model

    engine = HFEngine(build_model(tiny_tokenizer), tiny_tokenizer, batch_size=8)
    params = SamplingParams(max_new_tokens=8)
    before = [output.token_ids for output in engine.generate(PROMPTS, params)]
    _save_adapter(build_model(tiny_tokenizer), tmp_path / "adapter")
    engine.load_adapter(str(tmp_path / "adapter"))
    assert engine.adapter == str(tmp_path / "adapter")
    during = [output.token_ids for output in engine.generate(PROMPTS, params)]
    assert during != before
    engine.unload_adapter()
    assert engine.adapter is None
    assert [output.token_ids for output in engine.generate(PROMPTS, params)] == before


def test_adapter_for_another_model_is_refused(tiny_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny import build_model

    other = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    )
    _save_adapter(other, tmp_path / "wrong")
    engine = HFEngine(build_model(tiny_tokenizer), tiny_tokenizer)
    with pytest.raises(AdapterError, match="does not fit"):
        engine.load_adapter(str(tmp_path / "wrong"))
    assert engine.adapter is None
    assert engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))[0].token_ids
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        engine.load_adapter(str(tmp_path))


def test_min_tokens_holds_off_eos_and_keeps_model_logprobs(tiny_engine):
    first_token = tiny_engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=4))[0].token_ids[0]
    tiny_engine.stop_ids = {first_token}
    held = tiny_engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=8, min_tokens=3))[0]
    assert first_token not in held.token_ids[:3] and len(held.token_ids) >= 4
    assert held.finish_reason == "stop" if first_token in held.token_ids else held.finish_reason == "length"
    # the log-probs are the unconstrained model's: rescoring the sampled tokens gives the same values
    rescored = tiny_engine.score_ids([tiny_engine.encode(PROMPTS[0])], [held.token_ids])[0]
    assert torch.allclose(torch.tensor(held.logprobs), torch.tensor(rescored.logprobs), atol=1e-4)


def test_min_tokens_gives_every_row_that_many_tokens_at_least(tiny_engine):
    free = tiny_engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, temperature=1.0, seed=3))
    tiny_engine.stop_ids = {token for output in free for token in output.token_ids[:3]}  # common early tokens
    assert all(len(output.token_ids) < 12 for output in tiny_engine.generate(
        PROMPTS, SamplingParams(max_new_tokens=16, temperature=1.0, seed=3)))
    held = tiny_engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, min_tokens=12, temperature=1.0, seed=3))
    assert all(len(output.token_ids) >= 12 for output in held)
    assert all(not set(output.token_ids[:12]) & tiny_engine.stop_ids for output in held)


SKILLS = "rule : call CALC ( a * b ) then answer . " * 4  # a context every prompt of the batch shares
SHARED = [
    [{"role": "system", "content": SKILLS}, {"role": "user", "content": question}]
    for question in ("hi", "what is 2 + 3 ?", "say the word : apple and then say it again", "CALC ( 12 * 7 )")
]


OTHER = [{"role": "system", "content": "another context entirely , long enough to share . " * 3}]
MIXED = [*SHARED, [*OTHER, {"role": "user", "content": "a b c"}], [*OTHER, {"role": "user", "content": "7 ?"}],
         PROMPTS[1]]


def test_prefix_groups_split_a_batch_by_context_not_by_system_prompt():
    from engines.prefix import prefix_groups

    system, skills_a, skills_b = list(range(100, 130)), list(range(200, 240)), list(range(300, 340))
    rows = [system + skills_a + [1, n] for n in range(4)] + [system + skills_b + [2, n] for n in range(4)]
    rows.append([9] * 50)
    groups = sorted((sorted(members), prefix) for members, prefix in prefix_groups(rows, [len(r) - 1 for r in rows], 16))
    # one group per skill set (4 x 3 x 71 tokens saved) beats one group on the system prompt (7 x 30)
    assert groups == [([0, 1, 2, 3], 71), ([4, 5, 6, 7], 71), ([8], 0)]


def test_prefill_gives_every_row_its_plain_forward_logits(tiny_engine):
    from engines.prefix import prefill, prefix_groups

    rows = [tiny_engine.encode(prompt) for prompt in MIXED]
    groups = prefix_groups(rows, [len(row) - 1 for row in rows], 16)
    assert sorted(sorted(members) for members, prefix in groups if prefix) == [[0, 1, 2, 3], [4, 5]]
    with torch.no_grad():
        prefilled = prefill(tiny_engine.model, tiny_engine._cache_kwarg, rows, tiny_engine.pad_id)
        for index, row in enumerate(rows):
            plain = tiny_engine.model(torch.tensor([row])).logits[0, -1].float()
            assert torch.allclose(prefilled.logits[index], plain, atol=1e-4), index
            assert prefilled.next_positions[index].item() == len(row)
            assert prefilled.attention_mask[index].sum().item() == len(row)  # its own tokens, padding masked


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prefix_generation_matches_plain_forward_and_rows_alone(tiny_engine, temperature):
    prompts = MIXED
    params = SamplingParams(max_new_tokens=10, temperature=temperature, seed=5)
    together = HFEngine(tiny_engine.model, tiny_engine.tokenizer, batch_size=8).generate(prompts, params)
    for index, (prompt, output) in enumerate(zip(prompts, together, strict=True)):
        assert output.logprobs == pytest.approx(reference_logprobs(tiny_engine, prompt, output.token_ids), abs=1e-4)
        if temperature == 0.0:  # alone a row has no prefix to share, and the same tokens
            alone = tiny_engine.generate([prompt], params)[0]
            assert alone.token_ids == output.token_ids, index


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_follows_the_distribution(temperature):
    probabilities = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    rows = 4000
    generators = [torch.Generator().manual_seed(row) for row in range(rows)]
    chosen = HFEngine._choose(probabilities.log().repeat(rows, 1), SamplingParams(temperature=temperature), generators)
    frequencies = torch.bincount(chosen, minlength=5) / rows
    expected = probabilities ** (1 / temperature) / (probabilities ** (1 / temperature)).sum()
    assert frequencies[1] == 0  # a token of probability 0 is never drawn
    assert torch.allclose(frequencies, expected, atol=0.03)
    # row i's draw depends on its own generator only
    again = HFEngine._choose(probabilities.log().repeat(3, 1), SamplingParams(temperature=temperature),
                             [torch.Generator().manual_seed(row) for row in range(3)])
    assert again.tolist() == chosen[:3].tolist()


def test_inverse_cdf_finds_the_full_cumulative_sums_index():
    from engines.hf import inverse_cdf

    torch.manual_seed(0)
    probabilities = torch.rand(64, 1000) ** 4  # a width that is not a multiple of the block
    probabilities[probabilities < 0.05] = 0.0  # zero-weight entries, some whole blocks among them
    probabilities[:8, 300:812] = 0.0
    draws = torch.rand(64, dtype=torch.float64)
    cumulative = probabilities.double().cumsum(-1)
    expected = torch.searchsorted(cumulative, (draws * cumulative[:, -1])[:, None], right=True).squeeze(-1)
    assert torch.equal(inverse_cdf(probabilities, draws), expected)
    # the ends: a draw of 0 takes the first entry with weight, one just under 1 the last; never a zero
    first = (probabilities > 0).int().argmax(-1)
    last = 999 - (probabilities > 0).flip(-1).int().argmax(-1)
    assert torch.equal(inverse_cdf(probabilities, torch.zeros(64, dtype=torch.float64)), first)
    assert torch.equal(inverse_cdf(probabilities, torch.full((64,), 1 - 2**-53, dtype=torch.float64)), last)


def test_loading_copies_the_weights_out_of_the_file_and_gives_its_pages_back(tiny_tokenizer, tmp_path):
    from safetensors.torch import load_file

    from engines.hf import _file_mappings
    from tests.tiny import build_model

    model = build_model(tiny_tokenizer)
    model.save_pretrained(str(tmp_path / "model"))
    tiny_tokenizer.save_pretrained(str(tmp_path / "model"))
    engine = HFEngine.load(str(tmp_path / "model"), device="cpu", dtype="float32", threads=1)
    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    loaded = engine.model.state_dict()
    for name, value in saved.items():
        assert torch.equal(loaded[name], value), name  # the copies hold the file's values
    # no weight still points into a mapping of the file (a dropped page would read back from the file,
    # but a weight there would keep the whole mapping resident)
    spans = _file_mappings(".safetensors")
    for tensor in engine.model.parameters():
        start = tensor.data_ptr()
        assert not any(low <= start < high for low, high in spans)
    assert engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=4))[0].token_ids


def test_a_cache_with_room_holds_what_concatenation_would():
    from transformers import DynamicCache

    from engines.prefix import with_room

    torch.manual_seed(0)
    plain, roomy = DynamicCache(), DynamicCache()
    first = torch.randn(4, 3, 5, 8), torch.randn(4, 3, 5, 8)
    plain.update(*first, 0)
    roomy.update(*first, 0)
    with_room(roomy, 3)  # less room than the steps below take: it must grow
    for step in range(6):
        if step == 2:  # rows finish: both caches drop them
            keep = torch.tensor([0, 2, 3])
            plain.batch_select_indices(keep)
            roomy.batch_select_indices(keep)
        new = torch.randn(plain.layers[0].keys.shape[0], 3, 1, 8), torch.randn(plain.layers[0].keys.shape[0], 3, 1, 8)
        expected = plain.update(*new, 0)
        got = roomy.update(*new, 0)
        assert all(torch.equal(e, g) for e, g in zip(expected, got, strict=True))
    assert type(roomy.layers[0]).__name__ == "RoomyLayer" and roomy.get_seq_length() == plain.get_seq_length() == 11
