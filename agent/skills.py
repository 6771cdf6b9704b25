"""Skills in and out of prompts: rendering, distillation from trajectories, verification.

A skill reaches the model in the form that works for small models (NOTES.md section 9): an
`exemplar` is a worked dialogue replayed as earlier chat turns; a `rule` or `taught` skill is a
short system message. Exemplar text is stored human-readable, one `### role` header per turn:

    ### user
    What is 12 * 7?
    ### assistant
    CALC(12*7)
    ### user
    Result: 84
    ### assistant
    ANSWER: 84

Distillation makes candidates: an exemplar from each verified success (always valid), and a rule
that the model writes by reflecting on successes and failures (prompt: agent/prompts/reflect.txt).
Verification runs a candidate on probe items of its family with and without it; a candidate enters
memory only if it does not lower success there (and succeeds at least once).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from importlib import resources

from pydantic import BaseModel, ConfigDict

from engines.base import Engine, SamplingParams
from envs.base import Message, TaskFamily, Trajectory
from learners.rollout import run_episodes
from memory import InvalidSkill, Memory, Skill

log = logging.getLogger(__name__)

_HEADER = re.compile(r"^### (user|assistant)\s*$", re.MULTILINE)


def dialogue_text(messages: Sequence[Message]) -> str:
    """Chat turns as exemplar text (system messages left out: the environment gives them)."""
    return "\n".join(
        f"### {message.role}\n{message.content.strip()}" for message in messages if message.role != "system"
    )


def exemplar_text(trajectory: Trajectory, family: TaskFamily | None = None) -> str:
    """An episode as a worked dialogue: the family's own brief form of it (an optional member
    `exemplar(trajectory) -> list[Message]`, e.g. a won text game as its moves) or the whole transcript."""
    brief = getattr(family, "exemplar", None)
    if callable(brief):
        try:
            messages = list(brief(trajectory))
            if messages and all(isinstance(message, Message) for message in messages):
                return dialogue_text(messages)
            log.warning("%s: exemplar() gave no list of messages; the whole transcript is used", trajectory.env)
        except Exception as error:  # a family's own code: the transcript is always a valid exemplar
            log.warning("%s: exemplar() raised %s: %s; the whole transcript is used", trajectory.env,
                        type(error).__name__, error)
    return dialogue_text(trajectory.messages())


def documentation_skills(family: TaskFamily) -> list[Skill]:
    """Worked dialogues from the usage examples of a family's tools (none for a family without tools).

    A small model never calls a tool it has only been told about; the tool's own documentation
    example, replayed as a dialogue, gives it the first call. These skills are verified like others.
    """
    documentation = getattr(family, "documentation", None)
    if documentation is None:
        return []
    return dialogue_skills(family.name, documentation())


def dialogue_skills(family: str, dialogues: Sequence[Sequence[Message]]) -> list[Skill]:
    """One exemplar skill of `family` per documentation dialogue, titled by its first tool call."""
    skills = []
    for dialogue in dialogues:
        call = next((m.content for m in dialogue if m.role == "assistant"), "tool")
        skills.append(
            Skill(kind="exemplar", family=family, title=f"how to call a tool: {call}",
                  text=dialogue_text(dialogue), provenance=[f"tool-documentation:{call}"])
        )
    return skills


def exemplar_messages(text: str) -> list[Message]:
    """Parse an exemplar's text back into chat turns (inverse of `exemplar_text`)."""
    headers = list(_HEADER.finditer(text))
    messages = []
    for index, header in enumerate(headers):
        end = headers[index + 1].start() if index + 1 < len(headers) else len(text)
        messages.append(Message(role=header.group(1), content=text[header.end():end].strip()))
    return messages


def skill_messages(skill: Skill) -> list[Message]:
    if skill.kind == "exemplar":
        turns = exemplar_messages(skill.text)
        if turns:
            return turns
    return [Message(role="system", content=f"Hint: {skill.text.strip()}")]


def render_context(skills: Sequence[Skill]) -> list[Message]:
    """Rules first (as system hints), then exemplars as earlier dialogue turns, each oldest first.

    The order is the skills' own, not their similarity to the task: prompts of a family that retrieve
    the same skills then start with the same context, which the engine runs once per batch (a shared
    prefix), and a fold's teacher sees the skills as the memory-on evaluation shows them.
    """
    ordered = sorted(skills, key=lambda skill: (skill.created_at, skill.id))
    rules = [skill for skill in ordered if skill.kind != "exemplar"]
    exemplars = [skill for skill in ordered if skill.kind == "exemplar"]
    context: list[Message] = []
    for skill in [*rules, *exemplars]:
        context.extend(skill_messages(skill))
    return context


def context_tokens(engine: Engine, text: str) -> int:
    return engine.count_tokens([{"role": "user", "content": text}])


def retrieve_for(
    memory: Memory, engine: Engine, family: str, prompt: Sequence[Message], token_budget: int, k: int
) -> list[Skill]:
    """Active skills of `family` for a task prompt (its user messages are the query), within budget."""
    query = "\n".join(message.content for message in prompt if message.role == "user")
    return memory.retrieve(
        query, family, token_budget=token_budget, count_tokens=lambda text: context_tokens(engine, text), k=k
    )


def exemplar_from(trajectory: Trajectory, family: TaskFamily | None = None) -> Skill:
    """An exemplar skill from a verified success, in the family's brief form where it has one."""
    question = next((message.content for message in trajectory.prompt if message.role == "user"), "")
    return Skill(
        kind="exemplar",
        family=trajectory.env,
        title=question.strip().splitlines()[0][:120] if question.strip() else trajectory.item_id,
        text=exemplar_text(trajectory, family),
        provenance=[trajectory.id],
    )


def reflection_prompt(family: str, successes: Sequence[Trajectory], failures: Sequence[Trajectory],
                      task_family: TaskFamily | None = None) -> list[dict]:
    template = resources.files("agent").joinpath("prompts/reflect.txt").read_text(encoding="utf-8")

    def show(trajectories: Sequence[Trajectory]) -> str:
        return "\n\n".join(exemplar_text(trajectory, task_family) for trajectory in trajectories) or "(none)"

    text = template.format(family=family, successes=show(successes), failures=show(failures))
    return [{"role": "user", "content": text}]


def rule_from_reflection(raw: str, max_chars: int = 300) -> str | None:
    """The first non-empty line or two of the model's reflection, or None if nothing usable."""
    lines = [line.strip(" -*#\t") for line in raw.strip().splitlines() if line.strip(" -*#\t")]
    if not lines:
        return None
    rule = " ".join(lines[:2])
    rule = re.sub(r"^(rule|tip|hint)\s*[:.-]\s*", "", rule, flags=re.IGNORECASE)
    return rule[:max_chars] if len(rule) >= 10 else None


def write_rule(
    engine: Engine, family: str, successes: Sequence[Trajectory], failures: Sequence[Trajectory], seed: int,
    task_family: TaskFamily | None = None,
) -> Skill | None:
    """A rule the model writes from up to 3 successes and 3 failures (each in the family's brief form)."""
    prompt = reflection_prompt(family, successes[:3], failures[:3], task_family)
    output = engine.generate([prompt], SamplingParams(temperature=0.7, max_new_tokens=80, seed=seed))[0]
    rule = rule_from_reflection(output.text)
    if rule is None:
        return None
    return Skill(
        kind="rule",
        family=family,
        title=rule[:80],
        text=rule,
        provenance=[trajectory.id for trajectory in [*successes[:3], *failures[:3]]],
    )


class Verdict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    skill_id: str
    admitted: bool
    successes_with: int
    successes_without: int
    probes: int


def verify(
    engine: Engine,
    family: TaskFamily,
    candidates: Sequence[Skill],
    probe_indices: Sequence[int],
    params: SamplingParams,
    *,
    max_turns: int = 8,
    base_context: Sequence[Message] = (),
) -> list[Verdict]:
    """Run every candidate (added to `base_context`) and the baseline on the probe items, in one batch."""
    if not candidates:
        return []
    arms: list[list[Message]] = [list(base_context)]
    arms += [list(base_context) + render_context([candidate]) for candidate in candidates]
    environments, contexts = [], []
    for arm in arms:
        for index in probe_indices:
            environments.append(family.make("train", index))
            contexts.append(arm)
    trajectories = run_episodes(
        engine,
        environments,
        params,
        split="train",
        contexts=contexts,
        max_turns=max_turns,
        success_threshold=family.success_threshold,
    )
    probes = len(probe_indices)
    per_arm = [
        sum(trajectory.success for trajectory in trajectories[arm * probes:(arm + 1) * probes])
        for arm in range(len(arms))
    ]
    baseline = per_arm[0]
    return [
        Verdict(
            skill_id=candidate.id,
            admitted=per_arm[position + 1] >= baseline and per_arm[position + 1] > 0,
            successes_with=per_arm[position + 1],
            successes_without=baseline,
            probes=probes,
        )
        for position, candidate in enumerate(candidates)
    ]


def review_pending(memory: Memory, skill_id: str, approved: bool, reason: str, by: str) -> Skill:
    """A person's answer on a pending skill: approved -> active, rejected -> retired, `reason` in its history.

    Raises `InvalidSkill` (nothing written) for a skill that is not pending.
    """
    skill = memory.get_skill(skill_id)
    if skill.status != "pending":
        raise InvalidSkill(f"skill {skill_id} is {skill.status}, not pending: only pending skills are approved or rejected")
    verb = "approved" if approved else "rejected"
    return memory.set_status(
        skill_id, "active" if approved else "retired", f"{verb} by {by}: {reason}".rstrip(": "), {"by": by}
    )
