"""Your own tools: typed Python functions (`module:function`, `file.py:function`) and MCP servers.

Every call runs under a time limit with its output capped; bad arguments, exceptions and timeouts
are observations the model sees; each call is stored on its turn as a `ToolUse` record. The MCP
tests start a real stdio server written here with the `mcp` SDK (its `MCPServer`, which mcp 2
renamed from `FastMCP`).
"""

import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from agent.chat import ChatSession
from engines.base import SamplingParams
from envs import EnvSpecError, make_family
from envs.function_tools import function_tool
from envs.tool_use import ToolFamily
from envs.tools import run_tool
from learners.rollout import run_episodes
from memory import HashingEmbedding, Memory
from tests.fakes import ScriptedEngine
from tests.unit.test_cli import assert_user_error, flat, invoke, last_json, ok

TOOLS_SOURCE = '''
import time


def word_count(text: str) -> int:
    """Count the words of a text.

    >>> word_count("the cat sat")
    3
    """
    return len(text.split())


def power(base: int, exponent: int = 2) -> int:
    """Raise an integer to a power.

    >>> power(3, exponent=4)
    81
    """
    return base**exponent


def explode(text: str) -> str:
    """Always fails."""
    raise RuntimeError(f"cannot handle {text}")


def dawdle(seconds: float) -> str:
    """Sleeps."""
    time.sleep(seconds)
    return "awake"


def shout(text: str) -> str:
    """Repeat a text many times."""
    return text.upper() * 5000


def untyped(text):
    return text
'''

SERVER_SOURCE = '''
import time

from mcp.server.mcpserver import MCPServer

server = MCPServer("tiny")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def reverse(text: str) -> str:
    """Reverse a text."""
    return text[::-1]


@server.tool()
def fail(text: str) -> str:
    """Always fails."""
    raise ValueError("no")


@server.tool()
def sleepy(seconds: float) -> str:
    """Sleeps."""
    time.sleep(seconds)
    return "awake"


if __name__ == "__main__":
    server.run("stdio")
'''


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda _: None)


@pytest.fixture()
def tools_file(tmp_path) -> Path:
    path = tmp_path / "my_tools.py"
    path.write_text(textwrap.dedent(TOOLS_SOURCE))
    return path


@pytest.fixture(scope="module")
def mcp_command(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("mcp") / "server.py"
    path.write_text(SERVER_SOURCE)
    return f"{sys.executable} {path}"


def tool(path: Path, name: str):
    from envs.registry import tool_from_spec

    return tool_from_spec(f"{path}:{name}")


# ------------------------------------------------------------------ a typed function is a tool
def test_name_signature_and_docstring_make_what_the_model_sees(tools_file):
    count, power = tool(tools_file, "word_count"), tool(tools_file, "power")
    assert (count.name, count.call_name, count.syntax) == ("word_count", "WORD_COUNT", "WORD_COUNT(<text>)")
    assert count.description == "Count the words of a text."
    assert count.usage == "WORD_COUNT(the cat sat)" and count.documented
    assert power.syntax == "POWER(<JSON object of base, exponent>)"
    assert power.usage == 'POWER({"base": 3, "exponent": 4})'
    family = make_family(f"toy+{tools_file}:word_count+calc")
    assert isinstance(family, ToolFamily) and family.name == "toy:1+calc+word_count"
    system = family.make("eval", 0).initial_observation()[0].content
    assert "- WORD_COUNT(<text>): Count the words of a text.. Example: WORD_COUNT(the cat sat)" in system
    [calc_dialogue, count_dialogue] = family.documentation()
    assert [m.content for m in count_dialogue][1:4] == ["WORD_COUNT(the cat sat)", "Result: 3", "ANSWER: 3"]
    assert count_dialogue[0].content.startswith('What is word_count("the cat sat")?')
    assert not tool(tools_file, "explode").documented  # no example: no starting skill


def test_arguments_are_read_as_one_value_or_a_json_object_and_validated(tools_file):
    count, power = tool(tools_file, "word_count"), tool(tools_file, "power")
    assert run_tool(count, "a b c").result == "3"
    assert run_tool(count, '"a b"').arguments == {"text": "a b"}
    assert run_tool(count, '{"text": "x y z w"}').result == "4"
    assert run_tool(power, '{"base": 2, "exponent": 10}').result == "1024"
    assert run_tool(power, "5").result == "25"  # the one required argument, bare
    bad = run_tool(power, '{"base": "two"}')
    assert bad.result is None and bad.arguments == '{"base": "two"}'
    assert "bad arguments for POWER (base: Input should be a valid integer" in bad.error
    assert 'write POWER({"base": ..., "exponent": ...})' in bad.error
    assert "not a JSON object of base, exponent" in run_tool(power, '{"height": 3}').error
    marker = tools_file.parent / "evaluated"
    attack = run_tool(power, f"__import__('pathlib').Path({str(marker)!r}).touch()")
    assert "valid integer" in attack.error and not marker.exists()  # read as data, never evaluated


def test_exceptions_timeouts_and_long_output_become_observations(tools_file):
    failed = run_tool(tool(tools_file, "explode"), "it")
    assert failed.error == "the tool raised RuntimeError: cannot handle it" and failed.result is None
    started = time.perf_counter()
    slow = run_tool(tool(tools_file, "dawdle"), "30", time_limit_s=0.3)
    assert time.perf_counter() - started < 5
    assert slow.error == "no result within the time limit of 0.3 seconds" and 0.3 <= slow.seconds < 5
    long = run_tool(tool(tools_file, "shout"), "ab", max_output_chars=100)
    assert long.result.startswith("ABAB") and long.result.endswith("... [9900 more characters cut]")


def test_a_function_that_cannot_be_a_tool_is_a_clear_error(tools_file, tmp_path):
    with pytest.raises(EnvSpecError, match="parameter 'text' of untyped has no type annotation; annotate it"):
        tool(tools_file, "untyped")
    with pytest.raises(EnvSpecError, match="has no 'nothing'"):
        tool(tools_file, "nothing")
    with pytest.raises(EnvSpecError, match="may not be called calc"):
        tool(_write(tmp_path / "c.py", "def calc(x: str) -> str:\n    return x\n"), "calc")
    with pytest.raises(EnvSpecError, match="is not a function"):
        function_tool(42, "here")
    with pytest.raises(EnvSpecError, match="takes \\*args"):
        tool(_write(tmp_path / "v.py", "def many(*args: int) -> int:\n    return 0\n"), "many")
    with pytest.raises(EnvSpecError, match="two tools are named word_count"):
        make_family(f"toy+{tools_file}:word_count", tools=[f"{tools_file}:word_count"])
    with pytest.raises(EnvSpecError, match="unknown tool teleport; available tools: calc, lookup, module:function"):
        make_family("toy+teleport")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_module_function_spec(tmp_path, monkeypatch):
    (tmp_path / "user_tools_pkg").mkdir()
    (tmp_path / "user_tools_pkg" / "__init__.py").write_text("")
    (tmp_path / "user_tools_pkg" / "text.py").write_text(textwrap.dedent(TOOLS_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    family = make_family("facts", tools=["user_tools_pkg.text:word_count", "user_tools_pkg.text:power", "lookup"])
    assert family.name == "facts+lookup+power+word_count"


# ------------------------------------------------------------------ calls on record
def test_every_call_is_stored_on_its_turn(tools_file):
    family = make_family(f"toy+{tools_file}:word_count+{tools_file}:explode+{tools_file}:power")
    replies = iter(["WORD_COUNT(one two)", "EXPLODE(x)", 'POWER({"base": "x"})', "ANSWER: 2"])
    [trajectory] = run_episodes(ScriptedEngine(lambda chat: next(replies)), [family.make("eval", 0)],
                                SamplingParams(), split="eval", max_turns=4)
    calls = [turn.tool_calls for turn in trajectory.turns]
    assert [len(turn_calls) for turn_calls in calls] == [1, 1, 1, 0]
    counted, exploded, bad = calls[0][0], calls[1][0], calls[2][0]
    assert (counted.name, counted.arguments, counted.result, counted.error) == ("word_count", {"text": "one two"}, "2", None)
    assert counted.seconds >= 0
    assert exploded.error == "the tool raised RuntimeError: cannot handle x"
    assert trajectory.turns[1].observation[0].content == "Error: the tool raised RuntimeError: cannot handle x"
    assert bad.arguments == '{"base": "x"}' and bad.result is None and "bad arguments for POWER" in bad.error
    again = type(trajectory).model_validate_json(trajectory.model_dump_json())
    assert again.turns[0].tool_calls == trajectory.turns[0].tool_calls


def test_cli_eval_and_run_with_function_tools(tools_file, model_dir, tmp_path):
    home = tmp_path / "home"
    summary = last_json(invoke("eval", "--env", "facts", "--tools", "calc", "--tools", f"{tools_file}:word_count", "--items", 2,
                               "--model", model_dir, "--home", home, "--json", "max_turns=2",
                               "sampling.max_new_tokens=4"))
    assert summary["env"] == "facts+calc+word_count" and summary["errors"] == 0
    summary = last_json(invoke("run", "--env", "facts", "--tools", f"{tools_file}:word_count", "--episodes", 2,
                               "--model", model_dir, "--home", home, "--json", "--run-id", "t",
                               "loop.batch_size=2", "loop.probes=2", "loop.reflect_every=0", "loop.max_turns=2",
                               "loop.sampling.max_new_tokens=4"))
    assert summary["env"] == "facts+word_count" and summary["episodes"] == 2
    assert_user_error(invoke("eval", "--env", "facts", "--tools", f"{tools_file}:untyped", "--model", model_dir,
                             "--home", home), "parameter 'text' of untyped has no type annotation")


# ------------------------------------------------------------------ chat
def test_chat_on_a_fresh_home_starts_from_the_tools_documentation(tools_file, tmp_path):
    memory = Memory.open(home=tmp_path / "home", embedding=HashingEmbedding())
    seen = []

    def respond(chat):
        seen.append(chat)
        return "ANSWER: 391" if chat[-1]["content"].startswith("Result:") else "CALC(17 * 23)"

    session = ChatSession(ScriptedEngine(respond), memory, tools=["calc", f"{tools_file}:word_count"])
    seeded = session.seed_documentation()
    assert sorted(skill.title for skill in seeded) == ["how to call a tool: CALC(12 * (3 + 4))",
                                                       "how to call a tool: WORD_COUNT(the cat sat)"]
    assert session.seed_documentation() == []  # once only: the family has skills now
    shown = session.handle("Use the calculator: what is 17 * 23?")
    assert "[tool] CALC(17 * 23) -> Result: 391" in shown and "agent> 391" in shown
    assert any(m["role"] == "assistant" and m["content"] == "CALC(12 * (3 + 4))" for m in seen[0])  # the example
    assert session.last.turns[0].tool_calls[0].result == "391"


def test_cli_chat_seeds_documentation_skills(tools_file, model_dir, tmp_path):
    home = tmp_path / "home"
    result = invoke("chat", "--model", model_dir, "--home", home, "--tools", f"calc,{tools_file}:word_count",
                    input="/quit\n")
    ok(result)
    assert "seeded skill" in flat(result.stderr) and "WORD_COUNT(the cat sat)" in flat(result.stderr)
    assert len(Memory.open(home=home).list_skills(family="chat")) == 2


# ------------------------------------------------------------------ MCP
def test_mcp_server_tools_are_listed_and_called(mcp_command):
    family = make_family("facts", mcp=[mcp_command])
    assert family.name == "facts+add+fail+reverse+sleepy"
    environment = family.make("eval", 0)
    system = environment.initial_observation()[0].content
    assert "- ADD(<JSON object of a, b>): Add two integers." in system
    assert "- REVERSE(<text>): Reverse a text." in system
    added = environment.step('ADD({"a": 2, "b": 40})')
    assert added.observation[0].content == "Result: 42"
    assert added.tool_calls[0].arguments == {"a": 2, "b": 40}
    assert environment.step("REVERSE(stressed)").observation[0].content == "Result: desserts"
    failed = environment.step("FAIL(x)")
    assert failed.observation[0].content.startswith("Error: ") and failed.tool_calls[0].error
    bad = environment.step('ADD({"a": "x", "b": 1})')
    assert "valid integer" in bad.observation[0].content
    assert family.documentation() == []  # MCP tools carry no examples to replay


def test_a_slow_mcp_tool_times_out_and_the_server_goes_on(mcp_command):
    sleepy = next(t for t in _server_tools(mcp_command) if t.name == "sleepy")
    started = time.perf_counter()
    slow = run_tool(sleepy, "20", time_limit_s=0.5)
    assert slow.error == "no result within the time limit of 0.5 seconds" and time.perf_counter() - started < 5
    add = next(t for t in _server_tools(mcp_command) if t.name == "add")
    assert run_tool(add, '{"a": 1, "b": 2}').result == "3"


def _server_tools(command):
    from envs.mcp_tools import mcp_tools

    return sorted(mcp_tools(command), key=lambda t: t.name)


def test_a_bad_mcp_command_is_a_clear_error(model_dir, tmp_path):
    with pytest.raises(EnvSpecError, match="cannot start the MCP server `no-such-server-xyz`: FileNotFoundError"):
        make_family("toy", mcp=["no-such-server-xyz"])
    crash = f"{sys.executable} -c \"import sys; print('missing API key', file=sys.stderr); sys.exit(1)\""
    assert_user_error(invoke("eval", "--env", "toy", "--mcp", crash, "--model", model_dir, "--home", tmp_path / "h"),
                      "cannot start the MCP server", "its stderr ends: missing API key")


def test_cli_eval_with_an_mcp_server(mcp_command, model_dir, tmp_path):
    summary = last_json(invoke("eval", "--env", "facts", "--mcp", mcp_command, "--items", 2, "--model", model_dir,
                               "--home", tmp_path / "home", "--json", "max_turns=2", "sampling.max_new_tokens=4"))
    assert summary["env"] == "facts+add+fail+reverse+sleepy" and summary["errors"] == 0
