"""The trainable student: where its base weights come from, its adapter, and the hand-off to the engine.

The trainer owns the trainable module (base + LoRA, or every weight), the optimizer and checkpoints;
the engine owns rollouts. They meet in two places, both here:
- `borrow`: the base weights. An engine that shares its weights (`engines.base.SharesWeights`, the
  in-process HF engine) lends its own (one copy for serving and training); for any other engine the
  trainer uses the base it is given, or loads the engine's model itself.
- `hand_off`: after a training step, the engine serves the new adapter from its next call: the live
  module itself for a sharing engine (no copy), an adapter directory (`load_adapter`) for the others.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.base import Engine, LentBase, SharesWeights

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapter_parameters(model) -> list[tuple[str, Any]]:
    """The trained parameters (LoRA weights, or every weight in a full fine-tune)."""
    return [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]


def attach_student(base_model, config, adapter: str | None):
    """The trainable student: a new LoRA adapter, the given one made trainable, or all weights.

    `config` is a `FoldConfig` (its LoRA shape, `full_finetune`, `gradient_checkpointing`)."""
    from learners.passes import checkpointing

    if config.gradient_checkpointing:
        base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing(base_model):
        base_model.gradient_checkpointing_disable()
    if config.full_finetune:
        base_model.train()
        for parameter in base_model.parameters():
            parameter.requires_grad_(True)
        return base_model
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter:
        return PeftModel.from_pretrained(base_model, adapter, is_trainable=True)
    lora = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules), task_type="CAUSAL_LM",
    )
    return get_peft_model(base_model, lora)


def load_base(model: str | None, device: str = "auto") -> LentBase:
    """A base model of the trainer's own (for an engine that does not share its weights): the model
    spec as `engines.models.resolve_model` takes it, bf16 on CUDA, fp32 on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engines.hf import _eos_ids, pick_device, pick_dtype
    from engines.models import resolve_model

    location = resolve_model(model)
    torch_device = pick_device(device)
    tokenizer = AutoTokenizer.from_pretrained(location)
    network = AutoModelForCausalLM.from_pretrained(location, dtype=pick_dtype("auto", torch_device)).to(torch_device)
    network.requires_grad_(False)
    return LentBase(model=network.eval(), tokenizer=tokenizer, stop_ids=_eos_ids(network, tokenizer))


@dataclass
class Loan:
    """The student's base weights and where they came from; `shared` when the engine lent its own."""

    engine: Engine
    base: LentBase
    shared: bool
    handoff_dir: Path | None = None
    handoffs: int = field(default=0)  # how many times the engine was given the student


def borrow(engine: Engine, base: LentBase | None, *, heap_threshold_kib: int = 0,
           scratch: Path | None = None) -> Loan:
    """The base weights to train on: `base` when given, else the engine's own if it shares them, else
    the engine's model loaded again (`load_base(engine.model_name)`). `scratch` holds the adapter
    directories handed to an engine that does not share its weights."""
    if base is None and isinstance(engine, SharesWeights):
        return Loan(engine, engine.lend_base(heap_threshold_kib=heap_threshold_kib), shared=True)
    if base is None:
        base = load_base(engine.model_name)
    return Loan(engine, base, shared=False, handoff_dir=scratch)


def hand_off(loan: Loan, student) -> float:
    """Make the engine serve the student as trained so far, from its next call; returns the seconds it took.

    A sharing engine serves the live module (no copy); any other engine loads the adapter from a
    directory written here (atomically, the previous one replaced)."""
    started = time.perf_counter()
    if loan.shared:
        loan.engine.serve_trained(student)  # type: ignore[attr-defined]
    else:
        if loan.handoff_dir is None:
            raise ValueError("an engine that does not share its weights needs a hand-off directory")
        target = loan.handoff_dir / "handoff-adapter"
        save_adapter(student, target)
        loan.engine.load_adapter(str(target))
    loan.handoffs += 1
    return time.perf_counter() - started


def save_adapter(student, adapter_dir: Path) -> None:
    """`student.save_pretrained(adapter_dir)` atomically: written beside it, then renamed into place."""
    adapter_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".adapter-", dir=adapter_dir.parent))
    try:
        student.save_pretrained(str(scratch))
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        os.replace(scratch, adapter_dir)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def release(student, config):
    """The base model back without LoRA layers (the engine reloads the saved adapter)."""
    from learners.passes import causal_lm

    for parameter in student.parameters():
        parameter.requires_grad_(False)
    if config.gradient_checkpointing:
        causal_lm(student).gradient_checkpointing_disable()
    if config.full_finetune:
        return student.eval()
    return student.unload().eval()


def abandon(loan: Loan, student, config, adapter: str | None) -> None:
    """End a loan whose training failed (a bad checkpoint, a NaN loss, an interrupt): the engine serves
    its base with `adapter` (what it served before) again; nothing is saved. A full fine-tune's weights
    cannot be taken back: the engine keeps them as trained so far."""
    try:
        if loan.shared:
            loan.engine.serve_trained(None)  # type: ignore[attr-defined]
            base = release(student, config) if student is not None else loan.base.model
            loan.engine.reclaim(base, adapter)  # type: ignore[attr-defined]
        elif adapter and loan.engine.adapter != adapter:
            loan.engine.load_adapter(adapter)
        elif not adapter and loan.engine.adapter is not None:
            loan.engine.unload_adapter()
    except Exception as error:  # the failure that got us here is the one to report
        import logging

        logging.getLogger(__name__).warning("could not give the engine its weights back: %s", error)


def finish_training(loan: Loan, student, config, run_dir: Path) -> Path:
    """Save the trained adapter to `run_dir/adapter` (atomically), end the loan and have the engine
    serve the adapter (a full fine-tune is served as the sharing engine's weights). Returns its dir."""
    adapter_dir = run_dir / "adapter"
    if loan.shared:
        loan.engine.serve_trained(None)  # type: ignore[attr-defined]  # the weights back plain
    save_adapter(student, adapter_dir)
    base = release(student, config)
    if loan.shared:
        loan.engine.reclaim(base, None if config.full_finetune else str(adapter_dir))  # type: ignore[attr-defined]
    else:
        if loan.handoff_dir is not None:
            shutil.rmtree(loan.handoff_dir / "handoff-adapter", ignore_errors=True)
        if not config.full_finetune:
            loan.engine.load_adapter(str(adapter_dir))
    return adapter_dir
