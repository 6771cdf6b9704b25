"""From a spec string to a task family: `rg:<dataset>`, `twx:<game>`, `facts`, `toy`, `toy:<turns>`, each
optionally with tools: `rg:basic_arithmetic+calc`, `facts+lookup`.

`FAMILY_KINDS` maps a spec prefix to a constructor `(argument, options, settings) -> TaskFamily`,
where `argument` is the text after the first ":" (None when there is none). A new kind of
environment adds one entry.

A user's own family needs no entry (`envs.plugins`): `package.module:Name` or `path/to/file.py:Name`
names a TaskFamily class or factory (called with the options), and an installed package adds kinds
through the entry-point group `skillfold.envs`. A tool is a built-in name (calc, lookup), a typed
function (`module:function`, `file.py:function`, `envs.function_tools`), or every tool of an MCP
server (keyword `mcp=["command args"]`, `envs.mcp_tools`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from envs.base import EnvSpecError, TaskFamily
from envs.general import GeneralFamily
from envs.plugins import (
    entry_point_kinds,
    family_from_entry_point,
    family_from_object,
    is_object_spec,
    load_object,
)
from envs.reasoning_gym import ReasoningGymFamily, dataset_names
from envs.tool_use import TOOL_NAMES, FactsFamily, with_tools
from envs.tools import Tool
from envs.toy import ToyFamily

FamilyConstructor = Callable[[str | None, dict[str, Any], dict[str, Any]], TaskFamily]
EXAMPLE_DATASETS = ("leg_counting", "basic_arithmetic", "letter_counting")
TWX_GAMES = ("coin", "cooking", "twc", "mapreader", "arithmetic", "sorting", "simonsays", "peckingorder")


def _make_reasoning_gym(
    argument: str | None, options: dict[str, Any], settings: dict[str, Any]
) -> TaskFamily:
    if not argument:
        raise EnvSpecError(f"rg needs a dataset name, e.g. rg:{EXAMPLE_DATASETS[0]}")
    return ReasoningGymFamily(argument, options, **settings)


def _make_textworld_express(
    argument: str | None, options: dict[str, Any], settings: dict[str, Any]
) -> TaskFamily:
    from envs.textworld_express import TextWorldExpressFamily  # py4j and the JVM only when named

    if not argument:
        raise EnvSpecError(f"twx needs a game name, e.g. {', '.join('twx:' + name for name in TWX_GAMES)}")
    return TextWorldExpressFamily(argument, options, **settings)


def _make_toy(argument: str | None, options: dict[str, Any], settings: dict[str, Any]) -> TaskFamily:
    merged = {**options, **settings}
    if argument is not None:
        try:
            turns = int(argument)
        except ValueError:
            raise EnvSpecError(f"toy:<turns> needs an integer number of turns, not {argument!r}") from None
        if merged.get("turns", turns) != turns:
            raise EnvSpecError(f"toy:{turns} conflicts with the option turns={merged['turns']}")
        merged["turns"] = turns
    return ToyFamily(**merged)


def _make_general(argument: str | None, options: dict[str, Any], settings: dict[str, Any]) -> TaskFamily:
    if argument:
        raise EnvSpecError(f"general takes no argument (got general:{argument})")
    return GeneralFamily(**{**options, **settings})


def _make_facts(argument: str | None, options: dict[str, Any], settings: dict[str, Any]) -> TaskFamily:
    if argument:
        raise EnvSpecError(f"facts takes no argument (got facts:{argument}); set options with -o key=value")
    return FactsFamily(**{**options, **settings})


FAMILY_KINDS: dict[str, FamilyConstructor] = {
    "rg": _make_reasoning_gym,
    "twx": _make_textworld_express,
    "facts": _make_facts,
    "toy": _make_toy,
    "general": _make_general,
}
KIND_HELP = {
    "rg": f"rg:<dataset> (reasoning-gym, e.g. {', '.join('rg:' + name for name in EXAMPLE_DATASETS)})",
    "twx": "twx:<game> (TextWorldExpress text games, multi-turn, needs Java 17: "
           + ", ".join("twx:" + name for name in TWX_GAMES) + ")",
    "facts": "facts (questions about a private fact table; use with +lookup)",
    "toy": "toy[:turns] (deterministic word repeating, for tests)",
    "general": "general (everyday instructions, unscored: what a fold protects besides your families)",
}


def make_family(spec: str, options: dict[str, Any] | None = None, **settings: Any) -> TaskFamily:
    """Make the task family a spec names.

    `options` are the family's own options: the dataset config for `rg:`, the toy settings
    (`turns`, `raise_on_turn`) for `toy`. Keyword `settings` set the family up (for `rg:`:
    preset, seed, eval_size, train_size, instruction; these may also be given in `options`).
    Tools are named after the family with "+": `rg:basic_arithmetic+calc`, `facts+lookup+calc`,
    `toy+mytools.py:word_count`; keyword `tools=[...]` adds more, keyword `mcp=[...]` every tool of
    those MCP servers. A user's family (`module:Name`, `file.py:Name`, an entry-point kind) gets the
    options and settings as keyword arguments. Bad specs and options raise EnvSpecError.
    """
    base, *tool_names = spec.strip().split("+")
    tool_names += list(settings.pop("tools", None) or [])
    servers = list(settings.pop("mcp", None) or [])
    family = _make_base(base, options, settings)
    builtin = sorted({name.strip().lower() for name in tool_names if not is_object_spec(name.strip())})
    extra = [tool_from_spec(name.strip()) for name in tool_names if is_object_spec(name.strip())]
    if servers:
        from envs.mcp_tools import mcp_tools  # the mcp SDK loads only when a server is named

        extra += [tool for command in servers for tool in mcp_tools(command)]
    if builtin or extra:
        return with_tools(family, builtin, extra_tools=extra)
    return family


def tool_from_spec(spec: str) -> Tool:
    """The tool a `module:function` or `file.py:function` spec names."""
    from envs.function_tools import function_tool

    function, origin = load_object(spec)
    return function_tool(function, origin)


def _make_base(spec: str, options: dict[str, Any] | None, settings: dict[str, Any]) -> TaskFamily:
    kind, separator, argument = spec.partition(":")
    if kind in FAMILY_KINDS:
        return FAMILY_KINDS[kind](argument if separator else None, dict(options or {}), settings)
    if is_object_spec(spec):
        return family_from_object(spec, {**(options or {}), **settings})
    if kind in entry_point_kinds():
        return family_from_entry_point(kind, argument if separator else None, {**(options or {}), **settings})
    if is_object_spec(spec, top_level=True):  # a top-level module: `games:Family`
        return family_from_object(spec, {**(options or {}), **settings})
    kinds = "; ".join(KIND_HELP.get(name, name) for name in FAMILY_KINDS)
    installed = "".join(f"; {name}" for name in entry_point_kinds())
    raise EnvSpecError(f"unknown environment {spec!r}; available kinds: {kinds}{installed}; or your own: "
                       "package.module:Name or path/to/file.py:Name (docs/environments.md)")


def available_families() -> list[str]:
    """Every family spec: all `rg:<dataset>` names, then each other kind by its prefix (`toy`)."""
    families: list[str] = []
    for kind in FAMILY_KINDS:
        if kind == "rg":
            families.extend(f"rg:{name}" for name in dataset_names())
        elif kind == "twx":
            families.extend(f"twx:{name}" for name in TWX_GAMES)
        else:
            families.append(kind)
    families.extend(f"facts+{name}" for name in TOOL_NAMES if name == "lookup")
    families.append("<any family>+calc")
    families.extend(entry_point_kinds())
    return families
