"""The import graph keeps the architecture: agent/ never names the HF engine's CPU speed layer, and its
modules import one another without a cycle (imports inside functions count as much as top-level ones)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SPEED_LAYER = ("engines.onednn", "engines.lean", "engines.small_linear", "engines.prefix", "engines.turns",
               "engines.allocator", "learners.allocator", "engines.graphs")


def imported_names(path: Path, root: Path = ROOT) -> set[str]:
    """Every module a file imports, anywhere in it; `from a import b` names both `a` and `a.b`."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(part for part in [*parent, base] if part)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def agent_modules() -> dict[str, set[str]]:
    return {
        ".".join(path.relative_to(ROOT).with_suffix("").parts): imported_names(path)
        for path in sorted((ROOT / "agent").rglob("*.py"))
    }


def test_agent_never_imports_the_speed_layer():
    offending = {
        module: sorted(name for name in names if any(name == layer or name.startswith(f"{layer}.")
                                                     for layer in SPEED_LAYER))
        for module, names in agent_modules().items()
    }
    assert {module: names for module, names in offending.items() if names} == {}


def test_agent_modules_import_one_another_without_a_cycle():
    modules = agent_modules()
    graph = {module: sorted(name for name in names if name in modules and name != module)
             for module, names in modules.items()}
    cycles = []
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in graph[module]:
            if state.get(imported) == "open":
                cycles.append(" -> ".join([*path[path.index(imported):], imported]))
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_checks_see_what_they_look_for(tmp_path):
    """A function-level `from engines import onednn` and a relative import are both found."""
    package = tmp_path / "agent"
    package.mkdir()
    (package / "a.py").write_text("def f():\n    from engines import onednn\n    from . import b\n")
    assert {"engines.onednn", "agent.b"} <= imported_names(package / "a.py", root=tmp_path)
