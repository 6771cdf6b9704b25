"""`Memory`: the trajectory store and the skill library, kept in Chroma and nowhere else.

Layout of the Chroma database (embedded under `<home>/chroma`, or on a Chroma server):

- `trajectories`: one record per episode; the document is the task text, the metadata holds the
  scalars to filter on and the whole `Trajectory` as JSON (`memory.records`).
- `skills-<sha1(family)[:16]>-active`: the active skills of one task family. Its collection metadata
  holds the family name and the family's baseline counts (episodes without skills, and successes).
- `skills-<sha1(family)[:16]>-archive`: the family's pending, folded and retired skills.

A family-scoped search for active skills is therefore an unfiltered query on a small collection,
never a `where` filter (which measured 33-98 ms at 100k records). A status change moves the record:
the full record is written to the other collection first, then deleted from the old one, so a crash
in between leaves two copies (reads take the newer) and never none.

Every write that reads first (a usage count, a family baseline, dedup on add) holds the store's
`WriteLock`, so several processes of one machine writing one store lose no count (`memory.chroma`).
A kill between storing episodes and counting their usage neither loses nor doubles a count: see
`_store_trajectories`.

Every write of a skill writes its whole flattened record in one call. Embeddings are computed here,
once per text, and handed to Chroma, so dedup queries and upserts share them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
from chromadb.api import ClientAPI
from chromadb.api.models.Collection import Collection
from chromadb.api.types import EmbeddingFunction
from chromadb.errors import ChromaError, NotFoundError
from pydantic import BaseModel, ConfigDict, Field

from envs.base import Trajectory
from memory.chroma import (
    LockUnavailable,
    WriteLock,
    cosine,
    family_collection_names,
    fresh_client,
    guarded,
    open_client,
    serialized,
    write_lock,
)
from memory.curation import CurationDecision, decide, export_markdown, fit_budget, plan_additions
from memory.embedding import MiniLMEmbedding
from memory.errors import InvalidSkill, MemoryStoreError, SkillNotFound, TrajectoryNotFound
from memory.records import (
    FamilyStats,
    Skill,
    SkillStatus,
    SkillVersion,
    StatusChange,
    now,
    skill_from_chroma,
    skill_to_chroma,
    text_digest,
    trajectory_from_chroma,
    trajectory_to_chroma,
    validate_skill_text,
)

logger = logging.getLogger(__name__)

TRAJECTORIES = "trajectories"
COUNT_BATCH = "count_batch"  # on a stored episode whose usage is not counted yet: its batch
COUNTED = "counted_batches"  # on a skill and a family's baseline: the last batches counted into it
KEEP_COUNTED = 16
Vector = np.ndarray  # (D,)


class MemoryConfig(BaseModel):
    """Limits and thresholds of the memory; where it lives is given to `Memory.open`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    near_duplicate_distance: float = Field(
        default=0.08, ge=0.0, le=2.0, description="cosine distance at or under which two skills merge"
    )
    max_skill_chars: int = Field(default=4000, gt=0, description="longest skill text accepted")
    max_title_chars: int = Field(default=200, gt=0)
    min_uses_to_curate: int = Field(
        default=8, ge=1, description="uses before a skill can be demoted or retired"
    )
    confidence_z: float = Field(default=1.96, gt=0.0, description="width of the helpfulness bounds")
    prior: tuple[float, float] = Field(default=(1.0, 1.0), description="Beta prior (successes, failures)")


@dataclass
class _Family:
    name: str
    active: Collection
    archive: Collection

    def collection_for(self, status: SkillStatus) -> Collection:
        return self.active if status == "active" else self.archive


@dataclass
class _Stored:
    skill: Skill
    collection: Collection
    counted: tuple[str, ...] = ()  # the trajectory batches whose usage its counts hold (`_store_trajectories`)


class Memory:
    """Trajectories and skills over one Chroma client. Make it with `Memory.open`."""

    def __init__(
        self,
        client: ClientAPI,
        embedding: EmbeddingFunction,
        location: str,
        config: MemoryConfig | None = None,
        lock: WriteLock | None = None,
    ) -> None:
        self.client = client
        self.write_lock = lock if lock is not None else contextlib.nullcontext()
        self.embedding = embedding
        self.location = location
        self.config = config or MemoryConfig()
        self.fix_hint = ""
        self._families: dict[str, _Family] = {}
        self._skill_family: dict[str, str] = {}
        self._max_batch: int | None = None
        self._view: int | None = None  # the generation of an embedded store our client's view holds
        self._trajectories = self._collection(TRAJECTORIES, {"role": "trajectories"})

    @classmethod
    def open(
        cls,
        home: Path | None = None,
        url: str | None = None,
        embedding: EmbeddingFunction | None = None,
        config: MemoryConfig | None = None,
        *,
        create: bool = True,
    ) -> Memory:
        """The store under `home/"chroma"` (embedded) or on the Chroma server at `url`: one of the two."""
        lock = write_lock(home, url)
        generation = lock.generation()  # read before the client loads its view: the view holds at least this
        client, location, hint = open_client(home, url, create)
        embedding = embedding or MiniLMEmbedding()
        try:
            try:
                with lock:  # two processes creating the collections of a new store
                    memory = cls(client, embedding, location, config, lock)
            except LockUnavailable:  # a store we may only read; a write says so
                memory = cls(client, embedding, location, config, lock)
        except (ChromaError, httpx.HTTPError, ValueError) as error:
            raise MemoryStoreError(
                f"the memory store at {location} cannot be used with this embedding function or is damaged: "
                f"{error}. Open it with the embedding it was built with; nothing was changed."
            ) from error
        memory.fix_hint = hint
        memory._view = generation
        return memory

    def catch_up(self) -> None:
        """Load a new view of an embedded store when another process (or `Memory`) wrote it since ours."""
        if not isinstance(self.write_lock, WriteLock) or not self.write_lock.generations:
            return
        generation = self.write_lock.generation()
        if generation == self._view:
            return
        self.client = fresh_client(Path(self.location), stale=self.client)
        self._families.clear()
        self._trajectories = self._collection(TRAJECTORIES, {"role": "trajectories"})
        self._view = generation

    def wrote(self) -> None:
        """Count the write just made under the write lock (our view holds it)."""
        if isinstance(self.write_lock, WriteLock):
            self._view = self.write_lock.bump()

    # ---- collections -------------------------------------------------------------------------

    def _collection(self, name: str, metadata: dict[str, Any]) -> Collection:
        return self.client.get_or_create_collection(
            name,
            metadata=metadata,
            configuration=cosine(),
            embedding_function=self.embedding,
        )

    def _family(self, family: str, create: bool) -> _Family | None:
        if family in self._families:
            return self._families[family]
        active_name, archive_name = family_collection_names(family)
        if create:
            active = self._collection(
                active_name,
                {"family": family, "role": "skills-active", "baseline_episodes": 0, "baseline_successes": 0},
            )
            archive = self._collection(archive_name, {"family": family, "role": "skills-archive"})
        else:
            try:
                active = self.client.get_collection(active_name, embedding_function=self.embedding)
                archive = self.client.get_collection(archive_name, embedding_function=self.embedding)
            except NotFoundError:
                return None
        self._families[family] = _Family(family, active, archive)
        return self._families[family]

    @guarded
    def families(self) -> list[str]:
        """Every task family that has a skill collection, sorted."""
        names = []
        for collection in self.client.list_collections():
            if collection.name.startswith("skills-") and collection.name.endswith("-active"):
                names.append(str((collection.metadata or {})["family"]))
        return sorted(names)

    def _each_family(self, family: str | None) -> Iterator[_Family]:
        for name in [family] if family is not None else self.families():
            found = self._family(name, create=False)
            if found is not None:
                yield found

    def _batches(self, count: int) -> Iterator[slice]:
        if self._max_batch is None:
            self._max_batch = self.client.get_max_batch_size()
        for start in range(0, count, self._max_batch):
            yield slice(start, start + self._max_batch)

    def _embed(self, texts: Sequence[str]) -> list[Vector]:
        return [np.asarray(vector, dtype=np.float32) for vector in self.embedding(list(texts))]

    # ---- trajectories ------------------------------------------------------------------------

    def add_trajectory(self, trajectory: Trajectory) -> bool:
        """Store (upsert) one episode; True the first time its id is seen (when usage is counted)."""
        return bool(self.add_trajectories([trajectory]))

    @guarded
    def add_trajectories(self, trajectories: Sequence[Trajectory]) -> list[str]:
        """Store (upsert) episodes; the ids seen for the first time, whose skill usage is counted.

        An episode with skills in its prompt counts a use of each (`record_use`); one without
        counts toward its family's baseline (`record_baseline`), once: the same episodes stored
        again after a kill count what the killed call had not counted yet.
        """
        unique = list({trajectory.id: trajectory for trajectory in trajectories}.values())
        if not unique:
            return []
        rows = [trajectory_to_chroma(trajectory) for trajectory in unique]  # serialize before any write
        vectors = self._embed([row[1] for row in rows])  # before the write lock: others write meanwhile
        return self._store_trajectories(unique, rows, vectors)

    @serialized
    def _store_trajectories(
        self, unique: list[Trajectory], rows: list[tuple[str, str, dict[str, Any]]], vectors: list[Vector]
    ) -> list[str]:
        """Store, then count usage, exactly once across kills. The new episodes are stored carrying their
        batch's name (`COUNT_BATCH`, a digest of their ids); every count then bumped records that name
        in the same write (`COUNTED`, the last `KEEP_COUNTED`), and the name is taken off the episodes
        last. Episodes found stored with a name were cut short: their batch is counted again, skipping
        the counts that hold its name already. (Several processes writing one store: exact unless more
        than `KEEP_COUNTED` other batches bump one count between a kill and the retry.)"""
        ids = [row[0] for row in rows]
        found = self._trajectories.get(ids=ids, include=["metadatas"])
        stored = dict(zip(found["ids"], found["metadatas"] or [], strict=True))
        new = [trajectory for trajectory in unique if trajectory.id not in stored]
        batch = hashlib.sha1(" ".join(sorted(t.id for t in new)).encode()).hexdigest()[:16]
        for part in self._batches(len(rows)):
            self._trajectories.upsert(
                ids=ids[part],
                documents=[row[1] for row in rows[part]],
                metadatas=[row[2] if row[0] in stored else {**row[2], COUNT_BATCH: batch} for row in rows[part]],
                embeddings=vectors[part],
            )  # metadata is merged: an episode stored before keeps its COUNT_BATCH, or has none
        batches: dict[str, list[Trajectory]] = defaultdict(list)
        batches[batch] = new
        for metadata in stored.values():
            if metadata and metadata.get(COUNT_BATCH):
                batches[str(metadata[COUNT_BATCH])].append(trajectory_from_chroma(metadata))
        for name, episodes in batches.items():
            if episodes:
                self._count_usage(episodes, name)
                for part in self._batches(len(episodes)):
                    self._trajectories.update(
                        ids=[t.id for t in episodes[part]], metadatas=[{COUNT_BATCH: None}] * len(episodes[part])
                    )
        return [trajectory.id for trajectory in new]

    def _count_usage(self, episodes: list[Trajectory], batch: str) -> None:
        uses: dict[str, dict[str, list[int]]] = defaultdict(dict)
        baseline: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for trajectory in episodes:
            if trajectory.skill_ids:
                for skill_id in dict.fromkeys(trajectory.skill_ids):
                    counts = uses[trajectory.env].setdefault(skill_id, [0, 0])
                    counts[0 if trajectory.success else 1] += 1
            else:
                baseline[trajectory.env][0] += 1
                baseline[trajectory.env][1] += int(trajectory.success)
        for family, increments in uses.items():
            self._bump_uses(family, {skill_id: (s, f) for skill_id, (s, f) in increments.items()}, batch)
        for family, (count, successes) in baseline.items():
            self._bump_baseline(family, count, successes, batch)

    @guarded
    def get_trajectory(self, trajectory_id: str) -> Trajectory:
        found = self._trajectories.get(ids=[trajectory_id], include=["metadatas"])
        if not found["ids"]:
            raise TrajectoryNotFound(trajectory_id)
        return trajectory_from_chroma(found["metadatas"][0])

    @guarded
    def list_trajectories(
        self, env: str | None = None, split: str | None = None, limit: int | None = 100, offset: int = 0
    ) -> list[Trajectory]:
        """Stored episodes in the order they were first stored, optionally of one env and split."""
        clauses: list[dict[str, Any]] = [
            {key: value} for key, value in (("env", env), ("split", split)) if value
        ]
        where = None if not clauses else clauses[0] if len(clauses) == 1 else {"$and": clauses}
        found = self._trajectories.get(where=where, limit=limit, offset=offset, include=["metadatas"])
        return [trajectory_from_chroma(metadata) for metadata in found["metadatas"] or []]

    @guarded
    def count_trajectories(self) -> int:
        return self._trajectories.count()

    # ---- reading skills ----------------------------------------------------------------------

    def _fetch(
        self, family: _Family, ids: list[str] | None = None, status: SkillStatus | None = None
    ) -> dict[str, _Stored]:
        """Skills of one family by id (or all, or of one status); a record in both takes the newer."""
        found: dict[str, _Stored] = {}
        if ids is not None and not ids:
            return found
        collections = [family.active, family.archive]
        if status is not None:
            collections = [family.collection_for(status)]
        for collection in collections:
            where = {"status": status} if status is not None and collection is family.archive else None
            rows = collection.get(ids=ids, where=where, include=["documents", "metadatas"])
            for skill_id, document, metadata in zip(
                rows["ids"], rows["documents"] or [], rows["metadatas"] or [], strict=True
            ):
                skill = skill_from_chroma(skill_id, document, dict(metadata))
                copy = _Stored(skill, collection, tuple(json.loads(str(metadata.get(COUNTED, "[]")))))
                if skill_id in found:  # a move cut short: both copies are whole, drop the older
                    older, found[skill_id] = sorted([found[skill_id], copy], key=lambda item: item.skill.updated_at)
                    older.collection.delete(ids=[skill_id])
                else:
                    found[skill_id] = copy
        if status is not None and found:  # a copy in the other collection may be the newer: then that is the record
            collection = family.archive if family.collection_for(status) is family.active else family.active
            rows = collection.get(ids=list(found), include=["documents", "metadatas"])
            for skill_id, document, metadata in zip(
                rows["ids"], rows["documents"] or [], rows["metadatas"] or [], strict=True
            ):
                other = _Stored(skill_from_chroma(skill_id, document, dict(metadata)), collection)
                older, newer = sorted([found[skill_id], other], key=lambda item: item.skill.updated_at)
                older.collection.delete(ids=[skill_id])
                if newer is other:  # its status is another now
                    del found[skill_id]
        for skill_id in found:
            self._skill_family[skill_id] = family.name
        return found

    def _locate(
        self, skill_ids: list[str], family_hint: str | None = None
    ) -> dict[str, tuple[_Family, _Stored]]:
        """Where each id lives: the hinted or cached family first, then every family."""
        located: dict[str, tuple[_Family, _Stored]] = {}
        hints = [family_hint] + [self._skill_family.get(skill_id) for skill_id in skill_ids]
        searched: set[str] = set()
        for name in [*dict.fromkeys(hint for hint in hints if hint), None]:
            missing = [skill_id for skill_id in skill_ids if skill_id not in located]
            if not missing:
                break
            for family in self._each_family(name):
                if family.name in searched:
                    continue
                searched.add(family.name)
                for skill_id, stored in self._fetch(family, missing).items():
                    located[skill_id] = (family, stored)
        return located

    @guarded
    def get_skill(self, skill_id: str) -> Skill:
        located = self._locate([skill_id])
        if skill_id not in located:
            raise SkillNotFound(skill_id)
        return located[skill_id][1].skill

    @guarded
    def list_skills(self, family: str | None = None, status: SkillStatus | None = None) -> list[Skill]:
        """Skills of one family (or all), of one status (or any), oldest first within a family."""
        skills: list[Skill] = []
        for found in self._each_family(family):
            stored = self._fetch(found, status=status).values()
            skills.extend(sorted((item.skill for item in stored), key=lambda skill: skill.created_at))
        return skills

    @guarded
    def search_skills(
        self,
        query: str | None = None,
        family: str | None = None,
        k: int = 5,
        status: SkillStatus | None = "active",
        *,
        embedding: Sequence[float] | None = None,
    ) -> list[tuple[Skill, float]]:
        """The `k` nearest skills to `query` (or to a given `embedding`) as (skill, cosine distance).

        With a family, active skills come from one unfiltered query on that family's collection;
        without one, every family is queried and the results merged by distance.
        """
        if embedding is None:
            if query is None:
                raise ValueError("search_skills needs a query text or an embedding")
            vector = self._embed([query])[0]
        else:
            vector = np.asarray(embedding, dtype=np.float32)
        hits: dict[str, tuple[Skill, float]] = {}
        for found in self._each_family(family):
            collections = [found.active, found.archive] if status is None else [found.collection_for(status)]
            for collection in collections:
                where = {"status": status} if status is not None and collection is found.archive else None
                rows = collection.query(
                    query_embeddings=[vector],
                    n_results=k,
                    where=where,
                    include=["documents", "metadatas", "distances"],
                )
                for skill_id, document, metadata, distance in zip(
                    rows["ids"][0],
                    rows["documents"][0],
                    rows["metadatas"][0],
                    rows["distances"][0],
                    strict=True,
                ):
                    if skill_id not in hits or distance < hits[skill_id][1]:
                        hits[skill_id] = (
                            skill_from_chroma(skill_id, document, dict(metadata)),
                            float(distance),
                        )
        return sorted(hits.values(), key=lambda pair: pair[1])[:k]

    def retrieve(
        self,
        query: str,
        family: str | None,
        token_budget: int,
        count_tokens: Callable[[str], int],
        k: int = 5,
        *,
        max_distance: float | None = None,
        embedding: Sequence[float] | None = None,
    ) -> list[Skill]:
        """Active skills for a prompt: at most `k`, by relevance (demoted last), within `token_budget`.

        Candidates are the 4k nearest, so a skill too long for what is left of the budget can be
        replaced by a shorter one further down.
        """
        candidates = self.search_skills(query, family, k=4 * k, status="active", embedding=embedding)
        if max_distance is not None:
            candidates = [(skill, distance) for skill, distance in candidates if distance <= max_distance]
        return fit_budget(candidates, token_budget, count_tokens, k)

    # ---- writing skills ----------------------------------------------------------------------

    def _validated(self, skill: Skill) -> Skill:
        text = validate_skill_text(skill.text, self.config.max_skill_chars)
        for field, value, limit in (
            ("title", skill.title, self.config.max_title_chars),
            ("family", skill.family, 200),
        ):
            if len(value) > limit:
                raise InvalidSkill(f"skill {field} is {len(value)} characters, over the limit of {limit}")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidSkill(f"skill {field} is not valid UTF-8: {value!r}") from None
        return skill if text is skill.text else skill.model_copy(update={"text": text})

    def _put(
        self,
        family: _Family,
        items: list[tuple[Skill, Vector | None, Collection | None]],
        extra: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Write whole records. Vector None means the text is unchanged (only metadata is rewritten);
        `extra`: metadata of our own to write with a record, by skill id (`COUNTED`).

        A record whose status moves it to the other collection is written there first (with its
        stored embedding), then deleted from where it was.
        """
        updates: dict[str, list[tuple[str, str, dict[str, Any]]]] = defaultdict(list)
        upserts: dict[str, list[tuple[str, str, dict[str, Any], Vector]]] = defaultdict(list)
        moved: dict[str, list[str]] = defaultdict(list)
        by_name = {family.active.name: family.active, family.archive.name: family.archive}
        for skill, vector, source in items:
            target = family.collection_for(skill.status)
            row = skill_to_chroma(skill)
            if extra and skill.id in extra:
                row = (row[0], row[1], {**row[2], **extra[skill.id]})
            if vector is None and source is target:
                updates[target.name].append(row)
                continue
            if vector is None:
                assert source is not None, "a new skill needs its embedding"
                stored = source.get(ids=[skill.id], include=["embeddings"])["embeddings"]
                vector = np.asarray(stored[0], dtype=np.float32)
            upserts[target.name].append((*row, vector))
            if source is not None and source is not target:
                moved[source.name].append(skill.id)
            self._skill_family[skill.id] = family.name
        for name, rows in updates.items():
            for part in self._batches(len(rows)):
                chunk = rows[part]
                by_name[name].update(ids=[r[0] for r in chunk], metadatas=[r[2] for r in chunk])
        for name, full_rows in upserts.items():
            for part in self._batches(len(full_rows)):
                chunk = full_rows[part]
                by_name[name].upsert(
                    ids=[r[0] for r in chunk],
                    documents=[r[1] for r in chunk],
                    metadatas=[r[2] for r in chunk],
                    embeddings=[r[3] for r in chunk],
                )
        for name, ids in moved.items():
            by_name[name].delete(ids=ids)

    def add_skill(self, skill: Skill, *, embedding: Sequence[float] | None = None) -> Skill:
        """Store a skill, or merge it into a duplicate; the record as stored (see `add_skills`)."""
        return self.add_skills([skill], embeddings=None if embedding is None else [embedding])[0]

    @guarded
    def add_skills(
        self, skills: Sequence[Skill], *, embeddings: Sequence[Sequence[float]] | None = None
    ) -> list[Skill]:
        """Store skills; for each input, the record it ended up in.

        A skill with the same text (whitespace aside) as a stored skill of its family, or within
        `near_duplicate_distance` of one (any status: a rephrased retired skill stays retired), or
        of an earlier skill of the same call, is merged into that record (`curation.plan_additions`).
        A new skill whose id is already taken in its family is refused before anything is written
        (ids are only checked within the family: default ids are random, 48 bits).
        """
        validated = [self._validated(skill) for skill in skills]
        if embeddings is not None and len(embeddings) != len(validated):
            raise ValueError(f"{len(validated)} skills but {len(embeddings)} embeddings")
        vectors = (
            [np.asarray(vector, dtype=np.float32) for vector in embeddings]
            if embeddings is not None
            else self._embed([skill.text for skill in validated])
        )  # before the write lock: others write meanwhile
        return self._add_embedded(validated, vectors)

    @serialized
    def _add_embedded(self, validated: list[Skill], vectors: list[Vector]) -> list[Skill]:
        by_family: dict[str, list[int]] = defaultdict(list)
        for index, skill in enumerate(validated):
            by_family[skill.family].append(index)
        plans = []
        for name, indices in by_family.items():
            family = self._family(name, create=True)
            assert family is not None
            batch = [(validated[index], vectors[index]) for index in indices]
            known, exact, nearest = self._neighbours(family, batch)
            plan = plan_additions(
                batch,
                {skill_id: stored.skill for skill_id, stored in known.items()},
                exact,
                nearest,
                self.config.near_duplicate_distance,
                self.config.confidence_z,
            )
            plans.append((family, indices, known, plan))
        taken = [skill_id for family, _, _, plan in plans for skill_id in self._fetch(family, plan.created)]
        if taken:
            raise InvalidSkill(
                f"skill id(s) {sorted(taken)} already exist with another text; use update_skill"
            )
        results: list[Skill] = list(validated)
        for family, indices, known, plan in plans:
            writes = [
                (skill, vector, None if skill_id in plan.created else known[skill_id].collection)
                for skill_id, (skill, vector) in plan.records.items()
            ]
            self._put(family, writes)
            for index, skill_id in zip(indices, plan.outcome, strict=True):
                results[index] = plan.records[skill_id][0]
        return results

    def _neighbours(
        self, family: _Family, batch: list[tuple[Skill, Vector]]
    ) -> tuple[dict[str, _Stored], dict[str, str], list[tuple[str | None, float]]]:
        """Stored records that may absorb the batch: (records by id, digest -> id, nearest per input)."""
        known: dict[str, _Stored] = {}
        exact: dict[str, str] = {}
        nearest: list[tuple[str | None, float]] = [(None, math.inf)] * len(batch)
        digests = [text_digest(skill.text) for skill, _ in batch]
        for collection in (family.active, family.archive):
            rows = collection.get(where={"text_sha256": {"$in": digests}}, include=["documents", "metadatas"])
            for skill_id, document, metadata in zip(
                rows["ids"], rows["documents"], rows["metadatas"], strict=True
            ):
                known[skill_id] = _Stored(skill_from_chroma(skill_id, document, dict(metadata)), collection)
                exact[str(metadata["text_sha256"])] = skill_id
            rows = collection.query(
                query_embeddings=[vector for _, vector in batch],
                n_results=1,
                include=["documents", "metadatas", "distances"],
            )
            for position, (ids, documents, metadatas, distances) in enumerate(
                zip(rows["ids"], rows["documents"], rows["metadatas"], rows["distances"], strict=True)
            ):
                if ids and distances[0] < nearest[position][1]:
                    nearest[position] = (ids[0], float(distances[0]))
                    stored = _Stored(skill_from_chroma(ids[0], documents[0], dict(metadatas[0])), collection)
                    known.setdefault(ids[0], stored)
        return known, exact, nearest

    @guarded
    @serialized
    def update_skill(self, skill: Skill) -> Skill:
        """Write a changed record whole; a new text gets a version entry, a new status a history entry."""
        skill = self._validated(skill)
        located = self._locate([skill.id], skill.family)
        if skill.id not in located:
            raise SkillNotFound(skill.id)
        family, stored = located[skill.id]
        if stored.skill.family != skill.family:
            raise InvalidSkill(
                f"skill {skill.id} belongs to family {stored.skill.family!r}, not {skill.family!r}; "
                "a skill cannot change family (add it to the other family as a new skill)"
            )
        update: dict[str, Any] = {"updated_at": now()}
        text_changed = skill.text != stored.skill.text
        if text_changed and not (
            len(skill.versions) > len(stored.skill.versions) and skill.versions[-1].text == skill.text
        ):
            update["versions"] = [*skill.versions, SkillVersion(text=skill.text, reason="edited")]
        if skill.status != stored.skill.status and len(skill.status_history) <= len(
            stored.skill.status_history
        ):
            update["status_history"] = [
                *skill.status_history,
                StatusChange(status=skill.status, reason="set by update_skill"),
            ]
        updated = skill.model_copy(update=update)
        vector = self._embed([updated.text])[0] if text_changed else None
        self._put(family, [(updated, vector, stored.collection)])
        return updated

    @serialized
    def set_status(
        self, skill_id: str, status: SkillStatus, reason: str, evidence: dict[str, Any] | None = None
    ) -> Skill:
        """Mark a skill active, pending, folded or retired, with the reason and evidence in its history."""
        skill = self.get_skill(skill_id)
        change = StatusChange(status=status, reason=reason, evidence=evidence or {})
        return self.update_skill(
            skill.model_copy(update={"status": status, "status_history": [*skill.status_history, change]})
        )

    @guarded
    @serialized
    def remove_skill(self, skill_id: str) -> Skill:
        """Delete a skill everywhere it is stored; the record it had."""
        located = self._locate([skill_id])
        if skill_id not in located:
            raise SkillNotFound(skill_id)
        family, stored = located[skill_id]
        for collection in (family.active, family.archive):
            collection.delete(ids=[skill_id])
        self._skill_family.pop(skill_id, None)
        return stored.skill

    # ---- usage and curation ------------------------------------------------------------------

    def _bump_uses(self, family_hint: str, increments: dict[str, tuple[int, int]], batch: str | None = None) -> None:
        """Add (successes, failures) to each skill's counts; with `batch`, those that hold it already
        are skipped and the others record it (`_store_trajectories`)."""
        located = self._locate(list(increments), family_hint)
        for skill_id in increments.keys() - located.keys():
            logger.warning("usage of unknown skill %s not counted (removed, or never stored)", skill_id)
        by_family: dict[str, tuple[_Family, list[tuple[Skill, None, Collection]]]] = {}
        extra: dict[str, dict[str, Any]] = {}
        for skill_id, (family, stored) in located.items():
            if batch is not None:
                if batch in stored.counted:
                    continue
                extra[skill_id] = {COUNTED: json.dumps([*stored.counted, batch][-KEEP_COUNTED:])}
            successes, failures = increments[skill_id]
            skill = stored.skill.model_copy(
                update={
                    "successes_with": stored.skill.successes_with + successes,
                    "failures_with": stored.skill.failures_with + failures,
                }
            )
            by_family.setdefault(family.name, (family, []))[1].append((skill, None, stored.collection))
        for family, items in by_family.values():
            self._put(family, items, extra)

    def _bump_baseline(self, family_name: str, episodes: int, successes: int, batch: str | None = None) -> None:
        family = self._family(family_name, create=True)
        assert family is not None
        metadata = dict(
            self.client.get_collection(family.active.name, embedding_function=self.embedding).metadata or {}
        )
        if batch is not None:  # as in `_bump_uses`
            counted = json.loads(str(metadata.get(COUNTED, "[]")))
            if batch in counted:
                return
            metadata[COUNTED] = json.dumps([*counted, batch][-KEEP_COUNTED:])
        metadata["baseline_episodes"] = int(metadata.get("baseline_episodes", 0)) + episodes
        metadata["baseline_successes"] = int(metadata.get("baseline_successes", 0)) + successes
        family.active.modify(metadata=metadata)  # replaces the whole metadata, family name included

    @guarded
    @serialized
    def record_use(self, skill_ids: Sequence[str], family: str, success: bool) -> None:
        """Count one episode of `family` with these skills in its prompt (unknown ids are skipped)."""
        self._bump_uses(
            family, {skill_id: (int(success), int(not success)) for skill_id in dict.fromkeys(skill_ids)}
        )

    @guarded
    @serialized
    def record_baseline(self, family: str, success: bool) -> None:
        """Count one episode of `family` run with no skill in its prompt."""
        self._bump_baseline(family, 1, int(success))

    @guarded
    def family_stats(self, family: str) -> FamilyStats:
        found = self._family(family, create=False)
        if found is None:
            return FamilyStats(family=family)
        metadata = (
            self.client.get_collection(found.active.name, embedding_function=self.embedding).metadata or {}
        )
        return FamilyStats(
            family=family,
            baseline_episodes=int(metadata.get("baseline_episodes", 0)),
            baseline_successes=int(metadata.get("baseline_successes", 0)),
        )

    @guarded
    @serialized
    def curate(self, family: str) -> list[CurationDecision]:
        """Demote, restore or retire the family's active skills by measured helpfulness."""
        found = self._family(family, create=False)
        if found is None:
            return []
        baseline = self.family_stats(family)
        decisions: list[CurationDecision] = []
        writes: list[tuple[Skill, None, Collection]] = []
        for stored in self._fetch(found, status="active").values():
            outcome = decide(
                stored.skill,
                baseline,
                self.config.min_uses_to_curate,
                self.config.confidence_z,
                self.config.prior,
            )
            if outcome is not None:
                decisions.append(outcome[0])
                writes.append((outcome[1], None, stored.collection))
        self._put(found, writes)
        for decision in decisions:
            logger.info("curate %s: %s %s %s", family, decision.action, decision.skill_id, decision.evidence)
        return decisions

    # ---- reports -----------------------------------------------------------------------------

    @guarded
    def stats(self) -> dict[str, Any]:
        """{"trajectories": n, "skills": {status: n}, "families": {family: counts and baseline}}."""
        totals = {"active": 0, "pending": 0, "folded": 0, "retired": 0}
        families: dict[str, dict[str, int]] = {}
        for found in self._each_family(None):
            pending, folded = (
                len(found.archive.get(where={"status": status}, include=[])["ids"]) for status in ("pending", "folded")
            )
            counts = {
                "active": found.active.count(),
                "pending": pending,
                "folded": folded,
                "retired": found.archive.count() - pending - folded,
            }
            baseline = self.family_stats(found.name)
            families[found.name] = counts | {
                "baseline_episodes": baseline.baseline_episodes,
                "baseline_successes": baseline.baseline_successes,
            }
            for status, count in counts.items():
                totals[status] += count
        return {"trajectories": self.count_trajectories(), "skills": totals, "families": families}

    def export(self, format: Literal["json", "md"] = "json", family: str | None = None) -> str:
        """Every skill (of one family) with the family baselines, as JSON or Markdown."""
        skills = self.list_skills(family)
        baselines = {name: self.family_stats(name) for name in sorted({skill.family for skill in skills})}
        if format == "md":
            return export_markdown(skills, baselines)
        if format != "json":
            raise ValueError(f"export format must be 'json' or 'md', got {format!r}")
        return json.dumps(
            {
                "families": {name: stats.model_dump() for name, stats in baselines.items()},
                "skills": [skill.model_dump(mode="json") for skill in skills],
            },
            indent=2,
            ensure_ascii=False,
        )
