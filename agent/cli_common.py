"""What every `skillfold` command shares: the console, bad-input handling, opening memory, loading the engine.

`agent/cli.py` (the main commands) and `agent/cli_memory.py` (skills, chat) both build on this
module; neither imports the other's helpers.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from agent.config import ConfigError, ModelConfig
from engines import Engine, load_engine

console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}")  # escaped: user text may hold [brackets]
    raise typer.Exit(2)


@contextmanager
def user_errors():
    """Turn bad-input exceptions into a clear message and exit code 2 (bugs still raise)."""
    from engines.hf import AdapterError
    from engines.models import ModelNotFound
    from envs.base import EnvSpecError
    from memory import InvalidSkill, MemoryStoreError, SkillNotFound, TrajectoryNotFound

    try:
        yield
    except (ConfigError, EnvSpecError, ModelNotFound, AdapterError, MemoryStoreError, InvalidSkill) as error:
        fail(str(error))
    except (SkillNotFound, TrajectoryNotFound) as error:
        fail(str(error.args[0]) if error.args else str(error))


def quiet_libraries() -> None:
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # peft asks transformers a deprecated question when it wraps a model; nothing for a user to do
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def open_memory(home: Path, url: str | None = None):
    from memory import Memory

    if home.exists() and not home.is_dir():
        raise ConfigError(f"skillfold home {home} exists but is not a directory; pass --home DIR")
    with console.status("opening memory"):
        return Memory.open(home=None if url else home, url=url)


def open_engine(model_config: ModelConfig, home: Path | None = None) -> Engine:
    """The engine a model config names; with `home`, `adapter` may be `latest` (the newest fold there) or none."""
    from agent.folding import resolve_adapter

    if home is not None:
        model_config = model_config.model_copy(update={"adapter": resolve_adapter(model_config.adapter, home)})
    with console.status("loading model"):
        return load_engine(model_config)
