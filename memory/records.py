"""The skill record, the per-family baseline, and how both records flatten to Chroma and back.

A skill is one canonical pydantic record. In Chroma its text is the document (what is embedded) and
every other field is metadata: scalars stay scalars, lists and nested records become JSON strings.
A trajectory is stored with its task text as the document, a few scalars to filter on, and the
JSON of the whole `envs.base.Trajectory` under `record`.

Helpfulness compares a skill's success rate with the family's success rate without skills, both as
Beta posteriors under a Laplace prior (Beta(1, 1)), so that a few uses cannot swing it:

    rate_with    = (successes_with + a) / (uses + a + b)
    rate_without = (baseline_successes + a) / (baseline_episodes + a + b)
    helpfulness  = rate_with - rate_without
    bounds       = helpfulness -/+ z * sqrt(var_with + var_without)

where var is the variance of each Beta posterior (a normal approximation of the difference).
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from envs.base import Trajectory
from memory.errors import InvalidSkill

SkillKind = Literal["exemplar", "rule", "taught"]
SkillStatus = Literal["active", "pending", "folded", "retired"]
"""`pending`: verified by the loop, awaiting a person's approval (`skillfold skills approve`); like
folded and retired skills it lives in the archive collection and is never retrieved into prompts."""

SCHEMA_VERSION = 2


def now() -> datetime:
    return datetime.now(UTC)


def _decode_utf8(text: bytes | bytearray) -> str:
    try:
        return bytes(text).decode("utf-8")
    except UnicodeDecodeError as error:
        bad = error.object[error.start]
        raise InvalidSkill(
            f"skill text is not valid UTF-8: byte 0x{bad:02x} at position {error.start} ({error.reason}); "
            "decode it (or fix its encoding) before storing it"
        ) from None


def validate_skill_text(text: str | bytes, max_chars: int = 4000) -> str:
    """The text as a clean `str`, or `InvalidSkill` saying what is wrong with it.

    Bytes must decode as UTF-8; a `str` must not hold lone surrogates (what undecodable bytes turn
    into under `surrogateescape`); blank text and text over `max_chars` characters are refused.
    """
    if isinstance(text, bytes | bytearray):
        text = _decode_utf8(text)
    if not isinstance(text, str):
        raise InvalidSkill(f"skill text must be str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidSkill(
            f"skill text is not valid UTF-8: an unpaired surrogate at position {error.start} "
            "(undecodable bytes read with surrogateescape?)"
        ) from None
    if not text.strip():
        raise InvalidSkill("skill text is empty")
    if len(text) > max_chars:
        raise InvalidSkill(
            f"skill text is {len(text)} characters, over the limit of {max_chars} "
            "(MemoryConfig.max_skill_chars); shorten it or split it into several skills"
        )
    return text


def text_digest(text: str) -> str:
    """sha256 of the text with runs of whitespace collapsed: equal digests are exact duplicates."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


class SkillVersion(BaseModel):
    """One text a skill has had or has absorbed from a near-duplicate, and why it was recorded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str
    time: datetime = Field(default_factory=now)
    reason: str = Field(description="created, edited, or which near-duplicate was merged and which text won")


class StatusChange(BaseModel):
    """A decision about a skill's status (or its demotion), with the numbers it was made on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    status: SkillStatus
    time: datetime = Field(default_factory=now)
    reason: str
    evidence: dict[str, Any] = Field(default_factory=dict)


class FamilyStats(BaseModel):
    """Episodes of a family run without any skill in the prompt: the baseline for helpfulness."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: str
    baseline_episodes: int = 0
    baseline_successes: int = 0


class Helpfulness(BaseModel):
    """Success rate with a skill minus the family's success rate without skills, with bounds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mean: float
    lower: float
    upper: float
    rate_with: float
    rate_without: float
    uses: int
    baseline_episodes: int


def beta_posterior(
    successes: int, failures: int, prior: tuple[float, float] = (1.0, 1.0)
) -> tuple[float, float]:
    """Mean and variance of Beta(successes + a, failures + b)."""
    alpha, beta = successes + prior[0], failures + prior[1]
    total = alpha + beta
    return alpha / total, alpha * beta / (total * total * (total + 1.0))


class Skill(BaseModel):
    """One skill: the one canonical record, stored as-is in its family's Chroma collection."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12], min_length=1)
    kind: SkillKind
    family: str = Field(min_length=1, description="task family name, e.g. rg:leg_counting")
    title: str = ""
    text: str
    provenance: list[str] = Field(default_factory=list, description="ids of the trajectories it came from")
    versions: list[SkillVersion] = Field(default_factory=list, description="texts it has had, oldest first")
    successes_with: int = Field(default=0, ge=0, description="successful episodes with it in the prompt")
    failures_with: int = Field(default=0, ge=0, description="failed episodes with it in the prompt")
    status: SkillStatus = "active"
    status_history: list[StatusChange] = Field(default_factory=list)
    demoted: bool = Field(default=False, description="measured harmful so far: retrieved after the others")
    created_at: datetime = Field(default_factory=now)
    updated_at: datetime = Field(default_factory=now)

    @field_validator("text", mode="before")
    @classmethod
    def _decode_bytes(cls, value: Any) -> Any:
        if isinstance(value, bytes | bytearray):
            return _decode_utf8(value)
        return value

    @model_validator(mode="after")
    def _first_version(self) -> Skill:
        if not self.versions:
            self.versions = [SkillVersion(text=self.text, time=self.created_at, reason="created")]
        return self

    @property
    def uses(self) -> int:
        return self.successes_with + self.failures_with

    def helpfulness(
        self, baseline: FamilyStats, z: float = 1.96, prior: tuple[float, float] = (1.0, 1.0)
    ) -> Helpfulness:
        """Success rate with this skill minus the family's rate without skills (module docstring)."""
        rate_with, var_with = beta_posterior(self.successes_with, self.failures_with, prior)
        rate_without, var_without = beta_posterior(
            baseline.baseline_successes, baseline.baseline_episodes - baseline.baseline_successes, prior
        )
        mean = rate_with - rate_without
        spread = z * math.sqrt(var_with + var_without)
        return Helpfulness(
            mean=mean,
            lower=mean - spread,
            upper=mean + spread,
            rate_with=rate_with,
            rate_without=rate_without,
            uses=self.uses,
            baseline_episodes=baseline.baseline_episodes,
        )


def _dump_list(items: list[Any]) -> str:
    return json.dumps(
        [item.model_dump(mode="json") if isinstance(item, BaseModel) else item for item in items]
    )


def skill_to_chroma(skill: Skill) -> tuple[str, str, dict[str, str | int | float | bool]]:
    """(id, document, metadata) for one Chroma upsert of the whole record.

    Only what a `where` filter needs is a metadata key of its own; the rest of the record is one
    JSON string. Chroma keeps metadata one row per key, so fewer keys make every fetch cheaper
    (family-scoped top-5 at 100k skills: see docs/benchmarks.md).
    """
    record = skill.model_dump(mode="json", exclude={"id", "text", "family", "kind", "status", "demoted"})
    metadata: dict[str, str | int | float | bool] = {
        "schema": SCHEMA_VERSION,
        "family": skill.family,
        "kind": skill.kind,
        "status": skill.status,
        "demoted": skill.demoted,
        "text_sha256": text_digest(skill.text),
        "record": json.dumps(record, separators=(",", ":")),
    }
    return skill.id, skill.text, metadata


def skill_from_chroma(skill_id: str, document: str, metadata: dict[str, Any]) -> Skill:
    """The record that `skill_to_chroma` flattened (or the one-key-per-field layout of schema 1)."""
    common = {
        "id": skill_id,
        "text": document,
        "family": metadata["family"],
        "kind": metadata["kind"],
        "status": metadata["status"],
        "demoted": metadata["demoted"],
    }
    if "record" in metadata:
        return Skill.model_validate({**json.loads(metadata["record"]), **common})
    return Skill(
        **common,
        title=metadata["title"],
        provenance=json.loads(metadata["provenance"]),
        versions=json.loads(metadata["versions"]),
        successes_with=metadata["successes_with"],
        failures_with=metadata["failures_with"],
        status_history=json.loads(metadata["status_history"]),
        created_at=metadata["created_at"],
        updated_at=metadata["updated_at"],
    )


def task_text(trajectory: Trajectory) -> str:
    """What a trajectory is embedded by: the user messages of its prompt (else the whole prompt)."""
    user = [message.content for message in trajectory.prompt if message.role == "user"]
    text = "\n".join(user or [message.content for message in trajectory.prompt])
    return text if text.strip() else f"{trajectory.env} {trajectory.item_id}"


def trajectory_to_chroma(trajectory: Trajectory) -> tuple[str, str, dict[str, str | int | float | bool]]:
    """(id, document, metadata): scalars to filter on plus the whole record as JSON."""
    metadata: dict[str, str | int | float | bool] = {
        "schema": SCHEMA_VERSION,
        "env": trajectory.env,
        "item_id": trajectory.item_id,
        "split": trajectory.split,
        "success": trajectory.success,
        "reward": float(trajectory.reward),
        "failed_with_error": trajectory.error is not None,
        "truncated": trajectory.truncated,
        "model": trajectory.model,
        "adapter": trajectory.adapter or "",
        "started_at": trajectory.started_at.isoformat(),
        "started_ts": trajectory.started_at.timestamp(),
        "duration_s": float(trajectory.duration_s),
        "turns": len(trajectory.turns),
        "prompt_tokens": trajectory.prompt_tokens,
        "completion_tokens": trajectory.completion_tokens,
        "skill_ids": json.dumps(trajectory.skill_ids),
        "record": trajectory.model_dump_json(),
    }
    return trajectory.id, task_text(trajectory), metadata


def trajectory_from_chroma(metadata: dict[str, Any]) -> Trajectory:
    return Trajectory.model_validate_json(metadata["record"])
