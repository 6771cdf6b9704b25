"""Guess the number: a multi-turn skillfold environment in one file (docs/environments.md).

    skillfold eval --env docs/examples/guess_env.py:GuessFamily -o high=20
"""

import random
import re

from envs.base import Message, StepResult


class GuessEnvironment:
    """One game: the model guesses, the environment says higher or lower, until it is right."""

    def __init__(self, family: str, item_id: str, secret: int, high: int, guesses: int) -> None:
        self.family, self.item_id = family, item_id
        self.secret, self.high, self.guesses_left = secret, high, guesses

    def initial_observation(self) -> list[Message]:
        return [Message(role="user", content=f"I am thinking of a whole number from 1 to {self.high}. "
                        "Guess it: reply with one number, and I will say higher or lower.")]

    def step(self, action: str) -> StepResult:
        self.guesses_left -= 1
        found = re.search(r"\d+", action)
        if found and int(found.group()) == self.secret:
            return StepResult(reward=1.0, done=True)
        reply = "Reply with one number." if not found else "Higher." if int(found.group()) < self.secret else "Lower."
        if self.guesses_left == 0:
            return StepResult(observation=[Message(role="user", content=f"No guesses left: it was {self.secret}.")],
                              done=True)
        return StepResult(observation=[Message(role="user", content=reply)])


class GuessFamily:
    """`high`: the largest secret; `guesses`: the turns a game allows. Train secrets are even, eval odd."""

    name = "guess"
    success_threshold = 1.0

    def __init__(self, high: int = 10, guesses: int = 4, eval_size: int = 50, train_size: int = 200) -> None:
        self.high, self.guesses, self.sizes = high, guesses, {"eval": eval_size, "train": train_size}

    def split_size(self, split: str) -> int:
        return self.sizes[split]

    def make(self, split: str, index: int) -> GuessEnvironment:
        if not 0 <= index < self.sizes[split]:
            raise IndexError(f"guess has {self.sizes[split]} {split} items, not {index + 1}")
        secrets = range(2 if split == "train" else 1, self.high + 1, 2)
        secret = random.Random(f"{split}-{index}").choice(secrets)
        return GuessEnvironment(self.name, f"{split}-{index}", secret, self.high, self.guesses)
