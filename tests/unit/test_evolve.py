"""The evolve loop on a scripted agent and the toy families: folds, status changes with evidence, resume.

The scripted agent knows the words a-m alone, every word with a worked example (or its own earlier
turn) in its prompt, and every word under an adapter whose `knows.json` says so. The scripted fold
writes such adapters: fold n knows everything iff `lessons[n - 1]`. So memory-on accuracy, memory-off
accuracy and what a fold did are all known in advance.
"""

import json
from pathlib import Path

import pytest

from agent.config import ConfigError, LoopSettings, ProtectionSettings
from agent.evolve import (
    FoldRule,
    FoldSchedule,
    Phase,
    Stream,
    StreamSettings,
    check_stream,
    chunk_sizes,
    evolve_phase,
    load_state,
    read_events,
    run_evolve,
    stream_families,
)
from engines.base import SamplingParams
from learners.fold import FoldConfig, FoldResult
from memory import HashingEmbedding, Memory, Skill
from tests.fakes import ScriptedEngine

ASSESS_ITEMS = 8  # eval words 0-7: orange valley pebble thunder cedar falcon violin lantern (3 of 8 are a-m)


class Killed(RuntimeError):
    pass


class World:
    def __init__(self, crash_after: int | None = None) -> None:
        self.engine = ScriptedEngine(self.respond)
        self.calls = 0
        self.crash_after = crash_after

    def respond(self, chat) -> str:
        self.calls += 1
        if self.crash_after is not None and self.calls > self.crash_after:
            raise Killed(f"killed at call {self.calls}")
        word = chat[-1]["content"].rsplit(":", 1)[-1].strip()
        helped = any(message["role"] == "assistant" for message in chat)
        adapter = self.engine.adapter
        folded_in = bool(adapter) and json.loads((Path(adapter) / "knows.json").read_text())
        return word if helped or folded_in or word[0] <= "m" else "no idea"


def scripted_fold(lessons: list[bool]):
    """A stand-in for learners.fold.fold; `.calls` lists (skilled families, anchor families) per fold."""
    calls: list[tuple[list[str], list[str]]] = []

    def fake(engine, families, items, config, run_dir, *, resume=False, on_step=None):
        calls.append((sorted({i.family for i in items if not i.anchor}), sorted({i.family for i in items if i.anchor})))
        adapter = Path(run_dir) / "adapter"
        adapter.mkdir(parents=True, exist_ok=True)
        (adapter / "adapter_config.json").write_text("{}")
        (adapter / "knows.json").write_text(json.dumps(lessons[len(calls) - 1]))
        engine.load_adapter(str(adapter))
        return FoldResult(steps=config.steps, loss_first=1.0, loss_last=0.5, kl_first=1.0, kl_last=0.5,
                          adapter=str(adapter), run_dir=str(run_dir), seconds=0.0)

    fake.calls = calls
    return fake


def settings(**overrides) -> StreamSettings:
    values = dict(
        phases=[Phase(family="toy:1"), Phase(family="toy:2")], episodes=4, assess_items=ASSESS_ITEMS,
        loop=LoopSettings(batch_size=4, probes=4, reflect_every=0, sampling=SamplingParams(), max_turns=2),
        fold=FoldConfig(steps=1, batch_size=2), items_per_family=4,
        # these tests are about the stream's own mechanics; protection has tests of its own below
        protection=ProtectionSettings(enabled=False),
    )
    values.update(overrides)
    return StreamSettings(**values)


def make_stream(home: Path, world: World, fold_fn, **overrides) -> Stream:
    stream_settings = settings(**overrides)
    memory = Memory.open(home=home, embedding=HashingEmbedding())
    return Stream(engine=world.engine, memory=memory, settings=stream_settings,
                  families=stream_families(stream_settings), home=home, fold_fn=fold_fn)


def test_fold_rule_boundaries():
    rule = FoldRule(margin=0.05, regression_tolerance=0.10)
    assert rule.folds(0.70, 0.75) and not rule.folds(0.69, 0.75)
    assert not rule.folds(0.0, 0.0)  # a family nothing was learned for is never folded
    assert FoldRule(threshold=0.5).folds(0.5, 0.9) and not FoldRule(threshold=0.6).folds(0.5, 0.9)
    assert rule.regressed(0.79, 0.90) and not rule.regressed(0.80, 0.90)


def test_folded_skills_leave_the_prompt_and_come_back_when_the_weights_regress(tmp_path):
    world, fold_fn = World(), scripted_fold([True, False])
    stream = make_stream(tmp_path / "home", world, fold_fn)
    memory = stream.memory
    evolve_phase(stream, 0)
    folded = memory.list_skills(family="toy:1", status="folded")
    assert folded and not memory.list_skills(family="toy:1", status="active")
    change = folded[0].status_history[-1]
    assert change.status == "folded"
    assert change.evidence == {"accuracy_off": 1.0, "accuracy_on": 1.0, "successes": ASSESS_ITEMS,
                               "items": ASSESS_ITEMS, "adapter": str(tmp_path / "home" / "adapters" / "evolve-fold-1"),
                               "phase": 0, "fold": 1}
    assert memory.retrieve("Say the word: apple", "toy:1", 600, len) == []  # only active skills are retrieved
    assert world.engine.adapter.endswith("evolve-fold-1")

    state = evolve_phase(stream, 1)  # fold 2 forgets: toy:1 falls to the a-m words without memory
    assert (state.phase, state.folds) == (2, 2)
    back = memory.list_skills(family="toy:1", status="active")
    assert {skill.id for skill in back} == {skill.id for skill in folded}
    assert [change.status for change in back[0].status_history] == ["active", "folded", "active"]
    admitted = back[0].status_history[0]  # its admission evidence: the probe items with and without it
    assert admitted.reason.startswith("admitted") and set(admitted.evidence) == {
        "skill_id", "admitted", "successes_with", "successes_without", "probes"}
    evidence = back[0].status_history[-1].evidence
    assert (evidence["accuracy_off"], evidence["folded_accuracy_off"], evidence["phase"]) == (3 / 8, 1.0, 1)
    assert not memory.list_skills(family="toy:2", status="folded")  # 3/8 off vs 8/8 on: not folded
    changes = [(e.kind, e.family, e.phase) for e in read_events(stream.run_dir) if e.kind in ("folded", "unfolded")]
    assert changes == [("folded", "toy:1", 0), ("unfolded", "toy:1", 1)]
    # fold 2 distils toy:2 and keeps toy:1 (nothing active then) as an anchor
    assert fold_fn.calls == [(["toy:1"], []), (["toy:2"], ["toy:1"])]


PROTECTED = ProtectionSettings(general=[], gate_items=16)  # the memory's families; all 16 toy eval words


def test_a_fold_that_damages_a_protected_family_is_kept_but_not_served(tmp_path):
    world, fold_fn = World(), scripted_fold([True, False])
    stream = make_stream(tmp_path / "home", world, fold_fn, protection=PROTECTED)
    state = run_evolve(stream)
    # fold 2 forgets toy:1 (folded by fold 1): 16/16 eval words before it, 11/16 (the a-m ones) after
    assert (state.folds, Path(state.adapter).name) == (2, "evolve-fold-1")
    assert Path(world.engine.adapter).name == "evolve-fold-1"
    adapters = tmp_path / "home" / "adapters"
    assert (adapters / "LATEST").read_text().strip() == "evolve-fold-1" and (adapters / "evolve-fold-2").is_dir()
    first, second = [e.evidence for e in read_events(stream.run_dir) if e.kind == "fold"]
    assert first["promoted"] and first["retention"]["families"] == []  # nothing else in memory yet
    assert second["promoted"] is False
    assert [(f["family"], f["first_item"], f["items"], f["before"], f["after"])
            for f in second["retention"]["families"]] == [("toy:1", 0, 16, 16, 11)]
    # toy:1 was protected in fold 2: an anchor of its replay, and its skills stay folded (the weights kept them)
    assert fold_fn.calls == [(["toy:1"], []), (["toy:2"], ["toy:1"])]
    assert stream.memory.list_skills(family="toy:1", status="folded")
    assert not [e for e in read_events(stream.run_dir) if e.kind == "unfolded"]
    saved = json.loads((tmp_path / "home" / "folds" / "evolve-fold-2" / "retention.json").read_text())
    assert saved["passed"] is False and saved["forced"] is False


def test_force_serves_a_fold_that_fails_its_retention_check(tmp_path):
    world = World()
    stream = make_stream(tmp_path / "home", world, scripted_fold([True, False]),
                         protection=PROTECTED.model_copy(update={"force": True}))
    state = run_evolve(stream)
    assert Path(state.adapter).name == "evolve-fold-2"
    second = [e.evidence for e in read_events(stream.run_dir) if e.kind == "fold"][1]
    assert second["promoted"] and second["retention"]["passed"] is False and second["retention"]["forced"]
    assert [e.kind for e in read_events(stream.run_dir)].count("unfolded") == 1  # the regression is then caught


@pytest.mark.parametrize("crash_after", [70, 85, 100, 110])  # phase 2 loop, fold 2: check before, after (x2)
def test_a_killed_protected_run_resumes_with_the_same_verdicts(tmp_path, crash_after):
    straight = make_stream(tmp_path / "straight", World(), scripted_fold([True, False]), protection=PROTECTED)
    run_evolve(straight)
    expected = _outcome(straight)
    fold_fn = scripted_fold([True, False])
    with pytest.raises(Killed):
        run_evolve(make_stream(tmp_path / "killed", World(crash_after=crash_after), fold_fn, protection=PROTECTED))
    resumed = make_stream(tmp_path / "killed", World(), fold_fn, protection=PROTECTED)
    state = run_evolve(resumed)
    assert _outcome(resumed) == expected and Path(state.adapter).name == "evolve-fold-1"
    assert len(fold_fn.calls) == 2


def test_a_fold_that_never_marks_skills_folded(tmp_path):
    stream = make_stream(tmp_path / "home", World(), scripted_fold([True, True]), rule=FoldRule(mark_folded=False))
    state = run_evolve(stream)
    assert state.folds == 2
    assert stream.memory.list_skills(status="folded") == []
    assert [e.kind for e in read_events(stream.run_dir)] == ["trained", "fold", "trained", "fold"]


def _outcome(stream: Stream) -> dict:
    events = read_events(stream.run_dir)
    return {
        "events": [(e.kind, e.family, e.phase, e.chunk) for e in events],
        "statuses": {name: sorted(skill.status for skill in stream.memory.list_skills(family=name))
                     for name in ("toy:1", "toy:2")},
        "episodes": stream.memory.count_trajectories(),
        "state": load_state(stream.run_dir).model_dump(exclude={"adapter"}),
    }


@pytest.mark.parametrize("crash_after", [6, 20, 30, 60, 90])  # loop, measure, assess, loop, assess
def test_a_killed_run_resumes_without_repeating_a_stage(tmp_path, crash_after):
    straight_fold = scripted_fold([True, False])
    straight = make_stream(tmp_path / "straight", World(), straight_fold)
    run_evolve(straight)
    expected = _outcome(straight)

    fold_fn = scripted_fold([True, False])
    with pytest.raises(Killed):
        run_evolve(make_stream(tmp_path / "killed", World(crash_after=crash_after), fold_fn))
    resumed = make_stream(tmp_path / "killed", World(), fold_fn)
    run_evolve(resumed)
    assert _outcome(resumed) == expected
    assert len(fold_fn.calls) == 2  # a registered fold is never run again


def test_folds_every_n_episodes_in_chunks_that_resume_where_they_stopped(tmp_path):
    schedule = FoldSchedule(every="episodes", episodes=3)
    assert chunk_sizes(settings(schedule=schedule, episodes=7), 0) == [3, 3, 1]
    stream = make_stream(tmp_path / "home", World(), scripted_fold([True, True]), schedule=FoldSchedule(
        every="episodes", episodes=2), phases=[Phase(family="toy:1")])
    state = run_evolve(stream)
    assert state.folds == 2
    kinds = [(e.kind, e.chunk) for e in read_events(stream.run_dir) if e.kind in ("trained", "fold")]
    assert kinds == [("trained", 0), ("fold", 0), ("trained", 1), ("fold", 1)]
    items = sorted(t.item_id for t in stream.memory.list_trajectories(split="train", limit=None))
    assert items == ["train-0", "train-1", "train-2", "train-3"]  # chunk 2 starts where chunk 1 ended


def test_a_budget_schedule_folds_only_past_the_budget(tmp_path):
    never = make_stream(tmp_path / "a", World(), scripted_fold([True]), phases=[Phase(family="toy:1")],
                        schedule=FoldSchedule(every="budget", episodes=2, skill_budget=50))
    assert run_evolve(never).folds == 0
    tight = make_stream(tmp_path / "b", World(), scripted_fold([True, True]), phases=[Phase(family="toy:1")],
                        schedule=FoldSchedule(every="budget", episodes=2, skill_budget=1))
    assert run_evolve(tight).folds >= 1


def test_stream_config_errors_name_the_fix():
    toy = stream_families(settings())
    with pytest.raises(ConfigError, match="toy:1 has 12 train items"):
        check_stream(settings(episodes=13), toy, eval_needed=4)
    with pytest.raises(ConfigError, match="toy:1 has 16 eval items but 20 are needed"):
        check_stream(settings(), toy, eval_needed=20)


def test_evolve_with_the_real_fold_on_a_tiny_model(tiny_engine, tmp_path):
    home = tmp_path / "home"
    memory = Memory.open(home=home, embedding=HashingEmbedding())
    memory.add_skill(Skill(kind="exemplar", family="toy:1", text="### user\nSay the word: apple\n### assistant\napple"))
    stream_settings = settings(
        phases=[Phase(family="toy:1")], episodes=2, assess_items=2, items_per_family=4,
        loop=LoopSettings(batch_size=2, probes=2, reflect_every=0, max_turns=1, max_candidates_per_batch=0,
                          sampling=SamplingParams(temperature=1.0, max_new_tokens=4),
                          probe_sampling=SamplingParams(max_new_tokens=4)),
        fold=FoldConfig(steps=2, batch_size=2, lora_rank=4, lora_alpha=8, sampling={"temperature": 1.0, "max_new_tokens": 4}),
        eval_sampling=SamplingParams(max_new_tokens=4),
    )
    stream = Stream(engine=tiny_engine, memory=memory, settings=stream_settings,
                    families=stream_families(stream_settings), home=home)
    state = run_evolve(stream)
    adapter = home / "adapters" / "evolve-fold-1"
    assert state.folds == 1 and state.adapter == str(adapter)
    assert tiny_engine.adapter == str(adapter) and (adapter / "adapter_config.json").is_file()
    fold_event = next(e for e in read_events(stream.run_dir) if e.kind == "fold")
    assert fold_event.evidence["families"] == ["toy:1"] and fold_event.evidence["steps"] == 2
    assert fold_event.evidence["generated_tokens"] > 0
    # a random model solves nothing, so nothing counts as learned
    assert memory.list_skills(family="toy:1", status="folded") == []


def test_fold_items_give_every_item_the_same_context_when_they_retrieve_the_same_skills(tmp_path):
    from datetime import timedelta

    from agent.folding import fold_items
    from envs import make_family

    memory = Memory.open(home=tmp_path / "home", embedding=HashingEmbedding())
    family = make_family("toy")
    first = Skill(kind="rule", family=family.name, text="zebra zebra: answer the word")
    texts = ["say the word you are asked for", "the word is in the question: copy it"]
    later = [Skill(kind="rule", family=family.name, text=text, created_at=first.created_at + timedelta(seconds=n + 1))
             for n, text in enumerate(texts)]
    for skill in [later[1], first, later[0]]:
        memory.add_skill(skill)
    engine = ScriptedEngine(lambda chat: "")
    items = fold_items(memory, engine, {family.name: family}, {}, items_per_family=8, probes=2, k=3)
    contexts = {tuple(message.content for message in item.context) for item in items}
    assert len(items) == 8 and len(contexts) == 1  # one context, whatever each item's similarity order
    (context,) = contexts
    assert [i for i, text in enumerate([first.text, *texts]) if any(text in part for part in context)] == [0, 1, 2]
    joined = "\n".join(context)
    assert joined.index(first.text) < joined.index(texts[0]) < joined.index(texts[1])  # oldest first
    # the held-out evaluation renders them the same way: the fold's teacher sees what evaluation shows
    from agent.evaluate import memory_contexts

    evaluated = {tuple(m.content for m in context) for context, _ in memory_contexts(engine, memory, family, 8, 600, 3)}
    assert evaluated == contexts
