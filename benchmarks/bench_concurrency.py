"""Concurrency benchmark: P processes writing one library at once, embedded and through a Chroma server.

Every process adds, N times: a skill of its own, an episode with the seeded skill and its own in the
prompt (a use of each: read-modify-writes of shared counts), and an episode without skills (a baseline
episode: one more count every process bumps). A "write" is one of those three calls. Then a fresh
process counts what was stored and searches for every skill (the vector index), so a lost write or a
lost count shows.

    writes/s    3·P·N calls over the wall time from the barrier to the last process done
    lost        trajectories, skills, uses and baseline episodes missing from the exact counts,
                skills the vector index no longer finds

`--unlocked` writes without `memory.chroma.WriteLock` (as skillfold did before issue 18): the counts
it loses are the reason for the lock. The server is `chroma run` on loopback, started here.
Embeddings are the hashing bag of words (no model), so the figures are the store's alone.

Usage: python benchmarks/bench_concurrency.py [--writes 50] [--processes 1 4] [--modes embedded server] [--unlocked]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.base import Message, Trajectory  # noqa: E402
from memory import HashingEmbedding, Memory, Skill  # noqa: E402

FAMILY = "bench:1"
SEEDED = "seeded rule: count the legs of every animal before you answer"


def own_text(writer: int, index: int) -> str:
    return "own rule " + " ".join(f"w{writer}i{index}k{k}" for k in range(6))


def write(where: dict, writer: int, writes: int, seeded_id: str, unlocked: bool, barrier, times) -> None:
    memory = Memory.open(**where, embedding=HashingEmbedding())
    if unlocked:
        memory.write_lock = contextlib.nullcontext()  # type: ignore[assignment]
    barrier.wait(timeout=300)
    started = time.perf_counter()
    for index in range(writes):
        tag = f"w{writer}-{index}"
        own = memory.add_skill(Skill(kind="rule", family=FAMILY, text=own_text(writer, index)))
        prompt = [Message(role="user", content=f"task {tag}")]
        memory.add_trajectory(Trajectory(env=FAMILY, item_id=f"{tag}-skilled", split="train", prompt=prompt,
                                         success=True, skill_ids=[seeded_id, own.id]))
        memory.add_trajectory(Trajectory(env=FAMILY, item_id=f"{tag}-baseline", split="train", prompt=prompt,
                                         success=False))
    times[writer] = (started, time.perf_counter())


def lost(where: dict, processes: int, writes: int) -> dict[str, int]:
    memory = Memory.open(**where, embedding=HashingEmbedding())
    skills = {skill.text: skill for skill in memory.list_skills(family=FAMILY)}
    own = [skills.get(own_text(writer, index)) for writer in range(processes) for index in range(writes)]
    unfound = sum(skill is None or memory.search_skills(skill.text, FAMILY, k=1)[0][0].id != skill.id for skill in own)
    seeded = skills[SEEDED]
    return {
        "trajectories": 2 * processes * writes - memory.count_trajectories(),
        "skills": processes * writes - sum(skill is not None for skill in own),
        "uses": processes * writes - seeded.successes_with
        + sum(1 - skill.successes_with for skill in own if skill is not None),
        "baseline": processes * writes - memory.family_stats(FAMILY).baseline_episodes,
        "unsearchable": unfound,
    }


def measure(where: dict, processes: int, writes: int, unlocked: bool) -> tuple[float, dict[str, int]]:
    seeded = Memory.open(**where, embedding=HashingEmbedding()).add_skill(Skill(kind="rule", family=FAMILY, text=SEEDED))
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    times = context.Manager().dict()
    workers = [context.Process(target=write, args=(where, writer, writes, seeded.id, unlocked, barrier, times))
               for writer in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if any(worker.exitcode != 0 for worker in workers):
        raise SystemExit(f"a writer failed: exit codes {[worker.exitcode for worker in workers]}")
    wall = max(end for _, end in times.values()) - min(start for start, _ in times.values())
    return 3 * processes * writes / wall, lost(where, processes, writes)


@contextlib.contextmanager
def chroma_server(data: Path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    chroma = Path(sys.executable).parent / "chroma"
    log = (data.parent / "chroma.log").open("w")
    server = subprocess.Popen([str(chroma), "run", "--path", str(data), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/api/v2/heartbeat", timeout=1).status_code == 200:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"chroma run did not start: {(data.parent / 'chroma.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=50, help="iterations per process (3 writes each)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--modes", nargs="+", default=["embedded", "server"], choices=["embedded", "server"])
    parser.add_argument("--unlocked", action="store_true", help="write without the write lock (loses counts)")
    args = parser.parse_args()

    print(f"{'mode':<9} {'procs':>5} {'writes':>6} {'writes/s':>9}  lost")
    for mode in args.modes:
        for processes in args.processes:
            with tempfile.TemporaryDirectory(prefix="bench-concurrency-") as scratch:
                if mode == "embedded":
                    rate, missing = measure({"home": Path(scratch) / "home"}, processes, args.writes, args.unlocked)
                else:
                    with chroma_server(Path(scratch) / "data") as url:
                        rate, missing = measure({"url": url}, processes, args.writes, args.unlocked)
            shown = ", ".join(f"{key} {value}" for key, value in missing.items() if value) or "nothing"
            print(f"{mode:<9} {processes:>5} {3 * processes * args.writes:>6} {rate:>9.1f}  {shown}", flush=True)


if __name__ == "__main__":
    main()
