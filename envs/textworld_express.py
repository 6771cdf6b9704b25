"""TextWorldExpress text games as multi-turn task families (spec `twx:<game>`).

TextWorldExpress (PyPI `textworld-express`, Jansen & Cote 2022) runs in a Java 17 virtual machine
that the package bundles as a jar and drives through py4j. This module owns four things:

- one JVM per process, started on first use and shut down at exit (`gateway()`): starting one takes
  a noticeable fraction of a second, so every environment of a process plays its game on a Java
  game object of its own inside that one JVM. Game objects are independent (verified: interleaved
  and threaded play gives the same games as one at a time), and every call into the JVM is made
  under one lock, so environments may be made and stepped from several threads. Game objects are
  kept in a small pool per (game, options) and reused (loading a game generator costs up to 40 ms);
  a JVM that died is started again by the next environment, and a forked child starts its own;
- the game's disjoint folds as the two splits: item `i` of `train` is the game with the `i`-th seed
  of TextWorldExpress's train fold, item `i` of `eval` the `i`-th seed of its test fold (the dev
  fold is not used). The folds draw on disjoint seeds and, where the game has them, disjoint
  object and room sets, so no eval game is ever played for training;
- easy presets a 135M model can start from (`EASY_PRESETS`), under the game's own option names,
  and a turn limit (`max_steps`) per preset;
- one action per turn: the observation is the game's text followed by the list of valid actions;
  the model's reply is matched to one of them (`match_action`); a reply that matches none is an
  observation ("... is not a valid action here"), a turn spent. Reward is the change of the game's
  score (from 0 to 1 on a win; a failure can make it negative); the episode ends when the game
  reports task success or task failure, or after `max_steps` actions.

A won game is remembered as a procedure (`TextWorldExpressFamily.exemplar`): the task, what each
move showed in brief, and the moves, small enough for a prompt's skill budget.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from envs.base import EnvSpecError, Message, Split, StepResult, Trajectory, family_settings

JAVA_FIX = ("TextWorldExpress runs on Java 17 or newer: install a runtime (Debian/Ubuntu: "
            "apt-get install openjdk-17-jre-headless) or point JAVA_HOME at one")
PACKAGE_FIX = "install it: pip install textworld-express (a dependency of skillfold)"
SUCCESS_THRESHOLD = 1.0
POOL_SIZE = 64  # idle game objects kept per (game, options)

# family name -> TextWorldExpress's game name, and the options each game takes (TextWorldExpress's
# own names; the game checks their ranges)
GAMES: dict[str, str] = {
    "coin": "coin",
    "cooking": "cookingworld",
    "twc": "twc",
    "mapreader": "mapreader",
    "arithmetic": "arithmetic",
    "sorting": "sorting",
    "simonsays": "simonsays",
    "peckingorder": "peckingorder",
}
ALIASES = {"cookingworld": "cooking"}
GAME_OPTIONS: dict[str, tuple[str, ...]] = {
    "coin": ("numLocations", "numDistractorItems", "includeDoors", "limitInventorySize"),
    "cooking": ("numLocations", "numIngredients", "numDistractorItems", "includeDoors", "limitInventorySize"),
    "twc": ("numLocations", "numItemsToPutAway", "includeDoors", "limitInventorySize"),
    "mapreader": ("numLocations", "maxDistanceApart", "maxDistractorItemsPerLocation", "includeDoors",
                  "limitInventorySize"),
    "simonsays": ("gameLength", "numDistractors", "memorization"),
    "arithmetic": (),
    "sorting": (),
    "peckingorder": (),
}
# Small worlds a 135M model can start from: one or two rooms, no doors, no distractors, one thing to
# do. A game without options (arithmetic, sorting, peckingorder) is the same under both presets.
EASY_PRESETS: dict[str, dict[str, int]] = {
    "coin": dict(numLocations=2, numDistractorItems=0, includeDoors=0, limitInventorySize=0),
    "cooking": dict(numLocations=1, numIngredients=1, numDistractorItems=0, includeDoors=0, limitInventorySize=0),
    "twc": dict(numLocations=1, numItemsToPutAway=1, includeDoors=0, limitInventorySize=0),
    "mapreader": dict(numLocations=2, maxDistanceApart=1, maxDistractorItemsPerLocation=0, includeDoors=0,
                      limitInventorySize=0),
    "simonsays": dict(gameLength=2, numDistractors=2),
}
# the turn limit when none is given: room for the gold path of the preset's games and a few spare moves
MAX_STEPS: dict[str, dict[str, int]] = {
    "easy": dict(coin=8, cooking=16, twc=8, mapreader=12, simonsays=8, arithmetic=10, sorting=16, peckingorder=16),
    "default": dict(coin=50, cooking=100, twc=50, mapreader=50, simonsays=20, arithmetic=20, sorting=30,
                    peckingorder=30),
}
INSTRUCTION = "What do you do next? Answer with one action from the list."
VALID_HEADER = "Valid actions: "
OBSERVATION_CHARS = 240  # per observation, in a remembered (exemplar) game
EXEMPLAR_CHARS = 1600


# ---------------------------------------------------------------------------------------- the JVM
_java_checked: dict[str, str] = {}


def java_command() -> str:
    """The `java` to start: $JAVA_HOME/bin/java when set, else the one on PATH; checked to be >= 17
    once per process. Raises EnvSpecError naming the fix when there is none or it is too old."""
    home = os.environ.get("JAVA_HOME")
    java = os.path.join(home, "bin", "java") if home and os.path.isfile(os.path.join(home, "bin", "java")) \
        else shutil.which("java")
    if java is None:
        raise EnvSpecError(f"twx: no `java` found (PATH, JAVA_HOME). {JAVA_FIX}")
    if java not in _java_checked:
        try:
            shown = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
            text = shown.stderr + shown.stdout
        except (OSError, subprocess.SubprocessError) as error:
            raise EnvSpecError(f"twx: {java} -version failed ({error}). {JAVA_FIX}") from error
        found = re.search(r'version "(\d+)(?:\.(\d+))?', text)
        major = int(found.group(1)) if found else 0
        if major == 1 and found and found.group(2):  # "1.8.0" is Java 8
            major = int(found.group(2))
        if major < 17:
            raise EnvSpecError(f"twx: {java} is Java {major or '(unknown version)'}, too old. {JAVA_FIX}")
        _java_checked[java] = text
    return java


def java_status() -> str:
    """One line for `make install`: whether the twx families can run here, and the fix when not."""
    try:
        import textworld_express  # noqa: F401

        java = java_command()
    except ImportError:
        return f"WARNING: twx text games (TextWorldExpress) unavailable: the package is missing; {PACKAGE_FIX}"
    except EnvSpecError as error:
        return f"WARNING: twx text games (TextWorldExpress) unavailable: {error}"
    version = _java_checked[java].strip().splitlines()[0]
    return f"twx text games (TextWorldExpress): Java found, {java}: {version}"


class Gateway:
    """One JVM with TextWorldExpress's jar, and a pool of its game objects. Every call into the JVM
    goes through `call`, under one lock."""

    def __init__(self) -> None:
        try:
            from py4j.java_gateway import GatewayParameters, JavaGateway, launch_gateway
            from textworld_express.constants import BASEPATH, JAR_PATH
        except ImportError as error:
            raise EnvSpecError(f"twx: the textworld-express package is missing ({error}); {PACKAGE_FIX}") from error
        java = java_command()
        self.pid = os.getpid()
        self.lock = threading.RLock()
        self.idle: dict[tuple[str, str], list[Any]] = {}
        # (game, params, fold, seed) -> the environment whose game object last played that game. Game
        # objects of one game and seed may share state inside TextWorldExpress (sorting does: playing
        # one changes the other), so an environment that finds another owner makes its game again and
        # replays its own actions before it steps (games are deterministic in seed and actions).
        self.owner: dict[tuple[str, str, str, int], object] = {}
        try:
            port, self.process = launch_gateway(classpath=JAR_PATH, die_on_exit=True, cwd=BASEPATH,
                                                java_path=java, return_proc=True)
        except Exception as error:
            raise EnvSpecError(f"twx: the Java VM did not start ({type(error).__name__}: {error}). {JAVA_FIX}") \
                from error
        self.gateway = JavaGateway(gateway_parameters=GatewayParameters(port=port, auto_field=True),
                                   java_process=self.process)

    def generate(self, java: Any, key: tuple[str, str, str, int], owner: object, gold: bool = False) -> str:
        """A new game of `key` on `java`, now owned by `owner` (the JSON of its first state)."""
        with self.lock:
            self.owner[key] = owner
            return java.generateNewGameJSON(key[3], key[2], gold)

    def alive(self) -> bool:
        return self.pid == os.getpid() and self.process.poll() is None

    def call(self, method: str, game: Any, *args: Any) -> Any:
        with self.lock:
            return getattr(game, method)(*args)

    def acquire(self, game_name: str, params: str) -> Any:
        """A game object with `game_name` loaded under `params` (from the pool, or new)."""
        with self.lock:
            pool = self.idle.get((game_name, params))
            if pool:
                return pool.pop()
            game = self.gateway.jvm.textworldexpress.runtime.PythonInterface()
            message = game.load(game_name, params)
            if message:
                self.gateway.detach(game)
                raise EnvSpecError(str(message).strip())
            return game

    def release(self, game_name: str, params: str, game: Any) -> None:
        with self.lock:
            if not self.alive():
                return
            pool = self.idle.setdefault((game_name, params), [])
            if len(pool) < POOL_SIZE:
                pool.append(game)
            else:
                self.gateway.detach(game)

    def shutdown(self) -> None:
        with self.lock:
            if self.pid != os.getpid():  # a forked child leaves its parent's JVM alone
                return
            try:
                self.gateway.shutdown()
            except Exception:  # the JVM may be gone already
                pass
            if self.process.poll() is None:
                try:  # die_on_exit: the JVM exits when its stdin gets a line (py4j issue 320)
                    self.process.stdin.write(b"\n")
                    self.process.stdin.flush()
                    self.process.wait(timeout=5)
                except Exception:
                    self.process.kill()


_gateway: Gateway | None = None
_gateway_lock = threading.Lock()


def gateway() -> Gateway:
    """This process's JVM, started on first use (and again if it died, or after a fork)."""
    global _gateway
    with _gateway_lock:
        if _gateway is None or not _gateway.alive():
            _gateway = Gateway()
        return _gateway


@atexit.register
def shutdown() -> None:
    """Stop this process's JVM (at exit; a later `gateway()` starts a new one)."""
    global _gateway
    with _gateway_lock:
        if _gateway is not None:
            _gateway.shutdown()
            _gateway = None


# ------------------------------------------------------------------------------------ the actions
_PREFIX = re.compile(r"^(?:[>\-*•]+|\d+[.)]|(?:next\s+)?(?:action|command|move)\s*:)\s*", re.IGNORECASE)


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def match_action(reply: str, valid: Sequence[str]) -> str | None:
    """The valid action a model's reply names, or None.

    The rule: take the reply's first non-empty line; drop markdown (`**`, backticks), surrounding
    quotes, a leading "> ", "- ", "1." or "Action:", and trailing periods; compare case- and
    space-insensitively with the valid actions. If it is not one of them, the valid action that occurs
    first in that line as whole words is taken (the longest of those starting there), so "take coin."
    and "I take coin" both give "take coin". Only the first line counts: one action per turn.
    """
    line = next((line for line in reply.splitlines() if line.strip()), "")
    line = line.replace("**", "").replace("`", "").strip()
    while True:
        stripped = _PREFIX.sub("", line).strip().strip("\"'").rstrip(".!").strip()
        if stripped == line:
            break
        line = stripped
    wanted = _normal(line)
    by_normal = {_normal(action): action for action in valid}
    if wanted in by_normal:
        return by_normal[wanted]
    best: tuple[int, int, str] | None = None
    for normal, action in by_normal.items():
        found = re.search(rf"(?<!\w){re.escape(normal)}(?!\w)", wanted)
        if found and (best is None or (found.start(), -len(normal)) < (best[0], best[1])):
            best = (found.start(), -len(normal), action)
    return best[2] if best else None


def _actions_text(valid: Sequence[str]) -> str:
    return VALID_HEADER + ", ".join(valid)


def _game_text(content: str) -> str:
    """An observation message without its list of valid actions (and the instruction after it)."""
    return content.split("\n\n" + VALID_HEADER, 1)[0].strip()


_EMPTY = re.compile(r"(?:nothing on it|that is (?:closed|empty))\.$")  # furniture with nothing to take


def _brief(text: str, limit: int = OBSERVATION_CHARS) -> str:
    """At most `limit` characters of a game text: when it is longer, without the sentences about empty
    or closed furniture, then cut after a sentence; the exits ("To the North you see ...") kept."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    sentences = [sentence for sentence in re.split(r"(?<=[.!?])\s+", text) if not _EMPTY.search(sentence)]
    exits = [sentence for sentence in sentences if sentence.startswith("To the ")]
    kept: list[str] = []
    for sentence in sentences:
        if sentence in exits or len(" ".join([*kept, sentence])) > limit:
            continue
        kept.append(sentence)
    return " ".join([*kept, "...", *exits]) if kept or exits else text[:limit] + " ..."


# ------------------------------------------------------------------------------- the environment
class TextWorldExpressEnvironment:
    """One game: the game's text and its valid actions each turn, one action per reply.

    The Java game object is taken from the process's JVM at `initial_observation` and given back at
    `close` (or when the game ends). `step` after the end raises RuntimeError.
    """

    def __init__(self, family: str, item_id: str, game: str, params: str, seed: int, fold: str,
                 max_steps: int) -> None:
        self.family, self.item_id = family, item_id
        self.game, self.params, self.seed, self.fold, self.max_steps = game, params, seed, fold, max_steps
        self.steps = 0
        self.score = 0.0
        self.valid: list[str] = []
        self.task = ""
        self.done = False
        self._java: Any = None
        self._gateway: Gateway | None = None
        self._history: list[str] = []  # the actions the game was sent

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (GAMES[self.game], self.params, self.fold, self.seed)

    def _start(self) -> dict[str, Any]:
        import orjson

        self._gateway = gateway()
        self._java = self._gateway.acquire(GAMES[self.game], self.params)
        state = orjson.loads(self._gateway.generate(self._java, self.key, self))
        if str(state.get("observation", "")).startswith("ERROR"):
            raise RuntimeError(f"{self.family} {self.item_id}: TextWorldExpress: {state['observation']}")
        self.task = str(self._gateway.call("getTaskDescription", self._java)).strip()
        return state

    def _play(self, action: str) -> dict[str, Any]:
        """Send one action to the game; first, if another game object played this game since, make it
        again and replay this environment's actions (see `Gateway.owner`)."""
        import orjson

        gate = self._gateway
        with gate.lock:
            if gate.owner.get(self.key) is not self:
                gate.generate(self._java, self.key, self)
                for earlier in self._history:
                    self._java.stepJSON(earlier)
            self._history.append(action)
            return orjson.loads(self._java.stepJSON(action))

    def _read(self, state: dict[str, Any]) -> str:
        self.valid = sorted({str(action) for action in state.get("validActions", []) if str(action).strip()})
        return str(state.get("observation", "")).strip()

    def initial_observation(self) -> list[Message]:
        text = self._read(self._start())
        # this order, the game's "Your task ..." after a framing line and the question last, is what the
        # 135M default model answers with an action (8 eval coin games: 4 actions; the task first and an
        # "exactly as written" instruction: none, it asked "What's your task?")
        return [Message(role="user", content=f"You are playing a text game. {self.task} You have {self.max_steps} "
                                             f"moves.\n\n{text}\n\n{_actions_text(self.valid)}\n{INSTRUCTION}")]

    def step(self, action: str) -> StepResult:
        if self.done or self._java is None:
            raise RuntimeError(f"{self.family} {self.item_id}: step {'after the game ended' if self.done else 'before initial_observation'}")
        self.steps += 1
        chosen = match_action(action, self.valid)
        info: dict[str, Any] = {"action": chosen, "step": self.steps}
        reward = 0.0
        success = failure = False
        if chosen is None:
            shown = " ".join(next((line for line in action.splitlines() if line.strip()), "").split())[:80]
            text = f'"{shown}" is not a valid action here.' if shown else "That is not a valid action here."
            info["invalid"] = True
        else:
            state = self._play(chosen)
            text = self._read(state)
            score = float(state.get("score", 0.0))
            reward, self.score = score - self.score, score
            success, failure = bool(state.get("tasksuccess")), bool(state.get("taskfailure"))
            info.update(score=score, tasksuccess=success, taskfailure=failure)
        if success or failure or self.steps >= self.max_steps:
            self.done = True
            info["game_text"] = text
            info["turn_limit"] = not (success or failure)
            self.close()
            return StepResult(reward=reward, done=True, info=info)
        return StepResult(observation=[Message(role="user", content=f"{text}\n\n{_actions_text(self.valid)}")],
                          reward=reward, info=info)

    def gold_actions(self) -> list[str]:
        """A winning action sequence for this game, from TextWorldExpress's own solver (on a game object
        of its own; the solver may find a different path each time)."""
        gate = gateway()
        java = gate.acquire(GAMES[self.game], self.params)
        try:
            gate.generate(java, self.key, java, gold=True)
            return [str(action) for action in gate.call("getGoldActionSequence", java)]
        finally:
            gate.release(GAMES[self.game], self.params, java)

    def close(self) -> None:
        java, self._java = self._java, None
        if java is not None and self._gateway is not None:
            with self._gateway.lock:
                if self._gateway.owner.get(self.key) is self:
                    del self._gateway.owner[self.key]
            self._gateway.release(GAMES[self.game], self.params, java)


# ------------------------------------------------------------------------------------ the family
class TextWorldExpressSettings(BaseModel):
    """How a twx family is set up, apart from the game's own options."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: Literal["easy", "default"] = Field(
        "easy", description="easy: this module's small worlds (EASY_PRESETS); default: TextWorldExpress's own")
    max_steps: int | None = Field(None, ge=1, le=1000, description="actions per game (default: per game and preset)")
    eval_size: int = Field(1000, ge=1, le=1000, description="games of the test fold in the eval split")
    train_size: int = Field(1000, ge=1, le=1000, description="games of the train fold in the train split")


def _option_value(game: str, key: str, value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise EnvSpecError(f"twx:{game}: option {key} must be a whole number, not {value!r}")


class TextWorldExpressFamily:
    """A TextWorldExpress game as a family: train items from the game's train fold, eval items from its
    test fold. `options` are the game's own (`numLocations=3`), on top of the preset; settings: see
    `TextWorldExpressSettings` (they may be given among the options too). Item ids: `eval-17`, `train-3`
    (seed in the environment). An episode succeeds when its summed reward (the game's final score)
    reaches 1.0, which TextWorldExpress gives exactly when it reports task success.
    """

    success_threshold = SUCCESS_THRESHOLD

    def __init__(self, game: str, options: dict[str, Any] | None = None, **settings: Any) -> None:
        game = ALIASES.get(game, game)
        if game not in GAMES:
            raise EnvSpecError(f"unknown TextWorldExpress game {game!r}; available: "
                               f"{', '.join('twx:' + name for name in GAMES)}")
        self.settings, options = family_settings(TextWorldExpressSettings, settings, options, f"twx:{game}")
        known = GAME_OPTIONS[game]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise EnvSpecError(
                f"twx:{game}: unknown option(s) {', '.join(map(repr, unknown))}; this game takes "
                f"{', '.join(known) if known else 'no game options'}; settings: "
                f"{', '.join(TextWorldExpressSettings.model_fields)}")
        config = dict(EASY_PRESETS.get(game, {})) if self.settings.preset == "easy" else {}
        config.update({key: _option_value(game, key, value) for key, value in options.items()})
        self.game, self.config = game, config
        self.name = f"twx:{game}"
        self.params = ",".join(f"{key}={value}" for key, value in sorted(config.items()))
        self.max_steps = self.settings.max_steps or MAX_STEPS[self.settings.preset][game]
        gate = gateway()
        try:  # load and make one game now, so that a bad option fails here and not mid-run
            java = gate.acquire(GAMES[game], self.params)
        except EnvSpecError as error:
            raise EnvSpecError(f"{self.name}: TextWorldExpress rejected the options {self.params or '(none)'} "
                               f"(the {self.settings.preset!r} preset, then -o options): {error}") from None
        try:
            self._seeds = {"train": [int(seed) for seed in gate.call("getSeedsTrain", java)],
                           "eval": [int(seed) for seed in gate.call("getSeedsTest", java)]}
            import orjson

            first = orjson.loads(gate.generate(java, (GAMES[game], self.params, "test", self._seeds["eval"][0]), java))
            if str(first.get("observation", "")).startswith("ERROR"):
                raise EnvSpecError(f"{self.name}: TextWorldExpress cannot make a game with {self.params}: "
                                   f"{first['observation']}")
        finally:
            gate.release(GAMES[game], self.params, java)

    def split_size(self, split: Split) -> int:
        wanted = self.settings.eval_size if split == "eval" else self.settings.train_size
        return min(wanted, len(self._seeds[split]))

    def seed(self, split: Split, index: int) -> int:
        """The game's seed of item `index` of `split` (its train fold for train, its test fold for eval)."""
        if split not in self._seeds:
            raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
        if not 0 <= index < self.split_size(split):
            raise IndexError(f"{self.name}: {split} index {index} outside [0, {self.split_size(split)})")
        return self._seeds[split][index]

    def make(self, split: Split, index: int) -> TextWorldExpressEnvironment:
        seed = self.seed(split, index)
        return TextWorldExpressEnvironment(self.name, f"{split}-{index}", self.game, self.params, seed,
                                           "train" if split == "train" else "test", self.max_steps)

    def exemplar(self, trajectory: Trajectory) -> list[Message]:
        """A won game as a procedure: the task and each move with what it showed, in brief (no lists of
        valid actions), within EXEMPLAR_CHARS where it can be."""
        messages = trajectory.messages()
        limit = OBSERVATION_CHARS
        while True:
            out: list[Message] = []
            for position, message in enumerate(messages):
                if message.role != "user":
                    out.append(message)
                    continue
                text = _game_text(message.content)
                if position == 0:  # the task, then the first room
                    task, _, rest = text.partition("\n\n")
                    text = f"{task}\n{_brief(rest, limit)}" if rest else task
                else:
                    text = _brief(text, limit)
                out.append(Message(role="user", content=text))
            if sum(len(message.content) for message in out) <= EXEMPLAR_CHARS or limit <= 60:
                return out
            limit //= 2

