"""The fold loop: on-policy self-distillation of skills into a LoRA adapter (or all weights).

One step, for `batch_size` train items drawn from families with active skills:
  1. rollout: the student (current adapter, *no skills in its prompt*) plays each item to the end,
     multi-turn with real environment and tool observations. Methods `speculative` (SKD: a student
     token outside the teacher's top-k is replaced by a teacher sample) and `trb` (TRB warm-up:
     sample from the geometric mixture S^(1−α)·T^α, α annealed linearly to 0) let the teacher, with
     its skills in its prompt, steer the rollout; the share of teacher tokens is logged;
  2. views: the same episode rendered for the student and for the teacher (privileged context, i.e.
     the family's skills, put in its prompt; its own length limit);
  3. teacher: `self-frozen` = the same weights with the adapter disabled (one copy of the weights),
     `self-ema` = an exponential moving average of the adapter, `external` = another model with the
     same vocabulary; it scores every trained token (all assistant turns, not env/tool text);
  4. loss over the trained tokens (masks and losses from learners.masks / learners.losses), computed
     from final hidden states in chunks of positions so the (tokens x vocabulary) logits are never
     all in memory at once, forward or backward; the student's forward and backward run
     `micro_batch` episodes at a time over the batch's shared prompt prefix (`backward_in_passes`),
     so only one pass's activations are ever alive;
  5. AdamW step; an atomic checkpoint every `checkpoint_every` steps.
"Anchor" items (families without skills) are distilled toward the plain base model with no
context: they teach "stay as you are" where no skill applies, against forgetting.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from engines.base import SamplingParams
from engines.hf import cache_kwarg
from engines.lean import grouped_sdpa
from engines.onednn import is_packed, merged_decoding, project
from engines.prefix import MIN_PREFIX, cached_prefix, expanded_cache, prefix_groups
from envs.base import Message, TaskFamily, Trajectory
from learners.allocator import cap_heap
from learners.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from learners.losses import chunked_generalized_jsd, chunked_sampled_token_reverse_kl
from learners.rollout import run_episodes
from learners.views import EpisodeViews, TemplateError, episode_views

log = logging.getLogger(__name__)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class FoldError(RuntimeError):
    """A fold that cannot go on (a NaN loss, no prompts); the last good checkpoint is kept."""


class FoldConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["opsd", "opd", "rmsd", "speculative", "trb"] = Field(
        default="opsd",
        description="opsd: self teacher with skills; opd: external teacher; rmsd: opsd on the top disagreement "
        "tokens; speculative: opsd on SKD rollouts (teacher replaces tokens outside its top-k); trb: opsd on "
        "rollouts from a student-teacher mixture annealed to pure student",
    )
    steps: int = Field(default=32, ge=1, description="measured: the calculator skill clicks at step ~25 of 32 (docs/benchmarks.md)")
    batch_size: int = Field(default=8, ge=1, description="episodes per optimizer step")
    learning_rate: float = Field(default=5e-4, gt=0)
    weight_decay: float = 0.0
    max_grad_norm: float = Field(default=1.0, gt=0)
    full_finetune: bool = Field(default=False, description="train every weight instead of a LoRA adapter")
    lora_rank: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_LINEAR))
    loss: Literal["reverse_kl", "jsd", "sampled"] = Field(default="reverse_kl", description="per-token objective")
    beta: float = Field(default=1.0, ge=0, le=1, description="JSD beta: 1 = reverse KL, 0 = forward KL")
    teacher: Literal["self-frozen", "self-ema", "external"] = "self-frozen"
    teacher_model: str | None = Field(default=None, description="model id/dir of the external teacher")
    ema_decay: float = Field(default=0.95, ge=0, lt=1)
    teacher_max_tokens: int = Field(default=2048, ge=64, description="the teacher view's own length limit")
    sampling: SamplingParams = Field(
        default_factory=lambda: SamplingParams(temperature=1.0, max_new_tokens=16),
        description="per assistant turn; short turns keep the decisive first tokens a large share of the loss",
    )
    max_turns: int = Field(default=3, ge=1)
    relevance_top: int = Field(default=8, ge=1, description="rmsd: positions kept per episode")
    speculative_top_k: int = Field(default=20, ge=1, description="speculative: the teacher's top-k that accepts a student token")
    trb_mix: float = Field(default=0.5, ge=0, le=1, description="trb: the teacher's weight in the rollout mixture at step 1")
    trb_warmup_steps: int = Field(default=10, ge=0, description="trb: steps over which the mixture anneals linearly to pure student")
    anchor_fraction: float = Field(default=0.25, ge=0, lt=1, description="share of each batch from anchor items")
    checkpoint_every: int = Field(default=5, ge=1)
    chunk_size: int = Field(default=128, ge=1, description="positions per logits chunk")
    micro_batch: int = Field(
        default=1, ge=0,
        description="episodes per student forward/backward pass (their gradients add up to the batch's): the "
        "activations kept for the backward pass are most of a step's memory and scale with this (default model, "
        "8 x 64 tokens, 2-core AVX2 machine: peak RSS ~1.45-1.5 GiB at 1, ~1.6 at 2), the time per step less "
        "(at most ~10% from 1 to 2); "
        "0 = the whole batch in one pass",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="recompute each layer's activations in the backward pass: less memory, more time"
    )
    normalize: Literal["token", "episode"] = Field(
        default="token",
        description="token: the loss is the mean over every trained token of the batch; episode: the mean over "
        "episodes of each episode's token mean (a short episode, where the decisive first tokens are most of "
        "what is trained, weighs as much as a long one)",
    )
    heap_threshold_kib: int = Field(
        default=0, ge=0,
        description="glibc only (learners.allocator): blocks of this many KiB and more are mmap'd and freed back "
        "to the system. With the whole batch in one pass (micro_batch 0) and checkpointing, 128 took a step's peak "
        "RSS from ~2.1 to ~1.4 GiB on the default model at ~1.3-1.6x the step time (page faults); with passes of "
        "one episode (the default) there is little left for it to save. 0 = leave malloc as it is. Set, it also "
        "keeps the output head unpacked for the fold (engines.onednn packs a 113 MiB copy of a tied head)",
    )
    seed: int = 0


class FoldItem(BaseModel):
    """One training prompt: a train-split item of a family and the privileged context of its teacher."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: str
    index: int
    context: list[Message] = Field(default_factory=list)
    anchor: bool = False
    split: Literal["train", "eval"] = Field(default="train", description="eval only to measure (measure_kl)")


class FoldResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int
    loss_first: float | None
    loss_last: float | None
    kl_first: float | None
    kl_last: float | None
    adapter: str
    run_dir: str
    seconds: float
    resumed_from: int = 0
    reused_from: str | None = Field(default=None, description="an identical earlier fold whose adapter this is "
                                    "(the experiment harness reuses a fold of the same start, items and config)")


# ----------------------------------------------------------------------- the model side
def causal_lm(model):
    """The transformers CausalLM under a peft wrapper (LoRA layers live inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_at(model, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]) -> torch.Tensor:
    """Final hidden states that predict the given positions: row b, position p -> state at p - 1.

    Returns (N, H) for N = total positions. Sequences are right-padded.
    """
    network = causal_lm(model)
    device = next(network.parameters()).device
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.zeros((len(sequences), width), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(list(sequence))
        attention_mask[row, : len(sequence)] = 1
    output = network.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    hidden = output.last_hidden_state  # (B, T, H)
    rows = torch.tensor([row for row, row_positions in enumerate(positions) for _ in row_positions], device=device)
    columns = torch.tensor([position - 1 for row_positions in positions for position in row_positions], device=device)
    return hidden[rows, columns]  # (N, H)


def shared_prefix_hidden_at(model, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                            min_prefix: int = MIN_PREFIX, kept: dict | None = None) -> torch.Tensor:
    """`hidden_at`, computing a prefix shared by several rows once (with or without grad, as called).

    The prompts of a fold batch start alike (the system prompt; the teacher's also the family's skills):
    each group of rows with a common prefix (`engines.prefix.prefix_groups`) runs it once at batch size 1,
    repeats its KV cache over the group, and runs only the rows' own suffixes (right-padded) on top.
    Under grad the repeat sums the rows' gradients back into the one prefix pass, so values and
    gradients are those of `hidden_at` up to float rounding. A model with gradient checkpointing on,
    in training mode, keeps no cache: it takes `hidden_at` as it is. Returns (N, H) in the order of
    `positions`. `kept` (no grad only): prefixes' keys and values by their tokens, from earlier calls
    with the same weights, reused instead of run again, and added to (a frozen teacher's pass sees the
    same skills prefix at every fold step).
    """
    network = causal_lm(model)
    if network.training and checkpointing(network):
        return hidden_at(model, sequences, positions)
    cache_name = cache_kwarg(network.model)
    pieces: dict[int, torch.Tensor] = {}
    for rows, prefix in _groups(sequences, positions, min_prefix):
        if prefix == 0:
            hidden = hidden_at(model, [sequences[row] for row in rows], [positions[row] for row in rows])
        else:
            tokens = tuple(sequences[rows[0]][:prefix])
            if kept is not None and not torch.is_grad_enabled():
                cache = _kept_prefix(network.model, cache_name, tokens, len(rows), kept)
            else:
                cache = cached_prefix(network.model, cache_name, tokens, len(rows))
            hidden = _suffix_hidden(network, cache_name, cache, prefix, [sequences[row] for row in rows],
                                    [positions[row] for row in rows])
        start = 0
        for row in rows:
            pieces[row] = hidden[start: start + len(positions[row])]
            start += len(positions[row])
    return torch.cat([pieces[row] for row in range(len(sequences))])


KEPT_PREFIXES = 8  # a frozen teacher's prefixes kept: one per family in the fold (~4 MiB each here)


def _kept_prefix(network, cache_name: str, tokens: tuple[int, ...], rows: int, kept: dict):
    """A KV cache over `rows` rows holding the prefix `tokens`: its batch-size-1 keys and values from
    `kept` (filled here the first time, the oldest dropped past KEPT_PREFIXES), expanded over the rows."""
    layers = kept.pop(tokens, None)
    if layers is None:
        computed = cached_prefix(network, cache_name, tokens, 1)
        layers = [(layer.keys, layer.values) for layer in computed.layers]
        while len(kept) >= KEPT_PREFIXES:
            kept.pop(next(iter(kept)))
    kept[tokens] = layers  # the most recently used last
    return expanded_cache(layers, rows)


def backward_in_passes(model, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                       rows_per_pass: int, loss_of: Callable[[list[int], torch.Tensor], torch.Tensor],
                       min_prefix: int = MIN_PREFIX) -> None:
    """Forward and backward the model over the rows a few at a time, sharing their prompt prefix.

    The batch is cut into passes of at most `rows_per_pass` rows (0: all in one pass), within groups of
    rows that share a prefix (`engines.prefix.prefix_groups`). Each pass computes the final hidden
    states at its rows' positions (as `hidden_at`), calls `loss_of(rows, hidden)` (rows: indices into
    `sequences`; hidden (n, H): those rows' positions in order, with grad) and backpropagates the scalar
    it returns, so only one pass's activations are ever alive: the (tokens x layers x width) activations
    that a whole-batch pass keeps for its backward are most of a fold step's memory, and the matmuls of
    a pass of 1-2 rows (~100-200 positions) lose little against the whole batch (bench_linear).
    A group's prefix runs once, at batch size 1, with grad: its KV cache enters every pass as detached
    leaves, whose gradients the passes accumulate, and one backward through the prefix ends the group.
    Gradients add up over passes: `loss_of` returns each pass's share of the batch loss. With gradient
    checkpointing on (in training mode) the model keeps no cache: the passes run without prefix sharing.
    """
    network = causal_lm(model)
    rows_per_pass = rows_per_pass if rows_per_pass > 0 else len(sequences)
    share = not (network.training and checkpointing(network))
    groups = _groups(sequences, positions, min_prefix) if share else [(list(range(len(sequences))), 0)]
    cache_name = cache_kwarg(network.model)
    for rows, prefix in groups:
        passes = [rows[start:start + rows_per_pass] for start in range(0, len(rows), rows_per_pass)]
        if prefix == 0:
            for part in passes:
                hidden = hidden_at(model, [sequences[row] for row in part], [positions[row] for row in part])
                _backward(loss_of(part, hidden))
            continue
        computed = cached_prefix(network.model, cache_name, sequences[rows[0]][:prefix], 1)  # (1, heads, P, d)
        roots = [tensor for layer in computed.layers for tensor in (layer.keys, layer.values)]
        leaves = [root.detach().requires_grad_(root.requires_grad) for root in roots]
        for part in passes:
            cache = expanded_cache(zip(leaves[0::2], leaves[1::2], strict=True), len(part))
            hidden = _suffix_hidden(network, cache_name, cache, prefix, [sequences[row] for row in part],
                                    [positions[row] for row in part])
            _backward(loss_of(part, hidden))
            del cache, hidden
        wanted = [(root, leaf.grad) for root, leaf in zip(roots, leaves, strict=True) if leaf.grad is not None]
        if wanted:
            torch.autograd.backward([root for root, _ in wanted], [grad for _, grad in wanted])


def _backward(loss: torch.Tensor) -> None:
    if loss.requires_grad:
        loss.backward()


def _groups(sequences, positions, min_prefix: int) -> list[tuple[list[int], int]]:
    """`prefix_groups` with each row's prefix cut before its first wanted position."""
    limits = [min(row_positions) - 1 if row_positions else len(sequence)
              for sequence, row_positions in zip(sequences, positions, strict=True)]
    return prefix_groups(sequences, limits, min_prefix)


def _suffix_hidden(network, cache_name: str, cache, prefix: int, sequences, positions) -> torch.Tensor:
    """Hidden states (n, H) at `positions` of rows whose first `prefix` tokens are in `cache`; the rows'
    suffixes run right-padded on top of it."""
    device = next(network.parameters()).device
    suffixes = [list(sequence[prefix:]) for sequence in sequences]
    width = max(len(suffix) for suffix in suffixes)
    input_ids = torch.zeros((len(suffixes), width), dtype=torch.long)
    attention_mask = torch.zeros((len(suffixes), prefix + width), dtype=torch.long)
    attention_mask[:, :prefix] = 1
    for index, suffix in enumerate(suffixes):
        input_ids[index, : len(suffix)] = torch.tensor(suffix)
        attention_mask[index, prefix: prefix + len(suffix)] = 1
    positions_ids = torch.arange(prefix, prefix + width)[None].expand(len(suffixes), -1)
    output = network.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                           position_ids=positions_ids.to(device), use_cache=True, **{cache_name: cache})
    states = output.last_hidden_state  # (G, width, H)
    index_rows = torch.tensor([i for i, row_positions in enumerate(positions) for _ in row_positions], device=device)
    index_columns = torch.tensor([p - 1 - prefix for row_positions in positions for p in row_positions], device=device)
    return states[index_rows, index_columns]


def reverse_kl(student_hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
               teacher_weight: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Mean per-token full-vocabulary KL(student || teacher) over N positions, (N, H) and (N, H'), without grad."""
    with torch.no_grad():
        every = torch.ones((1, student_hidden.shape[0]), dtype=torch.bool, device=student_hidden.device)
        return chunked_generalized_jsd(student_hidden[None].detach(), weight.detach(), teacher_hidden[None], 1.0,
                                       every, teacher_lm_head_weight=teacher_weight, chunk_size=chunk_size)


def sampled_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[target] per row, (N, H) -> (N,), chunk by chunk, without grad."""
    with torch.no_grad():
        pieces = []
        for start in range(0, hidden.shape[0], chunk_size):
            log_probs = torch.log_softmax(project(hidden[start:start + chunk_size], weight).float(), dim=-1)
            pieces.append(log_probs.gather(-1, targets[start:start + chunk_size, None]).squeeze(-1))
        return torch.cat(pieces)


# ----------------------------------------------------------------------------- teacher
class Teacher:
    """Scores the trained tokens of teacher views: the student's own weights under another adapter
    state (frozen at the fold's start, or an EMA), or an external model."""

    def __init__(self, student, config: FoldConfig, external=None) -> None:
        self.student = student
        self.config = config
        self.external = external
        self.fresh_adapter = False
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.silent = False
        self._off: adapters_off | None = None
        self.prefixes: dict[tuple[int, ...], list] = {}  # the teacher's prefix keys/values while its weights hold
        if external is None:
            self.snapshot = {name: parameter.detach().clone() for name, parameter in _adapter_parameters(student)}
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
                with self._teacher_weights(), contextlib.nullcontext() if self.silent else merged(self.student):
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
                for name, parameter in _adapter_parameters(student):
                    self.saved[name] = parameter.data
                    parameter.data = snapshot[name]

            def __exit__(self, *exc):
                for name, parameter in _adapter_parameters(student):
                    parameter.data = self.saved[name]

        return Swap()

    def after_step(self) -> None:
        if self.config.teacher == "self-ema" and self.snapshot is not None:
            decay = self.config.ema_decay
            for name, parameter in _adapter_parameters(self.student):
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


class merged:
    """While inside, a LoRA student runs with its adapter merged into the base weights (peft's
    merge_adapter / unmerge_adapter): inference through 210 unmerged LoRA pairs costs CPU decoding
    several times the base model's. For rollouts and teacher passes only, never under autograd.
    Does nothing for a full fine-tune or a model without adapters. Where the base layers are packed
    (engines.onednn: the fold's default on CPU), it merges only with `decoding=True` (the rollouts:
    `engines.onednn.merged_decoding`, which repacks each layer with its adapter merged in and leaves
    the base weight plain after it, for the passes up to the next rollout); a teacher pass over many
    positions runs its LoRA pairs beside the base layers instead."""

    def __init__(self, model, decoding: bool = False) -> None:
        self.model = model if hasattr(model, "merge_adapter") and hasattr(model, "peft_config") else None
        self.scope = None
        if self.model is not None and is_packed(self.model):
            self.scope = merged_decoding(self.model) if decoding else None
            self.model = None

    def __enter__(self):
        if self.scope is not None:
            self.scope.__enter__()
        if self.model is not None:
            self.model.merge_adapter()
        return self

    def __exit__(self, *exc):
        if self.scope is not None:
            self.scope.__exit__(*exc)
        if self.model is not None:
            self.model.unmerge_adapter()


def _adapter_parameters(model):
    """The trained parameters (LoRA weights, or every weight in a full fine-tune)."""
    return [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]


# ------------------------------------------------------------------------------ the loop
def checkpointing(model) -> bool:
    """Whether any layer of `model` recomputes its activations in the backward pass."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def attach_student(base_model, config: FoldConfig, adapter: str | None):
    """The trainable student: a new LoRA adapter, the given one made trainable, or all weights."""
    if config.gradient_checkpointing:
        base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing(base_model):
        base_model.gradient_checkpointing_disable()
    if config.full_finetune:
        base_model.train()
        for parameter in base_model.parameters():
            parameter.requires_grad_(True)
        return base_model
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter:
        return PeftModel.from_pretrained(base_model, adapter, is_trainable=True)
    lora = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules), task_type="CAUSAL_LM",
    )
    return get_peft_model(base_model, lora)


def fold(
    engine,
    families: dict[str, TaskFamily],
    items: Sequence[FoldItem],
    config: FoldConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    external_teacher=None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> FoldResult:
    """Distil the items' privileged context into the engine's model; returns where the adapter is.

    The engine serves the student during rollouts (its model is swapped for the trainable one and
    restored afterwards, with the new adapter loaded). Metrics go to `run_dir/metrics.jsonl`.
    """
    if not items:
        raise FoldError("no fold prompts: no family has active skills (run `skillfold run` first)")
    if any(item.split != "train" for item in items):
        raise FoldError("fold prompts must be train-split items; held-out items are for measuring only")
    started = time.perf_counter()
    cap_heap(config.heap_threshold_kib)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "fold_config.json").write_text(config.model_dump_json(indent=2))
    previous_adapter = engine.adapter
    engine.unload_adapter()  # the dense base weights back, if they were packed
    student = attach_student(engine.base_model, config, previous_adapter)
    parameters = [parameter for _, parameter in _adapter_parameters(student)]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    teacher = Teacher(student, config, external_teacher)
    start_step, resumed_from = 0, 0
    checkpoint_path = latest_checkpoint(run_dir) if resume else None
    if checkpoint_path is not None:
        saved = load_checkpoint(checkpoint_path, student, optimizer)
        start_step = resumed_from = saved["step"]
        if config.teacher == "self-ema" and saved.get("ema") is not None:
            teacher.snapshot = torch.load(checkpoint_path / "ema.pt")
            teacher.silent = teacher._adds_nothing()  # an EMA that has moved is no longer the base model
        log.info("resumed fold from %s (step %d)", checkpoint_path, start_step)
    metrics_path = run_dir / "metrics.jsonl"
    if not resume and metrics_path.exists():
        metrics_path.unlink()
    writer = _tensorboard(run_dir)
    order = _item_order(items, config)
    engine.model = student
    if hasattr(engine, "pack_weights"):
        if config.heap_threshold_kib:  # memory first: no packed copy of weights that stay dense
            engine.unpack_weights()
            engine.packed_copies = False
        engine.pack_weights()  # frozen base layers packed for the whole fold (LoRA beside them)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    try:
        for step in range(start_step, config.steps):
            step_started = time.perf_counter()
            batch = [order[(step * config.batch_size + offset) % len(order)] for offset in range(config.batch_size)]
            record = fold_step(engine, student, teacher, families, batch, config, optimizer, step)
            record["seconds"] = time.perf_counter() - step_started
            record["tokens_per_second"] = (record["generated_tokens"] + record["trained_tokens"]) / record["seconds"]
            if not math.isfinite(record["loss"]):
                raise FoldError(
                    f"the loss became {record['loss']} at step {step + 1}; stopped. The last good checkpoint is "
                    f"in {run_dir}; lower fold.learning_rate and resume with --resume"
                )
            with open(metrics_path, "a") as sink:
                sink.write(json.dumps(record) + "\n")
            if writer is not None:
                for key in ("loss", "kl", "rollout_success", "tokens_per_second", "teacher_token_share"):
                    writer.add_scalar(f"fold/{key}", record[key], step + 1)
            first = first or record
            last = record
            if on_step:
                on_step(record)
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                extra = {"config": config.model_dump(mode="json"), "ema": config.teacher == "self-ema"}
                saved_at = save_checkpoint(run_dir, step + 1, student, optimizer, extra)
                if config.teacher == "self-ema":
                    torch.save(teacher.snapshot, saved_at / "ema.pt")
    finally:
        if writer is not None:
            writer.close()
        if hasattr(engine, "packed_copies"):
            engine.packed_copies = True  # the engine's default again (the copies come at its next packing)
    adapter_dir = finish_training(engine, student, config, run_dir)
    if not first and checkpoint_path is not None:
        first = last = json.loads(checkpoint_path.joinpath("state.json").read_text())
    return FoldResult(
        steps=config.steps,
        loss_first=first.get("loss"),
        loss_last=last.get("loss"),
        kl_first=first.get("kl"),
        kl_last=last.get("kl"),
        adapter=str(adapter_dir),
        run_dir=str(run_dir),
        seconds=time.perf_counter() - started,
        resumed_from=resumed_from,
    )


def fold_step(engine, student, teacher: Teacher, families, batch: Sequence[FoldItem], config: FoldConfig,
              optimizer, step: int) -> dict[str, Any]:
    """One rollout -> score -> mask -> loss -> update step; returns its metrics."""

    student.eval()  # no dropout while sampling
    environments = [families[item.family].make("train", item.index) for item in batch]
    sampling = config.sampling.model_copy(update={"seed": config.seed + step * 1000})
    guided = guided_rollout(engine, teacher, config, step)
    with merged(student, decoding=True) if guided is None else contextlib.nullcontext():  # guided: the teacher swaps LoRA weights
        trajectories = run_episodes(
            engine, environments, sampling, split="train", max_turns=config.max_turns,
            teacher_contexts=[[] if item.anchor else list(item.context) for item in batch], guided=guided,
        )
    views, kept_items = _views(engine, batch, trajectories, config)
    generated = sum(t.completion_tokens for t in trajectories)
    teacher_tokens = sum(turn.info.get("teacher_tokens", 0) for t in trajectories for turn in t.turns)
    record: dict[str, Any] = {
        "step": step + 1,
        "episodes": len(batch),
        "rollout_success": sum(t.success for t in trajectories) / len(trajectories),
        "generated_tokens": generated,
        "teacher_token_share": teacher_tokens / generated if generated else 0.0,
    }
    if config.method == "trb":
        record["trb_mix"] = trb_mix_at(config, step)
    if not views:
        record.update(loss=0.0, kl=0.0, trained_tokens=0)
        return record
    student.train()
    with grouped_sdpa(student):
        teacher_hidden, teacher_weight = teacher.hidden(views)  # (N, H'), (V, H')
    weight = causal_lm(student).get_output_embeddings().weight  # (V, H)
    targets = torch.tensor(
        [v.student.input_ids[p] for v in views for p in v.student.trained_positions], device=teacher_hidden.device
    )  # (N,)
    lengths = [len(v.student.trained_positions) for v in views]
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    totals = {"loss": 0.0, "kl": 0.0, "weight": 0.0, "distilled": 0}

    def loss_of(rows: list[int], student_hidden: torch.Tensor) -> torch.Tensor:
        """One pass's share of the batch loss, Σ_t m_t·ℓ_t over its rows' tokens (normalised below)."""
        index = torch.cat([torch.arange(offsets[row], offsets[row + 1]) for row in rows]).to(targets.device)
        row_targets, row_teacher = targets[index], teacher_hidden[index]
        row_lengths = [lengths[row] for row in rows]
        mask = torch.ones((1, index.numel()), dtype=torch.bool, device=targets.device)
        if config.method == "rmsd":
            disagreement = (
                sampled_log_probs(row_teacher, teacher_weight, row_targets, config.chunk_size)
                - sampled_log_probs(student_hidden.detach(), weight.detach(), row_targets, config.chunk_size)
            ).abs()
            mask = _top_per_episode(disagreement, row_lengths, config.relevance_top)
        if config.normalize == "episode":
            mask = mask * _episode_weights(row_lengths, mask.device)
        if config.loss == "sampled":
            teacher_log_probs = sampled_log_probs(row_teacher, teacher_weight, row_targets, config.chunk_size)
            loss, _ = chunked_sampled_token_reverse_kl(
                student_hidden[None], weight, row_targets[None], teacher_log_probs[None], mask,
                chunk_size=config.chunk_size,
            )
        else:
            loss = chunked_generalized_jsd(
                student_hidden[None], weight, row_teacher[None], 1.0 if config.loss == "reverse_kl" else config.beta,
                mask, teacher_lm_head_weight=teacher_weight, chunk_size=config.chunk_size,
            )
        mass = float(mask.float().sum())
        if config.loss == "reverse_kl" and config.method != "rmsd" and config.normalize == "token":
            kl = float(loss.detach())  # the loss is this very KL: every trained token, weight 1
        else:
            kl = float(reverse_kl(student_hidden, weight, row_teacher, teacher_weight, config.chunk_size))
        totals["loss"] += float(loss.detach()) * mass
        totals["kl"] += kl * index.numel()
        totals["weight"] += mass
        totals["distilled"] += int((mask != 0).sum())
        return loss * mass

    with grouped_sdpa(student):  # the batch's shared prompt prefix runs once
        backward_in_passes(student, [v.student.input_ids for v in views], [v.student.trained_positions for v in views],
                           config.micro_batch, loss_of)
    parameters = [parameter for _, parameter in _adapter_parameters(student)]
    if totals["weight"] > 0:
        for parameter in parameters:
            if parameter.grad is not None:
                parameter.grad.div_(totals["weight"])  # Σ over passes of Σ_t m_t·∇ℓ_t -> the masked mean's gradient
    loss_value = totals["loss"] / totals["weight"] if totals["weight"] > 0 else 0.0
    torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    teacher.after_step()
    student.eval()
    record.update(loss=loss_value, kl=totals["kl"] / targets.numel(), trained_tokens=int(targets.numel()),
                  distilled_tokens=totals["distilled"], anchors=sum(item.anchor for item in kept_items))
    return record


def trb_mix_at(config: FoldConfig, step: int) -> float:
    """TRB's teacher weight at (0-based) `step`: `trb_mix` annealed linearly to 0 over the warm-up."""
    if config.trb_warmup_steps == 0:
        return 0.0
    return config.trb_mix * max(0.0, 1.0 - step / config.trb_warmup_steps)


def guided_rollout(engine, teacher: Teacher, config: FoldConfig, step: int):
    """The rollout policy of `speculative` and `trb` as a `run_episodes(guided=...)` callable, or None
    for pure student rollouts (the other methods, and trb once its warm-up is over).

    The teacher view runs the student's model under the teacher's weights (`Teacher._teacher_weights`:
    the frozen or EMA adapter state), or the external teacher model, with the skills in its prompt.
    """
    if config.method == "speculative":
        policy: dict[str, Any] = {"policy": "speculative", "top_k": config.speculative_top_k}
    elif config.method == "trb":
        mix = trb_mix_at(config, step)
        if mix == 0.0:
            return None
        policy = {"policy": "mixture", "mix": mix}
    else:
        return None
    if not hasattr(engine, "generate_guided"):
        raise FoldError(f"method {config.method} needs an engine with guided generation (the HF engine)")
    scope = teacher._teacher_weights if teacher.external is None else None

    def guided(student_chats, teacher_chats, params):
        return engine.generate_guided(student_chats, teacher_chats, params, teacher_scope=scope,
                                      teacher_model=teacher.external, **policy)

    return guided


def _views(engine, batch, trajectories: Sequence[Trajectory], config: FoldConfig):
    views, kept_items = [], []
    for item, trajectory in zip(batch, trajectories, strict=True):
        if not trajectory.turns:
            continue  # the environment failed before the model acted
        context = [] if item.anchor else item.context
        try:
            view = episode_views(engine.tokenizer, trajectory.messages(), context, engine.stop_ids,
                                 config.teacher_max_tokens)
        except TemplateError as error:
            log.warning("skipping an episode of %s: %s", item.family, error)
            continue
        if view.student.trained_positions:
            views.append(view)
            kept_items.append(item)
    return views, kept_items


def _item_order(items: Sequence[FoldItem], config: FoldConfig) -> list[FoldItem]:
    """A seeded shuffle with anchors at (about) `anchor_fraction` of every batch."""
    rng = random.Random(config.seed)
    skilled = [item for item in items if not item.anchor]
    anchors = [item for item in items if item.anchor]
    rng.shuffle(skilled)
    rng.shuffle(anchors)
    if not anchors or config.anchor_fraction == 0:
        return skilled or anchors
    per_batch = max(1, round(config.batch_size * config.anchor_fraction))
    order, skilled_index, anchor_index = [], 0, 0
    for _ in range(max(len(skilled), 1) * 4):
        for _ in range(config.batch_size - per_batch):
            order.append(skilled[skilled_index % len(skilled)] if skilled else anchors[anchor_index % len(anchors)])
            skilled_index += 1
        for _ in range(per_batch):
            order.append(anchors[anchor_index % len(anchors)])
            anchor_index += 1
    return order


def finish_training(engine, student, config: FoldConfig, run_dir: Path) -> Path:
    """Save the trained adapter to `run_dir/adapter` (atomically), give the engine its base model back,
    and serve the adapter (a full fine-tune is served as the engine's weights). Returns the adapter dir."""
    adapter_dir = run_dir / "adapter"
    if hasattr(engine, "unpack_weights"):
        engine.unpack_weights()
    _save_adapter(student, adapter_dir)
    engine.model = _release(student, config)
    engine.base_model = engine.model
    if not config.full_finetune:
        engine.load_adapter(str(adapter_dir))
    return adapter_dir


def _save_adapter(student, adapter_dir: Path) -> None:
    import os
    import shutil
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix=".adapter-", dir=adapter_dir.parent))
    student.save_pretrained(str(scratch))
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    os.replace(scratch, adapter_dir)


def _release(student, config: FoldConfig):
    """The base model back without LoRA layers (the engine reloads the saved adapter)."""
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    if config.gradient_checkpointing:
        causal_lm(student).gradient_checkpointing_disable()
    if config.full_finetune:
        return student.eval()
    return student.unload().eval()


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _episode_weights(lengths: Sequence[int], device) -> torch.Tensor:
    """(1, N) token weights 1/length of the token's episode: the masked mean becomes a mean of episode means."""
    return torch.cat([torch.full((length,), 1.0 / length, device=device) for length in lengths])[None]


def _top_per_episode(scores: torch.Tensor, lengths: Sequence[int], top: int) -> torch.Tensor:
    """RMSD's relevance mask on flattened episodes: each episode's `top` highest-scoring tokens (1, N)."""
    from learners.masks import top_positions

    width = max(lengths)
    padded = torch.zeros((len(lengths), width), dtype=scores.dtype)
    valid = torch.zeros((len(lengths), width), dtype=torch.bool)
    start = 0
    for row, length in enumerate(lengths):
        padded[row, :length] = scores[start:start + length]
        valid[row, :length] = True
        start += length
    chosen = top_positions(padded, valid, top)  # (E, L)
    return chosen[valid][None]  # (1, N), in the flattened order


def measure_kl(engine, families: dict[str, TaskFamily], items: Sequence[FoldItem], config: FoldConfig) -> dict[str, float]:
    """Per-token KL(student || skill-conditioned teacher) on the student's own episodes of `items`.

    The student is the engine as it serves now (its adapter, no context); the teacher is the base
    weights (no adapter) with each item's privileged context, i.e. what a first fold distils toward.
    Use held-out items to see how much of the skills' effect the weights carry. Returns
    {"kl", "tokens", "success"} (success: the student's rollout success on these items).
    """
    environments = [families[item.family].make(item.split, item.index) for item in items]
    sampling = config.sampling.model_copy(update={"seed": config.seed})
    trajectories = run_episodes(engine, environments, sampling, split="eval", max_turns=config.max_turns)
    views, _ = _views(engine, items, trajectories, config)
    success = sum(t.success for t in trajectories) / max(len(trajectories), 1)
    if not views:
        return {"kl": 0.0, "tokens": 0, "success": success}
    adapter = engine.adapter
    with torch.no_grad():
        student_hidden = shared_prefix_hidden_at(engine.model, [v.student.input_ids for v in views],
                                                 [v.student.trained_positions for v in views])
        weight = causal_lm(engine.model).get_output_embeddings().weight
        if adapter:
            engine.unload_adapter()
        try:
            teacher_hidden = shared_prefix_hidden_at(engine.model, [v.teacher.input_ids for v in views],
                                                     [v.teacher.trained_positions for v in views])
            teacher_weight = causal_lm(engine.model).get_output_embeddings().weight
            kl = reverse_kl(student_hidden, weight, teacher_hidden, teacher_weight, config.chunk_size)
        finally:
            if adapter:
                engine.load_adapter(adapter)
    return {"kl": float(kl), "tokens": int(student_hidden.shape[0]), "success": success}

