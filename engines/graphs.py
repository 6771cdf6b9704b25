"""The decode step on a GPU as one CUDA graph: static buffers, captured once, replayed every token.

On a GPU a small model's decode step is bound by the host, not the device: transformers' forward
launches ~15 kernels a layer from Python, and the GPU waits for each. Measured on one H200
(docs/benchmarks.md, `benchmarks/gpu_check.py`): a 135M fold step used 0.01-0.02% of the GPU, a 1.4B
step 0.2%, both bound by decoding one token at a time. A CUDA graph records the step's kernels once
and replays them with one launch.

A graph replays fixed memory, so `StaticDecoder` decodes over buffers that never move: per layer a
key and a value buffer (rows, key/value heads, capacity, head_dim), a boolean mask (rows, capacity)
of what each row sees, and the step's inputs (token, position, the cache slot it writes) as device
tensors. The step writes its keys and values at the slot (`index_copy_`), opens the slot's column in
the mask, attends over the whole capacity (what is not yet written is masked), and advances the slot
and the positions itself, so the host only puts in the chosen tokens and replays. Rows do not leave
the batch when they finish (a graph's batch is fixed): they run on, masked out of the results, as
rows of padding do (a batch is rounded up to a power of two rows, the capacity to `CAPACITY_STEP`
positions, so graphs are reused across calls).

The step is the same computation as `engines.lean.LeanDecoder.step` (transformers' Llama forward with
SDPA, op for op), over the longer, masked key range; `engines.lean.covered` decides which models it
applies to, and rotary embeddings whose frequencies change at run time (dynamic, longrope) are left
out. It runs anywhere (the CPU tests hold it to the model's own forward); `DecodeGraphs` captures it
only on CUDA. A captured graph is valid only for the tensors and the Python branches it recorded:
the weights' storage, peft's per-layer switches (merged, disabled, active adapters, scaling) and the
autocast state make its key, so loading an adapter, merging or swapping weights captures anew;
in-place writes into the same tensors (a trainer's optimizer step on LoRA weights) need nothing.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn

from engines.lean import _caller, _rms_norm, covered, layer_parts, run_layers

log = logging.getLogger(__name__)

CAPACITY_STEP = 256  # a graph's cache capacity is a multiple of this (reused across calls)
KEPT_GRAPHS = 4  # captured decoders kept per engine (least recently used goes first)
_RUNTIME_ROPE = ("dynamic", "longrope")  # rotary types that recompute frequencies from the positions (a host sync)


def rows_for(batch: int) -> int:
    """The graph rows for a batch: the next power of two."""
    rows = 1
    while rows < batch:
        rows *= 2
    return rows


def capacity_for(positions: int) -> int:
    return -(-positions // CAPACITY_STEP) * CAPACITY_STEP


def graphable(model: nn.Module) -> nn.Module | None:
    """The causal LM inside `model` when `StaticDecoder` computes its forward, else None."""
    causal_lm = covered(model)
    if causal_lm is None:
        return None
    rope_type = getattr(causal_lm.model.rotary_emb, "rope_type", "default")
    if not isinstance(rope_type, str) or any(kind in rope_type for kind in _RUNTIME_ROPE):
        return None
    return causal_lm


def signature(model: nn.Module) -> tuple:
    """What a captured step depends on besides its own buffers: every parameter's and buffer's storage,
    peft's per-layer Python switches and the autocast state. Equal signatures replay the same kernels
    over the same tensors."""
    storage = tuple(tensor.data_ptr() for tensor in model.parameters()) + tuple(
        tensor.data_ptr() for tensor in model.buffers())
    switches = []
    for module in model.modules():
        if hasattr(module, "merged_adapters"):  # a peft tuner layer
            scaling = getattr(module, "scaling", {})
            switches.append((tuple(module.merged_adapters), bool(getattr(module, "disable_adapters", False)),
                             tuple(getattr(module, "active_adapters", ())),
                             tuple(sorted(scaling.items())) if isinstance(scaling, dict) else scaling))
    device_type = next(model.parameters()).device.type
    return (id(model), storage, tuple(switches), torch.is_autocast_enabled(device_type))


class StaticDecoder:
    """One model's decode step over static buffers of `rows` rows and `capacity` cache positions."""

    def __init__(self, model: nn.Module, rows: int, capacity: int) -> None:
        causal_lm = graphable(model)
        if causal_lm is None:
            raise ValueError("StaticDecoder covers Llama-architecture models with SDPA attention (engines.lean.covered)")
        self.model = model
        self.inner = causal_lm.model
        self.head = _caller(causal_lm.lm_head)
        self.layers = layer_parts(causal_lm)
        self.rows, self.capacity = rows, capacity
        weight = self.inner.embed_tokens.weight
        device, dtype = weight.device, weight.dtype
        config = causal_lm.config
        kv_heads = config.num_key_value_heads
        head_dim = self.layers[0][9]
        # zeros, not empty: a masked position is multiplied by a zero weight, and 0 x NaN would be NaN
        self.keys = [torch.zeros((rows, kv_heads, capacity, head_dim), device=device, dtype=dtype)
                     for _ in self.layers]
        self.values = [torch.zeros_like(keys) for keys in self.keys]
        self.mask = torch.zeros((rows, capacity), device=device, dtype=torch.bool)
        self.ids = torch.zeros((rows, 1), device=device, dtype=torch.long)
        self.positions = torch.zeros((rows, 1), device=device, dtype=torch.long)
        self.slot = torch.zeros((1,), device=device, dtype=torch.long)
        self.filled = 0  # host-side count of the written positions (the slot, without a sync)

    def load(self, cache, attention_mask: torch.Tensor, next_positions: torch.Tensor, pad_id: int) -> None:
        """Start from a prefilled batch: `cache` a transformers cache over B <= rows rows (layers with
        `keys`/`values` (B, KVH, W, d)), `attention_mask` (B, W), `next_positions` (B, 1). Extra rows
        are padding (masked everywhere but their own decoded positions)."""
        batch, width = attention_mask.shape
        if batch > self.rows or width >= self.capacity:
            raise ValueError(f"a batch of {batch} x {width} does not fit {self.rows} x {self.capacity}")
        for layer, keys, values in zip(cache.layers, self.keys, self.values, strict=True):
            keys[:batch, :, :width].copy_(layer.keys[:, :, :width])
            values[:batch, :, :width].copy_(layer.values[:, :, :width])
        self.mask.zero_()
        self.mask[:batch, :width].copy_(attention_mask.bool())
        self.ids.fill_(pad_id)
        self.positions.zero_()
        self.positions[:batch].copy_(next_positions.reshape(batch, 1))
        self.slot.fill_(width)
        self.filled = width

    def step(self) -> torch.Tensor:
        """Feed `ids` at `positions` into slot `slot`: the next-token logits (rows, V) in fp32; the slot
        and the positions move on by one. Nothing here reads a value back to the host."""
        self.mask.index_fill_(1, self.slot, True)
        hidden = self.inner.embed_tokens(self.ids)  # (R, 1, D)
        cos, sin = self.inner.rotary_emb(hidden, self.positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (R, 1, 1, d)
        hidden = run_layers(self.layers, hidden, cos, sin, self.mask[:, None, None, :], self._store)
        hidden = _rms_norm(hidden, self.inner.norm)
        logits = self.head(hidden)[:, -1, :].float()
        self.slot.add_(1)
        self.positions.add_(1)
        return logits

    def _store(self, key: torch.Tensor, value: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's keys and values into layer `index`'s buffers at the slot; the whole buffers."""
        keys, values = self.keys[index], self.values[index]
        keys.index_copy_(2, self.slot, key)
        values.index_copy_(2, self.slot, value)
        return keys, values

    def feed(self, chosen: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """The next step's input: `chosen` (B,) for the first B rows, or for the graph rows `rows` (B,) (a
        device index: the rows still decoding); the others keep theirs."""
        if rows is None:
            self.ids[:len(chosen), 0].copy_(chosen)
        else:
            self.ids.index_copy_(0, rows, chosen.reshape(-1, 1))

    def run(self) -> torch.Tensor:
        """One step; the logits (rows, V)."""
        if self.filled >= self.capacity:
            raise RuntimeError(f"the decode buffers hold {self.capacity} positions; all are written")
        self.filled += 1
        return self.step()

    def written(self, batch: int):
        """(cache, attention_mask) over the first `batch` rows and the positions written so far, as views:
        a cache-like object whose `layers` have `keys` and `values` (for `engines.turns.TurnCache.keep_rows`)."""
        layers = [_Layer(keys[:batch, :, :self.filled], values[:batch, :, :self.filled])
                  for keys, values in zip(self.keys, self.values, strict=True)]
        return _Written(layers), self.mask[:batch, :self.filled]


class _Layer:
    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values


class _Written:
    def __init__(self, layers: list[_Layer]) -> None:
        self.layers = layers


class CapturedDecoder(StaticDecoder):
    """A `StaticDecoder` whose step is one CUDA graph, captured at construction."""

    def __init__(self, model: nn.Module, rows: int, capacity: int) -> None:
        super().__init__(model, rows, capacity)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture wants
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = self.step()
        # the warm-up wrote keys, values, the mask and moved the slot: back to the empty state (`load` sets it)
        for buffer in (*self.keys, *self.values, self.mask, self.positions, self.slot, self.ids):
            buffer.zero_()

    def run(self) -> torch.Tensor:
        if self.filled >= self.capacity:
            raise RuntimeError(f"the decode buffers hold {self.capacity} positions; all are written")
        self.filled += 1
        self.graph.replay()
        return self.output


class DecodeGraphs:
    """An engine's captured decoders, by (rows, capacity, dtype, signature), the least recently used
    dropped past `KEPT_GRAPHS`. `capture=False` gives plain `StaticDecoder`s (the CPU tests' way in)."""

    def __init__(self, capture: bool = True, kept: int = KEPT_GRAPHS) -> None:
        self.capture = capture
        self.kept = kept
        self._decoders: OrderedDict[tuple, StaticDecoder] = OrderedDict()
        self.captures = 0  # graphs captured (each costs a few forward passes)
        self.failed: set[tuple] = set()  # models whose capture raised: they decode as before

    def decoder(self, model: nn.Module, batch: int, positions: int, role: str = "") -> StaticDecoder | None:
        """A decoder for `batch` rows and `positions` cache positions (prompt width + new tokens), or None
        where the model is not covered (the caller decodes as before). `role` keeps apart decoders that
        are in use at once on the same model (a guided rollout's student and teacher views)."""
        if graphable(model) is None:
            return None
        key = (rows_for(batch), capacity_for(positions + 1), signature(model), role)
        if key[2] in self.failed:
            return None
        found = self._decoders.get(key)
        if found is not None:
            self._decoders.move_to_end(key)
            return found
        while len(self._decoders) >= self.kept:
            self._decoders.popitem(last=False)
        try:
            made = (CapturedDecoder if self.capture else StaticDecoder)(model, key[0], key[1])
        except RuntimeError as error:  # a capture the model's code does not allow: decode as before, say why
            log.warning("CUDA graph capture failed (%s); decoding without graphs for this model", str(error)[:300])
            self.failed.add(key[2])
            return None
        self.captures += 1
        self._decoders[key] = made
        return made

    def clear(self) -> None:
        self._decoders.clear()
