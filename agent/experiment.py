"""`skillfold experiment CONFIG --out DIR`: the arms of the comparison, run on one stream of families.

Every arm plays the same phases with the same seeds and is measured on the same held-out items:
- `base`: the model alone. Evaluated once per seed; later phases reuse that evaluation (nothing changes);
- `memory`: the fast path only (the evolve loop with no folds); evaluated with memory on;
- `sft`: the fast path, then LoRA SFT on the phase's successful train episodes (`learners.sft`) with the
  fold's steps and batch size; evaluated with memory off (what the weights learned);
- `fold`: the fast path and folds on the stream's schedule, skills never marked folded; evaluated with
  memory on and the adapter;
- `skillfold`: the full evolve loop; evaluated with memory on, where folded skills have left the prompt;
- `grpo` (not among the default arms; name it in `arms`): no memory, no fast path; GRPO on the phase's
  family (`learners.grpo`) with the fold's steps, rollouts per step (`batch_size`) and trainer settings,
  continuing the earlier phases' adapter; evaluated with memory off. Its report counts its optimizer
  steps and rollouts beside the folds' (`agent.report`, "Training compute");
- `routed` (not among the default arms): the fast path, then the phase's family folded alone, from the
  base model, into an adapter of its own (`agent.routing`); evaluated with no skills in the prompt, each
  held-out prompt served the adapter of the family the memory's retrieval picks for it (the base model
  where it picks none), per group of prompts on the HF engine and per request on vLLM
  (`engines.routed`). Its cells record where each prompt was routed and what the adapter switches cost.
After every phase, every family of the stream is evaluated on eval items [0, eval_items) (the arms that
fold also with memory off, for retention), and so is every `watch` family (one no phase trains), memory
off; the evolve loop's fold decisions use the eval items after those. A seed sets the loop's sampling seed,
the fold's, the SFT's and GRPO's.

Layout of DIR: `config.json`; `homes/<arm>-seed<s>/` (each arm's memory, adapters, evolve state);
`units/<arm>/seed-<s>/phase-<p>.json`, one per (arm, seed, phase), written atomically when the unit is
done, with its evaluations' trajectories under `phase-<p>/`; `metrics.json` (all units), then
`report.md` and plots (`agent.report`). Running the same command again skips finished units and
resumes the unfinished one where its loop, fold or evolve state stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent.config import ConfigError, ModelConfig, process_alive, save_config
from agent.evaluate import EvalResult
from agent.evolve import (
    EvolveEvent,
    Stream,
    StreamSettings,
    check_stream,
    evolve_phase,
    fold_spent,
    heldout,
    heldout_contexts,
    load_state,
    log_event,
    read_events,
    serve,
    stream_families,
    train,
    write_atomic,
)
from agent.folding import adapters_dir, fold_items, register_adapter, resolve_adapter
from agent.protection import gate_window
from agent.routing import MemoryRouter, Routes
from engines.routed import RoutedEngine, RouteStats
from envs import make_family
from envs.base import Message, TaskFamily, Trajectory, item_prompt
from learners.checkpoint import SNAPSHOTS
from learners.fold import FoldResult, fold
from learners.grpo import GrpoConfig, GrpoResult, GrpoSettings, grpo, train_items
from learners.sft import SftConfig, SftResult, sft
from memory import Memory

Arm = Literal["base", "memory", "sft", "fold", "skillfold", "grpo", "routed"]
ARMS: tuple[Arm, ...] = ("base", "memory", "sft", "fold", "skillfold")  # the default arms
ALL_ARMS: tuple[Arm, ...] = (*ARMS, "grpo", "routed")
# skills in the prompt when the arm is measured (routed: the memory picks the adapter, no skills in the prompt)
MEMORY_ON: dict[str, bool] = {"base": False, "memory": True, "sft": False, "fold": True, "skillfold": True,
                              "grpo": False, "routed": False}
FOLDING = ("fold", "skillfold")
HOW_NOT_WHAT = ("threads", "batch_size", "device", "cuda_graphs")  # model settings a resumed run may change
# fold settings that change time and memory, not the update (gradient checkpointing: the same
# gradients, tested; the heap threshold: the allocator; micro_batch: the same gradients, summed over
# passes, and a run saved before its default became None = by device resumes)
FOLD_HOW_NOT_WHAT = ("gradient_checkpointing", "heap_threshold_kib", "micro_batch")


class RoutingSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    k: int = Field(default=5, ge=1, description="nearest skills that vote for a prompt's family")
    max_distance: float = Field(default=0.6, gt=0, le=2, description="cosine distance past which a skill does not "
                                "vote (a prompt no skill is this near gets the base model)")


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig)
    stream: StreamSettings
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    arms: list[Arm] = Field(default_factory=lambda: list(ARMS), min_length=1,
                            description="subset of " + ", ".join(ALL_ARMS) + " (default: all but grpo and routed)")
    eval_items: int = Field(default=100, ge=1, description="held-out items per family behind every number")
    sft: SftConfig = Field(default_factory=SftConfig)
    grpo: GrpoSettings = Field(default_factory=GrpoSettings, description="the grpo arm's own settings (steps, "
                               "rollouts per step and trainer settings are the stream's fold's)")
    routing: RoutingSettings = Field(default_factory=RoutingSettings, description="how the routed arm picks a "
                                     "prompt's adapter from memory")
    watch: list[str] = Field(default_factory=list, description="families no phase trains (specs without options), "
                             "evaluated after every phase of every arm on the same eval items, memory off (no skill "
                             "of theirs is in memory): what training the stream did to them. May be added to an "
                             "experiment already run: running it again evaluates the finished units' weights")

    @field_validator("seeds", "arms", "watch")
    @classmethod
    def _distinct(cls, values: list) -> list:
        if len(set(values)) != len(values):
            raise ValueError(f"repeated entries in {values}")
        return values


class FamilyEval(BaseModel):
    model_config = ConfigDict(extra="forbid")

    family: str
    memory: bool = Field(description="skills were retrieved into the prompt")
    items: int
    successes: int
    accuracy: float
    ci_low: float
    ci_high: float
    errors: int
    skill_tokens: int = Field(description="prompt tokens the skills took, summed over every turn of every episode")
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    trajectories: str = Field(description="the episodes, relative to the experiment directory")
    reused_from: str | None = Field(default=None, description="the identical earlier evaluation whose episodes "
                                    "these are (same weights, items and skills; greedy), relative to the directory")
    routing: dict[str, Any] | None = Field(default=None, description="the routed arm: prompts served their own "
                                           "family's adapter (own), another family's (other) or the base model "
                                           "(base); adapter switches and their seconds")


class TrainStats(BaseModel):
    model_config = ConfigDict(extra="forbid")

    episodes: int = 0
    successes: int = 0
    generated_tokens: int = 0
    folds: int = 0
    fold_generated_tokens: int = 0
    sft_episodes: int = 0
    sft_steps: int = 0
    optimizer_steps: int = Field(default=0, description="weight updates of the phase: its folds', SFT's or GRPO's")
    rollouts: int = Field(default=0, description="episodes played by the trainer (folds, GRPO); the fast path's "
                          "train episodes are `episodes`")
    rl_generated_tokens: int = Field(default=0, description="tokens GRPO's rollouts generated")


class UnitResult(BaseModel):
    """One arm, seed and phase: its training and the evaluation of every family after it."""

    model_config = ConfigDict(extra="forbid")

    arm: Arm
    seed: int
    phase: int
    family: str = Field(description="the family the phase trains")
    evals: list[FamilyEval] = Field(description="as the arm is measured (memory on or off)")
    evals_off: list[FamilyEval] = Field(default_factory=list, description="memory off (arms that fold)")
    skills: dict[str, int] = Field(default_factory=dict, description="active/folded/retired skills after the phase")
    transitions: list[dict[str, Any]] = Field(default_factory=list, description="folded/unfolded events of the phase")
    train: TrainStats = Field(default_factory=TrainStats)
    seconds: float = Field(description="wall time of the unit (a resumed unit: from the resume on)")
    generated_tokens: int = Field(description="train, fold and evaluation tokens (probe checks not counted)")
    reused_from: int | None = Field(default=None, description="phase whose evaluation this reuses (base)")
    watch: list[FamilyEval] = Field(default_factory=list, description="the config's watch families with the weights "
                                    "of this unit (the routed arm: routed as its evaluations are); not counted in "
                                    "`seconds` or `generated_tokens`, which stay what the arm's phase cost")
    finished_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class Metrics(BaseModel):
    """Everything behind the report: the config, the stream's order, and every unit."""

    model_config = ConfigDict(extra="forbid")

    config: ExperimentConfig
    phases: list[str] = Field(description="the family each phase trains")
    families: list[str] = Field(description="the matrices' rows, in stream order")
    watch: list[str] = Field(default_factory=list, description="the watch families' names, in the config's order")
    units: list[UnitResult]


@dataclass
class Lab:
    """What the units share: the engine, the config and the output directory."""

    engine: Any
    config: ExperimentConfig
    out: Path
    families: list[TaskFamily]
    embedding: Any = None
    watch: list[TaskFamily] = field(default_factory=list)
    say: Callable[[str], None] = lambda text: None
    fold_fn: Callable = fold
    sft_fn: Callable[..., SftResult] = sft
    grpo_fn: Callable[..., GrpoResult] = grpo
    memories: dict[str, Memory] = field(default_factory=dict)

    def home(self, arm: str, seed: int) -> Path:
        return self.out / "homes" / f"{arm}-seed{seed}"

    def memory(self, arm: str, seed: int) -> Memory:
        key = f"{arm}-{seed}"
        if key not in self.memories:
            self.memories[key] = Memory.open(home=self.home(arm, seed), embedding=self.embedding)
        return self.memories[key]

    def stream(self, arm: str, seed: int) -> Stream:
        return Stream(engine=self.engine, memory=self.memory(arm, seed), settings=arm_settings(self.config, arm, seed),
                      families=self.families, home=self.home(arm, seed), fold_fn=self.reusing_fold,
                      say=lambda text: self.say(f"  {arm} seed {seed}: {text}"))

    def reusing_fold(self, engine, families, items, config, run_dir: Path, *, resume: bool = False, on_step=None):
        """`fold_fn`, or an identical fold already run in this experiment, reused.

        A fold is fixed by the adapter it starts from (its contents), its families, its prompts (items
        and the skills in each) and its config (seed included): arms that reach the same fold (`fold`
        and `skillfold` before their rules first differ) run it once. The reused adapter is copied;
        the fold's metrics are copied too, so the arm's fold tokens count what the fold cost.
        """
        key = content_key({
            "model": engine.model_name, "start": adapter_digest(engine.adapter), "families": sorted(families),
            "items": [item.model_dump(mode="json") for item in items], "config": config.model_dump(mode="json"),
        })
        store = self.out / "folds" / key
        if (store / "result.json").is_file() and not config.full_finetune:
            earlier = FoldResult.model_validate_json((store / "result.json").read_text())
            run_dir.mkdir(parents=True, exist_ok=True)
            adapter = run_dir / "adapter"
            # the adapter, and the checkpoints' adapters that the retention check's fallback tries
            for name in ("adapter", SNAPSHOTS) if (store / SNAPSHOTS).is_dir() else ("adapter",):
                if not (run_dir / name).is_dir():
                    partial = run_dir / f".{name}.partial"
                    shutil.rmtree(partial, ignore_errors=True)
                    shutil.copytree(store / name, partial)
                    os.replace(partial, run_dir / name)
            if (store / "metrics.jsonl").is_file():
                write_atomic(run_dir / "metrics.jsonl", (store / "metrics.jsonl").read_text())
            self.say(f"  fold reused: the same start, prompts and config as {earlier.run_dir}")
            return earlier.model_copy(update={"adapter": str(adapter), "run_dir": str(run_dir),
                                              "reused_from": earlier.run_dir})
        result = self.fold_fn(engine, families, items, config, run_dir, resume=resume, on_step=on_step)
        if not config.full_finetune:  # kept before the evolve loop moves the adapter into its home
            partial = store.with_name(f".{key}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(result.adapter, partial / "adapter")
            if (Path(result.run_dir) / "metrics.jsonl").is_file():
                shutil.copy(Path(result.run_dir) / "metrics.jsonl", partial / "metrics.jsonl")
            if (Path(result.run_dir) / SNAPSHOTS).is_dir():
                shutil.copytree(Path(result.run_dir) / SNAPSHOTS, partial / SNAPSHOTS)
            (partial / "result.json").write_text(result.model_dump_json(indent=2))
            shutil.rmtree(store, ignore_errors=True)
            os.replace(partial, store)
        return result


def arm_settings(config: ExperimentConfig, arm: str, seed: int) -> StreamSettings:
    """The stream as an arm plays it: the seed applied, folds only where the arm folds."""
    stream = config.stream
    update: dict[str, Any] = {
        "loop": stream.loop.model_copy(update={"sampling": stream.loop.sampling.model_copy(update={"seed": seed})}),
        "fold": stream.fold.model_copy(update={"seed": seed}),
        "assess_offset": config.eval_items + stream.assess_offset,
    }
    if arm not in FOLDING:
        update["schedule"] = stream.schedule.model_copy(update={"every": "never"})
    if arm == "fold":
        update["rule"] = stream.rule.model_copy(update={"mark_folded": False})
    return stream.model_copy(update=update)


def unit_path(out: Path, arm: str, seed: int, phase: int) -> Path:
    return out / "units" / arm / f"seed-{seed}" / f"phase-{phase}.json"


def prepare_out(out: Path, config: ExperimentConfig) -> None:
    """Make or reopen the experiment directory (ConfigError naming the fix when it cannot be used)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a directory for the experiment")
    saved = out / "config.json"
    stale = re.compile(r"\.config\.json\.[0-9]+\.tmp")  # a first save_config a kill cut short
    if out.is_dir() and any(not stale.fullmatch(path.name) for path in out.iterdir()) and not saved.is_file():
        raise ConfigError(f"--out {out} is not empty and holds no experiment; pass a new or empty directory")
    if saved.is_file() and _comparable(_as_now(saved)) != _comparable(config.model_dump(mode="json")):
        raise ConfigError(f"{out} holds an experiment with another config; resume it with the same config "
                          "(see its config.json) or pass a new --out")
    try:
        save_config(config, out)
    except OSError as error:
        raise ConfigError(f"cannot write to --out {out}: {error.strerror}; pass a writable directory") from error


def _as_now(saved: Path) -> dict[str, Any]:
    """A saved config as this version reads it: settings added since it was written take their
    defaults, so a run started by an older skillfold resumes (a config that no longer parses is
    compared as it is, and so differs)."""
    data = json.loads(saved.read_text())
    try:
        return ExperimentConfig.model_validate(data).model_dump(mode="json")
    except ValueError:
        return data


def _comparable(data: dict[str, Any]) -> dict[str, Any]:
    data = {key: value for key, value in data.items() if key != "watch"}  # adds evaluations only (`fill_watch`)
    model = {key: value for key, value in data.get("model", {}).items() if key not in HOW_NOT_WHAT}
    stream = data.get("stream", {})
    fold = {key: value for key, value in (stream.get("fold") or {}).items() if key not in FOLD_HOW_NOT_WHAT}
    return {**data, "model": model, "stream": {**stream, "fold": fold}}


def check_experiment(config: ExperimentConfig) -> list[TaskFamily]:
    """The stream's families, checked for room: train episodes and eval + assess items (ConfigError)."""
    families = stream_families(config.stream)
    needed = config.eval_items + config.stream.assess_offset + config.stream.assess_items
    check_stream(config.stream, families, needed)
    if "grpo" in config.arms:
        try:
            GrpoConfig.like_fold(config.stream.fold, config.grpo)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    watch_families(config, families)
    return families


def watch_families(config: ExperimentConfig, families: list[TaskFamily] | None = None) -> list[TaskFamily]:
    """The config's watch families, checked: scored, not a phase of the stream, `eval_items` eval items that the
    folds' retention gate does not also use (ConfigError; EnvSpecError for a bad spec)."""
    stream = {family.name for family in families or stream_families(config.stream)}
    watched = []
    for spec in config.watch:
        family = make_family(spec)
        if family.name in stream:
            raise ConfigError(f"watch family {family.name} is a phase of the stream, measured after every phase "
                              "already; drop it from watch")
        if not getattr(family, "scored", True):
            raise ConfigError(f"watch family {family.name} has no score (a prompt set for replay); watch a family "
                              "whose episodes succeed or fail")
        size = family.split_size("eval")
        if size < config.eval_items:
            raise ConfigError(f"watch family {family.name} has {size} eval items but eval_items is "
                              f"{config.eval_items}; lower eval_items or watch another family")
        first, _ = gate_window(family, config.stream.protection.gate_items)
        if first < config.eval_items and config.stream.protection.enabled and set(FOLDING) & set(config.arms):
            raise ConfigError(f"watch family {family.name}: its eval items [0, {config.eval_items}) overlap the "
                              f"retention gate's [{first}, {size}) that decides the folds; lower eval_items or "
                              "stream.protection.gate_items")
        watched.append(family)
    return watched


def run_experiment(engine, config: ExperimentConfig, out: Path, *, embedding=None, say=lambda text: None,
                   fold_fn: Callable = fold, sft_fn: Callable[..., SftResult] = sft,
                   grpo_fn: Callable[..., GrpoResult] = grpo,
                   seeds: list[int] | None = None, arms: list[str] | None = None) -> Metrics | None:
    """Run (or resume) every unit, then write metrics.json; returns the metrics.

    `seeds` runs only those seeds' units: other processes (a core or a machine each) may run the
    others into the same directory, as the units of different seeds share nothing but the reused
    evaluations (written atomically). metrics.json is written by whichever process finds every unit
    done; until then this returns None. `arms` likewise runs only those arms (an arm's units depend on
    nothing of another arm's, except that an identical fold or evaluation already on file is reused).
    """
    families = check_experiment(config)
    check_seeds(config, seeds)
    check_arms(config, arms)
    prepare_out(out, config)
    lab = Lab(engine=engine, config=config, out=out, families=families, embedding=embedding, say=say,
              fold_fn=fold_fn, sft_fn=sft_fn, grpo_fn=grpo_fn, watch=watch_families(config, families))
    for seed in [seed for seed in config.seeds if seeds is None or seed in seeds]:
        for arm in [arm for arm in config.arms if arms is None or arm in arms]:
            if all(unit_path(out, arm, seed, phase).is_file() for phase in range(len(families))) and not any(
                    watch_missing(lab, arm, seed, phase) for phase in range(len(families))):
                if (out / "units" / arm / f"seed-{seed}" / ".lock").exists():
                    with chain_lock(out, arm, seed):  # a claim a killed run left on its finished units goes
                        pass
                continue
            with chain_lock(out, arm, seed) as holder:
                if holder is not None:
                    say(f"seed {seed} {arm}: skipped, process {holder} is running it")
                    continue
                for phase, family in enumerate(families):
                    path = unit_path(out, arm, seed, phase)
                    if path.is_file():
                        continue
                    say(f"seed {seed} {arm}: phase {phase + 1}/{len(families)} ({family.name})")
                    unit = run_unit(lab, arm, seed, phase)
                    write_atomic(path, unit.model_dump_json(indent=2))
                    mean = sum(e.accuracy for e in unit.evals) / len(unit.evals)
                    say(f"seed {seed} {arm}: phase {phase + 1} done, mean accuracy {mean:.1%} ({unit.seconds:.0f}s)")
                for phase in range(len(families)):  # units run before the config watched these families
                    if arm == "routed" and watch_missing(lab, arm, seed, phase):
                        say(f"seed {seed} routed: its watch families are left unmeasured: they need its memory "
                            "and routes as they were after each phase (run with watch from the start)")
                        break
                    if watch_missing(lab, arm, seed, phase):
                        say(f"seed {seed} {arm}: phase {phase + 1}: watch families evaluated with its weights")
                        fill_watch(lab, arm, seed, phase)
    missing = [(arm, seed) for seed in config.seeds for arm in config.arms
               if not all(unit_path(out, arm, seed, phase).is_file() for phase in range(len(families)))]
    if missing:
        say("not done yet (another process may be running them): "
            + ", ".join(f"{arm} seed {seed}" for arm, seed in missing))
        return None
    metrics = collect(out, config, families, engine, say)
    write_atomic(out / "metrics.json", metrics.model_dump_json(indent=2))
    return metrics


def check_seeds(config: ExperimentConfig, seeds: list[int] | None) -> None:
    """`--seed` values must be seeds of the config (ConfigError naming them)."""
    if seeds is not None and not set(seeds) <= set(config.seeds):
        raise ConfigError(f"--seed {sorted(set(seeds) - set(config.seeds))} is not among the config's seeds "
                          f"{config.seeds}; pass some of those")


@contextmanager
def chain_lock(out: Path, arm: str, seed: int) -> Iterator[str | None]:
    """Claim an arm's units for one seed for this process: yields None when claimed (released on exit),
    or who holds them: a live process on this machine, or any process on another machine (its liveness
    cannot be seen from here: delete the lock file if that run is gone). A claim left by a killed process
    of this machine is taken over, so a resumed run never waits on a dead one."""
    lock = out / "units" / arm / f"seed-{seed}" / ".lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") not in (None, me["host"]):
                yield f"{holder.get('pid')} on {holder['host']} (if that run is gone, delete {lock})"
                return
            if holder.get("pid") not in (None, me["pid"]) and process_alive(holder["pid"]):
                yield str(holder["pid"])
                return
            lock.unlink(missing_ok=True)  # stale (or unreadable): its process is gone
            continue
        with os.fdopen(descriptor, "w") as handle:
            json.dump(me, handle)
        try:
            yield None
        finally:
            lock.unlink(missing_ok=True)
        return
    raise ConfigError(f"cannot claim {lock}: it keeps reappearing; is another process running this experiment?")


def check_arms(config: ExperimentConfig, arms: list[str] | None) -> None:
    """`--arm` values must be arms of the config (ConfigError naming them)."""
    if arms is not None and not set(arms) <= set(config.arms):
        raise ConfigError(f"--arm {sorted(set(arms) - set(config.arms))} is not among the config's arms "
                          f"{config.arms}; pass some of those")


def collect(out: Path, config: ExperimentConfig, families: list[TaskFamily], engine=None,
            say: Callable[[str], None] = lambda text: None) -> Metrics:
    """Every unit into one Metrics; with `engine`, skill tokens are recounted from the episodes first
    (`recount_skill_tokens`)."""
    if engine is not None:
        recount_skill_tokens(out, config, len(families), engine, say)
    units = [UnitResult.model_validate_json(unit_path(out, arm, seed, phase).read_text())
             for seed in config.seeds for arm in config.arms for phase in range(len(families))]
    names = list(dict.fromkeys(family.name for family in families))
    return Metrics(config=config, phases=[family.name for family in families], families=names,
                   watch=[family.name for family in watch_families(config, families)], units=units)


def recount_skill_tokens(out: Path, config: ExperimentConfig, phases: int, engine,
                         say: Callable[[str], None] = lambda text: None) -> int:
    """Count every evaluation's skill tokens again from its episodes (`skill_tokens`); a unit whose
    count differs (written by a version that counted otherwise) is rewritten atomically with the new
    count, its other numbers untouched. Returns how many evaluations changed."""
    changed = 0
    for seed in config.seeds:
        for arm in config.arms:
            for phase in range(phases):
                path = unit_path(out, arm, seed, phase)
                unit = UnitResult.model_validate_json(path.read_text())
                cells, fixed = [*unit.evals, *unit.evals_off], 0
                for cell in cells:
                    count = sum(skill_tokens(engine, episode) for episode in read_episodes(out / cell.trajectories))
                    if count != cell.skill_tokens:
                        cell.skill_tokens, fixed = count, fixed + 1
                if fixed:
                    write_atomic(path, unit.model_dump_json(indent=2))
                    changed += fixed
    if changed:
        say(f"skill tokens recounted from the episodes: {changed} evaluations changed")
    return changed


# ----------------------------------------------------------------------------- units
def run_unit(lab: Lab, arm: str, seed: int, phase: int) -> UnitResult:
    started = time.perf_counter()
    family = lab.families[phase].name
    if arm == "base":
        if phase > 0:
            first = UnitResult.model_validate_json(unit_path(lab.out, arm, seed, 0).read_text())
            return first.model_copy(update={"phase": phase, "family": family, "seconds": 0.0, "generated_tokens": 0,
                                            "reused_from": 0, "finished_at": datetime.now(UTC)})
        serve(lab.engine, None)
        evals, evals_off, tokens = evaluate_unit(lab, arm, seed, phase, None)
        unit = UnitResult(arm=arm, seed=seed, phase=phase, family=family, evals=evals,
                          seconds=time.perf_counter() - started, generated_tokens=tokens)
        return unit.model_copy(update={"watch": evaluate_watch(lab, arm, seed, phase, None, lab.watch)})
    stream = lab.stream(arm, seed)
    stats, transitions = PHASE_TRAINING.get(arm, evolve_unit)(lab, stream, seed, phase)
    memory = lab.memory(arm, seed)
    evals, evals_off, tokens = evaluate_unit(lab, arm, seed, phase, memory)
    seconds = time.perf_counter() - started
    return UnitResult(
        arm=arm, seed=seed, phase=phase, family=family, evals=evals, evals_off=evals_off,
        watch=evaluate_watch(lab, arm, seed, phase, memory, lab.watch),
        skills=memory.stats()["skills"], transitions=transitions, train=stats, seconds=seconds,
        generated_tokens=tokens + stats.generated_tokens + stats.fold_generated_tokens + stats.rl_generated_tokens,
    )


def _train_stats(events: list[EvolveEvent], batch_size: int = 0) -> TrainStats:
    """Totals of a phase's trained and fold events (a repeated line, from a resumed stage, counts once);
    `batch_size`: the folds' episodes per step (their rollouts = steps x batch_size where a fold's evidence
    does not count them: a pedagogical fold replays failed episodes)."""
    trained = {event.chunk: event.evidence for event in events if event.kind == "trained"}
    folds = {event.evidence["adapter"]: event.evidence for event in events if event.kind == "fold"}
    fold_steps = sum(e.get("steps", 0) for e in folds.values())
    return TrainStats(
        episodes=sum(e["episodes"] for e in trained.values()), successes=sum(e["successes"] for e in trained.values()),
        generated_tokens=sum(e["generated_tokens"] for e in trained.values()), folds=len(folds),
        fold_generated_tokens=sum(e.get("generated_tokens", 0) for e in folds.values()),
        optimizer_steps=fold_steps,
        rollouts=sum(e.get("rollouts", e.get("steps", 0) * batch_size) for e in folds.values()),
    )


def evolve_unit(lab: Lab, stream: Stream, seed: int, phase: int) -> tuple[TrainStats, list[dict[str, Any]]]:
    state = load_state(stream.run_dir)
    serve(lab.engine, state.adapter if state else None)  # the engine may come from another arm
    evolve_phase(stream, phase)
    events = [event for event in read_events(stream.run_dir) if event.phase == phase]
    transitions = [event.model_dump(mode="json") for event in events if event.kind in ("folded", "unfolded")]
    return _train_stats(events, stream.settings.fold.batch_size), transitions


def sft_phase(lab: Lab, stream: Stream, seed: int, phase: int) -> tuple[TrainStats, list[dict[str, Any]]]:
    """The fast path for the phase, then SFT on its successes (a registered phase adapter is not redone)."""
    serve(lab.engine, resolve_adapter("latest", stream.home))
    events = [event for event in read_events(stream.run_dir) if event.phase == phase and event.kind == "trained"]
    if not events:
        events = [train(stream, phase, 0)]
        log_event(stream.run_dir, events[0])
    stats = _train_stats(events)
    name = f"sft-p{phase}"
    run_dir, target = stream.home / "sft" / name, adapters_dir(stream.home) / name
    if not (run_dir / "result.json").is_file():
        prefix = f"{stream.run_id}-p{phase}-"
        played = [t for t in stream.memory.list_trajectories(env=lab.families[phase].name, split="train", limit=None)
                  if t.id.startswith(prefix)]
        result = lab.sft_fn(lab.engine, played, stream.settings.fold, lab.config.sft, run_dir, seed=seed,
                            resume=True)  # a killed experiment's SFT continues from its last checkpoint
        write_atomic(run_dir / "result.json", result.model_dump_json(indent=2))
    result = SftResult.model_validate_json((run_dir / "result.json").read_text())
    if result.adapter:  # registered again if it is: a kill may have come before `latest` named it
        register_adapter(stream.home, name, target if target.is_dir() else Path(result.adapter))
        serve(lab.engine, str(target))
    return stats.model_copy(update={"sft_episodes": result.episodes, "sft_steps": result.steps,
                                    "optimizer_steps": result.steps if result.adapter else 0}), []


def grpo_phase(lab: Lab, stream: Stream, seed: int, phase: int) -> tuple[TrainStats, list[dict[str, Any]]]:
    """GRPO on the phase's family, memory off and no fast path, with the fold's compute: `fold.steps`
    optimizer steps of `fold.batch_size` rollouts (`GrpoConfig.like_fold`), from the adapter of the earlier
    phases; prompts are train items of the family (the loop's probe items left out). A registered phase
    adapter is not redone; a killed phase's run continues from its last checkpoint."""
    serve(lab.engine, resolve_adapter("latest", stream.home))
    family = lab.families[phase]
    name = f"grpo-p{phase}"
    run_dir, target = stream.home / "grpo" / name, adapters_dir(stream.home) / name
    if not (run_dir / "result.json").is_file():
        try:
            config = GrpoConfig.like_fold(stream.settings.fold, lab.config.grpo)  # the fold's seed: the arm's
        except ValueError as error:
            raise ConfigError(str(error)) from None
        items = train_items({family.name: family}, stream.settings.items_per_family, stream.settings.loop.probes,
                            seed=config.seed + phase)
        result = lab.grpo_fn(lab.engine, {family.name: family}, items, config, run_dir, resume=True)
        write_atomic(run_dir / "result.json", result.model_dump_json(indent=2))
    result = GrpoResult.model_validate_json((run_dir / "result.json").read_text())
    # registered again if it is: a kill may have come before `latest` named it
    register_adapter(stream.home, name, target if target.is_dir() else Path(result.adapter))
    serve(lab.engine, str(target))
    return TrainStats(optimizer_steps=result.optimizer_steps, rollouts=result.rollouts,
                      rl_generated_tokens=result.generated_tokens), []


def routed_adapter_name(phase: int) -> str:
    """The adapter the routed arm folds in `phase` (its family alone), under the home's adapters."""
    return f"routed-p{phase}"


def routed_adapter_phase(adapter: str) -> int | None:
    """The phase whose fold made the routed arm's adapter at path `adapter`; None if it is not one."""
    name = Path(adapter).name
    prefix = routed_adapter_name(0)[:-1]
    return int(name[len(prefix):]) if name.startswith(prefix) and name[len(prefix):].isdigit() else None


def routed_phase(lab: Lab, stream: Stream, seed: int, phase: int) -> tuple[TrainStats, list[dict[str, Any]]]:
    """The fast path for the phase (skills into memory; the arm never folds in the loop), then the phase's
    family folded alone, from the base model, into an adapter of its own that the routes table names for
    the family (a later phase of the same family replaces it). A registered phase adapter is not redone; a
    killed fold continues from its last checkpoint."""
    serve(lab.engine, None)  # the fast path and the fold start from the base model
    evolve_phase(stream, phase)
    events = [event for event in read_events(stream.run_dir) if event.phase == phase]
    stats = _train_stats(events)
    settings, family = stream.settings, lab.families[phase]
    name = routed_adapter_name(phase)
    run_dir, target = stream.home / "folds" / name, adapters_dir(stream.home) / name
    if not (run_dir / "result.json").is_file():
        serve(lab.engine, None)
        items = fold_items(stream.memory, lab.engine, {family.name: family}, {}, settings.items_per_family,
                           settings.loop.probes, settings.loop.token_budget, settings.loop.retrieve_k,
                           seed=settings.fold.seed + phase + 1)
        if not items:  # no skill of the family to fold: its prompts stay with the base model
            stream.say(f"phase {phase + 1} {family.name}: no skills to fold, no adapter")
            return stats, []
        config = settings.fold.model_copy(update={"seed": settings.fold.seed + phase + 1})
        stream.say(f"fold of {family.name} alone into {name} ({len(items)} prompts)")
        result = lab.reusing_fold(lab.engine, {family.name: family}, items, config, run_dir, resume=True)
        write_atomic(run_dir / "result.json", result.model_dump_json(indent=2))
    result = FoldResult.model_validate_json((run_dir / "result.json").read_text())
    # registered again if it is (a kill may have come between the two), never as `latest`: routes serve it
    register_adapter(stream.home, name, target if target.is_dir() else Path(result.adapter), latest=False)
    Routes(stream.home).set(family.name, str(target))
    serve(lab.engine, None)
    spent = fold_spent(run_dir)
    return stats.model_copy(update={
        "folds": 1, "optimizer_steps": result.steps, "fold_generated_tokens": spent["generated_tokens"],
        "rollouts": spent.get("rollouts", result.steps * settings.fold.batch_size)}), []


# how an arm trains in a phase (the others: the evolve loop, with the arm's settings)
PHASE_TRAINING: dict[str, Callable[[Lab, Stream, int, int], tuple[TrainStats, list[dict[str, Any]]]]] = {
    "sft": sft_phase,
    "grpo": grpo_phase,
    "routed": routed_phase,
}


def evaluate_unit(lab: Lab, arm: str, seed: int, phase: int,
                  memory: Memory | None) -> tuple[list[FamilyEval], list[FamilyEval], int]:
    """Every family of the stream as the arm is measured (and memory off for arms that fold);
    the evaluations and the tokens they generated."""
    unit_dir = unit_path(lab.out, arm, seed, phase).with_suffix("")
    evals, evals_off, tokens = [], [], 0
    for family in {family.name: family for family in lab.families}.values():
        if arm == "routed":
            run = [evaluate_routed(lab, family, memory, lab.home(arm, seed), unit_dir)]
        else:
            run = [evaluate_family(lab, family, memory if MEMORY_ON[arm] else None, unit_dir)]
        evals.append(run[0])
        if arm in FOLDING:  # memory off too; without skills in the prompt that is the same evaluation
            if run[0].memory:
                run.append(evaluate_family(lab, family, None, unit_dir))
            evals_off.append(run[-1])
        tokens += sum(cell.completion_tokens for cell in run if cell.reused_from is None)
    return evals, evals_off, tokens


def evaluate_watch(lab: Lab, arm: str, seed: int, phase: int, memory: Memory | None,
                   families: list[TaskFamily]) -> list[FamilyEval]:
    """`families` (watch families) with the weights the engine serves now, memory off (the routed arm: routed)."""
    unit_dir = unit_path(lab.out, arm, seed, phase).with_suffix("")
    if arm == "routed":
        return [evaluate_routed(lab, family, memory, lab.home(arm, seed), unit_dir) for family in families]
    return [evaluate_family(lab, family, None, unit_dir) for family in families]


def watch_missing(lab: Lab, arm: str, seed: int, phase: int) -> list[TaskFamily]:
    """The watch families a finished unit has no evaluation of (none while the unit is not on file)."""
    path = unit_path(lab.out, arm, seed, phase)
    if not lab.watch or not path.is_file():
        return []
    return unwatched(lab, UnitResult.model_validate_json(path.read_text()))


def unwatched(lab: Lab, unit: UnitResult) -> list[TaskFamily]:
    have = {cell.family for cell in unit.watch}
    return [family for family in lab.watch if family.name not in have]


def fill_watch(lab: Lab, arm: str, seed: int, phase: int) -> UnitResult:
    """Evaluate a finished unit's missing watch families with the weights its evaluations were served, and
    rewrite the unit (atomically) with them (ConfigError where those weights cannot be had again)."""
    path = unit_path(lab.out, arm, seed, phase)
    unit = UnitResult.model_validate_json(path.read_text())
    missing = unwatched(lab, unit)
    if arm == "routed":
        raise ConfigError(f"{path}: the routed arm's watch evaluations need its memory and routes as they were "
                          "after each phase; run the experiment with these watch families from the start "
                          "(a new --out)")
    serve(lab.engine, unit_weights(lab, unit))
    unit = unit.model_copy(update={"watch": [*unit.watch, *evaluate_watch(lab, arm, seed, phase, None, missing)]})
    write_atomic(path, unit.model_dump_json(indent=2))
    return unit


def unit_weights(lab: Lab, unit: UnitResult) -> str | None:
    """The adapter a finished unit's evaluations were served (None: the model alone), as its episodes record
    it, checked: served again, its memory-off evaluation's key must name that very evaluation, or one that
    played every episode move for move alike (two processes that evaluated the same weights at once each
    record theirs; the key names the later), or the adapter no longer holds those weights (ConfigError)."""
    cells = [cell for cell in [*unit.evals, *unit.evals_off] if not cell.memory]
    episodes = read_episodes(lab.out / (cells or unit.evals)[0].trajectories)
    adapter = episodes[0].adapter if episodes else None
    where = f"{unit.arm} seed {unit.seed} phase {unit.phase + 1}"
    if adapter is not None and not Path(adapter).is_dir():  # the directory moved (packed and unpacked)
        parts = Path(adapter).parts
        moved = lab.out.joinpath(*parts[parts.index("homes"):]) if "homes" in parts else None
        if moved is None or not moved.is_dir():
            raise ConfigError(f"{where}: its adapter {adapter} is gone; its watch families cannot be evaluated "
                              "(run the experiment with them from the start, in a new --out)")
        adapter = str(moved)
    if cells:
        serve(lab.engine, adapter)
        key = eval_key(lab.engine, cells[0].family, lab.config.eval_items, lab.config.stream, [])
        earlier = lab.out / "evals" / f"{key}.json"
        recorded = FamilyEval.model_validate_json(earlier.read_text()).trajectories if earlier.is_file() else None
        if recorded is None or recorded not in (cells[0].trajectories, cells[0].reused_from) and not same_play(
                lab.out / recorded, lab.out / cells[0].trajectories):
            raise ConfigError(f"{where}: its adapter {adapter} no longer holds the weights its evaluations had; "
                              "its watch families cannot be evaluated (run the experiment with them from the "
                              "start, in a new --out)")
    return adapter


def same_play(first: Path, second: Path) -> bool:
    """Two evaluations' episode files hold the same items played with the same moves."""
    def play(path: Path) -> list[tuple[str, list[str]]]:
        return [(episode.item_id, [turn.action for turn in episode.turns]) for episode in read_episodes(path)]
    return first.is_file() and second.is_file() and play(first) == play(second)


def evaluate_routed(lab: Lab, family: TaskFamily, memory: Memory, home: Path, unit_dir: Path) -> FamilyEval:
    """The routed arm's held-out evaluation of `family`: no skills in the prompt; each item served the adapter
    of the family the memory picks for its prompt (`agent.routing.MemoryRouter`), the base model where it
    picks none or that family has no adapter. Its cell records the routing and the switches' cost."""
    routes = Routes(home).read()
    router = MemoryRouter(memory, routes, k=lab.config.routing.k, max_distance=lab.config.routing.max_distance)
    engine = RoutedEngine(lab.engine, router)
    served = []
    for index in range(lab.config.eval_items):
        prompt = item_prompt(family, "eval", index)
        name = None if prompt is None else router.family_of([message.as_dict() for message in prompt])
        served.append(name if name in routes else None)
    routing = {"own": sum(name == family.name for name in served), "base": sum(name is None for name in served),
               "other": sum(name not in (None, family.name) for name in served)}
    cell = evaluate_family(
        lab, family, None, unit_dir, engine=engine,
        key_extra={"routes": [adapter_digest(routes[name]) if name else None for name in served]},
        adapters=[routes[name] if name else None for name in served],
        measured=lambda: {"routing": routing | engine.stats.as_dict()},
    )
    if cell.reused_from is None:
        return cell
    # the same adapter contents per item as an earlier evaluation, whose episodes are recorded as served by this
    # one's routes: the shares are this evaluation's (the earlier one may have routed to another family's adapter
    # of identical contents), and nothing was generated or switched here
    return cell.model_copy(update={"routing": routing | RouteStats(per_request=engine.stats.per_request).as_dict()})


def evaluate_family(lab: Lab, family: TaskFamily, memory: Memory | None, unit_dir: Path, *, engine=None,
                    key_extra: dict[str, Any] | None = None, adapters: list[str | None] | None = None,
                    measured: Callable[[], dict[str, Any]] | None = None) -> FamilyEval:
    """One held-out evaluation, or an earlier identical one reused.

    Decoding is greedy, so an evaluation is fixed by the weights (model and adapter contents), the
    family's items and the skills in each prompt: when all of these match an evaluation already run in
    this experiment (another arm's, or an earlier phase's with the same skills), its episodes are copied
    (recorded as served here: this engine's adapter path, whose contents are the same) and `reused_from`
    names where they came from. The unit's files hold the episodes either way.
    `engine`: another engine than the lab's (the routed arm's), with `key_extra` what else fixes its
    evaluation, `adapters` the adapter each item's episode is recorded as served by, and `measured()` more
    fields of the cell, read after a fresh evaluation.
    """
    engine = engine or lab.engine
    settings = lab.config.stream
    contexts = heldout_contexts(lab.engine, family, lab.config.eval_items, settings, memory=memory)
    key = eval_key(engine, family.name, lab.config.eval_items, settings, contexts, key_extra)
    path = unit_dir / f"{re.sub(r'[^A-Za-z0-9]+', '_', family.name)}-{'on' if contexts else 'off'}.jsonl"
    earlier = lab.out / "evals" / f"{key}.json"

    def served(episodes: list[Trajectory]) -> list[Trajectory]:
        by = adapters or [engine.adapter] * len(episodes)
        return [episode.model_copy(update={"model": engine.model_name, "adapter": adapter})
                for episode, adapter in zip(episodes, by, strict=True)]

    if earlier.is_file():
        original = FamilyEval.model_validate_json(earlier.read_text())
        if original.trajectories == str(path.relative_to(lab.out)):  # this unit's own, before a kill
            return original
        source = lab.out / original.trajectories
        if source.is_file():  # the episodes, as served here (the same weights under this arm's adapter path)
            write_atomic(path, "".join(episode.model_dump_json() + "\n" for episode in served(read_episodes(source))))
            return original.model_copy(update={"trajectories": str(path.relative_to(lab.out)),
                                               "reused_from": original.trajectories})
    result, trajectories = heldout(engine, family, lab.config.eval_items, settings, contexts=contexts)
    recorded = record_eval(lab, result, served(trajectories) if adapters else trajectories, path)
    if measured is not None:
        recorded = recorded.model_copy(update=measured())
    write_atomic(earlier, recorded.model_dump_json(indent=2))
    return recorded


def eval_key(engine, family: str, items: int, settings: StreamSettings, contexts: list,
             extra: dict[str, Any] | None = None) -> str:
    """What fixes a greedy held-out evaluation, hashed: model, adapter contents, family, items, decoding,
    turns and every item's skills (and `extra`: the routed arm's adapter per item)."""
    payload = {
        "model": engine.model_name, "adapter": adapter_digest(engine.adapter), "family": family, "items": items,
        "sampling": settings.eval_sampling.model_dump(mode="json"), "max_turns": settings.loop.max_turns,
        "contexts": [[message.model_dump(mode="json") for message in context] for context, _ in contexts],
    }
    return content_key(payload | extra if extra else payload)


def content_key(payload: dict[str, Any]) -> str:
    """The name of a reusable result: a hash of everything that fixes it."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def adapter_digest(adapter: str | None) -> str | None:
    """A digest of an adapter directory's files (None: the model alone)."""
    if not adapter:
        return None
    digest = hashlib.sha256()
    for file in sorted(Path(adapter).rglob("*")):
        if file.is_file():
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def read_episodes(path: Path) -> list[Trajectory]:
    """An evaluation's episode file (JSON lines, as `record_eval` writes it)."""
    return [Trajectory.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]


def record_eval(lab: Lab, result: EvalResult, trajectories: list[Trajectory], path: Path) -> FamilyEval:
    """The evaluation's numbers, its episodes written (atomically) to `path`."""
    write_atomic(path, "".join(trajectory.model_dump_json() + "\n" for trajectory in trajectories))
    return FamilyEval(
        family=result.env, memory=result.memory, items=result.items, successes=result.successes,
        accuracy=result.accuracy, ci_low=result.ci_low, ci_high=result.ci_high, errors=result.errors,
        skill_tokens=sum(skill_tokens(lab.engine, trajectory) for trajectory in trajectories),
        prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens, seconds=result.seconds,
        trajectories=str(path.relative_to(lab.out)),
    )


def skill_tokens(engine, trajectory: Trajectory) -> int:
    """Prompt tokens the retrieved skills take, once per turn (every turn sends the prompt again).

    The tokens of the chat with the skills minus those without them, both led by a system message:
    chat templates such as SmolLM2's add a default system prompt to a chat that has none, and a skill
    rendered as a system hint takes that place, so without one leading both, a short hint would
    count the default prompt it displaced, as negative tokens.
    """
    if not trajectory.context:
        return 0
    prompt = list(trajectory.prompt)
    if not prompt or prompt[0].role != "system":
        prompt.insert(0, Message(role="system", content=""))
    bare = trajectory.model_copy(update={"turns": [], "prompt": prompt})
    with_skills = engine.count_tokens([message.as_dict() for message in bare.messages(with_context=True)])
    without = engine.count_tokens([message.as_dict() for message in bare.messages()])
    return (with_skills - without) * max(1, len(trajectory.turns))
