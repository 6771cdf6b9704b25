"""Adapters routed by memory: each family's fold in its own LoRA adapter, chosen per prompt by retrieval.

`Routes` is the table family -> adapter directory, kept in `<home>/routes.json` (written atomically).
`MemoryRouter` picks a prompt's family from the skill memory: the task prompt's user messages are the
query (as for retrieval into the prompt), the `k` nearest skills within `max_distance` vote, each with
weight `max_distance - distance` (a near skill outweighs several at the edge), and the family with the
most weight (ties to the nearest skill) has its adapter serve the prompt. A prompt
that matches no family, or whose family has no adapter, gets the base model. The engine that applies
the routes is `engines.routed.RoutedEngine` (per request on vLLM, per group of prompts on the HF engine).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import write_atomic
from engines.base import Chat

ROUTES = "routes.json"


class Routes:
    """family -> adapter directory, in `<home>/routes.json`."""

    def __init__(self, home: Path) -> None:
        self.path = Path(home) / ROUTES

    def read(self) -> dict[str, str]:
        if not self.path.is_file():
            return {}
        try:
            table = json.loads(self.path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ValueError(f"{self.path} is not a routes table ({error}); remove it and fold again") from None
        return {str(family): str(adapter) for family, adapter in table.items()}

    def set(self, family: str, adapter: str) -> None:
        table = self.read()
        if table.get(family) != adapter:
            write_atomic(self.path, json.dumps({**table, family: adapter}, indent=2, sort_keys=True))


def task_query(chat: Chat) -> str:
    """The task prompt of a transcript: its user messages before the first assistant turn (what an
    episode's every turn starts with, so one episode routes the same way on every turn)."""
    parts = []
    for message in chat:
        if message["role"] == "assistant":
            break
        if message["role"] == "user":
            parts.append(message["content"])
    return "\n".join(parts)


@dataclass
class MemoryRouter:
    """A route (`RoutedEngine`'s `route`) from the memory's retrieval: the family of the nearest skills."""

    memory: object
    routes: dict[str, str]
    k: int = 5
    max_distance: float = 0.6
    decisions: Counter = field(default_factory=Counter)  # family (None: no family matched) -> prompts routed
    _cache: dict[str, str | None] = field(default_factory=dict)

    def family_for(self, query: str) -> str | None:
        """The family whose skills are nearest `query`: the `k` nearest within `max_distance` vote, each with
        weight `max_distance - distance`."""
        if not query.strip():
            return None
        hits = [(skill.family, distance) for skill, distance in self.memory.search_skills(query, None, k=self.k,
                                                                                          status=None)
                if skill.status != "retired" and distance <= self.max_distance]
        if not hits:
            return None
        weight: dict[str, float] = {}
        for family, distance in hits:  # a skill's vote: how far inside the cutoff it is
            weight[family] = weight.get(family, 0.0) + (self.max_distance - distance)
        nearest = {family: min(d for f, d in hits if f == family) for family in weight}
        return min(weight, key=lambda family: (-weight[family], nearest[family]))

    def family_of(self, chat: Chat) -> str | None:
        """`family_for` the chat's task prompt, asked of the memory once per prompt (every turn of an
        episode, and a caller that looked before playing, get the first answer)."""
        query = task_query(chat)
        if query not in self._cache:
            self._cache[query] = self.family_for(query)
            self.decisions[self._cache[query]] += 1
        return self._cache[query]

    def __call__(self, chat: Chat) -> str | None:
        family = self.family_of(chat)
        return self.routes.get(family) if family is not None else None
