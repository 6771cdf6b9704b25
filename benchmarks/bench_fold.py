"""Fold step: skillfold's on-policy self-distillation beside TRL's `SDFTTrainer`, tokens/s and peak RSS.

Both sides do the same job on the same inputs: the student (a fresh LoRA adapter, r16 alpha 32 on
every linear layer, no privileged context) samples one completion per prompt; the teacher (the same
weights with the adapter off) scores those tokens with a privileged context in its prompt; the loss
is the per-token reverse KL(student || teacher) over the full vocabulary; one AdamW step.
  - skillfold: `learners.fold.fold` (method opsd, teacher self-frozen, loss reverse_kl, computed in
    chunks from the final hidden states);
  - TRL: `trl.experimental.sdft.SDFTTrainer` (teacher_model_kind base, distillation_mode full_logits
    with distillation_alpha 1.0, which is its reverse KL over the full vocabulary).
Same model (the embedded SmolLM2-135M-Instruct, fp32), prompts (train items of rg:basic_arithmetic,
in the same order, the same prompts in every step on both sides: checked), privileged context (3
solved examples of the family, the same string), batch (completions per optimizer step),
completion budget, sampling (temperature 1, no top-p / top-k), learning rate (constant), grad-norm
clip, seed and thread count. Each side runs in its own subprocess, so its peak RSS
(`ru_maxrss`) is its own; "RSS after load" is taken once every weight has been read (the weights
are memory-mapped and count in RSS only when touched), so peak - load is what training adds.
One warm-up step, then `--steps` timed steps.

tokens/s = (completion tokens generated + completion tokens trained) / step time, summed over the
timed steps on each side. By default (--fixed-length on) every completion is exactly --completion
tokens on both sides (EOS held off), so both sides generate and train the same number of tokens and
tokens/s compares like with like; with it off each side stops at EOS and both counts are reported.
Heap: --heap capped makes our fold cap glibc's heap (FoldConfig.heap_threshold_kib 128,
engines.allocator: less memory, more time); --trl-heap capped gives TRL's process the same setting,
to show what is allocator and what is algorithm.
Prints a markdown table with the ratios skillfold / TRL. Exits non-zero only on a crash.

    .venv/bin/python benchmarks/bench_fold.py [--steps 3] [--batch 8] [--completion 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FAMILY = "rg:basic_arithmetic"
EXAMPLE_INDEX = 4000  # train items whose solutions make the privileged context, far from the prompts
EXAMPLES = 3
LORA_RANK, LORA_ALPHA, LORA_DROPOUT = 16, 32, 0.0
TARGET_THROUGHPUT, TARGET_MEMORY = 1.5, 0.6  # the targets: >= 1.5x tokens/s, <= 0.6x peak RSS


# ----------------------------------------------------------------------------- shared by both children
def rss_now_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def loaded(model) -> dict[str, float]:
    """RSS once the weights are resident: from_pretrained memory-maps the safetensors file, so the
    weights (513 MiB) only count in RSS once touched; read every one, then measure."""
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.sum()
    return {"rss_after_load_mib": rss_now_mib(), "peak_after_load_mib": peak_rss_mib()}


def inputs(batch: int, steps: int):
    """The family, the prompt item indices (one per completion, warm-up step included) and the
    privileged context: the same on both sides."""
    from envs import make_family

    family = make_family(FAMILY)
    examples = []
    for offset in range(EXAMPLES):
        environment = family.make("train", EXAMPLE_INDEX + offset)
        examples.append(f"Question: {environment.question.strip()}\nAnswer: {environment.entry['answer']}")
    privileged = "Solved examples of this task:\n\n" + "\n\n".join(examples)
    return family, list(range(batch * (steps + 1))), privileged


def fold_config(arguments):
    from engines.base import SamplingParams
    from learners.fold import ALL_LINEAR, FoldConfig

    total = arguments.steps + 1
    return FoldConfig(
        method="opsd", steps=total, batch_size=arguments.batch, learning_rate=arguments.lr, weight_decay=0.0,
        max_grad_norm=1.0, lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
        target_modules=list(ALL_LINEAR), loss="reverse_kl", teacher="self-frozen",
        sampling=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=arguments.completion,
                                min_tokens=arguments.completion if arguments.fixed_length == "on" else 0),
        max_turns=1, anchor_fraction=0.0, checkpoint_every=total, seed=arguments.seed,
        gradient_checkpointing=arguments.gradient_checkpointing == "on",
        heap_threshold_kib=128 if arguments.heap == "capped" else 0, micro_batch=arguments.micro_batch,
    )


def micro_batch_argument(value: str) -> int | None:
    """--micro-batch: a count, or auto (FoldConfig's None: by the model's device)."""
    if value in ("auto", "None"):
        return None
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError("--micro-batch takes 0 (the whole batch), a positive count, or auto")
    return number


def fold_default(name: str):
    from learners.fold import FoldConfig

    return FoldConfig.model_fields[name].default


def step_order(arguments, indices: list[int]) -> list[int]:
    """The item indices in the order skillfold's fold draws them (its seeded shuffle), so that TRL,
    fed the dataset in this order without shuffling, sees the same prompts in every step."""
    from learners.fold import FoldItem, _item_order

    order = _item_order([FoldItem(family=FAMILY, index=index) for index in indices], fold_config(arguments))
    return [item.index for item in order]


def chat_tokens(tokenizer, chat) -> int:
    return len(tokenizer.apply_chat_template(list(chat), add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"])


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


# --------------------------------------------------------------------------------- skillfold child
class RecordingFamily:
    """A task family that records which items it was asked for (the prompts of each fold step)."""

    def __init__(self, family) -> None:
        self.family = family
        self.made: list[int] = []

    def make(self, split, index):
        self.made.append(index)
        return self.family.make(split, index)

    def __getattr__(self, name):
        return getattr(self.family, name)


def run_skillfold(arguments) -> dict:
    import torch

    from engines.hf import HFEngine
    from envs.base import Message
    from learners.fold import FoldItem, fold

    torch.set_num_threads(arguments.threads)
    family, indices, privileged = inputs(arguments.batch, arguments.steps)
    engine = HFEngine.load(device="cpu", dtype="float32", threads=arguments.threads, batch_size=arguments.batch,
                           packed_weights=arguments.packed_weights == "on")
    load = loaded(engine.model)

    # the privileged context as one user message before the question (views put it after the leading
    # system messages: here the chat template's default system prompt), the closest in length to TRL's
    # "{prompt}\n\n{privileged_context}" in the question's own user message
    context = [Message(role="user", content=privileged)]
    items = [FoldItem(family=FAMILY, index=index, context=context) for index in indices]
    recorder = RecordingFamily(family)
    config = fold_config(arguments)
    with tempfile.TemporaryDirectory(prefix="bench-fold-") as scratch:
        run_dir = Path(scratch) / "fold"
        fold(engine, {FAMILY: recorder}, items, config, run_dir)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    peak = peak_rss_mib()

    questions = [family.make("train", index).initial_observation() for index in recorder.made]
    prompts = [[message.content for message in prompt if message.role == "user"][-1] for prompt in questions]
    student_tokens = [chat_tokens(engine.tokenizer, [m.as_dict() for m in prompt]) for prompt in questions]
    teacher_tokens = [chat_tokens(engine.tokenizer, [m.as_dict() for m in [*context, *prompt]]) for prompt in questions]
    batch = arguments.batch
    return {
        "side": "skillfold",
        **load,
        "peak_rss_mib": peak,
        "seconds": [record["seconds"] for record in records],
        "generated": [record["generated_tokens"] for record in records],
        "trained": [record["trained_tokens"] for record in records],
        "loss": [record["loss"] for record in records],
        "phases": {phase: [record.get(f"{phase}_seconds") for record in records]
                   for phase in ("rollout", "teacher", "update")},
        "prompts": [prompts[start:start + batch] for start in range(0, len(prompts), batch)],
        "student_prompt_tokens": sum(student_tokens) / len(student_tokens),
        "teacher_prompt_tokens": sum(teacher_tokens) / len(teacher_tokens),
        "threads": torch.get_num_threads(),
        "versions": versions(),
    }


# ------------------------------------------------------------------------------------- TRL child
def run_trl(arguments) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from engines.models import resolve_model
    from learners.fold import ALL_LINEAR

    torch.set_num_threads(arguments.threads)
    if arguments.trl_heap == "capped":  # the same glibc setting as our side (engines.allocator)
        from engines.allocator import cap_heap

        cap_heap(128)
    family, indices, privileged = inputs(arguments.batch, arguments.steps)
    location = resolve_model(None)  # the same model directory HFEngine.load() reads
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    load = loaded(model)

    order = step_order(arguments, indices)
    rows = []
    for index in order:
        prompt = [message.as_dict() for message in family.make("train", index).initial_observation()]
        rows.append({"prompt": prompt, "privileged_context": privileged})
    dataset = Dataset.from_list(rows)

    class Recorder(TrainerCallback):
        def __init__(self) -> None:
            self.started = 0.0
            self.seconds: list[float] = []
            self.generated: list[int] = []
            self.teacher_prompt_tokens: list[int] = []
            self.prompts: list[list[str]] = []
            self.loss: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss.append(float(logs["loss"]))

        # SDFTTrainer's own hooks (called on every callback that has them)
        def on_generation_prompts_selected(self, args, state, control, generation_prompts=None, **kwargs):
            self.prompts.append([prompt[-1]["content"] for prompt in generation_prompts])

        def on_self_distillation_batch_prepared(self, args, state, control, completion_ids=None,
                                                teacher_attention_mask=None, **kwargs):
            # teacher_attention_mask = [teacher prompt mask | completion mask]; the completion mask is
            # both what was generated (up to and including EOS) and the loss mask (no skipped tokens)
            width = completion_ids.size(1)
            self.generated.append(int(teacher_attention_mask[:, teacher_attention_mask.size(1) - width:].sum()))
            self.teacher_prompt_tokens += teacher_attention_mask[:, : teacher_attention_mask.size(1) - width].sum(
                -1).tolist()

    recorder = Recorder()
    with tempfile.TemporaryDirectory(prefix="bench-sdft-") as scratch:
        config = SDFTConfig(
            output_dir=scratch,
            use_cpu=True, bf16=False, fp16=False,  # fp32 (TRL's own default would be bf16)
            gradient_checkpointing=arguments.trl_gradient_checkpointing == "on",  # TRL's default: on
            per_device_train_batch_size=arguments.batch, gradient_accumulation_steps=1, num_generations=1,
            max_steps=arguments.steps + 1,
            learning_rate=arguments.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, optim="adamw_torch", seed=arguments.seed,
            max_completion_length=arguments.completion, temperature=1.0, top_p=1.0, top_k=0,
            teacher_model_kind="base", distillation_mode="full_logits", distillation_alpha=1.0,
            distillation_is_clip=None, num_loss_tokens_to_skip=0, generate_from_teacher=False,
            shuffle_dataset=False, disable_dropout=True,
            logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0,
            generation_kwargs={"min_new_tokens": arguments.completion} if arguments.fixed_length == "on" else None,
        )
        peft_config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                                 target_modules=list(ALL_LINEAR), task_type="CAUSAL_LM")
        trainer = SDFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[recorder], peft_config=peft_config)
        trainer.train()
    peak = peak_rss_mib()

    student_tokens = [chat_tokens(tokenizer, row["prompt"]) for row in rows]
    return {
        "side": "trl",
        **load,
        "peak_rss_mib": peak,
        "seconds": recorder.seconds,
        "generated": recorder.generated,
        "trained": list(recorder.generated),
        "loss": recorder.loss,
        "prompts": recorder.prompts,
        "student_prompt_tokens": sum(student_tokens) / len(student_tokens),
        "teacher_prompt_tokens": sum(recorder.teacher_prompt_tokens) / max(len(recorder.teacher_prompt_tokens), 1),
        "threads": torch.get_num_threads(),
        "gradient_checkpointing": config.gradient_checkpointing,
        "versions": versions(),
    }


def child(arguments) -> None:
    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    result = run_skillfold(arguments) if arguments.child == "skillfold" else run_trl(arguments)
    Path(arguments.result).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------- parent
def summarise(result: dict) -> dict:
    timed = slice(1, None)  # the first step is the warm-up
    seconds = sum(result["seconds"][timed])
    generated = sum(result["generated"][timed])
    trained = sum(result["trained"][timed])
    steps = len(result["seconds"][timed])
    return {
        "steps": steps,
        "s_per_step": seconds / steps,
        "generated_per_step": generated / steps,
        "trained_per_step": trained / steps,
        "tokens_per_step": (generated + trained) / steps,
        "tokens_per_s": (generated + trained) / seconds,
    }


def run_child(side: str, arguments, log_dir: Path) -> dict:
    result_path = log_dir / f"{side}.json"
    log_path = log_dir / f"{side}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--result", str(result_path),
               "--steps", str(arguments.steps), "--batch", str(arguments.batch),
               "--completion", str(arguments.completion), "--threads", str(arguments.threads),
               "--lr", str(arguments.lr), "--seed", str(arguments.seed),
               "--trl-gradient-checkpointing", arguments.trl_gradient_checkpointing,
               "--gradient-checkpointing", arguments.gradient_checkpointing,
               "--fixed-length", arguments.fixed_length, "--heap", arguments.heap, "--trl-heap", arguments.trl_heap,
               "--packed-weights", arguments.packed_weights,
               "--micro-batch", "auto" if arguments.micro_batch is None else str(arguments.micro_batch)]
    thread_vars = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    environment = {**os.environ, **{name: str(arguments.threads) for name in thread_vars},
                   "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        completed = subprocess.run(command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
    if completed.returncode != 0 or not result_path.exists():
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"the {side} side failed (exit {completed.returncode}); end of its log:\n{tail}")
    result = json.loads(result_path.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=8, help="completions (= prompts) per optimizer step")
    parser.add_argument("--completion", type=int, default=64, help="max new tokens per completion")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient-checkpointing", choices=["on", "off"],
                        default="on" if fold_default("gradient_checkpointing") else "off",
                        help="skillfold side (FoldConfig.gradient_checkpointing; default: FoldConfig's, off)")
    parser.add_argument("--trl-gradient-checkpointing", choices=["on", "off"], default="on",
                        help="TRL side; SDFTConfig default on")
    parser.add_argument("--fixed-length", choices=["on", "off"], default="on",
                        help="on: every completion is exactly --completion tokens on both sides (EOS held off: "
                        "SamplingParams.min_tokens, TRL generation_kwargs min_new_tokens), so tokens per step match")
    parser.add_argument("--heap", choices=["capped", "default"], default="default",
                        help="skillfold side: FoldConfig.heap_threshold_kib 0 (its default: glibc as it is) or 128 "
                        "(capped: less memory, more time)")
    parser.add_argument("--trl-heap", choices=["default", "capped"], default="default",
                        help="TRL side: glibc as it is (default) or the same heap cap as ours")
    parser.add_argument("--packed-weights", choices=["on", "off"], default="on",
                        help="skillfold: frozen linear layers from oneDNN-prepacked weights (engines.onednn; our default)")
    parser.add_argument("--micro-batch", type=micro_batch_argument, default=fold_default("micro_batch"),
                        help="skillfold: episodes per student forward/backward pass (FoldConfig.micro_batch; 0 = the "
                        "whole batch in one pass; auto = FoldConfig's default, by device: 1 on a CPU)")
    parser.add_argument("--out", type=Path, default=None, help="also write both sides' raw results as JSON here")
    parser.add_argument("--child", choices=["skillfold", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        child(arguments)
        return
    if arguments.steps < 1 or arguments.batch < 1 or arguments.completion < 1 or arguments.threads < 1:
        parser.error("--steps, --batch, --completion and --threads must be at least 1")

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-fold-") as scratch:
        for side in ("skillfold", "trl"):
            print(f"running {side} ({arguments.steps} timed steps + 1 warm-up) ...", flush=True)
            results[side] = run_child(side, arguments, Path(scratch))
            print(f"  done in {results[side]['wall_s']:.0f} s", flush=True)
    ours, theirs = results["skillfold"], results["trl"]
    summary = {side: summarise(result) for side, result in results.items()}
    same_prompts = ours["prompts"] == theirs["prompts"]
    if arguments.out:
        arguments.out.write_text(json.dumps({"results": results, "summary": summary}, indent=2))

    print("\n| side | s/step | generated tok/step | trained tok/step | tokens/step | tokens/s "
          "| RSS after load MiB | peak RSS MiB | peak - load MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for side, label in (("skillfold", "skillfold `fold`"), ("trl", "TRL `SDFTTrainer`")):
        row, result = summary[side], results[side]
        print(f"| {label} | {row['s_per_step']:.2f} | {row['generated_per_step']:.1f} | {row['trained_per_step']:.1f} "
              f"| {row['tokens_per_step']:.1f} | {row['tokens_per_s']:.1f} | {result['rss_after_load_mib']:.0f} "
              f"| {result['peak_rss_mib']:.0f} | {result['peak_rss_mib'] - result['rss_after_load_mib']:.0f} |")
    throughput = summary["skillfold"]["tokens_per_s"] / summary["trl"]["tokens_per_s"]
    memory = ours["peak_rss_mib"] / theirs["peak_rss_mib"]
    increment = (ours["peak_rss_mib"] - ours["rss_after_load_mib"]) / max(
        theirs["peak_rss_mib"] - theirs["rss_after_load_mib"], 1e-9)
    print(f"| **skillfold / TRL** | | | | | **{throughput:.2f}x** | | **{memory:.2f}x** | {increment:.2f}x |")
    print()
    print(f"- targets: throughput >= {TARGET_THROUGHPUT}x ({'met' if throughput >= TARGET_THROUGHPUT else 'missed'}), "
          f"peak RSS <= {TARGET_MEMORY}x ({'met' if memory <= TARGET_MEMORY else 'missed'})")
    print(f"- tokens/s = (completion tokens generated + completion tokens trained) / step time, summed over "
          f"{summary['skillfold']['steps']} timed steps per side after 1 warm-up step; peak RSS = the child "
          "process's ru_maxrss (whole run, warm-up included); RSS after load = after from_pretrained with every "
          "weight read once (the safetensors file is memory-mapped, so untouched weights are not in RSS)")
    print(f"- settings: {FAMILY} train items (batch {arguments.batch}, same prompts per step on both sides: "
          f"{'yes' if same_prompts else 'NO'}), completion {'=' if arguments.fixed_length == 'on' else '<='} "
          f"{arguments.completion} tokens, heap skillfold {arguments.heap} / TRL {arguments.trl_heap}, sampling temperature "
          f"1.0, LoRA r{LORA_RANK} alpha {LORA_ALPHA} all linear layers, AdamW lr {arguments.lr:g} constant, "
          f"grad-norm clip 1.0, fp32, {ours['threads']} threads (TRL side: {theirs['threads']}), seed {arguments.seed}")
    print("- skillfold: learners.fold.fold, method opsd, teacher self-frozen, loss reverse_kl (full vocabulary, "
          f"chunked from hidden states), gradient_checkpointing {arguments.gradient_checkpointing}, packed weights "
          f"{arguments.packed_weights}, micro_batch {arguments.micro_batch}, privileged context as "
          "one user message before the question")
    print(f"- TRL: SDFTTrainer, teacher_model_kind base, distillation_mode full_logits, distillation_alpha 1.0 "
          f"(reverse KL), num_generations 1, per_device_train_batch_size {arguments.batch}, "
          f"gradient_accumulation_steps 1, gradient_checkpointing {arguments.trl_gradient_checkpointing}, "
          "teacher_prompt_template '{prompt}\\n\\n{privileged_context}' (default)")
    print(f"- prompt tokens (mean): student {ours['student_prompt_tokens']:.0f} vs {theirs['student_prompt_tokens']:.0f}, "
          f"teacher {ours['teacher_prompt_tokens']:.0f} vs {theirs['teacher_prompt_tokens']:.0f} (skillfold vs TRL)")
    print(f"- loss per step (skillfold): {', '.join(f'{value:.3f}' for value in ours['loss'])}; "
          f"(TRL): {', '.join(f'{value:.3f}' for value in theirs['loss'])}")
    print(f"- s/step each (warm-up first): skillfold {', '.join(f'{v:.1f}' for v in ours['seconds'])}; "
          f"TRL {', '.join(f'{v:.1f}' for v in theirs['seconds'])}")
    timed = {phase: values[1:] for phase, values in ours.get("phases", {}).items()
             if len(values) > 1 and None not in values}
    if timed:
        print("- skillfold s/step by phase (timed steps): " + ", ".join(
            f"{phase} {sum(values) / len(values):.2f}" for phase, values in timed.items()))
    print(f"- versions: {ours['versions']}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
