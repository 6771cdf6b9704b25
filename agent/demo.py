"""`skillfold demo`: the main job on the embedded default model, end to end, in a few minutes of CPU.

1. baseline: held-out accuracy of the plain model on a tool family (`rg:basic_arithmetic+calc`) and
   on an unrelated family (`rg:letter_counting`);
2. the fast path: the tool family played for a few train episodes, skills distilled into a fresh
   memory, then held-out accuracy with memory on;
3. the slow path (`--fold-steps`, 32 by default; 0 skips it): those skills folded into a LoRA adapter,
   protected by default (`agent.protection`: nothing is named as an anchor; the general prompt set,
   which holds the unrelated family, is replayed, and a retention check on the last eval items of its
   scored families decides whether the adapter is promoted), then held-out accuracy with memory off on
   both families: how much of the memory gain the weights now carry, and what the fold cost elsewhere.
Every number comes from items that were never trained on; intervals are 95% Wilson.
Measured on 2 idle CPU cores: see docs/benchmarks.md.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from agent.config import LoopSettings, ProtectionSettings
from agent.evaluate import EvalResult, evaluate, memory_contexts
from agent.folding import fold_items, register_adapter
from agent.loop import Runtime, run_loop
from agent.protection import check_after, measure_before, protected_families
from engines.base import SamplingParams
from envs import make_family
from learners.fold import FoldConfig, fold
from memory import Memory

TOOL_FAMILY = "rg:basic_arithmetic+calc"
OTHER_FAMILY = "rg:letter_counting"


def run_demo(engine, home: Path, items: int, episodes: int, fold_steps: int, say) -> list[dict]:
    """Run the demo stages; `say(text)` reports progress. Returns one row per measurement."""
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    greedy = SamplingParams(max_new_tokens=64)
    rows: list[dict] = []

    def record(stage: str, result: EvalResult) -> EvalResult:
        rows.append({"stage": stage, **result.model_dump()})
        say(f"{stage}: {result.env} {result.successes}/{result.items} = {result.accuracy:.1%}")
        return result

    family, other = make_family(TOOL_FAMILY), make_family(OTHER_FAMILY)
    record("base model", evaluate(engine, family, items, greedy)[0])
    record("base model", evaluate(engine, other, items, greedy)[0])
    memory = Memory.open(home=home)
    started = time.perf_counter()
    settings = LoopSettings(episodes=episodes, batch_size=16, reflect_every=0)
    state = run_loop(Runtime(engine=engine, memory=memory, family=family, settings=settings, run_id="demo"),
                     home / "agent.sqlite")
    say(
        f"fast path: {state.get('episodes', 0)} train episodes ({state.get('successes', 0)} successes) in "
        f"{time.perf_counter() - started:.0f}s; {state.get('skills_added', 0)} skills kept, "
        f"{state.get('skills_rejected', 0)} rejected on probes"
    )
    contexts = memory_contexts(engine, memory, family, items, token_budget=600, k=3)
    record("memory on", evaluate(engine, family, items, greedy, contexts=[c for c, _ in contexts],
                                 skill_ids=[i for _, i in contexts])[0])

    if fold_steps:
        protection = ProtectionSettings()  # the defaults: nothing named as an anchor
        anchors = protected_families(memory, {family.name}, [], protection)
        run_dir = home / "folds" / "demo"
        fold_prompts = fold_items(memory, engine, {family.name: family}, anchors, items_per_family=48, probes=8)
        config = FoldConfig(steps=fold_steps)
        say(f"slow path: protected by default (anchors: {', '.join(anchors)}); retention check before the fold")
        started = time.perf_counter()
        check = measure_before(engine, anchors, protection, run_dir, greedy)
        gate_seconds = time.perf_counter() - started
        started = time.perf_counter()
        result = fold(engine, {family.name: family, **anchors}, fold_prompts, config, run_dir)
        fold_seconds = time.perf_counter() - started
        started = time.perf_counter()
        check = check_after(engine, check, anchors, protection, run_dir, result.adapter, greedy, steps=result.steps)
        gate_seconds += time.perf_counter() - started
        register_adapter(home, "demo", Path(check.promoted_adapter(result.adapter)), latest=check.promoted)
        say(f"slow path: {fold_steps} fold steps in {fold_seconds:.0f}s, loss {result.loss_first:.3f} -> "
            f"{result.loss_last:.3f}; retention check {gate_seconds:.0f}s")
        say(check.summary())
        for line in check.lines():
            say(line)
        (home / "retention.json").write_text(check.model_dump_json(indent=2))
        engine.load_adapter(str(home / "adapters" / "demo"))  # measured whether promoted or not
        record("folded, memory off", evaluate(engine, family, items, greedy)[0])
        record("folded, memory off", evaluate(engine, other, items, greedy)[0])
    (home / "demo.json").write_text(json.dumps(rows, indent=2))
    retention = ""
    if fold_steps:
        retention = "\n## Retention check (protection by default)\n\n" + "\n".join(
            [check.summary() + ":", "", *[line.strip() for line in check.lines()]]) + "\n"
    (home / "report.md").write_text(demo_report(rows) + retention)
    return rows


def demo_report(rows: list[dict]) -> str:
    """The demo's rows as a markdown table (every figure also in demo.json, with the stored episodes)."""
    lines = [
        "# skillfold demo",
        "",
        "Held-out accuracy (eval-split items never trained on), greedy, 95% Wilson intervals.",
        "",
        "| stage | family | correct | accuracy | 95% CI | adapter |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['stage']} | {row['env']} | {row['successes']}/{row['items']} | {row['accuracy']:.1%} | "
            f"{row['ci_low']:.1%}-{row['ci_high']:.1%} | {row['adapter'] or 'none'} |"
        )
    return "\n".join(lines) + "\n"
