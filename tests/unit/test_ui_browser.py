"""`skillfold ui` in a real browser: Debian's chromium driven by Playwright, edits on.

The app serves a seeded library (tests/ui_library.py) from a thread of this process. The test opens
the library, filters it, opens a skill, follows a provenance link to a trajectory, searches by text
and by meaning, uses the retrieval debugger, retires and restores a skill, and checks that no
hostile skill text ran as script. With SKILLFOLD_UI_SCREENSHOTS=DIR it saves a screenshot of each
page there (docs/ui/ holds the committed ones).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    if os.environ.get("SKILLFOLD_REQUIRE_BROWSER"):  # CI: .ci/run installs chromium, so this must run
        raise RuntimeError("SKILLFOLD_REQUIRE_BROWSER is set but /usr/bin/chromium is missing: "
                           "apt-get install -y chromium")
    pytest.skip("no /usr/bin/chromium: `apt-get install -y chromium` (.ci/run does)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency: pip install playwright")

from agent.ui import UiSettings, create_app  # noqa: E402
from memory import HashingEmbedding  # noqa: E402
from tests.ui_library import FOLD, LEGS, seed_library  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    seeded = seed_library(tmp_path_factory.mktemp("browser") / "home")
    experiment = Path(__file__).resolve().parents[2] / "docs" / "reference-experiment"
    settings = UiSettings(home=seeded.home, allow_edits=True, page_size=5, experiment=experiment)
    app = create_app(settings, embedding=HashingEmbedding())
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the ui server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", seeded
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def page(server):
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(15_000)
        dialogs: list[str] = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.dialogs = dialogs  # type: ignore[attr-defined]
        yield page
        browser.close()


def shot(page, name: str) -> None:
    folder = os.environ.get("SKILLFOLD_UI_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


def test_browse_search_debug_and_edit(server, page):
    base, seeded = server
    expect = playwright_api.expect
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    # the library: counts, then filter by family through htmx (the table swaps in place, the URL follows)
    page.goto(base + "/")
    expect(page.locator("#counts")).to_contain_text("all families")
    expect(page.locator("#shown")).to_contain_text("9 skills match")
    shot(page, "library")
    page.select_option("select[name=family]", LEGS)
    expect(page.locator("#shown")).to_contain_text("4 skills match")
    assert "family=" in page.url
    page.select_option("select[name=status]", "active")
    expect(page.locator("#shown")).to_contain_text("2 skills match")

    # open a skill, follow its provenance to the source trajectory
    page.get_by_role("link", name="count legs per animal").click()
    expect(page.locator("#skill-title")).to_have_text("count legs per animal")
    expect(page.locator("#skill-text")).to_contain_text("Insects have six.")
    shot(page, "skill")
    page.locator("a.provenance-link").first.click()
    expect(page.locator("#trajectory-id")).to_contain_text("run-a-0")
    expect(page.locator(".conversation")).to_contain_text("How many legs do 2 spiders and 1 bird have?")

    # text search and semantic search
    page.goto(base + "/")
    page.fill("input[name=q]", "calculator")
    expect(page.locator("#shown")).to_contain_text("2 skills match")
    page.select_option("select[name=mode]", "semantic")
    expect(page.locator("#shown")).to_contain_text("nearest skills")
    page.fill("input[name=q]", "how many legs do spiders and birds have")
    expect(page.locator("#shown")).to_contain_text("to “how many legs do spiders and birds have”")
    expect(page.locator("a.skill-link").first).to_have_text("count legs per animal")
    shot(page, "search")

    # the retrieval debugger, from a trajectory's task
    page.goto(base + "/trajectories/run-a-0")
    page.click("#debug-retrieval")
    expect(page.locator("#task")).to_have_value("How many legs do 2 spiders and 1 bird have?")
    expect(page.locator("#budget-used")).to_contain_text("skills chosen")
    expect(page.locator("#prompt")).to_contain_text("skill context")
    shot(page, "retrieve")

    # retire, then restore, with reasons
    skill_id = seeded.skill_ids["taught"]
    page.goto(f"{base}/skills/{skill_id}")
    page.fill("#status-form input[name=reason]", "superseded by the exemplar")
    page.click("#retire")
    expect(page.locator("#skill-status")).to_have_text("retired")
    expect(page.locator("#status-history")).to_contain_text("retire in skillfold ui: superseded by the exemplar")
    page.fill("#status-form input[name=reason]", "still needed")
    page.click("#restore")
    expect(page.locator("#skill-status")).to_have_text("active")
    expect(page.locator("#status-history")).to_contain_text("restore in skillfold ui: still needed")

    # the other pages, and the hostile skills: shown as text, never run
    page.goto(base + "/trajectories")
    shot(page, "trajectories")
    page.goto(base + "/trajectories/run-a-1")
    expect(page.locator(".message.tool-result")).to_contain_text("Result: 84")
    shot(page, "trajectory")
    page.goto(f"{base}/folds/{FOLD}")
    expect(page.locator("svg polyline")).to_have_count(5)
    shot(page, "fold")
    page.goto(base + "/folds")
    shot(page, "folds")
    page.goto(base + "/experiment")
    expect(page.locator("table.matrix").first).to_contain_text("rg:basic_arithmetic+calc")
    shot(page, "experiment")
    page.goto(f"{base}/skills/{seeded.skill_ids['script']}")
    expect(page.locator("#skill-text")).to_contain_text("<script>alert('xss-script')</script>")
    page.goto(f"{base}/skills/{seeded.skill_ids['img']}")
    expect(page.locator("#skill-text")).to_contain_text('"><img src=x onerror=')
    page.goto(base + "/?q=xss")
    assert page.locator("img").count() == 0 and page.locator("iframe").count() == 0
    assert page.dialogs == [] and errors == []  # type: ignore[attr-defined]
