"""Protection by default (agent.protection): what a fold keeps, the retention check, and `skillfold fold` with it."""

import json
from pathlib import Path

import pytest

from agent.config import GENERAL_SET, ProtectionSettings
from agent.protection import (
    RETENTION,
    FamilyRetention,
    RetentionCheck,
    check_after,
    gate_window,
    measure_before,
    protected_families,
    scored,
)
from engines.base import SamplingParams
from envs import make_family
from envs.base import EnvSpecError
from envs.general import GeneralFamily
from memory import HashingEmbedding, Memory, Skill
from tests.fakes import ScriptedEngine


def memory_with(tmp_path, *families):
    memory = Memory.open(home=tmp_path / "home", embedding=HashingEmbedding())
    for family in families:
        memory.add_skill(Skill(kind="rule", family=family, text=f"a skill of {family}"))
    return memory


def test_the_general_family_is_disjoint_unscored_and_one_turn():
    family = make_family("general")
    assert isinstance(family, GeneralFamily) and family.scored is False
    train = {family.make("train", i).initial_observation()[0].content for i in range(family.split_size("train"))}
    evals = {family.make("eval", i).initial_observation()[0].content for i in range(family.split_size("eval"))}
    assert len(train) == family.split_size("train") == 800 and len(evals) == 160 and not train & evals
    step = family.make("eval", 0).step("Here is an answer.")
    assert step.done and step.reward == 0.0 and step.reward < family.success_threshold
    with pytest.raises(EnvSpecError, match="no argument"):
        make_family("general:x")


def test_protected_families_are_the_memory_and_the_general_set_minus_what_the_fold_trains(tmp_path):
    memory = memory_with(tmp_path, "toy:1", "toy:2")
    on = protected_families(memory, {"toy:1"}, [], ProtectionSettings())
    assert list(on) == [*GENERAL_SET, "toy:2"]
    assert list(scored(on)) == ["rg:basic_arithmetic", "rg:letter_counting", "toy:2"]  # not the unscored `general`
    # a named anchor is kept whatever the settings say; nothing else with protection off
    assert list(protected_families(memory, {"toy:1"}, ["toy:3"], ProtectionSettings(enabled=False))) == ["toy:3"]
    assert list(protected_families(memory, {"toy:1"}, [], ProtectionSettings(memory_families=False, general=[]))) == []
    # a family the fold trains is never its own anchor, even when named or in the general set
    trained_too = protected_families(memory, {"toy:1", "rg:letter_counting"}, ["toy:1"], ProtectionSettings())
    assert "toy:1" not in trained_too and "rg:letter_counting" not in trained_too
    with pytest.raises(EnvSpecError):
        protected_families(memory, set(), [], ProtectionSettings(general=["nope:x"]))


def test_a_family_in_memory_that_cannot_be_made_is_skipped_with_a_warning(tmp_path, caplog):
    memory = memory_with(tmp_path, "toy:1", "gone_plugin.py:Family")
    found = protected_families(memory, set(), [], ProtectionSettings(general=[]))
    assert list(found) == ["toy:1"]
    assert "gone_plugin.py:Family" in caplog.text


def test_the_gate_uses_the_last_eval_items():
    toy = make_family("toy:1")  # 16 eval words
    assert gate_window(toy, 4) == (12, 4) and gate_window(toy, 64) == (0, 16)


def knows(words_known: set[str] | None):
    """An engine that repeats the asked word when it knows it; `None` knows every word."""
    def respond(chat):
        word = chat[-1]["content"].rsplit(":", 1)[-1].strip()
        return word if words_known is None or word in words_known else "no idea"
    return respond


def test_the_retention_check_passes_within_the_tolerance_and_fails_beyond_it(tmp_path):
    toy = make_family("toy:1")
    families = {toy.name: toy}
    settings = ProtectionSettings(gate_items=16, tolerance=0.10)
    sampling = SamplingParams(max_new_tokens=4)
    engine = ScriptedEngine(knows(None))
    engine.load_adapter("start")
    before = measure_before(engine, families, settings, tmp_path / "a", sampling)
    assert [(r.family, r.first_item, r.items, r.before) for r in before.families] == [("toy:1", 0, 16, 16)]
    assert json.loads((tmp_path / "a" / RETENTION).read_text())["passed"] is None

    served, load = [], engine.load_adapter
    engine.load_adapter = lambda path: (served.append(path), load(path))
    all_but_one = {word for word in ("orange valley pebble thunder cedar falcon violin lantern meadow comet copper "
                                     "canyon bucket mirror ginger").split()}  # granite forgotten: 15/16
    engine.respond = knows(all_but_one)
    kept = check_after(engine, before, families, settings, tmp_path / "a", "new", sampling)
    assert kept.passed and kept.promoted and kept.families[0].after == 15
    assert engine.adapter == "start" and served == ["new", "start"]  # measured with "new", then "start" again

    strict = ProtectionSettings(gate_items=16, tolerance=0.03)
    engine.respond = knows(None)
    before = measure_before(engine, families, strict, tmp_path / "b", sampling)
    engine.respond = knows(all_but_one)
    failed = check_after(engine, before, families, strict, tmp_path / "b", "new", sampling)
    assert failed.passed is False and not failed.promoted and [r.family for r in failed.failures()] == ["toy:1"]
    assert "FAILED" in failed.summary() and "not promoted" in failed.summary()
    # measured once: a resumed fold reads the verdict back, and --force promotes it with the evidence kept
    engine.respond = lambda chat: pytest.fail("nothing is measured again")
    assert measure_before(engine, families, strict, tmp_path / "b", sampling) == failed
    forced = check_after(engine, failed, families, strict.model_copy(update={"force": True}), tmp_path / "b", "new",
                         sampling)
    assert forced.promoted and forced.forced and forced.passed is False
    assert RetentionCheck.model_validate_json((tmp_path / "b" / RETENTION).read_text()) == forced


def test_a_failed_check_falls_back_to_the_newest_checkpoint_that_passes(tmp_path):
    """The fold's last adapter forgets 5 of 16 words; the adapters its checkpoints kept forget fewer, the older."""
    toy = make_family("toy:1")
    families = {toy.name: toy}
    words = ("orange valley pebble thunder cedar falcon violin lantern meadow comet copper canyon bucket mirror "
             "ginger granite").split()
    forgets = {"last": 5, "step-000005": 0, "step-000010": 1, "step-000015": 3, "step-000020": 5}
    engine = ScriptedEngine(lambda chat: "")
    engine.respond = lambda chat: knows(set(words[forgets.get(Path(engine.adapter or "-").name, 0):]))(chat)
    sampling = SamplingParams(max_new_tokens=4)
    settings = ProtectionSettings(gate_items=16, tolerance=0.10)  # 1 of 16 may go, not 2

    def check(settings, name):
        run_dir = tmp_path / name
        for step in (5, 10, 15, 20):  # step 20 is the fold's last adapter: not measured twice
            (run_dir / "snapshots" / f"step-{step:06d}").mkdir(parents=True)
            (run_dir / "snapshots" / f"step-{step:06d}" / "adapter_config.json").write_text("{}")
        (run_dir / "snapshots" / "step-000025").mkdir()  # no adapter_config.json: not an adapter, never tried
        before = measure_before(engine, families, settings, run_dir, sampling)
        return check_after(engine, before, families, settings, run_dir, "last", sampling, steps=20)

    chosen = check(settings, "a")
    assert chosen.passed and chosen.promoted and chosen.step == 10 and chosen.families[0].after == 15
    assert chosen.adapter_after == str(tmp_path / "a" / "snapshots" / "step-000010")
    assert [(a.step, a.after["toy:1"], a.passed) for a in chosen.attempts] == [
        (None, 11, False), (15, 13, False), (10, 15, True)]
    assert "with the adapter of step 10" in chosen.summary() and "toy:1 100.0% -> 68.8%" in chosen.summary()
    assert engine.adapter is None  # the adapter the fold started from (none) is served again
    assert check(settings.model_copy(update={"tolerance": 0.0}), "b").step == 5  # the oldest, the last resort
    for name, off in (("c", {"fallback": False}), ("d", {"force": True})):  # the last adapter's verdict alone
        verdict = check(settings.model_copy(update=off), name)
        assert verdict.passed is False and verdict.step is None and verdict.adapter_after == "last"
        assert [a.step for a in verdict.attempts] == [None] and verdict.promoted == (name == "d")
    forgets |= {"step-000010": 2, "step-000005": 2}
    failed = check(settings, "e")  # none passes: the verdict is the last adapter's, every one tried
    assert failed.passed is False and failed.step is None and failed.adapter_after == "last"
    assert [a.step for a in failed.attempts] == [None, 15, 10, 5] and failed.families[0].after == 11
    assert "FAILED" in failed.summary()
    assert RetentionCheck.model_validate_json((tmp_path / "e" / RETENTION).read_text()) == failed


def test_the_check_is_off_without_protection_or_gate(tmp_path):
    engine = ScriptedEngine(knows(None))
    toy = {"toy:1": make_family("toy:1")}
    for settings in (ProtectionSettings(enabled=False), ProtectionSettings(gate=False)):
        assert measure_before(engine, toy, settings, tmp_path, SamplingParams()) is None
    assert not (tmp_path / RETENTION).exists()


def test_a_drop_of_exactly_the_tolerance_passes():
    row = FamilyRetention(family="f", first_item=0, items=100, before=50, after=47)
    check = RetentionCheck(tolerance=0.03, adapter_before=None, families=[row], passed=True)
    assert row.drop == pytest.approx(0.03) and check.failures() == []
    worse = row.model_copy(update={"after": 46})
    assert check.model_copy(update={"families": [worse]}).failures() == [worse]


def test_skillfold_fold_keeps_latest_when_the_check_fails_and_force_promotes(model_dir, tmp_path, monkeypatch):
    """The real fold on the tiny model; the check's accuracies scripted (a random model's are noise): with the
    new adapter, the protected family loses 10 of 16 items."""
    import torch

    import agent.protection
    from tests.unit.test_cli import flat, invoke, last_json

    monkeypatch.setattr(torch, "set_num_threads", lambda _: None)
    monkeypatch.setattr(agent.protection, "_successes",
                        lambda engine, family, first, items, *rest: items - (10 if engine.adapter else 0))
    home = tmp_path / "home"
    Memory.open(home=home).add_skills([Skill(kind="rule", family="toy:1", title="repeat the word",
                                             text="Repeat the asked word exactly, and nothing else.")])
    command = ["fold", "--model", model_dir, "--home", home, "--run-id", "f", "--steps", 1, "--json",
               "items_per_family=2", "probes=0", "fold.batch_size=2", "fold.max_turns=1",
               "fold.sampling.max_new_tokens=4", "protection.general=[general, toy:2]", "protection.gate_items=16"]
    failed = invoke(*command)
    assert failed.exit_code == 1, failed.output
    result = json.loads(failed.stdout.splitlines()[-1])
    assert result["promoted"] is False and result["retention"]["families"][0] | {"after": None} == {
        "family": "toy:2", "first_item": 0, "items": 16, "before": 16, "after": None}
    assert result["retention"]["families"][0]["after"] == 6
    out = flat(failed.stderr + failed.stdout)
    assert "protected (anchors): general, toy:2" in out and "retention check FAILED (toy:2 100.0% -> 37.5%" in out
    assert "--run-id f --resume --force" in out
    adapters = home / "adapters"
    assert (adapters / "f" / "adapter_config.json").is_file() and not (adapters / "LATEST").exists()
    assert not json.loads((home / "folds" / "f" / RETENTION).read_text())["passed"]

    forced = last_json(invoke(*command, "--resume", "--force"))
    assert forced["promoted"] and forced["retention"]["forced"]
    assert (adapters / "LATEST").read_text().strip() == "f"

    unprotected = last_json(invoke(*command[:6], "g", *command[7:], "--no-protect"))
    assert unprotected["promoted"] and unprotected["retention"] is None
    assert (adapters / "LATEST").read_text().strip() == "g"


def test_skillfold_fold_promotes_the_newest_checkpoint_that_passes(model_dir, tmp_path, monkeypatch):
    """The real 2-step fold on the tiny model, a checkpoint every step; the check scripted: the last adapter
    loses 10 of 16 items, step 1's adapter none. Step 1's adapter is registered and promoted."""
    import torch

    import agent.protection
    from tests.unit.test_cli import flat, invoke

    monkeypatch.setattr(torch, "set_num_threads", lambda _: None)
    monkeypatch.setattr(agent.protection, "_successes", lambda engine, family, first, items, *rest:
                        items - (10 if engine.adapter and "snapshots" not in engine.adapter else 0))
    home = tmp_path / "home"
    Memory.open(home=home).add_skills([Skill(kind="rule", family="toy:1", title="repeat the word",
                                             text="Repeat the asked word exactly, and nothing else.")])
    done = invoke("fold", "--model", model_dir, "--home", home, "--run-id", "f", "--steps", 2, "--json",
                  "items_per_family=2", "probes=0", "fold.batch_size=2", "fold.max_turns=1", "fold.checkpoint_every=1",
                  "fold.sampling.max_new_tokens=4", "protection.general=[toy:2]", "protection.gate_items=16")
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout.splitlines()[-1])
    run_dir = home / "folds" / "f"
    assert result["promoted"] and result["retention"]["step"] == 1 and result["adapter"] == str(home / "adapters" / "f")
    assert [(a["step"], a["passed"]) for a in result["retention"]["attempts"]] == [(None, False), (1, True)]
    assert "with the adapter of step 1" in flat(done.stderr + done.stdout) and (home / "adapters" / "LATEST").read_text() == "f\n"
    registered = (home / "adapters" / "f" / "adapter_model.safetensors").read_bytes()
    assert registered == (run_dir / "step-000001" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert registered != (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()  # the last, not promoted
