"""Shared prompt prefixes: run a prefix that several rows of a batch start with once, not once a row.

Prompts of one batch usually start alike: the system prompt, then a family's retrieved skills (the
skills are rendered oldest first, so items that retrieve the same skills have the same context). A
batch is split into groups of rows that share a prefix (`prefix_groups`). `prefill` runs each group
on its own: the group's prefix once at batch size 1, its KV cache repeated over the group's rows, then
the rows' own suffixes (left-padded within the group) on top. The groups' caches are then put side by
side, each left-padded with masked zeros to the longest, and decoding goes on over the whole batch.
Rotary position embeddings are applied before keys are cached, so where a key sits in the cache does
not change what it encodes: only the attention mask decides what a row sees, and every row keeps its
own positions. Results equal a plain left-padded batch up to float rounding.
Rows that continue a kept row's cache (`engines.turns`: the next turn of a multi-turn episode) are one
more piece: each on its own kept prefix, their new tokens run together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

MIN_PREFIX = 16  # tokens rows must share before their prefix is run once for the group
REUSED_TOKENS_A_PASS = 2048  # new tokens of rows continuing kept caches run in one forward pass


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):  # rows of different lengths
        if x != y:
            break
        length += 1
    return length


def prefix_groups(sequences: Sequence[Sequence[int]], limits: Sequence[int], min_prefix: int) -> list[tuple[list[int], int]]:
    """Rows that share a token prefix of at least `min_prefix` tokens: [(rows, prefix length)].

    Rows are sorted, and the sorted order is cut into runs so that the tokens saved, the sum over runs
    of (rows - 1) x prefix, is largest (dynamic programming over the cuts): rows that share only a
    system prompt but retrieved different skills form one group per skill set, not one group on the
    system prompt. A run's prefix is the common prefix of its rows, cut to every row's
    `limits[row]` (the prefix may not reach a position whose output is wanted). Every row is in
    exactly one group; a row alone, or a run sharing under `min_prefix` tokens, has prefix 0.
    """
    order = sorted(range(len(sequences)), key=lambda row: list(sequences[row]))
    count = len(order)
    lengths = [min(len(sequences[row]), limits[row]) for row in order]
    adjacent = [0] + [_common(sequences[order[k - 1]], sequences[order[k]]) for k in range(1, count)]
    best = [0] * (count + 1)  # best[j]: tokens saved over the first j sorted rows
    cut = [0] * (count + 1)  # where the last run of that optimum starts
    for end in range(1, count + 1):
        best[end], cut[end] = best[end - 1], end - 1  # the row alone
        prefix = lengths[end - 1]
        for start in range(end - 2, -1, -1):  # the run order[start:end]
            prefix = min(prefix, adjacent[start + 1], lengths[start])
            if prefix < min_prefix:
                break
            saved = best[start] + (end - start - 1) * prefix
            if saved > best[end]:
                best[end], cut[end] = saved, start
    groups: list[tuple[list[int], int]] = []
    end = count
    while end > 0:
        start = cut[end]
        rows = order[start:end]
        prefix = min([*lengths[start:end], *adjacent[start + 1:end]]) if len(rows) > 1 else 0
        groups.append((rows, prefix))
        end = start
    return groups[::-1]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device,
             offsets: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), each (B, W): rows right-aligned, positions counted
    from `offsets[row]` (default 0: a row that continues a cached prefix starts after it)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, width - len(row):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if offsets is not None:
        position_ids = position_ids + torch.tensor(offsets, dtype=torch.long)[:, None]
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device)


def cached_prefix(model, cache_name: str, prefix: Sequence[int], rows: int, **kwargs):
    """A fresh KV cache (transformers `DynamicCache`) holding `prefix` run once at batch size 1 and
    repeated over `rows` rows; `kwargs` go to the model call (e.g. `logits_to_keep=1`). Under grad the
    repeat sums the rows' gradients back into the one pass."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache()
    model(input_ids=torch.tensor([list(prefix)], device=device),
          position_ids=torch.arange(len(prefix), device=device)[None], use_cache=True, **kwargs,
          **{cache_name: cache})
    cache.batch_repeat_interleave(rows)
    return cache


def expanded_cache(layers, rows: int):
    """A KV cache (transformers `DynamicCache`) over `rows` rows from one row's keys and values per
    layer, [(keys, values) (1, heads, P, d)], expanded (not copied) over the rows."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers):
        cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), index)
    return cache


@dataclass
class Prefilled:
    """A batch's prompts run into a KV cache: what decoding goes on from."""

    logits: torch.Tensor  # (B, V) fp32: the next-token logits of every row
    cache: object  # a transformers DynamicCache over B rows
    attention_mask: torch.Tensor  # (B, L): which cached positions each row sees
    next_positions: torch.Tensor  # (B, 1): the position of each row's next token
    order: list[int] | None = None  # the caller's rows in cache order, where `prefill(any_order=True)` kept its own


def prefill(model, cache_name: str, rows: Sequence[Sequence[int]], pad_id: int,
            min_prefix: int = MIN_PREFIX, reused: Mapping[int, tuple[torch.Tensor, int]] | None = None,
            room: int = 0, any_order: bool = False) -> Prefilled:
    """Run prompts into a fresh KV cache, each group's shared prefix once (module docstring).

    `model` is a causal LM called as `model(input_ids=, attention_mask=, position_ids=, use_cache=True,
    logits_to_keep=1, **{cache_name: cache})`. `reused`: {row: (kv, length)} for rows whose first `length`
    tokens have keys and values already (`engines.turns`: kv (layers, 2, heads, >= length, head_dim)); those
    rows run only the rest of their prompt, together, on top of them, in a cache with `room` more positions
    (`with_room`: the decoding to come). `any_order`: a single piece's rows stay in the order it ran them (no
    copy of the cache to put them back), `Prefilled.order` says which.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    reused = reused or {}
    fresh = [row for row in range(len(rows)) if row not in reused]
    groups = [([fresh[member] for member in members], prefix) for members, prefix in
              prefix_groups([rows[row] for row in fresh], [len(rows[row]) - 1 for row in fresh], min_prefix)]
    plain = [row for members, prefix in groups if not prefix for row in members]
    runs = [(members, prefix) for members, prefix in groups if prefix]
    if plain:  # the rows that share nothing run together, as a plain left-padded batch
        runs.append((sorted(plain), 0))
    pieces = []
    if reused:  # the rows that continue kept caches, each on its own prefix
        members = sorted(reused, key=lambda row: len(rows[row]) - reused[row][1])  # shortest new part first
        lengths = [reused[row][1] for row in members]
        suffixes = [rows[row][length:] for row, length in zip(members, lengths, strict=True)]
        longest = max(len(suffix) for suffix in suffixes)
        cache, mask_head = reused_cache([reused[row][0] for row in members], lengths, room=longest + room)
        # a few rows a pass, each pass padded to its own longest new part and written in place into the
        # batch's buffers (one pass over every row was 4x slower a token here: padding, and activations
        # that leave the CPU's caches); a shorter pass's columns up to the longest are zeros, masked
        width = mask_head.shape[1]
        logits, masks, positions = [], [], []
        start = 0
        while start < len(members):
            end = start + 1
            while end < len(members) and (end + 1 - start) * len(suffixes[end]) <= REUSED_TOKENS_A_PASS:
                end += 1
            input_ids, suffix_mask, position_ids = left_pad(suffixes[start:end], pad_id, device, lengths[start:end])
            part = slice(start, end)
            attention_mask = torch.cat([mask_head[part], suffix_mask], dim=-1)
            output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=True, logits_to_keep=1, **{cache_name: _rows_of(cache, part, width)})
            logits.append(output.logits[:, -1, :].float())
            short = longest - input_ids.shape[1]
            for layer in cache.layers:
                for buffer in layer.spare:
                    buffer[part, :, width + input_ids.shape[1]:width + longest] = 0
            masks.append(torch.nn.functional.pad(attention_mask, (0, short)))
            positions.append(position_ids[:, -1:] + 1)
            start = end
        for layer in cache.layers:  # every row's prompt is in the buffers now
            keys, values = layer.spare
            layer.keys, layer.values = keys[:, :, :width + longest], values[:, :, :width + longest]
        pieces.append((members, torch.cat(logits), cache, torch.cat(masks), torch.cat(positions)))
    for members, prefix in runs:
        cache = cached_prefix(model, cache_name, rows[members[0]][:prefix], len(members), logits_to_keep=1) if (
            prefix) else DynamicCache()
        mask_head = torch.ones((len(members), prefix), dtype=torch.long, device=device)
        input_ids, suffix_mask, positions = left_pad([rows[row][prefix:] for row in members], pad_id, device,
                                                     [prefix] * len(members))
        attention_mask = torch.cat([mask_head, suffix_mask], dim=-1)
        output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                       logits_to_keep=1, **{cache_name: cache})
        pieces.append((members, output.logits[:, -1, :].float(), cache, attention_mask, positions[:, -1:] + 1))
    if len(pieces) == 1:
        members, logits, cache, attention_mask, next_positions = pieces[0]
        if any_order or members == sorted(members):  # no copy of the cache into the caller's row order
            return Prefilled(logits, cache, attention_mask, next_positions, order=list(members))
        back = torch.tensor(sorted(range(len(members)), key=lambda i: members[i]), device=device)
        cache.batch_select_indices(back)  # into the caller's row order
        return Prefilled(logits[back], cache, attention_mask[back], next_positions[back])
    return _side_by_side(pieces, len(rows), device)


def reused_cache(kept: Sequence[torch.Tensor], lengths: Sequence[int], room: int = 0):
    """A KV cache (transformers `DynamicCache`) over len(kept) rows from kept rows' caches (`engines.turns`:
    (layers, 2, heads, >= length, head_dim) each), each cut to its `lengths[row]` and left-padded (zeros, to
    be masked) to the longest, with `room` more positions written in place (`with_room`); and that mask
    (rows, longest). The rows are copied once, straight into the buffers decoding goes on in."""
    from transformers import DynamicCache

    width = max(lengths)
    first = kept[0]
    layers, _, heads, _, head_dim = first.shape
    mask = torch.zeros((len(kept), width), dtype=torch.long, device=first.device)
    for row, length in enumerate(lengths):
        mask[row, width - length:] = 1
    cache = DynamicCache()
    for layer in range(layers):
        buffers = []
        for part in (0, 1):  # keys, values
            buffer = first.new_empty((len(kept), heads, width + room, head_dim))
            for row, (kv, length) in enumerate(zip(kept, lengths, strict=True)):
                buffer[row, :, :width - length] = 0
                buffer[row, :, width - length:width] = kv[layer, part, :, :length]
            buffers.append(buffer)
        cache.layers.append(_roomy_over(buffers[0], buffers[1], width))
    return cache, mask


def _roomy_over(keys: torch.Tensor, values: torch.Tensor, length: int):
    """A `RoomyLayer` over buffers (rows, heads, capacity, d) whose first `length` positions are filled."""
    from transformers.cache_utils import DynamicLayer

    plain = DynamicLayer()
    plain.lazy_initialization(keys, values)
    plain.keys, plain.values = keys[:, :, :length], values[:, :, :length]
    filled = _roomy_class().around(plain, keys.shape[-2] - length)
    filled.spare = (keys, values)
    return filled


def _rows_of(cache, rows: slice, length: int):
    """A cache over `rows` of `cache` (whose layers are `RoomyLayer`s, `length` positions filled), writing
    into the same buffers."""
    from transformers import DynamicCache

    part = DynamicCache()
    for layer in cache.layers:
        keys, values = layer.spare
        part.layers.append(_roomy_over(keys[rows], values[rows], length))
    return part


def _side_by_side(pieces, batch: int, device: torch.device) -> Prefilled:
    """One cache over the batch from the groups' caches, each left-padded (masked zeros) to the longest."""
    from transformers import DynamicCache

    length = max(attention_mask.shape[1] for _, _, _, attention_mask, _ in pieces)
    order = torch.tensor([row for members, *_ in pieces for row in members], device=device)
    place = torch.empty_like(order)
    place[order] = torch.arange(batch, device=device)  # batch row -> its place in the concatenation
    layers = len(pieces[0][2].layers)
    cache = DynamicCache()
    for layer in range(layers):
        keys, values = [], []
        for _, _, group_cache, attention_mask, _ in pieces:
            pad = length - attention_mask.shape[1]
            keys.append(torch.nn.functional.pad(group_cache.layers[layer].keys, (0, 0, pad, 0)))
            values.append(torch.nn.functional.pad(group_cache.layers[layer].values, (0, 0, pad, 0)))
        cache.update(torch.cat(keys)[place], torch.cat(values)[place], layer)
    attention_mask = torch.cat([torch.nn.functional.pad(mask, (length - mask.shape[1], 0))
                                for _, _, _, mask, _ in pieces])[place]
    logits = torch.cat([logits for _, logits, _, _, _ in pieces])[place]
    next_positions = torch.cat([positions for *_, positions in pieces])[place]
    return Prefilled(logits, cache, attention_mask, next_positions)


def with_room(cache, room: int) -> None:
    """Give every filled layer of a transformers `DynamicCache` room for `room` more positions, written in
    place as decoding goes on (`RoomyLayer`) instead of concatenated: `torch.cat` of every layer's whole
    cache at every token was 8% of a batch-8, 64-token rollout here, and grows with the length."""
    from transformers.cache_utils import DynamicLayer

    roomy = _roomy_class()
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys is not None and layer.keys.dim() == 4:
            cache.layers[index] = roomy.around(layer, room)


_ROOMY = None


def _roomy_class():
    global _ROOMY
    if _ROOMY is not None:
        return _ROOMY
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """A `DynamicLayer` whose keys and values are views into buffers with spare positions. Batch
        operations (`batch_select_indices`, `batch_repeat_interleave`, `crop`) replace the views with plain
        tensors, as before; the next `update` moves them into new buffers with the room left."""

        @classmethod
        def around(cls, layer, room: int):
            roomy = cls()
            roomy.__dict__.update(layer.__dict__)
            roomy.capacity = layer.keys.shape[-2] + room
            roomy.spare = None
            return roomy

        def _in_spare(self) -> bool:
            spare = self.spare
            return (spare is not None and self.keys.shape[0] == spare[0].shape[0]
                    and self.keys.data_ptr() == spare[0].data_ptr() and self.values.data_ptr() == spare[1].data_ptr())

        def update(self, key_states, value_states, *args, **kwargs):
            if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
                return super().update(key_states, value_states, *args, **kwargs)  # autograd: no in-place writes
            length, new = self.keys.shape[-2], key_states.shape[-2]
            if not self._in_spare() or length + new > self.spare[0].shape[-2]:
                size = max(self.capacity, length + new)
                buffers = []
                for current in (self.keys, self.values):
                    batch, heads, _, width = current.shape
                    buffer = current.new_empty((batch, heads, size, width))
                    buffer[:, :, :length] = current
                    buffers.append(buffer)
                self.spare = tuple(buffers)
            keys, values = self.spare
            keys[:, :, length:length + new] = key_states
            values[:, :, length:length + new] = value_states
            self.keys, self.values = keys[:, :, :length + new], values[:, :, :length + new]
            return self.keys, self.values

    _ROOMY = RoomyLayer
    return RoomyLayer
