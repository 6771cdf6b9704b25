"""Pure decisions over skill records: merging duplicates, demoting and retiring, fitting a budget.

Nothing here touches Chroma; `memory.store` reads the records, calls these, and writes the results.

- Dedup: an incoming skill whose text equals (whitespace aside) a stored one of its family, or lies
  within the near-duplicate cosine distance of one or of an earlier new skill of the same batch,
  merges into that record instead of becoming a new one.
- Merge: a duplicate keeps the stored id, the union of provenance (order kept), the summed counts,
  and a version entry for a different text. The better-measured text wins: the one whose success
  rate has the higher lower bound (Beta posterior, Laplace prior); a tie keeps the stored text.
- Curate: with at least `min_uses` uses, a skill whose helpfulness upper bound is below zero (it
  clearly lowers success) is retired; one whose mean is below zero is demoted (kept active, but
  retrieved after the others); a demoted skill whose mean is back at zero or above is restored.
- Budget: skills in order of relevance, the non-demoted first, each taken if its tokens still fit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from memory.errors import InvalidSkill
from memory.records import FamilyStats, Skill, SkillVersion, StatusChange, beta_posterior, now, text_digest


def success_lower_bound(skill: Skill, z: float, prior: tuple[float, float] = (1.0, 1.0)) -> float:
    mean, variance = beta_posterior(skill.successes_with, skill.failures_with, prior)
    return mean - z * math.sqrt(variance)


def merge_duplicate(stored: Skill, incoming: Skill, distance: float, z: float = 1.96) -> Skill:
    """`stored` with `incoming` folded in: same id, joined provenance and counts, versions kept.

    The same record added again (same id) only joins provenance: its counts are already stored.
    """
    provenance = list(dict.fromkeys([*stored.provenance, *incoming.provenance]))
    again = incoming.id == stored.id
    merged = stored.model_copy(
        update={
            "provenance": provenance,
            "successes_with": stored.successes_with + (0 if again else incoming.successes_with),
            "failures_with": stored.failures_with + (0 if again else incoming.failures_with),
            "created_at": min(stored.created_at, incoming.created_at),
            "updated_at": now(),
        }
    )
    if " ".join(incoming.text.split()) == " ".join(stored.text.split()):
        return merged
    adopt = success_lower_bound(incoming, z) > success_lower_bound(stored, z)
    reason = (
        f"near-duplicate {incoming.id} merged (cosine distance {distance:.3f}); "
        f"{'its text is better measured and replaced the stored one' if adopt else 'the stored text was kept'}"
    )
    versions = [*stored.versions, SkillVersion(text=incoming.text, reason=reason)]
    if adopt:
        return merged.model_copy(
            update={"text": incoming.text, "title": incoming.title, "versions": versions}
        )
    return merged.model_copy(update={"versions": versions})


@dataclass
class AdditionPlan:
    """What adding a batch of one family's skills writes, and where each input ended up."""

    records: dict[str, tuple[Skill, np.ndarray | None]]  # id -> (record, vector if its text is new)
    outcome: list[str]  # per input: the id of the record it is in
    created: list[str]  # ids of records that were not stored before


def plan_additions(
    incoming: list[tuple[Skill, np.ndarray]],
    stored: dict[str, Skill],
    exact: dict[str, str],
    nearest: list[tuple[str | None, float]],
    threshold: float,
    z: float,
) -> AdditionPlan:
    """Decide, for each incoming skill in order, whether it is new or merges into a record.

    `exact` maps text digests to stored ids, `nearest` is each input's nearest stored skill and
    its cosine distance, `stored` holds those records. Inputs are also compared with the new
    skills before them in the batch, so one call never stores two duplicates.
    """
    records: dict[str, tuple[Skill, np.ndarray | None]] = {}
    outcome: list[str] = []
    created: list[str] = []
    exact = dict(exact)
    for (skill, vector), (near_id, near_distance) in zip(incoming, nearest, strict=True):
        digest = text_digest(skill.text)
        target, distance = exact.get(digest), 0.0
        if target is None:
            target, distance = (near_id, near_distance) if near_distance <= threshold else (None, math.inf)
            for other in created:
                other_vector = records[other][1]
                assert other_vector is not None
                other_distance = 1.0 - float(
                    np.dot(vector, other_vector) / (np.linalg.norm(vector) * np.linalg.norm(other_vector))
                )
                if other_distance <= threshold and other_distance < distance:
                    target, distance = other, other_distance
        if target is None:
            if skill.id in records:
                raise InvalidSkill(f"two different skills in one call share the id {skill.id}")
            records[skill.id] = (skill, vector)
            created.append(skill.id)
            exact[digest] = skill.id
            outcome.append(skill.id)
            continue
        current, current_vector = records[target] if target in records else (stored[target], None)
        merged = merge_duplicate(current, skill, distance, z=z)
        records[target] = (merged, vector if merged.text != current.text else current_vector)
        outcome.append(target)
    return AdditionPlan(records, outcome, created)


Action = Literal["retire", "demote", "restore"]


class CurationDecision(BaseModel):
    """What `curate` did to one skill, and the numbers it decided on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    skill_id: str
    action: Action
    evidence: dict[str, Any]


def decide(
    skill: Skill, baseline: FamilyStats, min_uses: int, z: float, prior: tuple[float, float]
) -> tuple[CurationDecision, Skill] | None:
    """The decision for one active skill and the record after it, or None when nothing changes."""
    if skill.status != "active" or skill.uses < min_uses:
        return None
    helpfulness = skill.helpfulness(baseline, z=z, prior=prior)
    evidence = {
        "uses": skill.uses,
        "successes_with": skill.successes_with,
        "baseline_episodes": baseline.baseline_episodes,
        "baseline_successes": baseline.baseline_successes,
        "helpfulness": round(helpfulness.mean, 4),
        "lower": round(helpfulness.lower, 4),
        "upper": round(helpfulness.upper, 4),
        "z": z,
        "prior": list(prior),
    }
    if helpfulness.upper < 0:
        action: Action = "retire"
        reason = "lowers success: helpfulness upper bound below zero"
        update: dict[str, Any] = {"status": "retired"}
    elif helpfulness.mean < 0 and not skill.demoted:
        action, reason, update = "demote", "helpfulness below zero so far", {"demoted": True}
    elif helpfulness.mean >= 0 and skill.demoted:
        action, reason, update = "restore", "helpfulness back at zero or above", {"demoted": False}
    else:
        return None
    change = StatusChange(status=update.get("status", skill.status), reason=reason, evidence=evidence)
    update |= {"status_history": [*skill.status_history, change], "updated_at": now()}
    return CurationDecision(skill_id=skill.id, action=action, evidence=evidence), skill.model_copy(
        update=update
    )


def fit_budget(
    candidates: Iterable[tuple[Skill, float]], token_budget: int, count_tokens: Callable[[str], int], k: int
) -> list[Skill]:
    """At most `k` skills, non-demoted first, each by distance, that together fit `token_budget`."""
    ordered = sorted(candidates, key=lambda pair: (pair[0].demoted, pair[1]))
    chosen: list[Skill] = []
    left = token_budget
    for skill, _distance in ordered:
        if len(chosen) == k:
            break
        cost = count_tokens(skill.text)
        if cost <= left:
            chosen.append(skill)
            left -= cost
    return chosen


def export_markdown(skills: list[Skill], families: dict[str, FamilyStats]) -> str:
    """A readable dump: one section per family, one subsection per skill."""
    lines = ["# Skills", ""]
    for family in sorted({skill.family for skill in skills} | set(families)):
        stats = families.get(family, FamilyStats(family=family))
        lines += [
            f"## {family}",
            "",
            f"Baseline without skills: {stats.baseline_successes}/{stats.baseline_episodes} episodes succeeded.",
            "",
        ]
        for skill in (skill for skill in skills if skill.family == family):
            helpfulness = skill.helpfulness(stats)
            lines += [
                f"### {skill.title or skill.id}",
                "",
                f"- id `{skill.id}`, {skill.kind}, {skill.status}{' (demoted)' if skill.demoted else ''}",
                f"- uses {skill.uses}: {skill.successes_with} succeeded, {skill.failures_with} failed; "
                f"helpfulness {helpfulness.mean:+.3f} [{helpfulness.lower:+.3f}, {helpfulness.upper:+.3f}]",
                f"- versions {len(skill.versions)}, from trajectories {json.dumps(skill.provenance)}",
                "",
                *(f"> {line}" for line in skill.text.splitlines()),
                "",
            ]
    return "\n".join(lines)
