"""`skillfold ui` benchmark: server-side time of each page with a large library.

Builds (once, in --home; reused when it is there) a library of N skills and M trajectories over 10
families through the Memory API with the hashing embedding (tests/ui_library.py:bulk_library), then
requests each page through FastAPI's test client (routing, memory reads, Jinja2 rendering; no
network) R times and prints the first (cold) time and the median and 95th percentile of the rest;
then times pages right after another writer stored an episode (what a page costs while a run writes).
Pages paginate: the library table shows 50 rows, the trajectory list 50 episodes.

Usage: python benchmarks/bench_ui.py [--skills 10000] [--trajectories 100000] [--home DIR] [--repeats 20]
       [--memory-url http://127.0.0.1:8123]  (the same library served by `chroma run --path DIR/chroma`)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi.testclient import TestClient  # noqa: E402

from agent.ui import UiSettings, create_app  # noqa: E402
from memory import HashingEmbedding, Memory  # noqa: E402
from tests.ui_library import bulk_library  # noqa: E402

TARGET_MS = 300.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skills", type=int, default=10_000)
    parser.add_argument("--trajectories", type=int, default=100_000)
    parser.add_argument("--home", type=Path, default=None, help="where the library is built (kept for reruns)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--memory-url", default=None,
                        help="read the library through this Chroma server (e.g. `chroma run --path HOME/chroma`)")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="bench-ui-")) / "home"
    if not (home / "chroma").is_dir():
        started = time.perf_counter()
        print(f"building {args.skills} skills and {args.trajectories} trajectories in {home}", flush=True)
        bulk_library(home, args.skills, args.trajectories, say=lambda text: print(text, flush=True))
        print(f"built in {time.perf_counter() - started:.0f} s", flush=True)
    where = {"url": args.memory_url} if args.memory_url else {"home": home}
    memory = Memory.open(**where, embedding=HashingEmbedding(), create=False)
    stats = memory.stats()
    skill = memory.list_skills(family="bench:family-3")[17]
    trajectory = memory.list_trajectories(limit=1, offset=54_321 % max(1, stats["trajectories"]))[0]
    del memory
    settings = UiSettings(home=home, memory_url=args.memory_url)
    client = TestClient(create_app(settings, embedding=HashingEmbedding()), base_url="http://127.0.0.1")
    pages = {
        "library": "/",
        "library, family + status filter": "/?family=bench:family-3&status=active",
        "library, sorted by helpfulness, page 100": "/?sort=helpfulness&order=asc&page=100",
        "library, text search": "/?q=carry+digit",
        "library, semantic search": "/?q=carry+the+digit+then+add&mode=semantic",
        "skill page": f"/skills/{skill.id}",
        "trajectories, page 1": "/trajectories",
        "trajectories, from position 50000": "/trajectories?start=50000",
        "trajectories, family + failures, deep": "/trajectories?env=bench:family-2&success=no&start=5000",
        "trajectories, train split + successes": "/trajectories?split=train&success=yes&start=20000",
        "trajectory page": f"/trajectories/{trajectory.id}",
        "retrieval debugger": "/retrieve?task=carry+the+digit+then+add&family=bench:family-1&k=3",
        "folds": "/folds",
    }
    print(f"library: {sum(stats['skills'].values())} skills, {stats['trajectories']} trajectories"
          f"{' through the server ' + args.memory_url if args.memory_url else ', embedded'}; "
          f"{args.repeats} requests per page")
    print(f"| page | first (ms) | median (ms) | p95 (ms) | under {TARGET_MS:.0f} ms |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for name, url in pages.items():
        samples = []
        for _ in range(args.repeats + 1):
            started = time.perf_counter()
            response = client.get(url)
            samples.append((time.perf_counter() - started) * 1000.0)
            assert response.status_code == 200, (url, response.status_code, response.text[:300])
        first, rest = samples[0], sorted(samples[1:])
        p95 = rest[min(len(rest) - 1, int(0.95 * len(rest)))]
        worst = max(worst, p95)
        print(f"| {name} | {first:.0f} | {statistics.median(rest):.0f} | {p95:.0f} | "
              f"{'yes' if p95 < TARGET_MS else 'NO'} |", flush=True)
    print(f"worst p95: {worst:.0f} ms")
    after_writes(client, where, skill.id, trajectory)


def after_writes(client: TestClient, where: dict, skill_id: str, trajectory, repeats: int = 5) -> None:
    """Pages right after another writer (a `skillfold run`) stored an episode (an embedded store is reloaded)."""
    writer = Memory.open(**where, embedding=HashingEmbedding(), create=False)
    print(f"\nright after another writer stored an episode ({repeats} times each):")
    print("| page | median (ms) | max (ms) |")
    print("|---|---|---|")
    for name, url in (("skill page", f"/skills/{skill_id}"), ("library", "/"), ("trajectories, page 1", "/trajectories")):
        samples = []
        for index in range(repeats):
            writer.add_trajectory(trajectory.model_copy(update={"id": f"bench-writer-{name}-{index}"}))
            started = time.perf_counter()
            assert client.get(url).status_code == 200
            samples.append((time.perf_counter() - started) * 1000.0)
        print(f"| {name} | {statistics.median(samples):.0f} | {max(samples):.0f} |", flush=True)


if __name__ == "__main__":
    main()
