"""Four processes writing one library at once, embedded and through a Chroma server: nothing lost, every count exact.

Each writer adds, N times: a skill of its own, the skill text every writer shares (merged into one
record), an episode with the seeded skill and its own skill in the prompt (a use of each), and an
episode without skills (a baseline episode). The writers start together behind a barrier, so their
read-modify-writes of the same counts overlap; `memory.chroma.WriteLock` keeps each one whole.
"""

from __future__ import annotations

import multiprocessing
import sqlite3

from envs.base import Message, Trajectory
from memory import HashingEmbedding, Memory, Skill
from memory.chroma import write_lock
from tests.unit.test_memory_server import chroma_server  # noqa: F401 (a fixture)

FAMILY = "toy:1"
WRITERS = 4
WRITES = 8
SEEDED = "seeded rule: count the legs of every animal before you answer"
SHARED = "shared rule: write only the final number after ANSWER"


def own_text(writer: int, index: int) -> str:
    """Words no other skill has: far from every other skill, so no near-duplicate merge."""
    return "own rule " + " ".join(f"w{writer}i{index}k{k}" for k in range(6))


def write_library(where: dict, writer: int, writes: int, seeded_id: str, barrier) -> None:
    memory = Memory.open(**where, embedding=HashingEmbedding())
    barrier.wait(timeout=120)
    for index in range(writes):
        tag = f"w{writer}-{index}"
        own = memory.add_skill(Skill(kind="rule", family=FAMILY, text=own_text(writer, index), provenance=[tag]))
        memory.add_skill(Skill(kind="rule", family=FAMILY, text=SHARED, provenance=[tag]))
        prompt = [Message(role="user", content=f"task {tag}")]
        memory.add_trajectory(Trajectory(env=FAMILY, item_id=f"{tag}-skilled", split="train", prompt=prompt,
                                         success=index % 2 == 0, skill_ids=[seeded_id, own.id]))
        memory.add_trajectory(Trajectory(env=FAMILY, item_id=f"{tag}-baseline", split="train", prompt=prompt,
                                         success=index % 3 == 0))


def run_writers(where: dict) -> Memory:
    memory = Memory.open(**where, embedding=HashingEmbedding())
    seeded = memory.add_skill(Skill(kind="rule", family=FAMILY, text=SEEDED))
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(WRITERS)
    writers = [context.Process(target=write_library, args=(where, writer, WRITES, seeded.id, barrier))
               for writer in range(WRITERS)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=240)
    assert [process.exitcode for process in writers] == [0] * WRITERS
    return Memory.open(**where, embedding=HashingEmbedding())


def check_library(memory: Memory) -> None:
    tags = [f"w{writer}-{index}" for writer in range(WRITERS) for index in range(WRITES)]
    successes = WRITERS * sum(index % 2 == 0 for index in range(WRITES))

    trajectories = memory.list_trajectories(limit=None)
    assert memory.count_trajectories() == len(trajectories) == 2 * WRITERS * WRITES
    assert sorted(t.item_id for t in trajectories) == sorted(f"{tag}-{kind}" for tag in tags
                                                             for kind in ("skilled", "baseline"))
    for trajectory in trajectories:  # integrity: every record reads back whole by its id
        assert memory.get_trajectory(trajectory.id).model_dump() == trajectory.model_dump()

    skills = memory.list_skills(family=FAMILY)
    by_text = {skill.text: skill for skill in skills}
    assert len(skills) == len(by_text) == 2 + WRITERS * WRITES  # no duplicate record, none lost
    seeded, shared = by_text[SEEDED], by_text[SHARED]
    assert (seeded.successes_with, seeded.failures_with) == (successes, WRITERS * WRITES - successes)
    assert sorted(shared.provenance) == sorted(tags) and shared.uses == 0
    for writer in range(WRITERS):
        for index in range(WRITES):
            own = by_text[own_text(writer, index)]
            assert (own.successes_with, own.failures_with) == ((1, 0) if index % 2 == 0 else (0, 1))
            assert own.provenance == [f"w{writer}-{index}"]
            [(found, _)] = memory.search_skills(own.text, FAMILY, k=1)  # and the vector index holds it
            assert found.id == own.id

    baseline = memory.family_stats(FAMILY)
    assert baseline.baseline_episodes == WRITERS * WRITES
    assert baseline.baseline_successes == WRITERS * sum(index % 3 == 0 for index in range(WRITES))
    stats = memory.stats()
    assert stats["trajectories"] == 2 * WRITERS * WRITES
    assert stats["skills"] == {"active": 2 + WRITERS * WRITES, "pending": 0, "folded": 0, "retired": 0}


def test_four_embedded_writers(tmp_path):
    check_library(run_writers({"home": tmp_path / "home"}))
    with sqlite3.connect(tmp_path / "home" / "chroma" / "chroma.sqlite3") as database:
        assert database.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_four_writers_through_a_server(chroma_server):  # noqa: F811 (the fixture)
    url, _ = chroma_server
    check_library(run_writers({"url": url}))


def test_write_lock_is_reentrant_and_one_per_store(tmp_path):
    memory = Memory.open(home=tmp_path / "a", embedding=HashingEmbedding())
    with memory.write_lock, memory.write_lock:  # set_status -> update_skill takes it twice
        memory.add_skill(Skill(kind="rule", family=FAMILY, text=SEEDED))
    assert memory.write_lock.path == tmp_path / "a" / "chroma" / "writes.lock"
    # one server, however its address is spelled, one lock; another server, another lock
    assert write_lock(None, "127.0.0.1:8000").path == write_lock(None, "http://127.0.0.1:8000/").path
    assert write_lock(None, "http://127.0.0.1:8001").path != write_lock(None, "http://127.0.0.1:8000").path
