"""The environment protocol and the records that describe an episode.

An environment is single-use: it is made for one item of one task family, hands out its first
observation, takes actions until it says `done`, and is then thrown away (no reset). A task family
makes environments for the items of its train and eval splits; the two splits never share an item.

Everything that crosses a package boundary about an episode is a pydantic record defined here, at
the bottom of the import graph: `Message`, `StepResult`, `Turn`, `Trajectory`.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "user", "assistant"]
Split = Literal["train", "eval"]


class Message(BaseModel):
    """One chat message. Tool results come back to the model as `user` messages."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


class StepResult(BaseModel):
    """What `Environment.step` returns: messages to show next, the reward of this step, done."""

    model_config = ConfigDict(extra="forbid")

    observation: list[Message] = Field(default_factory=list, description="messages appended after the action")
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = Field(default_factory=dict)


class EnvSpecError(ValueError):
    """A bad environment name or option: bad input from a user, reported with the fix."""


@runtime_checkable
class Environment(Protocol):
    """One episode of one item. `initial_observation` once, then `step` until `done`."""

    family: str
    item_id: str

    def initial_observation(self) -> list[Message]: ...

    def step(self, action: str) -> StepResult: ...


@runtime_checkable
class TaskFamily(Protocol):
    """Makes single-use environments for the items of a family's two disjoint splits."""

    name: str

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
