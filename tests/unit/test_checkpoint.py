"""Fold checkpoints: a kill -9 at every write point leaves a complete, loadable checkpoint; broken ones
are skipped or refused with a CheckpointError naming them; extra tensors and every RNG round-trip."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy
import pytest
import torch
from safetensors.torch import load_file

from learners import checkpoint
from learners.checkpoint import (
    CheckpointError,
    adapter_snapshots,
    clean_scratch,
    ensure_snapshots,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[2]

def student(seed: int = 0):
    """The tiny Llama with a LoRA adapter on q_proj and v_proj."""
    from peft import LoraConfig, get_peft_model

    from tests.tiny import build_model, build_tokenizer

    model = build_model(build_tokenizer(), seed=seed)
    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))


def optimizer_for(model) -> torch.optim.AdamW:
    return torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad], lr=1e-2)


def train(model, optimizer, seed: int) -> None:
    """One AdamW step on random tokens (so the optimizer has state)."""
    torch.manual_seed(seed)
    ids = torch.randint(0, 100, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def weights(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {name: value.detach().clone() for name, value in get_peft_model_state_dict(model).items()}


# Run in one subprocess, which imports torch and peft and builds the student once, then forks a child per
# write point in argv[2:].
# Each child saves checkpoint 1 completely into `<base>/<point>/run`, then checkpoint 2 with a SIGKILL at
# its point; before each save it writes what that checkpoint must restore to `expected-<step>.pt`.
# The parent prints each child's exit status.
KILLED = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path

    import torch

    from learners import checkpoint
    from tests.unit.test_checkpoint import optimizer_for, student, train, weights

    torch.set_num_threads(1)


    def scenario(base, point, model):
        run_dir = base / "run"
        optimizer = optimizer_for(model)
        for step in (1, 2):
            train(model, optimizer, seed=step)
            ema = {name: value * 0.5 for name, value in weights(model).items()}
            expected = {"weights": weights(model), "optimizer": optimizer.state_dict(), "ema": ema}
            torch.save(expected, base / f"expected-{step}.pt")
            if step == 2:
                checkpoint._before_write = lambda name: name == point and os.kill(os.getpid(), signal.SIGKILL)
            checkpoint.save_checkpoint(run_dir, step, model, optimizer, {"config": {"step": step}},
                                       tensors={"ema": ema}, snapshot=True)


    model = student()  # built once; each forked child trains its own copy
    statuses = {}
    for point in sys.argv[2:]:
        base = Path(sys.argv[1]) / point
        base.mkdir(parents=True)
        child = os.fork()
        if child == 0:
            try:
                scenario(base, point, model)
            finally:
                os._exit(3)  # the kill point was never reached
        _, status = os.waitpid(child, 0)
        statuses[point] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)
    print(json.dumps(statuses))
    """
)


def _assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def _assert_optimizer(optimizer, expected: dict) -> None:
    state = optimizer.state_dict()
    assert state["param_groups"] == expected["param_groups"]
    assert state["state"].keys() == expected["state"].keys()
    for index, values in expected["state"].items():
        for key, value in values.items():
            assert torch.equal(state["state"][index][key], value), (index, key)


def _scratch(run_dir: Path) -> list[Path]:
    return list(run_dir.glob(".ckpt-*"))


@pytest.fixture(scope="module")
def trained():
    """A student after one AdamW step (so its optimizer has state), with its weights."""
    model = student()
    optimizer = optimizer_for(model)
    train(model, optimizer, seed=1)
    return model, optimizer


@pytest.fixture(scope="module")
def write_points(tmp_path_factory, trained):
    """Every write point of save_checkpoint, in order, as the fault-injection hook sees them."""
    model, optimizer = trained
    seen: list[str] = []
    checkpoint._before_write = seen.append
    try:
        save_checkpoint(tmp_path_factory.mktemp("points") / "run", 1, model, optimizer, {}, tensors={"ema": {}},
                        snapshot=True)
    finally:
        checkpoint._before_write = None
    return seen


def test_write_points_cover_every_file(write_points):
    assert write_points == ["adapter", "optimizer.pt", "rng.pt", "ema.pt", "state.json", "rename", "snapshot",
                            "prune"]


def test_kill_at_every_write_point_leaves_a_resumable_checkpoint(tmp_path, write_points):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", KILLED, str(tmp_path), *write_points],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    statuses = json.loads(done.stdout.strip().splitlines()[-1])
    assert statuses == dict.fromkeys(write_points, signal.SIGKILL), done.stderr  # each killed at its point
    model = student(seed=7)
    for index, point in enumerate(write_points):
        base = tmp_path / point
        run_dir = base / "run"
        step = 1 if index <= write_points.index("rename") else 2
        assert bool(_scratch(run_dir)) == (step == 1), point  # the killed save left its scratch
        found = latest_checkpoint(run_dir)
        assert _scratch(run_dir) == [], point  # a new start cleans it
        assert found == run_dir / f"step-{step:06d}", point
        snapshots = [number for number, _ in adapter_snapshots(run_dir)]  # only whole ones, kept past the prune
        assert snapshots == ([1] if index <= write_points.index("snapshot") else [1, 2]), point
        # a resumed fold snapshots a whole checkpoint that the kill left without one (learners.fold)
        assert ensure_snapshots(run_dir) == ([2] if point == "snapshot" else []), point
        assert [number for number, _ in adapter_snapshots(run_dir)] == list(range(1, step + 1)), point
        assert not list(run_dir.glob(".snap-*")), point
        expected = torch.load(base / f"expected-{step}.pt", weights_only=False)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.fill_(0.5)  # none of the saved weights
        optimizer = optimizer_for(model)  # no state yet
        saved = load_checkpoint(found, model, optimizer)
        assert saved["step"] == step and saved["config"] == {"step": step}
        _assert_same(weights(model), expected["weights"])
        _assert_optimizer(optimizer, expected["optimizer"])
        _assert_same(saved["tensors"]["ema"], expected["ema"])
        save_checkpoint(run_dir, step + 1, model, optimizer, {})
        assert _scratch(run_dir) == []
        assert latest_checkpoint(run_dir) == run_dir / f"step-{step + 1:06d}"
        assert len(list(run_dir.glob("step-*"))) == 2


def test_snapshots_keep_every_checkpoints_adapter_past_the_prune(tmp_path):
    model = student()
    optimizer = optimizer_for(model)
    saved = {}
    for step in (1, 2, 3):
        train(model, optimizer, seed=step)
        saved[step] = weights(model)
        save_checkpoint(tmp_path, step, model, optimizer, {}, snapshot=True)
    assert sorted(path.name for path in tmp_path.glob("step-*")) == ["step-000002", "step-000003"]  # keep=2
    snapshots = adapter_snapshots(tmp_path)
    assert [step for step, _ in snapshots] == [1, 2, 3]
    for step, path in snapshots:
        _assert_same(load_file(str(path / "adapter_model.safetensors")), saved[step])
    # hard links: while a checkpoint lives, its snapshot is the same file on disk
    live = tmp_path / "step-000003" / "adapter" / "adapter_model.safetensors"
    assert live.stat().st_ino == (snapshots[-1][1] / "adapter_model.safetensors").stat().st_ino
    # a continuation from step 1 (step 2 saved again) drops the abandoned step 3's snapshot
    save_checkpoint(tmp_path, 2, model, optimizer, {}, snapshot=True)
    assert [step for step, _ in adapter_snapshots(tmp_path)] == [1, 2]
    assert [step for step, _ in adapter_snapshots(tmp_path / "nothing")] == []


def test_exception_at_a_write_point_removes_scratch_and_keeps_the_old(tmp_path, trained):
    model, optimizer = trained
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir, 1, model, optimizer, {})

    def fail(name: str) -> None:
        if name == "state.json":
            raise KeyboardInterrupt

    checkpoint._before_write = fail
    try:
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(run_dir, 2, model, optimizer, {})
    finally:
        checkpoint._before_write = None
    assert _scratch(run_dir) == []
    assert latest_checkpoint(run_dir) == run_dir / "step-000001"


def test_extra_tensors_round_trip(tmp_path, trained):
    model, optimizer = trained
    ema = {"a.lora_A.weight": torch.randn(2, 3), "b": torch.arange(4)}
    path = save_checkpoint(tmp_path, 3, model, optimizer, {"ema": True}, tensors={"ema": ema, "prefix": {}})
    assert (path / "ema.pt").is_file() and (path / "prefix.pt").is_file()
    saved = load_checkpoint(path, student(seed=2), optimizer_for(student(seed=2)))
    _assert_same(saved["tensors"]["ema"], ema)
    assert saved["tensors"]["prefix"] == {}
    assert saved["ema"] is True and saved["step"] == 3
    plain = save_checkpoint(tmp_path, 4, model, optimizer, {})
    assert load_checkpoint(plain, model, optimizer)["tensors"] == {}
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path, 5, model, optimizer, {}, tensors={"../x": {}})
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path, 5, model, optimizer, {}, tensors={"optimizer": {}})


@pytest.mark.parametrize("name", ["adapter/adapter_model.safetensors", "optimizer.pt", "rng.pt"])
def test_truncated_file_is_skipped_and_refused(tmp_path, trained, name):
    model, optimizer = trained
    save_checkpoint(tmp_path, 1, model, optimizer, {})
    broken = save_checkpoint(tmp_path, 2, model, optimizer, {})
    file = broken / name
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000001"
    with pytest.raises(CheckpointError, match="step-000002") as error:
        load_checkpoint(broken, model, optimizer)
    assert "without --resume" in str(error.value) and name in str(error.value)
    (tmp_path / "step-000001" / "rng.pt").unlink()
    assert latest_checkpoint(tmp_path) is None  # checkpoint dirs, none complete


@pytest.mark.parametrize("name", ["adapter/adapter_model.safetensors", "optimizer.pt", "rng.pt"])
def test_corrupt_file_of_the_right_size_raises_checkpoint_error(tmp_path, trained, name):
    model, optimizer = trained
    path = save_checkpoint(tmp_path, 1, model, optimizer, {})
    file = path / name
    file.write_bytes(b"\xff" * file.stat().st_size)
    assert latest_checkpoint(tmp_path) == path  # sizes match: only reading finds it
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path, model, optimizer)


def test_missing_manifest_file_and_stale_scratch(tmp_path, trained):
    model, optimizer = trained
    stale = tmp_path / ".ckpt-abc123"
    (stale / "adapter").mkdir(parents=True)
    path = save_checkpoint(tmp_path, 1, model, optimizer, {})
    assert not stale.exists()
    (path / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match="adapter_config.json is missing"):
        load_checkpoint(path, model, optimizer)
    stale.mkdir()
    assert clean_scratch(tmp_path) == [stale] and not stale.exists()
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_prune_keeps_the_newest_complete(tmp_path, trained):
    model, optimizer = trained
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, optimizer, {})
    assert sorted(path.name for path in tmp_path.glob("step-*")) == ["step-000002", "step-000003"]
    (tmp_path / "step-000003" / "rng.pt").unlink()  # broken: not counted among the kept
    save_checkpoint(tmp_path, 4, model, optimizer, {})
    assert sorted(path.name for path in tmp_path.glob("step-*")) == ["step-000002", "step-000004"]
    save_checkpoint(tmp_path, 4, model, optimizer, {}, keep=1)  # the same step again: replaced
    assert sorted(path.name for path in tmp_path.glob("step-*")) == ["step-000004"]
    assert _scratch(tmp_path) == []


def test_every_rng_is_restored(tmp_path, trained):
    model, optimizer = trained
    random.seed(1)
    numpy.random.seed(2)
    torch.manual_seed(3)
    path = save_checkpoint(tmp_path, 1, model, optimizer, {})
    draws = (random.random(), numpy.random.rand(3).tolist(), torch.rand(3))
    random.seed(9)
    numpy.random.seed(9)
    torch.manual_seed(9)
    load_checkpoint(path, model, optimizer)
    again = (random.random(), numpy.random.rand(3).tolist(), torch.rand(3))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])
