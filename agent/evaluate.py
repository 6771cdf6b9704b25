"""Held-out evaluation: run a model on the first N eval-split items of a family and count successes.

The items are always the first N of the family's eval split, so two runs with the same config see
the same items; greedy decoding (the default) makes the number repeatable, and with sampling the
seed fixes it. The interval is a 95% Wilson score interval on the success rate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from pydantic import BaseModel, ConfigDict

from engines.base import Engine, SamplingParams
from envs.base import Message, TaskFamily, Trajectory, item_prompt
from learners.rollout import run_episodes


class EvalResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    env: str
    items: int
    successes: int
    accuracy: float
    ci_low: float
    ci_high: float
    mean_reward: float
    errors: int
    seconds: float
    prompt_tokens: int
    completion_tokens: int
    model: str
    adapter: str | None
    memory: bool = False


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (well behaved at 0 and at n)."""
    if trials == 0:
        return 0.0, 1.0
    rate = successes / trials
    denominator = 1 + z * z / trials
    centre = (rate + z * z / (2 * trials)) / denominator
    half_width = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def evaluate(
    engine: Engine,
    family: TaskFamily,
    items: int,
    params: SamplingParams,
    *,
    max_turns: int = 8,
    contexts: Sequence[Sequence[Message]] | None = None,
    skill_ids: Sequence[Sequence[str]] | None = None,
    on_finish: Callable[[Trajectory], None] | None = None,
    progress: Callable[[str, int], None] | None = None,
    offset: int = 0,
) -> tuple[EvalResult, list[Trajectory]]:
    """Accuracy of `engine` on the first `items` eval-split items of `family` (from eval index `offset`)."""
    available = family.split_size("eval")
    if offset + items > available:
        raise ValueError(
            f"{family.name} has {available} distinct eval items; ask for at most {available - offset} "
            + (f"from index {offset} " if offset else "") + "(or raise the family's eval_size option)"
        )
    started = time.perf_counter()
    environments = [family.make("eval", offset + index) for index in range(items)]
    trajectories = run_episodes(
        engine,
        environments,
        params,
        split="eval",
        contexts=contexts,
        skill_ids=skill_ids,
        max_turns=max_turns,
        success_threshold=family.success_threshold,
        on_finish=on_finish,
        progress=progress,
    )
    successes = sum(trajectory.success for trajectory in trajectories)
    low, high = wilson_interval(successes, items)
    result = EvalResult(
        env=family.name,
        items=items,
        successes=successes,
        accuracy=successes / items,
        ci_low=low,
        ci_high=high,
        mean_reward=sum(trajectory.reward for trajectory in trajectories) / items,
        errors=sum(trajectory.error is not None for trajectory in trajectories),
        seconds=time.perf_counter() - started,
        prompt_tokens=sum(trajectory.prompt_tokens for trajectory in trajectories),
        completion_tokens=sum(trajectory.completion_tokens for trajectory in trajectories),
        model=engine.model_name,
        adapter=engine.adapter,
    )
    return result, trajectories


def memory_contexts(
    engine: Engine, memory, family: TaskFamily, items: int, token_budget: int, k: int
) -> list[tuple[list[Message], list[str]]]:
    """Retrieved skills (as context messages) and their ids for the first `items` eval items.

    Eval only reads memory: nothing about held-out items is stored or turned into skills.
    """
    from agent.skills import render_context, retrieve_for

    contexts = []
    for index in range(items):
        prompt = item_prompt(family, "eval", index)
        skills = retrieve_for(memory, engine, family.name, prompt, token_budget, k) if prompt is not None else []
        contexts.append((render_context(skills), [skill.id for skill in skills]))
    return contexts
