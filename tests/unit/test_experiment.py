"""The experiment harness on the scripted agent of test_evolve: arms, resume, the report's numbers, SFT.

The scripted fold here knows every word except in a stream's second fold (it forgets); the scripted
SFT adapter knows every word after phase 1 and none after phase 2 (it forgets too). So skillfold
unfolds toy:1 in phase 2 and keeps it through memory, while SFT loses it.
"""

import json
import math
import shutil
import socket
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from agent.audit import audit_experiment
from agent.cli import app
from agent.config import ConfigError, LoopSettings
from agent.experiment import (
    ARMS,
    ExperimentConfig,
    FamilyEval,
    Lab,
    Metrics,
    TrainStats,
    UnitResult,
    arm_settings,
    fill_watch,
    prepare_out,
    recount_skill_tokens,
    run_experiment,
    skill_tokens,
)
from agent.report import (
    ArmNumbers,
    against_rl,
    damage_by_family,
    damage_cells,
    forgetting,
    forgetting_by_family,
    forgetting_cells,
    forward_transfer,
    gain_over_base,
    half_width,
    interference,
    interference_by_family,
    interference_cells,
    load_metrics,
    plot_names,
    render,
    retention,
    spent,
    summarize,
    targets,
    write_report,
)
from engines.base import SamplingParams
from envs import make_family
from envs.base import Message, Trajectory, Turn
from learners.fold import FoldConfig, FoldResult
from learners.sft import SftConfig, SftResult, sft, sft_loss, training_views
from memory import HashingEmbedding, Memory
from tests.unit.test_evolve import Killed, World, settings

runner = CliRunner()


def _adapter(run_dir: Path, knows: bool, engine) -> Path:
    adapter = Path(run_dir) / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "knows.json").write_text(json.dumps(knows))
    engine.load_adapter(str(adapter))
    return adapter


def forgetful_fold(engine, families, items, config, run_dir, *, resume=False, on_step=None):
    adapter = _adapter(run_dir, not Path(run_dir).name.endswith("fold-2"), engine)
    shutil.copytree(adapter, Path(run_dir) / "snapshots" / "step-000001", dirs_exist_ok=True)  # a checkpoint's
    return FoldResult(steps=config.steps, loss_first=1.0, loss_last=0.5, kl_first=1.0, kl_last=0.5,
                      adapter=str(adapter), run_dir=str(run_dir), seconds=0.0)


def forgetful_sft(engine, trajectories, fold_config, config, run_dir, seed=0, resume=False):
    adapter = _adapter(run_dir, Path(run_dir).name == "sft-p0", engine)
    return SftResult(episodes=sum(t.success for t in trajectories), steps=fold_config.steps, trained_tokens=10,
                     loss_first=1.0, loss_last=0.5, adapter=str(adapter), seconds=0.0)


def experiment(**overrides) -> ExperimentConfig:
    values = dict(stream=settings(assess_items=4), seeds=[0, 1], arms=list(ARMS), eval_items=6)
    values.update(overrides)
    return ExperimentConfig(**values)


def run(out: Path, world: World, config: ExperimentConfig):
    return run_experiment(world.engine, config, out, embedding=HashingEmbedding(), fold_fn=forgetful_fold,
                          sft_fn=forgetful_sft)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("experiment") / "out"
    run(out, World(), experiment())
    write_report(out)
    return out


# ------------------------------------------------------------------------------ math
def test_forgetting_transfer_gain_and_retention_on_a_hand_made_matrix():
    phases = ["A", "B", "C"]
    matrix = {"A": [0.8, 0.6, 0.5], "B": [0.2, 0.9, 0.7], "C": [0.1, 0.3, 0.2]}
    base = {"A": 0.1, "B": 0.2, "C": 0.1}
    # A: max(0.8, 0.6) - 0.5; B: 0.9 - 0.7; C is trained last and left out
    assert forgetting(matrix, phases) == pytest.approx((0.3 + 0.2) / 2)
    # B before its phase: 0.2 - 0.2; C before its phase: 0.3 - 0.1
    assert forward_transfer(matrix, base, phases) == pytest.approx((0.0 + 0.2) / 2)
    assert gain_over_base(matrix, base, phases) == pytest.approx((0.7 + 0.7 + 0.1) / 3)
    off = {"A": [0.45, 0.4, 0.4], "B": [0.2, 0.2, 0.2], "C": [0.1, 0.1, 0.1]}
    # gains where memory helped: A 0.7, B 0.7, C 0.1; kept off: A 0.35, B 0.0, C 0.0
    assert retention(off, matrix, base, phases) == pytest.approx(0.35 / 1.5)
    # a family trained twice counts from its first phase and is not "forgotten" if trained last
    assert forgetting({"A": [0.9, 0.4, 0.8], "B": [0.0, 0.6, 0.5]}, ["A", "B", "A"]) == pytest.approx(0.6 - 0.5)
    # accuracy before a family's own phase is not what it forgets
    assert forgetting({"A": [0.5, 0.5, 0.5], "B": [0.95, 0.6, 0.5], "C": [0, 0, 0]}, phases) == pytest.approx(0.1 / 2)
    assert forgetting({"A": [0.9]}, ["A"]) is None and forward_transfer({"A": [0.9]}, {"A": 0.0}, ["A"]) is None


def test_interference_counts_a_drop_below_base_before_the_familys_own_phase():
    phases = ["A", "B", "C", "D"]
    base = {"A": 0.5, "B": 0.6, "C": 0.3, "D": 0.3}
    matrix = {
        "A": [0.9, 0.1, 0.1, 0.1],  # trained in phase 1: no interference, whatever happens after
        "B": [0.4, 0.9, 0.9, 0.9],  # 0.2 below base before its phase
        "C": [0.5, 0.7, 0.8, 0.8],  # rose before its phase: counts 0, and does not offset B's drop
        "D": [0.4, 0.1, 0.25, 0.8],  # lowest after phase 2: 0.3 - 0.1
    }
    by_family = interference_by_family(matrix, base, phases)
    assert by_family == pytest.approx({"B": 0.2, "C": 0.0, "D": 0.2})
    assert interference(matrix, base, phases) == pytest.approx(0.4 / 3)
    assert interference({"A": [0.9]}, {"A": 0.5}, ["A"]) is None  # no family waits for its phase
    # forgetting per family, from its own phase on: A 0.9 - 0.1, B 0.9 - 0.9, C 0.8 - 0.8; D is trained last
    assert forgetting_by_family(matrix, phases) == pytest.approx({"A": 0.8, "B": 0.0, "C": 0.0})


def test_the_interval_of_a_drop_is_a_normal_approximation_on_the_pooled_cells():
    one = 1.96 * math.sqrt(0.5 * 0.5 / 100 + 0.3 * 0.7 / 100)
    assert half_width([((50, 100), (30, 100))]) == pytest.approx(one)
    # the mean over two families: variances add, divided by 2 (cells at 0% or 100% add none)
    assert half_width([((50, 100), (30, 100)), ((0, 200), (200, 200))]) == pytest.approx(one / 2)
    assert half_width([]) is None
    phases = ["A", "B", "C"]
    counts = {"A": [(90, 100), (95, 100), (80, 100)], "B": [(40, 100), (20, 100), (70, 100)],
              "C": [(60, 100), (30, 100), (50, 100)]}
    base = {"A": (50, 100), "B": (60, 100), "C": (40, 100)}
    # interference: base against B's one cell before its phase, C's lowest of its two; A is trained first
    assert interference_cells(counts, base, phases) == [((60, 100), (40, 100)), ((40, 100), (30, 100))]
    # forgetting: A's best cell from its phase on against its last; B's only cell before the last
    assert forgetting_cells(counts, phases) == [((95, 100), (80, 100)), ((20, 100), (70, 100))]


def _numbers(**values) -> ArmNumbers:
    defaults = dict(final_accuracy=0.5, interference=0.0, interference_half_width=0.0, interference_worst=0.0,
                    interference_by_family={"B": 0.0}, forgetting=0.0, forgetting_half_width=0.0,
                    forgetting_worst=0.0, forgetting_by_family={"A": 0.0}, forward_transfer=0.0,
                    gain_over_base=0.2, retention=0.95, folded_fraction=0.6, skill_tokens=0, generated_tokens=0,
                    seconds=0)
    return ArmNumbers(**{**defaults, **values})


def test_skillfold_beats_sft_only_when_the_margins_interval_is_above_zero():
    sft = _numbers(interference=0.10, interference_half_width=0.05, forgetting=0.02, forgetting_half_width=0.02)
    skillfold = _numbers(interference=0.05, interference_half_width=0.04, forgetting=0.01, forgetting_half_width=0.02,
                         interference_by_family={"B": 0.01, "C": 0.03}, forgetting_by_family={"A": 0.02})
    name = "skillfold beats sft on interference + forgetting beyond the 95% interval"
    # margin (0.10 + 0.02) - (0.05 + 0.01) = 6 points; half-width sqrt(5² + 2² + 4² + 2²) = 7 points
    found = {t.target: t for t in targets({"sft": sft, "skillfold": skillfold})}
    assert found[name].met is False and found[name].value == "+6.0 pts (±7.0): +12.0 pts vs +6.0 pts"
    # per family: C's interference (3 points) misses; forgetting at exactly 2 points is met
    assert found["interference <= 2 points on every family"].met is False
    assert found["interference <= 2 points on every family"].value == "worst +3.0 pts (C)"
    assert found["forgetting <= 2 points on every family"].met is True
    narrow = {"sft": sft.model_copy(update={"interference_half_width": 0.01, "forgetting_half_width": 0.01}),
              "skillfold": skillfold.model_copy(update={"interference_half_width": 0.01, "forgetting_half_width": 0.01})}
    assert {t.target: t for t in targets(narrow)}[name].met is True
    missing = {t.target: t for t in targets({"skillfold": skillfold})}[name]
    assert missing.met is None and missing.value == "n/a"


def _hand_metrics(cells: dict, train: dict) -> Metrics:
    """Metrics of one seed built by hand: cells[(arm, phase, off)] = {family: successes of 100}; train[arm] the
    TrainStats of each of its phases."""
    config = experiment(seeds=[0], arms=sorted({arm for arm, _, _ in cells}))
    phases = [phase.family for phase in config.stream.phases]

    def evals(arm, phase, off):
        found = cells.get((arm, phase, off))
        return [] if found is None else [
            FamilyEval(family=f, memory=not off, items=100, successes=n, accuracy=n / 100, ci_low=0, ci_high=1,
                       errors=0, skill_tokens=0, prompt_tokens=0, completion_tokens=0, seconds=0, trajectories="-")
            for f, n in found.items()]

    units = [UnitResult(arm=arm, seed=0, phase=phase, family=phases[phase], evals=evals(arm, phase, False),
                        evals_off=evals(arm, phase, True), train=train.get(arm, TrainStats()), seconds=0,
                        generated_tokens=0)
             for arm in config.arms for phase in range(len(phases))]
    return Metrics(config=config, phases=phases, families=phases, units=units)


def test_skillfold_against_grpo_by_hand_on_accuracy_drops_and_what_each_spent():
    one, two = experiment().stream.phases[0].family, experiment().stream.phases[1].family
    base = {one: 20, two: 40}
    cells = {("base", 0, False): base, ("base", 1, False): base,
             ("skillfold", 0, False): {one: 80, two: 40}, ("skillfold", 1, False): {one: 70, two: 90},
             ("skillfold", 0, True): {one: 60, two: 40}, ("skillfold", 1, True): {one: 60, two: 80},
             ("grpo", 0, False): {one: 50, two: 30}, ("grpo", 1, False): {one: 40, two: 60}}
    train = {"skillfold": TrainStats(episodes=32, rollouts=128, generated_tokens=1000, fold_generated_tokens=3000),
             "grpo": TrainStats(rollouts=128, rl_generated_tokens=3000)}
    metrics = _hand_metrics(cells, train)
    assert spent(metrics, "skillfold") == (320, 8000) and spent(metrics, "grpo") == (256, 6000)
    rows = {row[0]: row for row in against_rl(metrics, summarize(metrics))}
    # final accuracy 80% vs 50%: half-width 1.96 sqrt((.21 + .09)/100/4 + (.24 + .24)/100/4) = 8.7 points
    assert rows["final accuracy (skillfold)"] == ("final accuracy (skillfold)", "80.0%", "50.0%", "+30.0 pts (±8.7)",
                                                  "skillfold wins")
    # family by family: 70% vs 40% (1.96 sqrt(.21/100 + .24/100) = 13.1 points), 90% vs 60% (1.96 sqrt(.09/100 + .24/100) = 11.3)
    assert rows[f"final accuracy on {one} (skillfold)"][1:] == ("70.0%", "40.0%", "+30.0 pts (±13.1)",
                                                                  "skillfold wins")
    assert rows[f"final accuracy on {two} (skillfold)"][3] == "+30.0 pts (±11.3)"
    # with memory off the first family is 60% vs 40%: 1.96 sqrt(.24/100 + .24/100) = 13.6, still beyond it
    assert rows[f"final accuracy on {one} (skillfold, memory off)"][3:] == ("+20.0 pts (±13.6)", "skillfold wins")
    # memory off: 70% vs 50%, 1.96 sqrt((.24 + .16)/400 + .48/400) = 9.2 points
    assert rows["final accuracy (skillfold, memory off)"][3:] == ("+20.0 pts (±9.2)", "skillfold wins")
    # gains over base (30%): 50 points over 320 rollouts against 20 over 256: 15.62 vs 7.81 per 100 rollouts;
    # variance (.003/4)(100/320)^2 + (.0048/4)(100/256)^2 + ((.16 + .24)/400)(100/320 - 100/256)^2
    per = rows["final gain per 100 rollouts (skillfold)"]
    assert per[1:3] == ("+15.62 pts", "+7.81 pts")
    variance = .00075 * (100 / 320) ** 2 + .0012 * (100 / 256) ** 2 + .001 * (100 / 320 - 100 / 256) ** 2
    assert per[3] == f"+7.81 pts (±{196 * math.sqrt(variance):.2f})" and per[4] == "skillfold wins"
    assert rows["final gain per 10k training tokens (skillfold)"][1:3] == ("+62.50 pts", "+33.33 pts")
    # interference on the second family: 0 against 10 points (40% -> 30%), cells of 100: not told apart
    assert rows["interference"][1:3] == ("+0.0 pts", "+10.0 pts")
    assert rows["interference"][4] == "no difference beyond the interval"
    assert rows["forgetting"][1:3] == ("+10.0 pts", "+10.0 pts")

    report = render(metrics, summarize(metrics), [])
    assert "## skillfold against grpo" in report and "## Sample efficiency" in report
    assert "- skillfold beats grpo on: final accuracy (skillfold); " in report
    assert "- grpo beats skillfold on: none." in report
    assert "| grpo | 256 | 6000 | 50.0% | +20.0 pts (±" in report and "| base | 0 | 0 | 30.0% | n/a |" in report
    # a stream where grpo spent more for less: it wins nothing; without grpo neither section is there
    no_rl = _hand_metrics({key: value for key, value in cells.items() if key[0] != "grpo"}, train)
    assert "## skillfold against grpo" not in render(no_rl, summarize(no_rl), [])
    assert "## Sample efficiency" not in render(no_rl, summarize(no_rl), [])


def test_arms_play_the_stream_their_way():
    config = experiment()
    assert arm_settings(config, "memory", 3).schedule.every == "never"
    assert arm_settings(config, "sft", 3).schedule.every == "never"
    assert arm_settings(config, "fold", 3).rule.mark_folded is False
    skillfold = arm_settings(config, "skillfold", 3)
    assert skillfold.rule.mark_folded and skillfold.schedule.every == "phase"
    assert (skillfold.loop.sampling.seed, skillfold.fold.seed) == (3, 3)
    assert skillfold.assess_offset == config.eval_items  # fold decisions never see the reported items


# --------------------------------------------------------------------------- the run
def test_arms_start_alike_and_differ_as_designed(straight):
    metrics = load_metrics(straight)
    units = {(u.arm, u.seed, u.phase): u for u in metrics.units}
    assert len(units) == 5 * 2 * 2
    for seed in (0, 1):
        first = {arm: (units[(arm, seed, 0)].train.episodes, units[(arm, seed, 0)].train.successes)
                 for arm in ("memory", "sft", "fold", "skillfold")}
        assert set(first.values()) == {(4, 2)}, first  # same items, seed and (base) weights in every arm
        assert units[("base", seed, 1)].reused_from == 0
        assert units[("base", seed, 1)].evals == units[("base", seed, 0)].evals
        changes = [(c["kind"], c["family"], u.phase) for u in metrics.units if u.arm == "skillfold" and u.seed == seed
                   for c in u.transitions]
        assert changes == [("folded", "toy:1", 0), ("unfolded", "toy:1", 1)]
        assert units[("fold", seed, 1)].train.folds == 1 and units[("fold", seed, 1)].transitions == []
    assert all(bool(u.evals_off) == (u.arm in ("fold", "skillfold")) for u in metrics.units)
    for unit in metrics.units:  # an arm only ever serves its own adapters (the engine is shared)
        home = str(straight / "homes" / f"{unit.arm}-seed{unit.seed}")
        for cell in unit.evals:
            adapters = {Trajectory.model_validate_json(line).adapter
                        for line in (straight / cell.trajectories).read_text().splitlines()}
            assert all(adapter is None or adapter.startswith(home) for adapter in adapters), (unit.arm, adapters)
            assert (None in adapters) == (unit.arm in ("base", "memory")), (unit.arm, unit.phase, adapters)
        if unit.arm != "base" and unit.phase == 0:  # every arm's first phase is played by the base weights
            played = Memory.open(home=Path(home), embedding=HashingEmbedding()).list_trajectories(split="train")
            assert played and {t.adapter for t in played if t.id.startswith("evolve-p0-")} == {None}, unit.arm
    memory_on = {u.arm: any(e.memory for e in u.evals) for u in metrics.units if u.phase == 1}
    assert memory_on == {"base": False, "memory": True, "sft": False, "fold": True, "skillfold": True}


def _accuracy(raw: dict, arm: str, seed: int, phase: int, family: str, key: str = "evals") -> float:
    unit = next(u for u in raw["units"] if (u["arm"], u["seed"], u["phase"]) == (arm, seed, phase))
    cell = next(e for e in unit[key] if e["family"] == family)
    return cell["successes"] / cell["items"]


def test_report_numbers_match_a_recomputation_from_metrics_json(straight):
    raw = json.loads((straight / "metrics.json").read_text())
    summary = summarize(load_metrics(straight))
    report = (straight / "report.md").read_text()
    families, seeds, last = raw["families"], raw["config"]["seeds"], len(raw["phases"]) - 1
    for arm in raw["config"]["arms"]:
        final = sum(_accuracy(raw, arm, s, last, f) for s in seeds for f in families) / (len(seeds) * len(families))
        assert summary.arms[arm].final_accuracy == pytest.approx(final)
        assert f"| {arm} | {'off' if arm in ('base', 'sft') else 'on'} | {100 * final:.1f}% |" in report
        lost = sum(max(_accuracy(raw, arm, s, p, "toy:1") for p in range(last)) - _accuracy(raw, arm, s, last, "toy:1")
                   for s in seeds) / len(seeds)
        assert summary.arms[arm].forgetting == pytest.approx(lost)
        # toy:2 waits one phase: its drop below base after phase 1, none if it rose
        interfered = sum(max(0.0, _accuracy(raw, "base", s, 0, "toy:2") - _accuracy(raw, arm, s, 0, "toy:2"))
                         for s in seeds) / len(seeds)
        assert summary.arms[arm].interference == pytest.approx(interfered)
        assert summary.arms[arm].interference_worst == pytest.approx(interfered)
    assert summary.arms["sft"].forgetting == pytest.approx(1 - 2 / 6)  # all six words, then cedar and falcon only
    assert summary.arms["skillfold"].forgetting == 0.0
    gain = sum(_accuracy(raw, "memory", s, p, f) - _accuracy(raw, "base", s, 0, f)
               for s in seeds for p, f in enumerate(families)) / (len(seeds) * len(families))
    assert summary.arms["memory"].gain_over_base == pytest.approx(gain)
    kept = [sum(_accuracy(raw, "skillfold", s, p, f, "evals_off") - _accuracy(raw, "base", s, 0, f)
                for p, f in enumerate(families))
            / sum(_accuracy(raw, "memory", s, p, f) - _accuracy(raw, "base", s, 0, f) for p, f in enumerate(families))
            for s in seeds]
    assert summary.arms["skillfold"].retention == pytest.approx(sum(kept) / len(seeds))
    statuses = {t.target: ("met" if t.met else "MISSED") for t in summary.targets}
    assert statuses["skillfold beats sft on interference + forgetting beyond the 95% interval"] == "met"
    assert "| arm | memory | final accuracy | interference | forgetting |" in report
    for target, status in statuses.items():
        assert f"| {target} |" in report and status in report
    for unit in raw["units"]:  # every evaluation can be recounted from its episodes
        for cell in unit["evals"] + unit["evals_off"]:
            lines = (straight / cell["trajectories"]).read_text().splitlines()
            assert len(lines) == cell["items"]
            assert sum(Trajectory.model_validate_json(line).success for line in lines) == cell["successes"]
    assert {"learning_curves.png", "memory_size.png", "matrix_skillfold.png"} <= {p.name for p in straight.iterdir()}


def _outcome(metrics) -> list:
    return [(u.arm, u.seed, u.phase, [(e.family, e.memory, e.successes, e.skill_tokens) for e in u.evals + u.evals_off],
             u.skills, [(c["kind"], c["family"]) for c in u.transitions], u.train.model_dump())
            for u in metrics.units]


def test_a_killed_experiment_resumes_without_repeating_a_unit(tmp_path):
    config = experiment(seeds=[0])
    expected = _outcome(run(tmp_path / "straight", World(), config))
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        run(out, World(crash_after=260), config)  # in the fold arm's second phase
    done = {path: path.read_text() for path in (out / "units").rglob("phase-*.json")}
    assert 4 <= len(done) < 10
    resumed = run(out, World(), config)
    assert all(path.read_text() == text for path, text in done.items())  # finished units are never redone
    assert _outcome(resumed) == expected
    assert len(list((out / "units").rglob("phase-*.json"))) == 10


def test_report_only_rebuilds_the_report_from_metrics_json_alone(straight, tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(straight / "metrics.json", alone / "metrics.json")
    result = runner.invoke(app, ["experiment", "--out", str(alone), "--report-only", "--json"])
    assert result.exit_code == 0, result.output
    assert (alone / "report.md").read_text() == (straight / "report.md").read_text()
    assert json.loads(result.stdout.splitlines()[-1])["targets"][0]["target"] == "memory gain >= 15 points"
    assert (alone / "matrix_sft.png").stat().st_size > 1000


def test_an_arm_another_live_process_runs_is_skipped_and_a_dead_ones_claim_taken_over(tmp_path):
    import subprocess

    config, said = experiment(seeds=[0], arms=["base", "memory"]), []
    prepare_out(tmp_path / "out", config)
    lock = tmp_path / "out" / "units" / "memory" / "seed-0" / ".lock"
    lock.parent.mkdir(parents=True)
    live = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        assert run_experiment(World().engine, config, tmp_path / "out", embedding=HashingEmbedding(),
                              say=said.append) is None
        assert f"seed 0 memory: skipped, process {live.pid} is running it" in said
        assert not list(lock.parent.glob("phase-*.json")) and lock.is_file()  # its claim stands
        assert len(list((tmp_path / "out" / "units" / "base").rglob("phase-*.json"))) == 2  # the rest ran
        lock.write_text(json.dumps({"pid": live.pid, "host": "another-machine"}))
        said.clear()
        run_experiment(World().engine, config, tmp_path / "out", embedding=HashingEmbedding(), say=said.append)
        assert any(f"{live.pid} on another-machine (if that run is gone, delete {lock})" in line for line in said)
    finally:
        live.kill()
        live.wait()
    lock.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))  # its process is gone
    metrics = run_experiment(World().engine, config, tmp_path / "out", embedding=HashingEmbedding())
    assert metrics is not None and len(list(lock.parent.glob("phase-*.json"))) == 2 and not lock.exists()


class DefaultSystemPrompt:
    """count_tokens as SmolLM2's template counts: a chat led by no system message gets a 9-word default."""

    def count_tokens(self, chat) -> int:
        default = 9 + 2 if not chat or chat[0]["role"] != "system" else 0
        return default + sum(len(message["content"].split()) + 2 for message in chat)


def test_skill_tokens_count_a_system_hint_that_displaces_the_default_system_prompt():
    hint = [Message(role="system", content="Hint: one or two")]
    episode = Trajectory(env="toy:1", item_id="eval-0", split="eval", context=hint, turns=[Turn(action="a")] * 3,
                         prompt=[Message(role="user", content="How many letters?")])
    assert skill_tokens(DefaultSystemPrompt(), episode) == (4 + 2) * 3  # the hint's own tokens, every turn
    led = episode.model_copy(update={"prompt": [Message(role="system", content="Tools: none"), *episode.prompt]})
    assert skill_tokens(DefaultSystemPrompt(), led) == (4 + 2) * 3
    assert skill_tokens(DefaultSystemPrompt(), episode.model_copy(update={"context": []})) == 0


def test_skill_tokens_recounted_from_the_episodes_when_the_metrics_are_collected(straight, tmp_path):
    copy = _copy(straight, tmp_path)
    metrics = load_metrics(copy)
    unit = next(u for u in metrics.units if any(cell.skill_tokens for cell in u.evals))
    path = copy / "units" / unit.arm / f"seed-{unit.seed}" / f"phase-{unit.phase}.json"
    stored = json.loads(path.read_text())
    cell = next(c for c in stored["evals"] if c["skill_tokens"])
    right, cell["skill_tokens"] = cell["skill_tokens"], -7  # as a version that counted otherwise wrote it
    path.write_text(json.dumps(stored))
    said = []
    assert recount_skill_tokens(copy, metrics.config, len(metrics.phases), World().engine, said.append) == 1
    assert said == ["skill tokens recounted from the episodes: 1 evaluations changed"]
    fixed = json.loads(path.read_text())
    assert next(c for c in fixed["evals"] if c["trajectories"] == cell["trajectories"])["skill_tokens"] == right
    assert {k: v for k, v in fixed.items() if k != "evals"} == {k: v for k, v in stored.items() if k != "evals"}
    assert recount_skill_tokens(copy, metrics.config, len(metrics.phases), World().engine) == 0


def _copy(straight: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(straight, copy)
    return copy


def _cell_with_both_outcomes(raw: dict) -> dict:
    return next(c for u in raw["units"] for c in u["evals"] if 0 < c["successes"] < c["items"])


def test_check_recounts_every_cell_and_replays_every_episode(straight):
    result = runner.invoke(app, ["experiment", "--out", str(straight), "--check", "--json"])
    assert result.exit_code == 0, result.output
    audit = json.loads(result.stdout.splitlines()[-1])
    metrics = load_metrics(straight)
    cells = [cell for unit in metrics.units for cell in [*unit.evals, *unit.evals_off]]
    assert audit["cells"] == len(cells) and audit["episodes"] == sum(cell.items for cell in cells)
    assert audit["report_checked"] and audit["problems"] == []
    assert sorted(plot_names(metrics)) == sorted(p.name for p in straight.glob("*.png"))  # what plot() wrote


def test_check_names_a_count_a_score_or_a_report_line_that_does_not_follow(straight, tmp_path):
    copy = _copy(straight, tmp_path / "1")  # one more success claimed in metrics.json
    raw = json.loads((copy / "metrics.json").read_text())
    cell = _cell_with_both_outcomes(raw)
    cell["successes"] += 1
    (copy / "metrics.json").write_text(json.dumps(raw))
    problems = audit_experiment(copy).problems
    assert any(p.startswith(f"{cell['trajectories']}: successes is") for p in problems), problems
    assert any(p.startswith("report.md line") for p in problems), problems

    copy = _copy(straight, tmp_path / "2")  # a failed episode rewritten as a success, counts and all
    raw = json.loads((copy / "metrics.json").read_text())
    cell = _cell_with_both_outcomes(raw)
    path = copy / cell["trajectories"]
    episodes = [json.loads(line) for line in path.read_text().splitlines()]
    failed = next(e for e in episodes if not e["success"])
    failed["success"], failed["reward"], failed["turns"][-1]["reward"] = True, 1.0, 1.0
    path.write_text("".join(json.dumps(e) + "\n" for e in episodes))
    for c in [c for u in raw["units"] for c in u["evals"] + u["evals_off"] if c["trajectories"] == cell["trajectories"]]:
        c["successes"] += 1
    (copy / "metrics.json").write_text(json.dumps(raw))
    problems = audit_experiment(copy).problems
    assert any("reward/done" in p for p in problems) and any("accuracy is" in p for p in problems), problems

    copy = _copy(straight, tmp_path / "3")  # a report edited by hand
    report = (copy / "report.md").read_text()
    (copy / "report.md").write_text(report.replace("| met |", "| MISSED |", 1))
    result = runner.invoke(app, ["experiment", "--out", str(copy), "--check"])
    assert result.exit_code == 1 and "report.md line" in result.output


# ------------------------------------------------------------------------ bad input
CONFIG = """
eval_items = 4
arms = {arms}
[stream]
episodes = 2
assess_items = 2
[[stream.phases]]
family = "{family}"
[stream.loop]
probes = 4
"""


def _config(tmp: Path, arms: str = '["base"]', family: str = "toy:1", extra: str = "") -> Path:
    path = tmp / "experiment.toml"
    path.write_text(extra + CONFIG.format(arms=arms, family=family))
    return path


def _different(tmp: Path) -> list:
    prepare_out(tmp / "out", experiment(seeds=[0], arms=["base"]))
    return ["experiment", _config(tmp), "--out", tmp / "out"]


def _another_stream(tmp: Path) -> list:
    run_dir = tmp / "h" / "evolve" / "evolve"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"stream": {"episodes": 99}}))
    return ["evolve", "--stream", _config(tmp), "--home", tmp / "h"]


BAD_INPUT = {
    "missing config": (lambda tmp: ["experiment", tmp / "nope.toml", "--out", tmp / "o"], "nope.toml does not exist"),
    "no out": (lambda tmp: ["experiment", _config(tmp)], "--out DIR"),
    "no config": (lambda tmp: ["experiment", "--out", tmp / "o"], "name the experiment config"),
    "unknown family": (lambda tmp: ["experiment", _config(tmp, family="nope:1"), "--out", tmp / "o"],
                       "unknown environment 'nope:1'"),
    "unknown arm": (lambda tmp: ["experiment", _config(tmp, arms='["base", "magic"]'), "--out", tmp / "o"],
                    "arms.1: Input should be 'base', 'memory', 'sft', 'fold', 'skillfold', 'grpo' or 'routed'"),
    "too many items": (lambda tmp: ["experiment", _config(tmp), "--out", tmp / "o", "eval_items=15"],
                       "toy:1 has 16 eval items but 17 are needed"),
    "out is a file": (lambda tmp: ["experiment", _config(tmp), "--out", _config(tmp)], "is a file"),
    "out holds other things": (lambda tmp: ["experiment", _config(tmp), "--out", tmp], "is not empty"),
    "out holds another experiment": (_different, "holds an experiment with another config"),
    "seed not in the config": (lambda tmp: ["experiment", _config(tmp), "--out", tmp / "o", "--seed", "7"],
                               "--seed [7] is not among the config's seeds [0]"),
    "arm not in the config": (lambda tmp: ["experiment", _config(tmp), "--out", tmp / "o", "--arm", "sft"],
                              "--arm ['sft'] is not among the config's arms ['base']"),
    "report without metrics": (lambda tmp: ["experiment", "--out", tmp, "--report-only"], "holds no metrics.json"),
    "evolve missing stream": (lambda tmp: ["evolve", "--stream", tmp / "nope.toml"], "nope.toml does not exist"),
    "evolve unknown key": (lambda tmp: ["evolve", "--stream", _config(tmp, extra="colour = 1\n")],
                           "unknown key(s) colour"),
    "evolve unknown family": (lambda tmp: ["evolve", "--stream", _config(tmp, family="nope:1"), "--home", tmp / "h"],
                              "unknown environment 'nope:1'"),
    "evolve bad anchor": (lambda tmp: ["evolve", "--stream", _config(tmp), "--home", tmp / "h", "stream.anchors=[nope]"],
                          "unknown environment 'nope'"),
    "evolve another stream": (_another_stream, "was started with another stream"),
    "watch a phase of the stream": (lambda tmp: ["experiment", _config(tmp, extra='watch = ["toy:1"]\n'), "--out",
                                                  tmp / "o"], "watch family toy:1 is a phase of the stream"),
    "watch a prompt set": (lambda tmp: ["experiment", _config(tmp, extra='watch = ["general"]\n'), "--out", tmp / "o"],
                           "watch family general has no score"),
    "watch what the gate decides on": (
        lambda tmp: ["experiment", _config(tmp, arms='["skillfold"]', extra='watch = ["toy:2"]\n'), "--out", tmp / "o"],
        "watch family toy:2: its eval items [0, 4) overlap the retention gate's [0, 16)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT), ids=list(BAD_INPUT))
def test_bad_input_exits_2_naming_the_fix(case, tmp_path):
    arguments, fragment = BAD_INPUT[case]
    result = runner.invoke(app, [str(argument) for argument in arguments(tmp_path)])
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output and result.stdout == ""
    message = " ".join(result.stderr.split())
    assert message.startswith("error: ") and fragment in message, message


# ------------------------------------------------------------------------------ sft
def _episode(word: str, success: bool, context: list[Message] = ()) -> Trajectory:
    return Trajectory(env="toy:1", item_id=word, split="train", prompt=[Message(role="user", content=f"Say the word: {word}")],
                      context=list(context), turns=[Turn(action=word, reward=1.0, done=True)], success=success)


def test_sft_trains_on_successes_without_their_skills_and_lowers_their_loss(tiny_engine, tmp_path):
    skill = [Message(role="user", content="Say the word: cherry"), Message(role="assistant", content="cherry")]
    episodes = [_episode("apple", True, skill), _episode("banana", True), _episode("river", False)]
    views = training_views(tiny_engine.tokenizer, tiny_engine.stop_ids, episodes, max_tokens=512)
    assert len(views) == 2  # the failure is left out
    assert views[0] == training_views(tiny_engine.tokenizer, tiny_engine.stop_ids, [_episode("apple", True)], 512)[0]  # skills are not trained on
    with torch.no_grad():
        before = float(sft_loss(tiny_engine.model, views)[0])
    result = sft(tiny_engine, episodes, FoldConfig(steps=8, batch_size=2, lora_rank=4, lora_alpha=8),
                 SftConfig(learning_rate=1e-2), tmp_path / "sft", seed=0)
    assert (result.episodes, result.steps) == (2, 8) and tiny_engine.adapter == result.adapter
    with torch.no_grad():
        after = float(sft_loss(tiny_engine.model, views)[0])
    assert after < before * 0.7, (before, after)
    assert len((tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()) == 8
    nothing = sft(tiny_engine, [_episode("river", False)], FoldConfig(steps=2), SftConfig(), tmp_path / "none")
    assert nothing.adapter is None and nothing.steps == 0


def test_a_run_saved_by_an_older_version_or_with_other_fold_mechanics_resumes(tmp_path):
    from agent.experiment import ConfigError

    config = experiment(seeds=[0], arms=["base"])
    prepare_out(tmp_path, config)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["stream"]["fold"]["heap_threshold_kib"]  # a setting added after the run started
    (tmp_path / "config.json").write_text(json.dumps(saved))
    prepare_out(tmp_path, config)
    fold = config.stream.fold.model_copy(update={"gradient_checkpointing": True, "heap_threshold_kib": 128})
    prepare_out(tmp_path, config.model_copy(update={"stream": config.stream.model_copy(update={"fold": fold})}))
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["stream"]["fold"]["micro_batch"] = 1  # written before micro_batch's default became None (by device)
    saved["model"].pop("cuda_graphs", None)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    prepare_out(tmp_path, config.model_copy(update={"model": config.model.model_copy(update={"cuda_graphs": False})}))
    other = config.stream.fold.model_copy(update={"steps": config.stream.fold.steps + 1})  # what is learned: refused
    with pytest.raises(ConfigError, match="another config"):
        prepare_out(tmp_path, config.model_copy(update={"stream": config.stream.model_copy(update={"fold": other})}))


def test_an_evaluation_identical_to_an_earlier_one_is_reused_not_rerun(straight):
    metrics = load_metrics(straight)
    units = {(u.arm, u.seed, u.phase): u for u in metrics.units}
    base = {e.family: e for e in units[("base", 0, 0)].evals}
    # the memory arm has no skills for toy:2 in phase 0: the base weights, no skills, the base's episodes
    unseen = next(e for e in units[("memory", 0, 0)].evals if e.family == "toy:2")
    assert not unseen.memory and unseen.reused_from == base["toy:2"].trajectories
    assert (unseen.successes, unseen.completion_tokens) == (base["toy:2"].successes, base["toy:2"].completion_tokens)
    # with skills in the prompt the evaluation is its own, and it is recorded for later reuse
    learned = next(e for e in units[("memory", 0, 0)].evals if e.family == "toy:1")
    assert learned.memory and learned.reused_from is None
    # a reused evaluation's own file holds the episodes behind its numbers, as this arm served them
    for unit in metrics.units:
        for cell in [*unit.evals, *unit.evals_off]:
            episodes = [Trajectory.model_validate_json(line) for line in (straight / cell.trajectories).read_text().splitlines()]
            assert sum(t.success for t in episodes) == cell.successes and len(episodes) == cell.items
    reused = [cell for unit in metrics.units for cell in unit.evals if cell.reused_from]
    assert reused and all(cell.trajectories != cell.reused_from for cell in reused)


def test_seeds_run_by_separate_processes_give_the_straight_runs_outcome(straight, tmp_path):
    from agent.config import ConfigError

    config = experiment()
    out = tmp_path / "split"
    assert run_experiment(World().engine, config, out, embedding=HashingEmbedding(), fold_fn=forgetful_fold,
                          sft_fn=forgetful_sft, seeds=[1]) is None  # seed 0 is not done: no metrics yet
    assert not (out / "metrics.json").exists() and not list((out / "units").rglob("seed-0/*.json"))
    metrics = run_experiment(World().engine, config, out, embedding=HashingEmbedding(), fold_fn=forgetful_fold,
                             sft_fn=forgetful_sft, seeds=[0])
    assert metrics is not None and (out / "metrics.json").is_file()
    assert _outcome(metrics) == _outcome(load_metrics(straight))
    with pytest.raises(ConfigError, match="not among the config's seeds"):
        run_experiment(World().engine, config, out, embedding=HashingEmbedding(), seeds=[7])


def test_arms_run_by_separate_processes_give_the_straight_runs_outcome(straight, tmp_path):
    config, out = experiment(), tmp_path / "split"
    for arms in (["skillfold", "sft"], ["base", "memory"]):
        assert run_experiment(World().engine, config, out, embedding=HashingEmbedding(), fold_fn=forgetful_fold,
                              sft_fn=forgetful_sft, arms=arms) is None
        assert {path.parent.parent.name for path in (out / "units").rglob("phase-*.json")} >= set(arms)
        assert not list((out / "units").rglob("fold/seed-*/*.json"))
    metrics = run_experiment(World().engine, config, out, embedding=HashingEmbedding(), fold_fn=forgetful_fold,
                             sft_fn=forgetful_sft, arms=["fold"])
    assert metrics is not None and _outcome(metrics) == _outcome(load_metrics(straight))


def test_a_fold_identical_to_an_earlier_one_is_reused(straight):
    from agent.evolve import read_events

    def folds(arm: str, seed: int) -> list[dict]:
        run_dir = next((straight / "homes" / f"{arm}-seed{seed}" / "evolve").iterdir())
        return [event.evidence for event in read_events(run_dir) if event.kind == "fold"]

    for seed in (0, 1):
        first_fold, first_skillfold = folds("fold", seed)[0], folds("skillfold", seed)[0]
        # the same start (base weights), prompts and config: the skillfold arm reuses the fold arm's fold
        assert first_fold.get("reused_from") is None and first_skillfold["reused_from"]
        assert "fold-seed" in first_skillfold["reused_from"]
        # with the checkpoints' adapters, which the retention check's fallback tries
        assert (straight / "homes" / f"skillfold-seed{seed}" / "folds" / Path(first_skillfold["adapter"]).name
                / "snapshots" / "step-000001" / "adapter_config.json").is_file()
        adapter = Path(first_skillfold["adapter"])
        assert adapter.is_dir() and str(adapter).startswith(str(straight / "homes" / f"skillfold-seed{seed}"))
        assert first_skillfold["generated_tokens"] == first_fold["generated_tokens"]  # what the fold cost
        # after it, skillfold's rule retires skills and its folds differ: each runs its own
        assert all(evidence.get("reused_from") is None for evidence in folds("skillfold", seed)[1:])


SHIPPED = sorted((Path(__file__).resolve().parents[2] / "experiments").glob("*.toml"))


@pytest.mark.parametrize("path", [p for p in SHIPPED if "twx:" not in p.read_text()], ids=lambda p: p.name)
def test_every_shipped_experiment_config_loads_and_has_room_for_its_items(path):
    """experiments/*.toml validate and their families have the train and held-out items they ask for
    (the games stream's, which needs Java, is checked in test_twx)."""
    from agent.config import build_config
    from agent.experiment import check_experiment

    config = build_config(ExperimentConfig, path, {}, [])
    assert [family.name for family in check_experiment(config)] == [p.family for p in config.stream.phases]


# ---------------------------------------------------------------------------- watch
class SftHurts(World):
    """The scripted world, where an SFT adapter (`hurting_sft`'s) has forgotten every word the model knew."""

    def respond(self, chat) -> str:
        answer = super().respond(chat)
        adapter = self.engine.adapter
        first_turn = not any(message["role"] == "assistant" for message in chat)
        return "no idea" if adapter and (Path(adapter) / "hurts.json").is_file() and first_turn else answer


def hurting_sft(engine, trajectories, fold_config, config, run_dir, seed=0, resume=False):
    result = forgetful_sft(engine, trajectories, fold_config, config, run_dir, seed, resume)
    (Path(result.adapter) / "hurts.json").write_text("true")
    return result


def watching(out: Path, config: ExperimentConfig) -> Metrics:
    return run_experiment(SftHurts().engine, config, out, embedding=HashingEmbedding(), fold_fn=forgetful_fold,
                          sft_fn=hurting_sft)


def three_turns(**overrides) -> ExperimentConfig:
    """The scripted stream, with turns enough for the watch family toy:3."""
    loop = LoopSettings(batch_size=4, probes=4, reflect_every=0, sampling=SamplingParams(), max_turns=3)
    return experiment(stream=settings(assess_items=4, loop=loop), seeds=[0], **overrides)


def test_damage_by_hand_is_the_largest_drop_below_base_anywhere_in_the_stream():
    base = {"W": [(40, 100), (40, 100), (40, 100)], "V": [(10, 100)] * 3}
    watched = {"W": [(45, 100), (30, 100), (38, 100)], "V": [(20, 100), (12, 100), (11, 100)]}
    assert damage_by_family(watched, base) == pytest.approx({"W": 0.10, "V": 0.0})  # a rise does not offset
    assert damage_cells(watched, base) == [((40, 100), (30, 100)), ((10, 100), (11, 100))]


def test_watch_families_are_measured_after_every_phase_and_filled_in_when_added_later(tmp_path):
    watched = three_turns(watch=["toy:3"])
    fresh = watching(tmp_path / "fresh", watched)
    assert all([cell.family for cell in unit.watch] == ["toy:3"] and not unit.watch[0].memory for unit in fresh.units)
    assert fresh.watch == ["toy:3"]
    later = tmp_path / "later"
    before = watching(later, three_turns())
    assert all(unit.watch == [] for unit in before.units)
    filled = watching(later, watched)  # the same experiment, watch added: only the evaluations run
    old = {(u.arm, u.phase): u for u in before.units}
    for unit, first in zip(filled.units, fresh.units, strict=True):
        assert [(c.successes, c.items) for c in unit.watch] == [(c.successes, c.items) for c in first.watch]
        assert unit.model_dump(exclude={"watch", "finished_at"}) == old[(unit.arm, unit.phase)].model_dump(
            exclude={"watch", "finished_at"})  # nothing else of a finished unit changes
    summary = summarize(filled)
    base = next(u for u in filled.units if u.arm == "base").watch[0]
    assert base.successes > 0 and summary.arms["skillfold"].damage == 0
    assert summary.arms["sft"].damage == pytest.approx(base.accuracy)  # SftHurts: SFT's adapter takes it to 0
    found = {t.target: t for t in summary.targets}
    assert found["damage outside the stream <= 2 points on every watched family"].met is True
    assert found["skillfold beats sft on damage outside the stream beyond the 95% interval"].value.endswith(
        "vs +0.0 pts")
    write_report(later)
    report = (later / "report.md").read_text()
    assert "## Outside the stream: the watch families" in report and "- damage " in report
    audit = audit_experiment(later)
    cells = [cell for unit in filled.units for cell in [*unit.evals, *unit.evals_off, *unit.watch]]
    assert audit.problems == [] and audit.cells == len(cells)
    raw = json.loads((later / "metrics.json").read_text())  # a watch cell's count is audited like the others
    cell = next(c for u in raw["units"] if u["arm"] == "base" for c in u["watch"])
    cell["successes"] += 1
    (later / "metrics.json").write_text(json.dumps(raw))
    assert any(p.startswith(f"{cell['trajectories']}: successes is") for p in audit_experiment(later).problems)


def test_a_watch_family_is_not_filled_in_with_weights_that_changed_since(tmp_path):
    out = tmp_path / "out"
    watching(out, three_turns(arms=["base", "sft"]))
    hurts = out / "homes" / "sft-seed0" / "adapters" / "sft-p0" / "hurts.json"
    hurts.unlink()  # the adapter's contents are no longer those its evaluations had
    with pytest.raises(ConfigError, match="no longer holds the weights its evaluations had"):
        fill_watch(Lab(engine=SftHurts().engine, config=three_turns(arms=["base", "sft"], watch=["toy:3"]), out=out,
                       families=[], watch=[make_family("toy:3")]), "sft", 0, 0)
    with pytest.raises(ConfigError, match="no longer holds the weights its evaluations had"):
        watching(out, three_turns(arms=["base", "sft"], watch=["toy:3"]))


def test_a_watch_family_is_filled_in_where_another_process_recorded_the_same_evaluation_last(tmp_path):
    out = tmp_path / "out"
    watching(out, three_turns(arms=["base"]))
    cell = load_metrics(out).units[0].evals[0]
    record = next(path for path in (out / "evals").glob("*.json")
                  if json.loads(path.read_text())["trajectories"] == cell.trajectories)
    twin = out / "units" / "base" / "twin.jsonl"  # another process's evaluation of the same weights, recorded last
    episodes = [json.loads(line) for line in (out / cell.trajectories).read_text().splitlines()]
    twin.write_text("".join(json.dumps(e) + "\n" for e in episodes))
    record.write_text(json.dumps({**json.loads(record.read_text()), "trajectories": "units/base/twin.jsonl"}))
    lab = Lab(engine=SftHurts().engine, config=three_turns(arms=["base"], watch=["toy:3"]), out=out, families=[],
              watch=[make_family("toy:3")])
    assert [c.family for c in fill_watch(lab, "base", 0, 0).watch] == ["toy:3"]  # played alike: the same weights
    episodes[0]["turns"][0]["action"] += " otherwise"
    twin.write_text("".join(json.dumps(e) + "\n" for e in episodes))
    with pytest.raises(ConfigError, match="no longer holds the weights"):
        fill_watch(lab, "base", 0, 1)
