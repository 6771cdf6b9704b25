"""The environment protocol and the records that describe an episode.

An environment is single-use: it is made for one item of one task family, hands out its first
observation, takes actions until it says `done`, and is then thrown away (no reset). A task family
makes environments for the items of its train and eval splits; the two splits never share an item.

Everything that crosses a package boundary about an episode is a pydantic record defined here, at
the bottom of the import graph: `Message`, `StepResult`, `ToolUse`, `Turn`, `Trajectory`.

The protocol, in full (docs/environments.md has a worked example):
- `TaskFamily`: `name`, `success_threshold`, `split_size(split)`, `make(split, index)`, and optionally
  `exemplar(trajectory) -> list[Message]`: the brief form a won episode is remembered in as an exemplar
  skill (default: its whole transcript; a text game keeps its moves and what they showed, `envs.textworld_express`).
- `Environment`: `family`, `item_id`, `initial_observation()`, `step(action)`, and optionally
  `close()`, which the rollout loop calls once at the end of every episode (a failed one included).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Role = Literal["system", "user", "assistant"]
Split = Literal["train", "eval"]


class Message(BaseModel):
    """One chat message. Tool results come back to the model as `user` messages."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


class ToolUse(BaseModel):
    """One tool call an action made, as it ran: what was asked, what came back, how long it took."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="the tool's name, e.g. calc")
    arguments: dict[str, Any] | str = Field(
        description="the arguments as parsed (a dict), or the raw argument text when it could not be parsed")
    result: str | None = Field(default=None, description="the result text the model was shown (capped)")
    error: str | None = Field(default=None, description="why the call failed: bad arguments, an exception, a timeout")
    seconds: float = 0.0


class StepResult(BaseModel):
    """What `Environment.step` returns: messages to show next, the reward of this step, done."""

    model_config = ConfigDict(extra="forbid")

    observation: list[Message] = Field(default_factory=list, description="messages appended after the action")
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = Field(default_factory=dict)
    tool_calls: list[ToolUse] = Field(default_factory=list, description="tool calls this action made")


class EnvSpecError(ValueError):
    """A bad environment name or option: bad input from a user, reported with the fix."""


SettingsT = TypeVar("SettingsT", bound=BaseModel)


def family_settings(model: type[SettingsT], settings: dict[str, Any], options: dict[str, Any],
                    label: str) -> tuple[SettingsT, dict[str, Any]]:
    """A family's settings (`model`, pydantic) from `settings`, where any of them may also come among the
    spec's `options` (`-o key=value`): taken out of the options, refused when given twice with two values.
    Returns (the settings, the options left for the family itself); a bad value is an `EnvSpecError`
    naming `label` (e.g. `rg:leg_counting`) and the field."""
    options = dict(options or {})
    settings = dict(settings)
    for key in set(options) & set(model.model_fields):  # a setting given as an option
        value = options.pop(key)
        if settings.get(key, value) != value:
            raise EnvSpecError(f"{label}: {key} given twice: {value!r} and {settings[key]!r}")
        settings[key] = value
    try:
        return model(**settings), options
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, problem['loc']))}: {problem['msg']}" for problem in error.errors()
        )
        raise EnvSpecError(f"{label}: bad setting: {problems}") from error


@runtime_checkable
class Environment(Protocol):
    """One episode of one item. `initial_observation` once, then `step` until `done`.

    An environment that holds a resource (a process, a file, a connection) may also define
    `close()`: the loop calls it once when the episode ends, however it ends (`close_environment`).
    """

    family: str
    item_id: str

    def initial_observation(self) -> list[Message]: ...

    def step(self, action: str) -> StepResult: ...


def close_environment(environment: Environment) -> str | None:
    """Call the environment's optional `close()`; returns what it raised as text (None when fine)."""
    close = getattr(environment, "close", None)
    if close is None:
        return None
    try:
        close()
    except Exception as error:  # a failing close is recorded on the episode, never a crash
        return f"close() raised {type(error).__name__}: {error}"[:2000]
    return None


def item_prompt(family: TaskFamily, split: Split, index: int) -> list[Message] | None:
    """An item's first observation (to retrieve skills for it), its environment closed after; None when
    the environment fails (its episode will fail on record when it is played)."""
    try:
        environment = family.make(split, index)
    except Exception:
        return None
    try:
        return list(environment.initial_observation())
    except Exception:
        return None
    finally:
        close_environment(environment)


@runtime_checkable
class TaskFamily(Protocol):
    """Makes single-use environments for the items of a family's two disjoint splits.

    An episode succeeds when it ends without error and its summed reward reaches `success_threshold`
    (1.0 for a family that scores one answer as 0 or 1).
    """

    name: str
    success_threshold: float

    def make(self, split: Split, index: int) -> Environment: ...

    def split_size(self, split: Split) -> int:
        """How many distinct items the split holds (an upper bound on `index`)."""
        ...


class Turn(BaseModel):
    """One action of the agent and what the environment answered."""

    model_config = ConfigDict(extra="forbid")

    action: str = Field(description="the raw text the model produced")
    observation: list[Message] = Field(default_factory=list)
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = Field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_ids: list[int] = Field(
        default_factory=list, description="the sampled tokens of `action` as the engine returned them (a stop "
        "string's tokens included): trainers train on exactly these")
    logprobs: list[float] = Field(
        default_factory=list, description="the behaviour log-prob of each sampled token (the rollout policy's, "
        "at temperature 1), for importance ratios")
    adapter_version: int | None = Field(default=None, description="the adapter version that sampled this turn")
    tool_calls: list[ToolUse] = Field(default_factory=list, description="the tool calls of this action, as they ran")


def _now() -> datetime:
    return datetime.now(UTC)


class Trajectory(BaseModel):
    """A whole episode: the prompt it started from, every turn, and how it ended."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    env: str = Field(description="task family name, e.g. rg:leg_counting")
    item_id: str
    split: Split
    prompt: list[Message] = Field(description="the initial observation (without retrieved skills)")
    context: list[Message] = Field(default_factory=list, description="messages put before the prompt: skills")
    turns: list[Turn] = Field(default_factory=list)
    reward: float = 0.0
    success: bool = False
    error: str | None = Field(default=None, description="set when the environment raised: a failed episode")
    truncated: bool = Field(default=False, description="stopped by the turn limit, not by the environment")
    skill_ids: list[str] = Field(default_factory=list)
    model: str = ""
    adapter: str | None = None
    started_at: datetime = Field(default_factory=_now)
    duration_s: float = 0.0
    info: dict[str, Any] = Field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return sum(turn.prompt_tokens for turn in self.turns)

    @property
    def completion_tokens(self) -> int:
        return sum(turn.completion_tokens for turn in self.turns)

    def messages(self, with_context: bool = False) -> list[Message]:
        """The full transcript: prompt (with context), then each action and its observation.

        Context goes after the prompt's leading system messages (the task's own instructions, such
        as a tool description, stay first) and before its first user message.
        """
        leading = 0
        while leading < len(self.prompt) and self.prompt[leading].role == "system":
            leading += 1
        out = list(self.prompt[:leading])
        if with_context:
            out.extend(self.context)
        out.extend(self.prompt[leading:])
        for turn in self.turns:
            out.append(Message(role="assistant", content=turn.action))
            out.extend(turn.observation)
        return out
