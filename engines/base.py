"""The engine protocol: everything that touches the model goes through these calls.

`Engine` is what every engine implements and all that `agent/` and `learners/` may call for
generation and scoring. Two capabilities an engine may declare on top, by implementing them:
- `GuidedEngine`: rollouts from a policy that blends the student with a teacher, token by token
  (the fold's speculative and mixture rollout policies need it);
- `SharesWeights`: an in-process engine that lends its base weights to a trainer in the same process
  (one copy of the weights for serving and training) and serves the trainer's live module;
- `AdapterPerRequest`: an engine that serves a different LoRA adapter to each prompt of one call
  (vLLM's per-request adapters); `engines.routed.RoutedEngine` routes prompts to adapters on any engine
  (on one without it, by switching the adapter between groups of prompts).
The adapter hand-off is `load_adapter(path)` for any engine (a directory the trainer wrote) and
`serve_trained(module)` for one that shares its weights (the tensors themselves, no copy).

A prompt is a chat: a list of `{"role", "content"}` dicts, rendered with the model's chat template
and the generation prompt appended. An `Engine` generates for a batch of prompts and scores given
completion tokens under given prompts (the teacher signal for distillation). Log-probs are always
those of the model itself (a plain forward pass and log_softmax at temperature 1, before any
temperature or top-p warping), so they can serve as importance ratios and KL terms.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

Chat = Sequence[dict[str, str]]


class AdapterError(RuntimeError):
    """A LoRA adapter that cannot be loaded onto this model."""


class EngineUnavailable(RuntimeError):
    """An engine that cannot be reached (a server that is down); the message names how to start one."""


class SamplingParams(BaseModel):
    """How to generate. temperature 0 means greedy decoding."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(default=64, ge=1)
    stop: tuple[str, ...] = Field(default=(), description="generation ends after any of these strings")
    min_tokens: int = Field(
        default=0, ge=0,
        description="EOS and stop strings cannot end a completion before this many tokens (vLLM's min_tokens); "
        "log-probs stay those of the unconstrained model",
    )
    seed: int = Field(default=0, description="row i of a batch samples from seed + i")


class Generation(BaseModel):
    """One generated completion."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(description="decoded completion, cut before a stop string")
    token_ids: list[int] = Field(description="every sampled token, the one that completed a stop included")
    logprobs: list[float] = Field(description="model log-prob of each sampled token")
    prompt_tokens: int
    finish_reason: Literal["stop", "length"]
    adapter_version: int | None = Field(
        default=None, description="the adapter version that sampled it, where the engine names one per request "
        "(a remote engine whose adapter may change while requests are in flight); None = the engine's current")


class GuidedGeneration(Generation):
    """A completion sampled by a rollout policy that mixes the student with a teacher
    (`HFEngine.generate_guided`). `logprobs` stay the student's model log-probs of the chosen tokens;
    the behaviour log-probs are those of the policy μ that chose them (at temperature 1, before
    temperature or top-p warping, like every log-prob here), for importance ratios S/μ."""

    sources: list[int] = Field(description="per token: 0 = the student's token, 1 = a teacher token")
    behaviour_logprobs: list[float] = Field(description="log μ of each chosen token under the rollout policy")
    teacher_logprobs: list[float] = Field(description="the teacher view's model log-prob of each chosen token")


class TokenScores(BaseModel):
    """Per-token log-probs of a given completion under a given prompt."""

    model_config = ConfigDict(extra="forbid")

    token_ids: list[int]
    logprobs: list[float]
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None


@runtime_checkable
class Engine(Protocol):
    """Batched, synchronous access to one model (and at most one active LoRA adapter)."""

    model_name: str

    def generate(
        self,
        prompts: Sequence[Chat],
        params: SamplingParams,
        progress: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        """Complete every prompt; `progress(k)` is called as each k more rows finish."""
        ...

    def score(
        self, prompts: Sequence[Chat], completions: Sequence[Sequence[int]], top_k: int = 0
    ) -> list[TokenScores]: ...

    def count_tokens(self, prompt: Chat) -> int: ...

    def load_adapter(self, path: str) -> None: ...

    def unload_adapter(self) -> None: ...

    @property
    def adapter(self) -> str | None: ...


@runtime_checkable
class GuidedEngine(Engine, Protocol):
    """An engine that samples from a student-teacher rollout policy (`HFEngine.generate_guided`)."""

    def generate_guided(
        self,
        student_prompts: Sequence[Chat],
        teacher_prompts: Sequence[Chat],
        params: SamplingParams,
        *,
        policy: Literal["speculative", "mixture", "pedagogical"],
        top_k: int = 20,
        mix: float = 0.0,
        surprisal: float = math.inf,
        teacher_scope: Callable[[], contextlib.AbstractContextManager] | None = None,
        teacher_model: Any = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[GuidedGeneration]: ...


@runtime_checkable
class AdapterPerRequest(Protocol):
    """An engine that serves each prompt of one call with its own adapter, without switching what the
    engine serves (`VLLMEngine`: the adapter is named per request)."""

    def generate_routed(
        self,
        prompts: Sequence[Chat],
        adapters: Sequence[str | None],
        params: SamplingParams,
        progress: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        """`generate`, prompt i served by adapter directory `adapters[i]` (None: the base model)."""
        ...


@dataclass
class LentBase:
    """What an in-process engine lends a trainer: its base causal LM (frozen; the trainer may wrap it in
    LoRA layers in place, or train it whole), the tokenizer it renders chats with, and its end tokens."""

    model: Any
    tokenizer: Any
    stop_ids: set[int]


@runtime_checkable
class SharesWeights(Protocol):
    """An in-process engine whose base weights a trainer trains on, in the same process, without a copy.

    `lend_base` unloads any adapter and hands the base model over (the engine keeps its memory
    settings: `memory_first` drops copies of weights kept only for speed); `serve_trained(module)` makes
    the engine generate with the trainer's live module (base + adapter, as trained so far) from its next
    call; `reclaim(base, adapter)` ends the loan: the engine serves `base` again (the trainer's LoRA
    layers removed), with the adapter directory `adapter` on top when given."""

    def lend_base(self, *, memory_first: bool = False) -> LentBase: ...

    def serve_trained(self, module: Any) -> None: ...

    def reclaim(self, base: Any, adapter: str | None) -> None: ...
