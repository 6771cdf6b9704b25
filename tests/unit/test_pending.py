"""Pending skills: stored by `run --pending` without asking, never retrieved, approved or rejected later
through the CLI (`skills approve|reject`) or the ui with `--allow-edits`."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from agent.cli import app as cli_app
from agent.config import LoopSettings
from agent.loop import Runtime, run_loop
from agent.ui import UiSettings, create_app
from engines.base import SamplingParams
from envs import make_family
from memory import HashingEmbedding, Memory, Skill, StatusChange
from tests.fakes import ScriptedEngine
from tests.unit.test_agent_loop import learner

runner = CliRunner()


def pending_skill(family: str = "toy:1", text: str = "Repeat the asked word exactly.") -> Skill:
    change = StatusChange(status="pending", reason="awaiting approval", evidence={"probes": 4})
    return Skill(kind="rule", family=family, title="repeat", text=text, status="pending", status_history=[change])


@pytest.fixture()
def home(tmp_path):
    return tmp_path / "home"


@pytest.fixture()
def memory(home):
    return Memory.open(home=home, embedding=HashingEmbedding())


def test_pending_skill_is_stored_in_the_archive_and_never_retrieved(memory):
    skill = memory.add_skill(pending_skill())
    active = memory.add_skill(Skill(kind="rule", family="toy:1", title="other", text="Answer in one word."))
    assert memory.get_skill(skill.id).status == "pending"
    assert [found.id for found, _ in memory.search_skills("repeat the word", family="toy:1")] == [active.id]
    assert [found.id for found in memory.retrieve("repeat the word", "toy:1", token_budget=1000, count_tokens=len)] == [active.id]
    assert [found.id for found in memory.list_skills(status="pending")] == [skill.id]
    assert [found.id for found in memory.list_skills(status="retired")] == []
    stats = memory.stats()
    assert stats["skills"] == {"active": 1, "pending": 1, "folded": 0, "retired": 0}
    assert stats["families"]["toy:1"]["pending"] == 1
    approved = memory.set_status(skill.id, "active", "approved")
    assert approved.status == "active" and memory.stats()["skills"]["pending"] == 0


def test_run_with_pending_stores_candidates_without_asking(memory, tmp_path):
    settings = LoopSettings(episodes=8, batch_size=4, probes=4, reflect_every=0, sampling=SamplingParams(),
                            max_turns=2, pending=True)
    runtime = Runtime(engine=ScriptedEngine(learner), memory=memory, family=make_family("toy"),
                      settings=settings, run_id="p1")
    state = run_loop(runtime, tmp_path / "loop.sqlite")  # no approver: it must not interrupt
    assert state["episodes"] == 8
    assert state["skills_pending"] >= 1 and state["skills_added"] == 0
    skills = memory.list_skills()
    assert skills and all(skill.status == "pending" for skill in skills)
    first = skills[0].status_history[0]
    assert first.reason == "awaiting approval" and {"probes", "successes_with", "successes_without"} <= first.evidence.keys()
    # nothing pending is retrieved: the second batch played without skills in its prompts
    assert all(not trajectory.skill_ids for trajectory in memory.list_trajectories(limit=100))


def test_approve_and_pending_together_are_refused():
    with pytest.raises(ValueError, match="set one of them"):
        LoopSettings(approve=True, pending=True)


@pytest.fixture()
def hashing_cli(monkeypatch):
    monkeypatch.setattr("agent.cli_memory.open_memory", lambda home, url=None: Memory.open(
        home=home, embedding=HashingEmbedding()))


def test_cli_approve_and_reject(memory, home, hashing_cli):
    first = memory.add_skill(pending_skill())
    second = memory.add_skill(pending_skill(text="Answer with the word only, in lower case."))
    listed = runner.invoke(cli_app, ["skills", "list", "--status", "pending", "--home", str(home), "--json"])
    assert listed.exit_code == 0 and {first.id, second.id} <= set(re.findall(r'"id": "([^"]+)"', listed.stdout))

    approved = runner.invoke(cli_app, ["skills", "approve", first.id, "--reason", "checked it", "--home", str(home)])
    assert approved.exit_code == 0, approved.output
    rejected = runner.invoke(cli_app, ["skills", "reject", second.id, "--reason", "too vague", "--home", str(home)])
    assert rejected.exit_code == 0, rejected.output
    memory = Memory.open(home=home, embedding=HashingEmbedding(), create=False)
    assert memory.get_skill(first.id).status == "active"
    assert memory.get_skill(first.id).status_history[-1].reason == "approved by skillfold skills: checked it"
    assert memory.get_skill(second.id).status == "retired"
    assert memory.get_skill(second.id).status_history[-1].reason == "rejected by skillfold skills: too vague"

    again = runner.invoke(cli_app, ["skills", "approve", first.id, "--home", str(home)])
    assert again.exit_code == 2 and "Traceback" not in again.output
    assert "is active, not pending" in " ".join(again.stderr.split())
    missing = runner.invoke(cli_app, ["skills", "reject", "no-such-id", "--home", str(home)])
    assert missing.exit_code == 2


def ui_client(home, **settings) -> TestClient:
    app = create_app(UiSettings(home=home, **settings), embedding=HashingEmbedding())
    return TestClient(app, base_url="http://127.0.0.1:8765")


def test_ui_approves_and_rejects_pending_skills(memory, home):
    first = memory.add_skill(pending_skill())
    second = memory.add_skill(pending_skill(text="Answer with the word only, in lower case."))
    client = ui_client(home, allow_edits=True)
    library = client.get("/", params={"status": "pending"}).text
    assert first.id in library and second.id in library and "<th>pending</th>" in library
    page = client.get(f"/skills/{first.id}").text
    assert 'id="approve"' in page and 'id="reject"' in page and 'id="retire"' not in page
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    forged = client.post(f"/skills/{first.id}/status", data={"action": "approve", "reason": "x", "csrf": "forged"})
    assert forged.status_code == 403

    approved = client.post(f"/skills/{first.id}/status", data={"action": "approve", "reason": "fine", "csrf": csrf})
    assert approved.status_code == 200 and 'id="skill-status">active' in approved.text
    assert "approved by skillfold ui: fine" in approved.text
    rejected = client.post(f"/skills/{second.id}/status", data={"action": "reject", "reason": "no", "csrf": csrf})
    assert 'id="skill-status">retired' in rejected.text and "rejected by skillfold ui: no" in rejected.text
    # an active skill is not pending: refused, unchanged
    refused = client.post(f"/skills/{first.id}/status", data={"action": "reject", "reason": "no", "csrf": csrf})
    assert "not changed" in refused.text and 'id="skill-status">active' in refused.text

    memory = Memory.open(home=home, embedding=HashingEmbedding(), create=False)
    assert memory.get_skill(first.id).status == "active" and memory.get_skill(second.id).status == "retired"


def test_read_only_ui_refuses_approval(memory, home):
    skill = memory.add_skill(pending_skill())
    client = ui_client(home)
    page = client.get(f"/skills/{skill.id}").text
    assert 'id="approve"' not in page
    response = client.post(f"/skills/{skill.id}/status", data={"action": "approve", "reason": "x", "csrf": "x"})
    assert response.status_code == 403 and "--allow-edits" in response.text
    memory = Memory.open(home=home, embedding=HashingEmbedding(), create=False)
    assert memory.get_skill(skill.id).status == "pending"


def test_run_refuses_approve_with_pending(tmp_path):
    result = runner.invoke(cli_app, ["run", "--env", "toy", "--approve", "--pending", "--home", str(tmp_path / "h")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "set one of them" in " ".join(result.stderr.split())
