"""The `skillfold skills ...` and `skillfold chat` commands: inspecting memory and talking to the agent.

Registered on the main app in `agent/cli.py`; the helpers both share are in `agent/cli_common.py`.
The same output conventions hold: tables to stderr, `--json` puts one JSON value on the last line of
stdout, bad input exits 2 with a clear message.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from agent.cli_common import (
    console,
    engine_flags,
    fail,
    open_engine,
    open_memory,
    quiet_libraries,
    user_errors,
)
from agent.config import ConfigError, ModelConfig, build_config, default_home

skills_app = typer.Typer(no_args_is_help=True, help="Inspect and edit the skill library.")

HomeOption = Annotated[Path | None, typer.Option(help="skillfold home (default $SKILLFOLD_HOME or ./.skillfold)")]
UrlOption = Annotated[str | None, typer.Option(help="Chroma server URL instead of the embedded store")]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON on stdout")]


def _memory(home: Path | None, url: str | None, must_exist: bool = True):

    home = home or default_home()
    if must_exist and url is None and not (home / "chroma").exists():
        raise ConfigError(
            f"no skill memory in {home} (no {home / 'chroma'}); run `skillfold run --home {home} ...` first "
            "or pass the --home that holds it"
        )
    return open_memory(home, url)


def _skill_row(skill) -> dict:
    return {
        "id": skill.id,
        "kind": skill.kind,
        "family": skill.family,
        "status": skill.status,
        "uses": skill.uses,
        "successes_with": skill.successes_with,
        "title": skill.title,
    }


@skills_app.command("list")
def skills_list(
    family: Annotated[str | None, typer.Option(help="only this task family")] = None,
    status: Annotated[str | None, typer.Option(help="active, pending, folded or retired")] = None,
    home: HomeOption = None,
    memory_url: UrlOption = None,
    json_output: JsonOption = False,
) -> None:
    """Every skill, one line each."""

    with user_errors():
        skills = _memory(home, memory_url).list_skills(family=family, status=status)
    if json_output:
        print(json.dumps([_skill_row(skill) for skill in skills]))
        return
    table = Table(title=f"{len(skills)} skills")
    for column in ("id", "kind", "family", "status", "uses", "with ok", "title"):
        table.add_column(column)
    for skill in skills:
        row = _skill_row(skill)
        columns = ("id", "kind", "family", "status", "uses", "successes_with")
        # escaped: titles and families may hold [brackets], which rich would take for markup
        table.add_row(*(escape(str(row[key])) for key in columns), escape(skill.title[:60]))
    console.print(table)


@skills_app.command("show")
def skills_show(
    skill_id: Annotated[str, typer.Argument(help="skill id (see `skillfold skills list`)")],
    home: HomeOption = None,
    memory_url: UrlOption = None,
    json_output: JsonOption = False,
) -> None:
    """A skill's text, provenance (source trajectories), usage statistics and versions."""

    with user_errors():
        store = _memory(home, memory_url)
        skill = store.get_skill(skill_id)
        helpfulness = skill.helpfulness(store.family_stats(skill.family))
        sources = []
        for trajectory_id in skill.provenance:
            try:
                trajectory = store.get_trajectory(trajectory_id)
                sources.append({"id": trajectory.id, "item_id": trajectory.item_id, "success": trajectory.success})
            except LookupError:
                sources.append({"id": trajectory_id, "missing": True})
    if json_output:
        print(json.dumps({**skill.model_dump(mode="json"), "helpfulness": helpfulness.model_dump(),
                          "sources": sources}))
        return
    console.rule(escape(f"{skill.id} ({skill.kind}, {skill.status}) {skill.family}"))
    console.print(skill.text, markup=False, highlight=False)
    console.rule()
    console.print(
        f"uses {skill.uses}: {skill.successes_with} successes with it; helpfulness {helpfulness.mean:+.2f} "
        f"[{helpfulness.lower:+.2f}, {helpfulness.upper:+.2f}] vs the family without skills"
    )
    for source in sources:
        console.print(f"source trajectory {source['id']}: {source}", markup=False)
    for version in skill.versions:
        console.print(f"version {version.time:%Y-%m-%d %H:%M} ({version.reason})", markup=False)
    for change in skill.status_history:
        console.print(f"status {change.status} at {change.time:%Y-%m-%d %H:%M}: {change.reason}", markup=False)


@skills_app.command("search")
def skills_search(
    text: Annotated[str, typer.Argument(help="what to look for")],
    family: Annotated[str | None, typer.Option(help="only this task family")] = None,
    k: Annotated[int, typer.Option(help="how many")] = 5,
    home: HomeOption = None,
    memory_url: UrlOption = None,
    json_output: JsonOption = False,
) -> None:
    """Nearest active skills to a text."""

    with user_errors():
        found = _memory(home, memory_url).search_skills(text, family=family, k=k)
    if json_output:
        print(json.dumps([{**_skill_row(skill), "distance": distance} for skill, distance in found]))
        return
    for skill, distance in found:
        console.print(f"{distance:.3f} {skill.id} [{skill.family}] {skill.title[:80]}", markup=False)


@skills_app.command("stats")
def skills_stats(home: HomeOption = None, memory_url: UrlOption = None, json_output: JsonOption = False) -> None:
    """Counts: trajectories, skills by status, per family."""

    with user_errors():
        stats = _memory(home, memory_url).stats()
    if json_output:
        print(json.dumps(stats, default=str))
        return
    console.print_json(json.dumps(stats, default=str))


@skills_app.command("export")
def skills_export(
    format: Annotated[str, typer.Option(help="json or md")] = "json",
    family: Annotated[str | None, typer.Option(help="only this task family")] = None,
    home: HomeOption = None,
    memory_url: UrlOption = None,
) -> None:
    """The whole library as JSON or Markdown on stdout."""

    if format not in ("json", "md"):
        fail(f"--format takes json or md, not {format!r}")
    with user_errors():
        print(_memory(home, memory_url).export(format, family=family))


@skills_app.command("rm")
def skills_rm(
    skill_id: Annotated[str, typer.Argument(help="skill id")],
    home: HomeOption = None,
    memory_url: UrlOption = None,
) -> None:
    """Delete a skill (its source trajectories stay)."""

    with user_errors():
        removed = _memory(home, memory_url).remove_skill(skill_id)
    console.print(f"removed {removed.id} ({removed.kind}, {removed.family})", markup=False)


def _review(skill_id: str, approved: bool, reason: str, home: Path | None, memory_url: str | None) -> None:
    from agent.skills import review_pending

    with user_errors():
        skill = review_pending(_memory(home, memory_url), skill_id, approved, reason.strip(), by="skillfold skills")
    console.print(f"{skill.id} ({skill.kind}, {skill.family}) is now {skill.status}", markup=False)


@skills_app.command("approve")
def skills_approve(
    skill_id: Annotated[str, typer.Argument(help="id of a pending skill (`skillfold skills list --status pending`)")],
    reason: Annotated[str, typer.Option(help="why (kept in the skill's status history)")] = "",
    home: HomeOption = None,
    memory_url: UrlOption = None,
) -> None:
    """Approve a pending skill (from `skillfold run --pending`): it becomes active and is retrieved."""
    _review(skill_id, True, reason, home, memory_url)


@skills_app.command("reject")
def skills_reject(
    skill_id: Annotated[str, typer.Argument(help="id of a pending skill (`skillfold skills list --status pending`)")],
    reason: Annotated[str, typer.Option(help="why (kept in the skill's status history)")] = "",
    home: HomeOption = None,
    memory_url: UrlOption = None,
) -> None:
    """Reject a pending skill: it is retired (kept, never retrieved)."""
    _review(skill_id, False, reason, home, memory_url)


# -------------------------------------------------------------------- chat
CHAT_HELP = """Type a task and press enter. Commands:
  /good, /bad      rate the last answer (stored as a trajectory with your reward)
  /teach TEXT      store TEXT as a skill for the current family
  /skills          show the skills the last answer used
  /family NAME     file what follows under another family (default: chat)
  /quit            leave"""


def chat(
    home: HomeOption = None,
    memory_url: UrlOption = None,
    model: Annotated[str | None, typer.Option(help="HF model id or directory")] = None,
    adapter: Annotated[str | None, typer.Option(help="PEFT adapter directory")] = None,
    engine_kind: Annotated[str | None, typer.Option("--engine", help="hf (default) or vllm")] = None,
    engine_url: Annotated[list[str] | None, typer.Option("--engine-url", help="a vLLM server URL (repeatable)")] = None,
    tools: Annotated[str | None, typer.Option(
        help="tools the agent may call, comma-separated: calc, package.module:function, file.py:function")] = "calc",
    mcp: Annotated[list[str] | None, typer.Option(
        "--mcp", help='an MCP server (stdio) whose tools the agent may call, e.g. --mcp "python server.py"')] = None,
    family: Annotated[str, typer.Option(help="family name the exchanges are filed under")] = "chat",
    max_new_tokens: Annotated[int, typer.Option(help="tokens per reply")] = 128,
) -> None:
    """Talk to the agent: it answers with the skills it retrieves (shown) and may call tools."""
    from agent.chat import ChatSession

    quiet_libraries()
    with user_errors():
        store = _memory(home, memory_url, must_exist=False)
        flags = {"name": model, "adapter": adapter,
                 **{key.removeprefix("model."): value for key, value in engine_flags(engine_kind, engine_url).items()}}
        engine = open_engine(build_config(ModelConfig, None, flags, []))
        session = ChatSession(engine, store, family=family, tools=[t.strip() for t in (tools or "").split(",") if t.strip()],
                              max_new_tokens=max_new_tokens, mcp=mcp)
        for skill in session.seed_documentation():  # a fresh family starts from its tools' documentation
            console.print(f"seeded skill {skill.id}: {skill.title}", markup=False, highlight=False)
    console.print(CHAT_HELP)
    for line in _lines():
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        with user_errors():
            for message in session.handle(line):
                console.print(message, markup=False, highlight=False)


def _lines():
    """Lines typed at a prompt (or piped in), until end of input."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    while True:
        try:
            yield input("you> ")
        except EOFError:
            return
