"""The engine config: which backend serves the model, and how. `engines.load_engine` builds it.

Nested as `model` under every run config of `agent/` (`model.batch_size=16` as an override), and
saved with the run, so a run names exactly the engine it used.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EngineConfig(BaseModel):
    """A model to serve and the backend that serves it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["hf"] = Field(default="hf", description="generation backend")
    name: str | None = Field(default=None, description="HF model id or directory; None = embedded default")
    adapter: str | None = Field(default=None, description="PEFT adapter directory served on top")
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:1 ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads; None = all cores")
    batch_size: int = Field(default=32, ge=1, description="rows per forward pass")
    packed_weights: bool = Field(
        default=True, description="CPU fp32: frozen linear layers computed from oneDNN-prepacked weights "
        "(engines.onednn; faster, the same model to ~1e-6); false = plain PyTorch linears")
