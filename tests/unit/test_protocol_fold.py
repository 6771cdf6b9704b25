"""The trainer reaches engines through the protocol alone: a fold over an engine that implements only
`engines.base.Engine` trains the same adapter as over the HF engine; the learners' imports stay inside
their boundary."""

import ast
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engines.base import Engine, GuidedEngine, LentBase, SharesWeights
from engines.hf import HFEngine
from envs import make_family
from envs.base import Message
from learners.fold import FoldConfig, FoldError, FoldItem, fold
from tests.tiny import build_model

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = [Message(role="user", content="Say the word: apple"), Message(role="assistant", content="apple")]
SPEED_LAYER = {"engines.onednn", "engines.lean", "engines.small_linear", "engines.prefix", "engines.allocator",
               "engines.graphs"}


class ProtocolEngine:
    """Implements `Engine` and nothing more: generation by delegation to a private HF engine over its own
    copy of the model; the adapter hand-off is a directory (`load_adapter`), as for a remote engine."""

    def __init__(self, model, tokenizer) -> None:
        self._inner = HFEngine(model, tokenizer, model_name="tiny", batch_size=8, packed_weights=False)
        self.model_name = "tiny"
        self.loaded: list[str] = []

    def generate(self, prompts, params, progress=None):
        return self._inner.generate(prompts, params, progress)

    def score(self, prompts, completions, top_k=0):
        return self._inner.score(prompts, completions, top_k)

    def count_tokens(self, prompt):
        return self._inner.count_tokens(prompt)

    def load_adapter(self, path):
        self.loaded.append(path)
        self._inner.load_adapter(path)

    def unload_adapter(self):
        self._inner.unload_adapter()

    @property
    def adapter(self):
        return self._inner.adapter

    @property
    def adapter_version(self):
        return self._inner.adapter_version


def fold_config(**overrides) -> FoldConfig:
    values = dict(steps=3, batch_size=4, learning_rate=5e-3, lora_rank=4, lora_alpha=8, checkpoint_every=2,
                  sampling={"temperature": 1.0, "max_new_tokens": 8})
    values.update(overrides)
    return FoldConfig(**values)


def test_a_fold_through_the_protocol_alone_trains_the_same_adapter(tiny_tokenizer, tmp_path):
    family = make_family("toy")
    items = [FoldItem(family=family.name, index=i, context=CONTEXT) for i in range(12)]
    remote = ProtocolEngine(build_model(tiny_tokenizer), tiny_tokenizer)
    assert isinstance(remote, Engine) and not isinstance(remote, SharesWeights | GuidedEngine)
    trainer_base = LentBase(model=build_model(tiny_tokenizer).requires_grad_(False), tokenizer=tiny_tokenizer,
                            stop_ids={tiny_tokenizer.eos_token_id})
    through_protocol = fold(remote, {family.name: family}, items, fold_config(), tmp_path / "protocol",
                            base=trainer_base)
    local = HFEngine(build_model(tiny_tokenizer), tiny_tokenizer, model_name="tiny", batch_size=8,
                     packed_weights=False)
    in_process = fold(local, {family.name: family}, items, fold_config(), tmp_path / "hf")
    # one hand-off before the first step and one after each step, then the final adapter
    assert len(remote.loaded) == 3 + 1 + 1 and remote.adapter == through_protocol.adapter
    expected = load_file(str(Path(in_process.adapter) / "adapter_model.safetensors"))
    actual = load_file(str(Path(through_protocol.adapter) / "adapter_model.safetensors"))
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.allclose(expected[name], actual[name], atol=1e-6), name
    records = [line for line in (tmp_path / "protocol" / "metrics.jsonl").read_text().splitlines()]
    assert all('"handoff_seconds"' in record for record in records)


def test_rollouts_may_run_a_step_ahead_within_max_staleness(tiny_tokenizer, tmp_path):
    """With an engine apart from the trainer, max_staleness >= sync_every lets the next step's rollouts run
    while this step trains: they lag one step, and every metrics line says by how much."""
    import json

    family = make_family("toy")
    items = [FoldItem(family=family.name, index=i, context=CONTEXT) for i in range(12)]

    def run(name: str, **overrides):
        remote = ProtocolEngine(build_model(tiny_tokenizer), tiny_tokenizer)
        base = LentBase(model=build_model(tiny_tokenizer).requires_grad_(False), tokenizer=tiny_tokenizer,
                        stop_ids={tiny_tokenizer.eos_token_id})
        fold(remote, {family.name: family}, items, fold_config(steps=4, **overrides), tmp_path / name, base=base)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return remote, [json.loads(line)["rollout_lag"] for line in lines]

    remote, lags = run("on-policy")
    assert lags == [0, 0, 0, 0] and len(remote.loaded) == 1 + 4 + 1
    remote, lags = run("ahead", max_staleness=1)
    assert lags == [0, 1, 1, 1] and len(remote.loaded) == 1 + 4 + 1
    remote, lags = run("every-2", sync_every=2, max_staleness=1)  # lag from the hand-off interval alone
    assert lags == [0, 1, 0, 1] and len(remote.loaded) == 1 + 2 + 1
    with pytest.raises(FoldError, match="max_staleness"):
        run("too-stale", sync_every=3, max_staleness=1)
    assert not (tmp_path / "too-stale").exists()  # refused before anything was written


def test_a_guided_method_on_an_engine_without_guided_generation_fails_before_the_fold(tiny_tokenizer, tmp_path):
    family = make_family("toy")
    remote = ProtocolEngine(build_model(tiny_tokenizer), tiny_tokenizer)
    items = [FoldItem(family=family.name, index=0, context=CONTEXT)]
    for method in ("speculative", "trb"):
        with pytest.raises(FoldError, match="guided generation"):
            fold(remote, {family.name: family}, items, fold_config(method=method), tmp_path / method)
        assert not (tmp_path / method).exists()  # refused before anything was written
    with pytest.raises(FoldError, match="guided generation"):
        fold(remote, {family.name: family}, items, fold_config(rollout="mixture"), tmp_path / "mixture")


def test_turns_keep_the_sampled_tokens_and_their_logprobs(tiny_engine):
    from engines.base import SamplingParams
    from learners.rollout import run_episodes

    family = make_family("toy")
    trajectories = run_episodes(tiny_engine, [family.make("eval", i) for i in range(3)],
                                SamplingParams(max_new_tokens=6, temperature=1.0), split="eval")
    for trajectory in trajectories:
        for turn in trajectory.turns:
            assert len(turn.token_ids) == len(turn.logprobs) == turn.completion_tokens > 0
            assert all(logprob <= 0 for logprob in turn.logprobs)
            assert turn.adapter_version == tiny_engine.adapter_version


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_learners_reach_the_speed_layer_through_one_module_and_losses_import_torch_only():
    naming = {path.name for path in (ROOT / "learners").glob("*.py") if _imports(path) & SPEED_LAYER}
    assert naming == {"passes.py"}, naming
    ours = {"envs", "engines", "memory", "learners", "agent"}
    losses = {name for name in _imports(ROOT / "learners" / "losses.py") if name.split(".")[0] in ours}
    assert not losses, losses
    for path in (ROOT / "learners").glob("*.py"):  # the trainer never assigns the engine's model
        text = path.read_text()
        assert "engine.model =" not in text and "engine.base_model" not in text, path.name
        assert "hasattr(engine" not in text, path.name


def test_a_failed_fold_gives_the_engine_back_as_it_served_before(tiny_tokenizer, tmp_path, monkeypatch):
    import learners.policies as policies
    from engines.base import SamplingParams

    family = make_family("toy")
    items = [FoldItem(family=family.name, index=i, context=CONTEXT) for i in range(8)]
    engine = HFEngine(build_model(tiny_tokenizer), tiny_tokenizer, model_name="tiny", batch_size=8)
    params = SamplingParams(max_new_tokens=8)
    before = [output.token_ids for output in engine.generate([[{"role": "user", "content": "hi"}]], params)]
    real = policies.chunked_generalized_jsd
    monkeypatch.setattr(policies, "chunked_generalized_jsd", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(FoldError, match="loss became nan"):
        fold(engine, {family.name: family}, items, fold_config(steps=2), tmp_path / "run")
    assert engine.adapter is None and engine._trained is None
    assert not any("lora" in name for name, _ in engine.model.named_modules())  # the trainer's layers are gone
    after = [output.token_ids for output in engine.generate([[{"role": "user", "content": "hi"}]], params)]
    assert after == before
