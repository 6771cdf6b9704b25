"""Memory benchmark: add throughput and top-5 query latency, `Memory` beside a bare Chroma collection.

N skills with precomputed embeddings (random normal 384-d vectors, normalized: no model is loaded)
spread over F task families go (1) into one bare collection with the family as metadata, and (2)
through `Memory.add_skills` (dedup checks included) into one collection per family. Then Q queries
(noisy copies of stored vectors) are timed, top-5 each:

    bare             one collection, no filter
    bare + where     one collection, where={"family": f}
    memory family    Memory.search_skills(family=f): an unfiltered query on the family's collection
    memory all       Memory.search_skills(family=None): every family queried, merged by distance

Usage: python benchmarks/bench_memory.py [N] [--families 10] [--queries 200] [--batch 1000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import chromadb
import numpy as np
from chromadb.config import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory import HashingEmbedding, Memory, Skill  # noqa: E402

DIM = 384
VOCABULARY = "count legs animal spider bird add sum carry digit check answer rule first then each".split()


def percentiles(samples_s: list[float]) -> tuple[float, float]:
    milliseconds = np.asarray(samples_s) * 1000.0
    return float(np.percentile(milliseconds, 50)), float(np.percentile(milliseconds, 95))


def timed(call, arguments: list) -> list[float]:
    samples = []
    for argument in arguments:
        start = time.perf_counter()
        call(argument)
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("n", nargs="?", type=int, default=10_000, help="skills to add (e.g. 10000, 100000)")
    parser.add_argument("--families", type=int, default=10)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1000, help="skills per Memory.add_skills call")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.n, DIM)).astype(np.float32)  # (N, D)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    families = [f"bench:family{index}" for index in range(args.families)]
    family_of = [families[index % args.families] for index in range(args.n)]
    texts = [f"skill {index}: " + " ".join(rng.choice(VOCABULARY, size=30)) for index in range(args.n)]
    picks = rng.integers(0, args.n, size=args.queries)
    queries = vectors[picks] + 0.3 * rng.standard_normal((args.queries, DIM)).astype(np.float32) / np.sqrt(
        DIM
    )
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)  # (Q, D)
    query_families = [family_of[index] for index in picks]

    with tempfile.TemporaryDirectory() as tmp:
        client = chromadb.PersistentClient(
            path=str(Path(tmp) / "bare"), settings=Settings(anonymized_telemetry=False)
        )
        bare = client.create_collection(
            "bare", configuration={"hnsw": {"space": "cosine"}}, embedding_function=None
        )
        step = client.get_max_batch_size()
        start = time.perf_counter()
        for first in range(0, args.n, step):
            last = min(first + step, args.n)
            bare.add(
                ids=[f"b{index}" for index in range(first, last)],
                embeddings=vectors[first:last],
                documents=texts[first:last],
                metadatas=[{"family": family_of[index]} for index in range(first, last)],
            )
        bare_add_s = time.perf_counter() - start

        memory = Memory.open(home=Path(tmp) / "home", embedding=HashingEmbedding(dim=DIM))
        skills = [
            Skill(kind="rule", family=family_of[i], title=f"skill {i}", text=texts[i]) for i in range(args.n)
        ]
        start = time.perf_counter()
        for first in range(0, args.n, args.batch):
            last = min(first + args.batch, args.n)
            memory.add_skills(skills[first:last], embeddings=vectors[first:last])
        memory_add_s = time.perf_counter() - start
        stored = memory.stats()["skills"]["active"]
        assert stored == args.n, f"Memory stored {stored} of {args.n} skills (unexpected merges)"

        single = [
            Skill(kind="rule", family=families[index % args.families], text=f"single {index} " + texts[index])
            for index in range(100)
        ]
        single_vectors = rng.standard_normal((len(single), DIM)).astype(np.float32)
        single_add = timed(
            lambda index: memory.add_skill(single[index], embedding=single_vectors[index]),
            list(range(len(single))),
        )

        for family in families:  # open every collection before timing (first query loads the index)
            bare.query(query_embeddings=queries[:1], n_results=5, where={"family": family})
            memory.search_skills(family=family, k=5, embedding=queries[0])
        indices = list(range(args.queries))
        latencies = {
            "bare, no filter": timed(
                lambda i: bare.query(query_embeddings=queries[i : i + 1], n_results=5), indices
            ),
            "bare, where family": timed(
                lambda i: bare.query(
                    query_embeddings=queries[i : i + 1], n_results=5, where={"family": query_families[i]}
                ),
                indices,
            ),
            "memory, family-scoped": timed(
                lambda i: memory.search_skills(family=query_families[i], k=5, embedding=queries[i]), indices
            ),
            "memory, all families": timed(
                lambda i: memory.search_skills(family=None, k=5, embedding=queries[i]), indices
            ),
        }

    print(f"N={args.n} skills, {args.families} families, {args.queries} queries, top-5, dim {DIM}, ", end="")
    print(f"chromadb {chromadb.__version__}, {os.cpu_count()} CPUs\n")
    bare_rate, memory_rate = args.n / bare_add_s, args.n / memory_add_s
    print("| add | items/s | time |")
    print("|---|---|---|")
    print(f"| bare collection, batches of {step} | {bare_rate:,.0f} | {bare_add_s:.1f} s |")
    print(
        f"| Memory.add_skills, batches of {args.batch} (dedup checks) | {memory_rate:,.0f} | {memory_add_s:.1f} s |"
    )
    single_p50, single_p95 = percentiles(single_add)
    print(
        f"| Memory.add_skill, one at a time | {1 / np.mean(single_add):,.0f} | p50 {single_p50:.1f} ms, p95 {single_p95:.1f} ms |"
    )
    print(f"\nMemory / bare add throughput: {memory_rate / bare_rate:.2f}\n")
    print("| top-5 query | p50 ms | p95 ms | p95 / bare no filter |")
    print("|---|---|---|---|")
    base_p95 = percentiles(latencies["bare, no filter"])[1]
    for name, samples in latencies.items():
        p50, p95 = percentiles(samples)
        print(f"| {name} | {p50:.2f} | {p95:.2f} | {p95 / base_p95:.2f} |")
    scoped_p95 = percentiles(latencies["memory, family-scoped"])[1]
    where_p95 = percentiles(latencies["bare, where family"])[1]
    print(f"\nfamily-scoped p95: Memory {scoped_p95:.2f} ms vs bare where-filter {where_p95:.2f} ms ", end="")
    print(f"({where_p95 / scoped_p95:.1f}x faster); target <= 5 ms: {'met' if scoped_p95 <= 5 else 'MISSED'}")


if __name__ == "__main__":
    main()
