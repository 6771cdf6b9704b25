"""GRPO (learners/grpo.py): the loss and advantages by hand, learning a rewarded behaviour on the tiny model,
multi-turn masks with tools, exact resume, `skillfold train --method grpo`, and the experiment's grpo arm."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engines.base import SamplingParams
from engines.hf import HFEngine
from envs import make_family
from envs.base import Message, StepResult, Trajectory, Turn
from learners.fold import FoldConfig, FoldItem
from learners.grpo import (
    SHARED_WITH_FOLD,
    GrpoConfig,
    GrpoError,
    GrpoSettings,
    grpo,
    train_items,
    trained_view,
)
from learners.losses import chunked_policy_gradient, group_advantages, policy_gradient_loss
from learners.rollout import run_episodes
from tests.tiny import build_model


# ------------------------------------------------------------------------------ advantages
def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 0.0, 0.0])
    advantages, informative = group_advantages(rewards, 4, eps=0.0)
    std = math.sqrt(((0.5 ** 2) * 4) / 3)  # the sample std of {1, 0, 0, 1}
    assert advantages[:4].tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std])
    assert advantages[4:8].tolist() == [0.0, 0.0, 0.0, 0.0]  # equal rewards: no signal, exactly 0
    # {1, 0, 0, 0}: mean 0.25, sample std 0.5
    assert advantages[8:].tolist() == pytest.approx([0.75 / 0.5, -0.25 / 0.5, -0.25 / 0.5, -0.25 / 0.5])
    assert informative.tolist() == [True, False, True]
    centred, _ = group_advantages(rewards, 4, scale=False)
    assert centred[8:].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    # rewards a rounding apart are equal; eps keeps a tiny spread finite
    same, flags = group_advantages(torch.tensor([0.1 + 0.2, 0.3, 2.0, 2.0 + 1e-7], dtype=torch.float64), 2)
    assert same[:2].tolist() == [0.0, 0.0] and flags.tolist() == [False, True]
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(rewards, 1)
    with pytest.raises(ValueError, match="whole groups"):
        group_advantages(rewards, 5)


# ------------------------------------------------------------------------------------ loss
def test_policy_gradient_loss_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], requires_grad=True)
    behaviour = torch.tensor([[-1.0, -2.5, math.nan, -2.0]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, metrics = policy_gradient_loss(logprobs, advantages, mask, behaviour_logprobs=behaviour,
                                         clip_low=0.2, clip_high=0.28)
    # token 0: r = 1, -A·r = -1; token 1: r = e^0.5 = 1.6487 > 1.28, A > 0: clipped to 1.28 -> -1.28;
    # token 2: behaviour unknown, r = 1, A = -1 -> +1; token 3 masked
    assert loss.item() == pytest.approx((-1.0 - 1.28 + 1.0) / 3)
    assert metrics["clip_fraction"] == pytest.approx(1 / 3)
    assert metrics["ratio"] == pytest.approx((1 + math.exp(0.5) + 1) / 3)
    assert metrics["kl"] is None
    loss.backward()
    grad = logprobs.grad[0]
    # descent raises log π where A > 0 (grad < 0), lowers it where A < 0; clipped and masked tokens get none
    assert grad[0].item() == pytest.approx(-1 / 3) and grad[1].item() == 0.0
    assert grad[2].item() == pytest.approx(1 / 3) and grad[3].item() == 0.0
    # a ratio below 1 - ε_low with A < 0 is clipped too; with A > 0 it is not (min keeps the unclipped)
    low = torch.tensor([[-2.0, -2.0]], requires_grad=True)
    loss, metrics = policy_gradient_loss(low, torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2),
                                         behaviour_logprobs=torch.tensor([[-1.0, -1.0]]), clip_low=0.2)
    ratio = math.exp(-1.0)
    assert loss.item() == pytest.approx((0.8 - ratio) / 2) and metrics["clip_fraction"] == 0.5
    loss.backward()
    assert low.grad[0, 0].item() == 0.0 and low.grad[0, 1].item() == pytest.approx(-ratio / 2)


def test_the_k3_kl_term_by_hand_pulls_toward_the_reference():
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    reference = torch.tensor([[-1.5, -1.0]])
    loss, metrics = policy_gradient_loss(logprobs, torch.zeros(1, 2), torch.ones(1, 2),
                                         reference_logprobs=reference, kl_coef=0.1)
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    assert metrics["kl"] == pytest.approx(sum(k3) / 2) and loss.item() == pytest.approx(0.1 * sum(k3) / 2)
    loss.backward()
    # d k3 / d log π = 1 - exp(δ): above the reference (token 0) descent lowers log π, below it raises it
    assert logprobs.grad[0].tolist() == pytest.approx([0.1 * (1 - math.exp(-0.5)) / 2, 0.1 * (1 - math.e) / 2])
    assert logprobs.grad[0, 0] > 0 > logprobs.grad[0, 1]


def test_the_chunked_loss_equals_the_plain_one_in_value_gradient_and_metrics():
    torch.manual_seed(0)
    hidden = (0.5 * torch.randn(2, 5, 8)).requires_grad_()
    weight = (0.5 * torch.randn(11, 8)).requires_grad_()
    ids = torch.randint(0, 11, (2, 5))
    advantages = torch.randn(2, 5)
    mask = torch.rand(2, 5) > 0.3
    behaviour = torch.randn(2, 5).clamp(max=-0.1) - 2.0
    behaviour[0, 1] = math.nan
    reference = 0.3 * torch.randn(2, 5) - 2.4
    settings = dict(behaviour_logprobs=behaviour, reference_logprobs=reference, kl_coef=0.05, clip_low=0.2,
                    clip_high=0.28)
    loss, metrics = chunked_policy_gradient(hidden, weight, ids, advantages, mask, chunk_size=3, **settings)
    loss.backward()
    chunked = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    logprobs = torch.log_softmax(hidden @ weight.T, -1).gather(-1, ids[..., None])[..., 0]
    plain, plain_metrics = policy_gradient_loss(logprobs, advantages, mask, **settings)
    plain.backward()
    assert loss.item() == pytest.approx(plain.item(), abs=1e-6)
    assert torch.allclose(chunked[0], hidden.grad, atol=1e-6) and torch.allclose(chunked[1], weight.grad, atol=1e-6)
    assert metrics == pytest.approx(plain_metrics)
    assert 0 < metrics["clip_fraction"] < 1 and metrics["kl"] > 0  # both branches ran


# ------------------------------------------------------------------------------- config
def test_grpo_shares_the_folds_trainer_settings_and_can_match_its_compute():
    fold, mine = FoldConfig(), GrpoConfig()
    for name in SHARED_WITH_FOLD:  # same defaults: a run left at its defaults costs what a default fold costs
        assert getattr(mine, name) == getattr(fold, name), name
    assert mine.rollouts_per_step == fold.batch_size
    other = FoldConfig(steps=7, batch_size=12, lora_rank=4, seed=3, sampling={"temperature": 1.0, "max_new_tokens": 9})
    like = GrpoConfig.like_fold(other, GrpoSettings(group_size=3, kl_coef=0.01))
    assert (like.steps, like.rollouts_per_step, like.prompts_per_step, like.lora_rank, like.seed) == (7, 12, 4, 4, 3)
    assert like.sampling == other.sampling and like.kl_coef == 0.01
    with pytest.raises(ValueError, match="not a whole number of GRPO groups of 5"):
        GrpoConfig.like_fold(other, GrpoSettings(group_size=5))


# --------------------------------------------------------------------------- learning
class LetterEnvironment:
    """Every turn is rewarded 1/turns when the action holds the letter e (the tiny model: ~35% of turns)."""

    def __init__(self, family: str, split: str, index: int, turns: int) -> None:
        self.family, self.item_id, self.turns, self.turn, self.index = family, f"{split}-{index}", turns, 0, index

    def initial_observation(self):
        return [Message(role="user", content=f"Say the word: item {self.index}")]

    def step(self, action: str) -> StepResult:
        self.turn += 1
        done = self.turn == self.turns
        return StepResult(observation=[] if done else [Message(role="user", content="again")],
                          reward=1.0 / self.turns if "e" in action else 0.0, done=done)


class LetterFamily:
    success_threshold = 1.0 - 1e-9

    def __init__(self, turns: int = 2) -> None:
        self.turns, self.name = turns, f"letter-e:{turns}"

    def split_size(self, split) -> int:
        return 64

    def make(self, split, index):
        return LetterEnvironment(self.name, split, index, self.turns)


def make_engine(tokenizer):
    return HFEngine(build_model(tokenizer), tokenizer, model_name="tiny", batch_size=16)


def mean_reward(engine, family, items: int = 64) -> float:
    environments = [family.make("eval", index) for index in range(items)]
    played = run_episodes(engine, environments, SamplingParams(temperature=1.0, max_new_tokens=6, seed=123),
                          split="eval", max_turns=family.turns)
    return sum(turn.reward for trajectory in played for turn in trajectory.turns) / items


def config(**overrides) -> GrpoConfig:
    values = dict(steps=12, prompts_per_step=4, group_size=4, learning_rate=1e-2, lora_rank=4, lora_alpha=8,
                  sampling={"temperature": 1.0, "max_new_tokens": 6}, max_turns=2, checkpoint_every=4)
    values.update(overrides)
    return GrpoConfig(**values)


def test_grpo_raises_the_reward_of_a_rewarded_behaviour_over_multi_turn_episodes(tiny_tokenizer, tmp_path):
    engine, family = make_engine(tiny_tokenizer), LetterFamily(turns=2)
    before = mean_reward(engine, family)
    result = grpo(engine, {family.name: family}, train_items({family.name: family}, 16), config(), tmp_path / "run")
    after = mean_reward(engine, family)
    assert after > before + 0.1, (before, after)
    assert engine.adapter == result.adapter and Path(result.adapter, "adapter_config.json").is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == list(range(1, 13))
    assert (result.optimizer_steps, result.rollouts) == (12, 12 * 16)
    assert [record["rollouts"] for record in records] == [16 * step for step in range(1, 13)]
    assert result.zero_variance_groups == sum(record["zero_variance_groups"] for record in records)
    assert all(record["turns"] == 2 and record["groups"] == 4 for record in records)
    for record in records:  # on-policy: every ratio the engine's log-probs give is 1, none clipped
        if record["trained_tokens"]:
            assert record["ratio"] == pytest.approx(1.0, abs=1e-4) and record["clip_fraction"] == 0.0
            assert 0 < record["behaviour_known"] <= 1
    # the reference is the model the run started from: no distance at step 1, then the policy moves away
    assert abs(records[0]["kl"]) < 1e-5 and records[-1]["kl"] > 1e-3


def test_the_kl_term_holds_the_policy_near_the_reference(tiny_tokenizer, tmp_path):
    family = LetterFamily(turns=1)
    items = train_items({family.name: family}, 16)
    drift = {}
    for kl_coef in (0.0, 1.0):
        result = grpo(make_engine(tiny_tokenizer), {family.name: family}, items,
                      config(steps=6, max_turns=1, kl_coef=kl_coef, learning_rate=2e-2), tmp_path / f"kl-{kl_coef}")
        drift[kl_coef] = result.kl_last
    assert drift[1.0] < drift[0.0] * 0.8, drift


# ------------------------------------------------------------------------ multi-turn masks
def test_only_the_assistants_tokens_of_every_turn_are_trained_never_tool_results(tiny_tokenizer):
    end = tiny_tokenizer.eos_token_id

    def ids(text: str) -> list[int]:
        return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]

    first, second = "CALC(12 * 7)", "ANSWER: 84"
    trajectory = Trajectory(
        env="toy+calc", item_id="train-0", split="train",
        prompt=[Message(role="system", content="tools"), Message(role="user", content="what is 12 * 7 ?")],
        turns=[Turn(action=first, observation=[Message(role="user", content="Result: 84")],
                    token_ids=ids(first) + [end], logprobs=[-0.5] * (len(ids(first)) + 1)),
               Turn(action=second, token_ids=ids(second) + [end], logprobs=[-0.25] * (len(ids(second)) + 1),
                    reward=1.0, done=True)],
    )
    view = trained_view(tiny_tokenizer, {end}, trajectory)
    trained = [view.input_ids[p] for p in view.trained_positions]
    assert tiny_tokenizer.decode(trained) == f"{first}<|im_end|>{second}<|im_end|>"
    assert "Result: 84" in tiny_tokenizer.decode(view.input_ids)  # the tool's result is context only
    assert [view.behaviour[p] for p in view.trained_positions] == [-0.5] * (len(ids(first)) + 1) + [-0.25] * (
        len(ids(second)) + 1)
    # a first turn sampled as another split of its text: the engine prompted turn 2 with the text re-tokenised,
    # so turn 2's behaviour log-probs are of another context than the view's: unknown, not a wrong ratio
    odd = [token for character in first for token in ids(character)]
    assert odd != ids(first) and tiny_tokenizer.decode(odd) == first
    split = trajectory.model_copy(deep=True)
    split.turns[0].token_ids, split.turns[0].logprobs = odd + [end], [-0.5] * (len(odd) + 1)
    view = trained_view(tiny_tokenizer, {end}, split)
    behaviour = [view.behaviour[p] for p in view.trained_positions]
    assert behaviour[: len(odd) + 1] == [-0.5] * (len(odd) + 1)
    assert all(math.isnan(value) for value in behaviour[len(odd) + 1:])


def test_a_real_tool_family_trains_its_actions_and_nothing_else(tiny_tokenizer):
    engine = make_engine(tiny_tokenizer)
    family = make_family("toy:2+calc")
    played = run_episodes(engine, [family.make("train", index) for index in range(6)],
                          SamplingParams(temperature=1.0, max_new_tokens=6), split="train", max_turns=3)
    for trajectory in played:
        view = trained_view(tiny_tokenizer, engine.stop_ids, trajectory)
        text = tiny_tokenizer.decode([view.input_ids[p] for p in view.trained_positions])
        observations = [message.content for turn in trajectory.turns for message in turn.observation]
        assert len(trajectory.turns) > 1 and observations  # tool results or the next turn came back
        for turn in trajectory.turns:
            assert turn.action in text
        for observation in observations:
            assert observation not in text


# ----------------------------------------------------------------------------------- resume
class Killed(RuntimeError):
    pass


def test_a_killed_grpo_run_resumes_to_the_same_adapter(tiny_tokenizer, tmp_path):
    family = LetterFamily(turns=2)
    items = train_items({family.name: family}, 16)
    run = dict(families={family.name: family}, items=items, config=config(steps=5, checkpoint_every=2, kl_coef=0.1))
    straight = grpo(make_engine(tiny_tokenizer), run_dir=tmp_path / "straight", **run)

    def kill_at_four(record):
        if record["step"] == 4:
            raise Killed()

    with pytest.raises(Killed):
        grpo(make_engine(tiny_tokenizer), run_dir=tmp_path / "killed", on_step=kill_at_four, **run)
    assert (tmp_path / "killed" / "step-000002" / "state.json").is_file()
    assert not (tmp_path / "killed" / "step-000004").exists()
    resumed = grpo(make_engine(tiny_tokenizer), run_dir=tmp_path / "killed", resume=True, **run)
    assert resumed.resumed_from == 2 and (resumed.rollouts, resumed.optimizer_steps) == (straight.rollouts, 5)
    expected = load_file(str(Path(straight.adapter) / "adapter_model.safetensors"))
    actual = load_file(str(Path(resumed.adapter) / "adapter_model.safetensors"))
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    lines = lambda name: [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "handoff_seconds")}  # noqa: E731
                          for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert lines("killed") == lines("straight")


def test_bad_prompts_are_clear_errors(tiny_tokenizer, tmp_path):
    family = LetterFamily()
    engine = make_engine(tiny_tokenizer)
    with pytest.raises(GrpoError, match="no training prompts"):
        grpo(engine, {family.name: family}, [], config(), tmp_path / "a")
    with pytest.raises(GrpoError, match="held-out"):
        grpo(engine, {family.name: family}, [FoldItem(family=family.name, index=0, split="eval")], config(),
             tmp_path / "b")
    with pytest.raises(GrpoError, match="no context"):
        grpo(engine, {family.name: family}, [FoldItem(family=family.name, index=0, anchor=True)], config(),
             tmp_path / "c")
    with pytest.raises(GrpoError, match="none left to train on; lower probes"):
        train_items({family.name: family}, 4, probes=64)


# -------------------------------------------------------------------------------------- CLI
TRAIN = ["train", "--method", "grpo", "--env", "toy:2", "--run-id", "g", "--steps", 2, "--json",
         "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.sampling.max_new_tokens=4", "grpo.max_turns=2",
         "grpo.checkpoint_every=1", "grpo.lora_rank=2", "items_per_family=4", "probes=0"]


def test_train_method_grpo_end_to_end_on_the_tiny_model(model_dir, tmp_path, monkeypatch):
    from tests.unit.test_cli import assert_user_error, flat, invoke, last_json

    monkeypatch.setattr(torch, "set_num_threads", lambda _: None)  # the CLI's engine on conftest's one thread
    home = tmp_path / "home"
    result = last_json(invoke(*TRAIN, "--model", model_dir, "--home", home))
    registered = home / "adapters" / "g"
    assert result["adapter"] == str(registered) and (registered / "adapter_config.json").is_file()
    assert (home / "adapters" / "LATEST").read_text().strip() == "g"  # `--adapter latest` serves it
    assert (result["optimizer_steps"], result["rollouts"], result["group_size"]) == (2, 8, 2)
    run_dir = home / "train" / "g"
    saved = json.loads((run_dir / "config.json").read_text())  # the overrides are saved with the run
    assert saved["method"] == "grpo" and saved["grpo"]["group_size"] == 2 and saved["grpo"]["steps"] == 2
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((run_dir / "result.json").read_text())["adapter"] == str(registered)
    again = invoke(*TRAIN, "--model", model_dir, "--home", home, "--resume")
    assert last_json(again) == result and "has finished already" in flat(again.stderr)
    assert_user_error(invoke(*TRAIN, "--model", model_dir, "--home", home), "registered already", "--resume")
    # an eval with --adapter latest loads it
    evaluated = last_json(invoke("eval", "--env", "toy:2", "--items", 2, "--model", model_dir, "--home", home,
                                 "--adapter", "latest", "--json"))
    assert evaluated


@pytest.mark.parametrize("args, fragments", [
    (["--method", "ppo", "--env", "toy"], ["unknown method 'ppo'", "grpo (skillfold train)", "opsd (skillfold fold)"]),
    (["--method", "opsd", "--env", "toy"], ["skillfold fold --method opsd", "takes grpo"]),
    (["--method", "grpo"], ["--env"]),
    (["--method", "grpo", "--env", "toy", "--resume"], ["--resume needs the --run-id"]),
    (["--method", "grpo", "--env", "toy", "grpo.group_size=1"], ["grpo.group_size", "greater than or equal to 2"]),
    (["--method", "grpo", "--env", "nope:1"], ["unknown environment 'nope:1'"]),
    (["--method", "grpo", "--env", "toy", "probes=16"], ["none left to train on; lower probes"]),
])
def test_train_bad_input_exits_2_naming_the_fix(args, fragments, tmp_path):
    from tests.unit.test_cli import assert_user_error, invoke

    assert_user_error(invoke("train", *args, "--home", tmp_path / "home"), *fragments)
    assert not (tmp_path / "home" / "train").exists()  # nothing written on bad input


# ------------------------------------------------------------------------------ experiment
def test_the_experiments_grpo_arm_trains_each_phase_with_the_folds_compute_and_resumes(tmp_path):
    from agent.config import ConfigError
    from agent.experiment import ExperimentConfig, run_experiment
    from agent.report import write_report
    from learners.grpo import GrpoResult
    from memory import HashingEmbedding
    from tests.unit.test_evolve import Killed as WorldKilled
    from tests.unit.test_evolve import World, settings
    from tests.unit.test_experiment import _adapter, forgetful_fold, forgetful_sft

    calls = []

    def scripted_grpo(engine, families, items, config, run_dir, *, resume=False, base=None, on_step=None):
        """A stand-in for learners.grpo.grpo: the adapter it writes knows every word."""
        calls.append({"families": sorted(families), "start": engine.adapter, "config": config, "resume": resume,
                      "items": items, "run_dir": Path(run_dir).name})
        adapter = _adapter(run_dir, True, engine)
        return GrpoResult(steps=config.steps, optimizer_steps=config.steps, rollouts=config.steps * config.rollouts_per_step,
                          group_size=config.group_size, prompts_per_step=config.prompts_per_step, reward_first=0.0,
                          reward_last=1.0, success_first=0.0, success_last=1.0, loss_first=0.1, loss_last=0.0,
                          kl_last=0.0, zero_variance_groups=0, generated_tokens=40, adapter=str(adapter),
                          run_dir=str(run_dir), seconds=0.0)

    stream = settings(assess_items=4, fold=FoldConfig(steps=3, batch_size=4))
    experiment = ExperimentConfig(stream=stream, seeds=[0], arms=["base", "fold", "grpo"], eval_items=6,
                                  grpo=GrpoSettings(group_size=2, kl_coef=0.02))

    def run(out, world):
        return run_experiment(world.engine, experiment, out, embedding=HashingEmbedding(), fold_fn=forgetful_fold,
                              sft_fn=forgetful_sft, grpo_fn=scripted_grpo)

    metrics = run(tmp_path / "straight", World())
    units = {(unit.arm, unit.phase): unit for unit in metrics.units}
    assert [call["families"] for call in calls] == [["toy:1"], ["toy:2"]]
    for call in calls:  # the fold's steps and rollouts per step, GRPO's own settings, train prompts alone
        assert (call["config"].steps, call["config"].rollouts_per_step, call["config"].kl_coef) == (3, 4, 0.02)
        assert all(item.split == "train" and not item.context and not item.anchor for item in call["items"])
        assert max(item.index for item in call["items"]) < 16 - stream.loop.probes
    home = tmp_path / "straight" / "homes" / "grpo-seed0"
    assert calls[0]["start"] is None and calls[1]["start"] == str(home / "adapters" / "grpo-p0")  # continued
    for phase in (0, 1):
        grpo_unit = units[("grpo", phase)]
        assert (grpo_unit.train.optimizer_steps, grpo_unit.train.rollouts) == (3, 12)
        assert grpo_unit.train.episodes == 0 and not any(cell.memory for cell in grpo_unit.evals)  # memory off
        assert all(cell.successes == cell.items for cell in grpo_unit.evals)  # its adapter was served
        assert (units[("fold", phase)].train.optimizer_steps, units[("fold", phase)].train.rollouts) == (3, 12)
    write_report(tmp_path / "straight")
    report = (tmp_path / "straight" / "report.md").read_text()
    assert "## Training compute" in report and "| grpo | 2 | toy:2 | 3 | 12 | 40 |" in report
    assert "| fold | 1 | toy:1 | 3 | 12 |" in report
    from agent.audit import audit_experiment

    audit = audit_experiment(tmp_path / "straight")  # --check: every cell recounts, every episode replays
    assert audit.problems == [] and audit.report_checked

    # killed in the second phase's GRPO: finished units are kept, the phase resumes (its run continues)
    calls.clear()
    out = tmp_path / "killed"
    original = scripted_grpo

    def killed_in_phase_two(engine, families, items, config, run_dir, **kwargs):
        if Path(run_dir).name == "grpo-p1":
            raise WorldKilled()
        return original(engine, families, items, config, run_dir, **kwargs)

    with pytest.raises(WorldKilled):
        run_experiment(World().engine, experiment, out, embedding=HashingEmbedding(), fold_fn=forgetful_fold,
                       sft_fn=forgetful_sft, grpo_fn=killed_in_phase_two)
    calls.clear()
    resumed = run(out, World())
    assert [call["run_dir"] for call in calls] == ["grpo-p1"] and calls[0]["resume"] is True
    outcome = lambda m: [(u.arm, u.phase, [(e.family, e.successes) for e in u.evals], u.train.model_dump())  # noqa: E731
                         for u in m.units]
    assert outcome(resumed) == outcome(metrics)

    with pytest.raises(ConfigError, match="not a whole number of GRPO groups of 3"):
        run_experiment(World().engine, experiment.model_copy(update={"grpo": GrpoSettings(group_size=3)}),
                       tmp_path / "bad", embedding=HashingEmbedding(), grpo_fn=scripted_grpo)


def test_the_grpo_arm_runs_the_real_trainer_on_the_tiny_model(tiny_tokenizer, tmp_path):
    from agent.experiment import ExperimentConfig, run_experiment
    from memory import HashingEmbedding
    from tests.unit.test_evolve import settings

    starts = []

    def recorded(engine, *args, **kwargs):
        starts.append(engine.adapter)
        return grpo(engine, *args, **kwargs)

    stream = settings(assess_items=2, fold=FoldConfig(steps=2, batch_size=4, lora_rank=2, max_turns=2,
                                                      sampling={"temperature": 1.0, "max_new_tokens": 4}))
    config = ExperimentConfig(stream=stream, seeds=[0], arms=["grpo"], eval_items=4, grpo=GrpoSettings(group_size=2))
    metrics = run_experiment(make_engine(tiny_tokenizer), config, tmp_path / "out", embedding=HashingEmbedding(),
                             grpo_fn=recorded)
    adapters = tmp_path / "out" / "homes" / "grpo-seed0" / "adapters"
    assert starts == [None, str(adapters / "grpo-p0")]  # phase 2 continues phase 1's adapter
    assert (adapters / "LATEST").read_text().strip() == "grpo-p1"
    for unit in metrics.units:
        assert (unit.train.optimizer_steps, unit.train.rollouts) == (2, 8) and unit.train.rl_generated_tokens > 0
        assert unit.generated_tokens >= unit.train.rl_generated_tokens
    for phase in (0, 1):  # the toy's words are out of the tiny model's reach: every group is flat, and counted
        records = [json.loads(line) for line in (tmp_path / "out" / "homes" / "grpo-seed0" / "grpo" / f"grpo-p{phase}"
                                                 / "metrics.jsonl").read_text().splitlines()]
        assert [(r["groups"], r["zero_variance_groups"], r["reward_mean"]) for r in records] == [(2, 2, 0.0)] * 2
