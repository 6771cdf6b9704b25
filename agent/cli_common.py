"""What every `skillfold` command shares: the console, bad-input handling, opening memory, loading the engine.

`agent/cli.py` (the main commands) and `agent/cli_memory.py` (skills, chat) both build on this
module; neither imports the other's helpers.
"""

from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from agent.config import ConfigError, ModelConfig
from engines import Engine, load_engine

console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
verbose = False  # `skillfold --verbose`: a handled error shows its traceback too


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}")  # escaped: user text may hold [brackets]
    raise typer.Exit(2)


def _failed(message: str) -> None:
    """`fail`, from inside an `except` block: with --verbose, the traceback first."""
    if verbose:
        console.print_exception()
    fail(message)


# Errors of the machine's files, not of our code: a path that is a file, unwritable, a full disk.
_PATH_ERRORS = {
    errno.EACCES: "cannot write {path} ({reason}); pass a --home (or --out) you can write, or fix its permissions",
    errno.EPERM: "cannot write {path} ({reason}); pass a --home (or --out) you can write, or fix its permissions",
    errno.EROFS: "cannot write {path} ({reason}); pass a --home (or --out) on a writable disk",
    errno.ENOTDIR: "{path}: part of this path is a file, not a directory ({reason}); pass --home (or --out) DIR",
    errno.EISDIR: "{path} is a directory where a file belongs ({reason}); move it aside or pass another path",
    errno.ENOSPC: "no space left to write {path}; free some space, or pass --home (or --out) on another disk",
    errno.EDQUOT: "disk quota exceeded writing {path}; free some space, or pass --home (or --out) on another disk",
}


@contextmanager
def user_errors():
    """Turn bad-input exceptions into a clear message and exit code 2 (bugs still raise); Ctrl-C into 130."""
    from engines.base import AdapterError, EngineUnavailable
    from engines.models import ModelNotFound
    from envs.base import EnvSpecError
    from memory import InvalidSkill, MemoryStoreError, SkillNotFound, TrajectoryNotFound

    try:
        yield
    except (ConfigError, EnvSpecError, ModelNotFound, AdapterError, EngineUnavailable, MemoryStoreError,
            InvalidSkill) as error:
        _failed(str(error))
    except (SkillNotFound, TrajectoryNotFound) as error:
        _failed(str(error.args[0]) if error.args else str(error))
    except OSError as error:
        if error.errno not in _PATH_ERRORS or not error.filename:
            raise
        _failed(_PATH_ERRORS[error.errno].format(path=error.filename, reason=error.strerror))
    except KeyboardInterrupt:  # typer would turn it into a silent exit 130
        console.print("interrupted")
        raise typer.Exit(130) from None


def check_home(home: Path) -> None:
    """A home that is a file, lies under a file, or cannot be written: a ConfigError naming --home.

    Nothing is created here: a command creates its home when it first writes there.
    """
    home = home.expanduser()
    existing = next((path for path in (home, *home.parents) if path.exists()), Path("."))
    if existing == home and not home.is_dir():
        raise ConfigError(f"skillfold home {home} exists but is not a directory; pass --home DIR")
    if not existing.is_dir():
        raise ConfigError(f"skillfold home {home} cannot be created: {existing} is a file; pass --home DIR")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"skillfold home {home} cannot be written ({existing}: permission denied); pass --home DIR that "
            "you can write, or fix its permissions"
        )


def quiet_libraries() -> None:
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # peft asks transformers a deprecated question when it wraps a model; nothing for a user to do
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def open_memory(home: Path, url: str | None = None):
    from memory import Memory

    check_home(home)
    with console.status("opening memory"):
        return Memory.open(home=None if url else home, url=url)


def engine_flags(kind: str | None, urls: list[str] | None) -> dict:
    """The config keys of `--engine KIND` and `--engine-url URL` (repeatable; a URL implies vllm)."""
    flags: dict = {}
    if kind is not None:
        if kind not in ("hf", "vllm"):
            raise ConfigError(f"--engine takes hf or vllm, not {kind!r}")
        flags["model.kind"] = kind
    if urls:
        flags["model.kind"] = kind or "vllm"
        flags["model.urls"] = list(urls)
    return flags


def open_engine(model_config: ModelConfig, home: Path | None = None) -> Engine:
    """The engine a model config names; with `home`, `adapter` may be `latest` (the newest fold there) or none."""
    from agent.folding import resolve_adapter

    if home is not None:
        model_config = model_config.model_copy(update={"adapter": resolve_adapter(model_config.adapter, home)})
    with console.status("loading model"):
        return load_engine(model_config)


def open_engine_and_memory(model_config: ModelConfig, home: Path, url: str | None, memory: bool = True):
    """(engine, memory or None), opened in the order that fails fastest and writes nothing on bad input.

    A Chroma server is asked first (a dead one fails before a model loads); an embedded store is
    opened once the model has loaded (a broken model leaves the home as it was).
    """
    store = open_memory(home, url) if memory and url else None
    engine = open_engine(model_config, home)
    if memory and not url:
        store = open_memory(home)
    return engine, store
