"""Chroma plumbing: opening a client (embedded under a skillfold home, or a server), collection
names, and turning Chroma's errors into ours.

Nothing here deletes or rewrites a store: a home that is a file, a store that cannot be read, or a
server that does not answer ends in `MemoryStoreError` naming the path or url and the fix.

`WriteLock` serializes the read-modify-write steps of one store (usage counts, family baselines,
dedup on add) across the processes of one machine: two processes bumping one count each read the
old value otherwise, and one increment is lost (measured: 34 of 40 baseline episodes counted with
four embedded writers, 37 of 40 through a server).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
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
    """On a `Memory` method: Chroma and transport errors become `MemoryStoreError` naming the store.

    The method reads the store as it is now: first the `Memory` catches up with other writers.
    """

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            args[0].catch_up()  # type: ignore[attr-defined]  # what other processes wrote is read too
            return method(*args, **kwargs)
        except (ChromaError, httpx.HTTPError, ConnectionError) as error:
            store = args[0]  # the Memory: it knows where it lives and how to fix a dead server
            message = f"{method.__name__} failed on the memory store at {store.location}: {error}"
            raise MemoryStoreError(message + store.fix_hint) from error

    return wrapper


class LockUnavailable(MemoryStoreError):
    """The write lock's file cannot be opened (a read-only home): reading the store still works."""


class WriteLock:
    """An exclusive `flock` on a file, reentrant within a process (its threads included).

    Embedded, the file is `<home>/chroma/writes.lock`, and it also holds the store's generation: a
    count of the locked writes made so far. For a server, the file is in the temporary directory,
    named after the server's address, so every process of this machine that writes to that server
    takes the same lock; processes on other machines do not see it (docs/benchmarks.md).
    """

    def __init__(self, path: Path, location: str, generations: bool) -> None:
        self.path = path
        self.location = location
        self.generations = generations
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    def __enter__(self) -> bool:
        """True for the outermost holder of this process."""
        self._thread_lock.acquire()
        try:
            if self._depth == 0:
                fcntl.flock(self._descriptor(), fcntl.LOCK_EX)
            self._depth += 1
        except BaseException:
            self._thread_lock.release()
            raise
        return self._depth == 1

    def __exit__(self, *exc_info: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()

    def generation(self) -> int:
        """The count of locked writes to an embedded store (0 before the first; a server's is always 0)."""
        if not self.generations or (self._fd is None and not self.path.exists()):
            return 0
        return int.from_bytes(os.pread(self._descriptor(), 8, 0).ljust(8, b"\0"), "little")

    def bump(self) -> int:
        """Count one more write (held by the caller); the new generation."""
        generation = self.generation() + 1
        if self.generations:
            os.pwrite(self._descriptor(), generation.to_bytes(8, "little"), 0)
        return generation

    def _descriptor(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as error:
                if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise self._error(error) from error
                try:  # another user's lock file (sticky /tmp), a read-only home: flock needs no write access
                    self._fd = os.open(self.path, os.O_RDONLY)
                except OSError as again:
                    raise self._error(again) from again
        return self._fd

    def _error(self, error: OSError) -> LockUnavailable:
        return LockUnavailable(
            f"cannot take the write lock {self.path} of the memory store at {self.location} "
            f"({type(error).__name__}: {error}); make its directory writable"
        )

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


def serialized(method: Callable[P, R]) -> Callable[P, R]:
    """On a `Memory` method that reads, then writes what it read: hold the store's `WriteLock`.

    The outermost call first catches up with what other processes wrote (`Memory.catch_up`), and
    counts its own write when it is done.
    """

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        store = args[0]
        with store.write_lock as outermost:  # type: ignore[attr-defined]
            if outermost:
                store.catch_up()  # type: ignore[attr-defined]
            try:
                return method(*args, **kwargs)
            finally:
                if outermost:
                    store.wrote()  # type: ignore[attr-defined]

    return wrapper


def write_lock(home: Path | None, url: str | None) -> WriteLock:
    """The lock of the store `open_client(home, url)` opens."""
    if (home is None) == (url is None):
        raise ValueError("Memory.open needs exactly one of home (a directory) or url (a Chroma server)")
    if home is not None:
        path = Path(home).expanduser() / "chroma"
        return WriteLock(path / "writes.lock", str(path), generations=True)
    assert url is not None
    parsed = urlsplit(url if "://" in url else f"http://{url}")
    try:
        address = f"{parsed.scheme}://{parsed.hostname}:{parsed.port or (443 if parsed.scheme == 'https' else 8000)}"
    except ValueError:  # a bad port: `_connect` says so
        address = url
    digest = hashlib.sha1(address.encode("utf-8")).hexdigest()[:16]
    return WriteLock(Path(tempfile.gettempdir()) / f"skillfold-chroma-{digest}.lock", url, generations=False)


def fresh_client(path: Path, stale: ClientAPI | None = None) -> ClientAPI:
    """A PersistentClient with a view of the store at `path` of its own, loaded from disk now.

    chromadb keeps one view (System) per path and process, and a view does not see what another
    process wrote since it was loaded. Worse, a stale view persisting its vector index drops what
    the other process indexed (chroma-core/chroma#3792; measured: 400 of 1600 skills written by
    four processes could no longer be found by search). So each `Memory` gets its own view, and
    loads a new one when the store's generation says that another process wrote.
    `stale`: the client whose view this replaces; it is stopped, so it can persist nothing more.
    """
    from chromadb.api.shared_system_client import SharedSystemClient

    identifier = str(path)
    SharedSystemClient._identifier_to_system.pop(identifier, None)
    SharedSystemClient._identifier_to_refcount.pop(identifier, None)
    if stale is not None:
        stale._server.stop()  # type: ignore[attr-defined]  # its Rust bindings go
    return chromadb.PersistentClient(path=identifier, settings=Settings(anonymized_telemetry=False))


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
            raise MemoryStoreError(
                f"cannot create the skillfold home {home} ({error.strerror}); pass a home you can write (--home DIR)"
            ) from error
    path = home / "chroma"
    if path.exists() and not path.is_dir():
        raise MemoryStoreError(
            f"{path} (the memory store of home {home}) exists but is not a directory; move it aside"
        )
    try:
        client = fresh_client(path)
        client.list_collections()
    except Exception as error:  # chromadb raises InternalError, OSError, sqlite errors, ...
        raise MemoryStoreError(
            f"the memory store at {path} cannot be opened ({type(error).__name__}: {error}); it may be corrupt or "
            f"from another Chroma version. Nothing was changed or deleted: move {path} aside to start an empty "
            "store, or restore it from a backup"
        ) from error
    return client, str(path), ""


@contextlib.contextmanager
def _interrupt_noted() -> Iterator[threading.Event]:
    """Ctrl-C while the probe waits, noted as well as raised.

    Python runs a signal's handler at whatever bytecode the main thread is in, and the KeyboardInterrupt
    it raises inside an object's ``__del__`` (the garbage collector can run one at any allocation, httpx
    closes a client per try) is printed as "Exception ignored" and dropped: the probe would wait out its
    whole time and blame the server. The Event keeps the interrupt for the loop to raise again. Only the
    default handler is wrapped, and only on the main thread (the only one that may set handlers).
    """
    interrupted = threading.Event()
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield interrupted
        return

    def note(signum: int, frame: object) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, note)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


PROBE_TIMEOUT_S = 10.0
PROBE_TRY_S = 0.5


def _connect(url: str) -> tuple[ClientAPI, str, str]:
    parsed = urlsplit(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise MemoryStoreError(
            f"cannot read a Chroma server address from {url!r}; write it as http://HOST:PORT"
        )
    ssl = parsed.scheme == "https"
    try:
        port = parsed.port or (443 if ssl else 8000)
    except ValueError:
        raise MemoryStoreError(f"the port of {url!r} is not a number; write it as http://HOST:PORT") from None
    start = f"`chroma run --path <dir> --host {parsed.hostname} --port {port}`"
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    # Chroma's own client waits forever on a server that accepts and never answers. The probe asks in
    # short tries, so that the main thread comes back to Python often: a Ctrl-C that another thread of
    # the process received is acted on within a try, not after the whole wait.
    heartbeat = f"{parsed.scheme}://{host}:{port}/api/v2/heartbeat"
    with _interrupt_noted() as interrupted:
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        while True:
            try:
                httpx.get(heartbeat, timeout=max(0.05, min(PROBE_TRY_S, deadline - time.monotonic())))
                break
            except httpx.TimeoutException as error:
                if time.monotonic() < deadline and not interrupted.is_set():
                    continue
                if interrupted.is_set():
                    raise KeyboardInterrupt from None
                raise MemoryStoreError(
                    f"no Chroma server answers at {url} within {PROBE_TIMEOUT_S:.0f} s; start one with {start}, or "
                    "fix the url"
                ) from error
            except httpx.HTTPError:
                break  # refused, unresolvable ...: the client below says so in its own words
        if interrupted.is_set():
            raise KeyboardInterrupt
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
