"""Any typed Python function as a tool: `--tools package.module:function` or `--tools file.py:function`.

What the model sees comes from the function itself: the call name is its name in upper case, the
description the first paragraph of its docstring, the argument its signature. A documentation
example in the docstring (a doctest line `>>> word_count("the cat sat")`) is replayed as a worked
dialogue: the tool's first skill, as `calc`'s usage example is.

Arguments are model-written text, and untrusted: they are read as JSON (never evaluated) and
validated against the signature by pydantic before the function runs.
- a function of one parameter (or one required parameter): `WORD_COUNT(the cat sat)`; the text is
  the value (read as JSON first when the parameter is not a string: `TOTAL([1, 2, 3])`);
- any function: a JSON object of its arguments, `ADD({"a": 2, "b": 3})`.
Bad arguments are a `ToolError` that shows the expected form; `envs.tools.run_tool` runs the call
under a time limit and caps its output.
"""

from __future__ import annotations

import ast
import inspect
import json
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from envs.base import EnvSpecError
from envs.tools import Tool, ToolError

RESERVED_NAMES = ("calc", "lookup", "answer")


def one_line(text: str | None) -> str:
    """The first paragraph of a docstring, on one line."""
    paragraph = inspect.cleandoc(text or "").split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines() if not line.strip().startswith(">>>"))


class Parameters:
    """How an argument text becomes keyword arguments: one bare value, or a JSON object."""

    def __init__(self, call_name: str, names: Sequence[str], required: Sequence[str], text_valued: set[str]) -> None:
        self.call_name = call_name
        self.names = list(names)
        self.required = list(required)
        self.text_valued = text_valued  # parameters whose bare value is the text itself
        self.bare = self.names[0] if len(self.names) == 1 else (self.required[0] if len(self.required) == 1 else None)

    def form(self) -> str:
        if len(self.names) == 1:
            return f"{self.call_name}(<{self.bare}>)"
        listed = ", ".join(f'"{name}": ...' for name in self.names)
        return f"{self.call_name}({{{listed}}})"

    def read(self, text: str) -> dict[str, Any]:
        text = text.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = None
            if isinstance(value, dict) and value and set(value) <= set(self.names):
                return value
            if self.bare is None or self.bare not in self.text_valued:
                raise ToolError(f"the arguments are not a JSON object of {', '.join(self.names)}; "
                                f"write {self.form()}")
        if self.bare is None:
            raise ToolError(f"{self.call_name} takes {len(self.names)} arguments as a JSON object: write {self.form()}")
        if self.bare in self.text_valued:
            if len(text) >= 2 and text[0] == text[-1] == '"':
                try:
                    return {self.bare: json.loads(text)}
                except json.JSONDecodeError:
                    pass
            return {self.bare: text}
        try:
            return {self.bare: json.loads(text)}
        except json.JSONDecodeError:
            return {self.bare: text}  # pydantic may still read it ("3" as an int)


def _is_text(annotation: Any) -> bool:
    if annotation is str:
        return True
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and str in typing.get_args(annotation)


def _model_for(function: Callable[..., Any], origin: str) -> tuple[type[BaseModel], dict[str, Any]]:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        raise EnvSpecError(f"{origin}: cannot read the signature of {function!r}; name a plain Python function") from None
    try:
        hints = typing.get_type_hints(function)
    except Exception as error:
        raise EnvSpecError(f"{origin}: the type annotations of {function.__name__} cannot be resolved "
                           f"({type(error).__name__}: {error}); import the types they name") from None
    fields: dict[str, Any] = {}
    for name, parameter in signature.parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise EnvSpecError(f"{origin}: {function.__name__} takes *{name}; a tool's parameters are named "
                               "and typed, e.g. def add(a: int, b: int) -> int")
        if name not in hints:
            raise EnvSpecError(f"{origin}: parameter {name!r} of {function.__name__} has no type annotation; "
                               f"annotate it, e.g. {name}: str")
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[name] = (hints[name], default)
    if not fields:
        raise EnvSpecError(f"{origin}: {function.__name__} takes no arguments; a tool takes at least one")
    model = create_model(f"{function.__name__}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
    return model, {name: field[0] for name, field in fields.items()}


def _doctest_calls(function: Callable[..., Any], signature: inspect.Signature) -> list[tuple[str, dict[str, Any]]]:
    """(call source, keyword arguments) of each `>>> name(literal, ...)` line of the docstring."""
    calls = []
    for line in inspect.cleandoc(function.__doc__ or "").splitlines():
        source = line.strip().removeprefix(">>>").strip() if line.strip().startswith(">>>") else None
        if not source:
            continue
        try:
            node = ast.parse(source, mode="eval").body
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == function.__name__):
                continue
            args = [ast.literal_eval(argument) for argument in node.args]
            kwargs = {keyword.arg: ast.literal_eval(keyword.value) for keyword in node.keywords if keyword.arg}
            bound = signature.bind(*args, **kwargs)
        except (SyntaxError, ValueError, TypeError):
            continue  # not a literal call of this function: not an example we can replay
        calls.append((source, dict(bound.arguments)))
    return calls


def _argument_text(parameters: Parameters, arguments: dict[str, Any]) -> str:
    if parameters.bare is not None and set(arguments) == {parameters.bare}:
        value = arguments[parameters.bare]
        return value if isinstance(value, str) else json.dumps(value)
    return json.dumps(arguments)


def result_text(value: Any) -> str:
    """A tool's return value as the text the model reads: strings as they are, the rest as JSON."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


def function_tool(function: Callable[..., Any], origin: str = "") -> Tool:
    """A `Tool` from a typed function; a function that cannot be one raises EnvSpecError naming the fix."""
    origin = origin or getattr(function, "__module__", "") or "tool"
    if not inspect.isfunction(function) and not inspect.isbuiltin(function) and not inspect.ismethod(function):
        raise EnvSpecError(f"{origin}: {function!r} is not a function; --tools names a typed function "
                           "(module:function or file.py:function)")
    name = function.__name__.lower()
    if not name.isidentifier() or name.startswith("_"):
        raise EnvSpecError(f"{origin}: {function.__name__!r} cannot be a tool name; name the function in letters, "
                           "digits and underscores")
    if name in RESERVED_NAMES:
        raise EnvSpecError(f"{origin}: a tool may not be called {name} (a built-in name); rename the function")
    model, annotations = _model_for(function, origin)
    signature = inspect.signature(function)
    required = [key for key, field in model.model_fields.items() if field.is_required()]
    parameters = Parameters(name.upper(), list(annotations), required,
                            {key for key, annotation in annotations.items() if _is_text(annotation)})

    def validate(text: str) -> BaseModel:
        try:
            return model.model_validate(parameters.read(text))
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(str(part) for part in item['loc']) or 'arguments'}: {item['msg']}"
                                 for item in error.errors()[:4])
            raise ToolError(f"bad arguments for {parameters.call_name} ({problems}); write {parameters.form()}") from None

    def parse(text: str) -> dict[str, Any]:
        return validate(text).model_dump(mode="json")

    def run(text: str) -> str:
        validated = validate(text)
        return result_text(function(**{key: getattr(validated, key) for key in annotations}))

    examples = _doctest_calls(function, signature)
    arguments = [_argument_text(parameters, call) for _, call in examples]
    placeholder = list(annotations)[0] if len(annotations) == 1 else "JSON object of " + ", ".join(annotations)
    return Tool(
        name=name,
        description=one_line(function.__doc__) or f"the function {function.__name__}{signature}",
        usage=f"{parameters.call_name}({arguments[0]})" if arguments else parameters.form(),
        run=run,
        argument=placeholder,
        examples=tuple(arguments[1:]),
        parse=parse,
        questions=tuple(f"What is {source}?" for source, _ in examples),
        documented=bool(arguments),
    )
