"""Fold checkpoints: adapter + optimizer + RNG + step + config, written atomically.

A checkpoint is a directory `step-000012/` inside the fold's run directory, built as a hidden
temporary directory and renamed into place, so a kill leaves either the old or the new checkpoint,
never a half-written one. `latest_checkpoint` finds the newest complete one for `--resume`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.json"


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path, step: int, model, optimizer: torch.optim.Optimizer, state: dict[str, Any], keep: int = 2
) -> Path:
    """Write `run_dir/step-NNNNNN` atomically; keep the newest `keep` checkpoints."""
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / f"step-{step:06d}"
    scratch = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=run_dir))
    try:
        model.save_pretrained(str(scratch / "adapter"))
        torch.save(optimizer.state_dict(), scratch / "optimizer.pt")
        torch.save(_rng_state(), scratch / "rng.pt")
        (scratch / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2, default=str))
        if target.exists():
            shutil.rmtree(target)
        os.replace(scratch, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    for old in sorted(run_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(run_dir: Path) -> Path | None:
    complete = [path for path in sorted(run_dir.glob("step-*")) if (path / STATE_FILE).is_file()]
    return complete[-1] if complete else None


def load_checkpoint(path: Path, model, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore adapter weights, optimizer and RNG from `path`; returns its saved state (with step)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = path / "adapter" / "adapter_model.safetensors"
    set_peft_model_state_dict(model, load_file(str(weights)))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / STATE_FILE).read_text())
