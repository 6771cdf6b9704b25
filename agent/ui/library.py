"""What the pages show, read from memory through its public API: one row per skill, filtered and sorted.

`SkillRows` keeps the rows of the whole library between requests and reads them again when the
store has changed: an embedded store counts its writes (its generation), so a page after a write
by `skillfold run` reads the new rows; a Chroma server has no such count, so its rows are read
again when older than `SERVER_ROWS_TTL_S`. A large library is read again in the background while
the pages show the rows read before (reading 10k skills takes seconds: docs/benchmarks.md).

Token counts in the table are estimates (characters / 4); the retrieval debugger counts with the
model's tokenizer when it has one (`token_counter`), as the agent loop does.
"""

from __future__ import annotations

import difflib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from memory import FamilyStats, Memory, Skill

STATUSES = ("active", "pending", "folded", "retired")
KINDS = ("exemplar", "rule", "taught")
SORT_KEYS = ("family", "kind", "status", "uses", "helpfulness", "tokens", "created", "updated", "title")
SERVER_ROWS_TTL_S = 2.0
REFRESH_SPACING = 10  # a background read of the rows starts at least 10x its last duration after it
logger = logging.getLogger(__name__)


def estimate_tokens(text: str) -> int:
    """Tokens a text takes in a prompt, estimated as characters / 4 (no tokenizer is loaded)."""
    return max(1, math.ceil(len(text) / 4))


@dataclass(frozen=True)
class SkillRow:
    id: str
    family: str
    kind: str
    status: str
    demoted: bool
    title: str
    uses: int
    successes: int
    helpfulness: float
    tokens: int
    created: datetime
    updated: datetime
    searchable: str  # title and text, lower case, for the text filter
    status_changes: tuple[tuple[datetime, str], ...]  # (when, status) from the status history

    @classmethod
    def of(cls, skill: Skill, baseline: FamilyStats) -> SkillRow:
        return cls(
            id=skill.id,
            family=skill.family,
            kind=skill.kind,
            status=skill.status,
            demoted=skill.demoted,
            title=skill.title or skill.text.strip().splitlines()[0][:120],
            uses=skill.uses,
            successes=skill.successes_with,
            helpfulness=skill.helpfulness(baseline).mean,
            tokens=estimate_tokens(skill.text),
            created=skill.created_at,
            updated=skill.updated_at,
            searchable=f"{skill.title}\n{skill.text}\n{skill.id}".lower(),
            status_changes=tuple((change.time, change.status) for change in skill.status_history),
        )


def read_rows(memory: Memory) -> list[SkillRow]:
    skills = memory.list_skills()
    baselines = {family: memory.family_stats(family) for family in {skill.family for skill in skills}}
    return [SkillRow.of(skill, baselines[skill.family]) for skill in skills]


class SkillRows:
    """The rows of every skill, read again when the store has been written since (module docstring).

    A library of fewer than `synchronous_below` skills is read again before the page is rendered. A
    larger one (10k skills take seconds to read) is read again in a background thread, through a
    `Memory` of its own from `open_reader`, while pages show the rows read before (`refreshing`),
    and at most every `REFRESH_SPACING` times its last read's duration, so that a run writing all
    the time does not keep a core busy reading.
    """

    def __init__(self, open_reader: Callable[[], Memory], synchronous_below: int = 2000) -> None:
        self.open_reader = open_reader
        self.synchronous_below = synchronous_below
        self.refreshing = False
        self.behind = False  # the store has changed since the rows were read
        self.read_at: datetime | None = None
        self._rows: list[SkillRow] | None = None
        self._key: object = None
        self._read_clock = 0.0
        self._read_seconds = 0.0
        self._lock = threading.Lock()
        self._reader: Memory | None = None

    def _store_key(self, memory: Memory) -> object:
        lock = memory.write_lock
        if getattr(lock, "generations", False):
            memory.catch_up()
            return lock.generation()  # type: ignore[attr-defined]
        return None  # a server: no write count

    def _stale(self, key: object) -> bool:
        if key is None:
            return time.monotonic() - self._read_clock >= SERVER_ROWS_TTL_S
        return key != self._key

    def get(self, memory: Memory) -> list[SkillRow]:
        """The rows; `memory` is the caller's (read with it when the rows must be read now)."""
        key = self._store_key(memory)
        with self._lock:
            self.behind = self._rows is not None and self._stale(key)
            if self._rows is None or (self._stale(key) and len(self._rows) < self.synchronous_below):
                started = time.monotonic()
                self._store(read_rows(memory), key)
                self._read_seconds = time.monotonic() - started
            elif self._stale(key) and not self.refreshing and self._rested():
                self.refreshing = True
                threading.Thread(target=self._refresh, args=(key,), daemon=True).start()
            assert self._rows is not None
            return self._rows

    def _rested(self) -> bool:
        """A background read spends at most a tenth of the time: reading 10k skills takes seconds."""
        return time.monotonic() - self._read_clock >= REFRESH_SPACING * self._read_seconds

    def _store(self, rows: list[SkillRow], key: object) -> None:
        self._rows, self._key, self.behind = rows, key, False
        self._read_clock, self.read_at = time.monotonic(), datetime.now().astimezone()

    def _refresh(self, key: object) -> None:
        try:
            if self._reader is None:
                self._reader = self.open_reader()
            started = time.monotonic()
            rows = read_rows(self._reader)
            with self._lock:
                self._store(rows, key)
                self._read_seconds = time.monotonic() - started
        except Exception:  # the next page asks again; the page shows the rows it has
            logger.exception("reading the skill library again failed")
        finally:
            self.refreshing = False


@dataclass(frozen=True)
class LibraryQuery:
    family: str = ""
    kind: str = ""
    status: str = ""
    text: str = ""
    sort: str = "updated"
    descending: bool = True
    page: int = 1


def filter_rows(rows: list[SkillRow], query: LibraryQuery) -> list[SkillRow]:
    needle = query.text.strip().lower()
    kept = [
        row
        for row in rows
        if (not query.family or row.family == query.family)
        and (not query.kind or row.kind == query.kind)
        and (not query.status or row.status == query.status)
        and (not needle or needle in row.searchable)
    ]
    sort = query.sort if query.sort in SORT_KEYS else "updated"

    def key(row: SkillRow) -> Any:
        return row.helpfulness if sort == "helpfulness" else getattr(row, sort)

    return sorted(kept, key=lambda row: (key(row), row.id), reverse=query.descending)


def counts(rows: list[SkillRow]) -> dict[str, dict[str, int]]:
    """{family: {status: n, "total": n}} with a "(all)" row first."""
    table: dict[str, dict[str, int]] = {"(all)": dict.fromkeys((*STATUSES, "total"), 0)}
    for row in rows:
        family = table.setdefault(row.family, dict.fromkeys((*STATUSES, "total"), 0))
        for target in (family, table["(all)"]):
            target[row.status] += 1
            target["total"] += 1
    return {"(all)": table.pop("(all)"), **dict(sorted(table.items()))}


def growth(rows: list[SkillRow], points: int = 120) -> tuple[list[datetime], dict[str, list[int]]]:
    """Skills of each status over time: (times, {status: count at each time}), at most `points` times.

    A skill counts as active from its creation (pending, if it was stored pending by `run --pending`),
    then as each status its history names from then on.
    """
    events: list[tuple[datetime, str, int]] = []  # (when, status, +1 or -1)
    for row in rows:
        status = "pending" if row.status_changes[:1] and row.status_changes[0][1] == "pending" else "active"
        events.append((row.created, status, 1))
        for moment, changed in row.status_changes:
            if changed != status:
                events += [(moment, status, -1), (moment, changed, 1)]
                status = changed
    if not events:
        return [], {}
    events.sort(key=lambda event: event[0])
    step = max(1, len(events) // points)
    counts = dict.fromkeys(STATUSES, 0)
    times: list[datetime] = []
    series: dict[str, list[int]] = {status: [] for status in STATUSES}
    for index, (moment, status, change) in enumerate(events):
        counts[status] = counts.get(status, 0) + change
        if index % step == 0 or index == len(events) - 1:
            times.append(moment)
            for name in STATUSES:
                series[name].append(counts[name])
    return times, series


def version_diffs(skill: Skill) -> list[dict[str, Any]]:
    """Each version with its line diff against the one before: [(tag, line)], tag one of ' ', '+', '-'."""
    shown = []
    previous: list[str] | None = None
    for version in skill.versions:
        lines = version.text.splitlines()
        diff = []
        if previous is not None:
            for line in difflib.ndiff(previous, lines):
                if line[:1] in (" ", "+", "-"):
                    diff.append((line[:1], line[2:]))
        shown.append({"version": version, "diff": diff, "merged": "merge" in version.reason.lower()})
        previous = lines
    return shown


def pages(total: int, page: int, size: int) -> dict[str, int]:
    last = max(1, math.ceil(total / size))
    page = min(max(1, page), last)
    return {"page": page, "last": last, "start": (page - 1) * size, "stop": min(total, page * size), "total": total}


@dataclass(frozen=True)
class TrajectoryPage:
    shown: list[Any]  # envs.base.Trajectory, in the order stored
    next_start: int | None  # where the next page starts scanning (None: nothing after)
    scanned: int
    cut_short: bool  # the scan budget ran out before the page was full


@dataclass(frozen=True)
class TrajectoryFilter:
    env: str = ""
    split: str = ""
    success: bool | None = None
    run: str = ""  # the id's prefix: episode ids are `<run id>-<item index>`
    skill: str = ""  # a skill id the prompt held

    def keeps(self, trajectory: Any) -> bool:
        return (
            (not self.split or trajectory.split == self.split)
            and (self.success is None or trajectory.success == self.success)
            and (not self.run or trajectory.id.startswith(self.run + "-"))
            and (not self.skill or self.skill in trajectory.skill_ids)
        )

    @property
    def scans(self) -> bool:
        return bool(self.split or self.success is not None or self.run or self.skill)


def scan_trajectories(
    memory: Memory, wanted: TrajectoryFilter, start: int, size: int, chunk: int | None = None, budget: int = 3000,
) -> TrajectoryPage:
    """A page of the family's episodes from stored position `start`, keeping those `wanted` keeps.

    The family is a Chroma filter (`where`); split and success are checked here, on at most
    `budget` episodes per page (so are the run and the skill, which Chroma cannot filter on): a
    filter that matches most of 100k episodes costs Chroma 300-600 ms
    however few are asked for (docs/benchmarks.md), a scan of a few hundred a few ms. Positions
    count the family's episodes, so a page is found again from its start, however deep.
    """
    shown: list[Any] = []
    position, scanned = start, 0
    chunk = chunk or (min(4 * (size + 1), 200) if wanted.scans else size + 1)
    while scanned < budget:
        batch = memory.list_trajectories(env=wanted.env or None, limit=chunk, offset=position)
        for index, trajectory in enumerate(batch):
            if wanted.keeps(trajectory):
                if len(shown) == size:
                    return TrajectoryPage(shown, position + index, scanned + index, False)
                shown.append(trajectory)
        position += len(batch)
        scanned += len(batch)
        if len(batch) < chunk:
            return TrajectoryPage(shown, None, scanned, False)
    return TrajectoryPage(shown, position, scanned, True)


def token_counter(model_dir: Path | None) -> tuple[Callable[[str], int], str]:
    """(count, how it counts): a skill's prompt tokens as the loop counts them, with the tokenizer of
    `model_dir` (a user message rendered by the chat template), else `estimate_tokens`."""
    if model_dir is not None and (model_dir / "tokenizer_config.json").is_file():
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        except (OSError, ValueError) as error:
            logger.warning("cannot load the tokenizer of %s (%s): token counts are estimates", model_dir, error)
        else:
            def count(text: str) -> int:
                rendered = tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
                )
                return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])

            return count, f"counted by the tokenizer of {model_dir}, as the agent loop counts them"
    return estimate_tokens, "estimated as characters / 4 (no tokenizer: `skillfold ui --tokenizer MODEL_DIR`)"


def usage_over_time(memory: Memory, skill: Skill, budget: int = 3000) -> tuple[dict[str, list[tuple[datetime, float]]], int, bool]:
    """The skill's success rate over time, cumulative, beside the family's baseline (episodes with no
    skill in the prompt), from its family's episodes in the order they were stored, counted as the skill's
    uses and the family's baseline are (every split): ({label: [(time,
    rate)]}, episodes scanned, whether the scan stopped at `budget` before the end)."""
    series: dict[str, list[tuple[datetime, float]]] = {"with it": [], "family baseline (no skills)": []}
    counts = {label: [0, 0] for label in series}
    offset = 0
    while True:
        want = min(500, budget - offset)
        if want <= 0:
            return series, offset, True
        batch = memory.list_trajectories(env=skill.family, limit=want, offset=offset)
        for trajectory in batch:
            label = ("with it" if skill.id in trajectory.skill_ids
                     else "family baseline (no skills)" if not trajectory.skill_ids else None)
            if label is None:
                continue
            counts[label][0] += int(trajectory.success)
            counts[label][1] += 1
            series[label].append((trajectory.started_at, counts[label][0] / counts[label][1]))
        offset += len(batch)
        if len(batch) < want:
            return series, offset, False
