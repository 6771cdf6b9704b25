"""The agent loop on LangGraph: retrieve -> act (until done) -> record -> reflect -> admit.

One graph iteration plays a batch of train items of one family together: every `act` is one turn of
the batch's unfinished episodes through `learners.rollout.play_turn` (one batched `engine.generate`,
then every environment stepped), the same turn `run_episodes` plays. Nodes are plain functions over a
small serialisable state (trajectories as JSON-able dicts, counters); live environments sit in a
runtime cache outside the state. After a kill, the SQLite checkpointer restarts from the last
completed node: an environment missing from the cache is rebuilt from its (split, index) and the
actions already taken are replayed into it, so episodes continue where they stopped. Trajectory
ids are derived from the run id and item index, and the store upserts by id, so a resumed run
never stores an episode twice.

With `approve=True`, every verified candidate skill pauses the graph (LangGraph `interrupt`) for a
person to accept or reject it before it is stored. With `pending=True` the run never waits: each
verified candidate is stored as `pending` (never retrieved) with its probe evidence, for a person to
approve or reject later (`skillfold skills approve|reject`, or the ui with `--allow-edits`).
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.types import interrupt

from agent.config import LoopSettings
from agent.skills import (
    Verdict,
    context_tokens,
    documentation_skills,
    exemplar_from,
    render_context,
    retrieve_for,
    verify,
    write_rule,
)
from engines.base import Engine
from envs.base import Environment, TaskFamily, Trajectory
from learners.rollout import _error_text, end_episode, play_turn, score_trajectory
from memory import Memory, Skill, StatusChange

log = logging.getLogger(__name__)


class LoopState(TypedDict, total=False):
    next_index: int
    batch: list[dict[str, Any]]
    candidates: list[dict[str, Any]]
    verdicts: list[dict[str, Any]]
    episodes: Annotated[int, operator.add]
    successes: Annotated[int, operator.add]
    skills_added: Annotated[int, operator.add]
    skills_rejected: Annotated[int, operator.add]
    skills_pending: Annotated[int, operator.add]
    since_reflection: int


@dataclass
class Runtime:
    """What the nodes use but the checkpoint does not hold."""

    engine: Engine
    memory: Memory
    family: TaskFamily
    settings: LoopSettings
    run_id: str
    environments: dict[str, Environment] = field(default_factory=dict)
    on_episode: Callable[[Trajectory], None] | None = None

    def probe_indices(self) -> list[int]:
        """Train items kept for verification: the last `probes` of the split, never played as episodes."""
        size = self.family.split_size("train")
        return list(range(size - self.settings.probes, size))


def _clock_start(trajectories: list[Trajectory]) -> float:
    """The `time.perf_counter()` reading at which the batch started, from the start times it stores
    (so episode durations survive a resume)."""
    elapsed = (datetime.now(UTC) - min(trajectory.started_at for trajectory in trajectories)).total_seconds()
    return time.perf_counter() - elapsed


def _active(trajectory: Trajectory) -> bool:
    finished = trajectory.error is not None or trajectory.truncated
    finished = finished or (bool(trajectory.turns) and trajectory.turns[-1].done)
    return not finished and "index" in trajectory.info


def build_graph(runtime: Runtime, checkpointer=None):
    settings = runtime.settings
    family = runtime.family
    threshold = family.success_threshold

    def environment_for(trajectory: Trajectory) -> Environment:
        """The live environment of an unfinished episode; after a resume it is rebuilt from its item
        index and the actions already taken are replayed into it."""
        environment = runtime.environments.get(trajectory.id)
        if environment is None:
            environment = family.make("train", trajectory.info["index"])
            environment.initial_observation()
            for turn in trajectory.turns:
                environment.step(turn.action)
            runtime.environments[trajectory.id] = environment
        return environment

    def finish(trajectory: Trajectory, started: float) -> None:
        score_trajectory(trajectory, threshold)
        trajectory.duration_s = time.perf_counter() - started

    def seed(state: LoopState) -> LoopState:
        """A family with tools and no skills yet starts from its tools' documentation examples."""
        if runtime.memory.list_skills(family=family.name):
            return {}
        candidates = documentation_skills(family)
        verdicts = verify(runtime.engine, family, candidates, runtime.probe_indices(), settings.probe_sampling,
                          max_turns=settings.max_turns)
        admitted = [c.model_dump(mode="json") for c, v in zip(candidates, verdicts, strict=True) if v.admitted]
        return {
            "candidates": admitted,
            "verdicts": [verdict.model_dump() for verdict in verdicts],
            "skills_rejected": sum(not verdict.admitted for verdict in verdicts),
        }

    def retrieve(state: LoopState) -> LoopState:
        start = state.get("next_index", settings.start_index)
        remaining = settings.episodes - state.get("episodes", 0)
        count = min(settings.batch_size, remaining)
        limit = runtime.probe_indices()[0] if settings.probes else family.split_size("train")
        batch = []
        started = time.perf_counter()
        for index in range(start, min(start + count, limit)):
            trajectory = Trajectory(
                id=f"{runtime.run_id}-{index}",
                env=family.name,
                item_id=f"train-{index}",
                split="train",
                prompt=[],
                model=runtime.engine.model_name,
                adapter=runtime.engine.adapter,
                info={"index": index},
            )
            environment = None
            try:
                environment = family.make("train", index)
                trajectory.item_id = environment.item_id
                trajectory.prompt = list(environment.initial_observation())
                runtime.environments[trajectory.id] = environment
            except Exception as error:
                trajectory.error = _error_text(error)
                if environment is not None:
                    end_episode(environment, trajectory)
                finish(trajectory, started)
                batch.append(trajectory.model_dump(mode="json"))
                continue
            skills = retrieve_for(runtime.memory, runtime.engine, family.name, trajectory.prompt,
                                  settings.token_budget, settings.retrieve_k)
            trajectory.context = render_context(skills)
            trajectory.skill_ids = [skill.id for skill in skills]
            batch.append(trajectory.model_dump(mode="json"))
        if not batch:
            raise RuntimeError(
                f"{family.name} has no train items left from index {start} "
                f"(train split holds {family.split_size('train')}, the last {settings.probes} kept as probes)"
            )
        return {"batch": batch, "next_index": start + len(batch)}

    def act(state: LoopState) -> LoopState:
        """One turn of every unfinished episode of the batch; an episode at the turn limit is truncated."""
        trajectories = [Trajectory.model_validate(item) for item in state["batch"]]
        active = [index for index, trajectory in enumerate(trajectories) if _active(trajectory)]
        environments = {index: environment_for(trajectories[index]) for index in active}
        params = settings.sampling.model_copy(update={"seed": settings.sampling.seed + state.get("next_index", 0)})
        started = _clock_start(trajectories)
        try:
            still_active = play_turn(runtime.engine, environments, trajectories, active, params, started=started,
                                     success_threshold=threshold, on_finish=None) if active else []
        except BaseException:
            for index in active:  # some may have stepped: rebuilt and replayed when this node runs again
                runtime.environments.pop(trajectories[index].id, None)
            raise
        for index in still_active:
            if len(trajectories[index].turns) >= settings.max_turns:
                trajectories[index].truncated = True
                end_episode(environments[index], trajectories[index])
                finish(trajectories[index], started)
        return {"batch": [trajectory.model_dump(mode="json") for trajectory in trajectories]}

    def after_act(state: LoopState) -> str:
        trajectories = [Trajectory.model_validate(item) for item in state["batch"]]
        return "act" if any(_active(t) for t in trajectories) else "record"

    def record(state: LoopState) -> LoopState:
        trajectories = [Trajectory.model_validate(item) for item in state["batch"]]
        for trajectory in trajectories:
            trajectory.info.pop("index", None)
            runtime.environments.pop(trajectory.id, None)
        # Every episode of the batch counts, stored now or by this node's run before a kill (the store
        # upserts by id): counting only the newly stored ones made a resumed run play extra episodes.
        runtime.memory.add_trajectories(trajectories)
        for trajectory in trajectories:
            if runtime.on_episode:
                runtime.on_episode(trajectory)
        return {
            "batch": [trajectory.model_dump(mode="json") for trajectory in trajectories],
            "episodes": len(trajectories),
            "successes": sum(trajectory.success for trajectory in trajectories),
            "since_reflection": state.get("since_reflection", 0) + len(trajectories),
        }

    def reflect(state: LoopState) -> LoopState:
        trajectories = [Trajectory.model_validate(item) for item in state["batch"]]
        successes = [t for t in trajectories if t.success]
        failures = [t for t in trajectories if not t.success and t.error is None]
        # Exemplars from successes that had no exemplar in their prompt carry something new.
        fresh_successes = sorted(successes, key=lambda t: len(t.skill_ids))
        candidates = [exemplar_from(t, family) for t in fresh_successes[: settings.max_candidates_per_batch]]
        since = state.get("since_reflection", 0)
        if settings.reflect_every and since >= settings.reflect_every and (successes or failures):
            rule = write_rule(runtime.engine, family.name, successes, failures, seed=state.get("next_index", 0),
                              task_family=family)
            if rule is not None:
                candidates.append(rule)
            since = 0
        baseline_skills = runtime.memory.retrieve(
            "", family.name, token_budget=settings.token_budget,
            count_tokens=lambda text: context_tokens(runtime.engine, text),
            k=settings.retrieve_k,
        ) if candidates else []
        verdicts: list[Verdict] = verify(
            runtime.engine, family, candidates, runtime.probe_indices(), settings.probe_sampling,
            max_turns=settings.max_turns, base_context=render_context(baseline_skills[:1]),
        )
        rejected = sum(not verdict.admitted for verdict in verdicts)
        if rejected:
            log.info("%s: %d of %d candidate skills rejected on probes", family.name, rejected, len(verdicts))
        admitted = [c.model_dump(mode="json") for c, v in zip(candidates, verdicts, strict=True) if v.admitted]
        return {
            "candidates": admitted,
            "verdicts": [verdict.model_dump() for verdict in verdicts],
            "skills_rejected": rejected,
            "since_reflection": since,
        }

    def admit(state: LoopState) -> LoopState:
        candidates = [Skill.model_validate(item) for item in state.get("candidates", [])]
        verdicts = {item["skill_id"]: item for item in state.get("verdicts", [])}
        added = declined = pending = 0
        for candidate in candidates:
            if settings.approve:
                answer = interrupt({"skill": candidate.model_dump(mode="json"), "probe": verdicts.get(candidate.id)})
                if not answer:
                    declined += 1
                    continue
            probe = verdicts.get(candidate.id) or {}
            if settings.pending:
                change = StatusChange(status="pending", reason="awaiting approval", evidence=probe)
                candidate = candidate.model_copy(update={"status": "pending", "status_history": [change]})
            elif probe:  # its admission evidence, first in its history (a merge keeps the known record's)
                change = StatusChange(status="active", reason="admitted: no fewer probe successes with it",
                                      evidence=probe)
                candidate = candidate.model_copy(update={"status_history": [change]})
            stored = runtime.memory.add_skill(candidate)
            if stored.status == "pending":  # else merged into a known record, whose status it keeps
                pending += 1
            else:
                added += 1
        runtime.memory.curate(family.name)
        return {"candidates": [], "skills_added": added, "skills_rejected": declined, "skills_pending": pending}

    def after_admit(state: LoopState) -> str:
        return "retrieve" if state.get("episodes", 0) < settings.episodes else END

    graph = StateGraph(LoopState)
    for name, node in [("seed", seed), ("retrieve", retrieve), ("act", act), ("record", record),
                       ("reflect", reflect), ("admit", admit)]:
        graph.add_node(name, node)
    graph.add_edge(START, "seed")
    graph.add_edge("seed", "admit")
    graph.add_edge("retrieve", "act")
    graph.add_conditional_edges("act", after_act, ["act", "record"])
    graph.add_edge("record", "reflect")
    graph.add_edge("reflect", "admit")
    graph.add_conditional_edges("admit", after_admit, ["retrieve", END])
    return graph.compile(checkpointer=checkpointer)


def run_loop(
    runtime: Runtime,
    checkpoint_path,
    approve: Callable[[dict[str, Any]], bool] | None = None,
) -> LoopState:
    """Run (or resume) the loop of `runtime.run_id` to its end and return the final state.

    The run id is the LangGraph thread id: calling this again after a kill continues that run from
    its last checkpoint. `approve` answers the interrupts of `--approve` mode (True = keep).
    """
    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.types import Command

    with SqliteSaver.from_conn_string(str(checkpoint_path)) as checkpointer:
        graph = build_graph(runtime, checkpointer)
        config = {"configurable": {"thread_id": runtime.run_id}, "recursion_limit": 10_000}
        snapshot = graph.get_state(config)
        # A node killed after its writes were saved but before the next checkpoint leaves no `next` (its
        # task is done) but the task with its writes: that run resumes too. Taken for a new start, the
        # loop would begin again from its first node and play on past the batch it had not recorded.
        resuming = bool(snapshot.next or snapshot.tasks)
        if not resuming and snapshot.values.get("episodes", 0) >= runtime.settings.episodes:
            return snapshot.values  # already complete
        # durability "sync": a node's checkpoint is written before the next node starts, so the writes
        # of a run come in one order and a kill re-runs at most the node it stopped (with "async", the
        # default, the checkpoint is written while the next node runs).
        result = graph.invoke(None if resuming else {}, config, durability="sync")
        while result.get("__interrupt__"):
            if approve is None:
                raise RuntimeError("the loop asks for approval but no approver was given")
            answers = {item.id: approve(item.value) for item in result["__interrupt__"]}
            result = graph.invoke(Command(resume=answers), config, durability="sync")
        return graph.get_state(config).values
