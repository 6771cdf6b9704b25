"""`general`: everyday instructions with no tool and no score, the general part of what a fold protects.

A fold distils skills into the weights; on prompts it does not train, it should leave the model as it was.
Protection by default (`agent.protection`) replays prompts the fold does not train and distils the model
toward itself as it was before the fold. Reasoning-gym families the default model can partly do give
prompts with a score; this family gives the rest of what a chat model is asked: explain, list, rewrite,
summarize, classify, write a short text, answer a plain question, with no tool in the prompt.

The items are made here, from fixed templates and subjects (no download): train and eval splits are
disjoint halves of one seeded shuffle. An episode is one turn; its reward is 0 and it never "succeeds"
(`scored = False`): it exists to be replayed, not measured, and the retention check skips it.
"""

from __future__ import annotations

import random
from typing import Any

from envs.base import EnvSpecError, Message, Split, StepResult

TEMPLATES = (
    "Explain {s} to a ten-year-old in two sentences.",
    "Give three facts about {s}.",
    "Write a short poem about {s}.",
    "List two advantages and two disadvantages of {s}.",
    "Describe {s} in one sentence.",
    "What is the most important thing to know about {s}?",
    "Write a friendly one-line greeting that mentions {s}.",
    "Suggest a title for a blog post about {s}.",
    "Summarize what {s} is in at most twenty words.",
    "Ask me one question about {s}.",
    "Is {s} more related to science, art or everyday life? Answer in one word, then explain.",
    "Write a haiku about {s}.",
    "Give a simple example that involves {s}.",
    "Translate the word '{s}' into French and Spanish.",
    "Name one common misconception about {s}.",
    "Write two sentences a teacher might say about {s}.",
    "Give me a tip for learning about {s}.",
    "Compare {s} with something from nature.",
    "Write a short dialogue between two friends about {s}.",
    "Complete the sentence: The best thing about {s} is",
    "Rewrite this sentence more formally: I think {s} is pretty cool.",
    "What questions would a beginner ask about {s}? Give two.",
    "Describe a day in the life of someone who works with {s}.",
    "Write a one-sentence story that includes {s}.",
)
SUBJECTS = (
    "the moon", "bicycles", "rain", "libraries", "volcanoes", "bread", "music", "the ocean", "honeybees",
    "trains", "chess", "gardens", "snow", "electricity", "maps", "friendship", "clocks", "mountains",
    "recycling", "the internet", "birds", "coffee", "museums", "football", "the alphabet", "rivers",
    "telescopes", "cooking", "forests", "money", "sleep", "bridges", "photography", "deserts", "kindness",
    "the weather", "robots", "painting", "airplanes", "soup",
)
SEED = 20261205


def _instructions() -> list[str]:
    everything = [template.format(s=subject) for template in TEMPLATES for subject in SUBJECTS]
    random.Random(SEED).shuffle(everything)
    return everything


class GeneralEnvironment:
    """One instruction, one turn, no reward."""

    def __init__(self, family: str, split: Split, index: int, text: str) -> None:
        self.family, self.item_id, self._text, self._done = family, f"{split}-{index}", text, False

    def initial_observation(self) -> list[Message]:
        return [Message(role="user", content=self._text)]

    def step(self, action: str) -> StepResult:
        if self._done:
            raise RuntimeError(f"{self.family} {self.item_id}: episode already done")
        self._done = True
        return StepResult(done=True, reward=0.0)


class GeneralFamily:
    """`general`: 960 instructions, 800 train and 160 eval (disjoint)."""

    success_threshold = float("inf")  # nothing to get right: replayed, never measured
    scored = False
    name = "general"

    def __init__(self, **settings: Any) -> None:
        if settings:
            raise EnvSpecError(f"general takes no options (got {', '.join(sorted(settings))})")
        items = _instructions()
        cut = len(items) * 5 // 6
        self._splits: dict[str, list[str]] = {"train": items[:cut], "eval": items[cut:]}

    def split_size(self, split: Split) -> int:
        return len(self._splits[split])

    def make(self, split: Split, index: int) -> GeneralEnvironment:
        if split not in self._splits:
            raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
        if not 0 <= index < self.split_size(split):
            raise IndexError(f"{self.name}: {split} index {index} outside [0, {self.split_size(split)})")
        return GeneralEnvironment(self.name, split, index, self._splits[split][index])
