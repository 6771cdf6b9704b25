"""A user's own environments and tools, found without a fork: by spec, by file, or by entry point.

- `package.module:Name` imports an installed (or importable) module and takes `Name` from it;
- `path/to/file.py:Name` loads that file as a module (its directory need not be a package);
- an installed distribution adds a kind `mygame` through the entry-point group `skillfold.envs`,
  and `mygame:level1` then calls that entry point's object with `"level1"` (and the options).

A user's task family is wrapped in `UserFamily`, which holds it to the protocol of `envs.base`:
every problem of the user's code is either a clear `EnvSpecError` before anything runs (an import
error, a name that is not there, an object of the wrong type, a factory that fails) that names the
file and the fix, or a failed episode on record (a `make`, `initial_observation` or `step` that
raises or returns the wrong type). It never crashes a run.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from envs.base import Environment, EnvSpecError, Message, Split, StepResult, close_environment

ENTRY_POINT_GROUP = "skillfold.envs"
FAMILY_FIX = (
    "a task family has `name`, `success_threshold`, `split_size(split)` and `make(split, index)` "
    "(see docs/environments.md)"
)


def is_object_spec(spec: str, top_level: bool = False) -> bool:
    """`package.module:Name` or `file.py:Name` (as opposed to a kind such as `rg:leg_counting`); with
    `top_level`, also `module:Name` for an importable top-level module (asked after the kinds)."""
    location, separator, name = spec.rpartition(":")
    if not separator or not name.isidentifier():
        return False
    if location.endswith(".py") or "." in location or "/" in location or "\\" in location:
        return True
    if not top_level or not location.isidentifier():
        return False
    try:
        return importlib.util.find_spec(location) is not None
    except (ImportError, ValueError):
        return False


def load_object(spec: str) -> tuple[Any, str]:
    """The object a `module:Name` or `file.py:Name` spec names, and where it came from (for messages)."""
    location, _, name = spec.rpartition(":")
    if location.endswith(".py") or "/" in location or "\\" in location:
        module, origin = _load_file(Path(location).expanduser(), spec)
    else:
        origin = location
        try:
            module = importlib.import_module(location)
        except ModuleNotFoundError as error:
            if error.name and location.startswith(error.name):
                raise EnvSpecError(
                    f"{spec}: no module named {location!r}; install the package that provides it, or name a "
                    f"file instead (path/to/file.py:{name})"
                ) from None
            raise EnvSpecError(
                f"{spec}: importing {location} failed: {type(error).__name__}: {error} (install what it needs)"
            ) from None
        except Exception as error:
            raise EnvSpecError(f"{spec}: importing {location} raised {_brief(error)}; fix the module") from None
    if not hasattr(module, name):
        public = sorted(key for key in vars(module) if not key.startswith("_"))[:20]
        raise EnvSpecError(f"{origin} has no {name!r}; it defines: {', '.join(public) or 'nothing public'}")
    return getattr(module, name), origin


def _load_file(path: Path, spec: str):
    if not path.is_file():
        raise EnvSpecError(f"{spec}: no file {path} (a path is relative to the current directory)")
    resolved = path.resolve()
    module_name = f"skillfold_user_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    if module_name in sys.modules:
        return sys.modules[module_name], str(path)
    module_spec = importlib.util.spec_from_file_location(module_name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise EnvSpecError(f"{spec}: {path} cannot be loaded as a Python module; name a .py file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except BaseException as error:
        del sys.modules[module_name]
        if isinstance(error, KeyboardInterrupt):
            raise
        where = _user_line(error, resolved)
        raise EnvSpecError(f"loading {path}{where} raised {_brief(error)}; fix the file") from None
    return module, str(path)


def _brief(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:500]


def _user_line(error: BaseException, path: Path) -> str:
    """' (line N)': the deepest line of `path` in the error's traceback (or its syntax error)."""
    if isinstance(error, SyntaxError) and error.lineno:
        return f" (line {error.lineno})"
    line = None
    traceback = error.__traceback__
    while traceback is not None:
        if Path(traceback.tb_frame.f_code.co_filename) == path:
            line = traceback.tb_lineno
        traceback = traceback.tb_next
    return f" (line {line})" if line else ""


def entry_point_kinds() -> dict[str, Any]:
    """The family kinds installed packages declare in the `skillfold.envs` entry-point group."""
    return {entry.name: entry for entry in entry_points(group=ENTRY_POINT_GROUP)}


def family_from_object(spec: str, options: dict[str, Any]) -> UserFamily:
    """A user's family from a `module:Name` or `file.py:Name` spec: a family class or factory (or object)."""
    target, origin = load_object(spec)
    return UserFamily(_instantiate(target, origin, None, options), origin)


def family_from_entry_point(kind: str, argument: str | None, options: dict[str, Any]) -> UserFamily:
    """A family of an installed kind: its entry point's object, called with `argument` (if any) and options."""
    entry = entry_point_kinds().get(kind)
    if entry is None:
        raise EnvSpecError(f"no installed package declares the environment kind {kind!r}")
    origin = f"entry point {kind} ({entry.value})"
    try:
        target = entry.load()
    except Exception as error:
        raise EnvSpecError(f"{origin}: loading it raised {_brief(error)}; reinstall or fix that package") from None
    return UserFamily(_instantiate(target, origin, argument, options), origin)


def _instantiate(target: Any, origin: str, argument: str | None, options: dict[str, Any]) -> Any:
    """A family object: `target` itself, or what calling it (a class or factory) with the options gives."""
    positional = [] if argument is None else [argument]
    if not inspect.isclass(target) and (_looks_like_family(target) or not callable(target)):
        if options or positional:
            raise EnvSpecError(f"{origin} is a task family object, which takes no options; name its class "
                               "or a factory instead")
        return target
    try:
        inspect.signature(target).bind(*positional, **options)
    except TypeError as error:
        raise EnvSpecError(f"{origin}: the options do not fit {getattr(target, '__name__', target)}"
                           f"{_signature(target)}: {error}; pass its options with -o key=value") from None
    except ValueError:  # no signature to check (a builtin): let the call tell
        pass
    try:
        return target(*positional, **options)
    except EnvSpecError:
        raise
    except Exception as error:
        raise EnvSpecError(f"{origin}: making the family raised {_brief(error)}") from None


def _signature(target: Any) -> str:
    try:
        return str(inspect.signature(target))
    except (TypeError, ValueError):
        return "(...)"


def _looks_like_family(value: Any) -> bool:
    return all(hasattr(value, attribute) for attribute in ("name", "make", "split_size"))


class UserFamily:
    """A user's task family, checked when loaded and held to the protocol while it runs."""

    def __init__(self, family: Any, origin: str) -> None:
        problems = []
        name = getattr(family, "name", None)
        if not isinstance(name, str) or not name.strip():
            problems.append("a `name` (a non-empty string)")
        for method in ("make", "split_size"):
            if not callable(getattr(family, method, None)):
                problems.append(f"a method `{method}`")
        threshold = getattr(family, "success_threshold", 1.0)
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            problems.append("a numeric `success_threshold`")
        if problems:
            raise EnvSpecError(f"{origin} gave an object of type {type(family).__name__}, not a task family: it lacks "
                               f"{', '.join(problems)}; {FAMILY_FIX}")
        sizes = {}
        for split in ("train", "eval"):
            try:
                sizes[split] = family.split_size(split)
            except Exception as error:
                raise EnvSpecError(f"{origin}: {name}.split_size({split!r}) raised {_brief(error)}") from None
            if isinstance(sizes[split], bool) or not isinstance(sizes[split], int) or sizes[split] < 0:
                raise EnvSpecError(f"{origin}: {name}.split_size({split!r}) returned {sizes[split]!r}; "
                                   "it must return the number of items, an int >= 0")
        self.family = family
        self.origin = origin
        self.name: str = name
        self.success_threshold = float(threshold)
        self._sizes = sizes

    def split_size(self, split: Split) -> int:
        return self._sizes[split]

    def make(self, split: Split, index: int) -> Environment:
        """The user's environment, checked; a `make` that fails gives an environment whose episode fails."""
        try:
            environment = self.family.make(split, index)
        except Exception as error:
            return FailedEnvironment(self.name, f"{split}-{index}",
                                     f"{self.origin}: {self.name}.make({split!r}, {index}) raised {_brief(error)}")
        missing = [method for method in ("initial_observation", "step") if not callable(getattr(environment, method, None))]
        if missing:
            return FailedEnvironment(
                self.name, f"{split}-{index}",
                f"{self.origin}: {self.name}.make returned a {type(environment).__name__} without "
                f"{' and '.join(missing)}; an environment has initial_observation() and step(action)")
        return UserEnvironment(environment, self, f"{split}-{index}")

    def __getattr__(self, name: str) -> Any:  # the family's own extras (fact_table, documentation, ...)
        if name == "family":
            raise AttributeError(name)
        return getattr(self.family, name)


class FailedEnvironment:
    """The stand-in for an environment that could not be made: its episode fails with the reason."""

    def __init__(self, family: str, item_id: str, reason: str) -> None:
        self.family, self.item_id, self.reason = family, item_id, reason

    def initial_observation(self) -> list[Message]:
        raise EnvSpecError(self.reason)

    def step(self, action: str) -> StepResult:
        raise EnvSpecError(self.reason)


class UserEnvironment:
    """A user's environment whose answers are checked: a wrong type is an error naming the fix."""

    def __init__(self, environment: Any, family: UserFamily, item_id: str) -> None:
        self.environment = environment
        self.origin = family.origin
        self.family = family.name
        self.item_id = str(getattr(environment, "item_id", item_id))

    def initial_observation(self) -> list[Message]:
        messages = self.environment.initial_observation()
        if isinstance(messages, str):
            raise TypeError(f"{self.origin}: initial_observation() returned a str; return a list of messages, "
                            "e.g. [Message(role='user', content=...)]")
        try:
            return [Message.model_validate(message) for message in messages]
        except (TypeError, ValidationError) as error:
            raise TypeError(f"{self.origin}: initial_observation() must return a list of envs.base.Message "
                            f"(or {{'role', 'content'}} dicts): {_first_line(error)}") from None

    def step(self, action: str) -> StepResult:
        result = self.environment.step(action)
        if isinstance(result, StepResult):
            return result
        if isinstance(result, dict):
            try:
                return StepResult.model_validate(result)
            except ValidationError as error:
                raise TypeError(f"{self.origin}: step() returned a dict that is not a StepResult: "
                                f"{_first_line(error)}") from None
        raise TypeError(f"{self.origin}: step() returned {type(result).__name__}; return "
                        "envs.base.StepResult(observation=[...], reward=..., done=...)")

    def close(self) -> None:
        problem = close_environment(self.environment)
        if problem is not None:
            raise RuntimeError(f"{self.origin}: {problem}")


def _first_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]
