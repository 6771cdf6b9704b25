"""Fault injection for test_faults.py: every write a command makes, counted, named and killable by number.

A write is anything that changes what a run leaves behind:
- a file opened for writing, a rename or replace, a removal, a directory made (Python's audit events
  `open`, `os.rename`, `os.remove`, `os.rmdir`, `shutil.rmtree`, `os.mkdir`) under the test's root.
  Files that torch and safetensors write from C++ raise no event: they are all written into a scratch
  directory whose rename (an event) is the write that counts;
- a Chroma write (`Collection.add/upsert/update/delete/modify`, a collection made);
- a LangGraph checkpoint write (`SqliteSaver.put`, `put_writes`).
With `kill_at = k` the k-th write raises `Killed` (a BaseException, so no `except Exception` takes it)
before it is made, and so does every write after it: the process is dead, and a cleanup handler
writes nothing either.

Each write has a site: its kind, the innermost frame of this project's code that made it, and what
it writes (for a LangGraph write, the node it records). The file names in a site lose their digits and
hex (a temporary name, a step number) and an experiment's arm, so a write made again in a loop (the
next batch, step or arm) has the site of the first time; the files written into a scratch directory
(`.ckpt-*`, `.adapter-*`, `*.partial`) that only its rename publishes have the site of the directory; and
the directories one line of code makes (a path and its parents), the plots of a report and the writes of
a scripted stand-in (the tests' fold and SFT) are one site each.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class Killed(BaseException):
    """A kill -9 standing in: raised at a write point, before the write."""


@dataclass
class Faults:
    """The writes under `root` of what runs inside `faults()`; the `kill_at`-th (1-based) kills it."""

    root: str
    kill_at: int | None = None
    count: int = 0
    dead: bool = False
    sites: list[str] = field(default_factory=list)
    scopes: list[str | None] = field(default_factory=list)  # the innermost `scope` each write was made in
    inside: list[str] = field(default_factory=list)

    def write(self, kind: str, target: str = "") -> None:
        if self.dead:
            raise Killed(f"dead: {kind} {target}")
        self.count += 1
        if self.kill_at is None:
            self.sites.append(f"{kind} {target} @ {_caller()}".replace(self.root + "/", ""))
            self.scopes.append(self.inside[-1] if self.inside else None)
        elif self.count == self.kill_at:
            self.dead = True
            raise Killed(f"write {self.count}: {kind} {target}")


_active: Faults | None = None


def site_of(description: str) -> str:
    """A write's site: its description without the digits and hex of names (see the module docstring)."""
    kind, _, rest = description.partition(" ")
    target, _, caller = rest.partition(" @ ")
    target = re.sub(r"(/\.[a-z]+-)[A-Za-z0-9_-]+", r"\1*", target)  # mkdtemp's scratch names
    # a file written into a scratch directory that only the directory's rename publishes: the directory's write
    target = re.sub(r"(/\.(ckpt|adapter)-[^/]*|/[^/]*\.partial)/.*", r"\1/...", target)
    target = re.sub(r"(?<=[/_])(base|memory|sft|fold|skillfold)(?=/|-seed|\.png|$)", "<arm>", target)
    if caller.startswith("tests/"):  # a scripted stand-in (fold, SFT) writing its adapter: one site
        return f"{kind} by the stand-in {caller.split(':')[1]}"
    if kind == "os.mkdir":  # the directories one mkdir(parents=True) makes: one site
        target = ""
    target = re.sub(r"/\.[a-z_<>]+\.png\.tmp$", "/.<plot>.png.tmp", target)  # the report's plots: one site
    return f"{kind} {re.sub(r'[0-9a-f]{6,}|[0-9]+', '#', target)} @ {re.sub(r':[0-9]+$', '', caller)}"


def _caller() -> str:
    """The innermost frame of this project's code (not tests/unit/faults.py) that led to the write."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(ROOT) and not name.endswith("faults.py") and "/.venv/" not in name:
            return f"{os.path.relpath(name, ROOT)}:{frame.f_code.co_name}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"  # a LangGraph checkpoint write: made in LangGraph's own code


def scope(monkeypatch, owner, name: str) -> None:
    """Mark the writes made inside `owner.name` (a function of a module, or a method) with `name`
    (LangGraph runs nodes and checkpoint writes in threads of its own: the stack cannot say)."""
    function = getattr(owner, name)

    @functools.wraps(function)
    def scoped(*args, **kwargs):
        if _active is None:
            return function(*args, **kwargs)
        _active.inside.append(name)
        try:
            return function(*args, **kwargs)
        finally:
            _active.inside.pop()

    monkeypatch.setattr(owner, name, scoped)


def _under_root(path) -> str | None:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        return None
    text = os.path.abspath(os.fspath(path))
    return text if _active is not None and text.startswith(_active.root) else None


def _audit(event: str, args: tuple) -> None:
    faults = _active
    if faults is None:
        return
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITING)
        if writes and (target := _under_root(path)):
            faults.write("open", target)
    elif event in ("os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.mkdir"):
        target = _under_root(args[0])
        if target and not (event == "os.mkdir" and os.path.isdir(target)):  # mkdir(exist_ok=True) changes nothing
            faults.write(event, target)


sys.addaudithook(_audit)  # hooks cannot be removed: this one does nothing while no Faults is active


def _chroma(kind: str, method):
    def write(self, *args, **kwargs):
        if _active is not None:
            name = getattr(self, "name", None) or (args[0] if args else kwargs.get("name", ""))
            _active.write(f"chroma.{kind}", re.sub(r"skills-[0-9a-f]+-", "skills-", str(name)))
        return method(self, *args, **kwargs)

    return write


def _put(method):
    def put(self, config, checkpoint, metadata, new_versions):
        if _active is not None:
            upcoming = sorted(key.removeprefix("branch:to:") for key in checkpoint.get("channel_versions", {})
                              if key.startswith("branch:to:") and key in new_versions)
            _active.write("langgraph.put", "checkpoint before " + ",".join(upcoming or ["the end"]))
        return method(self, config, checkpoint, metadata, new_versions)

    return put


def _put_writes(method):
    def put_writes(self, config, writes, task_id, task_path=""):
        if _active is not None:
            _active.write("langgraph.put_writes", "writes of " + str(task_path).rsplit(",", 1)[-1].strip(" ~')"))
        return method(self, config, writes, task_id, task_path)

    return put_writes


@contextmanager
def faults(root: Path, monkeypatch, kill_at: int | None = None) -> Iterator[Faults]:
    """Count (and with `kill_at`, kill) the writes of what runs inside; Chroma and LangGraph patched."""
    global _active
    from chromadb.api.client import Client
    from chromadb.api.models.Collection import Collection
    from langgraph.checkpoint.sqlite import SqliteSaver

    with monkeypatch.context() as patch:
        for name in ("add", "upsert", "update", "delete", "modify"):
            patch.setattr(Collection, name, _chroma(name, getattr(Collection, name)))
        for name in ("create_collection", "get_or_create_collection"):
            patch.setattr(Client, name, _chroma(name, getattr(Client, name)))
        patch.setattr(SqliteSaver, "put", _put(SqliteSaver.put))
        patch.setattr(SqliteSaver, "put_writes", _put_writes(SqliteSaver.put_writes))
        _active = Faults(str(Path(root).resolve()), kill_at)
        try:
            yield _active
        finally:
            _active = None
