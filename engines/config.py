"""The engine config: which backend serves the model, and how. `engines.load_engine` builds it.

Nested as `model` under every run config of `agent/` (`model.batch_size=16` as an override), and
saved with the run, so a run names exactly the engine it used.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EngineConfig(BaseModel):
    """A model to serve and the backend that serves it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["hf", "vllm"] = Field(
        default="hf", description="generation backend: hf (transformers, in this process) or vllm (servers at urls)")
    urls: tuple[str, ...] = Field(
        default=(), description="vllm: server URLs (`skillfold serve` prints one); several = data-parallel rollouts")
    name: str | None = Field(
        default=None, description="HF model id or directory; None = embedded default (vllm: the servers' model, "
        "which a fold's trainer loads too)")
    adapter: str | None = Field(default=None, description="PEFT adapter directory served on top")
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:1 ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads; None = all cores")
    batch_size: int = Field(default=32, ge=1, description="rows per forward pass (vllm: requests in flight per server)")
    packed_weights: bool = Field(
        default=True, description="CPU fp32: frozen linear layers computed from oneDNN-prepacked weights "
        "(engines.onednn; faster, the same model to ~1e-6); false = plain PyTorch linears")
    turn_cache_mib: int = Field(
        default=2048, ge=0, description="hf: MiB (on the model's device) for each row's KV cache kept between "
        "calls, so a multi-turn episode's next turn runs only its new tokens (engines.turns); 0 = off")

    cuda_graphs: bool = Field(
        default=True, description="hf on CUDA: each decode step replays one captured CUDA graph over static buffers "
        "(engines.graphs; small models decode host-bound without); false = transformers' forward a token")

    @model_validator(mode="after")
    def _urls_for_vllm(self) -> EngineConfig:
        if self.kind == "vllm" and not self.urls:
            raise ValueError("model.kind = vllm needs server URLs: --engine-url URL (or model.urls); "
                             "`skillfold serve` starts a server and prints its URL")
        if self.kind == "hf" and self.urls:
            raise ValueError("model.urls are for --engine vllm (model.kind = vllm)")
        return self
