"""Linear layers served from oneDNN-prepacked weights on CPU.

PyTorch computes a CPU `nn.Linear` with MKL's sgemm on a plain (out, in) weight. On the AMD EPYC
(AVX-512) machine measured, oneDNN's kernel on a weight reordered once into its blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, what `torch.compile`'s freezing pass uses) is far faster
for the shapes a decoder runs: a batch-8 decode step's 210 layer matmuls take 39.4 ms with `F.linear`
and 21.4 ms packed, the 49k x 576 output head 15.0 -> 5.5 ms (2 threads; `benchmarks/bench_linear.py`,
docs/benchmarks.md). The results are the same matmul in another summation order (~1e-6 relative;
sampled tokens identical in the tests).

`pack_linears(model)` swaps every frozen fp32 CPU `nn.Linear` of a model to its packed weight:
- the packed weight *replaces* the dense one, so memory does not grow: the Parameter holds an empty
  tensor meanwhile, so reading the weight or merging into it fails on the shape instead of silently;
  the output head (which the fold's losses read, and which SmolLM2 ties to its input embedding) and
  any other shared weight are packed as a copy instead (113 MiB for SmolLM2-135M; `copies=False`
  leaves them plain);
- the layer stays differentiable in its input (the student's forward and backward pass through
  frozen base layers under LoRA): the backward multiplies by the dense weight, unpacked one layer at
  a time (~0.2 ms a layer);
- weights that train (`requires_grad`) are left alone, as is anything not fp32 on CPU;
- a peft LoRA layer over a packed base layer gets a lean forward (`_LeanLora`).
A weight swapped into a packed layer (`parameter.data = other`, as a teacher scope does) is used
densely until it is swapped back. `merged_decoding(model)` merges each LoRA layer's adapter into its
base weight for a rollout (in place in the plain weight, read by engines.small_linear's kernel where
it runs; packed otherwise) and leaves it plain (dense, on the `_Packed` holder; W bit for bit) afterwards,
for the training passes up to the next rollout. A decode step's few rows go through that kernel wherever a
dense weight is at hand (a plain one, or the head's kept copy). `unpack_linears(model)` puts the
dense weights back bit for bit.
Anything that changes weights (merging an adapter, attaching LoRA, a full fine-tune) must run between
`unpack_linears` and the next `pack_linears`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys

import torch
from torch import nn

from engines import small_linear
from engines.merge import Residue, Scratch

_PACK_BATCH = 8  # the batch hint of the reorder: the decode batch the layout is tuned for


def available() -> bool:
    """Whether this PyTorch build has the oneDNN packed-linear kernels."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") and (
            torch.ops.mkldnn._reorder_linear_weight is not None)
    except (AttributeError, RuntimeError):
        return False


def _packable(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    return (
        type(module) is nn.Linear
        and isinstance(weight, torch.Tensor)
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and not weight.requires_grad
        and (bias is None or not bias.requires_grad)
    )


class _Packed:
    """One linear layer's packed weight and what `unpack` needs to restore it."""

    def __init__(self, module: nn.Module, packed: torch.Tensor, dense: torch.Tensor | None) -> None:
        self.module = module
        self.packed: torch.Tensor | None = packed
        self.dense = dense  # the dense weight when it is kept (the head, a tied weight), else None
        self.plain: torch.Tensor | None = None  # between merged_decoding scopes: the weight held plainly
        self.parameter = module.weight

    def current(self) -> bool:
        """Whether the parameter still holds what it held at packing: a weight swapped in since (a
        teacher scope that sets `.data`) is used as it is, densely, until it is swapped back."""
        data = self.parameter.data
        return data.numel() == 0 if self.dense is None else data.data_ptr() == self.dense.data_ptr()

    def dense_weight(self) -> torch.Tensor:
        if self.plain is not None:
            return self.plain
        if self.packed is None:
            raise RuntimeError("this layer was unpacked (engines.onednn.unpack_linears) after the forward pass "
                               "that now runs backward: unpack only after the backward pass")
        return self.dense if self.dense is not None else self.packed.to_dense()

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x Wᵀ + b from whichever form the weight is in now (packed, or plain: between decoding scopes,
        or inside one that merges in place); a decode step's few rows by the small-batch kernel
        (engines.small_linear) from a plain or kept dense weight, where it runs."""
        dense = self.plain if self.plain is not None else self.dense
        if dense is not None:
            y = small_linear.linear(x, dense, bias)  # None beyond a decode step's rows, or without the kernel
            if y is not None:
                return y
        if self.plain is not None:
            return nn.functional.linear(x, self.plain, bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, bias, "none", [], "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.current():
            return nn.functional.linear(x, self.parameter, self.module.bias)
        if self.plain is None and torch.is_grad_enabled() and x.requires_grad:
            return _PackedLinear.apply(x, self)
        return self.matmul(x, self.module.bias)  # a plain weight goes through F.linear, autograd's own node


class _PackedLinear(torch.autograd.Function):
    """y = x W^T + b through the packed weight; dL/dx = dL/dy W (W frozen: no weight gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: _Packed) -> torch.Tensor:
        ctx.layer = layer
        return layer.matmul(x, layer.module.bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.matmul(ctx.layer.dense_weight()), None


class _LoraOverPacked(torch.autograd.Function):
    """y = x Wᵀ + s·(x Aᵀ) Bᵀ for a frozen packed W and a trained LoRA pair, as one autograd node with its
    backward written out (what peft's layer plus `_PackedLinear` give through five nodes and their
    bookkeeping; the fold's student pass runs 210 of these per pass, several passes per step):

        ∂x = ∂y W + s·(∂y B) A      ∂A = s·(∂y B)ᵀ x      ∂B = s·∂yᵀ (x Aᵀ)

    Saves x and x Aᵀ (n x r), as the unfused layer does. ∂x skips the dense W when x needs no gradient."""

    @staticmethod
    def forward(ctx, x, a, b, scale, layer):
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # (n, in)
        low = rows @ a.t()  # (n, r)
        base = layer.matmul(rows, None)  # (n, out)
        y = torch.addmm(base, low, b.t(), alpha=scale)
        ctx.save_for_backward(rows, low, a, b)
        ctx.scale, ctx.layer, ctx.shape = scale, layer, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        rows, low, a, b = ctx.saved_tensors
        scale = ctx.scale
        grad_rows = grad.reshape(-1, grad.shape[-1])  # (n, out)
        through_b = (grad_rows @ b).mul_(scale)  # (n, r): s·∂y B
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addmm(grad_rows @ ctx.layer.dense_weight(), through_b, a).view(ctx.shape)
        if ctx.needs_input_grad[1]:
            grad_a = through_b.t() @ rows  # (r, in)
        if ctx.needs_input_grad[2]:
            grad_b = (grad_rows.t() @ low).mul_(scale)  # (out, r)
        return grad_x, grad_a, grad_b, None, None


class _LeanLora:
    """A peft LoRA `Linear` over a packed base layer: y = base(x) + s·(x Aᵀ)Bᵀ without peft's per-call
    bookkeeping (0.45 s of a batch-8, 64-token rollout over 210 layers: 10%). Any case beyond one
    active adapter, fp32, no dropout in training, no DoRA, no LoRA bias, no extra arguments, not merged
    or disabled, goes to peft's own forward."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def _plain_adapter(self, dtype: torch.dtype) -> str | None:
        """The one active adapter when this call is the plain case, else None."""
        module = self.module
        names = module.active_adapters
        if module.disable_adapters or module.merged or len(names) != 1 or names[0] not in module.lora_A:
            return None
        name = names[0]
        if (
            module.use_dora.get(name, False)
            or getattr(module, "lora_bias", {}).get(name, False)
            or (module.training and not isinstance(module.lora_dropout[name], nn.Identity))
            or dtype != module.lora_A[name].weight.dtype
        ):
            return None
        return name

    def _packed_base(self) -> _Packed | None:
        """The base layer's packed holder when it computes from its own weight (not one swapped in)
        and has no bias: the case the lean LoRA paths multiply by directly."""
        layer = _packed_layer(self.module.base_layer)
        if layer is None or not layer.current() or self.module.base_layer.bias is not None:
            return None
        return layer

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        module = self.module
        if module.disable_adapters != module.merged and not (args or kwargs):
            # adapters switched off (a teacher that is the base model), or merged into the packed weight
            # (merged_decoding): the base layer alone
            return module.base_layer(x)
        name = None if args or kwargs else self._plain_adapter(x.dtype)
        if name is None:
            return type(module).forward(module, x, *args, **kwargs)
        a, b, scale = module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]
        if torch.is_grad_enabled():
            layer = self._packed_base()
            if layer is not None:
                return _LoraOverPacked.apply(x, a, b, scale, layer)
            return module.base_layer(x) + nn.functional.linear(nn.functional.linear(x, a), b) * scale
        y = module.base_layer(x)
        low = nn.functional.linear(x, a)
        return torch.addmm(y.reshape(-1, y.shape[-1]), low.reshape(-1, low.shape[-1]), b.t(), alpha=scale).view(y.shape)


class _SwiGLULora(torch.autograd.Function):
    """A SwiGLU MLP whose three projections are LoRA layers over frozen packed weights, as one node:

        g = x Wgᵀ + s_g·(x A_gᵀ)B_gᵀ    u = x Wuᵀ + s_u·(x A_uᵀ)B_uᵀ    h = silu(g) ⊙ u
        y = h Wdᵀ + s_d·(h A_dᵀ)B_dᵀ

    Autograd through the unfused layers (three `_LoraOverPacked`, silu, the product) keeps x, g,
    silu(g), u and h: four (n, intermediate) tensors. This keeps x, g and u and recomputes silu(g) and
    h in the backward pass (elementwise, cheap), a quarter less of a student pass's saved activations
    for SmolLM2 (per position and layer, 2 x 1536 of ~12k floats), in one node instead of five:

        ∂h = ∂y W_d + s_d·(∂y B_d)A_d      ∂u = ∂h ⊙ silu(g)      ∂g = ∂h ⊙ u ⊙ σ(g)(1 + g(1 − σ(g)))
        ∂x = ∂g W_g + s_g·(∂g B_g)A_g + ∂u W_u + s_u·(∂u B_u)A_u
        ∂A = s·(∂out B)ᵀ in   ∂B = s·∂outᵀ (in Aᵀ)   for each projection (in: x, or h for the down one)
    """

    @staticmethod
    def forward(ctx, x, a_gate, b_gate, a_up, b_up, a_down, b_down, scales, layers):
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # (n, hidden)
        gate_layer, up_layer, down_layer = layers
        s_gate, s_up, s_down = scales
        low_gate, low_up = rows @ a_gate.t(), rows @ a_up.t()  # (n, r)
        gate = torch.addmm(gate_layer.matmul(rows, None), low_gate, b_gate.t(), alpha=s_gate)  # (n, inter)
        up = torch.addmm(up_layer.matmul(rows, None), low_up, b_up.t(), alpha=s_up)
        product = nn.functional.silu(gate).mul_(up)  # h
        low_down = product @ a_down.t()
        y = torch.addmm(down_layer.matmul(product, None), low_down, b_down.t(), alpha=s_down)
        ctx.save_for_backward(rows, gate, up, low_gate, low_up, low_down, a_gate, b_gate, a_up, b_up, a_down, b_down)
        ctx.scales, ctx.layers, ctx.shape = scales, layers, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        rows, gate, up, low_gate, low_up, low_down, a_gate, b_gate, a_up, b_up, a_down, b_down = ctx.saved_tensors
        gate_layer, up_layer, down_layer = ctx.layers
        s_gate, s_up, s_down = ctx.scales
        need = ctx.needs_input_grad
        grad_y = grad.reshape(-1, grad.shape[-1])  # (n, hidden)
        sigmoid = torch.sigmoid(gate)
        activated = gate * sigmoid  # silu(g)
        product = activated * up  # h
        through_down = (grad_y @ b_down).mul_(s_down)  # (n, r)
        grad_product = torch.addmm(grad_y @ down_layer.dense_weight(), through_down, a_down)  # ∂h (n, inter)
        grad_a_down = through_down.t() @ product if need[5] else None
        grad_b_down = (grad_y.t() @ low_down).mul_(s_down) if need[6] else None
        del product
        grad_up = grad_product * activated  # ∂u
        del activated
        # ∂g = ∂h ⊙ u ⊙ σ(g)(1 + g(1 − σ(g))), in the buffers already made
        grad_gate = grad_product.mul_(up).mul_(sigmoid.mul_(gate.neg().mul_(sigmoid).add_(gate).add_(1.0)))
        del sigmoid
        through_gate = (grad_gate @ b_gate).mul_(s_gate)
        through_up = (grad_up @ b_up).mul_(s_up)
        grad_x = None
        if need[0]:
            grad_x = torch.addmm(grad_gate @ gate_layer.dense_weight(), through_gate, a_gate)
            grad_x.addmm_(grad_up, up_layer.dense_weight()).addmm_(through_up, a_up)
            grad_x = grad_x.view(ctx.shape)
        grad_a_gate = through_gate.t() @ rows if need[1] else None
        grad_b_gate = (grad_gate.t() @ low_gate).mul_(s_gate) if need[2] else None
        grad_a_up = through_up.t() @ rows if need[3] else None
        grad_b_up = (grad_up.t() @ low_up).mul_(s_up) if need[4] else None
        return grad_x, grad_a_gate, grad_b_gate, grad_a_up, grad_b_up, grad_a_down, grad_b_down, None, None


class _LeanMLP:
    """A LlamaMLP-shaped module (`down(silu(gate(x)) * up(x))`) whose three projections are LoRA layers
    over packed base layers: a student's forward with grad runs it as one `_SwiGLULora` node (a
    quarter less saved activations); anything else (no grad, adapters off or merged, another
    activation, another adapter setup) runs the module's own forward."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def _fused(self, x: torch.Tensor):
        """(A, B pairs, scales, packed layers) when this call can run as one node, else None."""
        module = self.module
        if not (torch.is_grad_enabled() and x.dtype == torch.float32):
            return None
        pairs, scales, layers = [], [], []
        for projection in (module.gate_proj, module.up_proj, module.down_proj):
            owner = _forward_owner(projection)
            if not isinstance(owner, _LeanLora):
                return None
            name, layer = owner._plain_adapter(x.dtype), owner._packed_base()
            if name is None or layer is None:
                return None
            pairs += [projection.lora_A[name].weight, projection.lora_B[name].weight]
            scales.append(projection.scaling[name])
            layers.append(layer)
        return pairs, tuple(scales), tuple(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self._fused(x) if _is_silu(self.module.act_fn) else None
        if fused is None:
            return type(self.module).forward(self.module, x)
        pairs, scales, layers = fused
        return _SwiGLULora.apply(x, *pairs, scales, layers)


def _is_silu(activation: object) -> bool:
    """torch's SiLU or transformers' (`ACT2FN["silu"]`), without hooks."""
    return type(activation).__name__ in ("SiLU", "SiLUActivation") and not (
        activation._forward_hooks or activation._forward_pre_hooks)


def _is_swiglu(module: nn.Module) -> bool:
    return type(module).__name__ == "LlamaMLP" and all(
        hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))


_KEPT: dict[int, _Packed] = {}  # data_ptr of a dense weight kept beside its packed copy -> its layer


def project(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden @ weightᵀ (no bias): through the packed copy when `weight` is a kept dense weight of a
    packed layer (the output head: the fold's chunked losses, 1.8x faster for 128 rows here), else
    plainly. Differentiable in `hidden` either way; never in `weight` through the packed copy."""
    layer = _KEPT.get(weight.data_ptr())
    if (
        layer is None
        or weight.requires_grad
        or layer.dense.shape != weight.shape
        or layer.dense.stride() != weight.stride()
        or hidden.dtype != torch.float32
        or _packed_layer(layer.module) is not layer
    ):
        return hidden @ weight.T
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _PackedLinear.apply(hidden, layer)
    return torch.ops.mkldnn._linear_pointwise(hidden.contiguous(), layer.packed, None, "none", [], "")


def _is_lora_linear(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("base_layer", "lora_A", "lora_B", "scaling", "use_dora")) and (
        _packed_layer(module.base_layer) is not None)


def pack_linears(model: nn.Module, copies: bool = True) -> int:
    """Pack every packable linear layer of `model` not packed yet; returns how many were packed now.
    `copies=False` leaves alone the layers whose weight must stay dense (the head, a tied weight)
    rather than pack them as a copy."""
    if not available():
        return 0
    packed_now = 0
    # outside inference mode: the restored weights must stay usable under autograd later
    with torch.inference_mode(False), torch.no_grad():
        users: dict[int, int] = {}
        for module in model.modules():
            for parameter in module.parameters(recurse=False):
                users[id(parameter)] = users.get(id(parameter), 0) + 1
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        adapters = {id(layer) for module in model.modules() if hasattr(module, "lora_A")
                    for table in (module.lora_A, module.lora_B) for layer in table.values()}
        for module in model.modules():
            if not _packable(module) or _packed_layer(module) is not None or id(module) in adapters:
                continue  # LoRA's own small matrices stay plain: they are read (and swapped) directly
            weight = module.weight
            # the output head stays readable: the fold's chunked losses multiply by its weight
            keep = users.get(id(weight), 0) > 1 or module is head
            if keep and not copies:
                continue
            packed = _pack(weight.detach())
            layer = _Packed(module, packed, weight.detach() if keep else None)
            if keep:
                _KEPT[weight.data_ptr()] = layer
            else:  # the Parameter keeps no storage meanwhile: reading or merging into it fails
                weight.data = torch.empty(0, dtype=weight.dtype)
            module.forward = layer.forward  # an instance attribute: the class's forward is untouched
            packed_now += 1
        for module in model.modules():
            if _is_lora_linear(module) and "forward" not in module.__dict__:
                module.forward = _LeanLora(module).forward
        for module in model.modules():
            if _is_swiglu(module) and "forward" not in module.__dict__ and not (
                    module._forward_hooks or module._forward_pre_hooks):
                module.forward = _LeanMLP(module).forward
    return packed_now


def unpack_linears(model: nn.Module) -> int:
    """Dense weights back (bit for bit) in every packed layer of `model`; returns how many."""
    for module in model.modules():
        if isinstance(_forward_owner(module), (_LeanLora, _LeanMLP)):
            del module.forward
    layers = [layer for layer in map(_packed_layer, model.modules()) if layer is not None]
    count = len(layers)
    with torch.inference_mode(False), torch.no_grad():
        while layers:  # one layer at a time, its packed weight freed before the next is unpacked
            layer = layers.pop()
            if layer.dense is None:
                layer.parameter.data = layer.plain if layer.plain is not None else layer.packed.to_dense()
            elif _KEPT.get(layer.dense.data_ptr()) is layer:
                del _KEPT[layer.dense.data_ptr()]
            del layer.module.forward
            layer.packed = layer.plain = None  # whoever still holds the layer (an old graph) holds no weights
            del layer
    return count


class merged_decoding:
    """While inside, each LoRA layer over a packed base layer runs from one weight W + s·BA (its adapter
    merged in, as peft's `merge_adapter` would), so that decoding multiplies by one matrix per layer
    instead of a packed one and two small ones beside it: measured here on a batch-8 decode step with
    LoRA on all 210 layers, 115-136 ms unmerged -> 73-83 ms (the base model's speed). Where the
    small-batch kernel runs (engines.small_linear), W + s·BA is made in place in the plain weight and
    the decode steps read it there (a fold's batch-8, 64-token rollout 7.1-9.3 s -> 5.5-6.4 s here,
    with no weight packed or unpacked); elsewhere it is packed for oneDNN.
    For decoding only: the adapter must not change inside (no training step).

    On leaving, each of those layers keeps its base weight *plainly* (dense, `_Packed.plain`: W bit for
    bit, (W + s·BA) - s·BA with the few elements that rounding moved written back from the residue
    kept on entering, `engines.merge.Residue`; without it the frozen base drifted a little at every
    rollout, and a resumed fold, starting from the weights as loaded, ended elsewhere): what comes
    between two rollouts of a fold (the teacher's pass, the student's passes and their backward)
    multiplies by the plain weight, instead of unpacking it again for every pass's backward; the next
    scope merges the new adapter in again. `unpack_linears` takes the plain weight back
    into the layer. A layer already plain enters from its plain weight; one with several or unusual
    adapters (what `_LeanLora` sends to peft) is left as it is."""

    def __init__(self, model: nn.Module) -> None:
        self.layers: list[tuple[nn.Module, _Packed, str]] = []
        self.residues: list[Residue] = []  # per layer entered: what W + s·BA − s·BA does not give back
        for module in model.modules():
            owner = _forward_owner(module)
            if not isinstance(owner, _LeanLora):
                continue
            layer = owner._packed_base()
            if layer is None or layer.dense is not None or getattr(module, "fan_in_fan_out", False):
                continue
            name = owner._plain_adapter(torch.float32)  # packed weights are fp32
            if name is not None:
                self.layers.append((module, layer, name))

    def __enter__(self):
        # with the small-batch kernel here, a decode step's matmuls read plain weights faster than
        # packed ones: W + s·BA is made in place in the plain weight and stays plain, nothing is packed
        in_place = small_linear.available()
        self.residues = []
        try:
            with torch.inference_mode(False), torch.no_grad(), mapped_blocks():
                # buffers the size of the largest layer, reused layer after layer (new blocks per layer,
                # mmap'd here, cost more in page faults than the merge itself)
                scratch = Scratch(max((module.lora_B[name].weight.shape[0] * module.lora_A[name].weight.shape[1]
                                       for module, _, name in self.layers), default=0))
                for module, layer, name in self.layers:
                    # W + s·BA in W's plain buffer (unpacked first where the layer holds W packed); W itself
                    # is kept only as the few elements that leaving would not give back (engines.merge)
                    weight = layer.plain if layer.plain is not None else layer.packed.to_dense()
                    original = Scratch.like(scratch.total, weight).copy_(weight)
                    merged = _add_delta(weight, module, name, 1.0)
                    del weight
                    try:
                        back = _add_delta(Scratch.like(scratch.back, merged).copy_(merged), module, name, -1.0)
                        residue = Residue.between(back, original, scratch.mask)  # what leaving computes, against W
                    except BaseException:
                        merged.copy_(original)
                        raise
                    del original, back
                    if in_place:
                        layer.packed, layer.plain = None, merged
                    else:
                        try:
                            packed = _pack(merged)
                        except BaseException:
                            residue.restore(_add_delta(merged, module, name, -1.0))  # W again, bit for bit
                            raise
                        layer.packed, layer.plain = packed, None
                        del packed
                    del merged
                    module.merged_adapters.append(name)
                    self.residues.append(residue)
        except BaseException:
            self._leave(self.layers[:len(self.residues)], self.residues)  # none stays half-done
            raise
        return self

    def __exit__(self, *exc):
        self._leave(self.layers, self.residues)

    @staticmethod
    def _leave(layers, residues: list[Residue]) -> None:
        with torch.inference_mode(False), torch.no_grad(), mapped_blocks():
            for (module, layer, name), residue in zip(layers, residues, strict=True):
                module.merged_adapters.remove(name)
                merged = layer.plain if layer.plain is not None else layer.packed.to_dense()
                layer.plain = residue.restore(_add_delta(merged, module, name, -1.0))
                layer.packed = None
        residues.clear()


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked layout of a dense (out, in) fp32 weight, tuned for the decode batch."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_BATCH)


def _add_delta(weight: torch.Tensor, module: nn.Module, name: str, sign: float) -> torch.Tensor:
    """weight ± s·B A (peft's delta weight for a non-fan-in-fan-out LoRA layer), in place; returns it.
    The same product with the same scale both ways, so that merging then unmerging gives W back up to
    float rounding, and bit for bit with the merge's `engines.merge.Residue` written back."""
    b, a = module.lora_B[name].weight, module.lora_A[name].weight
    return weight.addmm_(b, a, alpha=sign * module.scaling[name])


# glibc's mallopt parameter, and the threshold to go back to after `mapped_blocks` (set by whoever
# fixes one for the process: engines.allocator.cap_heap); None: glibc's dynamic threshold's ceiling
M_MMAP_THRESHOLD = -3
_MMAP_CEILING = 32 * 1024 * 1024
heap_threshold: int | None = None


def glibc():
    """The C library when it has glibc's `mallopt` (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


_MALLOPT = getattr(glibc(), "mallopt", None)


@contextlib.contextmanager
def mapped_blocks(threshold: int = 1024 * 1024):
    """While inside, glibc serves blocks of `threshold` bytes and more by mmap, so that freeing them
    gives them back to the system. `merged_decoding` swaps every layer's weight between its packed
    and its plain form at every fold step, megabytes a layer: from malloc's heap (glibc raises its
    mmap threshold to 32 MiB as large blocks are freed) those blocks changed hands with the
    activations in between and fragmented it, +160 MiB of peak RSS over five 8 x 64 fold steps here.
    Afterwards the threshold is `heap_threshold` if one was fixed, else the 32 MiB that glibc's own
    would have reached. Does nothing off glibc."""
    if _MALLOPT is None:
        yield
        return
    _MALLOPT(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        _MALLOPT(M_MMAP_THRESHOLD, heap_threshold or _MMAP_CEILING)


def _forward_owner(module: nn.Module) -> object | None:
    """The object whose method was set as `module`'s instance forward (a _Packed, _LeanLora or _LeanMLP), if any."""
    return getattr(module.__dict__.get("forward"), "__self__", None)


def _packed_layer(module: nn.Module) -> _Packed | None:
    owner = _forward_owner(module)
    return owner if isinstance(owner, _Packed) else None


def is_packed(model: nn.Module) -> bool:
    """Whether some linear layer of `model` computes from a packed weight right now."""
    return any(_packed_layer(module) is not None for module in model.modules())
