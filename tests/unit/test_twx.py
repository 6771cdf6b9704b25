"""TextWorldExpress families (`twx:<game>`) on the real game: the package's jar in a real Java VM.

Skipped only where Java 17 or the package is missing and SKILLFOLD_REQUIRE_TWX is not set (.ci/run sets
it after installing Java, so there these tests must run).
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import pytest

from envs.base import EnvSpecError, Trajectory, Turn

REQUIRED = bool(os.environ.get("SKILLFOLD_REQUIRE_TWX"))


def _missing() -> str | None:
    try:
        import textworld_express  # noqa: F401
    except ImportError:
        return "the textworld-express package is not installed (pip install textworld-express)"
    from envs.textworld_express import java_command

    try:
        java_command()
    except EnvSpecError as error:
        return str(error)
    return None


MISSING = _missing()
if MISSING:
    if REQUIRED:  # CI: .ci/run installs Java 17, so this must run
        raise RuntimeError(f"SKILLFOLD_REQUIRE_TWX is set but TextWorldExpress cannot run: {MISSING}")
    pytest.skip(f"TextWorldExpress cannot run here: {MISSING}", allow_module_level=True)

from agent.skills import exemplar_from, exemplar_messages  # noqa: E402
from engines.base import SamplingParams  # noqa: E402
from envs import make_family  # noqa: E402
from envs.registry import TWX_GAMES  # noqa: E402
from envs.textworld_express import (  # noqa: E402
    EXEMPLAR_CHARS,
    VALID_HEADER,
    TextWorldExpressEnvironment,
    gateway,
    match_action,
)
from learners.rollout import run_episodes  # noqa: E402
from learners.views import episode_views, sampled_ids  # noqa: E402
from tests.fakes import ScriptedEngine  # noqa: E402


def valid_actions(content: str) -> list[str]:
    line = next(line for line in content.splitlines() if line.startswith(VALID_HEADER))
    return line[len(VALID_HEADER):].split(", ")


def play(environment: TextWorldExpressEnvironment, actions) -> Trajectory:
    """Play `actions` (until the game ends) and keep the episode as the rollout would."""
    trajectory = Trajectory(env=environment.family, item_id=environment.item_id, split="eval",
                            prompt=environment.initial_observation())
    for action in actions:
        result = environment.step(action)
        trajectory.turns.append(Turn(action=action, observation=result.observation, reward=result.reward,
                                     done=result.done, info=result.info))
        if result.done:
            break
    environment.close()
    trajectory.reward = sum(turn.reward for turn in trajectory.turns)
    trajectory.success = trajectory.reward >= 1.0 and trajectory.turns[-1].done
    return trajectory


@pytest.fixture(scope="module")
def families():
    return {game: make_family(f"twx:{game}") for game in TWX_GAMES}


# ---------------------------------------------------------------------------- every game plays
@pytest.mark.parametrize("game", TWX_GAMES)
def test_every_game_makes_an_episode_that_lists_its_valid_actions(families, game):
    family = families[game]
    assert family.name == f"twx:{game}" and family.success_threshold == 1.0
    assert family.split_size("train") == family.split_size("eval") == 1000
    environment = family.make("eval", 0)
    [message] = environment.initial_observation()
    assert message.role == "user"
    listed = valid_actions(message.content)
    assert listed and listed == sorted(set(listed)) and listed == environment.valid
    assert "look around" in listed or game == "simonsays"
    result = environment.step(listed[0])  # a listed action is taken by the game, and the next list comes back
    assert result.info["action"] == listed[0] and "invalid" not in result.info
    if not result.done:
        assert valid_actions(result.observation[0].content)
    environment.close()


@pytest.mark.parametrize("game", TWX_GAMES)
def test_the_gold_path_wins_with_the_games_reward(families, game):
    environment = families[game].make("eval", 1)
    gold = environment.gold_actions()
    trajectory = play(environment, gold)
    last = trajectory.turns[-1]
    assert last.done and last.info["tasksuccess"] and not last.info["taskfailure"] and not last.info["turn_limit"]
    assert last.info["score"] == pytest.approx(1.0)  # the game's final score ...
    assert trajectory.reward == pytest.approx(last.info["score"])  # ... is the summed reward
    assert trajectory.success and len(trajectory.turns) <= families[game].max_steps
    assert last.observation == []  # the game is over: nothing more to show


# --------------------------------------------------------------------------------- the splits
def test_train_and_eval_items_are_games_of_disjoint_folds(families):
    family = families["mapreader"]
    train_seeds = {family.seed("train", index) for index in range(family.split_size("train"))}
    eval_seeds = {family.seed("eval", index) for index in range(family.split_size("eval"))}
    assert len(train_seeds) == len(eval_seeds) == 1000 and not train_seeds & eval_seeds
    train = family.make("train", 0)
    evaluation = family.make("eval", 0)
    assert (train.fold, evaluation.fold) == ("train", "test")
    train_prompts = {family.make("train", index).initial_observation()[0].content for index in range(30)}
    eval_prompts = {family.make("eval", index).initial_observation()[0].content for index in range(30)}
    assert len(eval_prompts) == 30 and not train_prompts & eval_prompts  # different games
    # the same item is the same game every time
    assert family.make("eval", 7).initial_observation() == family.make("eval", 7).initial_observation()
    with pytest.raises(IndexError):
        family.make("eval", 1000)


def test_options_pass_through_to_the_game():
    large = make_family("twx:coin", {"numLocations": 6, "includeDoors": 1})  # -o numLocations=6 -o includeDoors=1
    assert large.params == "includeDoors=1,limitInventorySize=0,numDistractorItems=0,numLocations=6"
    environment = large.make("eval", 4)
    environment.initial_observation()
    properties = json.loads(gateway().call("getGenerationPropertiesJSON", environment._java))
    assert properties["numLocations"] == 6 and properties["includeDoors"] == 1  # what the game was made with
    environment.close()
    assert make_family("twx:coin", {"preset": "default"}).params == ""  # the game's own defaults
    assert make_family("twx:coin", {"max_steps": 3}).max_steps == 3
    assert make_family("twx:coin", {"includeDoors": True}).config["includeDoors"] == 1


def test_options_change_the_game():
    """-o numLocations=3 changes the games played (not just a label)."""
    two = make_family("twx:coin").make("eval", 2)
    three = make_family("twx:coin", {"numLocations": 3}).make("eval", 2)
    assert two.initial_observation() != three.initial_observation() or two.gold_actions() != three.gold_actions()


# ------------------------------------------------------------------------- actions and limits
def test_an_invalid_action_is_an_observation_and_a_turn(families):
    environment = families["twc"].make("eval", 0)
    environment.initial_observation()
    result = environment.step("dance on the table")
    assert not result.done and result.reward == 0.0 and result.info["invalid"] and result.info["action"] is None
    [message] = result.observation
    assert message.content.startswith('"dance on the table" is not a valid action here.')
    assert valid_actions(message.content) == environment.valid  # the list again
    assert environment.steps == 1
    environment.close()


def test_replies_are_matched_to_one_valid_action():
    valid = ["look around", "move north", "move south", "open door to south", "take coin"]
    assert match_action("take coin", valid) == "take coin"
    assert match_action("  **Take  Coin.**\nand then more", valid) == "take coin"
    assert match_action("> move north", valid) == "move north"
    assert match_action("Action: `look around`", valid) == "look around"
    assert match_action("I will open door to south now", valid) == "open door to south"  # longest at its place
    assert match_action("move south then take coin", valid) == "move south"  # the first one named
    assert match_action("first line\ntake coin", valid) is None  # only the first line counts
    assert match_action("take coins", valid) is None and match_action("", valid) is None


def test_the_turn_limit_ends_the_episode():
    family = make_family("twx:coin", {"max_steps": 3})
    environment = family.make("eval", 0)
    environment.initial_observation()
    results = [environment.step("inventory") for _ in range(3)]
    assert [result.done for result in results] == [False, False, True]
    assert results[-1].info["turn_limit"] and not results[-1].info["tasksuccess"]
    with pytest.raises(RuntimeError, match="after the game ended"):
        environment.step("look around")
    # through the rollout: the episode ends by the game's limit, unsolved and not truncated by the loop
    engine = ScriptedEngine(lambda chat: "inventory")
    [trajectory] = run_episodes(engine, [family.make("eval", 1)], SamplingParams(), split="eval", max_turns=8,
                                success_threshold=family.success_threshold)
    assert len(trajectory.turns) == 3 and not trajectory.truncated and not trajectory.success
    assert trajectory.error is None


def test_a_failed_task_ends_the_episode_with_the_games_negative_reward(families):
    environment = families["arithmetic"].make("eval", 0)
    environment.initial_observation()
    result = environment.step("take math problem")
    result = environment.step("put math problem in box")  # never the answer
    assert result.done and result.info["taskfailure"] and result.reward < 0
    environment.close()


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("spec", "options", "message"), [
    ("twx:chess", {}, "unknown TextWorldExpress game 'chess'; available: twx:coin, twx:cooking"),
    ("twx", {}, "twx needs a game name, e.g. twx:coin"),
    ("twx:coin", {"numRooms": 3}, "unknown option(s) 'numRooms'; this game takes numLocations"),
    ("twx:sorting", {"numLocations": 3}, "this game takes no game options"),
    ("twx:coin", {"numLocations": 99}, "Number of locations must be less than or equal to 11"),
    ("twx:coin", {"numLocations": "three"}, "numLocations must be a whole number"),
    ("twx:coin", {"max_steps": 0}, "max_steps"),
    ("twx:coin", {"eval_size": 5000}, "eval_size"),
])
def test_bad_games_and_options_are_clear_errors(spec, options, message):
    with pytest.raises(EnvSpecError) as raised:
        make_family(spec, options)
    assert message in str(raised.value)


def test_missing_java_names_the_package_to_install(monkeypatch):
    from envs import textworld_express

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(EnvSpecError, match="apt-get install openjdk-17-jre-headless"):
        textworld_express.java_command()


# ------------------------------------------------------------------- one JVM, many games
def test_games_share_one_jvm_and_stay_independent(families):
    """Sorting's game objects of one seed share state inside TextWorldExpress: two environments of the
    same item, stepped in turn (as verification's arms are), must still each play their own game."""
    family = families["sorting"]
    first, second = family.make("eval", 3), family.make("eval", 3)
    first.initial_observation()
    second.initial_observation()
    gold = first.gold_actions()
    for action in gold:
        assert first.step(action).model_dump() == second.step(action).model_dump()
    assert first.done and second.done and first.score == second.score == pytest.approx(1.0)
    process = gateway().process
    make_family("twx:coin").make("eval", 0).initial_observation()
    assert gateway().process is process and process.poll() is None  # the same JVM throughout


def test_environments_play_from_several_threads(families):
    family = families["mapreader"]
    golds = {index: family.make("eval", index).gold_actions() for index in range(6)}
    wins: dict[int, bool] = {}

    def worker(index: int) -> None:
        wins[index] = play(family.make("eval", index % 6), golds[index % 6]).success

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wins == {index: True for index in range(12)}


# ------------------------------------------------------------- skills and the fold's views
def gold_player(family, split: str, count: int):
    """A scripted agent that plays each game's gold path (its games told apart by their prompt)."""
    plans = {}
    for index in range(count):
        environment = family.make(split, index)
        plans[environment.initial_observation()[0].content] = environment.gold_actions()
        environment.close()

    def respond(chat):
        played = sum(message["role"] == "assistant" for message in chat)
        return plans[chat[0]["content"]][played]

    return respond


def test_a_won_game_becomes_a_procedure_exemplar_and_every_turn_is_trained(families, tiny_tokenizer):
    family = families["mapreader"]
    engine = ScriptedEngine(gold_player(family, "train", 3))
    trajectories = run_episodes(engine, [family.make("train", index) for index in range(3)], SamplingParams(),
                                split="train", max_turns=family.max_steps, success_threshold=1.0)
    assert all(trajectory.success for trajectory in trajectories)
    trajectory = trajectories[0]
    skill = exemplar_from(trajectory, family)
    assert skill.kind == "exemplar" and skill.family == "twx:mapreader"
    turns = exemplar_messages(skill.text)
    actions = [turn.content for turn in turns if turn.role == "assistant"]
    assert actions == [turn.action for turn in trajectory.turns]  # the procedure: every move, in order
    assert [turn.role for turn in turns] == ["user", "assistant"] * len(actions)
    assert VALID_HEADER not in skill.text and len(skill.text) <= EXEMPLAR_CHARS + 200
    assert turns[0].content.startswith("You are playing a text game. Your task is to take the coin")
    whole = exemplar_from(trajectory)  # without the family: the whole transcript, lists and all
    assert VALID_HEADER in whole.text and len(whole.text) > len(skill.text)

    views = episode_views(tiny_tokenizer, trajectory.messages(), exemplar_messages(skill.text),
                          {tiny_tokenizer.eos_token_id}, sampled=sampled_ids(trajectory))
    trained = [token for token, flag in zip(views.student.input_ids, views.student.trained, strict=True) if flag]
    end = tiny_tokenizer.eos_token
    assert tiny_tokenizer.decode(trained) == "".join(turn.action + end for turn in trajectory.turns)
    assert views.context_messages_kept == len(turns)  # the exemplar fits the teacher's view


def test_the_loop_stores_won_games_as_procedures(tmp_path):
    from agent.loop import LoopSettings, Runtime, run_loop
    from memory import HashingEmbedding, Memory

    family = make_family("twx:simonsays")

    def simon(chat):  # follows Simon: the quoted action of the last message
        found = re.search(r"Simon says, '([^']+)'", chat[-1]["content"])
        return found.group(1) if found else "look around"

    memory = Memory.open(home=tmp_path / "home", embedding=HashingEmbedding())
    settings = LoopSettings(episodes=4, batch_size=4, probes=2, reflect_every=0, sampling=SamplingParams(),
                            max_turns=family.max_steps)
    state = run_loop(Runtime(engine=ScriptedEngine(simon), memory=memory, family=family, settings=settings,
                             run_id="twx"), tmp_path / "loop.sqlite")
    assert state["episodes"] == 4 and state["successes"] == 4
    skills = memory.list_skills(family="twx:simonsays")
    assert skills and all(skill.kind == "exemplar" and VALID_HEADER not in skill.text for skill in skills)
    assert all(len(exemplar_messages(skill.text)) == 4 for skill in skills)  # two orders, two moves


# ----------------------------------------------------------------------------- the CLI
def test_eval_on_a_twx_family_through_the_cli(model_dir, tmp_path):
    from tests.unit.test_cli import invoke, last_json

    home = tmp_path / "home"
    summary = last_json(invoke("eval", "--env", "twx:coin", "-o", "max_steps=2", "--items", 3, "--model", model_dir,
                               "--max-new-tokens", 8, "--json", "--home", home))
    assert summary["env"] == "twx:coin" and summary["items"] == 3
    lines = (Path(summary["run_dir"]) / "trajectories.jsonl").read_text().splitlines()
    trajectories = [Trajectory.model_validate_json(line) for line in lines]
    assert [t.item_id for t in trajectories] == ["eval-0", "eval-1", "eval-2"]
    assert all(t.error is None and 1 <= len(t.turns) <= 2 and VALID_HEADER in t.prompt[0].content
               for t in trajectories)
    assert sum(t.success for t in trajectories) == round(summary["accuracy"] * 3)
    config = json.loads((Path(summary["run_dir"]) / "config.json").read_text())
    assert config["envs"][0]["options"] == {"max_steps": 2}


def test_the_games_stream_config_loads_and_its_games_have_room_for_its_items():
    """experiments/games.toml: three TextWorldExpress families, 100 held-out games each plus the assess games,
    the fold trains every move of an 8-turn game."""
    from pathlib import Path

    from agent.config import build_config
    from agent.experiment import ExperimentConfig, check_experiment

    config = build_config(ExperimentConfig, Path(__file__).resolve().parents[2] / "experiments" / "games.toml", {}, [])
    families = check_experiment(config)
    assert [family.name for family in families] == ["twx:simonsays", "twx:coin", "twx:twc"]
    assert config.eval_items >= 100 and config.seeds == [0, 1]
    assert config.arms == ["base", "memory", "sft", "skillfold"]
    assert config.stream.fold.max_turns == config.stream.loop.max_turns == 8
