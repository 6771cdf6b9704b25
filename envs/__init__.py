"""Environments: the episode protocol and records, task families by spec, answer extraction."""

from envs.base import (
    Environment,
    EnvSpecError,
    Message,
    Role,
    Split,
    StepResult,
    TaskFamily,
    ToolUse,
    Trajectory,
    Turn,
    close_environment,
)
from envs.extract import extract_answer
from envs.registry import available_families, make_family

__all__ = [
    "EnvSpecError",
    "Environment",
    "Message",
    "Role",
    "Split",
    "StepResult",
    "TaskFamily",
    "ToolUse",
    "Trajectory",
    "Turn",
    "available_families",
    "close_environment",
    "extract_answer",
    "make_family",
]
