"""Adapters routed by memory: `engines.routed.RoutedEngine` on the HF engine (groups of prompts, each with its
adapter; the switches counted), `agent.routing` (the routes table, the memory's vote, the base model for
prompts no family matches), multi-turn episodes routed the same way on every turn, and the experiment's
routed arm (one adapter per phase, routed evaluation, the report's routing table, resume)."""

import json
from pathlib import Path

import pytest
import torch

from agent.routing import MemoryRouter, Routes, task_query
from engines.base import AdapterError, SamplingParams
from engines.hf import HFEngine
from engines.routed import RoutedEngine
from envs import make_family
from learners.rollout import run_episodes
from memory import HashingEmbedding, Memory
from memory.records import Skill
from tests.tiny import build_model

PROMPTS = [[{"role": "user", "content": f"say {word}"}] for word in ("red", "blue", "green", "gold", "grey", "pink")]


def save_adapter(tokenizer, path: Path, seed: int) -> str:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(build_model(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture()
def two_adapters(tiny_tokenizer, tmp_path):
    return save_adapter(tiny_tokenizer, tmp_path / "a", 1), save_adapter(tiny_tokenizer, tmp_path / "b", 2)


def test_each_prompt_is_served_its_routes_adapter_in_groups(tiny_tokenizer, two_adapters):
    first, second = two_adapters
    routes = [first, None, second, first, second, None]
    params = SamplingParams(max_new_tokens=6)
    plain = HFEngine(build_model(tiny_tokenizer), tiny_tokenizer, batch_size=8)
    expected = []
    for prompt, adapter in zip(PROMPTS, routes, strict=True):  # each prompt alone, its adapter loaded
        if adapter is None:
            plain.unload_adapter()
        else:
            plain.load_adapter(adapter)
        expected.append(plain.generate([prompt], params)[0].token_ids)
    assert len({tuple(ids) for ids in expected}) > 1  # the adapters change what is generated

    inner = HFEngine(build_model(tiny_tokenizer), tiny_tokenizer, batch_size=8)
    table = {tuple(map(tuple, (m.items() for m in prompt))): adapter for prompt, adapter in zip(PROMPTS, routes,
                                                                                                   strict=True)}
    routed = RoutedEngine(inner, lambda chat: table[tuple(map(tuple, (m.items() for m in chat)))])
    out = routed.generate(PROMPTS, params)
    assert [generation.token_ids for generation in out] == expected  # in the prompts' order
    assert routed.stats.switches == 2 and not routed.stats.per_request  # None is served already: a, then b
    assert inner.adapter == second and routed.adapter is None
    routed.generate(PROMPTS, params)
    assert routed.stats.switches == 2 + 2  # b first (served), then None, then a
    assert routed.stats.prompts == {first: 4, second: 4, None: 4} and routed.stats.switch_seconds > 0
    with pytest.raises(AdapterError, match="route"):
        routed.load_adapter(first)
    with pytest.raises(AdapterError, match="route"):
        routed.unload_adapter()


def test_a_route_table_on_disk(tmp_path):
    routes = Routes(tmp_path)
    assert routes.read() == {}
    routes.set("rg:a", "/x/a")
    routes.set("rg:b", "/x/b")
    routes.set("rg:a", "/x/a2")  # a later fold of the family replaces its adapter
    assert routes.read() == {"rg:a": "/x/a2", "rg:b": "/x/b"}
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / "routes.json").write_text("{broken")
    with pytest.raises(ValueError, match="remove it and fold again"):
        routes.read()


def test_task_query_is_the_prompt_before_the_first_answer():
    chat = [{"role": "system", "content": "rules"}, {"role": "user", "content": "count the r in strawberry"},
            {"role": "assistant", "content": "3"}, {"role": "user", "content": "wrong, again"}]
    assert task_query(chat) == "count the r in strawberry"
    assert task_query(chat[:2]) == task_query(chat)  # every turn of an episode asks the same


def skill(family: str, text: str) -> Skill:
    return Skill(kind="rule", family=family, title=text[:20], text=text)


@pytest.fixture()
def library(tmp_path):
    memory = Memory.open(home=tmp_path / "home", embedding=HashingEmbedding())
    memory.add_skills([skill("letters", "count the letters of a word one by one, then answer the count"),
                       skill("letters", "spell the word letter by letter and count each letter"),
                       skill("sums", "add the numbers with the calculator: calc(a + b + c)"),
                       skill("sums", "sum of numbers: call calc with the whole sum of the numbers"),
                       skill("plain", "translate the sentence word for word into french")])
    return memory


def test_the_memory_routes_a_prompt_to_the_family_of_its_nearest_skills(library):
    routes = {"letters": "/adapters/letters", "sums": "/adapters/sums"}
    router = MemoryRouter(library, routes, k=3, max_distance=0.95)
    assert router.family_for("how many letters r in the word strawberry? count the letters") == "letters"
    assert router.family_for("what is the sum of the numbers 4 + 9 + 12?") == "sums"
    letters = [{"role": "user", "content": "count the letters in the word banana"}]
    assert router(letters) == "/adapters/letters"
    assert router([*letters, {"role": "assistant", "content": "6"}, {"role": "user", "content": "no"}]) == \
        "/adapters/letters"  # the same route on a later turn, from the cache
    assert router.decisions == {"letters": 1}
    # a family with no adapter, and a prompt near no skill: the base model
    assert MemoryRouter(library, routes, max_distance=0.95)([{"role": "user", "content": "translate the sentence "
                                                                                        "into french word for word"}]) is None
    far = MemoryRouter(library, routes, max_distance=0.05)
    assert far.family_for("zebra quantum oboe") is None and far([{"role": "user", "content": "zebra"}]) is None
    retired = library.list_skills(family="sums")
    for item in retired:
        library.set_status(item.id, "retired", reason="test")
    assert router.family_for("what is the sum of the numbers 4 + 9 + 12?") != "sums"  # retired skills do not vote


def test_a_multi_turn_episode_keeps_its_route_on_every_turn(tiny_tokenizer, two_adapters):
    first, second = two_adapters
    family = make_family("toy:3")
    seen = []

    def route(chat):
        adapter = first if "apple" in task_query(chat) else second
        seen.append((task_query(chat), adapter))
        return adapter

    engine = RoutedEngine(HFEngine(build_model(tiny_tokenizer), tiny_tokenizer, batch_size=8), route)
    trajectories = run_episodes(engine, [family.make("train", index) for index in range(3)],
                                SamplingParams(max_new_tokens=3), split="train", max_turns=3)
    assert all(len(trajectory.turns) == 3 for trajectory in trajectories)
    by_query = {}
    for query, adapter in seen:
        by_query.setdefault(query, set()).add(adapter)
    assert len(by_query) == 3 and all(len(adapters) == 1 for adapters in by_query.values())
    assert engine.stats.switches <= 2 * 3  # at most a switch per adapter group per turn


def test_the_experiments_routed_arm_folds_each_phase_alone_and_routes_its_evaluation(tmp_path):
    from agent.experiment import ExperimentConfig, RoutingSettings, run_experiment
    from agent.report import write_report
    from learners.fold import FoldConfig
    from tests.unit.test_evolve import Killed, World, settings
    from tests.unit.test_experiment import forgetful_fold

    calls = []

    def fold_alone(engine, families, items, config, run_dir, *, resume=False, on_step=None):
        calls.append({"families": sorted(families), "start": engine.adapter, "anchors": any(i.anchor for i in items),
                      "run_dir": Path(run_dir).name, "resume": resume})
        return forgetful_fold(engine, families, items, config, run_dir, resume=resume, on_step=on_step)

    stream = settings(assess_items=4, fold=FoldConfig(steps=3, batch_size=4))
    config = ExperimentConfig(stream=stream, seeds=[0], arms=["base", "routed"], eval_items=6,
                              routing=RoutingSettings(max_distance=1.5))

    def run(out, world, fold_fn=fold_alone):
        return run_experiment(world.engine, config, out, embedding=HashingEmbedding(), fold_fn=fold_fn)

    metrics = run(tmp_path / "straight", World())
    home = tmp_path / "straight" / "homes" / "routed-seed0"
    assert [call["families"] for call in calls] == [["toy:1"], ["toy:2"]]
    assert all(call["start"] is None and not call["anchors"] for call in calls)  # from the base model, alone
    assert json.loads((home / "routes.json").read_text()) == {
        "toy:1": str(home / "adapters" / "routed-p0"), "toy:2": str(home / "adapters" / "routed-p1")}
    assert not (home / "adapters" / "LATEST").exists()  # routes serve the adapters, never `latest`
    units = {(unit.arm, unit.phase): unit for unit in metrics.units}
    for phase in (0, 1):
        unit = units[("routed", phase)]
        assert (unit.train.folds, unit.train.optimizer_steps, unit.train.rollouts) == (1, 3, 12)
        assert unit.train.episodes > 0  # the fast path ran
        for cell in unit.evals:
            assert not cell.memory and cell.routing is not None
            assert cell.routing["own"] + cell.routing["other"] + cell.routing["base"] == cell.items == 6
        # every prompt went to an adapter (max_distance 1.5: the toy's skills are near all its prompts)
        assert all(cell.routing["base"] == 0 for cell in unit.evals) and all(c.successes == c.items
                                                                           for c in unit.evals)
    first = next(c for c in units[("routed", 0)].evals if c.family == "toy:1")
    # phase 2's cells reuse phase 1's episodes (the fake folds' adapters have the same contents), but their shares
    # are phase 2's own routes' (its toy:1 prompts went to toy:2's adapter), and nothing was switched for them
    again = next(c for c in units[("routed", 1)].evals if c.family == "toy:1")
    assert again.reused_from == first.trajectories and again.routing["switches"] == 0 and not again.routing["prompts"]
    served = {json.loads(line)["adapter"] for line in (tmp_path / "straight" / again.trajectories).read_text().splitlines()}
    assert again.routing["own"] == 6 * (served == {str(home / "adapters" / "routed-p0")})
    assert first.routing["own"] == 6  # phase 1 has one route: toy:1's
    episodes = [json.loads(line) for line in (tmp_path / "straight" / first.trajectories).read_text().splitlines()]
    assert {episode["adapter"] for episode in episodes} == {str(home / "adapters" / "routed-p0")}
    write_report(tmp_path / "straight")
    report = (tmp_path / "straight" / "report.md").read_text()
    assert "## Routing (the routed arm" in report and "| 1 | toy:1 | 100.0% | 0.0% | 0.0% |" in report
    assert "| routed | 1 | toy:1 | 3 | 12 |" in report
    from agent.audit import audit_experiment

    audit = audit_experiment(tmp_path / "straight")  # --check: every cell recounts, every episode replays
    assert audit.problems == [] and audit.report_checked
    # the routing shares recount from the adapter each episode records: a changed share is named
    raw = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    cell = next(c for u in raw["units"] if u["arm"] == "routed" and u["phase"] == 0 for c in u["evals"])
    cell["routing"]["own"] -= 1
    cell["routing"]["base"] += 1
    (tmp_path / "straight" / "metrics.json").write_text(json.dumps(raw))
    problems = audit_experiment(tmp_path / "straight").problems
    assert any("routing own is 5 in metrics.json, 6 in the episodes" in p for p in problems)
    assert any("routing base is 1 in metrics.json, 0 in the episodes" in p for p in problems)

    # killed in the second phase's fold: the phase resumes, the first is not redone
    calls.clear()
    out = tmp_path / "killed"

    def killed_in_phase_two(engine, families, items, config, run_dir, **kwargs):
        if Path(run_dir).name == "routed-p1":
            raise Killed()
        return fold_alone(engine, families, items, config, run_dir, **kwargs)

    with pytest.raises(Killed):
        run(out, World(), killed_in_phase_two)
    calls.clear()
    resumed = run(out, World())
    assert [call["run_dir"] for call in calls] == ["routed-p1"] and calls[0]["resume"] is True
    outcome = lambda m: [(u.arm, u.phase, [(e.family, e.successes, e.routing and e.routing["own"]) for e in u.evals],  # noqa: E731
                         u.train.model_dump()) for u in m.units]
    assert outcome(resumed) == outcome(metrics)


def test_the_routed_arms_watch_families_are_routed_and_not_filled_in_later(tmp_path):
    from agent.config import LoopSettings
    from agent.experiment import ExperimentConfig, RoutingSettings, run_experiment
    from agent.report import summarize, write_report
    from engines.base import SamplingParams
    from learners.fold import FoldConfig
    from tests.unit.test_evolve import World, settings
    from tests.unit.test_experiment import forgetful_fold

    loop = LoopSettings(batch_size=4, probes=4, reflect_every=0, sampling=SamplingParams(), max_turns=3)
    stream = settings(assess_items=4, fold=FoldConfig(steps=1, batch_size=2), loop=loop)

    def run(out, **overrides):
        config = ExperimentConfig(stream=stream, seeds=[0], arms=["base", "routed"], eval_items=6,
                                  routing=RoutingSettings(max_distance=1.5), **overrides)
        return run_experiment(World().engine, config, out, embedding=HashingEmbedding(), fold_fn=forgetful_fold,
                              say=said.append)

    said = []
    fresh = run(tmp_path / "fresh", watch=["toy:3"])  # from the start: routed as the arm's evaluations are
    routed = [unit.watch for unit in fresh.units if unit.arm == "routed"]
    assert all(len(cells) == 1 and cells[0].routing is not None for cells in routed)
    run(tmp_path / "later")
    later = run(tmp_path / "later", watch=["toy:3"])  # added later: the base arm's filled in, the routed arm's not
    assert all(bool(unit.watch) == (unit.arm == "base") for unit in later.units)
    assert any("routed: its watch families are left unmeasured" in line for line in said)
    assert summarize(later).arms["routed"].damage is None
    write_report(tmp_path / "later")
    assert "| routed | toy:3 | not evaluated yet |" in (tmp_path / "later" / "report.md").read_text()
