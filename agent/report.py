"""The experiment's report: every number recomputed from metrics.json alone, as report.md and plots.

A[f][j] is the held-out accuracy on family f after phase j of one seed (successes / items of that
unit's evaluation, memory as the arm is measured); t_f is the first phase that trains f; base_f is the
base arm's accuracy on f for the same seed. Per arm and seed:

- final accuracy    mean_f A[f][last]
- interference      mean, over the families with t_f >= 1, of max(0, max_{0 <= j < t_f} base_f - A[f][j]): how
                    far the phases of other families pushed a family below base before its own phase (a family
                    that only rose counts 0: that is forward transfer, and must not offset another's drop)
- forgetting        mean, over the families not trained in the last phase, of
                    max_{t_f <= j < last} A[f][j] - A[f][last]: the drop after its own phase
- forward transfer  mean, over the families with t_f >= 1, of A[f][t_f - 1] - base_f
- gain over base    mean_f A[f][t_f] - base_f (the memory arm's is "the memory gain")
- retention         (arms that fold) Σ_f (Off[f][t_f] - base_f) / Σ_f (M[f][t_f] - base_f), over the
                    families where the memory arm M gained; Off = memory-off accuracy after the fold
- skills folded     folded / (active + folded) skills after the last phase
- skill tokens, tokens generated, wall time: sums over the phases.
- (±x)              interference and forgetting: half-width of a 95% interval, normal approximation, cells
                    treated as independent. Each family's two cells (base_f and A[f][j], or A[f][j] and
                    A[f][last], j where its drop is largest) pool their successes and items over the seeds:
                    v_f = p1(1-p1)/n1 + p2(1-p2)/n2, and x = 1.96 sqrt(Σ_f v_f) / F over the F families of
                    the mean (a family whose drop counts 0 still adds its cells' variance). It is 0 where
                    both cells are 0% or 100%, and it ignores that j was picked as the largest drop. The
                    margin over sft adds the variances of both arms' two numbers.
The tables give the mean over seeds, and a family's interference or forgetting is its mean over seeds
("on every family": the worst of these); the matrices pool the seeds' successes and items (95% Wilson).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from agent.config import ConfigError
from agent.evaluate import wilson_interval
from agent.evolve import write_atomic
from agent.experiment import FOLDING, MEMORY_ON, FamilyEval, Metrics, UnitResult

Matrix = dict[str, list[float]]  # family -> accuracy after each phase
Cell = tuple[int, int]  # successes, items
Counts = dict[str, list[Cell]]  # family -> cell after each phase
Z95 = 1.96


# ------------------------------------------------------------------------------ math
def first_phases(phases: list[str]) -> dict[str, int]:
    return {name: phases.index(name) for name in dict.fromkeys(phases)}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def final_accuracy(matrix: Matrix) -> float:
    return sum(row[-1] for row in matrix.values()) / len(matrix)


def forgetting_by_family(matrix: Matrix, phases: list[str]) -> dict[str, float]:
    """The drop after a family's own phase: max_{t_f <= j < last} A[f][j] - A[f][last]."""
    last = len(phases) - 1
    return {f: max(matrix[f][t:last]) - matrix[f][last]
            for f, t in first_phases(phases).items() if f != phases[last] and t < last}


def forgetting(matrix: Matrix, phases: list[str]) -> float | None:
    return _mean(list(forgetting_by_family(matrix, phases).values()))


def interference_by_family(matrix: Matrix, base: dict[str, float], phases: list[str]) -> dict[str, float]:
    """The drop below base before a family's own phase: max(0, max_{0 <= j < t_f} base_f - A[f][j]) (t_f >= 1)."""
    return {f: max(0.0, *(base[f] - matrix[f][j] for j in range(t)))
            for f, t in first_phases(phases).items() if t >= 1}


def interference(matrix: Matrix, base: dict[str, float], phases: list[str]) -> float | None:
    return _mean(list(interference_by_family(matrix, base, phases).values()))


def worst(by_family: dict[str, float]) -> float | None:
    return max(by_family.values()) if by_family else None


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


WATCH_DEFINITIONS = """\
- damage            (watch families W: families no phase trains, evaluated memory off after every phase) mean,
                    over W, of max(0, max_j base_w - W[w][j]), base_w the base arm's accuracy on w: how far the
                    weights' training pushed a family outside the stream below base. Its (±x) is interference's,
                    over the watch families. Memory on and off agree there: no skill of a watch family is in
                    memory."""


def damage_by_family(watched: Counts, base: Counts) -> dict[str, float]:
    """The drop below base anywhere in the stream: max(0, max_j base_w - W[w][j]) per watch family."""
    return {w: max(0.0, *(_rate(base[w][0]) - _rate(cell) for cell in row)) for w, row in watched.items()}


def damage_cells(watched: Counts, base: Counts) -> list[tuple[Cell, Cell]]:
    """Per watch family: (its base cell, its lowest cell)."""
    return [(base[w][0], min(row, key=_rate)) for w, row in watched.items()]


def _rate(cell: Cell) -> float:
    return cell[0] / cell[1]


def half_width(pairs: list[tuple[Cell, Cell]]) -> float | None:
    """95% half-width of the mean over pairs of a difference of two proportions (normal approximation, every
    cell independent): 1.96 sqrt(Σ p1(1-p1)/n1 + p2(1-p2)/n2) / len(pairs)."""
    if not pairs:
        return None
    variance = sum(_rate(cell) * (1 - _rate(cell)) / cell[1] for pair in pairs for cell in pair)
    return Z95 * math.sqrt(variance) / len(pairs)


def interference_cells(counts: Counts, base: dict[str, Cell], phases: list[str]) -> list[tuple[Cell, Cell]]:
    """Per family with t_f >= 1: (base cell, the cell before t_f where it is lowest)."""
    return [(base[f], min(counts[f][:t], key=_rate)) for f, t in first_phases(phases).items() if t >= 1]


def forgetting_cells(counts: Counts, phases: list[str]) -> list[tuple[Cell, Cell]]:
    """Per family not trained last: (its best cell from t_f on, before the last phase; its last cell)."""
    last = len(phases) - 1
    return [(max(counts[f][t:last], key=_rate), counts[f][last])
            for f, t in first_phases(phases).items() if f != phases[last] and t < last]


# --------------------------------------------------------------------- from metrics
class ArmNumbers(BaseModel):
    model_config = ConfigDict(extra="forbid")

    final_accuracy: float
    interference: float | None
    interference_half_width: float | None  # 95%, see the definitions
    interference_worst: float | None  # the largest over families
    interference_by_family: dict[str, float]
    forgetting: float | None
    forgetting_half_width: float | None
    forgetting_worst: float | None
    forgetting_by_family: dict[str, float]
    forward_transfer: float | None
    gain_over_base: float | None
    retention: float | None
    folded_fraction: float | None
    damage: float | None = None  # the watch families (`WATCH_DEFINITIONS`); None without them
    damage_half_width: float | None = None
    damage_worst: float | None = None
    damage_by_family: dict[str, float] = {}
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


def cell_counts(metrics: Metrics, arm: str, seeds: list[int], off: bool = False) -> Counts:
    """Successes and items of every cell, pooled over `seeds`."""
    units = units_by_key(metrics)
    counts: Counts = {}
    for family in metrics.families:
        counts[family] = []
        for phase in range(len(metrics.phases)):
            cells = [_eval_of(units[(arm, seed, phase)], family, off) for seed in seeds]
            counts[family].append((sum(c.successes for c in cells), sum(c.items for c in cells)))
    return counts


def watch_counts(metrics: Metrics, arm: str, seeds: list[int]) -> Counts | None:
    """Successes and items of every watch family after every phase, pooled over `seeds`; None without watch
    families, or where a unit has not evaluated one yet (run the experiment again to fill them in)."""
    units = units_by_key(metrics)
    counts: Counts = {}
    for family in metrics.watch:
        counts[family] = []
        for phase in range(len(metrics.phases)):
            cells = [next((e for e in units[(arm, seed, phase)].watch if e.family == family), None) for seed in seeds]
            if not cells or any(cell is None for cell in cells):
                return None
            counts[family].append((sum(c.successes for c in cells), sum(c.items for c in cells)))  # type: ignore[union-attr]
    return counts or None


def damage_numbers(metrics: Metrics, arm: str, seeds: list[int]) -> dict[str, Any]:
    """The arm's damage to the watch families, per family and mean, and its 95% half-width, from its cells
    pooled over `seeds` (the mean over seeds is `_mean_numbers`'), nothing where it cannot be had."""
    watched = watch_counts(metrics, arm, seeds)
    base = watch_counts(metrics, "base", seeds) if "base" in metrics.config.arms else None
    if watched is None or base is None:
        return {}
    by_family = damage_by_family(watched, base)
    return {"damage": _mean(list(by_family.values())), "damage_worst": worst(by_family),
            "damage_by_family": by_family, "damage_half_width": half_width(damage_cells(watched, base))}


def drop_half_widths(metrics: Metrics, arm: str, seeds: list[int]) -> dict[str, float | None]:
    """The 95% half-widths of the arm's interference and forgetting, from its cells pooled over `seeds`."""
    counts = cell_counts(metrics, arm, seeds)
    base = ({f: row[0] for f, row in cell_counts(metrics, "base", seeds).items()}
            if "base" in metrics.config.arms else None)
    return {"interference_half_width": None if base is None else half_width(
                interference_cells(counts, base, metrics.phases)),
            "forgetting_half_width": half_width(forgetting_cells(counts, metrics.phases))}


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
    interfered = {} if base is None else interference_by_family(matrix, base, phases)
    forgot = forgetting_by_family(matrix, phases)
    return ArmNumbers(
        final_accuracy=final_accuracy(matrix),
        interference=None if base is None else _mean(list(interfered.values())),
        interference_worst=worst(interfered),
        interference_by_family=interfered,
        forgetting=_mean(list(forgot.values())),
        forgetting_worst=worst(forgot),
        forgetting_by_family=forgot,
        **drop_half_widths(metrics, arm, [seed]),
        forward_transfer=None if base is None else forward_transfer(matrix, base, phases),
        gain_over_base=None if base is None else gain_over_base(matrix, base, phases),
        retention=kept,
        **damage_numbers(metrics, arm, [seed]),
        folded_fraction=skills.get("folded", 0) / held if arm != "base" and held else None,
        skill_tokens=sum(e.skill_tokens for unit in ran for e in unit.evals),
        generated_tokens=sum(unit.generated_tokens for unit in ran),
        seconds=sum(unit.seconds for unit in ran),
    )


def _mean_numbers(numbers: list[ArmNumbers], half_widths: dict[str, float | None]) -> ArmNumbers:
    """The mean over seeds; a family's value is its mean, the worst family the largest of those, and the
    half-widths come from the cells pooled over the seeds (`half_widths`)."""
    averaged: dict = {}
    for key in ArmNumbers.model_fields:
        values = [getattr(item, key) for item in numbers]
        if isinstance(values[0], dict):
            averaged[key] = {name: sum(value[name] for value in values) / len(values) for name in values[0]
                             if all(name in value for value in values)}  # damage: a seed may lack its watch cells
        else:
            averaged[key] = None if any(value is None for value in values) else sum(values) / len(values)
    for kind in ("interference", "forgetting", "damage"):
        averaged[f"{kind}_worst"] = worst(averaged[f"{kind}_by_family"])
    return ArmNumbers(**{**averaged, **half_widths})


def summarize(metrics: Metrics) -> Summary:
    """Every number of the report, from the metrics alone."""
    seeds = metrics.config.seeds
    per_seed = {arm: {seed: arm_numbers(metrics, arm, seed) for seed in seeds} for arm in metrics.config.arms}
    arms = {arm: _mean_numbers(list(by_seed.values()), {
                **drop_half_widths(metrics, arm, seeds),
                "damage_half_width": damage_numbers(metrics, arm, seeds).get("damage_half_width")})
            for arm, by_seed in per_seed.items()}
    return Summary(arms=arms, per_seed=per_seed, targets=targets(arms, watched=bool(metrics.watch)))


def _target(name: str, arm: str, value: float | None, met: Callable[[float], bool], shown: Callable[[float], str],
            missing: str) -> Target:
    if value is None:
        return Target(target=name, arm=arm, value="n/a", met=None, note=missing)
    return Target(target=name, arm=arm, value=shown(value), met=met(value))


def drop_total(numbers: ArmNumbers | None) -> tuple[float, float] | None:
    """Interference + forgetting and its 95% half-width (the two treated as independent)."""
    if numbers is None:
        return None
    parts = [(numbers.interference, numbers.interference_half_width),
             (numbers.forgetting, numbers.forgetting_half_width)]
    if any(value is None or width is None for value, width in parts):
        return None
    return sum(value for value, _ in parts), math.sqrt(sum(width ** 2 for _, width in parts))  # type: ignore[operator]


def damage_total(numbers: ArmNumbers | None) -> tuple[float, float] | None:
    """Mean damage outside the stream and its 95% half-width."""
    if numbers is None or numbers.damage is None or numbers.damage_half_width is None:
        return None
    return numbers.damage, numbers.damage_half_width


def on_every_family(name: str, by_family: dict[str, float], missing: str) -> Target:
    """skillfold's worst drop over the families, met at 2 points or less."""
    return _target(name, "skillfold", worst(by_family), lambda v: v <= 0.02,
                   lambda v: f"worst {points(v)} ({max(by_family, key=by_family.__getitem__)})", missing)


def beats_sft(name: str, sft: tuple[float, float] | None, skillfold: tuple[float, float] | None,
              missing: str) -> Target:
    """sft's drop minus skillfold's (each a (value, 95% half-width) pair), met when the margin clears the
    interval of the difference (the two arms' variances added)."""
    if sft is None or skillfold is None:
        return _target(name, "sft - skillfold", None, bool, str, missing)
    margin, width = sft[0] - skillfold[0], math.sqrt(sft[1] ** 2 + skillfold[1] ** 2)
    return _target(name, "sft - skillfold", margin, lambda v: v - width > 0,
                   lambda v: f"{interval(v, width)}: {points(sft[0])} vs {points(skillfold[0])}", missing)


def targets(arms: dict[str, ArmNumbers], watched: bool = False) -> list[Target]:
    def get(arm: str, key: str):
        return getattr(arms[arm], key) if arm in arms else None

    rows = [
        _target("memory gain >= 15 points", "memory", get("memory", "gain_over_base"), lambda v: v >= 0.15, points,
                "needs the memory and base arms"),
        _target("memory-off gain >= 90% of the memory gain", "skillfold", get("skillfold", "retention"),
                lambda v: v >= 0.90, percent,
                "needs the skillfold, memory and base arms, and a family the memory arm improved"),
        on_every_family("interference <= 2 points on every family", get("skillfold", "interference_by_family") or {},
                        "needs the skillfold and base arms and a family first trained after phase 1"),
        on_every_family("forgetting <= 2 points on every family", get("skillfold", "forgetting_by_family") or {},
                        "needs the skillfold arm and two phases or more"),
        _target(">= half of the skills folded", "skillfold", get("skillfold", "folded_fraction"), lambda v: v >= 0.5,
                percent, "needs the skillfold arm and skills in its memory"),
        beats_sft("skillfold beats sft on interference + forgetting beyond the 95% interval",
                  drop_total(arms.get("sft")), drop_total(arms.get("skillfold")),
                  "needs the skillfold, sft and base arms and two phases or more"),
    ]
    if watched:
        rows += watch_targets(arms)
    return rows


def watch_targets(arms: dict[str, ArmNumbers]) -> list[Target]:
    """The damage outside the stream: skillfold's on every watch family, and against sft's."""
    return [on_every_family("damage outside the stream <= 2 points on every watched family",
                            getattr(arms.get("skillfold"), "damage_by_family", None) or {},
                            "needs the skillfold and base arms, every unit's watch evaluations"),
            beats_sft("skillfold beats sft on damage outside the stream beyond the 95% interval",
                      damage_total(arms.get("sft")), damage_total(arms.get("skillfold")),
                      "needs the skillfold, sft and base arms, every unit's watch evaluations")]


# --------------------------------------------------------------------------- output
def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f} pts"


def interval(value: float | None, half: float | None) -> str:
    return points(value) if value is None or half is None else f"{points(value)} (±{100 * half:.1f})"


def pooled_cell(metrics: Metrics, arm: str, family: str, phase: int, off: bool = False) -> str:
    units = units_by_key(metrics)
    cells = [_eval_of(units[(arm, seed, phase)], family, off) for seed in metrics.config.seeds]
    return cell_text((sum(c.successes for c in cells), sum(c.items for c in cells)))


def cell_text(cell: Cell) -> str:
    """A pooled cell as the tables show it: accuracy and its 95% Wilson interval in points."""
    low, high = wilson_interval(*cell)
    return f"{percent(_rate(cell))} ({100 * low:.0f}-{100 * high:.0f})"


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
        f"{stream.schedule.every}.", *([f"Watched outside the stream (no phase trains them; memory off, eval items "
                                         f"0-{config.eval_items - 1}): {', '.join(metrics.watch)}."]
                                        if metrics.watch else []), "",
        "## Targets", "", "| target | arm | value | status |", "|---|---|---|---|",
    ]
    for target in summary.targets:
        status = "not measured: " + target.note if target.met is None else ("met" if target.met else "MISSED")
        lines.append(f"| {target.target} | {target.arm} | {target.value} | {status} |")
    lines += ["", "## Summary (mean over seeds)", "",
              "| arm | memory | final accuracy | interference | forgetting | forward transfer | gain over base "
              "| retention (memory off) | skills folded | skill tokens | tokens generated | wall time |",
              "|---|" + "---|" * 11]
    for arm, numbers in summary.arms.items():
        lines.append(
            f"| {arm} | {'on' if MEMORY_ON[arm] else 'off'} | {percent(numbers.final_accuracy)} | "
            f"{interval(numbers.interference, numbers.interference_half_width)} | "
            f"{interval(numbers.forgetting, numbers.forgetting_half_width)} | "
            f"{points(numbers.forward_transfer)} | {points(numbers.gain_over_base)} | "
            f"{percent(numbers.retention)} | {percent(numbers.folded_fraction)} | {numbers.skill_tokens:.0f} | "
            f"{numbers.generated_tokens:.0f} | {numbers.seconds:.0f} s |"
        )
    cells = [cell for unit in metrics.units for cell in [*unit.evals, *unit.evals_off, *unit.watch]]
    reused = sum(cell.reused_from is not None for cell in cells)
    if reused:
        lines += ["", f"{reused} of {len(cells)} evaluations reused an identical earlier one (the same weights, items "
                  "and skills in every prompt, greedy decoding): their episodes are copied, their tokens and time "
                  "are not counted again (`reused_from` in metrics.json)."]
    lines += _drops_table(metrics, summary)
    if metrics.watch:
        lines += _watch_table(metrics, summary)
    lines += ["", "## Accuracy matrices (pooled over seeds, 95% Wilson interval in points)", ""]
    for arm in config.arms:
        lines += [f"### {arm} (memory {'on' if MEMORY_ON[arm] else 'off'})", "", *_matrix_table(metrics, arm, False), ""]
        if arm in FOLDING:
            lines += [f"### {arm}, memory off", "", *_matrix_table(metrics, arm, True), ""]
    lines += _phase_table(metrics)
    if "grpo" in config.arms or "routed" in config.arms:  # at equal optimizer steps and rollouts, and what it bought
        lines += _compute_table(metrics) + _efficiency_table(metrics)
    if "grpo" in config.arms and "skillfold" in config.arms:
        lines += _against_rl(metrics, summary)
    if "routed" in config.arms:
        lines += _routing_table(metrics)
    lines += _transitions(metrics)
    lines += ["## Plots", "", *[f"![{Path(name).stem}]({name})" for name in plots], "", "## Definitions", "",
              (__doc__ or "").split("\n\n", 1)[1].strip(), *([WATCH_DEFINITIONS] if metrics.watch else []), ""]
    return "\n".join(lines)


def _drops_table(metrics: Metrics, summary: Summary) -> list[str]:
    lines = ["", "## Interference and forgetting per family (mean over seeds)", "",
             "| arm | drop | " + " | ".join(metrics.families) + " |", "|---|---|" + "---|" * len(metrics.families)]
    for arm, numbers in summary.arms.items():
        for kind in ("interference", "forgetting"):
            by_family = getattr(numbers, f"{kind}_by_family")
            lines.append(f"| {arm} | {kind} | " + " | ".join(points(by_family.get(f)) for f in metrics.families) + " |")
    return lines


def _watch_table(metrics: Metrics, summary: Summary) -> list[str]:
    """The watch families after every phase, memory off, pooled over seeds, and each arm's damage."""
    header = [f"{phase + 1}: {name}" for phase, name in enumerate(metrics.phases)]
    lines = ["", "## Outside the stream: the watch families (memory off, pooled over seeds, 95% Wilson interval)", "",
             "| arm | family | " + " | ".join(f"after {name}" for name in header) + " | damage |",
             "|---|---|" + "---|" * (len(header) + 1)]
    for arm, numbers in summary.arms.items():
        counts = watch_counts(metrics, arm, metrics.config.seeds)
        for family in metrics.watch:
            row = ["not evaluated yet"] * len(header) if counts is None else [cell_text(c) for c in counts[family]]
            lines.append(f"| {arm} | {family} | " + " | ".join(row) + f" | {points(numbers.damage_by_family.get(family))} |")
    lines += ["", "Mean damage: " + "; ".join(f"{arm} {interval(numbers.damage, numbers.damage_half_width)}"
                                              for arm, numbers in summary.arms.items()) + "."]
    return lines


def _phase_means(metrics: Metrics):
    """(arm, phase index, phase name, mean) for every arm and phase, in table order; `mean(get)` is
    `get(unit)` averaged over the seeds' units of that arm and phase."""
    units = units_by_key(metrics)
    for arm in metrics.config.arms:
        for phase, name in enumerate(metrics.phases):
            ran = [units[(arm, seed, phase)] for seed in metrics.config.seeds]

            def mean(get: Callable[[UnitResult], float], ran: list[UnitResult] = ran) -> float:
                return sum(get(unit) for unit in ran) / len(ran)

            yield arm, phase, name, mean


def _compute_table(metrics: Metrics) -> list[str]:
    """What each arm spent on its weights per phase: optimizer steps and the trainer's rollouts (fold or
    GRPO episodes; the fast path's train episodes are in the table above). Shown when a grpo arm ran, so
    that RL and the folds are compared at equal steps and rollouts."""
    lines = ["## Training compute (mean over seeds)", "",
             "| arm | phase | trained | optimizer steps | trainer rollouts | rollout tokens |", "|---|" + "---|" * 5]
    for arm, phase, name, mean in _phase_means(metrics):
        lines.append(
            f"| {arm} | {phase + 1} | {name} | {mean(lambda unit: unit.train.optimizer_steps):.0f} | "
            f"{mean(lambda unit: unit.train.rollouts):.0f} | "
            f"{mean(lambda unit: unit.train.fold_generated_tokens + unit.train.rl_generated_tokens):.0f} |"
        )
    return lines + [""]


# ------------------------------------------------------------- what the weights cost, and the RL question
def spent(metrics: Metrics, arm: str) -> tuple[float, float]:
    """(rollouts, training tokens) the arm spent over the stream, mean over seeds: the fast path's train episodes
    plus the trainer's rollouts (folds' or GRPO's, replays and protected prompts included), and the tokens the
    model generated in them. Probe checks and evaluations are not counted."""
    units = [unit for unit in metrics.units if unit.arm == arm]
    seeds = len(metrics.config.seeds)
    rollouts = sum(unit.train.episodes + unit.train.rollouts for unit in units) / seeds
    tokens = sum(unit.train.generated_tokens + unit.train.fold_generated_tokens + unit.train.rl_generated_tokens
                 for unit in units) / seeds
    return rollouts, tokens


def final_cells(metrics: Metrics, arm: str, off: bool = False) -> dict[str, Cell]:
    """Each family's cell after the last phase, pooled over the seeds."""
    return {family: row[-1] for family, row in cell_counts(metrics, arm, metrics.config.seeds, off).items()}


def _mean_rate(cells: dict[str, Cell]) -> float:
    return sum(map(_rate, cells.values())) / len(cells)


def _variance_of_mean(cells: dict[str, Cell]) -> float:
    """Variance of the mean over families of the cells' proportions (binomial, cells independent)."""
    return sum(_rate(cell) * (1 - _rate(cell)) / cell[1] for cell in cells.values()) / len(cells) ** 2


def _per(value: float, half: float, amount: float, unit: float) -> str:
    if amount <= 0:
        return "n/a"
    return f"{100 * value * unit / amount:+.2f} pts (±{100 * half * unit / amount:.2f})"


def _contenders(metrics: Metrics) -> list[tuple[str, str, bool]]:
    """(label, arm, memory off) for every arm as measured, and the folding arms also with memory off."""
    rows = []
    for arm in metrics.config.arms:
        rows.append((arm, arm, False))
        if arm in FOLDING:
            rows.append((f"{arm}, memory off", arm, True))
    return rows


def _efficiency_table(metrics: Metrics) -> list[str]:
    """Held-out accuracy bought per rollout and per training token, for every arm (shown when grpo or routed ran)."""
    lines = ["## Sample efficiency (mean over seeds)", "",
             "Final gain: final accuracy minus the base arm's, 95% interval from the pooled final cells of both. "
             "Rollouts: the fast path's train episodes plus the trainer's rollouts; training tokens: the tokens the "
             "model generated in them (probe checks and evaluations not counted). Per 100 rollouts and per 10k "
             "training tokens: the final gain divided by what was spent.", "",
             "| arm | rollouts | training tokens | final accuracy | final gain | per 100 rollouts "
             "| per 10k training tokens |", "|---|" + "---|" * 6]
    base = final_cells(metrics, "base") if "base" in metrics.config.arms else None
    for label, arm, off in _contenders(metrics):
        cells = final_cells(metrics, arm, off)
        rollouts, tokens = spent(metrics, arm)
        row = f"| {label} | {rollouts:.0f} | {tokens:.0f} | {percent(_mean_rate(cells))} | "
        if base is None or arm == "base":
            lines.append(row + "n/a | n/a | n/a |")
            continue
        gain = _mean_rate(cells) - _mean_rate(base)
        half = Z95 * math.sqrt(_variance_of_mean(cells) + _variance_of_mean(base))
        lines.append(row + f"{interval(gain, half)} | {_per(gain, half, rollouts, 100)} | "
                     f"{_per(gain, half, tokens, 10_000)} |")
    return lines + [""]


def _verdict(difference: float | None, half: float | None, higher_is_better: bool) -> str:
    if difference is None or half is None:
        return "n/a"
    better = difference if higher_is_better else -difference
    if better - half > 0:
        return "skillfold wins"
    if better + half < 0:
        return "grpo wins"
    return "no difference beyond the interval"


def against_rl(metrics: Metrics, summary: Summary) -> list[tuple[str, str, str, str, str]]:
    """skillfold against grpo, measure by measure: (measure, skillfold, grpo, skillfold - grpo with its 95%
    interval, verdict). Accuracies and gains: the pooled final cells (the per-rollout and per-token differences
    carry the base arm's cells once, through both gains); interference and forgetting: the arms' numbers and
    half-widths of the summary, taken as independent."""
    rows = []
    grpo = final_cells(metrics, "grpo")
    grpo_rollouts, grpo_tokens = spent(metrics, "grpo")
    base = final_cells(metrics, "base") if "base" in metrics.config.arms else None
    for label, off in (("skillfold", False), ("skillfold, memory off", True)):
        mine = final_cells(metrics, "skillfold", off)
        difference = _mean_rate(mine) - _mean_rate(grpo)
        half = Z95 * math.sqrt(_variance_of_mean(mine) + _variance_of_mean(grpo))
        rows.append((f"final accuracy ({label})", percent(_mean_rate(mine)), percent(_mean_rate(grpo)),
                     interval(difference, half), _verdict(difference, half, True)))
        for family in metrics.families:  # where each wins: family by family
            one, other = {family: mine[family]}, {family: grpo[family]}
            difference = _rate(mine[family]) - _rate(grpo[family])
            half = Z95 * math.sqrt(_variance_of_mean(one) + _variance_of_mean(other))
            rows.append((f"final accuracy on {family} ({label})", percent(_rate(mine[family])),
                         percent(_rate(grpo[family])), interval(difference, half), _verdict(difference, half, True)))
        if base is None:
            continue
        rollouts, tokens = spent(metrics, "skillfold")
        for amount, theirs, unit, name in ((rollouts, grpo_rollouts, 100, "per 100 rollouts"),
                                           (tokens, grpo_tokens, 10_000, "per 10k training tokens")):
            if amount <= 0 or theirs <= 0:
                continue
            mine_per = (_mean_rate(mine) - _mean_rate(base)) * unit / amount
            theirs_per = (_mean_rate(grpo) - _mean_rate(base)) * unit / theirs
            variance = (_variance_of_mean(mine) * (unit / amount) ** 2 + _variance_of_mean(grpo) * (unit / theirs) ** 2
                        + _variance_of_mean(base) * (unit / amount - unit / theirs) ** 2)
            difference, half = mine_per - theirs_per, Z95 * math.sqrt(variance)
            rows.append((f"final gain {name} ({label})", f"{100 * mine_per:+.2f} pts", f"{100 * theirs_per:+.2f} pts",
                         f"{100 * difference:+.2f} pts (±{100 * half:.2f})", _verdict(difference, half, True)))
    mine_numbers, theirs_numbers = summary.arms["skillfold"], summary.arms["grpo"]
    for kind in ("interference", "forgetting"):
        value, theirs = getattr(mine_numbers, kind), getattr(theirs_numbers, kind)
        halves = [getattr(mine_numbers, f"{kind}_half_width"), getattr(theirs_numbers, f"{kind}_half_width")]
        if value is None or theirs is None or None in halves:
            continue
        difference, half = value - theirs, math.sqrt(sum(h ** 2 for h in halves))  # type: ignore[operator]
        rows.append((kind, points(value), points(theirs), interval(difference, half),
                     _verdict(difference, half, False)))
    return rows


def _against_rl(metrics: Metrics, summary: Summary) -> list[str]:
    rows = against_rl(metrics, summary)
    lines = ["## skillfold against grpo (mean over seeds, 95% intervals)", "",
             "| measure | skillfold | grpo | skillfold - grpo | verdict |", "|---|---|---|---|---|",
             *[f"| {' | '.join(row)} |" for row in rows], ""]
    for verdict, say in (("skillfold wins", "skillfold beats grpo on"), ("grpo wins", "grpo beats skillfold on"),
                         ("no difference beyond the interval", "Not told apart by the 95% interval")):
        named = [row[0] for row in rows if row[4] == verdict]
        lines.append(f"- {say}: {'; '.join(named) if named else 'none'}.")
    return lines + [""]


def _routing_table(metrics: Metrics) -> list[str]:
    """Where the routed arm's held-out prompts went, per phase and family (pooled over seeds), and what
    switching adapters cost (evaluations reused from an identical earlier one switched nothing)."""
    units = units_by_key(metrics)
    lines = ["## Routing (the routed arm, pooled over seeds)", "",
             "Each held-out prompt is served the adapter of the family the memory's retrieval picks for it: its "
             "own family's (own), another family's (other), or the base model (no family near enough, or one "
             "without an adapter).", "",
             "| phase | family | own | other | base | adapter switches | switch seconds | per request |",
             "|---|" + "---|" * 7]
    for phase in range(len(metrics.phases)):
        for family in metrics.families:
            cells = [_eval_of(units[("routed", seed, phase)], family, False) for seed in metrics.config.seeds]
            routed = [cell.routing for cell in cells if cell.routing]
            if not routed:
                continue
            items = sum(cell.items for cell in cells if cell.routing)
            share = {key: sum(r[key] for r in routed) / items for key in ("own", "other", "base")}
            fresh = [cell.routing for cell in cells if cell.routing and cell.reused_from is None]
            lines.append(
                f"| {phase + 1} | {family} | {percent(share['own'])} | {percent(share['other'])} | "
                f"{percent(share['base'])} | {sum(r['switches'] for r in fresh)} | "
                f"{sum(r['switch_seconds'] for r in fresh):.2f} | {'yes' if routed[0]['per_request'] else 'no'} |")
    return lines + [""]


def _phase_table(metrics: Metrics) -> list[str]:
    lines = ["## Per phase (mean over seeds)", "",
             "| arm | phase | trained | train episodes (successes) | skills active/folded/retired | skill tokens "
             "| tokens generated | wall time |", "|---|" + "---|" * 7]
    for arm, phase, name, mean in _phase_means(metrics):
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
