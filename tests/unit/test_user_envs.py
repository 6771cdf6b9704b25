"""A user's own environment, without a fork: `module:Name`, `file.py:Name`, entry points, and what
happens when it is broken (a clear error naming the file and the fix, or a failed episode on record).

The example of docs/environments.md runs through `eval`, `run` and `fold` by its file path, on the
tiny random-weight model of tests/tiny.py.
"""

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engines.base import SamplingParams
from envs import EnvSpecError, Message, StepResult, Trajectory, make_family
from envs.plugins import UserFamily
from learners.rollout import run_episodes
from memory import Memory, Skill
from tests.fakes import ScriptedEngine
from tests.unit.test_cli import assert_user_error, flat, invoke, last_json

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "guess_env.py"
EXAMPLE_SPEC = f"{EXAMPLE}:GuessFamily"


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda _: None)  # the CLI's engine on conftest's one thread


def write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


# ------------------------------------------------------------------ the documented example
def test_the_example_plays_as_documented():
    family = make_family(EXAMPLE_SPEC, {"high": 6, "guesses": 3})
    assert family.name == "guess" and family.success_threshold == 1.0
    assert family.split_size("eval") == 50 and family.split_size("train") == 200
    secrets = {split: {family.make(split, index).environment.secret for index in range(40)} for split in ("train", "eval")}
    assert secrets["train"] <= {2, 4, 6} and secrets["eval"] <= {1, 3, 5}  # disjoint splits

    def bisect(chat):  # a player that halves the interval on every hint
        low, high = 1, 6
        guesses = [m["content"] for m in chat if m["role"] == "assistant"]
        hints = [m["content"] for m in chat if m["role"] == "user"][1:]
        for guess, hint in zip(guesses, hints, strict=True):
            if hint == "Higher.":
                low = int(guess) + 1
            elif hint == "Lower.":
                high = int(guess) - 1
        return str((low + high) // 2)

    environments = [family.make("eval", index) for index in range(6)]
    trajectories = run_episodes(ScriptedEngine(bisect), environments, SamplingParams(), split="eval", max_turns=3,
                                success_threshold=family.success_threshold)
    assert all(t.success and t.error is None for t in trajectories)
    assert any(len(t.turns) > 1 for t in trajectories)  # multi-turn: hints were given and used


def test_the_example_through_eval_run_and_fold_by_its_file_path(model_dir, tmp_path):
    home = tmp_path / "home"
    summary = last_json(invoke("eval", "--env", EXAMPLE_SPEC, "-o", "high=6", "--items", 3, "--model", model_dir,
                               "--home", home, "--json", "max_turns=2", "sampling.max_new_tokens=4"))
    assert summary["env"] == "guess" and summary["items"] == 3 and summary["errors"] == 0
    lines = (Path(summary["run_dir"]) / "trajectories.jsonl").read_text().splitlines()
    assert all(Trajectory.model_validate_json(line).turns for line in lines)

    summary = last_json(invoke("run", "--env", EXAMPLE_SPEC, "-o", "high=6", "--episodes", 2, "--model", model_dir,
                               "--home", home, "--json", "--run-id", "r", "loop.batch_size=2", "loop.probes=2",
                               "loop.reflect_every=0", "loop.max_turns=2", "loop.sampling.max_new_tokens=4"))
    assert summary["env"] == "guess" and summary["episodes"] == 2
    store = Memory.open(home=home)
    assert store.count_trajectories() == 2 and {t.env for t in store.list_trajectories()} == {"guess"}

    store.add_skills([Skill(kind="rule", family="guess", title="halve the interval",
                            text="Guess the middle of what is left after each hint.")])
    folded = last_json(invoke("fold", "--families", EXAMPLE_SPEC, "--model", model_dir, "--home", home,
                              "--run-id", "g", "--steps", 1, "--json", "items_per_family=2", "probes=0",
                              "fold.batch_size=2", "fold.max_turns=1", "fold.sampling.max_new_tokens=4"))
    assert folded["adapter"] == str(home / "adapters" / "g")
    assert (home / "adapters" / "g" / "adapter_config.json").is_file()


def test_fold_of_a_family_known_only_by_name_says_to_name_its_spec(model_dir, tmp_path):
    home = tmp_path / "home"
    Memory.open(home=home).add_skills([Skill(kind="rule", family="guess", title="t", text="Guess the middle.")])
    result = invoke("fold", "--model", model_dir, "--home", home, "--steps", 1)
    assert_user_error(result, "unknown environment 'guess'", "--families path/to/file.py:Name")


# ------------------------------------------------------------------ module:Name and entry points
FAMILY_SOURCE = """
    from envs.base import Message, StepResult

    class Echo:
        def __init__(self, item_id):
            self.family, self.item_id = "echo", item_id

        def initial_observation(self):
            return [Message(role="user", content="Say hi.")]

        def step(self, action):
            return StepResult(reward=float(action.strip() == "hi"), done=True)

    class EchoFamily:
        name = "echo"
        success_threshold = 1.0

        def __init__(self, level="easy", size=4):
            self.level, self.size = level, size

        def split_size(self, split):
            return self.size

        def make(self, split, index):
            return Echo(f"{self.level}-{split}-{index}")

    def make_echo(level="easy", size=4):
        return EchoFamily(level, size)
"""


def test_a_module_spec_names_a_class_or_a_factory_with_options(tmp_path, monkeypatch):
    write(tmp_path / "echo_games.py", FAMILY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    family = make_family("echo_games:EchoFamily", {"size": 2})
    assert isinstance(family, UserFamily) and family.split_size("eval") == 2
    assert family.make("train", 1).item_id == "easy-train-1"
    assert make_family("echo_games:make_echo", {"level": "hard"}).make("eval", 0).item_id == "hard-eval-0"
    with pytest.raises(EnvSpecError, match=r"the options do not fit EchoFamily\(level='easy', size=4\).*-o key=value"):
        make_family("echo_games:EchoFamily", {"colour": "red"})
    with pytest.raises(EnvSpecError, match="no module named 'not_a_module_xyz.games'; install the package"):
        make_family("not_a_module_xyz.games:Family")
    with pytest.raises(EnvSpecError, match="echo_games has no 'Nope'; it defines: .*EchoFamily"):
        make_family("echo_games:Nope")


def test_an_installed_package_adds_a_kind_through_the_entry_point_group(tmp_path, monkeypatch):
    write(tmp_path / "mygame_envs.py", FAMILY_SOURCE)
    dist = tmp_path / "mygame-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mygame\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[skillfold.envs]\nmygame = mygame_envs:make_echo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    family = make_family("mygame:level1", {"size": 3})
    assert family.name == "echo" and family.make("eval", 2).item_id == "level1-eval-2"
    assert make_family("mygame").make("train", 0).item_id == "easy-train-0"
    assert "mygame" in __import__("envs").available_families()
    with pytest.raises(EnvSpecError, match="available kinds: .*; mygame; or your own: package.module:Name"):
        make_family("othergame:x")


# ------------------------------------------------------------------ broken environments: clear errors
BROKEN_FILES = {
    "import error": ("import not_installed_xyz\n", "Family", ["ModuleNotFoundError", "not_installed_xyz",
                                                               "fix the file", "(line 1)"]),
    "syntax error": ("class Family:\n    def make(self\n", "Family", ["SyntaxError", "fix the file"]),
    "missing name": ("class Other:\n    pass\n", "Family", ["has no 'Family'", "it defines: Other"]),
    "wrong type": ("Family = 42\n", "Family", ["gave an object of type int, not a task family", "a method `make`",
                                                "docs/environments.md"]),
    "no make": ("class Family:\n    name = 'x'\n    def split_size(self, split):\n        return 3\n", "Family",
                ["not a task family: it lacks a method `make`"]),
    "raising factory": ("def Family():\n    raise RuntimeError('no levels')\n", "Family",
                        ["making the family raised RuntimeError: no levels"]),
    "bad split size": ("class Family:\n    name = 'x'\n    def split_size(self, split):\n        return 'many'\n"
                       "    def make(self, split, index):\n        pass\n", "Family",
                       ["split_size('train') returned 'many'", "an int >= 0"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FILES))
def test_a_broken_environment_file_is_a_clear_error_naming_it(case, model_dir, tmp_path):
    source, name, fragments = BROKEN_FILES[case]
    path = write(tmp_path / "broken_env.py", source)
    with pytest.raises(EnvSpecError) as caught:
        make_family(f"{path}:{name}")
    assert str(path) in str(caught.value)
    for fragment in fragments:
        assert fragment in str(caught.value)
    if case == "import error":  # and through the CLI: exit 2, one line, nothing written
        home = tmp_path / "home"
        assert_user_error(invoke("eval", "--env", f"{path}:{name}", "--model", model_dir, "--home", home),
                          str(path), "not_installed_xyz")
        assert not home.exists()


def test_a_missing_file_names_the_path():
    with pytest.raises(EnvSpecError, match=r"no file nowhere/game\.py \(a path is relative to the current directory\)"):
        make_family("nowhere/game.py:Family")


# ------------------------------------------------------------------ broken episodes: failed episodes on record
MISBEHAVING = """
    from envs.base import Message, StepResult

    CLOSED = []

    class Game:
        def __init__(self, index):
            self.family, self.item_id, self.index = "misbehaving", f"item-{index}", index

        def initial_observation(self):
            if self.index == 1:
                return "a plain string"
            return [{"role": "user", "content": f"item {self.index}"}]

        def step(self, action):
            if self.index == 2:
                raise ValueError("the board is on fire")
            if self.index == 3:
                return (1.0, True)
            if self.index == 4:
                return {"reward": 1.0, "done": True}
            if self.index == 5:
                return StepResult(observation=[Message(role="user", content="again")])
            return StepResult(reward=1.0, done=True)

        def close(self):
            CLOSED.append(self.index)
            if self.index == 6:
                raise OSError("socket already closed")

    class Family:
        name = "misbehaving"
        success_threshold = 1.0

        def split_size(self, split):
            return 8

        def make(self, split, index):
            if index == 7:
                raise KeyError("no level 7")
            return Game(index)
"""


def test_a_misbehaving_environment_fails_its_episodes_on_record_and_is_always_closed(tmp_path):
    path = write(tmp_path / "misbehaving.py", MISBEHAVING)
    family = make_family(f"{path}:Family")
    environments = [family.make("eval", index) for index in range(8)]
    trajectories = run_episodes(ScriptedEngine(lambda chat: "ok"), environments, SamplingParams(), split="eval",
                                max_turns=2, success_threshold=family.success_threshold)
    errors = {index: trajectory.error for index, trajectory in enumerate(trajectories)}
    assert trajectories[0].success and errors[0] is None
    assert "initial_observation() returned a str; return a list of messages" in errors[1]
    assert "ValueError: the board is on fire" in errors[2]
    assert "step() returned tuple; return envs.base.StepResult(" in errors[3] and str(path) in errors[3]
    assert trajectories[4].success  # a dict that is a StepResult is read as one
    assert trajectories[5].truncated and not trajectories[5].success and errors[5] is None
    assert trajectories[6].success and "OSError: socket already closed" in trajectories[6].info["close_error"]
    assert "make('eval', 7) raised KeyError: 'no level 7'" in errors[7] and str(path) in errors[7]
    assert trajectories[7].item_id == "eval-7"
    module = sys.modules[type(family.family).__module__]
    assert sorted(module.CLOSED) == [0, 1, 2, 3, 4, 5, 6]  # every episode made, however it ended


def test_a_misbehaving_environment_does_not_stop_eval_or_run(model_dir, tmp_path):
    path = write(tmp_path / "misbehaving.py", MISBEHAVING)
    home = tmp_path / "home"
    summary = last_json(invoke("eval", "--env", f"{path}:Family", "--items", 8, "--model", model_dir, "--home", home,
                               "--json", "max_turns=2", "sampling.max_new_tokens=2", "--memory", "on"))
    assert summary["errors"] == 4 and summary["items"] == 8
    summary = last_json(invoke("run", "--env", f"{path}:Family", "--episodes", 6, "--model", model_dir, "--home", home,
                               "--json", "loop.batch_size=6", "loop.probes=1", "loop.reflect_every=0",
                               "loop.max_turns=2", "loop.sampling.max_new_tokens=2"))
    assert summary["episodes"] == 6
    stored = Memory.open(home=home).list_trajectories()
    assert sum(t.error is not None for t in stored) == 3  # items 1, 2, 3 of the train split


def test_close_is_called_once_at_every_episode_end_in_the_agent_loop(tmp_path):
    from agent.config import LoopSettings
    from agent.loop import Runtime, run_loop
    from memory import HashingEmbedding

    path = write(tmp_path / "misbehaving.py", MISBEHAVING)
    family = make_family(f"{path}:Family")
    memory = Memory.open(home=tmp_path / "home", embedding=HashingEmbedding())
    settings = LoopSettings(episodes=7, batch_size=4, probes=1, reflect_every=0, max_turns=2)
    runtime = Runtime(engine=ScriptedEngine(lambda chat: "ok"), memory=memory, family=family, settings=settings,
                      run_id="closing")
    state = run_loop(runtime, tmp_path / "agent.sqlite")
    assert state["episodes"] == 7
    module = sys.modules[type(family.family).__module__]
    assert sorted(module.CLOSED) == [0, 1, 2, 3, 4, 5, 6]
    stored = {t.item_id: t for t in memory.list_trajectories()}
    assert "close_error" in stored["item-6"].info and stored["item-5"].truncated


def test_old_turn_records_without_tool_calls_still_load():
    old = {"env": "toy:1", "item_id": "t-0", "split": "train", "prompt": [{"role": "user", "content": "x"}],
           "turns": [{"action": "CALC(1+1)", "observation": [{"role": "user", "content": "Result: 2"}],
                      "info": {"tool": "calc", "argument": "1+1", "tool_error": False}}]}
    trajectory = Trajectory.model_validate_json(json.dumps(old))
    assert trajectory.turns[0].tool_calls == []
    assert StepResult().tool_calls == [] and Message(role="user", content="x")
    assert "seconds" in flat(json.dumps(Trajectory.model_json_schema()))
