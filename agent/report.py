"""The experiment's report: every number recomputed from metrics.json alone, as report.md and plots.

A[f][j] is the held-out accuracy on family f after phase j of one seed (successes / items of that
unit's evaluation, memory as the arm is measured); t_f is the first phase that trains f; base_f is the
base arm's accuracy on f for the same seed. Per arm and seed:

- final accuracy    mean_f A[f][last]
- forgetting        mean, over the families not trained in the last phase, of
                    max_{t_f <= j < last} A[f][j] - A[f][last]
- forward transfer  mean, over the families with t_f >= 1, of A[f][t_f - 1] - base_f
- gain over base    mean_f A[f][t_f] - base_f (the memory arm's is "the memory gain")
- retention         (arms that fold) Σ_f (Off[f][t_f] - base_f) / Σ_f (M[f][t_f] - base_f), over the
                    families where the memory arm M gained; Off = memory-off accuracy after the fold
- skills folded     folded / (active + folded) skills after the last phase
- skill tokens, tokens generated, wall time: sums over the phases.
The tables give the mean over seeds; the matrices pool the seeds' successes and items (95% Wilson).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from agent.config import ConfigError
from agent.evaluate import wilson_interval
from agent.evolve import write_atomic
from agent.experiment import FOLDING, MEMORY_ON, FamilyEval, Metrics, UnitResult

Matrix = dict[str, list[float]]  # family -> accuracy after each phase


# ------------------------------------------------------------------------------ math
def first_phases(phases: list[str]) -> dict[str, int]:
    return {name: phases.index(name) for name in dict.fromkeys(phases)}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def final_accuracy(matrix: Matrix) -> float:
    return sum(row[-1] for row in matrix.values()) / len(matrix)


def forgetting(matrix: Matrix, phases: list[str]) -> float | None:
    last = len(phases) - 1
    return _mean([max(matrix[f][t:last]) - matrix[f][last]
                  for f, t in first_phases(phases).items() if f != phases[last] and t < last])


def forward_transfer(matrix: Matrix, base: dict[str, float], phases: list[str]) -> float | None:
    return _mean([matrix[f][t - 1] - base[f] for f, t in first_phases(phases).items() if t >= 1])


def gain_over_base(matrix: Matrix, base: dict[str, float], phases: list[str]) -> float:
    return sum(matrix[f][t] - base[f] for f, t in first_phases(phases).items()) / len(first_phases(phases))


def retention(off: Matrix, memory: Matrix, base: dict[str, float], phases: list[str]) -> float | None:
    gained = {f: t for f, t in first_phases(phases).items() if memory[f][t] > base[f]}
    if not gained:
        return None
    kept = sum(off[f][t] - base[f] for f, t in gained.items())
    return kept / sum(memory[f][t] - base[f] for f, t in gained.items())


# --------------------------------------------------------------------- from metrics
class ArmNumbers(BaseModel):
    model_config = ConfigDict(extra="forbid")

    final_accuracy: float
    forgetting: float | None
    forward_transfer: float | None
    gain_over_base: float | None
    retention: float | None
    folded_fraction: float | None
    skill_tokens: float
    generated_tokens: float
    seconds: float


class Target(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str
    arm: str
    value: str
    met: bool | None
    note: str = ""


class Summary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arms: dict[str, ArmNumbers]  # mean over seeds
    per_seed: dict[str, dict[int, ArmNumbers]]
    targets: list[Target]


def units_by_key(metrics: Metrics) -> dict[tuple[str, int, int], UnitResult]:
    return {(unit.arm, unit.seed, unit.phase): unit for unit in metrics.units}


def _eval_of(unit: UnitResult, family: str, off: bool) -> FamilyEval:
    return next(e for e in (unit.evals_off if off else unit.evals) if e.family == family)


def accuracy_matrix(metrics: Metrics, arm: str, seed: int, off: bool = False) -> Matrix:
    units = units_by_key(metrics)
    matrix: Matrix = {}
    for family in metrics.families:
        cells = [_eval_of(units[(arm, seed, phase)], family, off) for phase in range(len(metrics.phases))]
        matrix[family] = [cell.successes / cell.items for cell in cells]
    return matrix


def base_accuracy(metrics: Metrics, seed: int) -> dict[str, float] | None:
    if "base" not in metrics.config.arms:
        return None
    return {family: row[0] for family, row in accuracy_matrix(metrics, "base", seed).items()}


def arm_numbers(metrics: Metrics, arm: str, seed: int) -> ArmNumbers:
    phases, units = metrics.phases, units_by_key(metrics)
    matrix, base = accuracy_matrix(metrics, arm, seed), base_accuracy(metrics, seed)
    kept = None
    if arm in FOLDING and base is not None and "memory" in metrics.config.arms:
        kept = retention(accuracy_matrix(metrics, arm, seed, off=True), accuracy_matrix(metrics, "memory", seed),
                         base, phases)
    skills = units[(arm, seed, len(phases) - 1)].skills
    held = skills.get("active", 0) + skills.get("folded", 0)
    ran = [units[(arm, seed, phase)] for phase in range(len(phases))]
    return ArmNumbers(
        final_accuracy=final_accuracy(matrix),
        forgetting=forgetting(matrix, phases),
        forward_transfer=None if base is None else forward_transfer(matrix, base, phases),
        gain_over_base=None if base is None else gain_over_base(matrix, base, phases),
        retention=kept,
        folded_fraction=skills.get("folded", 0) / held if arm != "base" and held else None,
        skill_tokens=sum(e.skill_tokens for unit in ran for e in unit.evals),
        generated_tokens=sum(unit.generated_tokens for unit in ran),
        seconds=sum(unit.seconds for unit in ran),
    )


def _mean_numbers(numbers: list[ArmNumbers]) -> ArmNumbers:
    averaged = {}
    for key in ArmNumbers.model_fields:
        values = [getattr(item, key) for item in numbers]
        averaged[key] = None if any(value is None for value in values) else sum(values) / len(values)
    return ArmNumbers(**averaged)


def summarize(metrics: Metrics) -> Summary:
    """Every number of the report, from the metrics alone."""
    per_seed = {arm: {seed: arm_numbers(metrics, arm, seed) for seed in metrics.config.seeds}
                for arm in metrics.config.arms}
    arms = {arm: _mean_numbers(list(by_seed.values())) for arm, by_seed in per_seed.items()}
    return Summary(arms=arms, per_seed=per_seed, targets=targets(arms))


def _target(name: str, arm: str, value: float | None, met: Callable[[float], bool], shown: Callable[[float], str],
            missing: str) -> Target:
    if value is None:
        return Target(target=name, arm=arm, value="n/a", met=None, note=missing)
    return Target(target=name, arm=arm, value=shown(value), met=met(value))


def targets(arms: dict[str, ArmNumbers]) -> list[Target]:
    def get(arm: str, key: str) -> float | None:
        return getattr(arms[arm], key) if arm in arms else None

    skillfold, sft = get("skillfold", "forgetting"), get("sft", "forgetting")
    margin = None if skillfold is None or sft is None else sft - skillfold
    return [
        _target("memory gain >= 15 points", "memory", get("memory", "gain_over_base"), lambda v: v >= 0.15, points,
                "needs the memory and base arms"),
        _target("folded retention >= 80%", "skillfold", get("skillfold", "retention"), lambda v: v >= 0.80, percent,
                "needs the skillfold, memory and base arms, and a family the memory arm improved"),
        _target("forgetting <= 2 points", "skillfold", skillfold, lambda v: v <= 0.02, points,
                "needs the skillfold arm and two phases or more"),
        _target(">= half of the skills folded", "skillfold", get("skillfold", "folded_fraction"), lambda v: v >= 0.5,
                percent, "needs the skillfold arm and skills in its memory"),
        _target("skillfold forgets less than sft", "skillfold vs sft", margin, lambda v: v > 0,
                lambda v: f"{points(skillfold)} vs {points(sft)}", "needs the skillfold and sft arms"),
    ]


# --------------------------------------------------------------------------- output
def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f} pts"


def pooled_cell(metrics: Metrics, arm: str, family: str, phase: int, off: bool = False) -> str:
    units = units_by_key(metrics)
    cells = [_eval_of(units[(arm, seed, phase)], family, off) for seed in metrics.config.seeds]
    successes, items = sum(c.successes for c in cells), sum(c.items for c in cells)
    low, high = wilson_interval(successes, items)
    return f"{percent(successes / items)} ({100 * low:.0f}-{100 * high:.0f})"


def _matrix_table(metrics: Metrics, arm: str, off: bool) -> list[str]:
    header = [f"{phase + 1}: {name}" for phase, name in enumerate(metrics.phases)]
    lines = ["| family \\ after phase | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for family in metrics.families:
        row = [pooled_cell(metrics, arm, family, phase, off) for phase in range(len(metrics.phases))]
        lines.append(f"| {family} | " + " | ".join(row) + " |")
    return lines


def render(metrics: Metrics, summary: Summary, plots: list[str]) -> str:
    config = metrics.config
    stream = config.stream
    first_assess = config.eval_items + stream.assess_offset
    lines = [
        "# skillfold experiment", "",
        f"Model: {config.model.name or 'the embedded SmolLM2-135M-Instruct'}. Seeds: "
        f"{', '.join(map(str, config.seeds))}. Arms: {', '.join(config.arms)}.",
        "Stream: " + "; ".join(f"phase {i + 1} {name}" for i, name in enumerate(metrics.phases)) + ".",
        f"Every accuracy: eval-split items 0-{config.eval_items - 1} of each family (never trained on); fold "
        f"decisions use eval items {first_assess}-{first_assess + stream.assess_items - 1}. Fold: "
        f"{stream.fold.method}, {stream.fold.steps} steps of {stream.fold.batch_size} episodes, scheduled every "
        f"{stream.schedule.every}.", "",
        "## Targets", "", "| target | arm | value | status |", "|---|---|---|---|",
    ]
    for target in summary.targets:
        status = "not measured: " + target.note if target.met is None else ("met" if target.met else "MISSED")
        lines.append(f"| {target.target} | {target.arm} | {target.value} | {status} |")
    lines += ["", "## Summary (mean over seeds)", "",
              "| arm | memory | final accuracy | forgetting | forward transfer | gain over base | retention (memory off) "
              "| skills folded | skill tokens | tokens generated | wall time |", "|---|" + "---|" * 10]
    for arm, numbers in summary.arms.items():
        lines.append(
            f"| {arm} | {'on' if MEMORY_ON[arm] else 'off'} | {percent(numbers.final_accuracy)} | "
            f"{points(numbers.forgetting)} | {points(numbers.forward_transfer)} | {points(numbers.gain_over_base)} | "
            f"{percent(numbers.retention)} | {percent(numbers.folded_fraction)} | {numbers.skill_tokens:.0f} | "
            f"{numbers.generated_tokens:.0f} | {numbers.seconds:.0f} s |"
        )
    cells = [cell for unit in metrics.units for cell in [*unit.evals, *unit.evals_off]]
    reused = sum(cell.reused_from is not None for cell in cells)
    if reused:
        lines += ["", f"{reused} of {len(cells)} evaluations reused an identical earlier one (the same weights, items "
                  "and skills in every prompt, greedy decoding): their episodes are copied, their tokens and time "
                  "are not counted again (`reused_from` in metrics.json)."]
    lines += ["", "## Accuracy matrices (pooled over seeds, 95% Wilson interval in points)", ""]
    for arm in config.arms:
        lines += [f"### {arm} (memory {'on' if MEMORY_ON[arm] else 'off'})", "", *_matrix_table(metrics, arm, False), ""]
        if arm in FOLDING:
            lines += [f"### {arm}, memory off", "", *_matrix_table(metrics, arm, True), ""]
    lines += _phase_table(metrics) + _transitions(metrics)
    lines += ["## Plots", "", *[f"![{Path(name).stem}]({name})" for name in plots], "", "## Definitions", "",
              (__doc__ or "").split("\n\n", 1)[1].strip(), ""]
    return "\n".join(lines)


def _phase_table(metrics: Metrics) -> list[str]:
    lines = ["## Per phase (mean over seeds)", "",
             "| arm | phase | trained | train episodes (successes) | skills active/folded/retired | skill tokens "
             "| tokens generated | wall time |", "|---|" + "---|" * 7]
    units = units_by_key(metrics)
    for arm in metrics.config.arms:
        for phase, name in enumerate(metrics.phases):
            ran = [units[(arm, seed, phase)] for seed in metrics.config.seeds]

            def mean(get: Callable[[UnitResult], float], ran: list[UnitResult] = ran) -> float:
                return sum(get(unit) for unit in ran) / len(ran)

            skills = "/".join(f"{mean(lambda unit, key=key: unit.skills.get(key, 0)):.1f}"
                              for key in ("active", "folded", "retired"))
            lines.append(
                f"| {arm} | {phase + 1} | {name} | {mean(lambda unit: unit.train.episodes):.0f} "
                f"({mean(lambda unit: unit.train.successes):.1f}) | {skills} | "
                f"{mean(lambda unit: sum(e.skill_tokens for e in unit.evals)):.0f} | "
                f"{mean(lambda unit: unit.generated_tokens):.0f} | {mean(lambda unit: unit.seconds):.0f} s |"
            )
    return lines + [""]


def _transitions(metrics: Metrics) -> list[str]:
    rows = [(unit, change) for unit in metrics.units for change in unit.transitions]
    if not rows:
        return ["## Status changes", "", "No skill changed status.", ""]
    lines = ["## Status changes", "", "| arm | seed | phase | family | change | skills | memory off | memory on before |",
             "|---|" + "---|" * 7]
    for unit, change in rows:
        evidence = change.get("evidence", {})
        lines.append(f"| {unit.arm} | {unit.seed} | {unit.phase + 1} | {change.get('family')} | {change['kind']} | "
                     f"{len(change.get('skill_ids', []))} | {percent(evidence.get('accuracy_off'))} | "
                     f"{percent(evidence.get('accuracy_on'))} |")
    return lines + [""]


def _save(figure, path: Path) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    temporary = path.with_name(f".{path.name}.tmp")
    figure.savefig(temporary, format="png", dpi=110, bbox_inches="tight")
    os.replace(temporary, path)
    return path.name


def plot_names(metrics: Metrics) -> list[str]:
    """The files `plot` writes, in the report's order."""
    return ["learning_curves.png", *[f"matrix_{arm}.png" for arm in metrics.config.arms], "memory_size.png"]


def plot(metrics: Metrics, out: Path) -> list[str]:
    """Learning curves, one accuracy heatmap per arm, memory size over time (PNG, Agg)."""
    from matplotlib.figure import Figure

    seeds, phases = metrics.config.seeds, list(range(1, len(metrics.phases) + 1))
    matrices = {arm: [accuracy_matrix(metrics, arm, seed) for seed in seeds] for arm in metrics.config.arms}
    mean = {arm: {f: [sum(m[f][p] for m in ms) / len(ms) for p in range(len(phases))] for f in metrics.families}
            for arm, ms in matrices.items()}
    names = []
    panels = ["average", *metrics.families]
    figure = Figure(figsize=(4 * len(panels), 3.4))
    for axis, panel in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for arm, rows in mean.items():
            curve = [sum(rows[f][p] for f in rows) / len(rows) for p in range(len(phases))] if panel == "average" else rows[panel]
            axis.plot(phases, curve, marker="o", label=arm)
        axis.set(title=panel, xlabel="after phase", ylim=(-0.02, 1.02), xticks=phases)
    figure.axes[0].set_ylabel("held-out accuracy")
    figure.axes[0].legend(fontsize=8)
    names.append(_save(figure, out / "learning_curves.png"))
    for arm, rows in mean.items():
        figure = Figure(figsize=(1.6 * len(phases) + 3, 0.6 * len(rows) + 1.5))
        axis = figure.subplots()
        axis.imshow([rows[f] for f in metrics.families], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for r, family in enumerate(metrics.families):
            for c in range(len(phases)):
                value = rows[family][c]
                axis.text(c, r, f"{100 * value:.0f}", ha="center", va="center", fontsize=9,
                          color="black" if value > 0.6 else "white")
        axis.set(title=f"{arm}: accuracy (%) after each phase", xticks=range(len(phases)), xticklabels=phases,
                 yticks=range(len(metrics.families)), yticklabels=metrics.families, xlabel="after phase")
        names.append(_save(figure, out / f"matrix_{arm}.png"))
    names.append(_memory_plot(metrics, out, phases))
    return names


def _memory_plot(metrics: Metrics, out: Path, phases: list[int]) -> str:
    from matplotlib.figure import Figure

    units = units_by_key(metrics)
    arms = [arm for arm in metrics.config.arms if arm != "base"] or ["base"]
    figure = Figure(figsize=(4 * len(arms), 3.2))
    for axis, arm in zip(figure.subplots(1, len(arms), squeeze=False)[0], arms, strict=True):
        for status in ("active", "folded", "retired"):
            counts = [sum(units[(arm, s, p - 1)].skills.get(status, 0) for s in metrics.config.seeds)
                      / len(metrics.config.seeds) for p in phases]
            axis.plot(phases, counts, marker="o", label=status)
        axis.set(title=f"{arm}: skills in memory", xlabel="after phase", xticks=phases)
    figure.axes[0].legend(fontsize=8)
    return _save(figure, out / "memory_size.png")


def load_metrics(out: Path) -> Metrics:
    path = out / "metrics.json"
    if not path.is_file():
        raise ConfigError(f"{out} holds no metrics.json; run `skillfold experiment CONFIG --out {out}` first")
    return Metrics.model_validate_json(path.read_text())


def write_report(out: Path) -> Summary:
    """report.md and the plots in `out`, from `out/metrics.json` alone; returns the numbers."""
    metrics = load_metrics(out)
    summary = summarize(metrics)
    write_atomic(out / "report.md", render(metrics, summary, plot(metrics, out)))
    return summary
