"""One decoding step of a Llama-architecture model without transformers' per-call machinery.

A batch-8 decode step of SmolLM2-135M runs 30 decoder layers, and transformers' forward wraps every
one of them, and every module in it, in Python bookkeeping: module `__call__`s, keyword routing,
output records, the causal-mask builder, the attention-interface lookup. Measured here (2 threads,
LoRA on every linear layer, packed weights): 63 ms a step through `model(...)`, 56 ms through this,
with bit-identical logits. The step is the same computation in the same order, op for op, as
`LlamaForCausalLM.forward` with SDPA attention (transformers 5): RMSNorm in fp32, rotary embeddings
from the model's own `rotary_emb`, SDPA with the single query packed onto the key/value heads when
the batch is padded (`enable_gqa` when it is not), the same residual order. Every linear layer is
called through the module's own forward, so LoRA layers, packed layers (engines.onednn) and a
teacher's swapped weights behave as in the model's forward.

`LeanDecoder.build` returns None for anything it does not cover (another architecture, another
attention implementation, hooks or overridden forwards on the layers, training mode, a cache without
one layer per decoder layer); the caller then calls the model as usual.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn
from torch.nn import functional

from engines import onednn

_ARCHITECTURES = {"LlamaForCausalLM"}
_LAYER_CLASSES = {
    "layer": "LlamaDecoderLayer", "attention": "LlamaAttention", "mlp": "LlamaMLP", "norm": "LlamaRMSNorm",
}


_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"  # transformers' switch: SDPA's enable_gqa even with a mask


@contextlib.contextmanager
def grouped_sdpa(model: nn.Module):
    """While inside, a CPU model's SDPA attention over a masked batch (a fold's padded passes) lets SDPA
    read the key/value heads in groups (`enable_gqa`) instead of transformers' `repeat_kv`, which copies
    each key and value head per query head: for SmolLM2 (9 query heads over 3 key/value heads) two
    copies 3x the size, kept for the backward pass (~6% of a student pass's saved activations), and
    SDPA's forward and backward ~15% faster here (2 threads; the same outputs, bit for bit, measured).
    transformers only does it unmasked, for the GPU kernels' sake (masked GQA sends CUDA to the math
    kernel), so this is for CPU models only: elsewhere it does nothing. Its switch is an environment
    variable read at every attention call; it is restored on leaving."""
    try:
        cpu = next(model.parameters()).device.type == "cpu"
    except StopIteration:
        cpu = False
    if not cpu:
        yield
        return
    saved = os.environ.get(_FORCE_GQA)
    os.environ[_FORCE_GQA] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(_FORCE_GQA, None)
        else:
            os.environ[_FORCE_GQA] = saved


def _plain(module: nn.Module, expected: str) -> bool:
    """`module` is of the expected class, has no hooks and no instance forward (but engines.onednn's
    fused MLP, which without grad is the class's forward)."""
    return (
        type(module).__name__ == expected
        and not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)
        and ("forward" not in module.__dict__ or isinstance(onednn._forward_owner(module), onednn._LeanMLP))
    )


def _caller(module: nn.Module):
    """What to call for `module(x)`: its instance forward (a packed or LoRA layer's) when it has one and
    no hooks, else the module itself (nn.Module.__call__ runs its hooks)."""
    if module._forward_hooks or module._forward_pre_hooks:
        return module
    return module.__dict__.get("forward", module)


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """LlamaRMSNorm.forward, op for op."""
    dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * hidden.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def covered(model: nn.Module) -> nn.Module | None:
    """The causal LM inside `model` (itself, or what a peft model wraps) when a hand-written decode step
    computes exactly its forward: a Llama architecture with SDPA attention, SiLU, no tensor-parallel
    split or attention dropout, plain layers (no hooks or patched forwards), not in training mode.
    None otherwise (the caller then calls the model as usual)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(causal_lm, "config", None)
    if type(causal_lm).__name__ not in _ARCHITECTURES or config is None or causal_lm.training:
        return None
    if (
        getattr(config, "_attn_implementation", None) != "sdpa"
        or getattr(config, "hidden_act", None) != "silu"
        or getattr(config, "pretraining_tp", 1) != 1
        or getattr(config, "attention_dropout", 0.0) not in (0, 0.0)
    ):
        return None
    inner = getattr(causal_lm, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or len(layers) != config.num_hidden_layers or not _plain(inner.norm, _LAYER_CLASSES["norm"]):
        return None
    for layer in layers:
        if not (
            _plain(layer, _LAYER_CLASSES["layer"])
            and _plain(layer.self_attn, _LAYER_CLASSES["attention"])
            and _plain(layer.mlp, _LAYER_CLASSES["mlp"])
            and _plain(layer.input_layernorm, _LAYER_CLASSES["norm"])
            and _plain(layer.post_attention_layernorm, _LAYER_CLASSES["norm"])
        ):
            return None
    if inner._forward_hooks or inner._forward_pre_hooks or causal_lm._forward_hooks or causal_lm._forward_pre_hooks:
        return None
    return causal_lm


def layer_parts(causal_lm: nn.Module) -> list[tuple]:
    """Each decoder layer's parts as a decode step calls them: (input norm, q, k, v, o projections,
    post-attention norm, gate, up, down projections, head_dim, query heads per key/value head,
    scaling, layer index); the projections as `_caller` resolves them."""
    parts = []
    for layer in causal_lm.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        parts.append((
            layer.input_layernorm,
            _caller(attention.q_proj), _caller(attention.k_proj), _caller(attention.v_proj),
            _caller(attention.o_proj),
            layer.post_attention_layernorm,
            _caller(mlp.gate_proj), _caller(mlp.up_proj), _caller(mlp.down_proj),
            attention.head_dim, attention.num_key_value_groups, attention.scaling, attention.layer_idx,
        ))
    return parts


def run_layers(layers: list[tuple], hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: torch.Tensor | None, store) -> torch.Tensor:
    """One token through every decoder layer (`layer_parts`), as transformers' Llama forward with SDPA:
    `hidden` (B, 1, D), rotary `cos`/`sin` (B, 1, 1, d), `mask` (B, 1, 1, L) boolean or None (nothing
    hidden: SDPA expands the key/value heads itself), `store(key, value, layer index)` writes the
    token's keys and values (B, KVH, 1, d) into the cache and returns the layer's whole (B, KVH, L, d)."""
    batch = hidden.shape[0]
    for (norm_in, q_proj, k_proj, v_proj, o_proj, norm_post, gate_proj, up_proj, down_proj,
         head_dim, groups, scaling, index) in layers:
        residual = hidden
        x = _rms_norm(hidden, norm_in)
        query = q_proj(x).view(batch, 1, -1, head_dim).transpose(1, 2)  # (B, H, 1, d)
        key = k_proj(x).view(batch, 1, -1, head_dim).transpose(1, 2)  # (B, KVH, 1, d)
        value = v_proj(x).view(batch, 1, -1, head_dim).transpose(1, 2)
        query = (query * cos) + (_rotate_half(query) * sin)
        key = (key * cos) + (_rotate_half(key) * sin)
        keys, values = store(key, value, index)
        if groups > 1 and mask is None:
            attended = functional.scaled_dot_product_attention(query, keys, values, attn_mask=None,
                                                               scale=scaling, enable_gqa=True)
        else:
            if groups > 1:  # the query heads of each key/value head as its query positions
                query = query.reshape(batch, query.shape[1] // groups, groups, head_dim)
            attended = functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling)
        attended = attended.reshape(batch, -1, 1, head_dim).transpose(1, 2).reshape(batch, 1, -1)
        hidden = residual + o_proj(attended)
        residual = hidden
        x = _rms_norm(hidden, norm_post)
        hidden = residual + down_proj(functional.silu(gate_proj(x)) * up_proj(x))
    return hidden


class LeanDecoder:
    """The decode step of one model over one KV cache (the model's layers resolved once)."""

    def __init__(self, causal_lm: nn.Module, cache) -> None:
        self.inner = causal_lm.model
        self.cache = cache
        self.head = _caller(causal_lm.lm_head)
        self.layers = layer_parts(causal_lm)

    @classmethod
    def build(cls, model: nn.Module, cache) -> LeanDecoder | None:
        """The lean step for `model` (a causal LM, or a peft model around one) decoding into `cache`
        (a transformers DynamicCache filled by a prefill), or None where it does not apply."""
        causal_lm = covered(model)
        if causal_lm is None:
            return None
        if type(cache).__name__ != "DynamicCache" or len(getattr(cache, "layers", ())) != len(
                causal_lm.model.layers) or getattr(cache, "offloading", False):
            return None
        return cls(causal_lm, cache)

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of the next token after `input_ids` (B, 1), as `model(input_ids=...,
        attention_mask=..., position_ids=..., use_cache=True, logits_to_keep=1).logits[:, -1]`; the
        step's keys and values go into the cache. `attention_mask` (B, L) covers the cache and this token."""
        hidden = self.inner.embed_tokens(input_ids)  # (B, 1, D)
        cos, sin = self.inner.rotary_emb(hidden, position_ids[:, None] if position_ids.dim() == 1 else position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, 1, d): broadcast over heads
        # transformers drops an all-ones mask for one query token (nothing to hide) and lets SDPA expand
        # the key/value heads itself; a padded batch keeps its boolean mask and packs the query instead
        mask = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
        hidden = run_layers(self.layers, hidden, cos, sin, mask, self.cache.update)
        hidden = _rms_norm(hidden, self.inner.norm)
        return self.head(hidden)[:, -1, :]
