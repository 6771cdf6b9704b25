"""memory: trajectories, skills, dedup, retrieval, helpfulness, errors; hashed embeddings, embedded Chroma."""

from __future__ import annotations

import json
import logging
import re

import pytest
from chromadb.api.client import SharedSystemClient
from pydantic import ValidationError

from envs.base import Message, Trajectory, Turn
from memory import (
    FamilyStats,
    HashingEmbedding,
    InvalidSkill,
    Memory,
    MemoryConfig,
    MemoryStoreError,
    Skill,
    SkillNotFound,
    TrajectoryNotFound,
    family_collection_names,
    validate_skill_text,
)

FAMILY = "rg:leg_counting"
OTHER = "rg:basic_arithmetic"
WORDS = (
    "count the legs of every animal in the list then add them up carefully spiders have eight legs "
    "insects have six legs birds have two legs and dogs cats horses cows have four legs each one"
).split()
LONG_RULE = " ".join(WORDS)  # 36 words: changing one word moves the hashed embedding by ~0.03


def make_skill(text: str, family: str = FAMILY, **fields) -> Skill:
    return Skill(kind="rule", family=family, title=text[:20], text=text, **fields)


def make_trajectory(
    env: str = FAMILY, success: bool = True, skill_ids: list[str] | None = None, **fields
) -> Trajectory:
    return Trajectory(
        env=env,
        item_id=fields.pop("item_id", "7"),
        split=fields.pop("split", "train"),
        prompt=[Message(role="system", content="be brief"), Message(role="user", content="how many legs?")],
        turns=[Turn(action="12", reward=1.0, done=True, prompt_tokens=20, completion_tokens=3)],
        reward=1.0 if success else 0.0,
        success=success,
        skill_ids=skill_ids or [],
        model="tiny",
        **fields,
    )


@pytest.fixture()
def memory(tmp_path) -> Memory:
    return Memory.open(home=tmp_path / "home", embedding=HashingEmbedding())


# ---- trajectories ----------------------------------------------------------------------------


def test_trajectory_round_trip_and_listing(memory):
    first = make_trajectory(adapter="fold-1")
    memory.add_trajectory(first)
    memory.add_trajectory(make_trajectory(env=OTHER, split="eval", success=False))
    stored = memory.get_trajectory(first.id)
    assert stored.model_dump() == first.model_dump()
    assert stored.prompt_tokens == 20 and stored.completion_tokens == 3
    assert memory.count_trajectories() == 2
    assert [t.id for t in memory.list_trajectories(env=FAMILY)] == [first.id]
    assert [t.env for t in memory.list_trajectories(split="eval")] == [OTHER]
    assert memory.list_trajectories(env=FAMILY, split="eval") == []
    assert len(memory.list_trajectories(limit=1)) == 1


def test_add_trajectory_is_idempotent_and_counts_usage_once(memory):
    skill = memory.add_skill(make_skill("always double check the spider count"))
    with_skill = make_trajectory(success=True, skill_ids=[skill.id])
    without = make_trajectory(success=False)
    assert memory.add_trajectories([with_skill, without]) == [with_skill.id, without.id]
    assert memory.add_trajectory(with_skill) is False
    assert memory.add_trajectories([without, with_skill]) == []
    assert memory.count_trajectories() == 2
    assert memory.get_skill(skill.id).successes_with == 1
    assert memory.get_skill(skill.id).uses == 1
    assert memory.family_stats(FAMILY) == FamilyStats(
        family=FAMILY, baseline_episodes=1, baseline_successes=0
    )


def test_missing_trajectory(memory):
    with pytest.raises(TrajectoryNotFound, match="nope"):
        memory.get_trajectory("nope")


# ---- skills: dedup, provenance, versions ------------------------------------------------------


def test_exact_duplicate_returns_stored_record_with_merged_provenance(memory):
    first = memory.add_skill(make_skill("Spiders have eight legs.", provenance=["t1"]))
    again = memory.add_skill(make_skill("  Spiders have   eight legs. ", provenance=["t2", "t1"]))
    assert again.id == first.id
    assert again.provenance == ["t1", "t2"]
    assert len(again.versions) == 1
    assert [s.id for s in memory.list_skills(FAMILY)] == [first.id]
    assert memory.get_skill(first.id).provenance == ["t1", "t2"]


def test_adding_a_stored_record_again_does_not_double_its_counts(memory):
    skill = memory.add_skill(make_skill("spiders have eight legs", successes_with=3, provenance=["t1"]))
    again = memory.add_skill(skill.model_copy(update={"provenance": ["t2"]}))
    assert again.id == skill.id and again.successes_with == 3 and again.provenance == ["t1", "t2"]


def test_near_duplicate_merges_into_existing_and_keeps_a_version(memory):
    stored = memory.add_skill(make_skill(LONG_RULE, provenance=["t1"]))
    variant = LONG_RULE.replace("carefully", "slowly")
    merged = memory.add_skill(make_skill(variant, provenance=["t2"]))
    assert merged.id == stored.id
    assert merged.text == LONG_RULE  # same evidence: the stored text stays
    assert merged.provenance == ["t1", "t2"]
    assert [version.text for version in merged.versions] == [LONG_RULE, variant]
    assert "near-duplicate" in merged.versions[-1].reason
    different = memory.add_skill(make_skill("horses and cows have four legs; add them last"))
    assert different.id != stored.id
    assert len(memory.list_skills(FAMILY)) == 2


def test_near_duplicate_threshold_is_configurable(tmp_path):
    strict = Memory.open(
        home=tmp_path / "h", embedding=HashingEmbedding(), config=MemoryConfig(near_duplicate_distance=0.0)
    )
    strict.add_skill(make_skill(LONG_RULE))
    strict.add_skill(make_skill(LONG_RULE.replace("carefully", "slowly")))
    assert len(strict.list_skills(FAMILY)) == 2


def test_near_duplicate_with_better_measurements_replaces_the_text(memory):
    stored = memory.add_skill(make_skill(LONG_RULE))
    variant = LONG_RULE.replace("carefully", "slowly")
    merged = memory.add_skill(make_skill(variant, successes_with=30, failures_with=2))
    assert merged.id == stored.id
    assert merged.text == variant
    assert merged.successes_with == 30 and merged.failures_with == 2
    assert "replaced" in merged.versions[-1].reason
    hits = memory.search_skills(variant, FAMILY, k=1)
    assert hits[0][0].id == stored.id and hits[0][1] == pytest.approx(0.0, abs=1e-5)


def test_duplicates_inside_one_batch_become_one_record(memory):
    skills = [
        make_skill(LONG_RULE, provenance=["a"]),
        make_skill(LONG_RULE.replace("carefully", "slowly"), provenance=["b"]),
        make_skill(LONG_RULE, family=OTHER, provenance=["c"]),
    ]
    stored = memory.add_skills(skills)
    assert stored[0].id == stored[1].id != stored[2].id
    assert stored[1].provenance == ["a", "b"]
    assert len(memory.list_skills()) == 2


def test_update_skill_writes_a_version_and_reembeds(memory):
    skill = memory.add_skill(make_skill("dogs have four legs"))
    updated = memory.update_skill(skill.model_copy(update={"text": "birds have two legs and wings"}))
    assert [v.reason for v in updated.versions] == ["created", "edited"]
    assert memory.get_skill(skill.id).text == "birds have two legs and wings"
    assert memory.search_skills("birds wings", FAMILY, k=1)[0][0].id == skill.id
    with pytest.raises(InvalidSkill, match="cannot change family"):
        memory.update_skill(updated.model_copy(update={"family": OTHER}))
    with pytest.raises(SkillNotFound):
        memory.update_skill(make_skill("never stored"))


def test_new_skill_with_a_taken_id_is_refused(memory):
    skill = memory.add_skill(make_skill("dogs have four legs"))
    with pytest.raises(InvalidSkill, match="already exist"):
        memory.add_skill(make_skill("something else entirely about cats", id=skill.id))
    assert memory.get_skill(skill.id).text == "dogs have four legs"


def test_status_moves_between_collections(memory):
    skill = memory.add_skill(make_skill("dogs have four legs"))
    folded = memory.set_status(
        skill.id, "folded", reason="family solved without memory", evidence={"eval": 0.9}
    )
    assert folded.status_history[-1].evidence == {"eval": 0.9}
    assert memory.search_skills("dogs legs", FAMILY) == []
    assert memory.search_skills("dogs legs", FAMILY, status="folded")[0][0].id == skill.id
    assert memory.get_skill(skill.id).status == "folded"
    active, archive = family_collection_names(FAMILY)
    assert memory.client.get_collection(active).count() == 0
    assert memory.client.get_collection(archive).count() == 1
    memory.set_status(skill.id, "active", reason="regressed")
    assert memory.search_skills("dogs legs", FAMILY)[0][0].id == skill.id


def test_remove_skill(memory):
    skill = memory.add_skill(make_skill("dogs have four legs"))
    assert memory.remove_skill(skill.id).id == skill.id
    with pytest.raises(SkillNotFound):
        memory.remove_skill(skill.id)
    assert memory.list_skills() == []


# ---- retrieval ------------------------------------------------------------------------------


def test_retrieval_orders_by_relevance_and_fits_the_budget(memory):
    texts = {
        "best": "spiders eight legs count",
        "long": "spiders eight legs " + " ".join(f"filler{i}" for i in range(40)),
        "second": "spiders legs",
        "far": "multiply the two numbers",
    }
    ids = {name: memory.add_skill(make_skill(text)).id for name, text in texts.items()}
    ranked = memory.search_skills("spiders eight legs count", FAMILY, k=4)
    assert ranked[0][0].id == ids["best"]
    assert [distance for _, distance in ranked] == sorted(distance for _, distance in ranked)
    words = lambda text: len(text.split())  # noqa: E731
    chosen = memory.retrieve("spiders eight legs count", FAMILY, token_budget=10, count_tokens=words, k=3)
    assert [skill.id for skill in chosen] == [ids["best"], ids["second"], ids["far"]]  # long skipped
    assert sum(words(skill.text) for skill in chosen) <= 10
    assert memory.retrieve("spiders eight legs count", FAMILY, 10, count_tokens=words, k=1) == chosen[:1]
    assert memory.retrieve("spiders", FAMILY, token_budget=1, count_tokens=words) == []


def test_family_scoped_search_only_sees_its_family(memory):
    mine = memory.add_skill(make_skill("spiders have eight legs"))
    theirs = memory.add_skill(make_skill("spiders have eight legs", family=OTHER))
    assert mine.id != theirs.id
    assert [s.id for s, _ in memory.search_skills("spiders", FAMILY)] == [mine.id]
    assert {s.id for s, _ in memory.search_skills("spiders", None)} == {mine.id, theirs.id}
    assert memory.search_skills("spiders", "rg:unknown") == []
    assert memory.families() == sorted([FAMILY, OTHER])


# ---- helpfulness and curation -----------------------------------------------------------------


def test_helpfulness_uses_a_prior():
    skill = make_skill("x", successes_with=0, failures_with=1)
    baseline = FamilyStats(family=FAMILY, baseline_episodes=10, baseline_successes=5)
    one_failure = skill.helpfulness(baseline)
    assert one_failure.rate_with == pytest.approx(1 / 3)
    assert one_failure.lower < 0 < one_failure.upper  # one failure proves nothing
    many = make_skill("x", successes_with=2, failures_with=18).helpfulness(baseline)
    assert many.upper < 0


def test_curate_demotes_then_retires_a_harmful_skill(memory):
    harmful = memory.add_skill(make_skill("always answer zero"))
    helpful = memory.add_skill(make_skill("count legs per animal then sum"))
    fresh = memory.add_skill(make_skill("birds have two legs"))
    for index in range(20):
        memory.record_baseline(FAMILY, success=index % 4 != 0)  # 15 / 20 without skills
    for index in range(8):
        memory.record_use([harmful.id], FAMILY, success=index < 4)  # 4 / 8: worse, not yet clearly
        memory.record_use([helpful.id], FAMILY, success=True)
    memory.record_use([fresh.id], FAMILY, success=False)
    decisions = memory.curate(FAMILY)
    assert [(d.skill_id, d.action) for d in decisions] == [(harmful.id, "demote")]
    assert memory.get_skill(harmful.id).demoted
    assert memory.get_skill(harmful.id).status == "active"
    for _ in range(12):
        memory.record_use([harmful.id], FAMILY, success=False)
    decisions = memory.curate(FAMILY)
    assert [(d.skill_id, d.action) for d in decisions] == [(harmful.id, "retire")]
    retired = memory.get_skill(harmful.id)
    assert retired.status == "retired" and retired.uses == 20 and retired.successes_with == 4
    assert retired.status_history[-1].evidence["upper"] < 0
    assert retired.status_history[-1].evidence["baseline_episodes"] == 20
    assert harmful.id not in {s.id for s, _ in memory.search_skills("answer zero", FAMILY)}
    assert memory.curate(FAMILY) == []


def test_demoted_skills_are_retrieved_last(memory):
    near = memory.add_skill(make_skill("spiders eight legs"))
    far = memory.add_skill(make_skill("spiders legs and more words here"))
    memory.update_skill(memory.get_skill(near.id).model_copy(update={"demoted": True}))
    chosen = memory.retrieve("spiders eight legs", FAMILY, token_budget=100, count_tokens=len)
    assert [skill.id for skill in chosen] == [far.id, near.id]


def test_usage_of_unknown_skill_is_skipped_with_a_warning(memory, caplog):
    with caplog.at_level(logging.WARNING, logger="memory.store"):
        memory.add_trajectory(make_trajectory(skill_ids=["ghost"]))
    assert "ghost" in caplog.text
    assert memory.count_trajectories() == 1


# ---- reports ----------------------------------------------------------------------------------


def test_stats_and_export(memory):
    first = memory.add_skill(make_skill("spiders have eight legs", provenance=["t1"]))
    memory.add_skill(make_skill("add the numbers", family=OTHER))
    memory.set_status(first.id, "retired", reason="test")
    memory.add_trajectory(make_trajectory(success=True))
    stats = memory.stats()
    assert stats["trajectories"] == 1
    assert stats["skills"] == {"active": 1, "pending": 0, "folded": 0, "retired": 1}
    assert stats["families"][FAMILY]["retired"] == 1
    assert stats["families"][FAMILY]["baseline_episodes"] == 1
    exported = json.loads(memory.export("json"))
    assert {skill["id"] for skill in exported["skills"]} == {s.id for s in memory.list_skills()}
    assert exported["families"][FAMILY]["baseline_successes"] == 1
    markdown = memory.export("md")
    assert f"## {FAMILY}" in markdown and "> spiders have eight legs" in markdown and "retired" in markdown
    with pytest.raises(ValueError, match="format"):
        memory.export("csv")


# ---- bad input --------------------------------------------------------------------------------


def test_missing_skill_id_names_it_and_the_fix(memory):
    memory.add_skill(make_skill("dogs have four legs"))
    with pytest.raises(SkillNotFound, match=r"'abc123'.*skills list"):
        memory.get_skill("abc123")


def test_skill_text_validation(memory, tmp_path):
    with pytest.raises(InvalidSkill, match="4000"):
        memory.add_skill(make_skill("x" * 4001))
    with pytest.raises(InvalidSkill, match="empty"):
        memory.add_skill(make_skill("   "))
    with pytest.raises(InvalidSkill, match="surrogate"):
        memory.add_skill(make_skill(b"legs \xff".decode("utf-8", "surrogateescape")))
    with pytest.raises(InvalidSkill, match=r"not valid UTF-8: byte 0xff at position 5"):
        validate_skill_text(b"legs \xff")
    with pytest.raises(ValidationError, match="not valid UTF-8"):
        make_skill(b"legs \xff")
    assert make_skill("legs \N{SNOWMAN}".encode()).text == "legs \N{SNOWMAN}"
    assert memory.list_skills() == []  # nothing half-written
    config = MemoryConfig(max_skill_chars=10)
    short = Memory.open(home=tmp_path / "short", embedding=HashingEmbedding(), config=config)
    with pytest.raises(InvalidSkill, match="limit of 10"):
        short.add_skill(make_skill("eleven char"))


def test_a_failed_batch_writes_nothing(memory):
    with pytest.raises(InvalidSkill):
        memory.add_skills([make_skill("fine skill"), make_skill("y" * 5000)])
    assert memory.list_skills() == []


def test_home_that_is_a_file(tmp_path):
    home = tmp_path / "home"
    home.write_text("not a directory")
    with pytest.raises(MemoryStoreError, match=rf"{re.escape(str(home))}.*not a directory"):
        Memory.open(home=home, embedding=HashingEmbedding())
    assert home.read_text() == "not a directory"


def test_missing_home_is_created_or_refused(tmp_path):
    with pytest.raises(MemoryStoreError, match="no skillfold home"):
        Memory.open(home=tmp_path / "absent", embedding=HashingEmbedding(), create=False)
    assert not (tmp_path / "absent").exists()
    Memory.open(home=tmp_path / "absent", embedding=HashingEmbedding())
    assert (tmp_path / "absent" / "chroma").is_dir()


def test_corrupt_store_is_reported_and_left_alone(tmp_path):
    store = tmp_path / "home" / "chroma"
    store.mkdir(parents=True)
    (store / "chroma.sqlite3").write_bytes(b"this is not sqlite" * 10)
    with pytest.raises(MemoryStoreError, match=rf"{re.escape(str(store))}.*corrupt.*Nothing was changed"):
        Memory.open(home=tmp_path / "home", embedding=HashingEmbedding())
    assert (store / "chroma.sqlite3").read_bytes() == b"this is not sqlite" * 10


def test_reopening_with_another_embedding_is_refused(tmp_path):
    Memory.open(home=tmp_path, embedding=HashingEmbedding(dim=64))
    with pytest.raises(MemoryStoreError, match="embedding"):
        Memory.open(home=tmp_path, embedding=_OtherEmbedding())


class _OtherEmbedding(HashingEmbedding):
    @staticmethod
    def name() -> str:
        return "test-other"


def test_open_needs_home_or_url(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        Memory.open(embedding=HashingEmbedding())
    with pytest.raises(ValueError, match="exactly one"):
        Memory.open(home=tmp_path, url="http://127.0.0.1:1", embedding=HashingEmbedding())


# ---- persistence ------------------------------------------------------------------------------


def test_reopen_keeps_everything(tmp_path):
    memory = Memory.open(home=tmp_path, embedding=HashingEmbedding())
    skill = memory.add_skill(make_skill("spiders have eight legs", provenance=["t1"]))
    trajectory = make_trajectory(skill_ids=[skill.id])
    memory.add_trajectory(trajectory)
    memory.record_baseline(FAMILY, success=True)
    del memory
    SharedSystemClient.clear_system_cache()  # drop the in-process client: read from disk again
    reopened = Memory.open(home=tmp_path, embedding=HashingEmbedding())
    expected = skill.model_copy(update={"successes_with": 1})
    assert reopened.get_skill(skill.id).model_dump() == expected.model_dump()
    assert reopened.get_trajectory(trajectory.id).model_dump() == trajectory.model_dump()
    assert reopened.family_stats(FAMILY).baseline_episodes == 1
    assert reopened.search_skills("spiders", FAMILY)[0][0].id == skill.id


def test_skill_record_round_trips_through_chroma_layout_and_reads_schema_1():
    from memory.records import skill_from_chroma, skill_to_chroma

    skill = Skill(kind="rule", family="rg:x", title="t", text="do this", provenance=["a", "b"], successes_with=3)
    skill_id, document, metadata = skill_to_chroma(skill)
    assert set(metadata) == {"schema", "family", "kind", "status", "demoted", "text_sha256", "record"}
    assert skill_from_chroma(skill_id, document, metadata) == skill
    old_layout = {  # schema 1: one metadata key per field
        "schema": 1, "family": "rg:x", "kind": "rule", "title": "t", "status": "active", "demoted": False,
        "successes_with": 3, "failures_with": 0, "uses": 3, "text_sha256": metadata["text_sha256"],
        "created_at": skill.created_at.isoformat(), "updated_at": skill.updated_at.isoformat(),
        "provenance": '["a", "b"]', "versions": "[]", "status_history": "[]",
    }
    assert skill_from_chroma(skill_id, document, old_layout) == skill
