"""A skill library to show in `skillfold ui` tests and its benchmark, built through the Memory API.

`seed_library(home)` stores a small library with the hashing embedding (no model): two families,
skills of each kind and status, versions and merges, status changes with evidence, provenance
trajectories with tool calls, a fold run with metrics.jsonl and an adapter marked LATEST, and
skills whose text is hostile HTML (`HOSTILE`), which every page must show as text.
`bulk_library(home, skills, trajectories)` stores many of each for the benchmark.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from envs.base import Message, Trajectory, Turn
from memory import HashingEmbedding, Memory, Skill, StatusChange

LEGS = "rg:leg_counting"
CALC = "rg:basic_arithmetic+calc"
HOSTILE = (
    "<script>alert('xss-script')</script> always count twice",
    '"><img src=x onerror=alert(\'xss-img\')> then add the legs',
    "[click me](javascript:alert('xss-md')) **bold** <b>raw html</b> <iframe src=//evil></iframe>",
)
HOSTILE_FAMILY = 'fam"><svg onload=alert(1)>'
FOLD = "evolve-fold-1"


@dataclass
class Seeded:
    home: Path
    skill_ids: dict[str, str]  # name -> id
    trajectory_ids: dict[str, str]


def conversation(
    env: str, question: str, answer: str, success: bool, *, tool: bool = False, skill_ids: list[str] | None = None,
    trajectory_id: str | None = None, split: str = "train",
) -> Trajectory:
    turns = []
    if tool:
        turns.append(Turn(action="CALC(12*7)", observation=[Message(role="user", content="Result: 84")],
                          info={"tool": "CALC", "argument": "12*7", "tool_error": False}))
    turns.append(Turn(action=f"ANSWER: {answer}", reward=1.0 if success else 0.0, done=True,
                      info={"extracted": answer}))
    fields = {"id": trajectory_id} if trajectory_id else {}
    return Trajectory(
        env=env, item_id=f"{split}-{abs(hash(question)) % 1000}", split=split,
        prompt=[Message(role="system", content="Answer with ANSWER: <n>."), Message(role="user", content=question)],
        turns=turns, reward=1.0 if success else 0.0, success=success, skill_ids=skill_ids or [], model="tiny",
        **fields,
    )


def seed_library(home: Path) -> Seeded:
    memory = Memory.open(home=home, embedding=HashingEmbedding())
    ids: dict[str, str] = {}
    sources = {
        "spider": conversation(LEGS, "How many legs do 2 spiders and 1 bird have?", "18", True, trajectory_id="run-a-0"),
        "calc": conversation(CALC, "What is 12 * 7? <script>alert('xss-q')</script>", "84", True, tool=True,
                             trajectory_id="run-a-1"),
        "failed": conversation(LEGS, "How many legs do 3 cows have?", "10", False, trajectory_id="run-a-2"),
    }
    memory.add_trajectories(list(sources.values()))
    created = datetime.now(UTC) - timedelta(days=3)
    skills = {
        "legs": Skill(kind="rule", family=LEGS, title="count legs per animal",
                      text="Spiders have eight legs, birds two: multiply each count by its legs, then add.",
                      provenance=["run-a-0", "run-a-2"], created_at=created, updated_at=created),
        "exemplar": Skill(kind="exemplar", family=CALC, title="12 * 7 with the calculator",
                          text="### user\nWhat is 12 * 7?\n### assistant\nCALC(12*7)\n### user\nResult: 84\n"
                               "### assistant\nANSWER: 84", provenance=["run-a-1"],
                          created_at=created + timedelta(hours=1), updated_at=created + timedelta(hours=1),
                          status_history=[StatusChange(  # as the loop admits a skill: its probe evidence
                              status="active", reason="admitted: no fewer probe successes with it",
                              evidence={"skill_id": "x", "admitted": True, "successes_with": 7,
                                        "successes_without": 2, "probes": 8})]),
        "taught": Skill(kind="taught", family=CALC, title="use the calculator for products",
                        text="For any product of two numbers over 10, call CALC first.",
                        created_at=created + timedelta(hours=2), updated_at=created + timedelta(hours=2)),
        "folded": Skill(kind="rule", family=LEGS, title="cows and horses",
                        text="Cows, horses, dogs and cats walk on four legs each.",
                        created_at=created + timedelta(hours=3), updated_at=created + timedelta(hours=3)),
        "retired": Skill(kind="rule", family=LEGS, title="a bad guess",
                         text="When unsure answer with the number of animals.",
                         created_at=created + timedelta(hours=4), updated_at=created + timedelta(hours=4)),
        "script": Skill(kind="rule", family=LEGS, title="<script>alert('xss-title')</script>", text=HOSTILE[0]),
        "img": Skill(kind="rule", family=CALC, title=HOSTILE[1][:40], text=HOSTILE[1]),
        "markdown": Skill(kind="taught", family=CALC, title="markdown and html", text=HOSTILE[2]),
        "hostile_family": Skill(kind="rule", family=HOSTILE_FAMILY, title="family name", text="a skill of a hostile family"),
    }
    for name, skill in skills.items():
        ids[name] = memory.add_skill(skill).id
    legs = memory.get_skill(ids["legs"])
    memory.update_skill(legs.model_copy(update={
        "text": legs.text + " Insects have six."}))
    near = Skill(kind="rule", family=LEGS, title="legs again", provenance=["run-a-0"],
                 text="Spiders have eight legs, birds two: multiply each count by its legs, then add them. Insects have six.")
    assert memory.add_skill(near).id == ids["legs"]  # a near-duplicate: merged, a version of its own
    adapter = home / "adapters" / FOLD
    memory.set_status(ids["folded"], "folded", "memory-off accuracy 62.0% after fold 1 meets the fold rule",
                      {"accuracy_off": 0.62, "accuracy_on": 0.64, "adapter": str(adapter), "fold": 1})
    memory.set_status(ids["retired"], "retired", "harmful: helpfulness -0.30 [-0.52, -0.08]",
                      {"uses": 12, "helpfulness": -0.3})
    used = [conversation(LEGS, f"How many legs do {n} spiders have?", str(8 * n), n % 3 != 0,
                         skill_ids=[ids["legs"]], trajectory_id=f"run-b-{n}") for n in range(1, 9)]
    baseline = [conversation(LEGS, f"How many legs do {n} birds have?", str(2 * n), n % 2 == 0,
                             trajectory_id=f"run-c-{n}", split="eval") for n in range(1, 7)]
    memory.add_trajectories(used + baseline)
    _fold_files(home, adapter, [ids["folded"]])
    return Seeded(home=home, skill_ids=ids, trajectory_ids={name: t.id for name, t in sources.items()})


def _fold_files(home: Path, adapter: Path, folded: list[str]) -> None:
    run = home / "folds" / FOLD
    run.mkdir(parents=True)
    (run / "fold_config.json").write_text(json.dumps({"method": "opsd", "steps": 12, "batch_size": 4}))
    with open(run / "metrics.jsonl", "w") as sink:
        for step in range(1, 13):
            sink.write(json.dumps({"step": step, "loss": 1.0 / step, "kl": 0.5 / step, "teacher_token_share": 0.3,
                                   "tokens_per_second": 900 + step, "rollout_success": step / 12}) + "\n")
    (run / "result.json").write_text(json.dumps({"steps": 12, "loss_first": 1.0, "loss_last": 0.083}))
    (run / "retention.json").write_text(json.dumps({  # agent.protection's evidence, a family name to escape
        "tolerance": 0.03, "adapter_before": None, "adapter_after": str(run / "snapshots" / "step-000010"),
        "step": 10, "passed": True, "forced": False, "seconds_before": 1.0, "seconds_after": 2.0, "families": [
            {"family": "rg:letter_counting", "first_item": 436, "items": 64, "before": 22, "after": 21},
            {"family": HOSTILE_FAMILY, "first_item": 0, "items": 16, "before": 3, "after": 3}],
        "attempts": [  # the fold's last adapter dropped letter counting; step 10's, tried next, kept it
            {"step": None, "adapter": str(run / "adapter"), "after": {"rg:letter_counting": 12, HOSTILE_FAMILY: 3},
             "passed": False},
            {"step": 10, "adapter": str(run / "snapshots" / "step-000010"),
             "after": {"rg:letter_counting": 21, HOSTILE_FAMILY: 3}, "passed": True}]}))
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (home / "adapters" / "LATEST").write_text(FOLD + "\n")
    evolve = home / "evolve" / "evolve"
    evolve.mkdir(parents=True)
    (evolve / "evolve.jsonl").write_text(json.dumps({
        "kind": "folded", "phase": 0, "chunk": 0, "family": LEGS, "skill_ids": folded,
        "evidence": {"accuracy_off": 0.62, "accuracy_on": 0.64, "adapter": str(adapter)},
        "time": datetime.now(UTC).isoformat()}) + "\n")


WORDS = ("count legs animal spider bird add sum carry digit check answer rule first then each multiply "
         "divide subtract compare order list letter word find total before after every number tool call").split()


def bulk_library(home: Path, skills: int, trajectories: int, families: int = 10, seed: int = 0,
                 batch: int = 2000, say=print) -> Memory:
    """`skills` random rules and `trajectories` episodes (a third with skills in the prompt) in `families`."""
    rng = random.Random(seed)
    memory = Memory.open(home=home, embedding=HashingEmbedding())
    names = [f"bench:family-{index}" for index in range(families)]
    stored: list[str] = []
    for start in range(0, skills, batch):
        chunk = []
        for index in range(start, min(skills, start + batch)):
            text = f"skill {index}: " + " ".join(rng.choice(WORDS) for _ in range(24))
            chunk.append(Skill(kind=rng.choice(["rule", "exemplar", "taught"]), family=names[index % families],
                               title=text[:60], text=text))
        stored += [skill.id for skill in memory.add_skills(chunk)]
        say(f"  {len(stored)} skills")
    for start in range(0, trajectories, batch):
        chunk = []
        for index in range(start, min(trajectories, start + batch)):
            family = names[index % families]
            chunk.append(conversation(family, f"task {index}: " + " ".join(rng.choice(WORDS) for _ in range(12)),
                                      str(index), rng.random() < 0.5, tool=index % 4 == 0,
                                      skill_ids=[rng.choice(stored)] if index % 3 == 0 and stored else None,
                                      trajectory_id=f"bench-{index}"))
        memory.add_trajectories(chunk)
        if (start // batch) % 10 == 0:
            say(f"  {start + len(chunk)} trajectories")
    return memory
