"""The web app of `skillfold ui`: FastAPI routes that render Jinja2 pages on the server.

Pages: the library (`/`), a skill (`/skills/{id}`), trajectories (`/trajectories`, one each at
`/trajectories/{id}`), the retrieval debugger (`/retrieve`), folds and adapters (`/folds`), and an
experiment (`/experiment`, with `--experiment DIR`). htmx (vendored under static/) swaps the library
table in place; every page also works as a plain link or form without JavaScript.

Safety:
- every string is escaped by Jinja2's autoescape (no `|safe` anywhere), and the Content-Security-
  Policy allows scripts, styles and images from this origin only, so a skill whose text holds a
  `<script>` shows as text;
- with `token`, every request must carry it (`?token=` once, then a cookie; or a Bearer header);
- the Host header must name the address served (a web page cannot reach us through DNS rebinding);
- read-only unless `allow_edits`; an edit is a POST carrying the app's CSRF token, made through the
  same Memory API as the CLI, with the user's reason in the skill's history.
Memory is opened on the first request that needs it and read through one lock (Chroma clients are
not shared across threads here); an embedded store written by another process since is read again
(`Memory` catches up with its write count).
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from agent.skills import review_pending
from agent.ui import library, runs
from agent.ui.charts import line_chart
from memory import InvalidSkill, Memory, MemoryStoreError, SkillNotFound, TrajectoryNotFound

HERE = Path(__file__).parent
TOKEN_COOKIE = "skillfold_ui_token"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
T = TypeVar("T")
DONE = {
    "retired": "retired",
    "restored": "restored to active",
    "approved": "approved: now active",
    "rejected": "rejected: retired",
    "edited": "saved as a new version",
    "reason": "give a reason: it is kept in the skill's history",
}


@dataclass
class UiSettings:
    """What `skillfold ui` serves and how."""

    home: Path
    memory_url: str | None = None
    token: str | None = None
    allow_edits: bool = False
    experiment: Path | None = None
    page_size: int = 50
    tokenizer: Path | None = None  # a model directory: the retrieval debugger counts tokens with its tokenizer
    synchronous_rows_below: int = 2000  # a larger library is read again in the background (library.SkillRows)
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "[::1]")  # empty: any Host


def open_library(home: Path, url: str | None, embedding: Any = None) -> Memory:
    """The memory store the app shows, or MemoryStoreError naming what is missing. Creates nothing."""
    if url is None:
        home = home.expanduser()
        if not home.exists():
            raise MemoryStoreError(
                f"there is no skillfold home at {home}; pass --home DIR with a skill library in it "
                "(`skillfold run --home DIR ...` makes one), or --memory-url URL of a Chroma server"
            )
        if not home.is_dir():
            raise MemoryStoreError(f"the skillfold home {home} is not a directory; pass --home DIR")
        if not (home / "chroma").is_dir():
            raise MemoryStoreError(
                f"no skill library in {home} (no {home / 'chroma'} directory); run `skillfold run --home {home} ...` "
                "first, or pass the --home that holds it"
            )
    return Memory.open(home=None if url else home, url=url, embedding=embedding, create=False)


@dataclass
class UiState:
    settings: UiSettings
    embedding: Any = None
    memory: Memory | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    growth: tuple[Any, Any] = (None, None)  # (the rows, library.growth of them)
    counter: tuple[Callable[[str], int], str] | None = None  # library.token_counter, loaded on first use

    def __post_init__(self) -> None:
        self.rows = library.SkillRows(
            lambda: open_library(self.settings.home, self.settings.memory_url, self.embedding),
            self.settings.synchronous_rows_below,
        )

    def read(self, work: Callable[[Memory], T]) -> T:
        """`work(memory)` under the lock, opening memory first if needed."""
        with self.lock:
            if self.memory is None:
                self.memory = open_library(self.settings.home, self.settings.memory_url, self.embedding)
            return work(self.memory)


class Forbidden(Exception):
    """An edit this app may not make: read-only, or a POST without the CSRF token."""


def host_name(header: str) -> str:
    """The host of a Host header, without its port ("[::1]:8765" -> "[::1]")."""
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0]


def create_app(settings: UiSettings, embedding: Any = None) -> FastAPI:
    """The app for `settings`; `embedding`: the store's embedding function (default: MiniLM)."""
    app = FastAPI(title="skillfold ui", docs_url=None, redoc_url=None, openapi_url=None)
    state = UiState(settings, embedding)
    app.state.ui = state
    templates = Jinja2Templates(directory=str(HERE / "templates"))  # autoescape on for .html
    templates.env.globals.update(
        allow_edits=settings.allow_edits,
        experiment=settings.experiment is not None,
        csrf=state.csrf,
        statuses=library.STATUSES,
        kinds=library.KINDS,
    )
    templates.env.filters["when"] = lambda moment: moment.strftime("%Y-%m-%d %H:%M") if moment else ""
    templates.env.filters["signed"] = lambda value: f"{value:+.2f}"
    templates.env.filters["percent"] = lambda value: "-" if value is None else f"{100 * value:.1f}%"
    templates.env.filters["points"] = lambda value: "-" if value is None else f"{100 * value:+.1f} pts"
    templates.env.filters["tojson_pretty"] = lambda value: json.dumps(value, indent=2, default=str, ensure_ascii=False)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def render(request: Request, name: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
        return templates.TemplateResponse(request, name, context, status_code=status)

    def error_page(request: Request, status: int, title: str, message: str) -> HTMLResponse:
        return render(request, "error.html", {"title": title, "message": message}, status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if settings.allowed_hosts and host_name(request.headers.get("host", "")) not in settings.allowed_hosts:
            return Response("unknown Host header", status_code=400, media_type="text/plain")
        set_cookie = False
        if settings.token:
            given = request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
            bearer = request.headers.get("authorization", "")
            if bearer.lower().startswith("bearer "):
                given = bearer[7:]
            if not hmac.compare_digest(given.encode(), settings.token.encode()):
                return Response("this skillfold ui needs its token: open the URL `skillfold ui` printed",
                                status_code=401, media_type="text/plain")
            set_cookie = request.query_params.get("token") is not None
        response = await call_next(request)
        if set_cookie:
            response.set_cookie(TOKEN_COOKIE, settings.token or "", httponly=True, samesite="strict")
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.exception_handler(MemoryStoreError)
    async def store_error(request: Request, error: MemoryStoreError) -> HTMLResponse:
        return error_page(request, 503, "The skill library cannot be read", str(error))

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, error: Forbidden) -> HTMLResponse:
        return error_page(request, 403, "Not allowed", str(error))

    @app.exception_handler(SkillNotFound)
    async def no_skill(request: Request, error: SkillNotFound) -> HTMLResponse:
        return error_page(request, 404, "No such skill", str(error))

    @app.exception_handler(TrajectoryNotFound)
    async def no_trajectory(request: Request, error: TrajectoryNotFound) -> HTMLResponse:
        return error_page(request, 404, "No such trajectory", str(error))

    # ------------------------------------------------------------------------- library
    @app.get("/", response_class=HTMLResponse)
    def library_page(
        request: Request, family: str = "", kind: str = "", status: str = "", q: str = "", mode: str = "text",
        sort: str = "updated", order: str = "desc", page: int = 1,
    ) -> HTMLResponse:
        query = library.LibraryQuery(family=family, kind=kind, status=status, text=q if mode == "text" else "",
                                     sort=sort, descending=order != "asc", page=page)
        rows = state.read(state.rows.get)
        distances: dict[str, float] = {}
        problem = ""
        if mode == "semantic" and q.strip():
            try:
                hits = state.read(lambda memory: memory.search_skills(
                    q, family=family or None, k=50, status=status or None))  # type: ignore[arg-type]
            except (ImportError, OSError, ValueError) as error:  # the embedding model cannot be loaded
                hits, problem = [], f"search by meaning failed: {type(error).__name__}: {error}"
            distances = {skill.id: distance for skill, distance in hits}
            by_id = {row.id: row for row in rows}
            shown = [by_id[skill_id] for skill_id in distances if skill_id in by_id]
            shown = [row for row in shown if not kind or row.kind == kind]
            window = library.pages(len(shown), 1, len(shown) or 1)
        else:
            shown = library.filter_rows(rows, query)
            window = library.pages(len(shown), page, settings.page_size)
            shown = shown[window["start"]:window["stop"]]
        if state.growth[0] is not rows:  # computed once per read of the rows
            state.growth = (rows, library.growth(rows))
        times, series = state.growth[1]
        stamps = [moment.timestamp() for moment in times]
        chart = line_chart(
            "skills by status over time",
            {status: list(zip(stamps, counts, strict=True)) for status, counts in series.items()},
            {stamps[0]: times[0].strftime("%m-%d %H:%M"), stamps[-1]: times[-1].strftime("%m-%d %H:%M")} if times else None,
        )
        params = {"family": family, "kind": kind, "status": status, "q": q, "mode": mode, "sort": sort, "order": order}

        def link(**changes: Any) -> str:
            return "/?" + urlencode({key: value for key, value in (params | changes).items() if value not in ("", None)})

        families = sorted({row.family for row in rows})
        return render(request, "library.html", {
            "rows": shown, "window": window, "counts": library.counts(rows), "families": families,
            "params": params, "link": link, "sort_keys": library.SORT_KEYS, "distances": distances,
            "semantic": mode == "semantic", "chart": chart, "refreshing": state.rows.refreshing or state.rows.behind,
            "read_at": state.rows.read_at, "problem": problem,
        })

    # --------------------------------------------------------------------------- skill
    @app.get("/skills/{skill_id}", response_class=HTMLResponse)
    def skill_route(request: Request, skill_id: str, done: str = "") -> HTMLResponse:
        """`done`: what an edit just did, one of DONE (so that a link cannot put words on the page)."""
        return skill_page(request, skill_id, DONE.get(done, ""))

    def skill_page(request: Request, skill_id: str, message: str = "") -> HTMLResponse:
        def gather(memory: Memory) -> dict[str, Any]:
            skill = memory.get_skill(skill_id)
            baseline = memory.family_stats(skill.family)
            sources = []
            for trajectory_id in skill.provenance:
                try:
                    sources.append({"id": trajectory_id, "trajectory": memory.get_trajectory(trajectory_id)})
                except TrajectoryNotFound:
                    sources.append({"id": trajectory_id, "trajectory": None})
            usage = library.usage_over_time(memory, skill)
            return {"skill": skill, "baseline": baseline, "helpfulness": skill.helpfulness(baseline), "sources": sources,
                    "usage": usage}

        context = state.read(gather)
        skill = context["skill"]
        series, scanned, cut = context.pop("usage")
        moments = sorted(moment for points in series.values() for moment, _ in points)
        usage_chart = line_chart(
            "success rate over time, cumulative" + (f"; the first {scanned} of the family" if cut else ""),
            {label: [(moment.timestamp(), 100 * rate) for moment, rate in points] for label, points in series.items()},
            {moments[0].timestamp(): moments[0].strftime("%m-%d %H:%M"),
             moments[-1].timestamp(): moments[-1].strftime("%m-%d %H:%M")} if moments else None,
        ) if series["with it"] else None
        probes = [change for change in skill.status_history if "probes" in change.evidence]
        return render(request, "skill.html", context | {
            "versions": library.version_diffs(skill), "probes": probes, "message": message, "chart": usage_chart,
            "tokens": library.estimate_tokens(skill.text),
            "fold_names": set(runs.fold_names(settings.home)),
        })

    def check_edit(csrf: str) -> None:
        if not settings.allow_edits:
            raise Forbidden("this skillfold ui is read-only: start it with --allow-edits to change skills")
        if not hmac.compare_digest(csrf.encode(), state.csrf.encode()):
            raise Forbidden("the form's CSRF token is missing or wrong: reload the page and try again")

    @app.post("/skills/{skill_id}/status")
    def set_status(
        request: Request, skill_id: str, action: str = Form(...), reason: str = Form(""), csrf: str = Form("")
    ) -> Response:
        check_edit(csrf)
        targets = {"retire": "retired", "restore": "active"}
        if action not in (*targets, "approve", "reject"):
            raise Forbidden(f"unknown action {action!r}: retire, restore, approve or reject")
        if not reason.strip():
            return RedirectResponse(f"/skills/{quote(skill_id, safe='')}?done=reason", status_code=303)
        if action in ("approve", "reject"):  # only a pending skill: anything else is refused, unchanged
            try:
                state.read(lambda memory: review_pending(
                    memory, skill_id, action == "approve", reason.strip(), by="skillfold ui"))
            except InvalidSkill as error:
                return skill_page(request, skill_id, message=f"not changed: {error}")
            return RedirectResponse(f"/skills/{quote(skill_id, safe='')}?done={action}d", status_code=303)
        state.read(lambda memory: memory.set_status(
            skill_id, targets[action], f"{action} in skillfold ui: {reason.strip()}", {"by": "skillfold ui"}))  # type: ignore[arg-type]
        return RedirectResponse(f"/skills/{quote(skill_id, safe='')}?done={action}d", status_code=303)

    @app.post("/skills/{skill_id}/edit")
    def edit_skill(
        request: Request, skill_id: str, text: str = Form(...), title: str = Form(""), reason: str = Form(""),
        csrf: str = Form(""),
    ) -> Response:
        from memory import SkillVersion

        check_edit(csrf)
        if not reason.strip():
            return RedirectResponse(f"/skills/{quote(skill_id, safe='')}?done=reason", status_code=303)
        text = text.replace("\r\n", "\n")

        def edit(memory: Memory) -> None:
            skill = memory.get_skill(skill_id)
            update: dict[str, Any] = {"title": title}
            if text != skill.text:
                version = SkillVersion(text=text, reason=f"edited in skillfold ui: {reason.strip()}")
                update |= {"text": text, "versions": [*skill.versions, version]}
            memory.update_skill(skill.model_copy(update=update))

        try:
            state.read(edit)
        except InvalidSkill as error:  # nothing was written: the page again, saying why
            return skill_page(request, skill_id, message=f"not saved: {error}")
        return RedirectResponse(f"/skills/{quote(skill_id, safe='')}?done=edited", status_code=303)

    # --------------------------------------------------------------------- trajectories
    @app.get("/trajectories", response_class=HTMLResponse)
    def trajectories_page(
        request: Request, env: str = "", split: str = "", success: str = "", run: str = "", skill: str = "",
        start: int = 0,
    ) -> HTMLResponse:
        wanted = library.TrajectoryFilter(env=env, split=split, success={"yes": True, "no": False}.get(success),
                                          run=run.strip(), skill=skill.strip())
        start = max(0, start)

        def gather(memory: Memory) -> tuple[library.TrajectoryPage, int, list[str]]:
            found = library.scan_trajectories(memory, wanted, start, settings.page_size)
            return found, memory.count_trajectories(), memory.families()

        found, total, families = state.read(gather)
        params = {"env": env, "split": split, "success": success, "run": run, "skill": skill}

        def link(**changes: Any) -> str:
            merged = params | changes
            return "/trajectories?" + urlencode({key: value for key, value in merged.items() if value not in ("", None)})

        return render(request, "trajectories.html", {
            "found": found, "start": start, "total": total, "params": params, "link": link, "families": families,
        })

    @app.get("/trajectories/{trajectory_id}", response_class=HTMLResponse)
    def trajectory_page(request: Request, trajectory_id: str) -> HTMLResponse:
        def gather(memory: Memory) -> dict[str, Any]:
            trajectory = memory.get_trajectory(trajectory_id)
            skills = {}
            for skill_id in trajectory.skill_ids:
                try:
                    skills[skill_id] = memory.get_skill(skill_id)
                except SkillNotFound:
                    skills[skill_id] = None
            return {"trajectory": trajectory, "skills": skills}

        return render(request, "trajectory.html", state.read(gather))

    # ------------------------------------------------------------------- retrieval debugger
    @app.get("/retrieve", response_class=HTMLResponse)
    def retrieve_page(
        request: Request, task: str = "", family: str = "", budget: int = 600, k: int = 3, trajectory: str = ""
    ) -> HTMLResponse:
        from agent.skills import render_context
        from envs.base import Message
        from memory.records import task_text

        with state.lock:
            if state.counter is None:
                state.counter = library.token_counter(settings.tokenizer)
        count, counting = state.counter

        def gather(memory: Memory) -> dict[str, Any]:
            nonlocal task, family
            if trajectory and not task:
                picked = memory.get_trajectory(trajectory)
                task, family = task_text(picked), family or picked.env
            families = memory.families()
            if not task.strip():
                return {"families": families, "candidates": [], "chosen": []}
            candidates = memory.search_skills(task, family or None, k=4 * max(k, 1), status="active")
            chosen = memory.retrieve(task, family or None, budget, count, k=k)
            return {"families": families, "candidates": candidates, "chosen": chosen}

        context = state.read(gather)
        chosen_ids = {skill.id for skill in context["chosen"]}
        prompt = [*render_context(context["chosen"]), Message(role="user", content=task)] if task.strip() else []
        tokens = {skill.id: count(skill.text) for skill, _ in context["candidates"]}
        used = sum(tokens.get(skill.id) or count(skill.text) for skill in context["chosen"])
        return render(request, "retrieve.html", context | {
            "task": task, "family": family, "budget": budget, "k": k, "chosen_ids": chosen_ids, "prompt": prompt,
            "used": used, "tokens": tokens, "counting": counting,
        })

    # --------------------------------------------------------------------------- folds
    @app.get("/folds", response_class=HTMLResponse)
    def folds_page(request: Request) -> HTMLResponse:
        home = settings.home
        folds = [runs.fold_run(home, name) for name in runs.fold_names(home)]
        return render(request, "folds.html", {
            "folds": [fold for fold in folds if fold is not None], "adapters": runs.adapters(home),
            "latest": runs.latest_adapter(home), "home": home,
        })

    @app.get("/folds/{name}", response_class=HTMLResponse)
    def fold_page(request: Request, name: str) -> HTMLResponse:
        fold = runs.fold_run(settings.home, name)
        if fold is None:
            return error_page(request, 404, "No such fold run", f"no fold run named {name!r} in {settings.home / 'folds'}")
        charts = [
            line_chart(key.replace("_", " "), {key: [(record["step"], record[key]) for record in fold.metrics
                                                     if isinstance(record.get(key), int | float)]})
            for key in runs.CURVES
        ]
        return render(request, "fold.html", {"fold": fold, "charts": [chart for chart in charts if chart]})

    # ---------------------------------------------------------------------- experiment
    @app.get("/experiment", response_class=HTMLResponse)
    def experiment_page(request: Request) -> HTMLResponse:
        if settings.experiment is None:
            return error_page(request, 404, "No experiment", "start `skillfold ui --experiment DIR` to show one")
        try:
            experiment = runs.read_experiment(settings.experiment)
        except Exception as error:  # a missing or damaged metrics.json: say so on the page
            return error_page(request, 503, "The experiment cannot be read", f"{settings.experiment}: {error}")
        phases = experiment.metrics.phases
        curves = {}
        for matrix in experiment.matrices:
            label = matrix["arm"] + (" (memory off)" if matrix["off"] else "")
            points = []
            for phase in range(len(phases)):
                values = [row["cells"][phase]["accuracy"] for row in matrix["rows"]
                          if row["cells"][phase]["accuracy"] is not None]
                if values:
                    points.append((phase + 1, sum(values) / len(values)))
            curves[label] = points
        chart = line_chart("mean accuracy over families after each phase", curves,
                           {phase + 1: str(phase + 1) for phase in range(len(phases))})
        return render(request, "experiment.html", {"experiment": experiment, "chart": chart,
                                                  "out": settings.experiment})

    @app.get("/experiment/episodes", response_class=HTMLResponse)
    def experiment_episodes(request: Request, file: str) -> HTMLResponse:
        from envs.base import Trajectory

        if settings.experiment is None:
            return error_page(request, 404, "No experiment", "start `skillfold ui --experiment DIR` to show one")
        path = runs.experiment_episodes(settings.experiment, file)
        if path is None:
            return error_page(request, 404, "No such episodes file",
                              f"{file} is not an episodes file of {settings.experiment} (packed away, or never written)")
        episodes = []
        for line in path.read_text(encoding="utf-8").splitlines()[:500]:
            try:
                episodes.append(Trajectory.model_validate_json(line))
            except ValueError:
                continue
        return render(request, "episodes.html", {"file": file, "episodes": episodes})

    return app
