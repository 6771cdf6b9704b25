"""Batched multi-turn rollouts: many environments advance together through one engine.

`run_episodes` is the one place where a model acts in environments. At every turn it gathers the
chat of every unfinished episode, makes one batched `engine.generate` call, and steps each
environment with its action. An environment that raises (at its first observation or at a step) ends
its episode as a failed trajectory with the error recorded; the other episodes go on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from engines.base import Engine, SamplingParams
from envs.base import Environment, Message, Split, Trajectory, Turn


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:2000]


def run_episodes(
    engine: Engine,
    environments: Sequence[Environment],
    params: SamplingParams,
    *,
    split: Split,
    contexts: Sequence[Sequence[Message]] | None = None,
    skill_ids: Sequence[Sequence[str]] | None = None,
    max_turns: int = 8,
    success_threshold: float = 1.0,
    on_finish: Callable[[Trajectory], None] | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> list[Trajectory]:
    """Play every environment to its end (or `max_turns`) and return their trajectories.

    `contexts[i]` are messages put before environment i's prompt (retrieved skills, worked
    examples); they are part of what the model sees but are kept apart from `Trajectory.prompt`.
    An episode succeeds when it ends without error and its summed reward reaches `success_threshold`.
    `progress("planned", n)` announces a turn of n generations, `progress("generated", k)` reports k
    of them done (for progress bars).
    """
    count = len(environments)
    contexts = contexts or [[] for _ in range(count)]
    skill_ids = skill_ids or [[] for _ in range(count)]
    started = time.perf_counter()
    trajectories: list[Trajectory] = []
    active: list[int] = []
    for index, environment in enumerate(environments):
        trajectory = Trajectory(
            env=environment.family,
            item_id=environment.item_id,
            split=split,
            prompt=[],
            context=list(contexts[index]),
            skill_ids=list(skill_ids[index]),
            model=engine.model_name,
            adapter=engine.adapter,
        )
        try:
            trajectory.prompt = list(environment.initial_observation())
            active.append(index)
        except Exception as error:  # an environment failure is data, not a crash
            trajectory.error = _error_text(error)
            _finish(trajectory, started, success_threshold, on_finish)
        trajectories.append(trajectory)

    for _turn in range(max_turns):
        if not active:
            break
        chats = [
            [message.as_dict() for message in trajectories[index].messages(with_context=True)] for index in active
        ]
        if progress:
            progress("planned", len(chats))
        generations = engine.generate(
            chats, params, progress=(lambda done: progress("generated", done)) if progress else None
        )
        still_active = []
        for index, generation in zip(active, generations, strict=True):
            trajectory = trajectories[index]
            turn = Turn(
                action=generation.text,
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=len(generation.token_ids),
            )
            trajectory.turns.append(turn)
            try:
                result = environments[index].step(generation.text)
            except Exception as error:
                trajectory.error = _error_text(error)
                _finish(trajectory, started, success_threshold, on_finish)
                continue
            turn.observation = list(result.observation)
            turn.reward = result.reward
            turn.done = result.done
            turn.info = dict(result.info)
            if result.done:
                _finish(trajectory, started, success_threshold, on_finish)
            else:
                still_active.append(index)
        active = still_active

    for index in active:
        trajectories[index].truncated = True
        _finish(trajectories[index], started, success_threshold, on_finish)
    return trajectories


def _finish(
    trajectory: Trajectory,
    started: float,
    success_threshold: float,
    on_finish: Callable[[Trajectory], None] | None,
) -> None:
    trajectory.reward = sum(turn.reward for turn in trajectory.turns)
    trajectory.success = trajectory.error is None and not trajectory.truncated and (
        trajectory.reward >= success_threshold - 1e-9
    )
    trajectory.duration_s = time.perf_counter() - started
    if on_finish:
        on_finish(trajectory)
