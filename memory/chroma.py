"""Chroma plumbing: opening a client (embedded under a skillfold home, or a server), collection
names, and turning Chroma's errors into ours.

Nothing here deletes or rewrites a store: a home that is a file, a store that cannot be read, or a
server that does not answer ends in `MemoryStoreError` naming the path or url and the fix.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar
from urllib.parse import urlsplit

import chromadb
import httpx
from chromadb.api import ClientAPI
from chromadb.config import Settings
from chromadb.errors import ChromaError

from memory.errors import MemoryStoreError


def cosine() -> dict:
    """A fresh collection configuration: Chroma writes the embedding function into the one it gets."""
    return {"hnsw": {"space": "cosine"}}


P = ParamSpec("P")
R = TypeVar("R")


def family_collection_names(family: str) -> tuple[str, str]:
    """(active, archive) collection names: a hash, since family names hold ':' and any length."""
    digest = hashlib.sha1(family.encode("utf-8")).hexdigest()[:16]
    return f"skills-{digest}-active", f"skills-{digest}-archive"


def guarded(method: Callable[P, R]) -> Callable[P, R]:
    """On a `Memory` method: Chroma and transport errors become `MemoryStoreError` naming the store."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except (ChromaError, httpx.HTTPError, ConnectionError) as error:
            store = args[0]  # the Memory: it knows where it lives and how to fix a dead server
            message = f"{method.__name__} failed on the memory store at {store.location}: {error}"
            raise MemoryStoreError(message + store.fix_hint) from error

    return wrapper


# A fresh Settings per client: HttpClient writes its server address into the one it is given.
def open_client(home: Path | None, url: str | None, create: bool = True) -> tuple[ClientAPI, str, str]:
    """(client, location, hint for errors): PersistentClient at `home/"chroma"`, or HttpClient at `url`."""
    if (home is None) == (url is None):
        raise ValueError("Memory.open needs exactly one of home (a directory) or url (a Chroma server)")
    if url is not None:
        return _connect(url)
    assert home is not None
    return _open_home(Path(home), create)


def _open_home(home: Path, create: bool) -> tuple[ClientAPI, str, str]:
    home = home.expanduser()
    if home.exists() and not home.is_dir():
        raise MemoryStoreError(
            f"the skillfold home {home} exists but is not a directory; pass a directory as home"
        )
    if not home.exists():
        if not create:
            raise MemoryStoreError(
                f"there is no skillfold home at {home}; create it or open with create=True"
            )
        try:
            home.mkdir(parents=True)
        except OSError as error:
            raise MemoryStoreError(f"cannot create the skillfold home {home}: {error}") from error
    path = home / "chroma"
    if path.exists() and not path.is_dir():
        raise MemoryStoreError(
            f"{path} (the memory store of home {home}) exists but is not a directory; move it aside"
        )
    try:
        client = chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))
        client.list_collections()
    except Exception as error:  # chromadb raises InternalError, OSError, sqlite errors, ...
        raise MemoryStoreError(
            f"the memory store at {path} cannot be opened ({type(error).__name__}: {error}); it may be corrupt or "
            f"from another Chroma version. Nothing was changed or deleted: move {path} aside to start an empty "
            "store, or restore it from a backup"
        ) from error
    return client, str(path), ""


def _connect(url: str) -> tuple[ClientAPI, str, str]:
    parsed = urlsplit(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise MemoryStoreError(
            f"cannot read a Chroma server address from {url!r}; write it as http://HOST:PORT"
        )
    ssl = parsed.scheme == "https"
    port = parsed.port or (443 if ssl else 8000)
    start = f"`chroma run --path <dir> --host {parsed.hostname} --port {port}`"
    try:
        client = chromadb.HttpClient(
            host=parsed.hostname, port=port, ssl=ssl, settings=Settings(anonymized_telemetry=False)
        )
        client.heartbeat()
    except Exception as error:  # ValueError("Could not connect ..."), httpx errors, ...
        raise MemoryStoreError(
            f"no Chroma server answers at {url} ({error}); start one with {start}, or fix the url"
        ) from error
    hint = f"; is the Chroma server at {url} still running? Start it with {start}"
    return client, url, hint
