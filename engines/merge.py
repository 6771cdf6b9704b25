"""LoRA adapters merged into fp32 base weights and taken out again bit for bit.

Merging s·BA into a frozen weight for a pass and subtracting it afterwards does not give the weight
back: in floating point (W + Δ) − Δ ≠ W for the elements where W + Δ rounds into a coarser binade
than W (the rounding error of the sum is up to an ulp of W there, and the difference rounds back to
W only about half the time). A fold that merges its live adapter for every rollout (and its teacher
pass) moved its frozen base weights a little at every step, so a resumed fold, which starts from the
weights as loaded, ended with another adapter than an uninterrupted one (6e-6 to 6.5e-4 on the
default model after 1-3 steps, 5e-8 to 5e-7 on the tiny test model).

`Residue` is what subtracting Δ again does not give back: the flat indices and original values of
those elements, found when merging (W + Δ − Δ is computed then as it will be on leaving, and
compared bit for bit with W). Taking Δ out and writing the residue back restores W exactly. Δ must be
the same bits both times: the same product of the same, unchanged A and B (a scope for decoding or a
no-grad pass, never a training step). The residue is a small share of the elements, never a second
copy of the weights: on SmolLM2-135M with a rank-16 adapter on every linear layer, 0.24% of the
106M merged elements (1.9 MiB) for the adapter of a 6-step fold (lr 5e-4), 0.9% (7.3 MiB) with
B ~ N(0, 1e-2); a fold's peak RSS stays where it was (bench_fold: 1445 MiB, 1435-1440 before). It
grows with |Δ| / |W| (a random-init model with B ~ N(0, 1e-2): 10%, on CUDA as on CPU) and is at most
every element (8 bytes each, 2x a fp32 weight) where Δ dwarfs W. It costs time on entering: a
second delta product and a bitwise comparison per layer (a scope on the default model ~0.1 s -> ~0.3 s
here, on a busy 2-core machine; a rollout takes 5-6 s).

`merged(model)` is peft's `merge_adapter` / `unmerge_adapter` with this restore, for a peft model on
plain (unpacked) weights; `engines.onednn.merged_decoding` does the same on packed layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class Residue:
    """The elements of a weight that (W + Δ) − Δ does not give back: flat indices (int32 while the
    weight has fewer than 2³¹ elements, else int64) and W's values there."""

    indices: torch.Tensor  # (n,)
    values: torch.Tensor  # (n,)

    @classmethod
    def between(cls, back: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None = None) -> Residue:
        """Where `back` (what unmerging will compute) differs from `weight` bit for bit (-0.0 and 0.0,
        or two NaNs, count as different), and the weight's values there. `mask`: a bool scratch
        buffer of at least the weight's size for the comparison (else a new one)."""
        bits = _BITS[weight.element_size()]
        flat_back, flat_weight = back.reshape(-1).view(bits), weight.reshape(-1).view(bits)
        differs = torch.ne(flat_back, flat_weight, out=mask[:weight.numel()]) if mask is not None else (
            flat_back != flat_weight)
        where = differs.nonzero().view(-1)  # (n,) int64
        values = weight.reshape(-1)[where]  # a copy
        return cls(where.to(torch.int32) if weight.numel() < 2**31 else where, values)

    def restore(self, weight: torch.Tensor) -> torch.Tensor:
        """Write the original values back into `weight` (contiguous), in place; returns it."""
        if self.indices.numel():
            weight.view(-1).index_copy_(0, self.indices.long(), self.values)
        return weight

    @property
    def nbytes(self) -> int:
        return self.indices.numel() * self.indices.element_size() + self.values.numel() * self.values.element_size()


class Scratch:
    """Buffers for merging layer after layer (W + Δ, W + Δ − Δ, their comparison), the size of the
    largest layer, made once per scope. New blocks per layer, freed between the small residues
    that outlive them, fragment malloc's heap: serving a fold's adapter on SmolLM2-135M kept 260 MiB
    more resident that way."""

    def __init__(self, numel: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.total = torch.empty(numel, dtype=dtype, device=device)
        self.back = torch.empty(numel, dtype=dtype, device=device)
        self.mask = torch.empty(numel, dtype=torch.bool, device=device)

    def fits(self, weight: torch.Tensor) -> bool:
        return weight.dtype == self.total.dtype and weight.device == self.total.device and (
            weight.numel() <= self.total.numel())

    @staticmethod
    def like(buffer: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        """The start of `buffer` shaped as `tensor` (a fresh tensor's alignment: the same sums)."""
        return buffer[:tensor.numel()].view_as(tensor)


def merge_into(weight: torch.Tensor, delta: torch.Tensor, scratch: Scratch | None = None) -> Residue:
    """weight += delta in place (as peft's merge), returning what `unmerge_from` needs to give W back
    exactly. Uses `scratch` for W + Δ and W + Δ − Δ (else two new tensors of the weight's size)."""
    if scratch is None:
        total, back, mask = torch.add(weight, delta), None, None
    else:
        total = torch.add(weight, delta, out=Scratch.like(scratch.total, weight))
        back, mask = Scratch.like(scratch.back, weight), scratch.mask
    back = torch.sub(total, delta, out=back) if back is not None else total - delta
    residue = Residue.between(back, weight, mask)
    weight.copy_(total)
    return residue


def unmerge_from(weight: torch.Tensor, delta: torch.Tensor, residue: Residue) -> torch.Tensor:
    """weight -= delta in place (as peft's unmerge), then the residue written back: W bit for bit,
    when `delta` has the bits it had in `merge_into`."""
    return residue.restore(weight.sub_(delta))


def mergeable(model: nn.Module) -> bool:
    """Whether `merged` serves `model`: a peft model whose frozen base weights are fp32. In half
    precision a merge's residue would be most of the weights: there the LoRA pairs run beside them."""
    if not (hasattr(model, "merge_adapter") and hasattr(model, "peft_config")):
        return False
    base = next((parameter for parameter in model.parameters() if not parameter.requires_grad), None)
    return base is not None and base.dtype == torch.float32


def _exact(module: nn.Module, name: str) -> bool:
    """Whether the adapter `name` of a peft LoRA layer merges as a plain delta weight into a dense one
    (no DoRA or other variant, no LoRA bias), the case `merged` restores exactly."""
    base = module.get_base_layer()
    weight = getattr(base, "weight", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.is_contiguous()
        and weight.numel() > 0
        and name not in getattr(module, "lora_variant", {})
        and not getattr(module, "use_dora", {}).get(name, False)
        and not getattr(module, "lora_bias", {}).get(name, False)
    )


class merged:
    """While inside, each LoRA layer of a peft `model` runs with its active adapters merged into its
    base weight (what peft's `merge_adapter` does, with the same numbers); on leaving, the base
    weights are bit for bit what they were (`Residue`). A layer with an adapter merged already, or
    one that is not a plain delta weight (DoRA, a LoRA bias), runs as it is (its LoRA beside its base
    layer: the same model, only slower). The adapters must not change inside. Large blocks (peft's
    delta weights) are mmap'd while it works (`engines.onednn.mapped_blocks`), the rest is `Scratch`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.entries: list[tuple[nn.Module, str, Residue]] = []

    def _layers(self) -> list[tuple[nn.Module, list[str]]]:
        layers = []
        for module in self.model.modules():
            if not (hasattr(module, "lora_A") and hasattr(module, "get_delta_weight")
                    and hasattr(module, "merged_adapters")) or module.merged:
                continue
            names = [name for name in module.active_adapters if name in module.lora_A]
            if names and all(_exact(module, name) for name in names):
                layers.append((module, names))
        return layers

    def __enter__(self):
        from engines.onednn import mapped_blocks

        layers = self._layers()
        try:
            with torch.inference_mode(False), torch.no_grad(), mapped_blocks():
                weights = [module.get_base_layer().weight for module, _ in layers]
                scratch = Scratch(max((weight.numel() for weight in weights), default=0),
                                  *((weights[0].dtype, weights[0].device) if weights else ()))
                for module, names in layers:
                    for name in names:
                        weight = module.get_base_layer().weight.data
                        residue = merge_into(weight, module.get_delta_weight(name),
                                             scratch if scratch.fits(weight) else None)
                        module.merged_adapters.append(name)
                        self.entries.append((module, name, residue))
                del scratch
        except BaseException:
            self._leave()
            raise
        return self

    def __exit__(self, *exc):
        self._leave()

    def _leave(self) -> None:
        from engines.onednn import mapped_blocks

        with torch.inference_mode(False), torch.no_grad(), mapped_blocks():
            while self.entries:
                module, name, residue = self.entries.pop()
                unmerge_from(module.get_base_layer().weight.data, module.get_delta_weight(name), residue)
                module.merged_adapters.remove(name)

    @property
    def residue_bytes(self) -> int:
        return sum(residue.nbytes for _, _, residue in self.entries)
