"""The `skillfold ui` command: the skill library in a browser (the app itself is agent/ui/).

Registered on the main app in `agent/cli.py`. The store is opened (and the port bound) before the
URL is printed, so a missing or corrupt home, an unreachable server or a taken port ends with a
one-line error and exit code 2, and nothing is written. The URL is the last line of stdout.
"""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from typing import Annotated

import typer

from agent.cli_common import console, fail, user_errors
from agent.config import default_home

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def ui_command(
    home: Annotated[Path | None, typer.Option(help="skillfold home (default $SKILLFOLD_HOME or ./.skillfold)")] = None,
    memory_url: Annotated[str | None, typer.Option(help="Chroma server URL instead of the embedded store")] = None,
    port: Annotated[int, typer.Option(help="port to serve on (0: any free port)")] = 8765,
    host: Annotated[str, typer.Option(help="address to bind; any other than 127.0.0.1/localhost needs --token")] = "127.0.0.1",
    token: Annotated[str | None, typer.Option(help="secret every request must carry (the printed URL holds it)")] = None,
    allow_edits: Annotated[bool, typer.Option("--allow-edits", help="allow retire, restore and edit (read-only without)")] = False,
    experiment: Annotated[Path | None, typer.Option(help="an experiment directory (`skillfold experiment --out`) to show")] = None,
    tokenizer: Annotated[Path | None, typer.Option(
        help="model directory whose tokenizer counts the retrieval debugger's tokens (default: the embedded "
             "model's, when pulled; else an estimate)")] = None,
) -> None:
    """Serve the skill library as a web app: library, skills, trajectories, retrieval, folds."""
    import uvicorn

    from agent.ui import UiSettings, create_app, open_library

    local = host in LOCAL_HOSTS
    if not local and not token:
        fail(f"serving on {host} lets other machines read the library: pass --token SECRET (checked on every "
             "request), or bind 127.0.0.1")
    if token is not None and len(token) < 8:
        fail("--token must be at least 8 characters")
    if experiment is not None and not (experiment / "metrics.json").is_file():
        fail(f"{experiment} holds no metrics.json: pass the --out directory of a `skillfold experiment` run")
    home = home or default_home()
    with user_errors():
        with console.status("opening memory"):
            memory = open_library(home, memory_url)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        fail(f"cannot serve on {host}:{port} ({error.strerror}); pass another --port (0 picks a free one)")
    bound = listener.getsockname()[1]
    names = ("127.0.0.1", "localhost", "[::1]") if local else ()
    if tokenizer is None:
        from engines.models import default_model_dir

        tokenizer = default_model_dir() if (default_model_dir() / "tokenizer_config.json").is_file() else None
    settings = UiSettings(home=home, memory_url=memory_url, token=token, allow_edits=allow_edits,
                          experiment=experiment, allowed_hosts=names, tokenizer=tokenizer)
    app = create_app(settings)
    app.state.ui.memory = memory
    with user_errors(), console.status("reading the skill library"):
        app.state.ui.rows.get(memory)  # the first page is then as fast as the others
    shown = f"[{host}]" if ":" in host else host
    console.print(f"skillfold ui: {'edits on' if allow_edits else 'read-only'}; Ctrl-C stops it")
    print(f"http://{shown}:{bound}/" + (f"?token={token}" if token else ""), flush=True)
    # the embedding model loads in seconds: load it now, so that the first search by meaning does not wait
    threading.Thread(target=_warm_up, args=(memory,), daemon=True).start()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    server.run(sockets=[listener])


def _warm_up(memory) -> None:
    try:
        memory.embedding(["warm up"])
    except Exception:  # the first search says what is wrong, on its page
        logging.getLogger(__name__).debug("loading the embedding model failed", exc_info=True)
