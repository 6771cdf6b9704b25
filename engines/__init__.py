"""Generation and scoring backends behind one protocol (`Engine`), used by agent and learners alike.

`load_engine(config)` builds the backend an `EngineConfig` names: `engines.hf` (transformers in this
process, CPU or CUDA) or `engines.vllm` (vLLM servers over HTTP; `engines.vllm_server` starts them).
Both are imported lazily so that importing the protocol does not import torch.
"""

from collections.abc import Callable

from engines.base import Chat, Engine, Generation, SamplingParams, TokenScores
from engines.config import EngineConfig
from engines.models import DEFAULT_MODEL, ModelNotFound, cache_root, pull_default_model, resolve_model

__all__ = [
    "DEFAULT_MODEL",
    "Chat",
    "Engine",
    "EngineConfig",
    "Generation",
    "ModelNotFound",
    "SamplingParams",
    "TokenScores",
    "cache_root",
    "load_engine",
    "pull_default_model",
    "resolve_model",
]


def _load_hf(config: EngineConfig) -> Engine:
    from engines.hf import HFEngine

    return HFEngine.load(
        config.name,
        device=config.device,
        dtype=config.dtype,
        threads=config.threads,
        batch_size=config.batch_size,
        adapter=config.adapter,
        packed_weights=config.packed_weights,
        turn_cache_mib=config.turn_cache_mib,
        cuda_graphs=config.cuda_graphs,
    )


def _load_vllm(config: EngineConfig) -> Engine:
    from engines.vllm import VLLMEngine

    engine = VLLMEngine(config.urls, model=config.name, concurrency=config.batch_size)
    if config.adapter:
        engine.load_adapter(config.adapter)
    return engine


_LOADERS: dict[str, Callable[[EngineConfig], Engine]] = {"hf": _load_hf, "vllm": _load_vllm}


def load_engine(config: EngineConfig) -> Engine:
    """The engine `config.kind` names, serving `config.name` (with `config.adapter` on top)."""
    loader = _LOADERS.get(config.kind)
    if loader is None:
        raise ValueError(f"unknown engine kind {config.kind!r}; available: {', '.join(sorted(_LOADERS))}")
    return loader(config)
