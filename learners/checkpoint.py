"""Trainer checkpoints (fold, SFT): adapter + optimizer + RNG + extra tensors + step + config, written atomically.

A checkpoint is a directory `step-000012/` inside the fold's run directory. It is built as a hidden
scratch directory `.ckpt-*` and renamed into place; its `state.json` is written last and lists every
other file with its size (the manifest). So a kill at any moment leaves the previous checkpoints and
at most a scratch directory, which the next save (or `clean_scratch`, at a new start) removes.
`latest_checkpoint` returns the newest checkpoint whose manifest holds (every file there, at its
size); `load_checkpoint` raises `CheckpointError` (never a raw traceback) on one it cannot read.

Every write point calls `_before_write(name)` first when it is set (fault-injection tests kill the
process there): "adapter", "optimizer.pt", "rng.pt", one "<name>.pt" per extra tensor file,
"state.json", "rename", "snapshot" (with `snapshot=True`) and "prune" (before old checkpoints are removed).

With `snapshot=True` a checkpoint's adapter also stays after the checkpoint is pruned, as
`snapshots/step-NNNNNN/` (hard links to its files, so no second copy on disk while the checkpoint
lives; built as `.snap-*` scratch and renamed into place): the retention check after a fold falls
back to the newest of them that keeps the protected families (`adapter_snapshots`). A kill between a
checkpoint's rename and its snapshot leaves a checkpoint without one: a resumed fold makes it
(`ensure_snapshots`).

`keep_metrics` makes a run's metrics file belong to its checkpoints: a resume cuts it back to the
checkpoint's step before the run writes on.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
SCRATCH_PREFIX = ".ckpt-"
METRICS_SCRATCH = ".metrics-"
SNAPSHOT_SCRATCH = ".snap-"
SNAPSHOTS = "snapshots"  # the adapters of pruned checkpoints (save_checkpoint's `snapshot`)
SCRATCH_PREFIXES = (SCRATCH_PREFIX, ".adapter-", METRICS_SCRATCH, SNAPSHOT_SCRATCH)  # what clean_scratch removes
FILES_KEY = "checkpoint_files"  # the manifest inside state.json: {relative path: size in bytes}
TENSORS_KEY = "checkpoint_tensors"  # the names of the extra tensor files
_RESERVED = {"adapter", "optimizer", "rng", "state"}
_STEP_DIR = re.compile(r"step-(\d+)")
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

# Fault injection: called with the name of each write point just before it (see the module docstring).
_before_write: Callable[[str], None] | None = None


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be restored (a missing, truncated or corrupt file)."""


def _point(name: str) -> None:
    if _before_write is not None:
        _before_write(name)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy
    except ImportError:
        pass
    else:
        state["numpy"] = numpy.random.get_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        try:
            import numpy
        except ImportError:
            return
        numpy.random.set_state(state["numpy"])


def _fsync(path: Path) -> None:
    """Flush a file (or a directory entry) to disk; a no-op where the platform cannot."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _manifest(directory: Path) -> dict[str, int]:
    return {
        path.relative_to(directory).as_posix(): path.stat().st_size
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _step_of(path: Path) -> int | None:
    match = _STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """The `step-N` directories of `run_dir`, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(_step_of(path), path) for path in run_dir.iterdir()]
    return sorted((step, path) for step, path in found if step is not None)


def _problem(path: Path) -> str | None:
    """Why the checkpoint at `path` is incomplete (None when its manifest holds)."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        return f"no {STATE_FILE}"
    except (OSError, ValueError) as error:
        return f"unreadable {STATE_FILE} ({error})"
    files = state.get(FILES_KEY) if isinstance(state, dict) else None
    if not isinstance(files, dict) or not isinstance(state.get("step"), int):
        return f"{STATE_FILE} has no file manifest (an older or foreign checkpoint)"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, not {size}"
    return None


def clean_scratch(run_dir: Path) -> list[Path]:
    """Remove what a killed write left in `run_dir`; returns it: `.ckpt-*` checkpoint scratch,
    `.adapter-*` adapter scratch (`learners.student.save_adapter`) and `.metrics-*` rewrites
    (`keep_metrics`). One process writes a run directory at a time, so any scratch found is stale.
    """
    if not run_dir.is_dir():
        return []
    stale = sorted(path for prefix in SCRATCH_PREFIXES for path in run_dir.glob(prefix + "*"))
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d stale scratch file(s) or dir(s) in %s", len(stale), run_dir)
    return stale


def keep_metrics(path: Path, step: int) -> list[dict[str, Any]]:
    """Cut the metrics file `path` (JSON lines with a "step") to steps 1..`step`, the ones the
    checkpoint resumed from holds, atomically (a new file renamed over it); returns those records.

    A step's line is written before its checkpoint, so a killed run leaves lines past its last
    checkpoint (and maybe a line cut short); the resumed run writes them again. A step found twice
    (a file from before this rule) keeps its last line. `step` 0 removes the file.
    """
    by_step: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(record, dict) and isinstance(record.get("step"), int) and 1 <= record["step"] <= step:
                by_step[record["step"]] = record
    records = [by_step[number] for number in sorted(by_step)]
    if not records:
        path.unlink(missing_ok=True)
        return []
    descriptor, scratch = tempfile.mkstemp(prefix=METRICS_SCRATCH, dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as sink:
            sink.write("".join(json.dumps(record) + "\n" for record in records))
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise
    return records


def _discard(path: Path, run_dir: Path) -> None:
    """Remove a directory by first renaming it to a scratch name, so a kill mid-removal leaves only
    scratch (cleaned at the next start), never a half-deleted `step-N`."""
    trash = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX + "old-", dir=run_dir))
    os.replace(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 2,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    snapshot: bool = False,
) -> Path:
    """Write `run_dir/step-NNNNNN` atomically and return it.

    `tensors` are extra named tensor dicts (e.g. {"ema": snapshot}), each written as `<name>.pt`
    inside the checkpoint before the rename and returned by `load_checkpoint` under "tensors".
    Afterwards `keep` checkpoints remain: this one and the newest complete older ones; incomplete
    checkpoints and any numbered after `step` (an abandoned continuation) are removed. `snapshot`
    keeps this checkpoint's adapter in `run_dir/snapshots/step-NNNNNN` too (see the module docstring);
    snapshots numbered after `step` are removed.
    """
    tensors = tensors or {}
    for name in tensors:
        if not _TENSOR_NAME.fullmatch(name) or name in _RESERVED:
            raise ValueError(f"bad checkpoint tensor name {name!r} (a plain file name, not {sorted(_RESERVED)})")
    keep = max(keep, 1)
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_scratch(run_dir)
    target = run_dir / f"step-{step:06d}"
    scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=run_dir))
    try:
        _point("adapter")
        model.save_pretrained(str(scratch / "adapter"))
        _point("optimizer.pt")
        torch.save(optimizer.state_dict(), scratch / "optimizer.pt")
        _point("rng.pt")
        torch.save(_rng_state(), scratch / "rng.pt")
        for name, values in tensors.items():
            _point(f"{name}.pt")
            torch.save(dict(values), scratch / f"{name}.pt")
        files = _manifest(scratch)
        for name in files:
            _fsync(scratch / name)
        _point(STATE_FILE)
        record = {**state, "step": step, TENSORS_KEY: sorted(tensors), FILES_KEY: files}
        with open(scratch / STATE_FILE, "w") as sink:
            sink.write(json.dumps(record, indent=2, default=str))
            sink.flush()
            os.fsync(sink.fileno())
        _fsync(scratch)
        _point("rename")
        if target.exists():
            _discard(target, run_dir)
        os.replace(scratch, target)
        _fsync(run_dir)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    snapshots = run_dir / SNAPSHOTS
    for number, path in _step_dirs(snapshots):
        if number > step:  # an abandoned continuation's
            _discard(path, run_dir)
    if snapshot:
        _point("snapshot")
        _snapshot(target / "adapter", snapshots / target.name, run_dir)
    _point("prune")
    older = [path for number, path in _step_dirs(run_dir) if number < step and _problem(path) is None]
    kept = {target, *older[-(keep - 1):]} if keep > 1 else {target}
    for _, path in _step_dirs(run_dir):
        if path not in kept:
            _discard(path, run_dir)
    return target


def _snapshot(adapter: Path, target: Path, run_dir: Path) -> None:
    """`target` becomes a copy of the directory `adapter` made of hard links (copies where the file system
    has none), built in scratch and renamed into place."""
    scratch = Path(tempfile.mkdtemp(prefix=SNAPSHOT_SCRATCH, dir=run_dir))
    try:
        for source in sorted(adapter.rglob("*")):
            if not source.is_file():
                continue
            copy = scratch / source.relative_to(adapter)
            copy.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, copy)
            except OSError:
                shutil.copy2(source, copy)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            _discard(target, run_dir)
        os.replace(scratch, target)
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def ensure_snapshots(run_dir: Path) -> list[int]:
    """Snapshot the adapter of every complete checkpoint in `run_dir` that has none (a run killed between a
    checkpoint's rename and its snapshot, resumed: its end state is then the uninterrupted run's). Returns
    the steps snapshotted."""
    have = {step for step, _ in adapter_snapshots(run_dir)}
    made = []
    for step, path in _step_dirs(run_dir):
        if step not in have and _problem(path) is None:
            _snapshot(path / "adapter", run_dir / SNAPSHOTS / path.name, run_dir)
            made.append(step)
    return made


def adapter_snapshots(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, adapter directory) of the checkpoints saved with `snapshot=True`, oldest first."""
    return [(step, path) for step, path in _step_dirs(run_dir / SNAPSHOTS) if (path / "adapter_config.json").is_file()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint in `run_dir`, or None (also when every one there is incomplete).

    Removes stale scratch directories first: it is called when a run starts again.
    """
    clean_scratch(run_dir)
    for _, path in reversed(_step_dirs(run_dir)):
        problem = _problem(path)
        if problem is None:
            return path
        log.warning("skipping incomplete checkpoint %s: %s", path, problem)
    return None


def _fail(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} cannot be restored: {reason}. Delete it (an older checkpoint, if any, is then "
        "used) or start again without --resume"
    )


def _load_weights(model, adapter: Path, path: Path) -> None:
    from safetensors.torch import load_file

    lora = adapter / "adapter_model.safetensors"
    files = [lora] if lora.is_file() else sorted(adapter.glob("*.safetensors"))
    if not files:
        raise _fail(path, f"no weights in {adapter}")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            weights.update(load_file(str(file)))
        except Exception as error:  # SafetensorError, OSError, ...: a truncated or corrupt file
            raise _fail(path, f"{file.relative_to(path)} is unreadable ({error})") from error
    try:
        if lora.is_file():
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(model, weights)
        else:  # a full fine-tune: the model's own weights
            result = model.load_state_dict(weights, strict=False)
    except Exception as error:  # shape mismatch: a checkpoint of another model or adapter config
        raise _fail(path, f"its weights do not fit this model ({error})") from error
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise _fail(path, f"its weights do not fit this model (unexpected {sorted(unexpected)[:3]})")


def _load_file(path: Path, name: str, weights_only: bool, map_location: str | None = "cpu") -> Any:
    try:
        return torch.load(path / name, map_location=map_location, weights_only=weights_only)
    except Exception as error:  # EOFError, RuntimeError, UnpicklingError, ...: truncated or corrupt
        raise _fail(path, f"{name} is unreadable ({type(error).__name__}: {error})") from error


def load_checkpoint(path: Path, model, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore adapter weights, optimizer and RNG from `path`; returns its saved state (with "step")
    and "tensors": {name: tensor dict} for each extra tensor file saved with it.

    Raises CheckpointError, naming `path`, when a file is missing, truncated or unreadable.
    """
    path = Path(path)
    problem = _problem(path)
    if problem is not None:
        raise _fail(path, problem)
    state = json.loads((path / STATE_FILE).read_text())
    files: dict[str, int] = state.pop(FILES_KEY)
    names = state.pop(TENSORS_KEY, None) or []
    optimizer_state = _load_file(path, "optimizer.pt", weights_only=False)
    rng = _load_file(path, "rng.pt", weights_only=False)
    extra = {}
    for name in names:
        if f"{name}.pt" not in files:
            raise _fail(path, f"{name}.pt is not in its manifest")
        values = _load_file(path, f"{name}.pt", weights_only=True, map_location=None)  # on the device saved
        if not isinstance(values, dict):
            raise _fail(path, f"{name}.pt holds a {type(values).__name__}, not a dict of tensors")
        extra[name] = values
    _load_weights(model, path / "adapter", path)
    try:
        optimizer.load_state_dict(optimizer_state)
    except Exception as error:  # another optimizer or parameter layout
        raise _fail(path, f"its optimizer state does not fit this optimizer ({error})") from error
    try:
        _set_rng_state(rng)
    except Exception as error:
        raise _fail(path, f"rng.pt holds no usable RNG state ({error})") from error
    state["tensors"] = extra
    return state
