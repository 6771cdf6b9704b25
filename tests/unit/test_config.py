"""Config: file < flags < key=value overrides; clear errors for malformed input; saved per run."""

import json

import pytest

from agent.config import ConfigError, EvalConfig, ModelConfig, apply_overrides, build_config, save_config
from engines import EngineConfig, load_engine


def test_overrides_are_typed_and_dotted():
    data = apply_overrides({}, ["model.batch_size=16", "sampling.temperature=0.7", "items=5", "model.name=some/model"])
    assert data == {"model": {"batch_size": 16, "name": "some/model"}, "sampling": {"temperature": 0.7}, "items": 5}


def test_priority_file_then_flags_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('items = 3\n[model]\nbatch_size = 2\n[[envs]]\nname = "toy"\n')
    config = build_config(EvalConfig, path, {"items": 7, "model.batch_size": None}, ["sampling.max_new_tokens=9"])
    assert config.items == 7  # flag beats file
    assert config.model.batch_size == 2  # a None flag leaves the file's value
    assert config.sampling.max_new_tokens == 9
    assert config.envs[0].name == "toy"


def test_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("items: 4\nenvs:\n  - name: rg:leg_counting\n    options: {max_animals: 2}\n")
    config = build_config(EvalConfig, path, {}, [])
    assert config.envs[0].options == {"max_animals": 2}


@pytest.mark.parametrize(
    "contents, suffix, message",
    [("items = [", ".toml", "malformed"), ("- a\n- b\n", ".yaml", "mapping"), ("x", ".ini", "must end in")],
)
def test_malformed_files_name_the_problem(tmp_path, contents, suffix, message):
    path = tmp_path / f"bad{suffix}"
    path.write_text(contents)
    with pytest.raises(ConfigError, match=message):
        build_config(EvalConfig, path, {}, [])


def test_unknown_key_and_bad_value_are_reported():
    with pytest.raises(ConfigError, match="modle"):
        build_config(EvalConfig, None, {}, ["modle.name=x"])
    with pytest.raises(ConfigError, match="items"):
        build_config(EvalConfig, None, {}, ["items=-1"])
    with pytest.raises(ConfigError, match="key=value"):
        build_config(EvalConfig, None, {}, ["items"])


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(EvalConfig, tmp_path / "nope.toml", {}, [])


def test_saved_config_round_trips(tmp_path):
    config = build_config(EvalConfig, None, {"envs": [{"name": "toy"}]}, ["model.threads=1"])
    path = save_config(config, tmp_path / "run")
    assert EvalConfig.model_validate(json.loads(path.read_text())) == config


def test_the_model_of_a_run_is_an_engine_config_that_load_engine_builds(monkeypatch):
    import engines

    assert ModelConfig is EngineConfig
    config = build_config(EvalConfig, None, {}, ["model.kind=hf", "model.batch_size=4"])
    assert isinstance(config.model, EngineConfig) and config.model.batch_size == 4
    with pytest.raises(ConfigError, match="model.kind"):
        build_config(EvalConfig, None, {}, ["model.kind=vllm"])
    built = []
    monkeypatch.setitem(engines._LOADERS, "hf", built.append)
    load_engine(config.model)
    assert built == [config.model]
    with pytest.raises(ValueError, match="unknown engine kind 'other'; available: hf"):
        load_engine(EngineConfig.model_construct(kind="other"))
