"""Multi-turn generation on the HF engine with each row's KV cache kept between turns (engines.turns)."""

import pytest
import torch

from engines.base import SamplingParams
from engines.hf import HFEngine
from engines.turns import TurnCache
from tests.unit.test_engine_hf import reference_logprobs

GAMES = [
    "You are in the kitchen . You see a fridge and a table . Valid actions : open fridge , move north , look around",
    "You are in the pantry . There is a shelf and a coin . Valid actions : take coin , move south , inventory",
    "Simon says : take the apple . Valid actions : take apple , take pear , eat apple , look around",
    "the quick brown fox jumps over the lazy dog . what do you do next ? answer with one action from the list",
    "hi",  # too short to reuse: it runs whole every turn
]


def play(engine: HFEngine, turns: int, params: SamplingParams, batch_size: int | None = None):
    """Play every game `turns` turns in lockstep (as `learners.rollout` does): the chats and each turn's outputs."""
    chats = [[{"role": "user", "content": text}] for text in GAMES]
    played = []
    for turn in range(turns):
        outputs = engine.generate(chats, params)
        played.append([list(chat) for chat in chats])
        for index, (chat, output) in enumerate(zip(chats, outputs, strict=True)):
            chat.extend([{"role": "assistant", "content": output.text},
                         {"role": "user", "content": f"turn {turn} of game {index} : you see nothing new ."}])
        played[-1] = (played[-1], outputs)
    return played


@pytest.mark.parametrize(("temperature", "tokens_a_pass"), [(0.0, 2048), (1.0, 2048), (0.0, 8)])
def test_kept_caches_give_the_plain_forward_and_the_same_tokens(tiny_model, tiny_tokenizer, temperature,
                                                                 tokens_a_pass, monkeypatch):
    """`tokens_a_pass` 8: the continuing rows run a row or two a pass, padded to each pass's longest."""
    import engines.prefix

    monkeypatch.setattr(engines.prefix, "REUSED_TOKENS_A_PASS", tokens_a_pass)
    params = SamplingParams(max_new_tokens=8, temperature=temperature, seed=3)
    kept = HFEngine(tiny_model, tiny_tokenizer, batch_size=3)  # games split over batches: reuse across them
    plain = HFEngine(tiny_model, tiny_tokenizer, batch_size=3, turn_cache_mib=0)
    with_cache, without = play(kept, 4, params), play(plain, 4, params)
    assert kept.turns.reused_tokens > kept.turns.prompt_tokens / 2  # most of every later turn was kept
    assert plain.turns.reused_tokens == 0 and len(plain.turns) == 0
    for (chats, outputs), (_, plain_outputs) in zip(with_cache, without, strict=True):
        for chat, output, plain_output in zip(chats, outputs, plain_outputs, strict=True):
            assert output.token_ids == plain_output.token_ids
            assert output.prompt_tokens == plain_output.prompt_tokens
            assert output.logprobs == pytest.approx(reference_logprobs(kept, chat, output.token_ids), abs=1e-4)


def test_rows_that_finish_early_are_kept_with_only_their_own_tokens(tiny_model, tiny_tokenizer):
    """A row that stops first stays in the batch's cache and runs on: only its own columns are kept."""
    from transformers import DynamicCache

    engine = HFEngine(tiny_model, tiny_tokenizer, batch_size=8)
    texts = GAMES[:4] + [f"{text} , and then some more words for game {n}" for n, text in enumerate(GAMES[:4])]
    prompts = [[{"role": "user", "content": text}] for text in texts]
    first = engine.generate(prompts, SamplingParams(max_new_tokens=6))
    # a token only one row generates: stopping at it ends that row alone, the others run on
    row, stop = next((row, token) for row, output in enumerate(first) for token in output.token_ids[1:4]
                     if sum(token in other.token_ids for other in first) == 1)
    engine.turns.clear()
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=6, stop=[engine.tokenizer.decode([stop])]))
    assert outputs[row].finish_reason == "stop" and len(outputs[row].token_ids) < 6
    assert sum(output.finish_reason == "length" for output in outputs) == 7  # it stayed in the batch
    for prompt, output in zip(prompts, outputs, strict=True):
        ids = engine.encode(prompt) + output.token_ids
        key, length = engine.turns.match([ids + [7]])[0]
        assert length >= len(ids) - 1  # everything but (perhaps) the last token, which may not have run
        kv = engine.turns.layers(key)
        assert kv.shape[-2] == length
        with torch.no_grad():  # the kept keys are the row's own: a plain forward over its tokens gives them
            cache = DynamicCache()
            engine.model(input_ids=torch.tensor([ids[:length]]), use_cache=True, cache=cache)
        assert torch.allclose(kv[0, 0], cache.layers[0].keys[0], atol=1e-5)
        assert torch.allclose(kv[-1, 1], cache.layers[-1].values[0], atol=1e-5)


def test_a_new_adapter_or_a_loan_clears_the_kept_caches(tiny_model, tiny_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    engine = HFEngine(tiny_model, tiny_tokenizer, batch_size=8)
    prompts = [[{"role": "user", "content": text}] for text in GAMES[:2]]
    engine.generate(prompts, SamplingParams(max_new_tokens=4))
    assert len(engine.turns) == 2
    peft = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    tiny_model = peft.unload()
    engine.load_adapter(str(tmp_path / "adapter"))
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=4))  # kept caches of the base: not used
    assert engine.turns.reused_tokens == 0 and len(engine.turns) == 2
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.logprobs == pytest.approx(reference_logprobs(engine, prompt, output.token_ids), abs=1e-4)
    engine.lend_base()
    assert len(engine.turns) == 0
    engine.generate(prompts, SamplingParams(max_new_tokens=4))
    assert len(engine.turns) == 0  # nothing kept while a trainer holds the base and serves nothing on it


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_trainers_live_module_keeps_caches_until_its_weights_move(tiny_model, tiny_tokenizer, temperature):
    """A fold's rollouts (the trainer's live LoRA module served, `serve_trained`) keep each game's cache
    between turns; an optimizer step (in place, with no hand-off, as with `fold.sync_every` > 1) or a
    hand-off makes every kept cache stale, and none is used after it."""
    from peft import LoraConfig, get_peft_model

    from tests.tiny import build_model

    def live(model):
        engine = HFEngine(model, tiny_tokenizer, batch_size=3)
        lent = engine.lend_base()
        student = get_peft_model(lent.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                        init_lora_weights=False))
        engine.serve_trained(student.eval())
        return engine, student

    params = SamplingParams(max_new_tokens=6, temperature=temperature, seed=5)
    (kept, student), (plain, plain_student) = live(tiny_model), live(build_model(tiny_tokenizer))
    plain.turns.budget_bytes = 0
    plain_student.load_state_dict(student.state_dict())  # the same base (built alike) and adapter
    with_cache, without = play(kept, 3, params), play(plain, 3, params)
    assert kept.turns.reused_tokens > kept.turns.prompt_tokens / 2 and plain.turns.reused_tokens == 0
    for (chats, outputs), (_, plain_outputs) in zip(with_cache, without, strict=True):
        for chat, output, plain_output in zip(chats, outputs, plain_outputs, strict=True):
            assert output.token_ids == plain_output.token_ids
            assert output.logprobs == pytest.approx(reference_logprobs(kept, chat, output.token_ids), abs=1e-4)

    chats = [chat + [{"role": "assistant", "content": output.text}, {"role": "user", "content": "and now ?"}]
             for chat, output in zip(*with_cache[-1], strict=True)]
    for moved in ("optimizer step", "hand-off"):
        assert kept.turns.match([kept.encode(chat) for chat in chats])  # kept rows these chats continue
        kept.turns.reused_tokens = 0
        if moved == "optimizer step":  # AdamW writes the LoRA tensors in place: their version counters move
            optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=0.05)
            student.train()
            student(input_ids=torch.tensor([kept.encode(chats[0])]), labels=torch.tensor([kept.encode(chats[0])])
                    ).loss.backward()
            optimizer.step()
            student.eval()
        else:
            kept.serve_trained(student)
        outputs = kept.generate(chats, params)
        assert kept.turns.reused_tokens == 0  # what was kept before the weights moved is not used
        for chat, output in zip(chats, outputs, strict=True):
            assert output.logprobs == pytest.approx(reference_logprobs(kept, chat, output.token_ids), abs=1e-4)


def test_the_budget_drops_the_oldest_rows_but_not_those_a_batch_awaits():
    row = torch.zeros((2, 2, 1, 40, 4))  # 2 layers, 40 tokens: 2560 bytes
    turns = TurnCache(budget_bytes=3 * 2560)
    for start in range(3):
        turns.keep(list(range(start * 100, start * 100 + 40)), row)
    matched = turns.match([list(range(0, 40)) + [5, 6]])  # the oldest row is awaited by a batch
    assert matched == {0: (0, 40)}
    turns.keep(list(range(300, 340)), row)  # the next oldest goes instead
    assert turns.match([list(range(100, 140)) + [1]]) == {}
    assert turns.match([list(range(200, 240)) + [1]]) == {0: (2, 40)}
    turns.drop([2])
    turns.keep(list(range(400, 440)), row)
    turns.keep(list(range(500, 540)), row)
    assert len(turns) == 3 and turns.used_bytes == 3 * 2560
    assert TurnCache(budget_bytes=0).match([list(range(40))]) == {}


def test_games_alike_so_far_share_one_kept_row_across_batches(tiny_model, tiny_tokenizer):
    """Two episodes with the same conversation so far match the same kept row, even in different batches."""
    params = SamplingParams(max_new_tokens=6)
    engine = HFEngine(tiny_model, tiny_tokenizer, batch_size=2)
    plain = HFEngine(tiny_model, tiny_tokenizer, batch_size=2, turn_cache_mib=0)
    chats = [[{"role": "user", "content": GAMES[0]}] for _ in range(3)] + [[{"role": "user", "content": GAMES[1]}]]
    for _ in range(3):
        outputs, expected = engine.generate(chats, params), plain.generate(chats, params)
        assert [output.token_ids for output in outputs] == [output.token_ids for output in expected]
        for chat, output in zip(chats, outputs, strict=True):
            chat.extend([{"role": "assistant", "content": output.text}, {"role": "user", "content": "go on ."}])
    assert engine.turns.reused_tokens > 0 and len(engine.turns) == 2  # one copy of the three alike
