"""Run configuration: pydantic models, loaded from TOML/YAML, with `key=value` overrides.

Every command builds one config object from (lowest to highest priority) its defaults, an optional
file (`--config run.toml` or `.yaml`), its own flags, and trailing `key=value` overrides with dotted
keys (`model.batch_size=16 sampling.temperature=0.7`). The resolved config is saved as
`config.json` into the run directory, so a run can be repeated exactly.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engines.base import SamplingParams
from engines.config import EngineConfig
from learners.fold import FoldConfig
from learners.grpo import GrpoConfig

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(ValueError):
    """A malformed config file or override, reported with what to fix."""


# The model of every run config is the engine config: `model.kind`, `model.name`, `model.batch_size` ...
ModelConfig = EngineConfig


class EnvConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="task family spec, e.g. rg:leg_counting")
    options: dict[str, Any] = Field(default_factory=dict, description="family options (difficulty ...)")
    mcp: list[str] = Field(default_factory=list, description="MCP servers (stdio commands) whose tools the agent may call")


class EvalConfig(BaseModel):
    """`skillfold eval`: held-out accuracy of a model on task families."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig)
    envs: list[EnvConfig] = Field(default_factory=list)
    items: int = Field(default=32, ge=1, description="held-out items per family")
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(max_new_tokens=64))
    max_turns: int = Field(default=8, ge=1)
    home: Path = Field(default_factory=lambda: default_home())
    memory: bool = Field(default=False, description="retrieve skills from memory into the prompt")
    memory_url: str | None = Field(default=None, description="Chroma server URL instead of the embedded store")
    token_budget: int = Field(default=600, ge=0, description="prompt tokens skills may take")
    retrieve_k: int = Field(default=3, ge=0, description="skills retrieved per task")


class LoopSettings(BaseModel):
    """The agent loop (`skillfold run`): how episodes are played and skills distilled."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    episodes: int = Field(default=32, ge=1, description="train episodes to play")
    batch_size: int = Field(default=8, ge=1, description="episodes advanced together")
    max_turns: int = Field(default=8, ge=1)
    sampling: SamplingParams = Field(
        default_factory=lambda: SamplingParams(temperature=0.7, max_new_tokens=64),
        description="how episodes sample (exploration finds the first successes)",
    )
    probe_sampling: SamplingParams = Field(
        default_factory=lambda: SamplingParams(max_new_tokens=64), description="how candidates are verified"
    )
    token_budget: int = Field(default=600, ge=0, description="prompt tokens skills may take")
    retrieve_k: int = Field(default=3, ge=0, description="skills retrieved per task")
    probes: int = Field(default=8, ge=1, description="train items kept to verify candidate skills")
    max_candidates_per_batch: int = Field(default=2, ge=0)
    reflect_every: int = Field(default=16, ge=0, description="episodes between model-written rules; 0 = never")
    approve: bool = Field(default=False, description="ask a person before storing each new skill")
    pending: bool = Field(
        default=False,
        description="store verified skills as pending (never retrieved) for `skillfold skills approve` or the ui",
    )
    start_index: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _one_way_to_approve(self) -> LoopSettings:
        if self.approve and self.pending:
            raise ValueError("loop.approve asks now and loop.pending asks later: set one of them")
        return self


class RunConfig(BaseModel):
    """`skillfold run`: play train episodes with memory, store them, distil skills."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig)
    env: EnvConfig
    loop: LoopSettings = Field(default_factory=LoopSettings)
    home: Path = Field(default_factory=lambda: default_home())
    memory_url: str | None = Field(default=None, description="Chroma server URL instead of the embedded store")
    run_id: str | None = Field(default=None, description="name of the run; an unfinished run of that name resumes")


GENERAL_SET = ("general", "rg:basic_arithmetic", "rg:letter_counting")


class ProtectionSettings(BaseModel):
    """What a fold keeps as it was when nobody names an anchor, and the check before its adapter is promoted
    (`agent.protection`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(default=True, description="replay prompts of what the fold does not train (the memory's "
                          "other families and the general set) as anchors: distilled toward the model as it was "
                          "before the fold, with no skills, at `fold.anchor_fraction` of every batch")
    memory_families: bool = Field(default=True, description="protect every family in memory that the fold does not train")
    general: list[str] = Field(default_factory=lambda: list(GENERAL_SET), description="the general prompt set: "
                               "everyday instructions (`general`, unscored) and families the default model can "
                               "partly do (scored, so the retention check covers them)")
    gate: bool = Field(default=True, description="after the fold, check retention on the protected families that "
                       "have a score; an adapter that fails is kept but not promoted")
    tolerance: float = Field(default=0.03, ge=0, le=1, description="largest drop allowed (accuracy, memory off)")
    gate_items: int = Field(default=64, ge=1, description="held-out items per family behind the check: the last "
                            "ones of its eval split, away from the first ones that evaluations and reports use")
    force: bool = Field(default=False, description="promote an adapter that fails the check (the evidence is kept)")
    fallback: bool = Field(default=True, description="when the fold's last adapter fails the check, check the "
                           "adapters its checkpoints kept (fold.keep_adapters), newest first, and promote the first "
                           "that passes (not with force, which promotes the last)")


class FoldRunConfig(BaseModel):
    """`skillfold fold`: distil the active skills of families into an adapter."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig)
    home: Path = Field(default_factory=lambda: default_home())
    memory_url: str | None = None
    families: list[str] | None = Field(default=None, description="families to fold; None = all with active skills")
    anchors: list[str] = Field(default_factory=list, description="families to keep as they are (no skills)")
    items_per_family: int = Field(default=64, ge=1)
    probes: int = Field(default=8, ge=0, description="last train items reserved for skill verification")
    token_budget: int = Field(default=600, ge=0)
    retrieve_k: int = Field(default=3, ge=0)
    fold: FoldConfig = Field(default_factory=FoldConfig)
    protection: ProtectionSettings = Field(default_factory=ProtectionSettings)
    run_id: str | None = None


class TrainRunConfig(BaseModel):
    """`skillfold train --method grpo`: reinforcement learning on a family's reward, outside an experiment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig)
    home: Path = Field(default_factory=lambda: default_home())
    method: Literal["grpo"] = Field(default="grpo", description="the RL method (learners.policies.RL_METHODS)")
    env: EnvConfig | None = Field(default=None, description="the task family whose reward is learned")
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    items_per_family: int = Field(default=64, ge=1, description="train items the prompts are drawn from")
    probes: int = Field(default=8, ge=0, description="last train items left out (kept for skill verification)")
    run_id: str | None = None


def default_home() -> Path:
    return Path(os.environ.get("SKILLFOLD_HOME", ".skillfold"))


def parse_value(text: str) -> Any:
    """A YAML scalar or flow collection (`3`, `0.5`, `true`, `[a, b]`, `{k: v}`), else the text."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted `key=value` pairs into a nested dict (in place) and return it."""
    for override in overrides:
        key, separator, raw = override.partition("=")
        if not separator or not key.strip():
            raise ConfigError(f"override {override!r} is not key=value (example: model.batch_size=16)")
        target = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            existing = target.get(part)
            if existing is None:
                existing = target[part] = {}
            if not isinstance(existing, dict):
                raise ConfigError(f"override {override!r}: {part} is not a section")
            target = existing
        target[parts[-1]] = parse_value(raw)
    return data


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config PATH of a TOML or YAML file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml", ".json"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"config file {path} is malformed: {error}; fix the syntax there") from error
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table/mapping at the top")
    return data


def build_config(
    model: type[ConfigT], path: Path | None, flags: dict[str, Any], overrides: list[str]
) -> ConfigT:
    """Defaults < file < flags (None values skipped) < key=value overrides, validated."""
    data = read_config_file(path) if path else {}
    for key, value in flags.items():
        if value is not None:
            apply_overrides_value(data, key, value)
    apply_overrides(data, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(_problem(model, item) for item in error.errors())
        raise ConfigError(f"invalid {model.__name__}: {problems}") from error


def _problem(model: type[BaseModel], item: Any) -> str:
    """One validation error as a user reads it: the dotted key, what is wrong, what was given or allowed."""
    key = ".".join(str(part) for part in item["loc"])
    if item["type"] == "extra_forbidden":
        known = _known_keys(model, item["loc"][:-1])
        return f"unknown key {key}" + (f" (known here: {', '.join(known)})" if known else "")
    given = item.get("input")
    shown = "" if isinstance(given, dict | list) or given is None else f", got {given!r}"
    return f"{key}: {item['msg']}{shown}"


def _known_keys(model: type[BaseModel], location: tuple) -> list[str]:
    """The keys the config section at `location` accepts ([] where it is not a plain section)."""
    for part in location:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def apply_overrides_value(data: dict[str, Any], dotted: str, value: Any) -> None:
    target = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = value


def save_config(config: BaseModel, run_dir: Path) -> Path:
    path = run_dir / "config.json"
    write_atomic(path, json.dumps(config.model_dump(mode="json"), indent=2))
    return path


def process_alive(pid: int) -> bool:
    """Whether this machine runs a process `pid` (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_atomic(path: Path, text: str) -> None:
    """Write `path` whole or not at all: `.<name>.<pid>.tmp` beside it, then renamed over it (processes
    sharing a directory never collide). A temporary of it that a killed process left goes first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        pid = stale.name[len(path.name) + 2 : -len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            stale.unlink(missing_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
