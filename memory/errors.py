"""The errors the memory package raises on bad input, each naming the problem and the fix.

Exception
 ├── MemoryStoreError (RuntimeError)  the store cannot be opened, read or reached
 ├── SkillNotFound (LookupError)      no skill with that id
 ├── TrajectoryNotFound (LookupError) no trajectory with that id
 └── InvalidSkill (ValueError)        a skill record or text that must not be stored
"""

from __future__ import annotations


class MemoryStoreError(RuntimeError):
    """The Chroma store cannot be opened, read or reached (bad home, corrupt files, server down)."""


class SkillNotFound(LookupError):
    """No skill with this id in any family."""

    def __init__(self, skill_id: str) -> None:
        self.skill_id = skill_id
        super().__init__(f"no skill with id {skill_id!r}; `skillfold skills list` shows the stored ids")

    def __str__(self) -> str:
        return str(self.args[0])


class TrajectoryNotFound(LookupError):
    """No trajectory with this id."""

    def __init__(self, trajectory_id: str) -> None:
        self.trajectory_id = trajectory_id
        super().__init__(f"no trajectory with id {trajectory_id!r}")

    def __str__(self) -> str:
        return str(self.args[0])


class InvalidSkill(ValueError):
    """A skill that must not be stored: empty, too long, not UTF-8, or contradicting the stored one."""
