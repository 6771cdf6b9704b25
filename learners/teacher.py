"""The fold's teacher: scores the trained tokens of its views (the episodes with the privileged context).

`self-frozen` is the student's own weights under the adapter state of the fold's start, `self-ema` an
exponential moving average of the adapter, `external` another model with the same vocabulary. A
self-teacher shares the student's base weights: it swaps its adapter state in for its no-grad passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from engines.merge import mergeable, merged
from learners.passes import causal_lm, is_packed, shared_prefix_hidden_at
from learners.student import adapter_parameters
from learners.views import EpisodeViews


class Teacher:
    """Scores the trained tokens of teacher views: the student's own weights under another adapter
    state (frozen at the fold's start, or an EMA), or an external model."""

    def __init__(self, student, config, external=None) -> None:
        self.student = student
        self.config = config
        self.external = external
        self.fresh_adapter = False
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.silent = False
        self._off: adapters_off | None = None
        self.prefixes: dict[tuple[int, ...], list] = {}  # the teacher's prefix keys/values while its weights hold
        if external is None:
            self.snapshot = {name: parameter.detach().clone() for name, parameter in adapter_parameters(student)}
            self.silent = self._adds_nothing()

    def _adds_nothing(self) -> bool:
        """Whether the teacher's adapter state adds exactly nothing to the base model: every LoRA
        layer's B matrix is zero, as in a fresh adapter (peft initialises B to zeros), so that
        s·(x Aᵀ)Bᵀ = 0 for every input. The teacher is then the base model, and it runs with the
        adapters switched off (the same numbers, without 210 LoRA pairs: ~0.4 s of an 8 x 64 step)."""
        snapshot = self.snapshot
        if not snapshot or self.config.full_finetune:
            return False
        b_names = [name for name in snapshot if ".lora_B." in name]
        if not b_names or any(".lora_" not in name for name in snapshot):
            return False
        return all(not bool(snapshot[name].any()) for name in b_names)

    def hidden(self, views: Sequence[EpisodeViews]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher hidden states (N, H') at the trained positions of its views, and its lm head (V, H')."""
        sequences = [view.teacher.input_ids for view in views]
        positions = [view.teacher.trained_positions for view in views]
        with torch.no_grad():
            if self.external is not None:
                hidden = shared_prefix_hidden_at(self.external, sequences, positions, kept=self.prefixes)
                return hidden, causal_lm(self.external).get_output_embeddings().weight.detach()
            was_training = self.student.training
            self.student.eval()  # inference: no checkpointing, the KV cache of a shared prefix is kept
            try:
                with self._teacher_weights(), contextlib.nullcontext() if self.silent else _merged(self.student):
                    hidden = shared_prefix_hidden_at(self.student, sequences, positions, kept=self.prefixes)
                    weight = causal_lm(self.student).get_output_embeddings().weight.detach().clone() if (
                        self.config.full_finetune) else causal_lm(self.student).get_output_embeddings().weight.detach()
            finally:
                self.student.train(was_training)
            return hidden, weight

    def _teacher_weights(self):
        student, snapshot = self.student, self.snapshot
        assert snapshot is not None
        if self.silent:
            if self._off is None:
                self._off = adapters_off(student)
            return self._off

        class Swap:
            def __enter__(self):
                self.saved = {}
                for name, parameter in adapter_parameters(student):
                    self.saved[name] = parameter.data
                    parameter.data = snapshot[name]

            def __exit__(self, *exc):
                for name, parameter in adapter_parameters(student):
                    parameter.data = self.saved[name]

        return Swap()

    def after_step(self) -> None:
        if self.config.teacher == "self-ema" and self.snapshot is not None:
            decay = self.config.ema_decay
            for name, parameter in adapter_parameters(self.student):
                self.snapshot[name].mul_(decay).add_(parameter.detach(), alpha=1 - decay)
            self.silent = self._adds_nothing()
            self.prefixes.clear()  # the teacher's weights moved: its prefixes' keys and values with them


class adapters_off:
    """While inside, every LoRA layer of `model` runs its base layer alone (peft's `disable_adapters`
    flag, set on the layers directly: peft's `enable_adapters` would also switch the adapters'
    `requires_grad` off and on again, which a student in training must keep). For no-grad passes."""

    def __init__(self, model) -> None:
        self.layers = [module for module in model.modules() if hasattr(module, "lora_A") and hasattr(
            module, "_disable_adapters")]

    def __enter__(self):
        self.saved = [layer._disable_adapters for layer in self.layers]
        for layer in self.layers:
            layer._disable_adapters = True
        return self

    def __exit__(self, *exc):
        for layer, saved in zip(self.layers, self.saved, strict=True):
            layer._disable_adapters = saved


def _merged(model):
    """A scope in which a LoRA student runs its no-grad teacher pass with the adapter merged into the
    base weights (`engines.merge.merged`: peft's merge, and an unmerge that gives the frozen base back
    bit for bit): fewer matmuls than 210 LoRA pairs beside the base layers. Only where
    `engines.merge.mergeable` (fp32 base weights); and where the engine packed the base layers (CPU),
    the LoRA pairs run beside them instead (a merge would repack every layer). Nothing for a full
    fine-tune or a model without adapters."""
    if not mergeable(model) or (next(model.parameters()).device.type == "cpu" and is_packed(model)):
        return contextlib.nullcontext()
    return merged(model)
