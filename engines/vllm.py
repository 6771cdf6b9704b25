"""The vLLM engine: the `Engine` protocol against one or several vLLM servers (OpenAI-compatible API).

vLLM cannot share this process's Python environment (it pins its own torch and transformers), so it
runs as a server (`skillfold serve`, `engines.vllm_server`) and this engine talks HTTP to it:
- `generate`: one chat completion per prompt, sent concurrently, with `logprobs` and
  `return_tokens_as_token_ids`, so every completion comes back with the ids the server sampled and
  their log-probs. vLLM's default `logprobs_mode` (raw log-probs, before temperature and top-p) is
  the model's own distribution at temperature 1, the convention of every log-prob in `engines.base`.
  Row i of a call samples with seed `params.seed + i`.
- `score`: the given completion tokens' log-probs (and the top-k) under the prompt through
  `prompt_logprobs` on the completions endpoint, with the prompt tokenized by the server's
  `/tokenize` (its chat template, the generation prompt appended).
- adapters: the runtime LoRA API (`/v1/load_lora_adapter`, servers started with
  `VLLM_ALLOW_RUNTIME_LORA_UPDATING`). Each adapter served is a new version with a name of its own
  (`<tag>-v<version>`); every request names the version it wants, so a completion knows exactly which
  adapter sampled it (`Generation.adapter_version`) even while a hand-off happens beside it. The
  version before stays loaded until the next one replaces it (requests still in flight on it finish
  on it); older ones are unloaded. The server reads the adapter's files when it is loaded, so the
  directory may be replaced at once. A server on another machine must see the same path (a shared
  filesystem).
- several servers (`urls`): data-parallel. Each request goes to the live server with the fewest in
  flight; an adapter is loaded on every live server before any request names it. A server that
  stops answering is dropped and its requests go to the others; with none left, the error names
  every URL and how to start a server.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from engines.base import AdapterError, Chat, EngineUnavailable, Generation, SamplingParams, TokenScores

log = logging.getLogger(__name__)

START_HINT = "start one with `skillfold serve --port PORT` (it prints the URL to pass as --engine-url)"


class ServerError(RuntimeError):
    """A vLLM server refused a request (HTTP 4xx/5xx); the message is the server's."""


@dataclass
class _Server:
    url: str
    in_flight: int = 0
    down: str | None = None  # why it was dropped


class VLLMEngine:
    """An `Engine` over vLLM servers that serve one base model (`skillfold serve`)."""

    def __init__(
        self,
        urls: Sequence[str],
        model: str | None = None,
        *,
        concurrency: int = 32,
        timeout_s: float = 900.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        if not urls:
            raise ValueError("a vLLM engine needs at least one server URL (--engine-url)")
        self._servers = [_Server(url.rstrip("/")) for url in urls]
        self.concurrency = concurrency  # requests in flight per server
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=concurrency * len(self._servers) + 8),
        )
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=concurrency * len(self._servers), thread_name_prefix="vllm")
        self.base_name, root = self._probe()
        self.model_name = model or root
        self._tag = f"skillfold-{secrets.token_hex(3)}"  # our adapter names, apart from other clients'
        self._adapter: str | None = None
        self._served = self.base_name  # the model name requests name: the base, or the adapter version
        self._loaded: list[str] = []  # our adapter names on the servers, oldest first
        self._routes: dict[str, str] = {}  # adapter directory -> its name, for per-request adapters
        self.adapter_version = 0  # counts hand-offs, as the HF engine's does
        self._token_cache: dict[str, list[int]] = {}
        self._lora: bool | None = None  # whether the servers run with LoRA (asked once, from /metrics)

    # ------------------------------------------------------------ servers
    @property
    def urls(self) -> list[str]:
        return [server.url for server in self._servers]

    def _probe(self) -> tuple[str, str]:
        """(served base model name, the path or id it was loaded from), the same on every server."""
        bases = {}
        for server in self._servers:
            try:
                response = self._client.get(f"{server.url}/v1/models", timeout=10.0)
                response.raise_for_status()
                cards = response.json()["data"]
            except (httpx.HTTPError, KeyError, ValueError) as error:
                raise EngineUnavailable(
                    f"no vLLM server answers at {server.url} ({type(error).__name__}: {str(error)[:200]}); "
                    f"{START_HINT}"
                ) from None
            base = next((card for card in cards if not card.get("parent")), None)
            if base is None:
                raise EngineUnavailable(f"the server at {server.url} lists no base model; is it a vLLM server?")
            bases[server.url] = (base["id"], base.get("root") or base["id"])
        if len({root for _, root in bases.values()}) > 1:
            listing = ", ".join(f"{url} serves {root}" for url, (_, root) in bases.items())
            raise EngineUnavailable(f"the vLLM servers serve different models ({listing}); pass --engine-url "
                                    "of servers of one model")
        return next(iter(bases.values()))

    def lora_enabled(self) -> bool:
        """Whether the servers were started with LoRA (`vllm:lora_requests_info` in their metrics)."""
        if self._lora is None:
            server = self._live()[0]
            try:
                response = self._client.get(f"{server.url}/metrics", timeout=10.0)
                self._lora = response.status_code == 200 and "vllm:lora_requests_info" in response.text
            except httpx.HTTPError as error:
                self._drop(server, error)
                return self.lora_enabled()
        return self._lora

    def _live(self) -> list[_Server]:
        live = [server for server in self._servers if server.down is None]
        if not live:
            reasons = "; ".join(f"{server.url}: {server.down}" for server in self._servers)
            raise EngineUnavailable(
                f"every vLLM server is down ({reasons}). Nothing stored is lost: {START_HINT}, then run the same "
                "command again (with the same --run-id, a run resumes)"
            )
        return live

    def _drop(self, server: _Server, error: Exception) -> None:
        with self._lock:
            if server.down is None:
                server.down = f"{type(error).__name__}: {str(error)[:160]}"
                log.warning("vLLM server %s stopped answering (%s); its requests go to the others",
                            server.url, server.down)

    def _post(self, path: str, body: dict[str, Any], server: _Server | None = None) -> dict[str, Any]:
        """POST to `server`, or to the least-loaded live one (again to another if it does not answer)."""
        while True:
            with self._lock:
                target = server or min(self._live(), key=lambda candidate: candidate.in_flight)
                target.in_flight += 1
            try:
                response = self._client.post(f"{target.url}{path}", json=body)
            except httpx.TransportError as error:  # refused, reset, timed out: the server is gone
                self._drop(target, error)
                if server is not None:
                    raise EngineUnavailable(f"the vLLM server at {target.url} stopped answering ({error}); "
                                            f"{START_HINT}") from None
                continue
            finally:
                with self._lock:
                    target.in_flight -= 1
            if response.status_code >= 400:
                raise ServerError(f"{target.url}{path} answered {response.status_code}: {response.text[:400]}")
            if "json" not in response.headers.get("content-type", ""):
                return {"text": response.text}  # the LoRA endpoints answer in plain text
            return response.json()

    # ------------------------------------------------------------ prompts
    def encode(self, prompt: Chat) -> list[int]:
        """The prompt's token ids as the server renders it (chat template, generation prompt appended)."""
        key = repr([(message["role"], message["content"]) for message in prompt])
        tokens = self._token_cache.get(key)
        if tokens is None:
            answer = self._post("/tokenize", {"model": self.base_name, "messages": list(prompt),
                                              "add_generation_prompt": True})
            tokens = self._token_cache[key] = list(answer["tokens"])
            if len(self._token_cache) > 4096:
                self._token_cache.pop(next(iter(self._token_cache)))
        return tokens

    def count_tokens(self, prompt: Chat) -> int:
        return len(self.encode(prompt))

    # ------------------------------------------------------------ generation
    def _each(self, call: Callable[[int], Any], count: int, progress: Callable[[int], None] | None) -> list[Any]:
        """`call(i)` for i < count, concurrently; results in order; the first failure cancels the rest."""
        futures = {self._pool.submit(call, index): index for index in range(count)}
        results: list[Any] = [None] * count
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise future.exception()  # type: ignore[misc]
                results[futures[future]] = future.result()
            if progress and done:
                progress(len(done))
        return results

    def generate(
        self,
        prompts: Sequence[Chat],
        params: SamplingParams,
        progress: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        name, version = self._served, self.adapter_version  # one adapter version for the whole call
        return self._generate(prompts, [name] * len(prompts), params, progress, version)

    def generate_routed(
        self,
        prompts: Sequence[Chat],
        adapters: Sequence[str | None],
        params: SamplingParams,
        progress: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        """`generate` with adapter directory `adapters[i]` (None: the base model) for prompt i, named per
        request: each directory is loaded on the servers once, under a name of its own, and stays there
        (vLLM keeps the adapters it is asked for in its LoRA cache, swapping them in as requests need);
        what the engine serves to plain `generate` calls does not change. Generations carry no adapter
        version (they are not a trainer's rollouts)."""
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapters")
        names = [self.base_name if adapter is None else self._route_name(adapter) for adapter in adapters]
        return self._generate(prompts, names, params, progress, None)

    def _route_name(self, path: str) -> str:
        adapter_dir = Path(path).expanduser().resolve()
        if str(adapter_dir) not in self._routes:
            name = f"{self._tag}-route{len(self._routes) + 1}"
            self._load_on_servers(adapter_dir, name)
            self._routes[str(adapter_dir)] = name
        return self._routes[str(adapter_dir)]

    def _generate(self, prompts: Sequence[Chat], names: Sequence[str], params: SamplingParams,
                  progress: Callable[[int], None] | None, version: int | None) -> list[Generation]:
        def complete(index: int) -> Generation:
            body = {
                "model": names[index],
                "messages": list(prompts[index]),
                "max_tokens": params.max_new_tokens,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "seed": params.seed + index,
                "stop": list(params.stop),
                "min_tokens": params.min_tokens,
                "logprobs": True,
                "return_tokens_as_token_ids": True,
                "add_generation_prompt": True,
            }
            answer = self._post("/v1/chat/completions", body)
            choice = answer["choices"][0]
            tokens = (choice.get("logprobs") or {}).get("content") or []
            return Generation(
                text=choice["message"].get("content") or "",
                token_ids=[_token_id(token["token"]) for token in tokens],
                logprobs=[float(token["logprob"]) for token in tokens],
                prompt_tokens=int(answer["usage"]["prompt_tokens"]),
                finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
                adapter_version=version,
            )

        return self._each(complete, len(prompts), progress)

    # ------------------------------------------------------------ scoring
    def score(
        self, prompts: Sequence[Chat], completions: Sequence[Sequence[int]], top_k: int = 0
    ) -> list[TokenScores]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        return self.score_ids([self.encode(prompt) for prompt in prompts], completions, top_k=top_k)

    def score_ids(
        self, prompt_ids: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], top_k: int = 0
    ) -> list[TokenScores]:
        """`score` on already tokenized prompts."""
        if self.lora_enabled():
            # vLLM computes prompt log-probs with the LoRA logits mapping of sampled rows, not of prompt
            # rows: it crashes the server on CPU (einsum size mismatch) and drops an lm_head delta on GPU
            # (vllm-project/vllm issues 29955, 51594). A teacher server needs no adapter.
            raise ServerError(
                f"scoring needs a vLLM server started without LoRA (prompt log-probs with LoRA on crash vLLM "
                f"{self.urls[0]}; vllm-project/vllm#29955): start a teacher server with `skillfold serve --no-lora`"
            )
        name = self._served

        def one(index: int) -> TokenScores:
            prompt, completion = list(prompt_ids[index]), [int(token) for token in completions[index]]
            if not completion:
                return TokenScores(token_ids=[], logprobs=[])
            body = {"model": name, "prompt": prompt + completion, "max_tokens": 1, "temperature": 0.0,
                    "prompt_logprobs": top_k}
            rows = self._post("/v1/completions", body)["choices"][0]["prompt_logprobs"][len(prompt):]
            logprobs, topk_ids, topk_logprobs = [], [], []
            for token, row in zip(completion, rows, strict=True):
                logprobs.append(float(row[str(token)]["logprob"]))
                ranked = sorted(((entry["rank"], int(key), float(entry["logprob"])) for key, entry in row.items()
                                 if entry.get("rank") is not None and entry["rank"] <= top_k))
                topk_ids.append([key for _, key, _ in ranked[:top_k]])
                topk_logprobs.append([value for _, _, value in ranked[:top_k]])
            return TokenScores(token_ids=completion, logprobs=logprobs,
                               topk_ids=topk_ids if top_k else None, topk_logprobs=topk_logprobs if top_k else None)

        return self._each(one, len(prompt_ids), None)

    # ------------------------------------------------------------ adapters
    @property
    def adapter(self) -> str | None:
        return self._adapter

    def load_adapter(self, path: str) -> None:
        """Serve a PEFT LoRA adapter directory from the next request on, on every live server."""
        adapter_dir = Path(path).expanduser().resolve()
        version = self.adapter_version + 1
        name = f"{self._tag}-v{version}"
        self._load_on_servers(adapter_dir, name)
        self._served, self._adapter, self.adapter_version = name, str(adapter_dir), version
        self._loaded.append(name)
        while len(self._loaded) > 2:  # the one before stays for requests still in flight on it
            self._unload(self._loaded.pop(0))

    def _load_on_servers(self, adapter_dir: Path, name: str) -> None:
        """Load a PEFT adapter directory on every live server under `name` (AdapterError naming the fix)."""
        if not (adapter_dir / "adapter_config.json").is_file():
            raise AdapterError(
                f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json); pass a fold's adapter "
                "(a directory under <home>/adapters), latest, or none"
            )
        if not self.lora_enabled():
            raise AdapterError(f"the vLLM server at {self.urls[0]} runs without LoRA, so it cannot serve adapter "
                               f"{adapter_dir}; start it with `skillfold serve` (LoRA is on unless --no-lora)")
        for server in self._live():
            try:
                self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(adapter_dir)}, server=server)
            except EngineUnavailable:
                continue  # dropped; the others serve on
            except ServerError as error:
                raise AdapterError(
                    f"the vLLM server at {server.url} cannot load adapter {adapter_dir}: {error}. Start the server "
                    "with a large enough --max-lora-rank (skillfold serve does), or pass another adapter."
                ) from None
        self._live()  # none left: say so

    def unload_adapter(self) -> None:
        """Serve the base model from the next request on."""
        if self._adapter is None:
            return
        self._served, self._adapter = self.base_name, None
        self.adapter_version += 1
        while self._loaded:
            self._unload(self._loaded.pop(0))

    def _unload(self, name: str) -> None:
        for server in self._live():
            try:
                self._post("/v1/unload_lora_adapter", {"lora_name": name}, server=server)
            except (EngineUnavailable, ServerError) as error:  # a server that lost it already: nothing to free
                log.debug("unloading %s from %s: %s", name, server.url, error)

    def close(self) -> None:
        for name in self._routes.values():  # the per-request adapters this client loaded
            self._unload(name)
        self._routes.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


def _token_id(token: str) -> int:
    """A token as `return_tokens_as_token_ids` writes it: `token_id:<id>`."""
    prefix, _, number = token.rpartition(":")
    if prefix != "token_id" or not number.isdigit():
        raise ServerError(f"the server returned token {token!r}, not token ids; is it a vLLM server?")
    return int(number)
