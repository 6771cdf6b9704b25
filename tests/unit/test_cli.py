"""The `skillfold` command line through typer's CliRunner, on a tiny random-weight model saved to disk.

Nothing here needs the real default model: `--model DIR` points at the tiny Llama of `tests/tiny.py`.
The memory commands use the real MiniLM embedding (as the CLI does), loaded once per process.
"""

import json
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.cli import app
from envs.base import Message, Trajectory
from memory import Memory, Skill

runner = CliRunner()


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    """`HFEngine.load` uses every core; on a shared machine two spinning threads per op make the tiny
    model 10-30x slower, so these tests load it with one (torch's setting is restored afterwards)."""
    import os

    import torch

    threads = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    yield
    torch.set_num_threads(threads)


def invoke(*args, input: str | None = None):
    return runner.invoke(app, [str(arg) for arg in args], input=input)


def ok(result) -> None:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"


def last_json(result):
    ok(result)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines, f"nothing on stdout; stderr:\n{result.stderr}"
    return json.loads(lines[-1])


def flat(text: str) -> str:
    """Whitespace collapsed: rich wraps long messages at the console width."""
    return " ".join(text.split())


def assert_user_error(result, *fragments: str) -> str:
    """Exit 2, one clear `error:` message naming each fragment, no traceback, nothing on stdout."""
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    message = flat(result.stderr)
    assert message.startswith("error: ")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -------------------------------------------------------------------- envs / eval
def test_envs_lists_the_family_kinds():
    names = last_json(invoke("envs", "--json"))
    assert "toy" in names and "facts" in names and any(name.startswith("rg:") for name in names)


def test_eval_writes_a_run_and_repeats(model_dir, tmp_path):
    home = tmp_path / "home"
    command = ["eval", "--env", "toy", "--items", 4, "--model", model_dir, "--json", "--home", home]
    summary = last_json(invoke(*command))
    assert summary["env"] == "toy:1" and summary["items"] == 4
    assert 0.0 <= summary["accuracy"] <= 1.0
    run_dir = Path(summary["run_dir"])
    assert run_dir.parent == home / "runs"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["items"] == 4 and config["model"]["name"] == model_dir
    assert [env["name"] for env in config["envs"]] == ["toy"]
    [result] = json.loads((run_dir / "results.json").read_text())
    assert result["accuracy"] == summary["accuracy"] and result["items"] == 4
    lines = (run_dir / "trajectories.jsonl").read_text().splitlines()
    assert len(lines) == 4
    trajectories = [Trajectory.model_validate_json(line) for line in lines]
    assert all(t.split == "eval" and t.env == "toy:1" and t.turns for t in trajectories)
    assert sum(t.success for t in trajectories) == result["successes"] == round(summary["accuracy"] * 4)

    again = last_json(invoke(*command))
    assert again["run_dir"] != summary["run_dir"]  # a new run directory each time
    assert again["accuracy"] == summary["accuracy"]
    repeated = (Path(again["run_dir"]) / "trajectories.jsonl").read_text().splitlines()
    assert [Trajectory.model_validate_json(line).turns[0].action for line in repeated] == [
        t.turns[0].action for t in trajectories
    ]  # greedy: the same actions, not just the same count


BAD_INPUT = {
    "unknown env": (
        lambda m, tmp: ["eval", "--env", "nope", "--items", 4, "--model", m, "--home", tmp / "h"],
        ["unknown environment 'nope'", "available kinds", "rg:<dataset>", "toy[:turns]"],
    ),
    "env with brackets": (  # rich markup must not eat (or choke on) user text in the message
        lambda m, tmp: ["eval", "--env", "toy[bold]", "--model", m, "--home", tmp / "h"],
        ["unknown environment 'toy[bold]'"],
    ),
    "unknown env in run": (
        lambda m, tmp: ["run", "--env", "nope", "--model", m, "--home", tmp / "h"],
        ["unknown environment 'nope'", "available kinds"],
    ),
    "missing model dir": (
        lambda m, tmp: ["eval", "--env", "toy", "--items", 4, "--model", tmp / "no-such-model", "--home", tmp / "h"],
        ["no-such-model", "does not exist"],
    ),
    "model dir without config.json": (
        lambda m, tmp: ["eval", "--env", "toy", "--items", 4, "--model", tmp, "--home", tmp / "h"],
        ["is not a model directory (no config.json)"],
    ),
    "malformed config file": (
        lambda m, tmp: ["eval", "--model", m, "--home", tmp / "h", "--config", _write(tmp / "bad.toml", "items = [\n")],
        ["bad.toml", "is malformed"],
    ),
    "config file of the wrong shape": (
        lambda m, tmp: ["eval", "--env", "toy", "--model", m, "--home", tmp / "h",
                        "--config", _write(tmp / "list.yaml", "- 1\n- 2\n")],
        ["list.yaml", "must hold a table/mapping"],
    ),
    "negative items override": (
        lambda m, tmp: ["eval", "--env", "toy", "--model", m, "--home", tmp / "h", "items=-1"],
        ["invalid EvalConfig", "items", "greater than or equal to 1"],
    ),
    "override without =": (
        lambda m, tmp: ["eval", "--env", "toy", "--model", m, "--home", tmp / "h", "items"],
        ["'items' is not key=value"],
    ),
    "home is a file": (
        lambda m, tmp: ["eval", "--env", "toy", "--items", 4, "--model", m, "--home", _write(tmp / "afile", "x")],
        ["afile exists but is not a directory"],
    ),
    "memory maybe": (
        lambda m, tmp: ["eval", "--env", "toy", "--items", 4, "--model", m, "--home", tmp / "h", "--memory", "maybe"],
        ["--memory takes on or off, not 'maybe'"],
    ),
    "memory with markup": (
        lambda m, tmp: ["eval", "--env", "toy", "--model", m, "--home", tmp / "h", "--memory", "[/x]"],
        ["--memory takes on or off, not '[/x]'"],
    ),
    "no env": (
        lambda m, tmp: ["eval", "--model", m, "--home", tmp / "h"],
        ["name at least one task family with --env"],
    ),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD_INPUT), ids=list(BAD_INPUT))
def test_bad_input_exits_2_with_a_clear_message(case, model_dir, tmp_path):
    arguments, fragments = BAD_INPUT[case]
    assert_user_error(invoke(*arguments(model_dir, tmp_path)), *fragments)


@pytest.mark.parametrize("memory_flag", [[], ["--memory", "on"]], ids=["url-alone", "memory-on"])
def test_eval_with_an_unreachable_memory_server(memory_flag, model_dir, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    result = invoke("eval", "--env", "toy", "--items", 4, "--model", model_dir, "--home", tmp_path / "h",
                    "--memory-url", url, *memory_flag)
    assert_user_error(result, f"no Chroma server answers at {url}")


# -------------------------------------------------------------------- run
def test_run_stores_episodes_and_does_not_rerun_a_finished_run(model_dir, tmp_path):
    home = tmp_path / "home"
    command = ["run", "--env", "toy", "--episodes", 4, "--model", model_dir, "--home", home, "--json",
               "--run-id", "first", "loop.batch_size=2", "loop.probes=2", "loop.reflect_every=0",
               "loop.max_turns=2"]
    summary = last_json(invoke(*command))
    assert {"episodes", "successes", "skills_added", "skills_rejected"} <= summary.keys()
    assert summary["run_id"] == "first" and summary["env"] == "toy:1"
    assert summary["episodes"] == 4 and 0 <= summary["successes"] <= 4
    run_dir = home / "runs" / "run-first"
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    config = json.loads((run_dir / "config.json").read_text())
    assert config["loop"]["batch_size"] == 2 and config["loop"]["episodes"] == 4

    stats = last_json(invoke("skills", "stats", "--home", home, "--json"))
    assert stats["trajectories"] == 4
    assert set(stats["skills"]) == {"active", "pending", "folded", "retired"}
    assert stats["skills"] == summary["memory"]
    assert stats["skills"]["active"] == len(last_json(invoke("skills", "list", "--home", home, "--json")))
    assert stats["skills"]["active"] == summary["skills_added"]
    assert stats["families"]["toy:1"]["baseline_episodes"] + sum(
        skill["uses"] for skill in last_json(invoke("skills", "list", "--home", home, "--json"))
    ) >= 4  # every episode counted once, toward the baseline or toward a skill

    # the finished run is not played again: same summary, no new trajectories
    assert last_json(invoke(*command))["episodes"] == 4
    assert last_json(invoke("skills", "stats", "--home", home, "--json"))["trajectories"] == 4
    # while a new run id plays new episodes into the same memory
    other = [arg if arg != "first" else "second" for arg in command]
    other[other.index("--episodes") + 1] = 2
    assert last_json(invoke(*other))["episodes"] == 2
    assert last_json(invoke("skills", "stats", "--home", home, "--json"))["trajectories"] == 6


# -------------------------------------------------------------------- skills
@pytest.fixture()
def skill_home(tmp_path):
    """A home with two toy:1 skills and one arith skill, two toy:1 baseline episodes (one success)."""
    home = tmp_path / "home"
    store = Memory.open(home=home)
    solved = Trajectory(env="toy:1", item_id="train-0", split="train", success=True, reward=1.0,
                        prompt=[Message(role="user", content="Say the word: apple")])
    failed = Trajectory(env="toy:1", item_id="train-1", split="train",
                        prompt=[Message(role="user", content="Say the word: river")])
    store.add_trajectories([solved, failed])
    rule, bracketed, arith = store.add_skills([
        Skill(kind="rule", family="toy:1", title="repeat the word exactly",
              text="Repeat the asked word exactly, and write nothing else.",
              provenance=[solved.id, "gone-trajectory"], successes_with=3, failures_with=1),
        Skill(kind="exemplar", family="toy:1", title="sort [banana, apple]",
              text="user: sort the fruit names banana and apple\nassistant: apple banana"),
        Skill(kind="taught", family="arith", title="use the calculator for sums",
              text="For any arithmetic question, call CALC(expression) before you answer."),
    ])
    return {"home": home, "rule": rule, "bracketed": bracketed, "arith": arith, "solved": solved}


def test_skills_list(skill_home):
    home = skill_home["home"]
    rows = last_json(invoke("skills", "list", "--home", home, "--json"))
    by_id = {row["id"]: row for row in rows}
    assert set(by_id) == {skill_home[name].id for name in ("rule", "bracketed", "arith")}
    rule = by_id[skill_home["rule"].id]
    assert rule == {"id": skill_home["rule"].id, "kind": "rule", "family": "toy:1", "status": "active",
                    "uses": 4, "successes_with": 3, "title": "repeat the word exactly"}
    only_arith = last_json(invoke("skills", "list", "--home", home, "--family", "arith", "--json"))
    assert [row["id"] for row in only_arith] == [skill_home["arith"].id]
    assert last_json(invoke("skills", "list", "--home", home, "--status", "retired", "--json")) == []

    table = invoke("skills", "list", "--home", home)  # the human table goes to stderr
    ok(table)
    assert table.stdout == ""
    assert "3 skills" in table.stderr and skill_home["arith"].id in table.stderr
    assert "sort [banana, apple]" in table.stderr  # brackets are text, not rich markup


def test_skills_show(skill_home):
    home, rule, solved = skill_home["home"], skill_home["rule"], skill_home["solved"]
    shown = last_json(invoke("skills", "show", rule.id, "--home", home, "--json"))
    assert shown["id"] == rule.id and shown["text"] == rule.text and shown["kind"] == "rule"
    assert shown["provenance"] == [solved.id, "gone-trajectory"]
    assert shown["sources"] == [
        {"id": solved.id, "item_id": "train-0", "success": True},
        {"id": "gone-trajectory", "missing": True},
    ]
    helpfulness = shown["helpfulness"]
    # Beta(1,1) posteriors: with the skill (3+1)/(4+2); without, baseline 1 of 2 -> (1+1)/(2+2)
    assert helpfulness["rate_with"] == pytest.approx(4 / 6)
    assert helpfulness["rate_without"] == pytest.approx(2 / 4)
    assert helpfulness["mean"] == pytest.approx(4 / 6 - 2 / 4)
    assert helpfulness["lower"] < helpfulness["mean"] < helpfulness["upper"]
    assert helpfulness["uses"] == 4 and helpfulness["baseline_episodes"] == 2

    human = invoke("skills", "show", skill_home["bracketed"].id, "--home", home)
    ok(human)
    text = flat(human.stderr)
    assert "user: sort the fruit names banana and apple" in text and "(exemplar, active) toy:1" in text


def test_skills_search(skill_home):
    home = skill_home["home"]
    found = last_json(invoke("skills", "search", "how do I add two numbers", "--home", home, "--json"))
    assert found[0]["id"] == skill_home["arith"].id
    distances = [row["distance"] for row in found]
    assert distances == sorted(distances) and len(found) == 3
    narrowed = last_json(invoke("skills", "search", "repeat a word", "--family", "toy:1", "--k", 1,
                                "--home", home, "--json"))
    assert [row["id"] for row in narrowed] == [skill_home["rule"].id]


def test_skills_export(skill_home):
    home = skill_home["home"]
    exported = invoke("skills", "export", "--format", "json", "--home", home)
    ok(exported)
    data = json.loads(exported.stdout)
    assert {skill["id"] for skill in data["skills"]} == {skill_home[n].id for n in ("rule", "bracketed", "arith")}
    assert data["families"]["toy:1"]["baseline_episodes"] == 2
    assert data["families"]["toy:1"]["baseline_successes"] == 1

    markdown = invoke("skills", "export", "--format", "md", "--home", home, "--family", "toy:1")
    ok(markdown)
    text = markdown.stdout
    assert text.startswith("# Skills") and "## toy:1" in text and "## arith" not in text
    assert "### repeat the word exactly" in text
    assert "> Repeat the asked word exactly, and write nothing else." in text
    assert f"id `{skill_home['rule'].id}`" in text and "1/2 episodes succeeded" in text

    assert_user_error(invoke("skills", "export", "--format", "xml", "--home", home), "--format takes json or md")


def test_skills_rm(skill_home):
    home, rule = skill_home["home"], skill_home["rule"]
    removed = invoke("skills", "rm", rule.id, "--home", home)
    ok(removed)
    assert f"removed {rule.id} (rule, toy:1)" in removed.stderr
    assert_user_error(invoke("skills", "show", rule.id, "--home", home), f"no skill with id '{rule.id}'")
    remaining = {row["id"] for row in last_json(invoke("skills", "list", "--home", home, "--json"))}
    assert remaining == {skill_home["bracketed"].id, skill_home["arith"].id}
    assert_user_error(invoke("skills", "rm", rule.id, "--home", home), rule.id)
    # its source trajectories stay
    assert last_json(invoke("skills", "stats", "--home", home, "--json"))["trajectories"] == 2


def test_skills_show_missing_id(skill_home):
    assert_user_error(invoke("skills", "show", "no-such-skill", "--home", skill_home["home"], "--json"),
                      "no skill with id 'no-such-skill'", "skillfold skills list")


@pytest.mark.parametrize("make", ["empty", "absent"])
def test_skills_without_a_memory(make, tmp_path):
    home = tmp_path / "home"
    if make == "empty":
        home.mkdir()
    for command in (["list"], ["stats"], ["show", "abc"], ["search", "word"], ["export"]):
        result = invoke("skills", *command, "--home", home, "--json" if command[0] != "export" else "--format=md")
        assert_user_error(result, f"no skill memory in {home}", "--home")
    assert not (home / "chroma").exists()  # looking does not create a store


# -------------------------------------------------------------------- chat
def test_chat_teaches_answers_and_rates(model_dir, tmp_path):
    home = tmp_path / "home"
    script = "/teach always answer in one word\n/skills\nhello\n/good\n/quit\n/teach never stored\n"
    # no tools: with them a fresh home starts from their documentation skills (tests/unit/test_user_tools.py)
    result = invoke("chat", "--model", model_dir, "--home", home, "--tools", "", input=script)
    ok(result)
    shown = flat(result.stderr)
    store = Memory.open(home=home)
    skills = store.list_skills(family="chat")
    assert sorted(skill.kind for skill in skills) == ["exemplar", "taught"]  # nothing after /quit
    taught = next(skill for skill in skills if skill.kind == "taught")
    exemplar = next(skill for skill in skills if skill.kind == "exemplar")
    assert taught.text == "always answer in one word"
    assert f"stored skill {taught.id} for chat" in shown
    assert "the last answer used no skills" in shown  # /skills before any answer
    assert f"[skill {taught.id}] always answer in one word" in shown  # retrieved for "hello"
    [trajectory] = store.list_trajectories()
    assert trajectory.reward == 1.0 and trajectory.success and trajectory.env == "chat"
    assert trajectory.skill_ids == [taught.id]
    assert [m.content for m in trajectory.prompt if m.role == "user"] == ["hello"]
    assert exemplar.provenance == [trajectory.id] and exemplar.title == "hello"
    assert f"stored trajectory {trajectory.id} with reward 1" in shown
    assert f"stored exemplar skill {exemplar.id}" in shown
    assert store.get_skill(taught.id).successes_with == 1


def test_chat_rejects_a_home_that_is_a_file(model_dir, tmp_path):
    result = invoke("chat", "--model", model_dir, "--home", _write(tmp_path / "afile", "x"), input="/quit\n")
    assert_user_error(result, "afile exists but is not a directory")


def test_demo_report_has_one_row_per_measurement_with_its_interval():
    from agent.demo import demo_report

    rows = [
        {"stage": "base model", "env": "rg:a", "successes": 1, "items": 40, "accuracy": 0.025, "ci_low": 0.0044,
         "ci_high": 0.1289, "adapter": None},
        {"stage": "folded, memory off", "env": "rg:a", "successes": 39, "items": 40, "accuracy": 0.975,
         "ci_low": 0.8712, "ci_high": 0.9956, "adapter": "/h/adapters/demo"},
    ]
    table = [line for line in demo_report(rows).splitlines() if line.startswith("| ") and "rg:a" in line]
    assert table == [
        "| base model | rg:a | 1/40 | 2.5% | 0.4%-12.9% | none |",
        "| folded, memory off | rg:a | 39/40 | 97.5% | 87.1%-99.6% | /h/adapters/demo |",
    ]
