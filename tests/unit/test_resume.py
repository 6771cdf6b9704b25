"""An exact resume: a fold (and SFT) stopped after any step and resumed ends with the uninterrupted
run's adapter bit for bit; its metrics continue after the checkpoint; scratch is cleaned; a finished
fold run again through the CLI is a no-op. On the tiny Llama of tests/tiny.py, CPU.

Why bit for bit holds: every input of a step is either in the checkpoint (adapter, AdamW state and
step, RNG of python/torch/NumPy, the EMA teacher) or fixed by the seed and the step (item order,
sampling seeds), and the frozen base weights are the loaded ones at every step: a merge of the
adapter for a rollout or a teacher pass gives them back bit for bit (engines.merge.Residue), where
(W + s·BA) − s·BA alone moved ~0.2-1% of their elements by an ulp per merge.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engines import onednn, small_linear
from engines.hf import HFEngine
from engines.merge import Residue, merge_into, merged, unmerge_from
from envs import make_family
from envs.base import Message, Trajectory, Turn
from learners.checkpoint import clean_scratch, keep_metrics
from learners.fold import FoldConfig, FoldItem, fold
from learners.sft import SftConfig, sft
from tests.tiny import build_model

CONTEXT = [Message(role="user", content="Say the word: apple"), Message(role="assistant", content="apple")]
TIMINGS = ("seconds", "tokens_per_second", "handoff_seconds", "rollout_seconds", "teacher_seconds", "update_seconds")
fold_module = importlib.import_module("learners.fold")


class Killed(RuntimeError):
    """Stands in for a kill: raised from `on_step`, after a step's metrics line, before its checkpoint."""


def kill_after(step: int):
    def on_step(record):
        if record["step"] == step:
            raise Killed()
    return on_step


def config(**overrides) -> FoldConfig:
    values = dict(steps=4, batch_size=4, learning_rate=5e-3, lora_rank=4, lora_alpha=8, checkpoint_every=1,
                  anchor_fraction=0.25, sampling={"temperature": 1.0, "max_new_tokens": 8})
    values.update(overrides)
    return FoldConfig(**values)


def run_fold(tokenizer, run_dir: Path, fold_config: FoldConfig, *, packed: bool = True, resume: bool = False,
             on_step=None, engine: HFEngine | None = None):
    family = make_family("toy:2")
    items = [FoldItem(family=family.name, index=i, context=CONTEXT) for i in range(12)]
    items += [FoldItem(family=family.name, index=i, anchor=True) for i in range(4)]
    engine = engine or HFEngine(build_model(tokenizer), tokenizer, model_name="tiny", batch_size=8,
                                packed_weights=packed)
    return fold(engine, {family.name: family}, items, fold_config, run_dir, resume=resume, on_step=on_step)


def adapter_of(result) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result.adapter) / "adapter_model.safetensors"))


def assert_bitwise(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, (different[:3], max(float((expected[n] - actual[n]).abs().max()) for n in different))


def steps_of(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def without_timings(path: Path) -> list[dict]:
    return [{key: value for key, value in json.loads(line).items() if key not in TIMINGS}
            for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- the cause: merges round
def test_a_merge_and_unmerge_gives_the_weight_back_bit_for_bit():
    torch.manual_seed(0)
    weight = torch.randn(64, 48) * 0.05
    delta = torch.randn(64, 48) * 0.002  # a trained adapter's size against the weights
    assert not torch.equal(weight + delta - delta, weight)  # plain rounding moves some elements
    original = weight.clone()
    residue = merge_into(weight, delta)
    assert torch.equal(weight, original + delta)  # the merged weight is peft's, W + Δ
    assert 0 < residue.indices.numel() < weight.numel() // 10 and residue.indices.dtype == torch.int32
    assert torch.equal(unmerge_from(weight, delta, residue), original)
    # -0.0 counts as different from 0.0: bits, not values
    zero = torch.tensor([-0.0, 1.0])
    kept = Residue.between(torch.tensor([0.0, 1.0]), zero)
    assert kept.indices.tolist() == [0]
    assert torch.equal(kept.restore(torch.tensor([0.0, 1.0])).view(torch.int32), zero.view(torch.int32))


def lora_model(tokenizer, scale: float = 0.05):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_model(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, scale)  # a trained adapter: B is no longer zero
    return model.eval()


def base_weights(model) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()
            if name.endswith("base_layer.weight")}


def test_peft_scope_restores_the_base_weights_bit_for_bit(tiny_tokenizer):
    model = lora_model(tiny_tokenizer, scale=0.01)
    before = base_weights(model)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        beside = model(ids).logits
        with merged(model) as scope:
            assert all(module.merged for module in model.modules() if hasattr(module, "lora_A"))
            assert 0 < scope.residue_bytes < sum(w.nbytes for w in before.values()) // 10  # a small share, no copy
            inside = model(ids).logits
        after = model(ids).logits
    assert torch.allclose(inside, beside, atol=1e-5) and torch.equal(after, beside)
    assert not any(module.merged for module in model.modules() if hasattr(module, "lora_A"))
    for name, weight in base_weights(model).items():
        assert torch.equal(weight, before[name]), name


@pytest.mark.parametrize("kind", ["kernel", "packed"])
def test_merged_decoding_restores_the_base_weights_bit_for_bit(tiny_tokenizer, kind, monkeypatch):
    if not onednn.available():
        pytest.skip("oneDNN is not available")
    if kind == "packed":
        monkeypatch.setattr(small_linear, "ENABLED", False)
    elif not small_linear.available():
        pytest.skip("no small-batch linear kernel on this machine")
    model = lora_model(tiny_tokenizer)
    before = base_weights(model)
    onednn.pack_linears(model)
    for _ in range(3):  # rollout after rollout, as a fold does: no drift
        with torch.no_grad(), onednn.merged_decoding(model):
            pass
    onednn.unpack_linears(model)
    for name, weight in base_weights(model).items():
        assert torch.equal(weight, before[name]), name


@pytest.mark.parametrize("packed", [True, False])
def test_a_fold_leaves_the_frozen_base_weights_as_loaded(tiny_tokenizer, tmp_path, packed):
    engine = HFEngine(build_model(tiny_tokenizer), tiny_tokenizer, model_name="tiny", batch_size=8,
                      packed_weights=packed)
    run_fold(tiny_tokenizer, tmp_path / "run", config(steps=3, teacher="self-ema"), engine=engine)
    engine.unload_adapter()
    fresh = build_model(tiny_tokenizer).state_dict()
    for name, weight in engine.model.state_dict().items():
        assert torch.equal(weight, fresh[name]), name


# ------------------------------------------------------------------------------ (a) bitwise resume
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "plain"])
@pytest.mark.parametrize("teacher", ["self-frozen", "self-ema"])
def test_a_fold_stopped_after_any_step_resumes_bit_for_bit(tiny_tokenizer, tmp_path, teacher, packed):
    """checkpoint_every 1, stopped after step k (k = 1..3 of 4) and resumed: the same adapter, torch.equal."""
    fold_config = config(teacher=teacher)
    expected = adapter_of(run_fold(tiny_tokenizer, tmp_path / "straight", fold_config, packed=packed))
    for k in (1, 2, 3):
        run_dir = tmp_path / f"stopped-{k}"
        with pytest.raises(Killed):
            run_fold(tiny_tokenizer, run_dir, fold_config, packed=packed, on_step=kill_after(k + 1))
        assert (run_dir / f"step-{k:06d}" / "state.json").is_file()
        resumed = run_fold(tiny_tokenizer, run_dir, fold_config, packed=packed, resume=True)
        assert resumed.resumed_from == k
        assert_bitwise(expected, adapter_of(resumed))
        assert steps_of(run_dir / "metrics.jsonl") == [1, 2, 3, 4]
        assert without_timings(run_dir / "metrics.jsonl") == without_timings(tmp_path / "straight" / "metrics.jsonl")


# ----------------------------------------------------------------------- (b) metrics, (c) scratch
def test_metrics_continue_exactly_after_the_checkpoint(tiny_tokenizer, tmp_path):
    fold_config = config(steps=6, checkpoint_every=2)
    straight = run_fold(tiny_tokenizer, tmp_path / "straight", fold_config)
    run_dir = tmp_path / "killed"
    with pytest.raises(Killed):  # step 3's line is written, its checkpoint is not (the last one: step 2)
        run_fold(tiny_tokenizer, run_dir, fold_config, on_step=kill_after(3))
    assert steps_of(run_dir / "metrics.jsonl") == [1, 2, 3]
    written = (run_dir / "metrics.jsonl").read_text().splitlines()
    with open(run_dir / "metrics.jsonl", "a") as sink:
        sink.write('{"step": 4, "loss": 0.')  # a line cut short by a kill
    resumed = run_fold(tiny_tokenizer, run_dir, fold_config, resume=True)
    assert resumed.resumed_from == 2
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert steps_of(run_dir / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    assert lines[:2] == written[:2]  # the checkpoint's lines, untouched
    assert without_timings(run_dir / "metrics.jsonl") == without_timings(tmp_path / "straight" / "metrics.jsonl")
    assert (resumed.loss_first, resumed.loss_last, resumed.kl_first) == (
        straight.loss_first, straight.loss_last, straight.kl_first)
    assert not list(run_dir.glob(".metrics-*"))


def test_keep_metrics_cuts_at_the_step_and_keeps_a_steps_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "n": i}) + "\n" for i, s in enumerate([1, 2, 2, 3, 1, 2])))
    assert keep_metrics(path, 2) == [{"step": 1, "n": 4}, {"step": 2, "n": 5}]
    assert steps_of(path) == [1, 2]
    assert keep_metrics(path, 0) == [] and not path.exists()
    assert keep_metrics(path, 3) == [] and not path.exists()


def test_a_new_start_cleans_what_killed_writes_left(tiny_tokenizer, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    stale = [run_dir / ".ckpt-x1", run_dir / ".ckpt-old-x2", run_dir / ".adapter-x3"]
    for path in stale:
        (path / "adapter").mkdir(parents=True)
        (path / "adapter" / "adapter_model.safetensors").write_bytes(b"half")
    (run_dir / ".metrics-x4").write_text('{"step": 1}\n')
    kept = run_dir / "notes"
    kept.mkdir()
    assert len(clean_scratch(run_dir)) == 4 and not any(path.exists() for path in stale) and kept.is_dir()
    for path in stale:
        path.mkdir()
    seen = []
    run_module = importlib.import_module("learners.run")  # the trainer-run harness borrows the weights
    real = run_module.borrow

    def borrow(*args, **kwargs):  # the fold's start: no scratch left by now
        seen.append(sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")))
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "borrow", borrow)
    run_fold(tiny_tokenizer, run_dir, config(steps=1))
    assert seen == [[]]
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []


# ---------------------------------------------------------------------------------------- (e) SFT
def sft_episodes() -> list[Trajectory]:
    episodes = []
    for index, word in enumerate(["apple", "banana", "cherry", "river", "fox", "dog"]):
        episodes.append(Trajectory(
            env="toy:1", item_id=f"train-{index}", split="train", success=True,
            prompt=[Message(role="user", content=f"Say the word: {word}")],
            turns=[Turn(action=word, reward=1.0, done=True)]))
    return episodes


def run_sft(tokenizer, run_dir: Path, *, resume: bool = False, on_step=None):
    engine = HFEngine(build_model(tokenizer), tokenizer, model_name="tiny", batch_size=4)
    fold_config = FoldConfig(steps=6, batch_size=2, lora_rank=4, lora_alpha=8, lora_dropout=0.1, checkpoint_every=2)
    return sft(engine, sft_episodes(), fold_config, SftConfig(learning_rate=1e-2), run_dir, seed=3,
               resume=resume, on_step=on_step)


def test_sft_stopped_and_resumed_gives_the_same_adapter_bit_for_bit(tiny_tokenizer, tmp_path):
    straight = run_sft(tiny_tokenizer, tmp_path / "straight")
    assert (tmp_path / "straight" / "step-000006" / "state.json").is_file()
    run_dir = tmp_path / "killed"
    with pytest.raises(Killed):  # dropout on: the torch RNG stream must come back too
        run_sft(tiny_tokenizer, run_dir, on_step=kill_after(3))
    assert steps_of(run_dir / "metrics.jsonl") == [1, 2, 3]
    resumed = run_sft(tiny_tokenizer, run_dir, resume=True)
    assert_bitwise(adapter_of(straight), adapter_of(resumed))
    assert (tmp_path / "straight" / "metrics.jsonl").read_text() == (run_dir / "metrics.jsonl").read_text()
    assert (resumed.loss_first, resumed.loss_last, resumed.trained_tokens) == (
        straight.loss_first, straight.loss_last, straight.trained_tokens)


# --------------------------------------------------------------------- (d) a finished fold, again
def tree(home: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(home)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(home.rglob("*"))}


def test_a_finished_fold_run_again_is_a_no_op_or_a_clear_error(model_dir, tmp_path, monkeypatch):
    import agent.cli
    from memory import Memory, Skill
    from tests.unit.test_cli import assert_user_error, flat, invoke, last_json

    monkeypatch.setattr(torch, "set_num_threads", lambda _: None)  # the CLI's engine on conftest's one thread
    home = tmp_path / "home"
    Memory.open(home=home).add_skills([Skill(kind="rule", family="toy:1", title="repeat the word",
                                             text="Repeat the asked word exactly, and nothing else.")])
    command = ["fold", "--model", model_dir, "--home", home, "--run-id", "f", "--steps", 2, "--json",
               "items_per_family=4", "probes=0", "fold.batch_size=2", "fold.checkpoint_every=1", "fold.max_turns=1",
               "fold.sampling.max_new_tokens=4", "protection.general=[toy:2]", "protection.gate_items=4"]
    result = last_json(invoke(*command))
    registered = home / "adapters" / "f"
    assert result["adapter"] == str(registered) and (registered / "adapter_config.json").is_file()
    before = tree(home)

    def not_now(*args, **kwargs):
        raise AssertionError("nothing is loaded for a finished fold")

    monkeypatch.setattr(agent.cli, "open_engine", not_now)
    monkeypatch.setattr(agent.cli, "open_memory", not_now)
    monkeypatch.setattr(agent.cli, "open_engine_and_memory", not_now, raising=False)
    again = invoke(*command, "--resume")
    assert last_json(again) == result  # exit 0, the fold's result as it was
    assert f"its adapter is {registered}" in flat(again.stderr) and "Traceback" not in again.output
    message = assert_user_error(invoke(*command), "--run-id", str(registered))
    assert "--resume" in message
    assert tree(home) == before  # nothing new on disk, no stray folds/f/adapter
    assert not (home / "folds" / "f" / "adapter").exists()
