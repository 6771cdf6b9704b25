"""Batched generation throughput: skillfold's HF engine beside plain transformers `generate`.

Same model, same prompts (held-out items of several reasoning-gym families), greedy decoding, the
same token budget, in one process. Competitors:
  - naive: `model.generate` one prompt at a time (what a simple agent loop does);
  - hf-batched: `model.generate` on left-padded batches of the same size as ours;
  - skillfold: `HFEngine.generate` at batch 1, 8 and 32.
Every side generates until EOS or the budget, so all sides do the same work (greedy outputs are
checked to agree). Prints a markdown table with tokens/s and the ratio to the naive loop.

With `--skills N`, every prompt is a memory-on prompt: its family's N worked examples (solved train
items, as user/assistant turns, the same for every item of the family) come before the question, as
the agent's retrieved skills do. Prompts of the 4 families alternate, so each batch holds 4 contexts;
skillfold runs each shared context once per batch (`engines.prefix`), HF `generate` runs every row.

    .venv/bin/python benchmarks/bench_engine.py [--prompts 32] [--max-new-tokens 64] [--skills 0]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

EXAMPLE_INDEX = 4000  # train items whose solutions make the worked examples


def build_prompts(count: int, skills: int = 0) -> list[list[dict[str, str]]]:
    from envs import make_family

    families = ["rg:leg_counting", "rg:basic_arithmetic", "rg:letter_counting", "rg:spell_backward"]
    prompts = []
    for index in range(count):
        family = make_family(families[index % len(families)])
        context = []
        for offset in range(skills):  # worked examples: the family's solved train items as dialogue turns
            example = family.make("train", EXAMPLE_INDEX + offset)
            question = [message.as_dict() for message in example.initial_observation() if message.role == "user"]
            context += [*question, {"role": "assistant", "content": str(example.entry["answer"])}]
        environment = family.make("eval", index)
        prompts.append([*context, *[message.as_dict() for message in environment.initial_observation()]])
    return prompts


def naive_loop(engine, prompts, max_new_tokens: int) -> tuple[float, int, list[list[int]]]:
    started = time.perf_counter()
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([engine.encode(prompt)])
        with torch.inference_mode():
            generated = engine.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=engine.pad_id,
            )
        outputs.append(generated[0, ids.shape[1]:].tolist())
    return time.perf_counter() - started, sum(len(output) for output in outputs), outputs


def hf_batched(engine, prompts, max_new_tokens: int, batch_size: int) -> tuple[float, int]:
    started = time.perf_counter()
    tokens = 0
    for start in range(0, len(prompts), batch_size):
        chunk = [engine.encode(prompt) for prompt in prompts[start:start + batch_size]]
        input_ids, attention_mask, _ = engine._left_pad(chunk)
        with torch.inference_mode():
            generated = engine.model.generate(
                input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=engine.pad_id,
            )
        new = generated[:, input_ids.shape[1]:]
        for row in new.tolist():
            # count up to and including the first EOS, as the other sides do
            length = next((i + 1 for i, token in enumerate(row) if token in engine.stop_ids), len(row))
            tokens += length
    return time.perf_counter() - started, tokens


def strip_eos(tokens: list[int], stop_ids: set[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: index + 1]
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skills", type=int, default=0, help="worked examples before every question (memory on)")
    arguments = parser.parse_args()

    import transformers

    from engines.base import SamplingParams
    from engines.hf import HFEngine

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    engine = HFEngine.load(threads=arguments.threads)
    prompts = build_prompts(arguments.prompts, arguments.skills)
    params = SamplingParams(max_new_tokens=arguments.max_new_tokens)
    engine.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up

    rows = []
    # HF's sides run on the plain dense weights; ours packs them (engines.onednn), outside the timer
    engine.unpack_weights()
    naive_seconds, naive_tokens, naive_outputs = naive_loop(engine, prompts, arguments.max_new_tokens)
    naive_rate = naive_tokens / naive_seconds
    rows.append(("naive model.generate, one prompt at a time", 1, naive_tokens, naive_seconds, naive_rate))
    agreement = None
    for batch_size in (1, 8, 32):
        engine.batch_size = batch_size
        engine.pack_weights()
        started = time.perf_counter()
        outputs = engine.generate(prompts, params)
        seconds = time.perf_counter() - started
        tokens = sum(len(output.token_ids) for output in outputs)
        rows.append(("skillfold HFEngine.generate", batch_size, tokens, seconds, tokens / seconds))
        if batch_size == 1:
            same = sum(
                output.token_ids == strip_eos(reference, engine.stop_ids)
                for output, reference in zip(outputs, naive_outputs, strict=True)
            )
            agreement = f"{same}/{len(prompts)}"
        if batch_size > 1:
            engine.unpack_weights()
            hf_seconds, hf_tokens = hf_batched(engine, prompts, arguments.max_new_tokens, batch_size)
            rows.append(("HF model.generate, left-padded batch", batch_size, hf_tokens, hf_seconds, hf_tokens / hf_seconds))

    print(
        f"\nmodel SmolLM2-135M-Instruct fp32, {len(prompts)} prompts "
        f"({sum(len(engine.encode(p)) for p in prompts) / len(prompts):.0f} tokens on average, {arguments.skills} worked "
        f"examples each), greedy, <= {arguments.max_new_tokens} new tokens, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, {platform.processor() or platform.machine()}"
    )
    print(f"greedy outputs identical to the naive loop at batch 1: {agreement}\n")
    print("| generator | batch | tokens | seconds | tokens/s | vs naive |")
    print("|---|---|---|---|---|---|")
    for name, batch, tokens, seconds, rate in rows:
        print(f"| {name} | {batch} | {tokens} | {seconds:.1f} | {rate:.1f} | {rate / naive_rate:.2f}x |")


if __name__ == "__main__":
    main()
