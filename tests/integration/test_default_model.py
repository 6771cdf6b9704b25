"""The real embedded default (SmolLM2-135M-Instruct): pull, engine agreement, CLI eval."""

import json
import time

import pytest
import torch
from typer.testing import CliRunner

from engines.base import SamplingParams
from engines.models import default_model_dir, pull_default_model

pytestmark = pytest.mark.integration

PROMPTS = [
    [{"role": "user", "content": "How many legs does a spider have? Respond with only the final answer."}],
    [{"role": "user", "content": "What is 17 + 25?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Spell 'house' backwards, please."}],
]


def test_pull_is_idempotent_and_fast_the_second_time():
    started = time.perf_counter()
    path = pull_default_model()
    assert time.perf_counter() - started < 2.0
    assert path == default_model_dir()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_generate_and_score_agree_with_a_plain_forward(default_engine):
    outputs = default_engine.generate(PROMPTS, SamplingParams(max_new_tokens=16))
    scores = default_engine.score(PROMPTS, [output.token_ids for output in outputs])
    for prompt, output, scored in zip(PROMPTS, outputs, scores, strict=True):
        ids = default_engine.encode(prompt) + output.token_ids
        with torch.no_grad():
            log_probs = torch.log_softmax(default_engine.model(torch.tensor([ids])).logits[0].float(), -1)
        start = len(ids) - len(output.token_ids)
        reference = [log_probs[start + i - 1, token].item() for i, token in enumerate(output.token_ids)]
        assert output.logprobs == pytest.approx(reference, abs=1e-4)
        assert scored.logprobs == pytest.approx(reference, abs=1e-4)
        alone = default_engine.generate([prompt], SamplingParams(max_new_tokens=16))[0]
        assert alone.token_ids == output.token_ids


def test_spider_has_eight_legs(default_engine):
    output = default_engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=16))[0]
    assert "8" in output.text


def test_cli_eval_is_honest_and_repeatable(tmp_path):
    from agent.cli import app

    runner = CliRunner()
    arguments = ["eval", "--env", "rg:leg_counting", "--items", "8", "--json", "--home", str(tmp_path)]
    first = runner.invoke(app, arguments)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["env"] == "rg:leg_counting" and summary["items"] == 8
    assert 0.0 <= summary["accuracy"] <= 1.0
    run_dir = summary["run_dir"]
    trajectories = [json.loads(line) for line in open(f"{run_dir}/trajectories.jsonl")]
    assert len(trajectories) == 8
    assert sum(t["success"] for t in trajectories) / 8 == summary["accuracy"]
    second = runner.invoke(app, arguments)
    assert json.loads(second.stdout.strip().splitlines()[-1])["accuracy"] == summary["accuracy"]
