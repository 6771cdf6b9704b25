"""GPU check in one call: the `cuda` tests, then fold steps beside TRL's `SDFTTrainer`, with ratios.

1. Runs the `cuda`-marked unit tests (`pytest -m cuda` on the files of tests/unit that use the mark)
   in a subprocess and prints pytest's summary line.
2. The decode check (unless --no-decode): the HF engine's `generate` alone on each shape at the first
   size, decode graphs (engines.graphs) on and off, the same prompts and seeds: tokens/s of each (a
   second call, after one that includes the capture), the ratio, and how many rows came out the same
   (bf16: a few may part ways on near-tied tokens).
3. For each size x shape (batch x completion tokens; every shape at the first size before the next
   size), runs fold steps on a Llama-shaped model built in
   code with random weights (nothing fetched) and the code-built BPE tokenizer of tests/tiny.py, padded
   with added tokens to the model's vocabulary, on each side in turn, in this process:
   - skillfold: `learners.fold.fold` through `engines.hf.HFEngine` with the settings of
     benchmarks/bench_fold.py (`fold_config`: method opsd, teacher self-frozen, loss reverse_kl, LoRA
     r16 alpha 32 on every linear layer, AdamW lr 5e-4, grad-norm clip 1, sampling temperature 1, every
     completion exactly `completion` tokens; micro_batch by device unless --micro-batch, decode graphs
     unless --cuda-graphs off); the step's phases (rollout, teacher pass, student passes and update) are
     timed too;
   - TRL: `trl.experimental.sdft.SDFTTrainer` (teacher_model_kind base, distillation_mode full_logits,
     distillation_alpha 1.0: its reverse KL over the full vocabulary), the same LoRA, optimizer and lengths.
   Same model (same seed), prompts (the `toy` family's train items, in the order the fold drew them,
   checked per step), privileged context (3 solved toy examples), batch and lengths.
   Shapes: `default` = SmolLM2-135M's (hidden 576, 30 layers, 9/3 heads, MLP 1536, vocab 49152, tied),
   `1.5b` = Qwen2.5-1.5B's as a LlamaConfig (hidden 1536, 28 layers, 12/2 heads, MLP 8960, vocab 49152,
   tied; 1.39B parameters), `tiny` (CPU mode) = 4 layers, hidden 64, vocab 512.
   On CUDA the model is bf16 (LoRA and optimizer state fp32, as each side makes them); on CPU fp32.

Figures, over the timed steps (`--steps` in all, the first a warm-up not counted):
  tokens/s = (completion tokens generated + completion tokens trained) / step time (CUDA synchronised
  at each step's end);
  peak memory = torch.cuda.max_memory_allocated over the side's whole run, warm-up included (CPU mode:
  the process's peak RSS, VmHWM, reset before each side; indicative only: both sides share a process);
  "load" = what was allocated once the model was built, so peak - load is what training adds;
  MFU = model FLOPs / step time / peak FLOP/s, with the FLOP model
      FLOPs = 2·N·generated + 2·N·trained (the teacher's scoring pass) + 6·N·trained (the student's
              forward and backward),
  N = the model's parameters less the input embedding table (a tied lm head counted once, as the
  matmul it is). Prompt positions (prefill, teacher prompt), attention scores and the LoRA matmuls
  are not counted, and the 6·N backward is the full-model convention (a LoRA backward skips the base
  weights' gradients), so this understates and overstates in equal measure on both sides: the MFU ratio
  is the tokens/s ratio. Peak: 989 TFLOP/s (H200 SXM, dense bf16, datasheet; `--peak-tflops`); CPU
  mode: a measured fp32 matmul rate.
Prints one markdown table per case with the ratios skillfold / TRL; writes everything as JSON with --out
(after each case, so a run cut short keeps what it measured). Without `trl` it says so and prints our
figures alone. Exits non-zero when a test, a side or the prompt check failed.

    H200:  python3 benchmarks/gpu_check.py --out gpu_check.json          (8 x 256 and 32 x 512, both shapes)
    CPU:   .venv/bin/python benchmarks/gpu_check.py --cpu --steps 2      (tiny shape, 2 x 16)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_fold import (  # noqa: E402  (after the path fix; no side effects)
    LORA_ALPHA,
    LORA_DROPOUT,
    LORA_RANK,
    TARGET_MEMORY,
    TARGET_THROUGHPUT,
    RecordingFamily,
    fold_config,
    fold_default,
    micro_batch_argument,
    summarise,
)

SHAPES: dict[str, dict] = {
    "tiny": dict(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128, vocab=512, tied=True),
    "default": dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, tied=True),
    "1.5b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=49152, tied=True),
}
H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s, H200 SXM datasheet (KINDS.md measured ~790e12 on 8192^3 matmuls)
FAMILY = "toy"
EXAMPLES = 3
PHASES = ("rollout", "teacher", "update")  # the fold's per-step phase timings (record[f"{phase}_seconds"])


# ----------------------------------------------------------------------------------- building blocks
def build_tokenizer(vocab: int):
    """tests/tiny.py's byte-level BPE (~400 tokens) padded with added tokens `<|xN|>` to exactly `vocab`,
    so every id a random model samples decodes to text that encodes back to the same id (bar the odd
    lone byte of the BPE's own alphabet)."""
    from tests.tiny import build_tokenizer as tiny_tokenizer

    tokenizer = tiny_tokenizer()
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary {vocab}")
    tokenizer.add_tokens([f"<|x{index}|>" for index in range(vocab - len(tokenizer))])
    assert len(tokenizer) == vocab
    return tokenizer


def build_model(shape: dict, tokenizer, device: str, dtype, seed: int):
    """A LlamaForCausalLM of `shape` with random weights (the same for the same seed), built on `device`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=8192,
        tie_word_embeddings=shape["tied"], eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def flop_parameters(model) -> int:
    """N of the FLOP model: every parameter but the input embedding table (a tied head counts once)."""
    total = sum(parameter.numel() for parameter in model.parameters())  # parameters() counts a tied one once
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    return total if tied else total - embedding.numel()


def inputs():
    """The toy family, its train item indices and the privileged context (3 solved examples)."""
    from envs import make_family

    family = make_family(FAMILY)
    size = family.split_size("train")
    examples = []
    for index in range(size - EXAMPLES, size):  # the last items: solved examples
        question = family.make("train", index).initial_observation()[-1].content
        examples.append(f"Question: {question}\nAnswer: {question.rsplit(': ', 1)[-1]}")
    privileged = "Solved examples of this task:\n\n" + "\n\n".join(examples)
    return family, list(range(size)), privileged


class Memory:
    """Peak memory of one side: CUDA allocations, or the process's peak RSS (VmHWM, reset on start)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.load_mib = 0.0

    def loaded(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.load_mib = torch.cuda.memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        else:
            self.load_mib = _status_mib("VmRSS")
            try:
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            except OSError:
                pass

    def peak_mib(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        peak = _status_mib("VmHWM")
        return peak if math.isfinite(peak) else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def synchronize(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------- the sides
def run_skillfold(name: str, batch: int, completion: int, arguments, tokenizer) -> dict:
    import torch

    from engines.hf import HFEngine
    from learners.fold import FoldItem, fold
    from learners.passes import rows_per_pass

    cuda = not arguments.cpu
    family, indices, privileged = inputs()
    from envs.base import Message

    context = [Message(role="user", content=privileged)]  # as bench_fold: one user message before the question
    memory = Memory(cuda)
    model = build_model(SHAPES[name], tokenizer, "cpu" if arguments.cpu else "cuda",
                        torch.float32 if arguments.cpu else torch.bfloat16, arguments.seed)
    parameters = flop_parameters(model)
    engine = HFEngine(model, tokenizer, model_name=f"random-{name}", batch_size=batch, packed_weights=arguments.cpu,
                      cuda_graphs=arguments.cuda_graphs == "on")
    memory.loaded()
    recorder = RecordingFamily(family)
    items = [FoldItem(family=family.name, index=index, context=context) for index in indices]
    config = fold_config(SimpleNamespace(
        steps=arguments.steps - 1, batch=batch, lr=arguments.lr, completion=completion, fixed_length="on",
        seed=arguments.seed, gradient_checkpointing=arguments.gradient_checkpointing, heap="default",
        micro_batch=arguments.micro_batch))
    marks, records = [time.perf_counter()], []

    def on_step(record) -> None:
        synchronize(cuda)
        marks.append(time.perf_counter())
        records.append(dict(record))

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        fold(engine, {family.name: recorder}, items, config, Path(scratch) / "fold", on_step=on_step)
    peak = memory.peak_mib()
    made = recorder.made
    prompts = [family.make("train", index).initial_observation()[-1].content for index in made]
    graphs = engine._graphs.captures if engine._graphs is not None else None
    del engine, model
    return {
        "side": "skillfold", "load_mib": memory.load_mib, "peak_mib": peak, "flop_parameters": parameters,
        "seconds": [later - earlier for earlier, later in zip(marks, marks[1:], strict=False)],
        "generated": [record["generated_tokens"] for record in records],
        "trained": [record["trained_tokens"] for record in records],
        "loss": [record["loss"] for record in records],
        "phases": {phase: [record.get(f"{phase}_seconds") for record in records] for phase in PHASES},
        "order": made, "prompts": [sorted(prompts[start:start + batch]) for start in range(0, len(prompts), batch)],
        "settings": {"micro_batch": rows_per_pass(config.micro_batch, torch.device("cpu" if arguments.cpu else "cuda")),
                     "gradient_checkpointing": config.gradient_checkpointing, "packed_weights": arguments.cpu,
                     "cuda_graphs": arguments.cuda_graphs, "graphs_captured": graphs},
    }


def run_trl(name: str, batch: int, completion: int, arguments, tokenizer, order: list[int]) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from learners.fold import ALL_LINEAR

    cuda = not arguments.cpu
    family, _, privileged = inputs()
    memory = Memory(cuda)
    model = build_model(SHAPES[name], tokenizer, "cpu" if arguments.cpu else "cuda",
                        torch.float32 if arguments.cpu else torch.bfloat16, arguments.seed)
    memory.loaded()
    rows = [{"prompt": [message.as_dict() for message in family.make("train", index).initial_observation()],
             "privileged_context": privileged} for index in order]

    class Recorder(TrainerCallback):
        def __init__(self) -> None:
            self.started, self.seconds, self.generated, self.prompts, self.loss = 0.0, [], [], [], []

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize(cuda)
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(cuda)
            self.seconds.append(time.perf_counter() - self.started)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss.append(float(logs["loss"]))

        def on_generation_prompts_selected(self, args, state, control, generation_prompts=None, **kwargs):
            self.prompts.append(sorted(prompt[-1]["content"] for prompt in generation_prompts))

        def on_self_distillation_batch_prepared(self, args, state, control, completion_ids=None,
                                                teacher_attention_mask=None, **kwargs):
            # the completion part of the teacher mask: the tokens generated, and those trained
            width = completion_ids.size(1)
            self.generated.append(int(teacher_attention_mask[:, teacher_attention_mask.size(1) - width:].sum()))

    recorder = Recorder()
    with tempfile.TemporaryDirectory(prefix="gpu-check-sdft-") as scratch:
        config = SDFTConfig(
            output_dir=scratch, use_cpu=arguments.cpu, bf16=cuda, fp16=False,
            gradient_checkpointing=arguments.trl_gradient_checkpointing == "on",
            per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_generations=1,
            max_steps=arguments.steps, learning_rate=arguments.lr, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", seed=arguments.seed,
            max_completion_length=completion, temperature=1.0, top_p=1.0, top_k=0,
            teacher_model_kind="base", distillation_mode="full_logits", distillation_alpha=1.0,
            distillation_is_clip=None, num_loss_tokens_to_skip=0, generate_from_teacher=False,
            shuffle_dataset=False, disable_dropout=True, logging_steps=1, report_to="none", save_strategy="no",
            disable_tqdm=True, dataloader_num_workers=0, generation_kwargs={"min_new_tokens": completion},
        )
        peft_config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                                 target_modules=list(ALL_LINEAR), task_type="CAUSAL_LM")
        trainer = SDFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer, callbacks=[recorder], peft_config=peft_config)
        with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints every log dict
            trainer.train()
        del trainer
    peak = memory.peak_mib()
    del model
    return {
        "side": "trl", "load_mib": memory.load_mib, "peak_mib": peak, "seconds": recorder.seconds,
        "generated": recorder.generated, "trained": list(recorder.generated), "loss": recorder.loss,
        "prompts": recorder.prompts,
        "settings": {"gradient_checkpointing": config.gradient_checkpointing, "bf16": config.bf16},
    }


def run_decode(name: str, batch: int, completion: int, arguments, tokenizer) -> dict:
    """The HF engine's `generate` alone on shape `name`, decode graphs on and off (engines.graphs): `batch`
    toy prompts, exactly `completion` sampled tokens each, the same seeds; each side's first call (the
    graphs' capture included) and a second, timed, call. CPU mode runs the graphs' static decoder
    uncaptured against the CPU's own decode (a check that the path runs, not a speed figure)."""
    import torch

    from engines.base import SamplingParams
    from engines.graphs import DecodeGraphs
    from engines.hf import HFEngine

    family, indices, _ = inputs()
    cuda = not arguments.cpu
    model = build_model(SHAPES[name], tokenizer, "cpu" if arguments.cpu else "cuda",
                        torch.float32 if arguments.cpu else torch.bfloat16, arguments.seed)
    chats = [[message.as_dict() for message in family.make("train", index).initial_observation()]
             for index in indices[:batch]]
    params = SamplingParams(temperature=1.0, max_new_tokens=completion, min_tokens=completion, seed=arguments.seed)
    result: dict = {"shape": name, "batch": batch, "completion": completion}
    tokens = {}
    for graphs in ("on", "off"):
        engine = HFEngine(model, tokenizer, model_name=f"random-{name}", batch_size=batch,
                          packed_weights=arguments.cpu, turn_cache_mib=0, cuda_graphs=graphs == "on")
        if arguments.cpu and graphs == "on":  # CPU mode: the graphs' static decoder, run without a capture
            engine._graphs = DecodeGraphs(capture=False)
        seconds = []
        for _ in range(2):
            synchronize(cuda)
            started = time.perf_counter()
            generations = engine.generate(chats, params)
            synchronize(cuda)
            seconds.append(time.perf_counter() - started)
        generated = sum(len(generation.token_ids) for generation in generations)
        tokens[graphs] = [generation.token_ids for generation in generations]
        result[f"graphs_{graphs}"] = {"first_s": seconds[0], "timed_s": seconds[1], "generated": generated,
                                      "tokens_per_s": generated / seconds[1],
                                      "captured": engine._graphs.captures if engine._graphs is not None else None}
        del engine
    result["ratio"] = result["graphs_on"]["tokens_per_s"] / result["graphs_off"]["tokens_per_s"]
    result["same_rows"] = sum(one == other for one, other in zip(tokens["on"], tokens["off"], strict=True))
    del model
    return result


# ------------------------------------------------------------------------------------------- figures
def figures(result: dict, parameters: int, peak_flops: float) -> dict:
    """bench_fold's per-step summary plus memory and MFU (the FLOP model of the module docstring)."""
    summary = summarise(result)
    seconds = summary["s_per_step"]
    flops = parameters * (2 * summary["generated_per_step"] + 8 * summary["trained_per_step"])
    phases = {phase: values[1:] for phase, values in result.get("phases", {}).items()}  # the timed steps
    phases = {phase: sum(values) / len(values) for phase, values in phases.items()
              if values and all(value is not None for value in values)}
    return {**summary, "peak_mib": result["peak_mib"], "load_mib": result["load_mib"],
            "added_mib": result["peak_mib"] - result["load_mib"], "flops_per_step": flops,
            "mfu": flops / seconds / peak_flops, "phase_s": phases}


def cpu_peak_flops() -> float:
    """The fp32 matmul rate of this CPU at the configured threads (MFU's peak in CPU mode)."""
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(2):
        a @ b
    started, repeats = time.perf_counter(), 8
    for _ in range(repeats):
        a @ b
    return 2 * 1024**3 * repeats / (time.perf_counter() - started)


def run_cuda_tests(timeout: int) -> dict:
    """`pytest -m cuda` over the unit-test files that use the mark; pytest's summary line."""
    files = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests" / "unit").glob("test_*.py")
                   if "mark.cuda" in path.read_text())
    if not files:
        return {"files": [], "returncode": 0, "summary": "no cuda-marked tests found"}
    command = [sys.executable, "-m", "pytest", "-m", "cuda", *files, "-q", "-p", "no:cacheprovider"]
    try:
        completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        return {"files": files, "returncode": 124, "summary": f"timed out after {timeout} s", "tail": output[-3000:]}
    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    return {"files": files, "returncode": completed.returncode, "summary": lines[-1] if lines else "(no output)",
            "tail": (completed.stdout + completed.stderr)[-3000:] if completed.returncode else ""}


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    found = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
             "python": platform.python_version()}
    try:
        import trl

        found["trl"] = trl.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(0)
    return found


def table(case: dict, memory_unit: str) -> list[str]:
    scale = 1024 if memory_unit == "GiB" else 1
    lines = [f"\n### {case['shape']} ({case['parameters'] / 1e6:.3g}M parameters), batch {case['batch']} x "
             f"{case['completion']} completion tokens{', ' + case['variant'] if case.get('variant') else ''}",
             f"| side | s/step | generated tok/step | trained tok/step | tokens/s | peak {memory_unit} "
             f"| load {memory_unit} | peak - load {memory_unit} | MFU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for side, label in (("skillfold", "skillfold `fold`"), ("trl", "TRL `SDFTTrainer`")):
        row = case.get(side)
        if isinstance(row, dict) and "tokens_per_s" in row:
            lines.append(f"| {label} | {row['s_per_step']:.2f} | {row['generated_per_step']:.0f} "
                         f"| {row['trained_per_step']:.0f} | {row['tokens_per_s']:.0f} | {row['peak_mib'] / scale:.2f} "
                         f"| {row['load_mib'] / scale:.2f} | {row['added_mib'] / scale:.2f} | {100 * row['mfu']:.3g}% |")
        elif case.get(f"{side}_error"):
            lines.append(f"| {label} | failed: {case[f'{side}_error'].strip().splitlines()[-1][:150]} |")
    ratios = case.get("ratios")
    if ratios:
        lines.append(f"| **skillfold / TRL** | | | | **{ratios['tokens_per_s']:.2f}x** | **{ratios['peak']:.2f}x** "
                     f"| | {ratios['added']:.2f}x | {ratios['mfu']:.2f}x |")
        lines.append(f"- targets: tokens/s >= {TARGET_THROUGHPUT}x "
                     f"({'met' if ratios['tokens_per_s'] >= TARGET_THROUGHPUT else 'missed'}), peak memory <= "
                     f"{TARGET_MEMORY}x ({'met' if ratios['peak'] <= TARGET_MEMORY else 'missed'}); same prompts per "
                     f"step on both sides: {'yes' if case['same_prompts'] else 'NO'}")
    phases = case.get("skillfold", {}).get("phase_s") if isinstance(case.get("skillfold"), dict) else None
    if phases:
        lines.append("- skillfold s/step by phase: " + ", ".join(f"{phase} {value:.2f}" for phase, value in phases.items()))
    if case.get("loss"):
        lines.append(f"- loss per step: {case['loss']}")
    return lines


# -------------------------------------------------------------------------------------------- main
def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="CPU mode: fp32, shape tiny, 2 x 16 tokens by default")
    parser.add_argument("--shapes", default=None, help=f"comma-separated, of {', '.join(SHAPES)} "
                        "(default: default,1.5b; CPU: tiny)")
    parser.add_argument("--sizes", default=None, help="comma-separated BATCHxCOMPLETION (default: 8x256,32x512; CPU: 2x16)")
    parser.add_argument("--steps", type=int, default=3, help="fold steps per side, the first a warm-up not counted")
    parser.add_argument("--no-trl", action="store_true", help="our side only")
    parser.add_argument("--no-tests", action="store_true", help="skip the cuda-marked tests")
    parser.add_argument("--tests-timeout", type=int, default=180)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no further side after this many seconds (default: 360 on CUDA, none on CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="MFU's peak (default: 989, H200 dense bf16; CPU: a measured fp32 matmul rate)")
    parser.add_argument("--micro-batch", type=micro_batch_argument, default=fold_default("micro_batch"),
                        help="skillfold: FoldConfig.micro_batch (episodes per student pass; 0 = the whole batch; "
                        "auto = by device: 0 on a GPU, 1 on a CPU)")
    parser.add_argument("--gradient-checkpointing", choices=["on", "off"], default="off",
                        help="skillfold: FoldConfig.gradient_checkpointing")
    parser.add_argument("--cuda-graphs", choices=["on", "off"], default="on",
                        help="skillfold: the HF engine's decode graphs (EngineConfig.cuda_graphs)")
    parser.add_argument("--checkpointing-variant", choices=["on", "off"], default=None,
                        help="after the first size, the largest shape again with our gradient checkpointing flipped "
                        "(ours alone, against that case's TRL side; default: on on CUDA, off on CPU)")
    parser.add_argument("--no-decode", action="store_true",
                        help="skip the decode check (generate alone, graphs on and off, each shape at the first size)")
    parser.add_argument("--trl-gradient-checkpointing", choices=["on", "off"], default="on",
                        help="TRL side; SDFTConfig default on")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="CPU mode: torch threads")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    arguments = parser.parse_args(argv)
    arguments.shapes = [s for s in (arguments.shapes or ("tiny" if arguments.cpu else "default,1.5b")).split(",") if s]
    unknown = [s for s in arguments.shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; known: {list(SHAPES)}")
    try:
        arguments.sizes = [tuple(int(v) for v in size.lower().split("x")) for size in
                           (arguments.sizes or ("2x16" if arguments.cpu else "8x256,32x512")).split(",") if size]
        assert all(len(size) == 2 and min(size) >= 1 for size in arguments.sizes)
    except (ValueError, AssertionError):
        parser.error("--sizes takes BATCHxCOMPLETION[,...], e.g. 8x256,32x512")
    if arguments.steps < 2:
        parser.error("--steps must be at least 2 (one warm-up, one timed)")
    arguments.checkpointing_variant = (not arguments.cpu if arguments.checkpointing_variant is None
                                       else arguments.checkpointing_variant == "on")
    if arguments.budget_s is None:
        arguments.budget_s = 0.0 if arguments.cpu else 360.0
    return arguments


def main(argv: list[str] | None = None) -> dict:
    arguments = parse(argv)
    started = time.perf_counter()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if not arguments.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --cpu for the small CPU check")
    try:
        import pydantic  # noqa: F401  (skillfold's records; not on every GPU image)
    except ImportError:
        raise SystemExit("pydantic is missing (skillfold needs it): carry its wheels (pydantic, pydantic-core, "
                         "annotated-types, typing-inspection) and put them on PYTHONPATH") from None
    if arguments.cpu:
        torch.set_num_threads(arguments.threads)
    peak_flops = (arguments.peak_tflops * 1e12 if arguments.peak_tflops else
                  cpu_peak_flops() if arguments.cpu else H200_BF16_PEAK)
    report: dict = {"settings": {key: value for key, value in vars(arguments).items() if key != "out"},
                    "peak_flops": peak_flops, "versions": versions(), "cases": [], "failed": []}
    report["settings"]["out"] = str(arguments.out) if arguments.out else None

    def save() -> None:
        if arguments.out:
            arguments.out.write_text(json.dumps(report, indent=2, default=str))

    print(f"gpu_check: {'CPU' if arguments.cpu else 'CUDA'}, {report['versions']}", flush=True)
    if not arguments.no_tests:
        tests = run_cuda_tests(arguments.tests_timeout)
        report["tests"] = tests
        print(f"cuda tests ({', '.join(tests['files']) or 'none'}): {tests['summary']}", flush=True)
        if tests["returncode"] not in (0, 5):  # 5: nothing collected
            report["failed"].append("cuda tests")
            print(tests.get("tail", ""), flush=True)
        save()
    tokenizers: dict[int, object] = {}

    def tokenizer_for(name: str):
        vocab = SHAPES[name]["vocab"]
        if vocab not in tokenizers:
            tokenizers[vocab] = build_tokenizer(vocab)
        return copy.deepcopy(tokenizers[vocab])

    if not arguments.no_decode:
        batch, completion = arguments.sizes[0]
        report["decode"] = []
        for name in arguments.shapes:
            print(f"decode {name} {batch}x{completion}: generate, graphs on and off ...", flush=True)
            try:
                check = run_decode(name, batch, completion, arguments, tokenizer_for(name))
            except Exception:  # noqa: BLE001
                report["failed"].append(f"decode {name}")
                report["decode"].append({"shape": name, "error": traceback.format_exc()})
                print(report["decode"][-1]["error"][-3000:], flush=True)
                continue
            finally:
                free(not arguments.cpu)
            report["decode"].append(check)
            on, off = check["graphs_on"], check["graphs_off"]
            print(f"  graphs on {on['tokens_per_s']:.0f} tok/s ({on['timed_s']:.2f} s; first call {on['first_s']:.2f} s, "
                  f"{on['captured']} {'built, uncaptured on a CPU' if arguments.cpu else 'captured'}), off {off['tokens_per_s']:.0f} tok/s ({off['timed_s']:.2f} s): "
                  f"**{check['ratio']:.2f}x**; rows identical {check['same_rows']}/{batch}", flush=True)
        save()
    trl_side = not arguments.no_trl
    if trl_side:
        try:
            import trl.experimental.sdft  # noqa: F401
        except ImportError as error:
            trl_side = False
            report["trl_missing"] = str(error)
            print(f"TRL is not installed here ({error}): skillfold's figures alone, no ratios", flush=True)

    # every shape at the first size before any at the next; after the first size, the largest shape again
    # with our gradient checkpointing flipped (ours alone, against that case's TRL side)
    plan = [(batch, completion, name, None) for batch, completion in arguments.sizes[:1] for name in arguments.shapes]
    if arguments.checkpointing_variant:
        plan.append((*arguments.sizes[0], arguments.shapes[-1], "checkpointing"))
    plan += [(batch, completion, name, None) for batch, completion in arguments.sizes[1:] for name in arguments.shapes]
    for batch, completion, name, variant in plan:
        case: dict = {"shape": name, "batch": batch, "completion": completion}
        side_arguments = arguments
        if variant:
            flipped = "off" if arguments.gradient_checkpointing == "on" else "on"
            side_arguments = argparse.Namespace(**{**vars(arguments), "gradient_checkpointing": flipped})
            case["variant"] = f"skillfold gradient checkpointing {flipped}"
        report["cases"].append(case)
        results: dict = {}
        sides = ["skillfold", "trl"] if trl_side and not variant else ["skillfold"]
        for side in sides:
            elapsed = time.perf_counter() - started
            if arguments.budget_s and elapsed > arguments.budget_s:
                case[f"{side}_error"] = f"skipped: {elapsed:.0f} s spent, over the --budget-s {arguments.budget_s:.0f}"
                continue
            if side == "trl" and "skillfold" not in results:
                case["trl_error"] = "skipped: it needs the prompt order of our side, which failed"
                continue
            print(f"{name} {batch}x{completion}{f' ({variant})' if variant else ''}: {side} ({arguments.steps} steps) ...",
                  flush=True)
            tokenizer = tokenizer_for(name)
            side_started = time.perf_counter()
            try:
                if side == "skillfold":
                    results[side] = run_skillfold(name, batch, completion, side_arguments, tokenizer)
                else:
                    results[side] = run_trl(name, batch, completion, arguments, tokenizer, results["skillfold"]["order"])
            except Exception:  # noqa: BLE001  (a GPU run is precious: report it, go on with the rest)
                case[f"{side}_error"] = traceback.format_exc()
                report["failed"].append(f"{name} {batch}x{completion}{f' {variant}' if variant else ''} {side}")
                print(case[f"{side}_error"][-3000:], flush=True)
            finally:
                free(not arguments.cpu)
            if side in results:
                results[side]["wall_s"] = time.perf_counter() - side_started
                print(f"  done in {results[side]['wall_s']:.0f} s", flush=True)
        if variant and "skillfold" in results:  # TRL's side of the same shape and size, run above
            base = next((other for other in report["cases"] if not other.get("variant") and other["shape"] == name
                         and (other["batch"], other["completion"]) == (batch, completion) and "trl_raw" in other), None)
            if base is not None:
                results["trl"] = base["trl_raw"]
        if "skillfold" in results:
            case["parameters"] = results["skillfold"]["flop_parameters"]
            for side, result in results.items():
                case[side] = figures(result, case["parameters"], peak_flops)
                case[f"{side}_raw"] = result
            case["loss"] = {side: [round(value, 4) for value in result["loss"]] for side, result in results.items()}
        if "skillfold" in results and "trl" in results:
            ours, theirs = case["skillfold"], case["trl"]
            case["ratios"] = {"tokens_per_s": ours["tokens_per_s"] / theirs["tokens_per_s"],
                              "peak": ours["peak_mib"] / theirs["peak_mib"],
                              "added": ours["added_mib"] / max(theirs["added_mib"], 1e-9),
                              "mfu": ours["mfu"] / theirs["mfu"]}
            steps_prompts = results["skillfold"]["prompts"]
            case["same_prompts"] = steps_prompts == results["trl"]["prompts"]
            if not case["same_prompts"]:
                report["failed"].append(f"{name} {batch}x{completion}: different prompts on the two sides")
        if "parameters" in case:
            print("\n".join(table(case, "MiB" if arguments.cpu else "GiB")), flush=True)
        save()

    report["seconds"] = time.perf_counter() - started
    print(f"\n- FLOP model: 2N·generated + 2N·trained (teacher) + 6N·trained (student), N = parameters less the "
          f"input embedding; MFU peak {peak_flops / 1e12:.3g} TFLOP/s"
          f"{' (measured fp32 matmul)' if arguments.cpu and not arguments.peak_tflops else ''}")
    print(f"- tokens/s = (generated + trained completion tokens) / step time over {arguments.steps - 1} timed steps "
          f"after 1 warm-up; peak = {'peak RSS (VmHWM) of the process' if arguments.cpu else 'torch.cuda.max_memory_allocated'}"
          f" per side, warm-up included; toy family prompts, privileged context of {EXAMPLES} solved examples")
    print(f"- skillfold: bench_fold.fold_config (opsd, self-frozen teacher, reverse_kl), micro_batch "
          f"{'auto (0 on a GPU, 1 on a CPU)' if arguments.micro_batch is None else arguments.micro_batch}, gradient "
          f"checkpointing {arguments.gradient_checkpointing}, decode graphs {arguments.cuda_graphs}"
          f"{' (CUDA only)' if arguments.cpu else ''}; TRL: SDFTTrainer full_logits reverse KL, gradient "
          f"checkpointing {arguments.trl_gradient_checkpointing}{', bf16 autocast' if not arguments.cpu else ''}")
    print(f"- total {report['seconds']:.0f} s; failed: {', '.join(report['failed']) or 'nothing'}", flush=True)
    save()
    return report


if __name__ == "__main__":
    outcome = main()
    sys.exit(1 if outcome["failed"] else 0)
