"""experiments/carry.py: what a pack of an experiment directory keeps (what a resumed run reads) and leaves out."""

import importlib.util
import json
from pathlib import Path

spec = importlib.util.spec_from_file_location("carry", Path(__file__).parents[2] / "experiments" / "carry.py")
carry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(carry)


def touch(path: Path, text: str = "x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def experiment(out: Path) -> None:
    touch(out / "config.json", json.dumps({"stream": {"phases": [{"family": "a"}, {"family": "b"}]}}))
    for phase in (0, 1):  # memory seed 0: finished
        touch(out / "units" / "memory" / "seed-0" / f"phase-{phase}.json")
        touch(out / "units" / "memory" / "seed-0" / f"phase-{phase}" / "a-on.jsonl")
    touch(out / "units" / "skillfold" / "seed-0" / "phase-0.json")  # skillfold seed 0: phase 2 to run
    touch(out / "units" / "skillfold" / "seed-0" / ".lock")
    touch(out / "evals" / "e.json")
    touch(out / "folds" / "f" / "adapter.safetensors")  # the reuse store
    touch(out / "homes" / "memory-seed0" / "chroma" / "db")
    home = out / "homes" / "skillfold-seed0"
    touch(home / "chroma" / "db")
    touch(home / "evolve" / "evolve" / "state.json", json.dumps({"folds": 2}))
    touch(home / "adapters" / "LATEST", "evolve-fold-1\n")
    for name in ("evolve-fold-1", "evolve-fold-2", "sft-1"):
        touch(home / "adapters" / name / "adapter_model.safetensors")
    touch(home / "folds" / "evolve-fold-2" / "result.json")  # finished: its checkpoints are not read again
    touch(home / "folds" / "evolve-fold-2" / "step-000032" / "state.pt")
    touch(home / "folds" / "evolve-fold-3" / "step-000005" / "state.pt")  # running: resumes from its newest
    touch(home / "folds" / "evolve-fold-3" / "step-000010" / "state.pt")
    touch(home / "sft" / "sft-p0" / "result.json")
    touch(home / "sft" / "sft-p0" / "step-000032" / "state.pt")
    touch(home / "sft" / "sft-p1" / "step-000010" / "state.pt")


def test_a_pack_keeps_what_a_resumed_run_reads_and_leaves_out_the_rest(tmp_path):
    experiment(tmp_path)
    kept = {str(path) for path in carry.wanted(tmp_path)}
    assert kept == {
        "config.json", "evals/e.json",
        "units/memory/seed-0/phase-0.json", "units/memory/seed-0/phase-1.json",
        "units/memory/seed-0/phase-0/a-on.jsonl", "units/memory/seed-0/phase-1/a-on.jsonl",
        "units/skillfold/seed-0/phase-0.json",
        "homes/skillfold-seed0/chroma/db", "homes/skillfold-seed0/evolve/evolve/state.json",
        "homes/skillfold-seed0/adapters/LATEST", "homes/skillfold-seed0/adapters/evolve-fold-1/adapter_model.safetensors",
        "homes/skillfold-seed0/adapters/sft-1/adapter_model.safetensors",
        "homes/skillfold-seed0/folds/evolve-fold-2/result.json",
        "homes/skillfold-seed0/folds/evolve-fold-3/step-000010/state.pt",
        "homes/skillfold-seed0/sft/sft-p0/result.json", "homes/skillfold-seed0/sft/sft-p1/step-000010/state.pt",
    }


def test_pack_then_unpack_gives_back_the_kept_files(tmp_path):
    experiment(tmp_path / "out")
    carry.pack(tmp_path / "out", tmp_path / "run.tar.xz")
    carry.unpack(tmp_path / "run.tar.xz", tmp_path / "again")
    again = {str(path.relative_to(tmp_path / "again")) for path in (tmp_path / "again").rglob("*") if path.is_file()}
    assert again == {str(path) for path in carry.wanted(tmp_path / "out")}
    assert (tmp_path / "again" / "homes" / "skillfold-seed0" / "adapters" / "LATEST").read_text() == "evolve-fold-1\n"


def test_without_checkpoints_unfinished_runs_start_again(tmp_path):
    experiment(tmp_path)
    kept = {str(path) for path in carry.wanted(tmp_path, checkpoints=False)}
    assert not any("/step-" in path for path in kept)
    assert "homes/skillfold-seed0/folds/evolve-fold-2/result.json" in kept
