"""A deterministic multi-turn toy family (spec `toy` or `toy:<turns>`) for testing rollouts.

Each turn asks "Say the word: <word>"; a turn whose action contains the word earns 1/turns. The
episode is done after `turns` turns and succeeds when every turn was right. Words come from one
list for the train split and another for eval, so the splits are disjoint. `raise_on_turn` makes
`step` raise on that turn, to test that a raising environment becomes a failed episode.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from envs.base import EnvSpecError, Message, Split, StepResult

TRAIN_WORDS = (
    "apple", "river", "stone", "cloud", "maple", "tiger", "piano", "candle",
    "garden", "rocket", "silver", "forest", "basket", "window", "pepper", "marble",
)  # fmt: skip
EVAL_WORDS = (
    "orange", "valley", "pebble", "thunder", "cedar", "falcon", "violin", "lantern",
    "meadow", "comet", "copper", "canyon", "bucket", "mirror", "ginger", "granite",
)  # fmt: skip
WORDS: dict[str, tuple[str, ...]] = {"train": TRAIN_WORDS, "eval": EVAL_WORDS}


class ToySettings(BaseModel):
    """How a toy family behaves."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    turns: int = Field(1, ge=1, le=100, description="turns per episode")
    raise_on_turn: int | None = Field(
        None, ge=1, description="1-based turn on which step raises RuntimeError('toy failure')"
    )


def word_for(split: Split, index: int, turn: int) -> str:
    """The word asked on a 0-based `turn` of item `index` of `split`."""
    words = WORDS[split]
    return words[(index + turn) % len(words)]


def _prompt(word: str) -> list[Message]:
    return [Message(role="user", content=f"Say the word: {word}")]


class ToyEnvironment:
    """One toy episode: `turns` words to repeat, one per step."""

    def __init__(self, family: str, split: Split, index: int, settings: ToySettings):
        self.family = family
        self.item_id = f"{split}-{index}"
        self.words = [word_for(split, index, turn) for turn in range(settings.turns)]
        self._raise_on_turn = settings.raise_on_turn
        self._turn = 0

    def initial_observation(self) -> list[Message]:
        return _prompt(self.words[0])

    def step(self, action: str) -> StepResult:
        if self._turn >= len(self.words):
            raise RuntimeError(f"{self.family} {self.item_id}: episode already done")
        self._turn += 1
        if self._raise_on_turn == self._turn:
            raise RuntimeError("toy failure")
        expected = self.words[self._turn - 1]
        correct = expected in action
        done = self._turn == len(self.words)
        return StepResult(
            observation=[] if done else _prompt(self.words[self._turn]),
            reward=1.0 / len(self.words) if correct else 0.0,
            done=done,
            info={"expected": expected, "correct": correct},
        )


class ToyFamily:
    """The toy family. Split sizes are the word list lengths (16 each).

    Success: the summed reward reaches `success_threshold`, i.e. every turn was right (the
    threshold sits just under 1.0 so that `turns` additions of 1/turns always reach it).
    """

    success_threshold = 1.0 - 1e-9

    def __init__(self, **settings: Any):
        try:
            self.settings = ToySettings(**settings)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(map(str, problem['loc']))}: {problem['msg']}" for problem in error.errors()
            )
            raise EnvSpecError(f"toy: bad setting: {problems}") from error
        self.name = f"toy:{self.settings.turns}"

    def split_size(self, split: Split) -> int:
        return len(WORDS[split])

    def make(self, split: Split, index: int) -> ToyEnvironment:
        if split not in WORDS:
            raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
        if not 0 <= index < self.split_size(split):
            raise IndexError(f"{self.name}: {split} index {index} outside [0, {self.split_size(split)})")
        return ToyEnvironment(self.name, split, index, self.settings)
