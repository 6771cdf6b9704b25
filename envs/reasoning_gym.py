"""reasoning-gym datasets as single-turn task families (spec `rg:<dataset>`).

This module owns three things: the easy presets for small models, the construction of two
disjoint splits out of a procedural dataset, and the single-turn environment that extracts an
answer from the model's raw text and scores it with the dataset's own `score_answer`.

Disjoint splits. reasoning-gym builds item `idx` of a dataset seeded `s` from `Random(s + idx)`,
so two seeds alone do not give disjoint items. Here raw item `k` of a split is item `k % 1000` of
a dataset seeded `first_seed + k - k % 1000` (for most datasets, exactly `Random(first_seed + k)`;
datasets that precompute their items per instance get one 1000-item instance per chunk). The train
range starts at `seed`, the eval range at `seed + 10**7`, and a range never goes past `10**7` raw
items, so the seed ranges cannot overlap. On top of that, questions are deduplicated by text: the
eval split is the first `eval_size` distinct questions of the eval range, and the train split is
the distinct questions of the train range that are not in the eval split. The two splits never
share a question text.

`reasoning_gym` itself is imported lazily (it takes about a second), so `import envs` stays cheap.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from envs.base import EnvSpecError, Message, Split, StepResult, family_settings
from envs.extract import extract_answer

DEFAULT_INSTRUCTION = "\n\nRespond with only the final answer."
EVAL_SEED_OFFSET = 10**7
CHUNK_SIZE = 1000
MAX_REPEATS = 5000
RESERVED_OPTIONS = ("seed", "size")
SUCCESS_THRESHOLD = 1.0

# Small configs a 135M model can at least read (NOTES.md section 7, plus four more of the same
# size). A dataset without an entry here uses reasoning-gym's own defaults under "easy" too.
EASY_PRESETS: dict[str, dict[str, Any]] = {
    "basic_arithmetic": dict(
        min_terms=2,
        max_terms=2,
        min_digits=1,
        max_digits=2,
        operators=("+", "-"),
        allow_parentheses=False,
        allow_negation=False,
    ),
    "leg_counting": dict(min_animals=1, max_animals=2, min_instances=1, max_instances=3),
    "letter_counting": dict(min_words=3, max_words=5),
    "spell_backward": dict(min_word_len=3, max_word_len=5),
    "number_sorting": dict(
        min_numbers=3, max_numbers=4, min_decimals=0, max_decimals=0, min_value=0, max_value=99
    ),
    "simple_equations": dict(
        min_terms=2,
        max_terms=2,
        min_value=1,
        max_value=10,
        operators=("+", "-"),
        operators_weights=[0.5, 0.5],
    ),
    "chain_sum": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2, allow_negation=False),
    "gcd": dict(min_numbers=2, max_numbers=2, min_value=1, max_value=100),
    "count_bits": dict(min_n=1, max_n=2**14 - 1),
    "word_sorting": dict(min_words=3, max_words=4, min_word_length=3, max_word_length=6),
}


class ReasoningGymSettings(BaseModel):
    """How a reasoning-gym family is set up, apart from the dataset's own config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: Literal["easy", "default"] = Field(
        "easy",
        description="easy: this module's small config (or reasoning-gym's where none); default: reasoning-gym's",
    )
    seed: int = Field(0, ge=0, description="first seed of the train range; the eval range starts 10**7 above")
    eval_size: int = Field(500, ge=1, le=100_000, description="distinct questions in the eval split")
    train_size: int = Field(
        5000, ge=1, le=1_000_000, description="nominal train split size (an upper bound on the index)"
    )
    instruction: str = Field(DEFAULT_INSTRUCTION, description="appended to every question")


def _registry() -> dict[str, tuple[type, type]]:
    """reasoning-gym's dataset registry: name -> (dataset class, config class)."""
    from reasoning_gym.factory import DATASETS

    return DATASETS


def dataset_names() -> list[str]:
    """All dataset names registered in reasoning-gym, sorted."""
    return sorted(_registry())


def config_fields(dataset: str) -> list[str]:
    """The config fields a dataset accepts as options (without the reserved `seed` and `size`)."""
    config_class = _registry()[dataset][1]
    return [field.name for field in dataclasses.fields(config_class) if field.name not in RESERVED_OPTIONS]


def resolve_config(dataset: str, preset: str, options: dict[str, Any]) -> dict[str, Any]:
    """The dataset config: the preset (empty for "default" or no easy preset), then user options."""
    config = dict(EASY_PRESETS.get(dataset, {})) if preset == "easy" else {}
    config.update(options)
    return config


class _SeedRange:
    """The raw items of one seed range, made in chunks of CHUNK_SIZE (one dataset per chunk)."""

    def __init__(self, dataset: str, config: dict[str, Any], first_seed: int):
        self.dataset = dataset
        self.config = config
        self.first_seed = first_seed
        self._chunk_number = -1
        self._chunk: Any = None

    def chunk(self, chunk_number: int) -> Any:
        if chunk_number != self._chunk_number:
            from reasoning_gym.factory import create_dataset

            self._chunk = create_dataset(
                self.dataset, seed=self.first_seed + chunk_number * CHUNK_SIZE, size=CHUNK_SIZE, **self.config
            )
            self._chunk_number = chunk_number
        return self._chunk

    def __getitem__(self, raw_index: int) -> dict[str, Any]:
        return self.chunk(raw_index // CHUNK_SIZE)[raw_index % CHUNK_SIZE]


class _DistinctQuestions:
    """The distinct questions of a seed range in order, skipping `excluded`; grown on demand."""

    def __init__(self, seed_range: _SeedRange, excluded: frozenset[str], label: str):
        self.seed_range = seed_range
        self.excluded = excluded
        self.label = label
        self.entries: list[dict[str, Any]] = []
        self.questions: set[str] = set()
        self.next_raw_index = 0

    def grow_to(self, count: int) -> None:
        repeats = 0
        while len(self.entries) < count:
            if repeats >= MAX_REPEATS or self.next_raw_index >= EVAL_SEED_OFFSET:
                raise EnvSpecError(
                    f"rg:{self.seed_range.dataset}: the {self.label} split ran out of new questions after "
                    f"{len(self.entries)} (wanted {count}; {repeats} repeats in a row). Widen the dataset "
                    f"config (options) or ask for fewer items (eval_size / train_size)."
                )
            entry = self.seed_range[self.next_raw_index]
            self.next_raw_index += 1
            question = entry["question"]
            if question in self.questions or question in self.excluded:
                repeats += 1
                continue
            repeats = 0
            self.questions.add(question)
            self.entries.append(entry)


class ReasoningGymEnvironment:
    """One reasoning-gym item: the question once, then one answer, scored by the dataset.

    The prompt is one user message: the question (trailing whitespace stripped) + `instruction`.
    `step` extracts the answer with `extract_answer` and scores it with the dataset's
    `score_answer`; the reward is that score in [0, 1]. A scorer that raises on a malformed answer
    gives reward 0 and records the error in `info["score_error"]`. Single use: a second `step`
    raises RuntimeError.
    """

    def __init__(self, family: str, item_id: str, entry: dict[str, Any], scorer: Any, instruction: str):
        self.family = family
        self.item_id = item_id
        self.entry = entry
        self.question: str = entry["question"]
        self._scorer = scorer
        self._instruction = instruction
        self._done = False

    def initial_observation(self) -> list[Message]:
        return [Message(role="user", content=self.question.rstrip() + self._instruction)]

    def step(self, action: str) -> StepResult:
        if self._done:
            raise RuntimeError(f"{self.family} {self.item_id}: single-turn environment already answered")
        self._done = True
        gold = self.entry["answer"]
        extracted = extract_answer(action, str(gold))
        info: dict[str, Any] = {"extracted": extracted, "gold": gold}
        try:
            reward = float(self._scorer.score_answer(answer=extracted, entry=self.entry))
        except Exception as error:  # a scorer crashing on model output is the model's failure
            reward = 0.0
            info["score_error"] = f"{type(error).__name__}: {error}"
        return StepResult(reward=reward, done=True, info=info)


class ReasoningGymFamily:
    """Any reasoning-gym dataset by name, as a family of single-turn items with disjoint splits.

    `options` are the dataset's config fields, passed to `reasoning_gym.create_dataset` on top of
    the preset (`size` is managed here). Settings: see `ReasoningGymSettings`; a setting may also
    be given in `options` (no dataset config uses these names), so that a config file's
    `options: {preset: default, seed: 3}` works.
    The eval split is built lazily, once, on first use and cached; the train split grows as
    higher indices are asked for. Item ids are `eval-17`, `train-3`.

    Success: an episode succeeds when its reward is at least `success_threshold` (1.0, a fully
    correct answer); the caller applies it.
    """

    success_threshold = SUCCESS_THRESHOLD

    def __init__(self, dataset: str, options: dict[str, Any] | None = None, **settings: Any):
        names = dataset_names()
        if dataset not in names:
            raise EnvSpecError(f"unknown reasoning-gym dataset {dataset!r}; available: {', '.join(names)}")
        self.settings, options = family_settings(ReasoningGymSettings, settings, options, f"rg:{dataset}")
        self.name = f"rg:{dataset}"
        self.dataset = dataset
        fields = config_fields(dataset)
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise EnvSpecError(
                f"{self.name}: unknown option(s) {', '.join(map(repr, unknown))}"
                f"{' (size is set by the family)' if set(unknown) & set(RESERVED_OPTIONS) else ''};"
                f" valid config fields: {', '.join(fields)}"
            )
        self.config = resolve_config(dataset, self.settings.preset, options)
        eval_range = _SeedRange(dataset, self.config, self.settings.seed + EVAL_SEED_OFFSET)
        try:  # build and draw one item now, so a bad option fails here and not mid-run
            self._scorer = eval_range.chunk(0)
            self._scorer[0]
        except (TypeError, ValueError, AssertionError, KeyError) as error:
            raise EnvSpecError(
                f"{self.name}: the dataset rejected its config {self.config!r} (the {self.settings.preset!r} "
                f"preset, then options {options!r}): {type(error).__name__}: {error}; "
                f"valid config fields: {', '.join(fields)}"
            ) from error
        self._eval = _DistinctQuestions(eval_range, frozenset(), "eval")
        self._train: _DistinctQuestions | None = None

    def split_size(self, split: Split) -> int:
        """eval: `eval_size`; train: `train_size`, nominal (make raises EnvSpecError if the
        dataset runs out of new questions first)."""
        return self.settings.eval_size if split == "eval" else self.settings.train_size

    def make(self, split: Split, index: int) -> ReasoningGymEnvironment:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
        if not 0 <= index < self.split_size(split):
            raise IndexError(f"{self.name}: {split} index {index} outside [0, {self.split_size(split)})")
        questions = self._eval_split() if split == "eval" else self._train_split()
        questions.grow_to(index + 1)
        return ReasoningGymEnvironment(
            self.name, f"{split}-{index}", questions.entries[index], self._scorer, self.settings.instruction
        )

    def _eval_split(self) -> _DistinctQuestions:
        self._eval.grow_to(self.settings.eval_size)
        return self._eval

    def _train_split(self) -> _DistinctQuestions:
        if self._train is None:
            excluded = frozenset(self._eval_split().questions)
            train_range = _SeedRange(self.dataset, self.config, self.settings.seed)
            self._train = _DistinctQuestions(train_range, excluded, "train")
        return self._train
