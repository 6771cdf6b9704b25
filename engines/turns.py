"""Multi-turn episodes without running the conversation again every turn: each row's KV cache kept.

In a game or a tool episode every turn's prompt is the last turn's prompt, the model's reply and the new
observation. Run from scratch, turn t costs the whole conversation so far, and a game of 8 turns costs
the sum of all its prefixes (measured: prefill was most of a 100-game evaluation here). After a
generation `TurnCache` keeps each row's keys and values (its prompt and the tokens it generated); at
the next call a prompt that starts with a kept sequence runs only its new tokens on top of that row's
cache (`engines.prefix.prefill`, `reused`). The results equal a plain run up to float rounding, like the
shared prefixes of `engines.prefix`.

The cache is valid for one set of weights: `HFEngine` clears it whenever what it serves changes (an
adapter loaded or unloaded, a trainer's loan, a hand-off, and for a trainer's live module any in-place
write to its trained tensors: an optimizer step, between hand-offs too), so a fold's multi-turn rollouts
keep their caches between turns within a step. Memory is bounded (`budget_bytes`): the oldest rows go first, and a row
whose cache was taken for a continuation is dropped (its continuation is kept instead).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

MIN_REUSE = 32  # tokens a prompt must share with a kept row before that row's cache is used


@dataclass
class Kept:
    """One row's tokens and its KV cache: (layers, 2, heads, tokens, head_dim)."""

    ids: np.ndarray
    kv: torch.Tensor

    @property
    def bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class TurnCache:
    """Rows' KV caches kept between generations, bounded by `budget_bytes` (0: keep nothing)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._kept: OrderedDict[int, Kept] = OrderedDict()
        self._next = 0
        self.used_bytes = 0
        self.owner: object = None  # what the kept caches were computed with
        self._pending: set[int] = set()  # kept rows matched by prompts whose batch has not run yet
        self.reused_tokens = 0  # prompt tokens not run again, since the start
        self.prompt_tokens = 0  # prompt tokens asked for, since the start

    def __len__(self) -> int:
        return len(self._kept)

    def clear(self) -> None:
        self._kept.clear()
        self._pending.clear()
        self.used_bytes = 0

    def serve(self, owner: object) -> None:
        """Keep caches only for `owner` (the weights being served): another owner clears them."""
        if owner != self.owner:
            self.clear()
            self.owner = owner

    def match(self, rows: Sequence[Sequence[int]], min_reuse: int = MIN_REUSE) -> dict[int, tuple[int, int]]:
        """{row: (key, length)}: the kept row sharing the longest token prefix with each prompt, where that
        prefix is at least `min_reuse` tokens (at most the prompt's length - 1: its last token must run)."""
        self.prompt_tokens += sum(len(row) for row in rows)
        if not self._kept or not self.budget_bytes:
            return {}
        found: dict[int, tuple[int, int]] = {}
        for index, row in enumerate(rows):
            tokens = np.asarray(row, dtype=np.int64)
            best_key, best = None, min_reuse - 1
            for key, kept in self._kept.items():
                limit = min(len(kept.ids), len(tokens) - 1)
                if limit <= best or kept.ids[0] != tokens[0]:
                    continue
                differ = np.flatnonzero(kept.ids[:limit] != tokens[:limit])
                length = int(differ[0]) if differ.size else limit
                if length > best:
                    best_key, best = key, length
            if best_key is not None:
                found[index] = (best_key, best)
                self.reused_tokens += best
        self._pending = {key for key, _ in found.values()}
        return found

    def layers(self, key: int) -> torch.Tensor:
        return self._kept[key].kv

    def drop(self, keys) -> None:
        for key in set(keys):
            self._pending.discard(key)
            kept = self._kept.pop(key, None)
            if kept is not None:
                self.used_bytes -= kept.bytes

    def keep(self, ids: Sequence[int], kv: torch.Tensor) -> None:
        """Keep one row: `ids` the tokens whose keys and values `kv` (layers, 2, heads, len(ids), d) holds."""
        if not self.budget_bytes:
            return
        kept = Kept(np.asarray(ids, dtype=np.int64), kv)
        if any(len(other.ids) == len(kept.ids) and np.array_equal(other.ids, kept.ids) for other in self._kept.values()):
            return  # a row alike so far (two episodes that played the same): one copy serves both
        if self.used_bytes + kept.bytes > self.budget_bytes:  # the oldest go first, not those a batch awaits
            for key in [key for key in self._kept if key not in self._pending]:
                self.used_bytes -= self._kept.pop(key).bytes
                if self.used_bytes + kept.bytes <= self.budget_bytes:
                    break
            if self.used_bytes + kept.bytes > self.budget_bytes:
                return
        self._kept[self._next] = kept
        self._next += 1
        self.used_bytes += kept.bytes

    def keep_rows(self, cache, attention_mask: torch.Tensor, positions: Sequence[int],
                  sequences: Sequence[Sequence[int]]) -> None:
        """Keep the rows at cache `positions` of a batch's KV cache (a transformers `DynamicCache`), whose
        tokens are `sequences` (prompt + generated). A row's cached columns are the unmasked ones, in
        order; only the first len(sequence) are its own (a finished row may have run on in the batch),
        and its last generated token may have no keys yet (decoding stopped before running it)."""
        if not self.budget_bytes:
            return
        layers = cache.layers
        for position, sequence in zip(positions, sequences, strict=True):
            columns = attention_mask[position].nonzero().squeeze(-1)
            count = min(len(columns), len(sequence))
            if count < MIN_REUSE:
                continue
            columns = columns[:count]
            first = layers[0].keys
            kv = first.new_empty((len(layers), 2, first.shape[1], count, first.shape[-1]))
            for index, layer in enumerate(layers):
                torch.index_select(layer.keys[position], -2, columns, out=kv[index, 0])
                torch.index_select(layer.values[position], -2, columns, out=kv[index, 1])
            self.keep(sequence[:count], kv)

    def stats(self) -> dict[str, int]:
        return {"kept_rows": len(self._kept), "kept_bytes": self.used_bytes, "reused_tokens": self.reused_tokens,
                "prompt_tokens": self.prompt_tokens}
