"""Crash safety, enumerated: a kill at every write point of `run`, `fold`, `evolve` and `experiment`,
then the same command again, ends in the state an uninterrupted run leaves: nothing lost, nothing twice.

As SQLite's crash tests do, each command first runs once uninterrupted while every write it makes is
counted and named (`tests/unit/faults.py`: files under the test's directory, Chroma writes, LangGraph
checkpoint writes). Then, for each write point, it runs again from nothing with that write raising
`Killed` (and every write after it: the process is dead, and the resumed one has another pid), and
once more as a user resumes it. The end state (stored trajectories; skills with their counts, statuses
and histories; family baselines; registered adapters and `latest`; metrics lines, events, summaries,
results and reports; and the list of files, so no stray scratch) must equal the uninterrupted run's.

A write point is a site, not every write (`faults.site_of`): a write repeated in a loop (the next
batch, step or arm) is killed at its first time only, and in `evolve` and `experiment` the writes of a
command enumerated here on its own (the agent loop; the evolve stages) are one point. With
SKILLFOLD_FAULTS=all every single write is a point (minutes, not seconds).
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.folding import LATEST
from memory import HashingEmbedding, Memory
from tests.unit.faults import Faults, Killed, faults, scope, site_of
from tests.unit.test_evolve import World

runner = CliRunner()
TIMINGS = ("seconds", "tokens_per_second", "handoff_seconds", "rollout_seconds", "teacher_seconds", "update_seconds")
GONE = 4_194_303  # a pid no process has (Linux's pid_max is at most 2^22)


@pytest.fixture(autouse=True)
def one_click_command(monkeypatch):
    """typer builds the click command of the app in 0.2 s, at every invoke: here once."""
    import typer.testing

    monkeypatch.setattr(typer.testing, "_get_command", functools.cache(typer.testing._get_command))


def invoke(*args):
    from agent.cli import app

    return runner.invoke(app, [str(arg) for arg in args])


def files(root: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Every file under `root` but the stores' own (Chroma, LangGraph), relative."""
    return sorted(str(path.relative_to(root)) for path in root.rglob("*")
                  if path.is_file() and not any(part in skip for part in path.relative_to(root).parts))


def memory_state(home: Path) -> dict:
    """What a store holds, with skills named by their text (ids are random, so a skill re-proposed after
    a resume has another one)."""
    store = Memory.open(home=home, embedding=HashingEmbedding())
    skills = store.list_skills()
    text = {skill.id: skill.text for skill in skills}
    return {
        "trajectories": sorted(
            (t.id, t.item_id, t.success, [text.get(i, i) for i in t.skill_ids], [turn.action for turn in t.turns])
            for t in store.list_trajectories(limit=None)),
        "skills": sorted(
            (s.family, s.kind, s.text, s.status, s.successes_with, s.failures_with, s.provenance, len(s.versions),
             [change.status for change in s.status_history]) for s in skills),
        "families": {name: store.family_stats(name).model_dump() for name in store.families()},
    }


def rooted(state: dict, root: Path) -> dict:
    """`state` with the paths under `root` written from `<root>`: runs in different roots compare."""
    return json.loads(json.dumps(state, default=str).replace(str(root), "<root>"))


def difference(got: dict, expected: dict) -> str:
    """Where two end states first differ, briefly."""
    parts = []
    for key in expected:
        if got[key] != expected[key]:
            lines = difflib.unified_diff(json.dumps(expected[key], indent=0).splitlines(),
                                         json.dumps(got[key], indent=0).splitlines(), lineterm="", n=0)
            parts.append(f"{key}: " + " ".join(line[:160] for line in list(lines)[2:8]))
    return "; ".join(parts)


def write_points(counted: Faults, grouped: tuple[str, ...] = ()) -> list[int]:
    """The writes to kill at (1-based): the first of each site. A write made inside a function of
    `grouped` (a command enumerated on its own, as the agent loop inside evolve; see `faults.scope`)
    has that function for its site. With SKILLFOLD_FAULTS=all: every write."""
    if os.environ.get("SKILLFOLD_FAULTS") == "all":
        return list(range(1, counted.count + 1))
    first: dict[str, int] = {}
    for number, (description, inside) in enumerate(zip(counted.sites, counted.scopes, strict=True), start=1):
        first.setdefault(f"inside {inside}" if inside in grouped else site_of(description), number)
    return sorted(first.values())


def enumerate_faults(tmp_path: Path, monkeypatch, command: Callable[[Path], object],
                     end_state: Callable[[Path], dict], setup: Callable[[Path], object] = lambda root: None,
                     grouped: tuple[str, ...] = ()) -> list[str]:
    """Run `command(root)` straight, then killed at each write point and run again; every end state
    must be the straight run's. `setup(root)` prepares a root first (its writes are not counted).
    Returns the sites killed at."""
    straight = tmp_path / "straight"
    setup(straight)
    with faults(straight, monkeypatch) as counted:
        command(straight)
    expected = rooted(end_state(straight), straight)
    points = write_points(counted, grouped)
    print(f"{len(points)} write points of {counted.count} writes:")
    print("\n".join(f"  {k}: {site_of(counted.sites[k - 1])}" for k in points))
    failed = []
    for k in points:
        root = tmp_path / f"killed-{k}"
        setup(root)
        with faults(root, monkeypatch, kill_at=k) as killing, pytest.raises(Killed), monkeypatch.context() as patch:
            patch.setattr(os, "getpid", lambda: GONE)  # the killed process's pid: the resumed one has another
            command(root)
        assert killing.dead, f"write {k} was never reached: {counted.sites[k - 1]}"
        try:
            command(root)
            got = rooted(end_state(root), root)
        except Exception as error:
            failed.append(f"killed at write {k} ({counted.sites[k - 1]}), then: {error!r}")
            continue
        if got != expected:
            failed.append(f"killed at write {k} ({counted.sites[k - 1]}): " + difference(got, expected))
    assert not failed, "\n".join(failed)
    return [counted.sites[k - 1] for k in points]


# ---------------------------------------------------------------------------- the trajectory store
def test_storing_episodes_killed_at_every_write_counts_their_usage_once(tmp_path, monkeypatch):
    """Storing episodes writes them, then their skills' usage counts and the family's baseline: a kill
    in between, and the same episodes stored again, count each once."""
    from envs.base import Message, Trajectory
    from memory import Skill

    def episode(name: str, success: bool, skill_ids: list[str]) -> Trajectory:
        return Trajectory(id=name, env="toy:1", item_id=name, split="train", success=success, skill_ids=skill_ids,
                          prompt=[Message(role="user", content=f"Say the word: {name}")])

    def setup(root: Path) -> None:
        store = Memory.open(home=root / "home", embedding=HashingEmbedding())
        store.add_skills([Skill(id="rule", kind="rule", family="toy:1", text="Repeat the asked word exactly.")])
        store.add_trajectories([episode("before", True, ["rule"]), episode("alone", False, [])])

    def command(root: Path) -> None:
        Memory.open(home=root / "home", embedding=HashingEmbedding()).add_trajectories(
            [episode("apple", True, ["rule"]), episode("river", False, ["rule"]), episode("stone", True, [])])

    enumerate_faults(tmp_path, monkeypatch, command, lambda root: memory_state(root / "home"), setup)


# ------------------------------------------------------------------------------------------- run
RUN = ["run", "--env", "toy", "--episodes", 4, "--model", "scripted", "--json", "--run-id", "r",
       "loop.batch_size=2", "loop.probes=2", "loop.reflect_every=0", "loop.max_turns=2"]


def test_run_killed_at_every_write_resumes_to_the_same_end(tmp_path, monkeypatch):
    """`skillfold run` on the scripted agent of test_evolve (it solves some words, so exemplars are admitted
    and their usage is counted), two batches; then the same command, `--run-id` and all."""
    import agent.cli

    def scripted(model_config, home, url, memory=True):  # the scripted agent of test_evolve, a hashed embedding
        return World().engine, Memory.open(home=home, embedding=HashingEmbedding())

    monkeypatch.setattr(agent.cli, "open_engine_and_memory", scripted)

    def command(root: Path) -> None:
        result = invoke(*RUN, "--home", root / "home")
        if isinstance(result.exception, Killed):
            raise result.exception
        assert result.exit_code == 0, (result.output, result.exception)

    def end_state(root: Path) -> dict:
        home = root / "home"
        return {**memory_state(home), "summary": json.loads((home / "runs" / "run-r" / "summary.json").read_text()),
                "files": files(home, skip=("chroma", "agent.sqlite"))}

    enumerate_faults(tmp_path, monkeypatch, command, end_state)


# ------------------------------------------------------------------------------------------ fold
FOLD = ["fold", "--run-id", "f", "--steps", 2, "--resume", "--json", "items_per_family=2", "probes=0",
        "fold.batch_size=2", "fold.checkpoint_every=1", "fold.max_turns=1", "fold.sampling.max_new_tokens=4",
        "protection.general=[toy:2]", "protection.gate_items=4"]  # protection on: its checks' writes too


def test_fold_killed_at_every_write_resumes_to_the_same_end(tmp_path, monkeypatch, model_dir):
    """`skillfold fold --run-id f --resume` on the tiny model, two steps with a checkpoint each; then the same
    command. The adapter must be the uninterrupted fold's bit for bit (test_resume says why it can be)."""
    import torch

    import agent.cli
    from memory import Skill

    monkeypatch.setattr(torch, "set_num_threads", lambda _: None)  # the CLI's engine on conftest's one thread
    monkeypatch.setattr(agent.cli, "open_memory", lambda home, url=None: Memory.open(home=home, embedding=HashingEmbedding()))

    def setup(root: Path) -> None:
        Memory.open(home=root / "home", embedding=HashingEmbedding()).add_skills([Skill(
            kind="rule", family="toy:1", title="repeat the word", text="Repeat the asked word exactly.")])

    def command(root: Path) -> None:
        result = invoke(*FOLD, "--model", model_dir, "--home", root / "home")
        if isinstance(result.exception, Killed):
            raise result.exception
        assert result.exit_code == 0, (result.output, result.exception)

    def end_state(root: Path) -> dict:
        from safetensors.torch import load_file

        home = root / "home"
        adapter = load_file(str(home / "adapters" / "f" / "adapter_model.safetensors"))
        metrics = [json.loads(line) for line in (home / "folds" / "f" / "metrics.jsonl").read_text().splitlines()]
        result = json.loads((home / "folds" / "f" / "result.json").read_text())
        return {
            "adapter": {name: tensor.tolist() for name, tensor in adapter.items()},
            "latest": (home / "adapters" / LATEST).read_text(),
            "metrics": [{key: value for key, value in line.items() if key not in TIMINGS} for line in metrics],
            "result": {key: value for key, value in result.items() if key not in ("seconds", "resumed_from")},
            "files": files(home, skip=("chroma",)),
        }

    enumerate_faults(tmp_path, monkeypatch, command, end_state, setup)


# ---------------------------------------------------------------------------------------- evolve
def test_evolve_killed_at_every_write_resumes_to_the_same_end(tmp_path, monkeypatch):
    """Two phases on the scripted agent, and the scripted fold of test_experiment (the fold's own writes
    are enumerated above): fold 2 forgets, so toy:1's skills are folded, then unfolded."""
    import agent.evolve
    from agent.evolve import read_events, run_evolve
    from tests.unit.test_evolve import make_stream
    from tests.unit.test_experiment import forgetful_fold

    def command(root: Path) -> None:
        run_evolve(make_stream(root / "home", World(), forgetful_fold, episodes=2, assess_items=2))

    def end_state(root: Path) -> dict:
        home = root / "home"
        state = memory_state(home)
        texts = {skill.id: skill.text for skill in Memory.open(home=home, embedding=HashingEmbedding()).list_skills()}
        events = [(e.kind, e.phase, e.chunk, e.family, sorted(texts[i] for i in e.skill_ids),
                   {key: value for key, value in e.evidence.items() if key not in TIMINGS})
                  for e in read_events(home / "evolve" / "evolve")]
        return {**state, "events": events, "latest": (home / "adapters" / LATEST).read_text(),
                "state": (home / "evolve" / "evolve" / "state.json").read_text(),
                "files": files(home, skip=("chroma", "loop.sqlite"))}

    scope(monkeypatch, agent.evolve, "run_loop")
    enumerate_faults(tmp_path, monkeypatch, command, end_state, grouped=("run_loop",))


# ------------------------------------------------------------------------------------ experiment
def test_experiment_killed_at_every_write_resumes_to_the_same_end(tmp_path, monkeypatch):
    """The experiment of test_experiment (scripted agent, fold and SFT), cut to one seed, one phase and the
    arms whose writes differ: sft (its adapters), fold and skillfold (a fold reused across arms, skills
    folded). The base and memory arms write nothing the others do not (an evaluation, reused or not; a
    unit; the loop). What the loop and the evolve stages write inside is enumerated above: here each is
    one write point."""
    import matplotlib.figure

    import agent.evolve
    import agent.experiment
    from agent.evolve import Phase
    from agent.report import load_metrics, write_report
    from tests.unit.test_evolve import settings
    from tests.unit.test_experiment import _outcome, experiment, run

    config = experiment(seeds=[0], arms=["sft", "fold", "skillfold"], eval_items=2,
                        stream=settings(episodes=2, assess_items=2, phases=[Phase(family="toy:1")]))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda figure, path, **options: Path(path).write_bytes(
        b"\x89PNG"))  # the report's plots are written as they are, only not drawn (1 s a report)

    def command(root: Path) -> None:
        run(root / "out", World(), config)
        write_report(root / "out")

    def end_state(root: Path) -> dict:
        out = root / "out"
        report = re.sub(r"\| [0-9]+ s \|", "| (wall time) |", (out / "report.md").read_text())
        return {"metrics": _outcome(load_metrics(out)), "report": report,
                "files": files(out, skip=("chroma", "loop.sqlite"))}

    scope(monkeypatch, agent.evolve, "run_loop")
    scope(monkeypatch, agent.experiment, "evolve_phase")
    scope(monkeypatch, agent.experiment.Lab, "reusing_fold")
    enumerate_faults(tmp_path, monkeypatch, command, end_state, grouped=("run_loop", "evolve_phase"))
