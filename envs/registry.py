"""From a spec string to a task family: `rg:<dataset>`, `facts`, `toy`, `toy:<turns>`, each
optionally with tools: `rg:basic_arithmetic+calc`, `facts+lookup`.

`FAMILY_KINDS` maps a spec prefix to a constructor `(argument, options, settings) -> TaskFamily`,
where `argument` is the text after the first ":" (None when there is none). A new kind of
environment adds one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from envs.base import EnvSpecError, TaskFamily
from envs.reasoning_gym import ReasoningGymFamily, dataset_names
from envs.tool_use import TOOL_NAMES, FactsFamily, with_tools
from envs.toy import ToyFamily

FamilyConstructor = Callable[[str | None, dict[str, Any], dict[str, Any]], TaskFamily]
EXAMPLE_DATASETS = ("leg_counting", "basic_arithmetic", "letter_counting")


def _make_reasoning_gym(
    argument: str | None, options: dict[str, Any], settings: dict[str, Any]
) -> TaskFamily:
    if not argument:
        raise EnvSpecError(f"rg needs a dataset name, e.g. rg:{EXAMPLE_DATASETS[0]}")
    return ReasoningGymFamily(argument, options, **settings)


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


def _make_facts(argument: str | None, options: dict[str, Any], settings: dict[str, Any]) -> TaskFamily:
    if argument:
        raise EnvSpecError(f"facts takes no argument (got facts:{argument}); set options with -o key=value")
    return FactsFamily(**{**options, **settings})


FAMILY_KINDS: dict[str, FamilyConstructor] = {
    "rg": _make_reasoning_gym,
    "facts": _make_facts,
    "toy": _make_toy,
}
KIND_HELP = {
    "rg": f"rg:<dataset> (reasoning-gym, e.g. {', '.join('rg:' + name for name in EXAMPLE_DATASETS)})",
    "facts": "facts (questions about a private fact table; use with +lookup)",
    "toy": "toy[:turns] (deterministic word repeating, for tests)",
}


def make_family(spec: str, options: dict[str, Any] | None = None, **settings: Any) -> TaskFamily:
    """Make the task family a spec names.

    `options` are the family's own options: the dataset config for `rg:`, the toy settings
    (`turns`, `raise_on_turn`) for `toy`. Keyword `settings` set the family up (for `rg:`:
    preset, seed, eval_size, train_size, instruction; these may also be given in `options`).
    Tools are named after the family with "+": `rg:basic_arithmetic+calc`, `facts+lookup+calc`;
    keyword `tools=[...]` adds more. Bad specs and options raise EnvSpecError.
    """
    base, *tool_names = spec.strip().split("+")
    tool_names += list(settings.pop("tools", None) or [])
    family = _make_base(base, options, settings)
    if tool_names:
        return with_tools(family, sorted({name.strip().lower() for name in tool_names}))
    return family


def _make_base(spec: str, options: dict[str, Any] | None, settings: dict[str, Any]) -> TaskFamily:
    kind, separator, argument = spec.partition(":")
    if kind not in FAMILY_KINDS:
        kinds = "; ".join(KIND_HELP.get(name, name) for name in FAMILY_KINDS)
        raise EnvSpecError(f"unknown environment {spec!r}; available kinds: {kinds}")
    return FAMILY_KINDS[kind](argument if separator else None, dict(options or {}), settings)


def available_families() -> list[str]:
    """Every family spec: all `rg:<dataset>` names, then each other kind by its prefix (`toy`)."""
    families: list[str] = []
    for kind in FAMILY_KINDS:
        if kind == "rg":
            families.extend(f"rg:{name}" for name in dataset_names())
        else:
            families.append(kind)
    families.extend(f"facts+{name}" for name in TOOL_NAMES if name == "lookup")
    families.append("<any family>+calc")
    return families
