"""The Hugging Face transformers engine: batched generation and scoring on CPU or CUDA.

Generation is our own decode loop over the model's forward pass rather than `model.generate`, so
that it can (1) return the model's log-prob of every sampled token, (2) drop finished rows from the
batch and the KV cache at once, (3) give each row its own random stream (row i samples from
`seed + i`), and (4) compute logits only where they are needed (`logits_to_keep`). Prompts are
sorted by length inside a call to keep padding small; outputs come back in the caller's order.

Padding is on the left, with explicit position ids from the attention mask, so a row's result does
not depend on which other rows share its batch (tests hold this to 1e-4).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch

from engines.allocator import cap_heap
from engines.base import (
    AdapterError,
    Chat,
    Generation,
    GuidedGeneration,
    LentBase,
    SamplingParams,
    TokenScores,
)
from engines.graphs import DecodeGraphs
from engines.lean import LeanDecoder
from engines.merge import mergeable, merged
from engines.onednn import is_packed, merged_decoding, pack_linears, unpack_linears
from engines.prefix import left_pad, prefill, with_room
from engines.turns import TurnCache

log = logging.getLogger(__name__)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # fp32 on CPU: without native bf16 these CPUs run bf16 1.2-4.6x slower (NOTES.md section 2).
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


class HFEngine:
    """An `Engine` over a transformers causal LM and its tokenizer."""

    def __init__(
        self, model, tokenizer, model_name: str = "model", batch_size: int = 32, packed_weights: bool = True,
        turn_cache_mib: int = 2048, cuda_graphs: bool = True,
    ) -> None:
        model.requires_grad_(False)  # served, not trained: a trainer marks what it trains (learners.fold)
        self.model = model.eval()
        self.base_model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id: int = tokenizer.pad_token_id
        self.stop_ids = _eos_ids(model, tokenizer)
        self._adapter: str | None = None
        self._cache_kwarg = cache_kwarg(model)
        # The CPU speed layer (packed weights, the lean decode step) is installed on CPU only: on a GPU no
        # module is walked or patched per call. CPU fp32: frozen linear layers from oneDNN-prepacked weights.
        cpu = self.device.type == "cpu"
        self.packed_weights = packed_weights and cpu
        self._lean = cpu
        # CUDA: the decode step as one captured graph (engines.graphs)
        self._graphs = DecodeGraphs() if cuda_graphs and self.device.type == "cuda" else None
        self.packed_copies = True  # also a packed copy of a weight that stays dense (a tied head: +113 MiB)
        self.adapter_version = 0  # counts hand-offs: each adapter served (loaded, or a trainer's step) is one
        self._trained = None  # a trainer's live module served on our lent base (`serve_trained`)
        self._served: merged | None = None  # the loaded adapter's merge while it is served
        # each row's KV cache after a generation, so a multi-turn episode's next turn runs only what is new
        self.turns = TurnCache(turn_cache_mib * 2**20)
        self._lent = False  # the base is on loan to a trainer (its weights may change under us)

    @classmethod
    def load(
        cls,
        model: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        threads: int | None = None,
        batch_size: int = 32,
        adapter: str | None = None,
        packed_weights: bool = True,
        turn_cache_mib: int = 2048,
        cuda_graphs: bool = True,
    ) -> HFEngine:
        """Load a model by spec (the embedded default, a directory, or a Hub id)."""
        from safetensors import SafetensorError
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from engines.models import load_error, resolve_model

        torch.set_num_threads(threads or os.cpu_count() or 1)
        location = resolve_model(model)
        torch_device = pick_device(device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(location)
            network = AutoModelForCausalLM.from_pretrained(location, dtype=pick_dtype(dtype, torch_device))
        except (OSError, ValueError, KeyError, SafetensorError) as error:  # a broken config.json, weights ...
            raise load_error(model, location, error) from error
        network.to(torch_device)
        if torch_device.type == "cpu":
            _own_memory(network)
        engine = cls(network, tokenizer, model_name=model or "smollm2-135m", batch_size=batch_size,
                     packed_weights=packed_weights, turn_cache_mib=turn_cache_mib, cuda_graphs=cuda_graphs)
        if adapter:
            engine.load_adapter(adapter)
        return engine

    # ----------------------------------------------------------------- prompts
    def encode(self, prompt: Chat) -> list[int]:
        """Token ids of a chat rendered with the chat template and the generation prompt."""
        text = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count_tokens(self, prompt: Chat) -> int:
        return len(self.encode(prompt))

    def _left_pad(
        self, rows: Sequence[Sequence[int]], device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return left_pad(rows, self.pad_id, device or self.device)

    # -------------------------------------------------------------- generation
    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Chat],
        params: SamplingParams,
        progress: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        self.pack_weights()
        encoded = [self.encode(prompt) for prompt in prompts]
        # token order puts prompts with the same start (system prompt, skills) in the same batch
        order = sorted(range(len(encoded)), key=lambda index: encoded[index])
        results: list[Generation | None] = [None] * len(encoded)
        # prompts that continue a kept row's cache (engines.turns) run only their new tokens
        # not while the base is on loan and nothing is served on it (the trainer may change it under us)
        keeping = (self._trained is not None or not self._lent) and self.turns.budget_bytes > 0
        matched: dict[int, tuple[int, int]] = {}
        if keeping:
            self.turns.serve(self._weights_now())
            matched = self.turns.match(encoded)  # the kept rows matched stay until their batch has run
        with self._decoding():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                # a kept row that no later batch continues is dropped once this one has used it
                later = {matched[index][0] for index in order[start + self.batch_size:] if index in matched}
                outputs = self._generate_batch(
                    [encoded[index] for index in chunk], chunk, params, keeping,
                    {position: matched[index] for position, index in enumerate(chunk) if index in matched},
                    release={matched[index][0] for index in chunk if index in matched} - later)
                for index, output in zip(chunk, outputs, strict=True):
                    results[index] = output
                if progress:
                    progress(len(chunk))
        return [result for result in results if result is not None]

    def _weights_now(self) -> tuple:
        """What the KV caches kept between calls were computed with: the model, the adapter and its hand-off;
        for a trainer's live module also the version counters of its trained tensors, as its optimizer
        steps them in place between hand-offs (`fold.sync_every` > 1; every in-place write counts)."""
        key: tuple = (id(self.model), self._adapter, self.adapter_version)
        if self._trained is not None:
            key += (sum(parameter._version for parameter in self._trained.parameters() if parameter.requires_grad),)
        return key

    def _decoding(self):
        """While inside, a trainer's live module decodes with its adapter merged into the base weights
        (unmerged LoRA pairs cost CPU decoding several times the base model): on packed CPU weights
        through `engines.onednn.merged_decoding`, else `engines.merge.merged`. Nothing otherwise (a loaded
        adapter is merged already; a full fine-tune has nothing to merge; half-precision weights are
        never merged, `engines.merge.mergeable`)."""
        module = self._trained
        if module is None or not mergeable(module):
            return contextlib.nullcontext()
        if is_packed(module):
            return merged_decoding(module)
        return merged(module)  # peft's merge, its unmerge giving the base weights back bit for bit

    def _generate_batch(
        self, rows: list[list[int]], row_numbers: list[int], params: SamplingParams, keeping: bool = False,
        matched: dict[int, tuple[int, int]] | None = None, release: set[int] | frozenset[int] = frozenset(),
    ) -> list[Generation]:
        batch = len(rows)
        generators = None
        if params.temperature > 0:
            generators = []
            for row_number in row_numbers:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(params.seed + row_number)
                generators.append(generator)
        tokens: list[list[int]] = [[] for _ in range(batch)]
        logprobs: list[list[float]] = [[] for _ in range(batch)]
        finish: list[str | None] = [None] * batch
        active = list(range(batch))  # batch rows still generating, in cache order
        matched = matched or {}  # {row: (kept row, tokens of it reused)}
        # the prompts, each group's shared prefix once (engines.prefix)
        prefilled = prefill(self.model, self._cache_kwarg, rows, self.pad_id,
                            reused={row: (self.turns.layers(key), length) for row, (key, length) in matched.items()},
                            room=params.max_new_tokens, any_order=True)
        active = prefilled.order or active  # the rows as the cache holds them
        self.turns.drop(release)  # each continuation is kept instead
        cache, attention_mask, next_positions = prefilled.cache, prefilled.attention_mask, prefilled.next_positions
        # on CUDA the step as one captured graph over static buffers (engines.graphs), where it applies
        graph = self._graphs.decoder(self.model, batch, attention_mask.shape[1] + params.max_new_tokens) if (
            self._graphs is not None and params.max_new_tokens > 1) else None
        if graph is not None:
            graph.load(cache, attention_mask, next_positions, self.pad_id)
            cache = None  # the prompts' keys and values are in the graph's buffers now
        else:
            with_room(cache, params.max_new_tokens)  # decoding writes into the cache in place
        # the model's forward without its bookkeeping, where it applies
        lean = LeanDecoder.build(self.model, cache) if self._lean and graph is None else None
        logits = prefilled.logits
        longest_stop = max((len(stop) for stop in params.stop), default=0)
        for step in range(params.max_new_tokens):
            allowed = self._no_stop_yet(logits, params, step)
            chosen = self._choose(allowed, params, [generators[row] for row in active] if generators else None)
            chosen_logprobs = logits.gather(-1, chosen[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
            # one copy to the host per step for the whole batch (not one sync per row on a GPU)
            chosen_host, logprobs_host = chosen.tolist(), chosen_logprobs.tolist()
            live: list[int] = []  # cache positions of rows still generating
            for position, row in enumerate(active):
                if finish[row] is not None:
                    continue  # finished earlier, still in the cache until the next compaction
                token = chosen_host[position]
                tokens[row].append(token)
                logprobs[row].append(logprobs_host[position])
                if len(tokens[row]) <= params.min_tokens:
                    live.append(position)
                elif token in self.stop_ids:
                    finish[row] = "stop"
                elif longest_stop and self._hit_stop(tokens[row], params.stop, longest_stop):
                    finish[row] = "stop"
                else:
                    live.append(position)
            if not live:
                break
            # Dropping rows copies the whole KV cache, so do it once a quarter of the rows are done,
            # not at every finish (finished rows in between cost one wasted row of compute).
            # (a graph's batch is fixed: its finished rows run on, masked out of the results)
            if graph is None and (len(active) - len(live)) * 4 >= len(active):
                if keeping:  # the finished rows' caches, before they leave the batch's
                    still = set(live)
                    done = [position for position in range(len(active)) if position not in still]
                    self.turns.keep_rows(cache, attention_mask, done,
                                         [rows[active[position]] + tokens[active[position]] for position in done])
                keep_index = torch.tensor(live, device=self.device)
                cache.batch_select_indices(keep_index)
                attention_mask = attention_mask[keep_index]
                next_positions = next_positions[keep_index]
                chosen = chosen[keep_index]
                active = [active[position] for position in live]
            if step + 1 == params.max_new_tokens:
                break
            if graph is not None:
                graph.feed(chosen)
                logits = graph.run()[:batch]  # the graph's own output buffer: read before the next step
                continue
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=-1)
            if lean is not None:
                logits = lean.step(chosen[:, None], attention_mask, next_positions).float()  # (B_active, V)
            else:
                output = self.model(
                    input_ids=chosen[:, None],
                    attention_mask=attention_mask,
                    position_ids=next_positions,
                    use_cache=True,
                    logits_to_keep=1,
                    **{self._cache_kwarg: cache},
                )
                logits = output.logits[:, -1, :].float()  # (B_active, V)
            next_positions = next_positions + 1
        if keeping:
            if graph is not None:
                cache, attention_mask = graph.written(batch)
            self.turns.keep_rows(cache, attention_mask, range(len(active)), [rows[row] + tokens[row] for row in active])
        outputs = []
        for row in range(batch):
            text = self._completion_text(tokens[row], finish[row], params.stop)
            outputs.append(
                Generation(
                    text=text,
                    token_ids=tokens[row],
                    logprobs=logprobs[row],
                    prompt_tokens=len(rows[row]),
                    finish_reason=finish[row] or "length",
                )
            )
        return outputs

    # ------------------------------------------------------- guided generation
    @torch.inference_mode()
    def generate_guided(
        self,
        student_prompts: Sequence[Chat],
        teacher_prompts: Sequence[Chat],
        params: SamplingParams,
        *,
        policy: Literal["speculative", "mixture", "pedagogical"],
        top_k: int = 20,
        mix: float = 0.0,
        surprisal: float = math.inf,
        teacher_scope: Callable[[], contextlib.AbstractContextManager] | None = None,
        teacher_model=None,
        progress: Callable[[int], None] | None = None,
    ) -> list[GuidedGeneration]:
        """Rollouts from a policy that blends the student with a teacher, one token at a time.

        Two views advance together, each a left-padded batch with its own KV cache: the student view
        (`self.model` on `student_prompts`) and the teacher view (`teacher_prompts`, run through
        `teacher_model`, default `self.model`, inside `teacher_scope()` when given: a factory of
        context managers that swap the teacher's weights in, e.g. `Teacher._teacher_weights`). Both
        views append the same chosen token at every step. Policies (S, T: the two views' next-token
        distributions; temperature and top_p from `params` apply to whatever is sampled, and row i
        samples from `seed + i` as in `generate`):

        - `speculative` (SKD): y ~ S; if y is not among T's `top_k` tokens, it is replaced by y ~ T
          (source 1). μ(y) = S(y)·[y ∈ topK(T)] + S(V ∖ topK(T))·T(y).
        - `mixture` (TRB): y ~ μ ∝ S^(1−mix)·T^mix (renormalised in log space). A token counts as a
          teacher token (source 1) when mix > 0 and T(y) > S(y): the teacher made it likelier than
          the student alone would have.
        - `pedagogical`: the teacher proposes y ~ T; a proposal the student finds too surprising,
          −log S(y) > `surprisal` (nats, at temperature 1), is replaced by y ~ S (source 0; an accepted
          proposal is source 1). μ(y) = T(y)·[y ∈ A] + T(V ∖ A)·S(y), A = {y : −log S(y) ≤ surprisal};
          `surprisal` = inf is the teacher alone.

        `logprobs` are the student's model log-probs; `behaviour_logprobs` are log μ and
        `teacher_logprobs` log T, all at temperature 1. With temperature 0 and `mixture` at mix 0
        (or `speculative` with top_k = vocabulary) the tokens are exactly those of `generate`.
        Stops, EOS and dropping finished rows (from both caches) are as in `generate`.
        """
        self.pack_weights()
        if policy not in ("speculative", "mixture", "pedagogical"):
            raise ValueError(f"unknown guided policy {policy!r}: speculative, mixture or pedagogical")
        if not surprisal >= 0.0:
            raise ValueError(f"surprisal must be >= 0 (nats; inf for no limit), got {surprisal}")
        if len(student_prompts) != len(teacher_prompts):
            raise ValueError(f"{len(student_prompts)} student prompts but {len(teacher_prompts)} teacher prompts")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {mix}")
        student_rows = [self.encode(prompt) for prompt in student_prompts]
        teacher_rows = [self.encode(prompt) for prompt in teacher_prompts]
        order = sorted(range(len(student_rows)), key=lambda index: student_rows[index])  # as `generate`
        results: list[GuidedGeneration | None] = [None] * len(student_rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            outputs = self._guided_batch(
                [student_rows[index] for index in chunk], [teacher_rows[index] for index in chunk], chunk, params,
                policy=policy, top_k=top_k, mix=mix, surprisal=surprisal, teacher_scope=teacher_scope,
                teacher_model=teacher_model,
            )
            for index, output in zip(chunk, outputs, strict=True):
                results[index] = output
            if progress:
                progress(len(chunk))
        return [result for result in results if result is not None]

    def _guided_batch(
        self,
        student_rows: list[list[int]],
        teacher_rows: list[list[int]],
        row_numbers: list[int],
        params: SamplingParams,
        *,
        policy: str,
        top_k: int,
        mix: float,
        surprisal: float,
        teacher_scope,
        teacher_model,
    ) -> list[GuidedGeneration]:
        batch = len(student_rows)
        student = _DecodeView(self, self.model, student_rows, None, params.max_new_tokens, "student")
        teacher = _DecodeView(self, teacher_model if teacher_model is not None else self.model, teacher_rows,
                              teacher_scope, params.max_new_tokens, "teacher")
        generators = None
        if params.temperature > 0:
            generators = []
            for row_number in row_numbers:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(params.seed + row_number)
                generators.append(generator)
        tokens: list[list[int]] = [[] for _ in range(batch)]
        logprobs: list[list[float]] = [[] for _ in range(batch)]
        behaviour: list[list[float]] = [[] for _ in range(batch)]
        teacher_logprobs: list[list[float]] = [[] for _ in range(batch)]
        sources: list[list[int]] = [[] for _ in range(batch)]
        finish: list[str | None] = [None] * batch
        active = list(range(batch))  # batch rows still generating, in cache order (both views)
        longest_stop = max((len(stop) for stop in params.stop), default=0)
        for step in range(params.max_new_tokens):
            student_logits = student.logits()  # (B_active, V)
            teacher_logits = teacher.logits().to(student_logits.device)  # (B_active, V)
            if teacher_logits.shape != student_logits.shape:
                raise ValueError(
                    f"the teacher's vocabulary ({teacher_logits.shape[-1]}) differs from the student's "
                    f"({student_logits.shape[-1]})"
                )
            row_generators = [generators[row] for row in active] if generators else None
            choose = _CHOICES[policy]
            chosen, chosen_sources, chosen_behaviour, student_chosen, teacher_chosen = choose(
                self._no_stop_yet(student_logits, params, step), self._no_stop_yet(teacher_logits, params, step),
                params, row_generators, top_k=top_k, mix=mix, surprisal=surprisal,
            )
            if step < params.min_tokens:  # log-probs of the unconstrained models (behaviour: what chose)
                student_chosen = _gather(torch.log_softmax(student_logits, dim=-1), chosen)
                teacher_chosen = _gather(torch.log_softmax(teacher_logits, dim=-1), chosen)
            keep: list[int] = []
            # one copy to the host per step for the whole batch (not one sync per row on a GPU)
            host = torch.stack([chosen.double(), student_chosen.double(), chosen_behaviour.double(),
                                teacher_chosen.double(), chosen_sources.double()]).tolist()
            for position, row in enumerate(active):
                token = int(host[0][position])
                tokens[row].append(token)
                logprobs[row].append(host[1][position])
                behaviour[row].append(host[2][position])
                teacher_logprobs[row].append(host[3][position])
                sources[row].append(int(host[4][position]))
                if len(tokens[row]) <= params.min_tokens:
                    keep.append(position)
                elif token in self.stop_ids:
                    finish[row] = "stop"
                elif longest_stop and self._hit_stop(tokens[row], params.stop, longest_stop):
                    finish[row] = "stop"
                else:
                    keep.append(position)
            if not keep:
                break
            keep_index = None
            if len(keep) < len(active):
                keep_index = torch.tensor(keep, device=self.device)
                active = [active[position] for position in keep]
            student.advance(chosen, keep_index)
            teacher.advance(chosen, keep_index)
        outputs = []
        for row in range(batch):
            text = self._completion_text(tokens[row], finish[row], params.stop)
            outputs.append(
                GuidedGeneration(
                    text=text,
                    token_ids=tokens[row],
                    logprobs=logprobs[row],
                    prompt_tokens=len(student_rows[row]),
                    finish_reason=finish[row] or "length",
                    sources=sources[row],
                    behaviour_logprobs=behaviour[row],
                    teacher_logprobs=teacher_logprobs[row],
                )
            )
        return outputs

    def _no_stop_yet(self, logits: torch.Tensor, params: SamplingParams, step: int) -> torch.Tensor:
        """The logits with every stop id masked out at decoding steps before `params.min_tokens`
        (every active row then has exactly `step` tokens: none can have stopped yet)."""
        if step >= params.min_tokens or not self.stop_ids:
            return logits
        masked = logits.clone()
        masked[:, sorted(self.stop_ids)] = float("-inf")
        return masked

    @staticmethod
    def _choose(
        logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator] | None
    ) -> torch.Tensor:
        if generators is None:
            return logits.argmax(dim=-1)
        scaled = logits / params.temperature
        if params.top_p < 1.0:
            sorted_logits, sorted_index = scaled.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= params.top_p  # keep the token crossing top_p
            drop = drop_sorted.scatter(-1, sorted_index, drop_sorted)
            scaled = scaled.masked_fill(drop, float("-inf"))
        # Inverse CDF, one uniform draw per row from its own generator: the first token whose cumulative
        # probability passes u * total. torch.multinomial draws an exponential per vocabulary entry
        # instead: 0.9 ms a row here, 10% of a batch-8 decode step.
        draws = torch.cat([torch.rand(1, generator=generator, dtype=torch.float64, device=generator.device)
                           for generator in generators]).to(logits.device)
        return inverse_cdf(scaled.softmax(dim=-1), draws)

    def _completion_text(self, row_tokens: list[int], finish: str | None, stops: Sequence[str]) -> str:
        text = self.tokenizer.decode(row_tokens, skip_special_tokens=True)
        return _cut_at_stop(text, stops) if finish == "stop" else text

    def _hit_stop(self, row_tokens: list[int], stops: Sequence[str], longest_stop: int) -> bool:
        # Decode a tail long enough to hold any stop string (a token is at least one character).
        tail = self.tokenizer.decode(row_tokens[-(longest_stop + 2):], skip_special_tokens=True)
        return any(stop in tail for stop in stops)

    # ----------------------------------------------------------------- scoring
    @torch.inference_mode()
    def score(
        self, prompts: Sequence[Chat], completions: Sequence[Sequence[int]], top_k: int = 0
    ) -> list[TokenScores]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        encoded = [self.encode(prompt) for prompt in prompts]
        return self.score_ids(encoded, completions, top_k=top_k)

    @torch.inference_mode()
    def score_ids(
        self, prompt_ids: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], top_k: int = 0
    ) -> list[TokenScores]:
        """`score` on already tokenized prompts."""
        self.pack_weights()
        order = sorted(range(len(prompt_ids)), key=lambda index: len(prompt_ids[index]) + len(completions[index]))
        results: list[TokenScores | None] = [None] * len(prompt_ids)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            scored = self._score_batch([prompt_ids[i] for i in chunk], [completions[i] for i in chunk], top_k)
            for index, item in zip(chunk, scored, strict=True):
                results[index] = item
        return [result for result in results if result is not None]

    def _score_batch(
        self, prompts: list[Sequence[int]], completions: list[Sequence[int]], top_k: int
    ) -> list[TokenScores]:
        rows = [list(prompt) + list(completion) for prompt, completion in zip(prompts, completions, strict=True)]
        input_ids, attention_mask, position_ids = self._left_pad(rows)
        keep = max(len(completion) for completion in completions) + 1
        output = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep
        )
        logits = output.logits.float()  # (B, keep, V): position j predicts token j + 1
        results = []
        for row, completion in enumerate(completions):
            length = len(completion)
            if length == 0:
                results.append(TokenScores(token_ids=[], logprobs=[]))
                continue
            row_logits = logits[row, keep - length - 1: keep - 1]  # (C, V)
            normaliser = torch.logsumexp(row_logits, dim=-1)  # (C,)
            targets = torch.tensor(list(completion), device=row_logits.device)
            token_logprobs = row_logits.gather(-1, targets[:, None]).squeeze(-1) - normaliser
            topk_ids = topk_logprobs = None
            if top_k > 0:
                values, indices = row_logits.topk(top_k, dim=-1)
                topk_ids = indices.tolist()
                topk_logprobs = (values - normaliser[:, None]).tolist()
            results.append(
                TokenScores(
                    token_ids=list(completion),
                    logprobs=token_logprobs.tolist(),
                    topk_ids=topk_ids,
                    topk_logprobs=topk_logprobs,
                )
            )
        return results

    # ------------------------------------------------------------ packed weights
    def pack_weights(self) -> None:
        """Serve the model's frozen fp32 CPU linear layers from oneDNN-prepacked weights from now on
        (engines.onednn; 1.4-1.5x faster decoding here). A no-op where it does not apply or is off.
        Whatever changes weights calls `unpack_weights` first (loading an adapter, training)."""
        if self.packed_weights:
            pack_linears(self.model, copies=self.packed_copies)  # what is not packed yet: cheap once all is

    def unpack_weights(self) -> None:
        """Put the dense weights back (bit for bit), e.g. before merging or training them."""
        if self.packed_weights:
            unpack_linears(self.model)

    # ---------------------------------------------------------------- adapters
    @property
    def adapter(self) -> str | None:
        return self._adapter

    def load_adapter(self, path: str) -> None:
        """Serve a PEFT LoRA adapter directory on top of the base weights (replacing any other).

        The adapter is merged into the weights while it is served, so generation costs what the
        base model costs (unmerged LoRA layers slow CPU decoding several times); unloading unmerges,
        giving the base weights back bit for bit (`engines.merge.merged`).
        """
        import json

        from peft import PeftModel
        from safetensors import SafetensorError

        adapter_dir = Path(path).expanduser()
        if not (adapter_dir / "adapter_config.json").is_file():
            raise AdapterError(
                f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json); pass a fold's adapter "
                "(a directory under <home>/adapters), latest, or none"
            )
        self.unload_adapter()  # the dense weights back too
        try:
            self.model = PeftModel.from_pretrained(self.base_model, str(adapter_dir)).eval()
            if mergeable(self.model):
                self._served = merged(self.model).__enter__()
        except (SafetensorError, OSError, json.JSONDecodeError) as error:  # a truncated or damaged file
            self.model = self.base_model
            raise AdapterError(
                f"adapter {adapter_dir} cannot be read ({type(error).__name__}: {str(error)[:300]}); its files are "
                "truncated or corrupt. Run the fold that wrote it again, or pass --adapter none (or another adapter)."
            ) from error
        except (RuntimeError, ValueError, KeyError) as error:
            self.model = self.base_model
            raise AdapterError(
                f"adapter {adapter_dir} does not fit model {self.model_name}: {str(error)[:300]}. "
                "Use an adapter trained on this model, or pass --adapter none."
            ) from error
        self._adapter = str(adapter_dir)
        self.adapter_version += 1

    def unload_adapter(self) -> None:
        self.unpack_weights()
        if self._adapter is None:
            return
        if self._served is not None:
            self._served.__exit__(None, None, None)
            self._served = None
        self.base_model = self.model.unload()
        self.model = self.base_model.eval()
        self._adapter = None
        self._forget_graphs()

    def _forget_graphs(self) -> None:
        """Free the captured decoders (their buffers) once the model they recorded is gone; a stale one
        would never replay anyway (`engines.graphs.signature`)."""
        if self._graphs is not None:
            self._graphs.clear()

    # --------------------------------------------- the trainer's loan (SharesWeights)
    def lend_base(self, *, heap_threshold_kib: int = 0) -> LentBase:
        """Hand the base model to a trainer in this process (`engines.base.SharesWeights`): any adapter
        unloaded, the dense weights back. `heap_threshold_kib` > 0 puts memory first for the loan: large
        blocks mmap'd and freed back to the system (`engines.allocator`, glibc, once per process) and no
        packed copy of a weight that stays dense (a tied head: 113 MiB here)."""
        self.unload_adapter()
        self._lent = True
        self.turns.clear()
        self._forget_graphs()
        if heap_threshold_kib:
            cap_heap(heap_threshold_kib)
            self.packed_copies = False
        return LentBase(model=self.base_model, tokenizer=self.tokenizer, stop_ids=set(self.stop_ids))

    def serve_trained(self, module) -> None:
        """Generate with a trainer's live module (our lent base with its adapter, or trained whole) from
        the next call: its current tensors, no copy; each call is one hand-off (`adapter_version`).
        `None` ends it: the weights go back plain (dense, no speed-layer state) for the trainer to save
        and unwrap, and the engine serves the lent base as it is until `reclaim`."""
        if module is None:
            self.unpack_weights()
            self._trained = None
            self.model = self.base_model
            return
        if module is not self._trained:
            self._trained = module
            self.model = module
            self.pack_weights()  # frozen base layers packed while the trainer holds them (LoRA beside them)
        self.adapter_version += 1

    def reclaim(self, base, adapter: str | None) -> None:
        """End a trainer's loan: serve `base` (the trainer's layers removed) and the adapter dir on top."""
        if self._trained is not None:
            self.serve_trained(None)
        base.requires_grad_(False)
        self.model = self.base_model = base.eval()
        self._lent = False
        self.turns.clear()
        self._forget_graphs()
        self.packed_copies = True  # the engine's default again (the copies come at its next packing)
        if adapter:
            self.load_adapter(adapter)


class _DecodeView:
    """One left-padded batch decoding through one model with its own KV cache (a view of a guided rollout);
    on CUDA through a captured graph (`engines.graphs`, one per view: `role`), where it applies."""

    def __init__(self, engine: HFEngine, model, rows: list[list[int]], scope, room: int, role: str) -> None:
        self.model = model
        self.scope = scope
        self.device = next(model.parameters()).device
        self.pad_id = engine.pad_id
        self.use_lean = engine._lean
        # graphs on the engine's own device only (a teacher elsewhere decodes as before)
        self.graphs = engine._graphs if self.device == engine.device else None
        self.room, self.role = room, role
        self.graph = None
        self.graph_rows: torch.Tensor | None = None  # the graph rows still decoding, in the view's order
        # the engine's model, or another one (an external teacher), under a peft wrapper or not
        self.cache_kwarg = engine._cache_kwarg if model is engine.model else cache_kwarg(
            model.get_base_model() if hasattr(model, "get_base_model") else model)
        self.rows: list[list[int]] | None = rows  # the prompts, until the first call prefills them
        self.cache = self.attention_mask = self.next_positions = None
        self.step_input = self.step_positions = None
        self.lean: LeanDecoder | None = None

    def logits(self) -> torch.Tensor:
        """Next-token logits (B_active, V) in fp32: the prompts' (each group's shared prefix once, in
        this view's weights) at the first call, then feeding the pending token into the cache."""
        with self.scope() if self.scope is not None else contextlib.nullcontext():
            if self.rows is not None:
                prefilled = prefill(self.model, self.cache_kwarg, self.rows, self.pad_id)
                self.rows = None
                self.cache, self.attention_mask = prefilled.cache, prefilled.attention_mask
                self.next_positions = prefilled.next_positions
                if self.graphs is not None and self.room > 1:
                    batch, width = self.attention_mask.shape
                    self.graph = self.graphs.decoder(self.model, batch, width + self.room, role=self.role)
                if self.graph is not None:
                    self.graph.load(self.cache, self.attention_mask, self.next_positions, self.pad_id)
                    self.graph_rows = torch.arange(len(self.attention_mask), device=self.device)
                    self.cache = None
                self.lean = LeanDecoder.build(self.model, self.cache) if self.use_lean and self.graph is None else None
                return prefilled.logits
            if self.graph is not None:
                return self.graph.run().index_select(0, self.graph_rows)
            if self.lean is not None:
                return self.lean.step(self.step_input, self.attention_mask, self.step_positions).float()
            output = self.model(
                input_ids=self.step_input,
                attention_mask=self.attention_mask,
                position_ids=self.step_positions,
                use_cache=True,
                logits_to_keep=1,
                **{self.cache_kwarg: self.cache},
            )
        return output.logits[:, -1, :].float()

    def advance(self, chosen: torch.Tensor, keep: torch.Tensor | None) -> None:
        """Drop the finished rows (all but `keep`, when given) and queue the chosen tokens."""
        chosen = chosen.to(self.device)
        if self.graph is not None:  # a graph's rows stay: the finished ones run on, unread
            if keep is not None:
                keep = keep.to(self.device)
                self.graph_rows, chosen = self.graph_rows[keep], chosen[keep]
            self.graph.feed(chosen, self.graph_rows)
            return
        if keep is not None:
            keep = keep.to(self.device)
            self.cache.batch_select_indices(keep)
            self.attention_mask = self.attention_mask[keep]
            self.next_positions = self.next_positions[keep]
            chosen = chosen[keep]
        self.attention_mask = torch.cat(
            [self.attention_mask, self.attention_mask.new_ones((len(chosen), 1))], dim=-1
        )
        self.step_input = chosen[:, None]
        self.step_positions = self.next_positions
        self.next_positions = self.next_positions + 1


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return values.gather(-1, index[:, None]).squeeze(-1)


def _propose_or_replace(proposer_logits, proposer_log_probs, other_logits, other_log_probs, acceptable, params,
                        generators):
    """One view proposes y ~ P; a proposal outside `acceptable` (B, V) is replaced by y ~ Q from the other
    view. Returns (tokens, accepted (B,) bool: the proposal kept, log μ), each (B,), where
    μ(y) = P(y)·[y ∈ A] + P(V ∖ A)·Q(y), A the acceptable tokens (log-probs at temperature 1)."""
    proposal = HFEngine._choose(proposer_logits, params, generators)
    accepted = _gather(acceptable, proposal)
    chosen = proposal.clone()
    rejected = torch.nonzero(~accepted).flatten().tolist()
    if rejected:
        index = torch.tensor(rejected, device=chosen.device)
        chosen[index] = HFEngine._choose(
            other_logits[index], params, [generators[row] for row in rejected] if generators else None
        )
    refused_mass = torch.logsumexp(proposer_log_probs.masked_fill(acceptable, float("-inf")), dim=-1)  # log P(V∖A)
    proposed = _gather(proposer_log_probs, chosen).masked_fill(~_gather(acceptable, chosen), float("-inf"))
    return chosen, accepted, torch.logaddexp(proposed, refused_mass + _gather(other_log_probs, chosen))


def _speculative_choice(student_logits, teacher_logits, params, generators, *, top_k: int, mix: float,
                        surprisal: float):
    """SKD: the student proposes; a proposal outside the teacher's top-k is replaced by a teacher sample.

    Returns (tokens, sources, log μ, log S, log T), each (B,), where
    μ(y) = S(y)·[y ∈ topK(T)] + S(V ∖ topK(T))·T(y).
    """
    student_log_probs = torch.log_softmax(student_logits, dim=-1)
    teacher_log_probs = torch.log_softmax(teacher_logits, dim=-1)
    top = teacher_logits.topk(min(top_k, teacher_logits.shape[-1]), dim=-1).indices  # (B, k)
    in_top = torch.zeros_like(teacher_logits, dtype=torch.bool).scatter(-1, top, True)  # (B, V)
    chosen, accepted, behaviour = _propose_or_replace(student_logits, student_log_probs, teacher_logits,
                                                      teacher_log_probs, in_top, params, generators)
    return chosen, (~accepted).long(), behaviour, _gather(student_log_probs, chosen), _gather(teacher_log_probs, chosen)


def _mixture_choice(student_logits, teacher_logits, params, generators, *, top_k: int, mix: float,
                    surprisal: float):
    """TRB: y ~ μ ∝ S^(1−mix)·T^mix; a teacher token is one with mix > 0 and T(y) > S(y).

    Returns (tokens, sources, log μ, log S, log T), each (B,). At mix 0 (1) the student's (teacher's)
    own logits are sampled, so the draws are exactly those of plain generation from that view.
    """
    student_log_probs = torch.log_softmax(student_logits, dim=-1)
    teacher_log_probs = torch.log_softmax(teacher_logits, dim=-1)
    if mix == 0.0:
        mixed = student_logits
    elif mix == 1.0:
        mixed = teacher_logits
    else:
        mixed = (1.0 - mix) * student_log_probs + mix * teacher_log_probs
    chosen = HFEngine._choose(mixed, params, generators)
    behaviour = _gather(torch.log_softmax(mixed, dim=-1), chosen)
    student_chosen = _gather(student_log_probs, chosen)
    teacher_chosen = _gather(teacher_log_probs, chosen)
    sources = ((teacher_chosen > student_chosen) & (mix > 0.0)).long()
    return chosen, sources, behaviour, student_chosen, teacher_chosen


def _pedagogical_choice(student_logits, teacher_logits, params, generators, *, top_k: int, mix: float,
                        surprisal: float):
    """The teacher proposes; a proposal the student finds too surprising (−log S(y) > `surprisal`) is
    replaced by a student sample. Returns (tokens, sources, log μ, log S, log T), each (B,), where
    μ(y) = T(y)·[y ∈ A] + T(V ∖ A)·S(y), A = {y : log S(y) ≥ −surprisal}; source 1 = the teacher's
    proposal kept. With `surprisal` = inf every proposal is kept: the draws are the teacher view's own."""
    student_log_probs = torch.log_softmax(student_logits, dim=-1)
    teacher_log_probs = torch.log_softmax(teacher_logits, dim=-1)
    plausible = student_log_probs >= -surprisal  # (B, V): A
    chosen, accepted, behaviour = _propose_or_replace(teacher_logits, teacher_log_probs, student_logits,
                                                      student_log_probs, plausible, params, generators)
    return chosen, accepted.long(), behaviour, _gather(student_log_probs, chosen), _gather(teacher_log_probs, chosen)


_CHOICES = {"speculative": _speculative_choice, "mixture": _mixture_choice, "pedagogical": _pedagogical_choice}

_BLOCK = 256  # vocabulary entries per block of the two-level inverse CDF


def inverse_cdf(probabilities: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Per row b, the first index whose cumulative probability exceeds draws[b] * (row total): a sample
    from the row's distribution for draws uniform on [0, 1). (B, V) probabilities (any non-negative
    weights; zero-weight entries are never chosen), (B,) float64 draws -> (B,) long.

    Two levels, in float64 (exact enough for a 1e-9 tail over a 49k vocabulary): the cumulative sum of
    block sums (blocks of 256 entries) finds the block, then the cumulative sum inside that one block
    the entry. A float64 cumulative sum over the whole (8, 49k) row costs 2.3 ms here (not vectorised),
    a quarter of a decode step's sampling; this reads the probabilities once."""
    rows, width = probabilities.shape
    blocks = -(-width // _BLOCK)
    padded = probabilities if blocks * _BLOCK == width else torch.nn.functional.pad(
        probabilities, (0, blocks * _BLOCK - width))
    blocked = padded.view(rows, blocks, _BLOCK)
    block_cumulative = blocked.sum(-1, dtype=torch.float64).cumsum(-1)  # (B, blocks)
    total = block_cumulative[:, -1:]
    target = torch.minimum(draws.to(block_cumulative)[:, None] * total,
                           torch.nextafter(total, torch.zeros_like(total)))  # (B, 1), below the total
    block = torch.searchsorted(block_cumulative, target, right=True).clamp_(max=blocks - 1)  # (B, 1)
    before = torch.where(block > 0, block_cumulative.gather(-1, (block - 1).clamp(min=0)),
                         torch.zeros_like(target))
    chosen = blocked.gather(1, block[:, :, None].expand(-1, 1, _BLOCK))[:, 0]  # (B, 256): the chosen blocks
    offset = torch.searchsorted(chosen.double().cumsum(-1), target - before, right=True).clamp_(max=_BLOCK - 1)
    # a draw at the block's very end (rounding) may land past its last non-zero entry: step back to it
    last = _BLOCK - 1 - (chosen > 0).flip(-1).int().argmax(-1, keepdim=True)
    offset = torch.minimum(offset, last)
    return (block * _BLOCK + offset).squeeze(-1).clamp_(max=width - 1)


def _own_memory(model) -> None:
    """Copy CPU weights out of the safetensors file that `from_pretrained` memory-maps, so the mapping
    is dropped: its pages count as resident for as long as any one weight holds it, so a weight replaced
    later (packed, engines.onednn) would free nothing. One weight at a time, and each weight's pages of
    the file are given back as soon as it is copied (`_drop_file_pages`): otherwise the whole file and
    the copies are resident together at the end (peak RSS +513 MiB for SmolLM2-135M). ~0.3 s."""
    mapped = _file_mappings(".safetensors")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            source = tensor.data
            tensor.data = source.clone()
            _drop_file_pages(source, mapped)
            del source


def _file_mappings(suffix: str) -> list[tuple[int, int]]:
    """(start, end) addresses of this process's memory mappings of files whose name ends in `suffix`
    (Linux /proc/self/maps; elsewhere none)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    spans = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].strip().endswith(suffix):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            spans.append((start, end))
    return spans


def _drop_file_pages(tensor: torch.Tensor, mapped: Sequence[tuple[int, int]]) -> None:
    """madvise(MADV_DONTNEED) the whole pages of `tensor`'s bytes when they lie in a file mapping of
    `mapped`: the pages leave this process's resident set (the file stays; a later read would fault
    them back in from it). Only file-backed ranges, and only for a tensor already copied."""
    if not mapped or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if not any(low <= start and end <= high for low, high in mapped):
        return
    page = os.sysconf("SC_PAGE_SIZE")
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def cache_kwarg(module) -> str:
    """The name under which `module.forward` takes a KV cache: `cache` in newer transformers,
    `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cuts = [text.find(stop) for stop in stops if stop in text]
    return text[: min(cuts)] if cuts else text
