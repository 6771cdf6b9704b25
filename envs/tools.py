"""Tools an agent may call before it answers, and the one call syntax every tool shares.

The call syntax (what the model writes; the environment parses it with `parse_action`):

    CALC(12 * (3 + 4))        a tool call: the environment replies "Result: 84"
    LOOKUP(Zorvalin color)    a tool call: the environment replies "Result: teal"
    ANSWER: 84                the final answer: the episode is scored

- A tool call is a line `NAME(argument)`: NAME is the tool's upper-case name (CALC, LOOKUP), `(`
  follows it directly, the parentheses balance, and the `)` that closes the call ends the line.
  The argument is everything between the outer parentheses, stripped.
- The final answer is a line `ANSWER: <answer>` (the rest of that line; if it is empty, the text
  after it).
- Lines are read top to bottom and the first call or ANSWER line decides; other lines (reasoning)
  are ignored. One action makes at most one call.
- A line that starts like a call but breaks a rule (`CALC(2+`, `CALC(2) = 2`, `calc(2)`,
  `CALC (2)`, an unknown upper-case name `FOO(1)`) is `Malformed`: the agent is told what was
  wrong and may try again. A text with neither a call nor an ANSWER line is a `FinalAnswer` with
  the whole text, so a model that just answers is still scored.

A tool is a plain typed function `run(argument: str) -> str` in a `Tool` record; it raises
`ToolError` for an argument it cannot serve, and the environment shows "Error: <message>". No tool
ever executes model-written code: the calculator walks a whitelisted arithmetic syntax tree.
`run_tool` is how every call runs (in an environment or in chat): under a time limit, its output
capped, and whatever goes wrong (bad arguments, an exception, a timeout) turned into an error the
model is shown. A user's typed Python function becomes a `Tool` in `envs.function_tools`, an MCP
server's tools in `envs.mcp_tools`.
"""

from __future__ import annotations

import ast
import difflib
import math
import operator
import re
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from envs.base import ToolUse

TIME_LIMIT_S = 10.0  # the longest one tool call may take before the model is told it timed out
MAX_OUTPUT_CHARS = 2000  # a longer result is cut to this many characters


class ToolError(ValueError):
    """A tool cannot serve this argument; the message is shown to the agent as "Error: <message>"."""


@dataclass(frozen=True)
class Tool:
    """A named function the agent may call as `NAME(argument)`, NAME = `name.upper()`."""

    name: str  # lower case, as in `--tools calc`
    description: str  # one line: what it does and what the argument is
    usage: str  # one example call, e.g. "CALC(12 * (3 + 4))"
    run: Callable[[str], str]  # argument -> result text; raises ToolError
    argument: str = "argument"  # the placeholder in the syntax line: CALC(<expression>)
    examples: tuple[str, ...] = ()  # more example arguments, for documentation dialogues
    # the argument text as structured arguments (for the trajectory record); raises ToolError
    parse: Callable[[str], dict[str, Any] | str] | None = None
    questions: tuple[str, ...] = ()  # the task of each documentation example (usage, then examples)
    documented: bool = True  # False: `usage` is only a pattern, with no example to replay

    @property
    def call_name(self) -> str:
        return self.name.upper()

    @property
    def syntax(self) -> str:
        return f"{self.call_name}(<{self.argument}>)"


def _capped(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]} ... [{len(text) - limit} more characters cut]"


def run_tool(
    tool: Tool, argument: str, *, time_limit_s: float = TIME_LIMIT_S, max_output_chars: int = MAX_OUTPUT_CHARS
) -> ToolUse:
    """Run one call of `tool` and record it; nothing the tool does escapes as an exception.

    The call runs in a daemon thread that the caller waits on for `time_limit_s`; a call that runs
    past it is reported as timed out and abandoned (Python cannot stop a thread: a tool that must be
    killable belongs in its own process, e.g. an MCP server). Results and errors are cut to
    `max_output_chars`.
    """
    started = time.perf_counter()
    arguments: dict[str, Any] | str = argument
    outcome: dict[str, str] = {}
    try:
        if tool.parse is not None:
            arguments = tool.parse(argument)
    except ToolError as error:
        outcome["error"] = str(error)
    except Exception as error:  # a parser of a user's tool
        outcome["error"] = f"cannot read the arguments ({type(error).__name__}: {error})"

    def call() -> None:
        try:
            outcome["result"] = str(tool.run(argument))
        except ToolError as error:
            outcome["error"] = str(error)
        except BaseException as error:  # a user's tool: whatever it raises is the model's observation
            outcome["error"] = f"the tool raised {type(error).__name__}: {error}"

    if not outcome:
        worker = threading.Thread(target=call, name=f"tool-{tool.name}", daemon=True)
        worker.start()
        worker.join(time_limit_s)
        if worker.is_alive():  # what it may still write is ignored
            outcome = {"error": f"no result within the time limit of {time_limit_s:g} seconds"}
        elif not outcome:
            outcome["error"] = "the tool ended without a result"
    result, error = outcome.get("result"), outcome.get("error")
    return ToolUse(
        name=tool.name,
        arguments=arguments,
        result=None if result is None else _capped(result, max_output_chars),
        error=None if error is None else _capped(error, max_output_chars),
        seconds=time.perf_counter() - started,
    )


def observation_text(use: ToolUse) -> str:
    """What the model is shown for a call: "Result: <value>" or "Error: <message>"."""
    return f"Error: {use.error}" if use.error is not None else f"Result: {use.result}"


# ---------------------------------------------------------------- calculator

MAX_EXPRESSION_CHARS = 200
MAX_DIGITS = 100  # no integer (input, intermediate or result) may be longer than this

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_HINTS = {ast.BitXor: " (use ** for powers)", ast.MatMult: " (use * to multiply)"}


def _checked(value: int | float) -> int | float:
    if isinstance(value, complex):
        raise ToolError("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("the result is too large")
    if isinstance(value, int) and abs(value) >= 10**MAX_DIGITS:
        raise ToolError(f"a number has more than {MAX_DIGITS} digits")
    return value


def _power(base: int | float, exponent: int | float) -> int | float:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if exponent * math.log10(abs(base)) >= MAX_DIGITS:
            raise ToolError(f"the power has more than {MAX_DIGITS} digits")
    return operator.pow(base, exponent)


def _evaluate_node(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise ToolError(f"only numbers are allowed, not {node.value!r}")
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_evaluate_node(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate_node(node.left), _evaluate_node(node.right)
        try:
            if isinstance(node.op, ast.Pow):
                return _checked(_power(left, right))
            return _checked(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        except OverflowError:
            raise ToolError("the result is too large") from None
    if isinstance(node, ast.BinOp | ast.UnaryOp):
        raise ToolError(
            f"unsupported operator{_HINTS.get(type(node.op), '')}; use + - * / // % ** and parentheses"
        )
    if isinstance(node, ast.Call):
        raise ToolError("function calls are not allowed: only numbers and + - * / // % ** ( )")
    if isinstance(node, ast.Name):
        raise ToolError(f"unknown name {node.id!r}: only numbers and + - * / // % ** ( ) are allowed")
    raise ToolError("only numbers and + - * / // % ** ( ) are allowed")


def evaluate_arithmetic(expression: str) -> int | float:
    """The value of an arithmetic expression over ints and floats; raises ToolError.

    Parsed with `ast` and walked node by node over a whitelist (numbers, + - * / // % **, unary
    minus and plus, parentheses); nothing is ever eval'd. `//` and `%` floor as in Python.
    """
    text = expression.strip()
    if not text:
        raise ToolError("empty expression; write one like CALC(12 * (3 + 4))")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ToolError(f"cannot parse {text!r} as arithmetic") from None
    return _evaluate_node(tree.body)


def format_number(value: int | float) -> str:
    """Integers (and integral floats) as integers; other floats to 12 significant digits."""
    if isinstance(value, int):
        return str(value)
    value = float(f"{value:.12g}")
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


def _calculate(argument: str) -> str:
    return format_number(evaluate_arithmetic(argument))


calculator = Tool(
    name="calc",
    description="evaluates arithmetic: numbers, + - * / // % ** and parentheses",
    usage="CALC(12 * (3 + 4))",
    examples=("58 - 23",),
    run=_calculate,
    argument="expression",
)


# ---------------------------------------------------------------- lookup


def normalize_key(key: str) -> str:
    """Case-folded, whitespace collapsed: the form lookup keys are compared in."""
    return " ".join(key.split()).casefold()


def _varied_keys(table: Mapping[str, str], first: str, count: int = 2) -> tuple[str, ...]:
    """Up to `count` more example keys, each starting with a word no earlier example starts with."""
    seen = {first.split()[0].casefold()} if first.split() else set()
    chosen = []
    for key in table:
        word = key.split()[0].casefold() if key.split() else ""
        if word not in seen:
            seen.add(word)
            chosen.append(key)
        if len(chosen) == count:
            break
    return tuple(chosen)


def make_lookup(table: Mapping[str, str], description: str | None = None) -> Tool:
    """A LOOKUP tool over `table`: exact key match after `normalize_key`; unknown -> close keys."""
    if not table:
        raise ValueError("a lookup table needs at least one entry")
    entries: dict[str, tuple[str, str]] = {}
    for key, value in table.items():
        normal = normalize_key(key)
        if normal in entries:
            raise ValueError(
                f"lookup keys {entries[normal][0]!r} and {key!r} are the same up to case and spaces"
            )
        entries[normal] = (key, value)
    example = next(iter(table))

    def lookup(argument: str) -> str:
        normal = normalize_key(argument)
        if not normal:
            raise ToolError(f"empty key; write one like LOOKUP({example})")
        if normal in entries:
            return entries[normal][1]
        close = difflib.get_close_matches(normal, entries, n=5, cutoff=0.6)
        if close:
            listed = ", ".join(entries[match][0] for match in close)
            raise ToolError(f"unknown key {argument.strip()!r}; close keys: {listed}")
        raise ToolError(f"unknown key {argument.strip()!r}; no close keys (keys look like {example!r})")

    return Tool(
        name="lookup",
        description=description or "looks up a value in a fact table by its exact key (case does not matter)",
        usage=f"LOOKUP({example})",
        examples=_varied_keys(table, example),
        run=lookup,
        argument="key",
    )


# ---------------------------------------------------------------- parsing actions


class ToolCall(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    tool: str  # the tool's lower-case name
    argument: str


class FinalAnswer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str


class Malformed(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    message: str  # what was wrong, shown to the agent


Action = ToolCall | FinalAnswer | Malformed

_ANSWER = re.compile(r"answer\s*:", re.IGNORECASE)
_CALL_START = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(\s*)\(")


def _parse_call(line: str, name: str, start: int, known: dict[str, str]) -> Action | None:
    """`line` starts with `name` then optional spaces then `(` at `start`; None if not call-like."""
    upper = name.upper()
    if upper not in known:
        if name == upper and len(name) >= 2 and line[len(name)] == "(":
            tools = ", ".join(sorted(known)) or "none"
            return Malformed(message=f"unknown tool {name}; the tools are: {tools}")
        return None
    if name != upper:
        return Malformed(message=f"tool names are upper case: write {upper}(...), not {name}(...)")
    if start != len(name):
        return Malformed(message=f"no space between the tool name and the parenthesis: write {upper}(...)")
    depth = 0
    for index in range(start, len(line)):
        if line[index] == "(":
            depth += 1
        elif line[index] == ")":
            depth -= 1
            if depth == 0:
                if line[index + 1 :].strip():
                    return Malformed(
                        message=f"text after the call {line[: index + 1]}: end the line after the closing parenthesis"
                    )
                return ToolCall(tool=known[upper], argument=line[start + 1 : index].strip())
    return Malformed(message=f"unbalanced parentheses in {line}: a call must close on the same line")


def parse_action(text: str, tool_names: Collection[str]) -> Action:
    """Read one model action under the call syntax of the module docstring (first call or ANSWER wins)."""
    known = {name.upper(): name.lower() for name in tool_names}
    lines = text.splitlines()
    for number, raw_line in enumerate(lines):
        line = raw_line.strip()
        answer = _ANSWER.match(line)
        if answer:
            rest = line[answer.end() :].strip()
            if not rest:
                rest = "\n".join(lines[number + 1 :]).strip()
            return FinalAnswer(text=rest)
        call = _CALL_START.match(line)
        if call:
            action = _parse_call(line, call.group(1), call.end() - 1, known)
            if action is not None:
                return action
    return FinalAnswer(text=text)
