"""`skillfold experiment --out DIR --check`: recompute an experiment's numbers from what it stored.

An experiment's report is only as honest as the path from its episodes to its tables. This audit
walks that path again, without the model:
1. every evaluation cell in metrics.json (the watch families' too) is recounted from its episode file: items, successes,
   accuracy, its Wilson interval, errors, prompt and completion tokens, whether skills were in
   the prompt, and (the routed arm) how many prompts its own family's adapter, another's or the base
   model served, from the adapter each episode records;
2. every episode is replayed in a fresh environment of its family (the same eval item): the
   environment must show the same prompt, answer every recorded action with the same observation,
   reward and end, and the episode's reward and success are scored again;
3. report.md is rendered again from metrics.json and must equal the file (plots are not compared).
Each mismatch is one line naming the cell or episode; an empty list means every number checks out.
Skill tokens are not recounted (that needs the model's tokenizer and chat template).
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from agent.evaluate import wilson_interval
from agent.experiment import (
    FamilyEval,
    Metrics,
    check_experiment,
    read_episodes,
    routed_adapter_phase,
    watch_families,
)
from envs import EnvSpecError, make_family
from envs.base import Environment, TaskFamily, Trajectory, close_environment
from learners.rollout import score_trajectory


class Audit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cells: int = 0
    episodes: int = 0
    turns: int = 0
    report_checked: bool = False
    problems: list[str] = []


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def replay(trajectory: Trajectory, family: TaskFamily, index: int, threshold: float) -> list[str]:
    """Differences between a stored episode and the same actions played in a fresh environment."""
    if trajectory.env != family.name or trajectory.split != "eval":
        return [
            f"is a {trajectory.split} episode of {trajectory.env}, not eval item {index} of {family.name}"
        ]
    environment = family.make("eval", index)
    try:
        return _replay(trajectory, environment, index, threshold)
    finally:
        close_environment(environment)


def _replay(trajectory: Trajectory, environment: Environment, index: int, threshold: float) -> list[str]:
    problems = []
    if trajectory.item_id != environment.item_id:
        return [f"is item {trajectory.item_id}, the cell's episode {index} should be {environment.item_id}"]
    try:
        prompt = list(environment.initial_observation())
    except Exception as error:  # the episode must have failed before its first turn
        if trajectory.error is None or trajectory.turns:
            return [f"the environment raises ({type(error).__name__}) at its first observation but the episode "
                    "records no error there"]
        return []
    if prompt != trajectory.prompt:
        problems.append("its prompt is not the environment's")
    rescored = trajectory.model_copy(deep=True)  # its turns' rewards are checked against the replay above
    for number, turn in enumerate(trajectory.turns, 1):
        try:
            result = environment.step(turn.action)
        except Exception as error:  # the environment raised: the episode must have stopped here with an error
            if number != len(trajectory.turns) or trajectory.error is None:
                problems.append(
                    f"turn {number}: the environment raises ({type(error).__name__}) but the episode "
                    "records no error there"
                )
            break
        if list(result.observation) != turn.observation:
            problems.append(f"turn {number}: the environment answers otherwise")
        if not _close(result.reward, turn.reward) or result.done != turn.done:
            problems.append(
                f"turn {number}: reward/done {result.reward}/{result.done}, recorded "
                f"{turn.reward}/{turn.done}"
            )
        if result.done and number != len(trajectory.turns):
            problems.append(f"turn {number}: the episode ended here but records more turns")
            break
    score_trajectory(rescored, threshold)
    if not _close(rescored.reward, trajectory.reward) or rescored.success != trajectory.success:
        problems.append(
            f"scores {rescored.reward}/{rescored.success} (reward/success), recorded "
            f"{trajectory.reward}/{trajectory.success}"
        )
    return problems


def check_cell(out: Path, cell: FamilyEval, family: TaskFamily, audit: Audit, phases: list[str]) -> None:
    where = f"{cell.trajectories}:"
    path = out / cell.trajectories
    if not path.is_file():
        audit.problems.append(f"{where} the episode file is missing")
        return
    try:
        episodes = read_episodes(path)
    except ValueError as error:
        audit.problems.append(f"{where} not a file of episodes ({str(error).splitlines()[0]})")
        return
    audit.cells += 1
    threshold = family.success_threshold
    for index, episode in enumerate(episodes):
        audit.episodes += 1
        audit.turns += len(episode.turns)
        audit.problems += [
            f"{where}{index + 1}: {problem}" for problem in replay(episode, family, index, threshold)
        ]
    successes = sum(episode.success for episode in episodes)
    low, high = wilson_interval(successes, len(episodes))
    recounted = {
        "items": len(episodes),
        "successes": successes,
        "errors": sum(e.error is not None for e in episodes),
        "prompt_tokens": sum(e.prompt_tokens for e in episodes),
        "completion_tokens": sum(e.completion_tokens for e in episodes),
        "memory": any(e.context for e in episodes),
    }
    for key, value in recounted.items():
        if getattr(cell, key) != value:
            audit.problems.append(
                f"{where} {key} is {getattr(cell, key)} in metrics.json, {value} in the episodes"
            )
    if cell.routing is not None:
        _check_routes(cell, episodes, phases, where, audit)
    shown = {"accuracy": successes / len(episodes) if episodes else 0.0, "ci_low": low, "ci_high": high}
    for key, value in shown.items():
        if not _close(getattr(cell, key), value):
            audit.problems.append(f"{where} {key} is {getattr(cell, key)} in metrics.json, {value} recounted")


def _check_routes(cell: FamilyEval, episodes: list[Trajectory], phases: list[str], where: str, audit: Audit) -> None:
    """The routed arm's shares recounted from the adapter each episode records: one folded in a phase of the
    cell's family (own), of another family (other), or none (base)."""
    counts = {"own": 0, "other": 0, "base": 0}
    for index, episode in enumerate(episodes):
        if episode.adapter is None:
            counts["base"] += 1
            continue
        phase = routed_adapter_phase(episode.adapter)
        if phase is None or phase >= len(phases):
            audit.problems.append(f"{where}{index + 1}: served {episode.adapter}, not an adapter of the routed arm")
            continue
        counts["own" if phases[phase] == cell.family else "other"] += 1
    for key, value in counts.items():
        if cell.routing.get(key) != value:  # type: ignore[union-attr]
            audit.problems.append(f"{where} routing {key} is {cell.routing.get(key)} in metrics.json, "  # type: ignore[union-attr]
                                  f"{value} in the episodes")


def check_report(out: Path, metrics: Metrics, audit: Audit) -> None:
    from agent.report import plot_names, render, summarize

    path = out / "report.md"
    if not path.is_file():
        audit.problems.append("report.md is missing: run `skillfold experiment --out DIR --report-only`")
        return
    audit.report_checked = True
    expected = render(metrics, summarize(metrics), plot_names(metrics)).splitlines()
    found = path.read_text().splitlines()
    for number, (want, have) in enumerate(zip(expected, found, strict=False), 1):
        if want != have:
            audit.problems.append(f"report.md line {number} reads {have!r}; metrics.json gives {want!r}")
            return
    if len(expected) != len(found):
        audit.problems.append(f"report.md has {len(found)} lines; metrics.json gives {len(expected)}")


def audit_experiment(out: Path) -> Audit:
    """Every cell recounted, every episode replayed, the report rendered again (see the module doc)."""
    from agent.report import load_metrics

    metrics = load_metrics(out)
    families = {family.name: family for family in check_experiment(metrics.config)}
    families |= {family.name: family for family in watch_families(metrics.config)}
    audit = Audit()
    for unit in metrics.units:
        for cell in [*unit.evals, *unit.evals_off, *unit.watch]:
            if cell.family not in families and cell in unit.watch:  # watched once, dropped from watch since
                try:
                    families[cell.family] = make_family(cell.family)
                except EnvSpecError:
                    pass
            if cell.family not in families:
                audit.problems.append(f"{cell.trajectories}: family {cell.family} is not in the stream or its watch")
                continue
            check_cell(out, cell, families[cell.family], audit, metrics.phases)
    check_report(out, metrics, audit)
    return audit
