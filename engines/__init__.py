"""Generation and scoring backends behind one protocol (`Engine`), used by agent and learners alike.

`engines.hf` (transformers, CPU or CUDA) is imported lazily so that importing the protocol does not
import torch.
"""

from engines.base import Chat, Engine, Generation, SamplingParams, TokenScores
from engines.models import DEFAULT_MODEL, ModelNotFound, cache_root, pull_default_model, resolve_model

__all__ = [
    "DEFAULT_MODEL",
    "Chat",
    "Engine",
    "Generation",
    "ModelNotFound",
    "SamplingParams",
    "TokenScores",
    "cache_root",
    "load_engine",
    "pull_default_model",
    "resolve_model",
]


def load_engine(kind: str = "hf", **options) -> Engine:
    """Build an engine by kind ("hf"; "vllm" where installed)."""
    if kind == "hf":
        from engines.hf import HFEngine

        return HFEngine.load(**options)
    raise ValueError(f"unknown engine kind {kind!r}; available: hf")
