"""The evolve loop (`skillfold evolve`): a stream of task families learned phase by phase, fast path
first, then folded into the weights on a schedule.

For each phase of the stream (one task family and its train episodes):
  1. train: the agent loop (`agent.loop.run_loop`) plays the phase's episodes with memory, in chunks
     when the schedule folds every N episodes; each chunk is its own loop run
     (`<run_id>-p<phase>-c<chunk>`), so a killed chunk resumes from the loop's checkpoint;
  2. when the schedule says so (after every phase, every N episodes, or once a family holds more
     active skills than a budget): `measure` every family with active skills with memory ON, then
     `fold` them (`learners.fold.fold`; anchors: earlier families of the stream with nothing active,
     `anchors`, and what `protection` keeps: the memory's other families and the general prompt set),
     register the adapter and serve it if the retention check passes (`agent.protection`; a fold that
     fails it is registered but not served, and its skills stay active);
  3. `assess`, memory OFF, on the same items: a family whose accuracy meets `FoldRule` has its active
     skills marked `folded` (they leave the prompt: retrieval returns only active skills); folded
     skills whose family fell more than `regression_tolerance` below the level recorded when they
     were folded become `active` again.
Every status change goes into the skill's `status_history` with its evidence, and into
`evolve.jsonl` in the run directory (`<home>/evolve/<run_id>/`). The position (phase, chunk, stage)
is saved atomically in `state.json` after every stage, so running the same command again resumes.

The items behind fold decisions are held-out: eval-split items `[assess_offset, assess_offset +
assess_items)`, never trained on (`skillfold experiment` moves them past its own report items).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.config import (
    ConfigError,
    LoopSettings,
    ModelConfig,
    ProtectionSettings,
    default_home,
    write_atomic,
)
from agent.evaluate import EvalResult, evaluate, memory_contexts
from agent.folding import adapters_dir, fold_items, register_adapter
from agent.loop import Runtime, run_loop
from agent.protection import RETENTION, RetentionCheck, check_after, measure_before, protected_families, serve
from engines.base import Engine, SamplingParams
from envs import make_family
from envs.base import Message, TaskFamily, Trajectory
from learners.fold import FoldConfig, FoldResult, fold
from memory import Memory

Stage = Literal["train", "measure", "fold", "assess"]


class Phase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    family: str = Field(description="task family spec, e.g. rg:basic_arithmetic+calc (see `skillfold envs`)")
    options: dict[str, Any] = Field(default_factory=dict, description="family options (difficulty ...)")
    episodes: int | None = Field(default=None, ge=1, description="train episodes; None = the stream's `episodes`")


class FoldSchedule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    every: Literal["phase", "episodes", "budget", "never"] = Field(
        default="phase",
        description="phase: fold after every phase; episodes: after every `episodes` train episodes; budget: "
        "once a family holds more than `skill_budget` active skills (checked every `episodes`); never: no folds",
    )
    episodes: int = Field(default=32, ge=1, description="chunk of train episodes (every=episodes or budget); "
                          "chunks never cross a phase, so a phase's last chunk may be shorter")
    skill_budget: int = Field(default=12, ge=1, description="every=budget: active skills a family may hold")


class FoldRule(BaseModel):
    """When a fold counts as learned, from memory-off accuracy on the assess items after the fold.

    A family's active skills are marked folded when accuracy_off > min_accuracy and
    (accuracy_off >= accuracy_on - margin, accuracy_on measured with memory on just before the fold,
    or accuracy_off >= threshold). Folded skills go back to active when accuracy_off falls below
    the accuracy_off recorded when they were folded minus regression_tolerance.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mark_folded: bool = Field(default=True, description="false: fold but never change a skill's status")
    margin: float = Field(default=0.05, ge=0, le=1, description="how far under memory-on accuracy still counts")
    threshold: float | None = Field(default=None, ge=0, le=1, description="absolute memory-off accuracy that counts")
    min_accuracy: float = Field(default=0.0, ge=0, le=1, description="memory-off accuracy must exceed this")
    regression_tolerance: float = Field(default=0.10, ge=0, le=1, description="drop that unfolds folded skills")

    def folds(self, accuracy_off: float, accuracy_on: float) -> bool:
        if accuracy_off <= self.min_accuracy:
            return False
        close = accuracy_off + 1e-9 >= accuracy_on - self.margin
        return close or (self.threshold is not None and accuracy_off + 1e-9 >= self.threshold)

    def regressed(self, accuracy_off: float, folded_at: float) -> bool:
        return accuracy_off + 1e-9 < folded_at - self.regression_tolerance


class StreamSettings(BaseModel):
    """The stream: phases, how each is played, when to fold and what a fold must show."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    phases: list[Phase] = Field(min_length=1)
    episodes: int = Field(default=32, ge=1, description="train episodes of a phase that sets none")
    loop: LoopSettings = Field(default_factory=LoopSettings, description="the agent loop (its `episodes` unused)")
    schedule: FoldSchedule = Field(default_factory=FoldSchedule)
    rule: FoldRule = Field(default_factory=FoldRule)
    fold: FoldConfig = Field(default_factory=FoldConfig)
    anchors: list[str] = Field(default_factory=list, description="families kept as they are in every fold, "
                               "besides the stream's earlier families with no active skills and what `protection` "
                               "keeps")
    protection: ProtectionSettings = Field(default_factory=ProtectionSettings, description="protection by default: "
                                           "the memory's other families and the general prompt set replayed in every "
                                           "fold, and the retention check before its adapter is served")
    items_per_family: int = Field(default=48, ge=1, description="fold prompts per family (skilled and anchor)")
    assess_items: int = Field(default=32, ge=1, description="held-out items behind every fold/unfold decision")
    assess_offset: int = Field(default=0, ge=0, description="eval index of the first assess item")
    eval_sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(max_new_tokens=64))


class EvolveConfig(BaseModel):
    """`skillfold evolve --stream FILE`: the stream, the model, and where the run lives."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig)
    stream: StreamSettings
    home: Path = Field(default_factory=lambda: default_home())
    memory_url: str | None = Field(default=None, description="Chroma server URL instead of the embedded store")
    run_id: str = Field(default="evolve", min_length=1, description="the run; running it again resumes it")


class EvolveState(BaseModel):
    """Where a run stands: the next stage to do (phase == number of phases: done)."""

    model_config = ConfigDict(extra="forbid")

    phase: int = 0
    chunk: int = 0
    stage: Stage = "train"
    folds: int = 0
    adapter: str | None = None
    accuracy_on: dict[str, float] = Field(default_factory=dict, description="measured before the pending fold")
    assessed: list[str] = Field(default_factory=list, description="families the pending assess has decided")


class EvolveEvent(BaseModel):
    """One line of evolve.jsonl: a trained chunk, a fold (or a skipped one), or a status change."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["trained", "fold", "fold_skipped", "folded", "unfolded"]
    phase: int
    chunk: int
    family: str | None = None
    skill_ids: list[str] = Field(default_factory=list)
    evidence: dict[str, Any] = Field(default_factory=dict)
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))


@dataclass
class Stream:
    """What a run uses besides its saved state: the engine, the memory and the stream's families."""

    engine: Engine
    memory: Memory
    settings: StreamSettings
    families: list[TaskFamily]  # one per phase
    home: Path
    run_id: str = "evolve"
    say: Callable[[str], None] = lambda text: None
    fold_fn: Callable[..., FoldResult] = fold
    on_episode: Callable[[Trajectory], None] | None = None
    on_fold_step: Callable[[dict], None] | None = None

    @property
    def run_dir(self) -> Path:
        return self.home / "evolve" / self.run_id

    def by_name(self) -> dict[str, TaskFamily]:
        return {family.name: family for family in self.families}


# --------------------------------------------------------------------------- files
def load_state(run_dir: Path) -> EvolveState | None:
    path = run_dir / "state.json"
    return EvolveState.model_validate_json(path.read_text()) if path.is_file() else None


def save_state(run_dir: Path, state: EvolveState) -> None:
    write_atomic(run_dir / "state.json", state.model_dump_json(indent=2))


def log_event(run_dir: Path, event: EvolveEvent) -> None:
    """Append `event`, unless the log holds it already: a stage a kill cut short logs again when it is
    done again, and a run has one event of a kind per (phase, chunk, family)."""
    key = (event.kind, event.phase, event.chunk, event.family)
    if any((e.kind, e.phase, e.chunk, e.family) == key for e in read_events(run_dir)):
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "evolve.jsonl", "a", encoding="utf-8") as sink:
        sink.write(event.model_dump_json() + "\n")
        sink.flush()
        os.fsync(sink.fileno())


def read_events(run_dir: Path) -> list[EvolveEvent]:
    path = run_dir / "evolve.jsonl"
    if not path.is_file():
        return []
    return [EvolveEvent.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------- helpers
def stream_families(settings: StreamSettings) -> list[TaskFamily]:
    """One family per phase (EnvSpecError for a bad spec)."""
    return [make_family(phase.family, dict(phase.options)) for phase in settings.phases]


def phase_episodes(settings: StreamSettings, phase: int) -> int:
    return settings.phases[phase].episodes or settings.episodes


def chunk_sizes(settings: StreamSettings, phase: int) -> list[int]:
    total = phase_episodes(settings, phase)
    if settings.schedule.every in ("phase", "never"):
        return [total]
    size = settings.schedule.episodes
    return [min(size, total - start) for start in range(0, total, size)]


def check_stream(settings: StreamSettings, families: Sequence[TaskFamily], eval_needed: int) -> None:
    """Every family has the train items its phases play and `eval_needed` eval items (ConfigError)."""
    if settings.loop.approve:
        raise ConfigError("the evolve loop runs unattended: set stream.loop.approve = false")
    if settings.fold.full_finetune:
        raise ConfigError("the evolve loop folds into LoRA adapters it can swap: set stream.fold.full_finetune = false")
    for spec in [*settings.anchors, *settings.protection.general]:
        make_family(spec)  # EnvSpecError now rather than at the first fold
    played: dict[str, int] = {}
    for phase, family in enumerate(families):
        played[family.name] = played.get(family.name, 0) + phase_episodes(settings, phase)
    for family in {family.name: family for family in families}.values():
        room = family.split_size("train") - settings.loop.probes
        if played[family.name] > room:
            raise ConfigError(f"{family.name} has {room} train items (after {settings.loop.probes} probes) but the "
                              f"stream plays {played[family.name]}; lower the phases' episodes")
        if family.split_size("eval") < eval_needed:
            raise ConfigError(f"{family.name} has {family.split_size('eval')} eval items but {eval_needed} are needed; "
                              "lower the eval/assess items or raise the family's eval_size option")


def check_run(run_dir: Path, settings: StreamSettings) -> None:
    """A run resumes only with the stream it was started with (ConfigError naming the fix)."""
    saved = run_dir / "config.json"
    if saved.is_file() and json.loads(saved.read_text()).get("stream") != settings.model_dump(mode="json"):
        raise ConfigError(f"{run_dir} was started with another stream; resume it with the same stream "
                          "(see its config.json) or pass a new --run-id")


class _Shifted:
    """A family whose eval split starts at `offset` (evaluate() always takes the first N items)."""

    def __init__(self, family: TaskFamily, offset: int) -> None:
        self.family, self.offset, self.name = family, offset, family.name
        self.success_threshold = family.success_threshold

    def split_size(self, split):
        return self.family.split_size(split) - (self.offset if split == "eval" else 0)

    def make(self, split, index: int):
        return self.family.make(split, index + (self.offset if split == "eval" else 0))


def heldout_contexts(engine: Engine, family: TaskFamily, items: int, settings: StreamSettings, *, offset: int = 0,
                     memory: Memory | None = None) -> list[tuple[list[Message], list[str]]]:
    """The retrieved skills (context, ids) of eval items [offset, offset + items): none without `memory`
    or without active skills of the family."""
    if memory is None or not memory.list_skills(family=family.name, status="active"):
        return []
    shifted = _Shifted(family, offset) if offset else family
    return memory_contexts(engine, memory, shifted, items, settings.loop.token_budget, settings.loop.retrieve_k)


def heldout(engine: Engine, family: TaskFamily, items: int, settings: StreamSettings, *, offset: int = 0,
            memory: Memory | None = None,
            contexts: list[tuple[list[Message], list[str]]] | None = None) -> tuple[EvalResult, list[Trajectory]]:
    """Accuracy on eval items [offset, offset + items); with `memory`, its active skills in the prompt
    (`contexts`: those already retrieved, `heldout_contexts`)."""
    shifted = _Shifted(family, offset) if offset else family
    loop = settings.loop
    if contexts is None:
        contexts = heldout_contexts(engine, family, items, settings, offset=offset, memory=memory)
    with_skills = bool(contexts)
    result, trajectories = evaluate(
        engine, shifted, items, settings.eval_sampling, max_turns=loop.max_turns,
        contexts=[context for context, _ in contexts] or None, skill_ids=[ids for _, ids in contexts] or None,
    )
    return result.model_copy(update={"memory": with_skills}), trajectories


def _assess(stream: Stream, family: TaskFamily, memory: Memory | None) -> EvalResult:
    settings = stream.settings
    return heldout(stream.engine, family, settings.assess_items, settings, offset=settings.assess_offset,
                   memory=memory)[0]


# ---------------------------------------------------------------------- the stages
def train(stream: Stream, phase: int, chunk: int) -> EvolveEvent:
    """Play one chunk of a phase with the agent loop (a finished chunk is not played again)."""
    settings, family = stream.settings, stream.families[phase]
    sizes = chunk_sizes(settings, phase)
    earlier = sum(phase_episodes(settings, p) for p in range(phase) if stream.families[p].name == family.name)
    loop = settings.loop.model_copy(update={"episodes": sizes[chunk], "start_index": earlier + sum(sizes[:chunk])})
    run_id = f"{stream.run_id}-p{phase}-c{chunk}"
    runtime = Runtime(engine=stream.engine, memory=stream.memory, family=family, settings=loop, run_id=run_id,
                      on_episode=stream.on_episode)
    stream.run_dir.mkdir(parents=True, exist_ok=True)
    values = run_loop(runtime, stream.run_dir / "loop.sqlite")
    played = [t for t in stream.memory.list_trajectories(env=family.name, split="train", limit=None)
              if t.id.startswith(run_id + "-")]
    evidence = {key: values.get(key, 0) for key in ("episodes", "successes", "skills_added", "skills_rejected")}
    evidence["generated_tokens"] = sum(trajectory.completion_tokens for trajectory in played)
    stream.say(f"phase {phase + 1} {family.name}: {evidence['episodes']} episodes, {evidence['successes']} "
               f"successes, {evidence['skills_added']} skills added")
    return EvolveEvent(kind="trained", phase=phase, chunk=chunk, family=family.name, evidence=evidence)


def fold_due(stream: Stream, chunk: int, chunks: int) -> bool:
    schedule = stream.settings.schedule
    if schedule.every == "never":
        return False
    if schedule.every == "budget":
        return any(len(stream.memory.list_skills(family=name, status="active")) > schedule.skill_budget
                   for name in stream.by_name())
    return schedule.every == "episodes" or chunk == chunks - 1


def measure(stream: Stream) -> dict[str, float]:
    """Memory-on accuracy of every family with active skills, before a fold."""
    skilled = [f for name, f in stream.by_name().items() if stream.memory.list_skills(family=name, status="active")]
    return {family.name: _assess(stream, family, stream.memory).accuracy for family in skilled}


def fold_skills(stream: Stream, state: EvolveState) -> tuple[str, bool] | None:
    """Fold the families with active skills into the next adapter and serve it if it passes the retention
    check: (its path, whether it was promoted); None if nothing to fold. A fold that fails the check is
    registered but not served: the adapter before it stays, and the skills stay in the prompt."""
    settings, memory = stream.settings, stream.memory
    skilled = {name: f for name, f in stream.by_name().items() if memory.list_skills(family=name, status="active")}
    earlier = {family.name: family for family in stream.families[: state.phase + 1]}
    anchors = {name: family for name, family in earlier.items() if name not in skilled}
    anchors |= protected_families(memory, set(skilled), settings.anchors, settings.protection)
    number = state.folds + 1
    name = f"{stream.run_id}-fold-{number}"
    target = adapters_dir(stream.home) / name
    run_dir = stream.home / "folds" / name
    sampling, turns = settings.eval_sampling, settings.loop.max_turns
    if not (target / "adapter_config.json").is_file():
        items = fold_items(memory, stream.engine, skilled, anchors, settings.items_per_family, settings.loop.probes,
                           settings.loop.token_budget, settings.loop.retrieve_k, seed=settings.fold.seed + number)
        if not any(not item.anchor for item in items):
            log_event(stream.run_dir, EvolveEvent(kind="fold_skipped", phase=state.phase, chunk=state.chunk,
                                                  evidence={"reason": "no family has active skills to fold"}))
            return None
        config = settings.fold.model_copy(update={"seed": settings.fold.seed + number})
        stream.say(f"fold {number}: {', '.join(skilled)} ({len(items)} prompts, anchors: {', '.join(anchors) or 'none'})")
        check = measure_before(stream.engine, anchors, settings.protection, run_dir, sampling, turns)
        finished = run_dir / "result.json"  # a kill during the check after the fold does not fold again
        if finished.is_file():
            result = FoldResult.model_validate_json(finished.read_text())
        else:
            result = stream.fold_fn(stream.engine, {**skilled, **anchors}, items, config, run_dir,
                                    resume=True, on_step=stream.on_fold_step)
            write_atomic(finished, result.model_dump_json(indent=2))
        if check is not None:
            check = check_after(stream.engine, check, anchors, settings.protection, run_dir, result.adapter,
                                sampling, turns, steps=result.steps)
        promoted = check is None or check.promoted
        evidence = result.model_dump(exclude={"adapter", "run_dir"}) | {
            "adapter": str(target), "families": sorted(skilled), "anchors": sorted(anchors), "prompts": len(items),
            **fold_spent(Path(result.run_dir)), "promoted": promoted,
            "retention": None if check is None else check.model_dump(mode="json"),
        }
        # logged before the adapter is registered: once it is, a resumed stage skips the fold
        log_event(stream.run_dir, EvolveEvent(kind="fold", phase=state.phase, chunk=state.chunk, evidence=evidence))
        chosen = result.adapter if check is None else check.promoted_adapter(result.adapter)
        register_adapter(stream.home, name, Path(chosen), latest=promoted)
    else:  # registered by this stage before a kill, which may have come before `latest` named it
        saved = run_dir / RETENTION
        check = RetentionCheck.model_validate_json(saved.read_text()) if saved.is_file() else None
        promoted = check is None or check.promoted
        register_adapter(stream.home, name, target, latest=promoted)
    if check is not None:
        stream.say(f"fold {number}: {check.summary()}")
    if promoted:
        serve(stream.engine, str(target))
    return str(target), promoted


def fold_spent(run_dir: Path) -> dict[str, int]:
    """A fold's rollout tokens and rollouts (episodes played, a pedagogical fold's replays included)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {"generated_tokens": 0}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_step = {record["step"]: record for record in records}  # a redone step counts once
    spent = {"generated_tokens": sum(record.get("generated_tokens", 0) for record in by_step.values())}
    if all("rollouts" in record for record in by_step.values()):
        spent["rollouts"] = sum(record["rollouts"] for record in by_step.values())
    return spent


def assess(stream: Stream, state: EvolveState) -> EvolveState:
    """Mark folded / back to active from memory-off accuracy; saves progress after every family."""
    rule, memory = stream.settings.rule, stream.memory
    for name, family in stream.by_name().items():
        if name in state.assessed:
            continue
        active = memory.list_skills(family=name, status="active")
        folded = memory.list_skills(family=name, status="folded")
        if not (active or folded):
            continue
        result = _assess(stream, family, None)
        evidence = {"accuracy_off": result.accuracy, "successes": result.successes, "items": result.items,
                    "adapter": state.adapter, "phase": state.phase, "fold": state.folds}
        if active and name in state.accuracy_on and rule.folds(result.accuracy, state.accuracy_on[name]):
            evidence_on = evidence | {"accuracy_on": state.accuracy_on[name]}
            _transition(stream, state, family, active, "folded", evidence_on,
                        f"memory-off accuracy {result.accuracy:.1%} after fold {state.folds} meets the fold rule "
                        f"(memory on before it: {state.accuracy_on[name]:.1%})")
        regressed = [skill for skill in folded if rule.regressed(result.accuracy, _folded_level(skill))]
        if regressed:
            level = max(_folded_level(skill) for skill in regressed)
            _transition(stream, state, family, regressed, "unfolded", evidence | {"folded_accuracy_off": level},
                        f"memory-off accuracy {result.accuracy:.1%} fell more than "
                        f"{rule.regression_tolerance:.0%} below {level:.1%}, its level when folded")
        state = state.model_copy(update={"assessed": [*state.assessed, name]})
        save_state(stream.run_dir, state)
    return state


def _folded_level(skill) -> float:
    for change in reversed(skill.status_history):
        if change.status == "folded":
            return float(change.evidence.get("accuracy_off", 0.0))
    return 0.0


def _transition(stream: Stream, state: EvolveState, family: TaskFamily, skills, kind: str, evidence: dict,
                reason: str) -> None:
    status = "folded" if kind == "folded" else "active"
    # logged first: if a kill stops the changes half-way, the assess done again changes the rest and the
    # event, logged once, names them all
    log_event(stream.run_dir, EvolveEvent(kind=kind, phase=state.phase, chunk=state.chunk, family=family.name,
                                          skill_ids=[skill.id for skill in skills], evidence=evidence))
    for skill in skills:
        stream.memory.set_status(skill.id, status, reason, evidence)
    stream.say(f"{family.name}: {len(skills)} skills {kind} ({reason})")


# -------------------------------------------------------------------------- the loop
def _next_chunk(state: EvolveState, chunks: int) -> EvolveState:
    position = {"chunk": state.chunk + 1} if state.chunk + 1 < chunks else {"phase": state.phase + 1, "chunk": 0}
    return state.model_copy(update={**position, "stage": "train", "accuracy_on": {}, "assessed": []})


def advance(stream: Stream, state: EvolveState) -> EvolveState:
    """Do the state's stage; the state after it."""
    chunks = len(chunk_sizes(stream.settings, state.phase))
    marks = stream.settings.rule.mark_folded
    if state.stage == "train":
        log_event(stream.run_dir, train(stream, state.phase, state.chunk))
        if not fold_due(stream, state.chunk, chunks):
            return _next_chunk(state, chunks)
        return state.model_copy(update={"stage": "measure" if marks else "fold"})
    if state.stage == "measure":
        return state.model_copy(update={"stage": "fold", "accuracy_on": measure(stream)})
    if state.stage == "fold":
        outcome = fold_skills(stream, state)
        if outcome is None:
            return _next_chunk(state, chunks)
        adapter, promoted = outcome
        if not promoted:  # the adapter before stays served; nothing changed for the assess to decide
            return _next_chunk(state.model_copy(update={"folds": state.folds + 1}), chunks)
        folded = state.model_copy(update={"folds": state.folds + 1, "adapter": adapter})
        return folded.model_copy(update={"stage": "assess"}) if marks else _next_chunk(folded, chunks)
    return _next_chunk(assess(stream, state), chunks)


def evolve_phase(stream: Stream, phase: int) -> EvolveState:
    """Run (or finish) one phase; a phase already done only has its adapter served again."""
    state = load_state(stream.run_dir) or EvolveState(adapter=stream.engine.adapter)
    serve(stream.engine, state.adapter)
    if state.phase < phase:
        raise RuntimeError(f"{stream.run_id}: phase {state.phase + 1} is not done; phases run in order")
    while state.phase == phase:
        state = advance(stream, state)
        save_state(stream.run_dir, state)
    return state


def run_evolve(stream: Stream) -> EvolveState:
    """Run the whole stream, resuming from `state.json` when there is one."""
    state = load_state(stream.run_dir) or EvolveState(adapter=stream.engine.adapter)
    for phase in range(state.phase, len(stream.families)):
        state = evolve_phase(stream, phase)
    return state
