"""An engine that serves each prompt the LoRA adapter its route names (adapters routed per request).

`RoutedEngine(inner, route)` wraps any engine; `route(chat)` names the adapter directory for a prompt
(None: the base model). On an engine that serves an adapter per request (`AdapterPerRequest`: vLLM)
one call carries every prompt with its own adapter. On any other engine (the HF engine, one adapter
at a time) the prompts are grouped by adapter and the groups run one after another, the engine's
adapter switched between them; the group the engine serves already runs first, so a multi-turn
episode's later turns switch no more than they must. What the switches cost is counted
(`RouteStats`). The router is the caller's (`agent.routing` routes by the memory's retrieval).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engines.base import (
    AdapterError,
    AdapterPerRequest,
    Chat,
    Engine,
    Generation,
    SamplingParams,
    TokenScores,
)


@dataclass
class RouteStats:
    """What routing did: prompts per adapter (None: the base model), adapter switches and their time."""

    prompts: Counter = field(default_factory=Counter)
    switches: int = 0
    switch_seconds: float = 0.0
    per_request: bool = False

    def as_dict(self) -> dict:
        return {"prompts": {str(key): value for key, value in self.prompts.items()}, "switches": self.switches,
                "switch_seconds": self.switch_seconds, "per_request": self.per_request}


class RoutedEngine:
    """`inner`, with each prompt served by the adapter `route(prompt)` names."""

    def __init__(self, inner: Engine, route: Callable[[Chat], str | None]) -> None:
        self.inner, self.route = inner, route
        self.model_name = inner.model_name
        self.stats = RouteStats(per_request=isinstance(inner, AdapterPerRequest))

    @property
    def tokenizer(self):
        return getattr(self.inner, "tokenizer", None)

    @property
    def adapter(self) -> str | None:
        return None  # no one adapter: each prompt's route names its own

    def load_adapter(self, path: str) -> None:
        raise AdapterError("a routed engine serves the adapter each prompt's route names; load an adapter on the "
                           "engine it wraps instead")

    def unload_adapter(self) -> None:
        raise AdapterError("a routed engine serves the adapter each prompt's route names; unload the adapter of "
                           "the engine it wraps instead")

    def count_tokens(self, prompt: Chat) -> int:
        return self.inner.count_tokens(prompt)

    def routes(self, prompts: Sequence[Chat]) -> list[str | None]:
        """Each prompt's adapter directory, as the engine names it (None: the base model)."""
        return [None if adapter is None else str(Path(adapter).expanduser())
                for adapter in (self.route(prompt) for prompt in prompts)]

    def generate(self, prompts: Sequence[Chat], params: SamplingParams,
                 progress: Callable[[int], None] | None = None) -> list[Generation]:
        adapters = self.routes(prompts)
        self.stats.prompts.update(adapters)
        if isinstance(self.inner, AdapterPerRequest):
            return self.inner.generate_routed(prompts, adapters, params, progress)
        return self._grouped(adapters, lambda rows: self.inner.generate([prompts[i] for i in rows], params, progress))

    def score(self, prompts: Sequence[Chat], completions: Sequence[Sequence[int]],
              top_k: int = 0) -> list[TokenScores]:
        adapters = self.routes(prompts)
        return self._grouped(adapters, lambda rows: self.inner.score([prompts[i] for i in rows],
                                                                     [completions[i] for i in rows], top_k))

    def _grouped(self, adapters: list[str | None], call: Callable[[list[int]], list]) -> list:
        """`call(rows)` for each adapter's rows, the engine switched to that adapter first; the results in
        the prompts' order."""
        groups: dict[str | None, list[int]] = {}
        for row, adapter in enumerate(adapters):
            groups.setdefault(adapter, []).append(row)
        served = self.inner.adapter
        order = sorted(groups, key=lambda adapter: (adapter != served, str(adapter)))  # no switch first
        results: list = [None] * len(adapters)
        for adapter in order:
            if adapter != self.inner.adapter:
                started = time.perf_counter()
                if adapter is None:
                    self.inner.unload_adapter()
                else:
                    self.inner.load_adapter(adapter)
                self.stats.switches += 1
                self.stats.switch_seconds += time.perf_counter() - started
            for row, result in zip(groups[adapter], call(groups[adapter]), strict=True):
                results[row] = result
        return results
