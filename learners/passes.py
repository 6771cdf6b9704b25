"""The trainer's forward and backward passes over token sequences, and its projections onto the vocabulary.

Everything here works on any device. It is also the one module of `learners/` that names the HF
engine's speed layer: the prompt-prefix KV caches (`engines.prefix`: a prefix shared by several rows
runs once) and the oneDNN-packed output head (`engines.onednn.project`, the chunked losses' logits on
CPU), both of which fall back to plain PyTorch where they do not apply (CUDA, unpacked weights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from engines.hf import cache_kwarg
from engines.lean import grouped_sdpa as attention
from engines.onednn import is_packed
from engines.onednn import project as packed_project
from engines.prefix import MIN_PREFIX, cached_prefix, expanded_cache, prefix_groups
from learners.losses import Projection, chunked_generalized_jsd, linear_head

__all__ = [
    "MIN_PREFIX", "attention", "backward_in_passes", "causal_lm", "checkpointing", "hidden_at", "is_packed", "projection",
    "reverse_kl", "sampled_log_probs", "shared_prefix_hidden_at",
]


def projection(model) -> Projection:
    """The head projection for `model`'s trainer passes, chosen once: on CPU through the packed copy of
    the head where the engine packed one (1.8x faster for 128 rows here; the plain product otherwise),
    the plain matmul on any other device."""
    return packed_project if next(causal_lm(model).parameters()).device.type == "cpu" else linear_head


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


def rows_per_pass(setting: int | None, device: torch.device) -> int:
    """Rows (episodes) per forward/backward pass for a trainer's `micro_batch` setting: itself, or where it
    is None by device: 1 on a CPU, where a pass's activations are most of a step's memory; 0 (the whole
    batch) on a GPU, where each pass costs its kernel launches (one H200, 135M, 8 x 256: 13.9 s a step
    at 0, 22-25 s at 1, the same peak memory; docs/benchmarks.md "GPU")."""
    if setting is not None:
        return setting
    return 1 if device.type == "cpu" else 0


def backward_in_passes(model, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                       micro_batch: int | None, loss_of: Callable[[list[int], torch.Tensor], torch.Tensor],
                       min_prefix: int = MIN_PREFIX) -> None:
    """Forward and backward the model over the rows a few at a time, sharing their prompt prefix.

    The batch is cut into passes of at most `micro_batch` rows (0: all in one pass; None: by the model's
    device, `rows_per_pass`), within groups of
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
    per_pass = rows_per_pass(micro_batch, next(network.parameters()).device) or len(sequences)
    share = not (network.training and checkpointing(network))
    groups = _groups(sequences, positions, min_prefix) if share else [(list(range(len(sequences))), 0)]
    cache_name = cache_kwarg(network.model)
    for rows, prefix in groups:
        passes = [rows[start:start + per_pass] for start in range(0, len(rows), per_pass)]
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
               teacher_weight: torch.Tensor, chunk_size: int, project: Projection = linear_head) -> torch.Tensor:
    """Mean per-token full-vocabulary KL(student || teacher) over N positions, (N, H) and (N, H'), without grad."""
    with torch.no_grad():
        every = torch.ones((1, student_hidden.shape[0]), dtype=torch.bool, device=student_hidden.device)
        return chunked_generalized_jsd(student_hidden[None].detach(), weight.detach(), teacher_hidden[None], 1.0,
                                       every, teacher_lm_head_weight=teacher_weight, chunk_size=chunk_size,
                                       project=project)


def sampled_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                      project: Projection = linear_head) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[target] per row, (N, H) -> (N,), chunk by chunk, without grad."""
    with torch.no_grad():
        pieces = []
        for start in range(0, hidden.shape[0], chunk_size):
            log_probs = torch.log_softmax(project(hidden[start:start + chunk_size], weight).float(), dim=-1)
            pieces.append(log_probs.gather(-1, targets[start:start + chunk_size, None]).squeeze(-1))
        return torch.cat(pieces)


def checkpointing(model) -> bool:
    """Whether any layer of `model` recomputes its activations in the backward pass."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())
