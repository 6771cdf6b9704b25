"""`skillfold ui` through FastAPI's test client: pages, filters, escaping, edits, tokens, bad homes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from agent.cli import app as cli_app
from agent.ui import UiSettings, create_app
from agent.ui.library import TrajectoryFilter, scan_trajectories
from memory import HashingEmbedding, Memory, Skill
from tests.ui_library import CALC, FOLD, HOSTILE, HOSTILE_FAMILY, LEGS, seed_library

REPO = Path(__file__).resolve().parents[2]
RAW_HTML = re.compile(r"<script>alert|<img src=x|<iframe|<svg onload|<b>raw", re.IGNORECASE)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    return seed_library(tmp_path_factory.mktemp("ui") / "home")


def client_for(home: Path, **settings) -> TestClient:
    app = create_app(UiSettings(home=home, **settings), embedding=HashingEmbedding())
    return TestClient(app, base_url="http://127.0.0.1:8765")


@pytest.fixture(scope="module")
def client(seeded):
    return client_for(seeded.home, page_size=5)


def tree(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


# ------------------------------------------------------------------------------------ pages
def test_every_page_renders(client, seeded):
    ids = seeded.skill_ids
    for url in ["/", f"/skills/{ids['legs']}", f"/skills/{ids['exemplar']}", "/trajectories", "/trajectories/run-a-1",
                "/retrieve", "/retrieve?task=legs+of+spiders", "/folds", f"/folds/{FOLD}", "/static/htmx.min.js",
                "/static/style.css"]:
        response = client.get(url)
        assert response.status_code == 200, (url, response.text[:500])
    page = client.get("/").text
    assert '<script src="/static/htmx.min.js"></script>' in page
    links = re.findall(r'(?:src|href|action)="([^"]*)"', page)
    assert links and all(link.startswith("/") and not link.startswith("//") for link in links)  # nothing off-site


def test_library_counts_filters_sort_and_pages(client, seeded):
    page = client.get("/").text
    counts = re.search(r'<table class="counts".*?</table>', page, re.S).group(0)
    assert re.search(r"all families</strong></td>\s*<td class=\"num\"><a[^>]*>7</a></td>\s*"
                     r"<td class=\"num\">0</td>\s*<td class=\"num\"><a[^>]*>1</a></td>\s*<td class=\"num\"><a[^>]*>1</a></td>\s*"
                     r"<td class=\"num\">9</td>", counts), counts
    assert "9 skills match; showing 1–5" in page and "page 1 of 2" in page
    legs = client.get("/", params={"family": LEGS, "status": "active"}).text
    assert "count legs per animal" in legs and "cows and horses" not in legs and "12 * 7" not in legs
    folded = client.get("/", params={"status": "folded"}).text
    assert "cows and horses" in folded and "1 skills match" in folded
    taught = client.get("/", params={"kind": "taught"}).text
    assert "use the calculator" in taught and "count legs per animal" not in taught
    found = client.get("/", params={"q": "EIGHT legs"}).text  # text search: case-insensitive, in the text too
    assert "count legs per animal" in found and "1 skills match" in found
    by_uses = client.get("/", params={"sort": "uses", "order": "desc"}).text
    first = re.search(r'class="skill-link" href="/skills/([0-9a-f]+)"', by_uses).group(1)
    assert first == seeded.skill_ids["legs"]  # the only skill with uses
    second_page = client.get("/", params={"page": 2}).text
    assert "showing 6–9" in second_page


def test_status_counts_over_time_end_at_the_current_counts(seeded):
    from agent.ui.library import growth, read_rows

    rows = read_rows(Memory.open(home=seeded.home, embedding=HashingEmbedding(), create=False))
    times, series = growth(rows)
    assert times == sorted(times)
    assert {status: counts[-1] for status, counts in series.items()} == {"active": 7, "pending": 0, "folded": 1, "retired": 1}
    assert max(series["active"]) == 9  # the folded and the retired skill were active first


def test_semantic_search_ranks_by_distance(client, seeded):
    page = client.get("/", params={"q": "spiders birds legs multiply add", "mode": "semantic"}).text
    assert "nearest skills" in page
    distances = [float(value) for value in re.findall(r'<td class="num">(\d\.\d{3})</td>', page)]
    assert distances == sorted(distances) and distances
    first = re.search(r'class="skill-link" href="/skills/([0-9a-f]+)"', page).group(1)
    assert first == seeded.skill_ids["legs"]


def test_skill_page_shows_versions_history_provenance_and_usage(client, seeded):
    page = client.get(f"/skills/{seeded.skill_ids['legs']}").text
    assert 'class="add">+ Spiders have eight legs' in page and "Insects have six." in page
    assert "Versions (3)" in page and "edited" in page and "merged (cosine distance" in page and "· merge" in page
    assert 'href="/trajectories/run-a-0"' in page and 'href="/trajectories/run-a-2"' in page
    assert "uses</th><td>8 (6 successes, 2 failures" in page
    assert "over 8 episodes (4 successes)" in page  # the family's episodes without skills
    folded = client.get(f"/skills/{seeded.skill_ids['folded']}").text
    assert "meets the fold rule" in folded and f'href="/folds/{FOLD}"' in folded and "62.0%" in folded
    exemplar = client.get(f"/skills/{seeded.skill_ids['exemplar']}").text
    assert "tool call CALC(12*7)" in exemplar and 'class="message tool-result"' in exemplar
    assert re.search(r'id="admission".*<td>8</td><td>7</td><td>2</td><td>admitted', exemplar, re.S)
    usage = page[page.index('id="usage-over-time"'):]
    assert "success rate over time, cumulative" in usage and "with it: 75" in usage  # 6 of 8 uses succeeded
    assert "family baseline (no skills): 50" in usage  # 4 of 8


def test_trajectories_filter_and_page(client, seeded):
    page = client.get("/trajectories").text
    assert page.count('class="trajectory-link"') == 5 and 'id="next-page"' in page
    failed = client.get("/trajectories", params={"success": "no"}).text
    ids = re.findall(r'class="trajectory-link" href="/trajectories/([^"]+)"', failed)
    assert "run-a-2" in ids and "run-a-0" not in ids
    evals = client.get("/trajectories", params={"split": "eval", "env": LEGS}).text
    assert set(re.findall(r'href="/trajectories/([^"]+)"', evals)) <= {f"run-c-{n}" for n in range(1, 7)}
    following = re.search(r'href="(/trajectories\?[^"]*start=\d+)" id="next-page"', page).group(1)
    first_ids = set(re.findall(r'class="trajectory-link" href="/trajectories/([^"]+)"', page))
    second_ids = set(re.findall(r'class="trajectory-link" href="/trajectories/([^"]+)"', client.get(following).text))
    assert second_ids and not first_ids & second_ids
    memory = Memory.open(home=seeded.home, embedding=HashingEmbedding(), create=False)
    scan = scan_trajectories(memory, TrajectoryFilter(env=LEGS, success=False), 0, 50, chunk=2, budget=4)
    assert scan.cut_short and scan.scanned == 4 and all(not t.success for t in scan.shown)
    run = client.get("/trajectories", params={"run": "run-b"}).text
    assert set(re.findall(r'class="trajectory-link" href="/trajectories/([^"]+)"', run)) <= {f"run-b-{n}" for n in range(1, 9)}
    uses = client.get(f"/skills/{seeded.skill_ids['legs']}").text
    episodes = client.get(re.search(r'id="uses-link" href="([^"]+)"', uses).group(1).replace("&amp;", "&")).text
    assert re.findall(r'class="trajectory-link" href="/trajectories/(run-b-\d+)"', episodes)
    assert "run-c-" not in episodes and "run-a-" not in episodes
    one = client.get("/trajectories/run-a-1").text
    assert "tool result" in one and "Result: 84" in one and "success" in one


def test_retrieval_debugger_fits_the_budget(client, seeded):
    page = client.get("/retrieve", params={"task": "how many legs do spiders have", "family": LEGS, "k": 3}).text
    assert "skill context" in page and "how many legs do spiders have" in page
    chosen = re.search(r'id="budget-used">(\d+) skills chosen', page).group(1)
    assert int(chosen) >= 1
    none = client.get("/retrieve", params={"task": "how many legs", "family": LEGS, "budget": 0}).text
    assert 'id="budget-used">0 skills chosen' in none
    picked = client.get("/retrieve", params={"trajectory": "run-a-0"}).text
    assert "How many legs do 2 spiders and 1 bird have?" in picked


def test_retrieval_debugger_counts_with_the_model_tokenizer(seeded, model_dir, tiny_tokenizer):
    client = client_for(seeded.home, tokenizer=Path(model_dir))
    page = client.get("/retrieve", params={"task": "how many legs do spiders have", "family": LEGS}).text
    assert "counted by the tokenizer of" in page
    rendered = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Spiders have eight legs, birds two: multiply each count by its legs, then add. "
                                     "Insects have six."}], add_generation_prompt=True, tokenize=False)
    expected = len(tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert f'<td class="num">{expected}</td>' in page
    assert "estimated as characters / 4" in client_for(seeded.home).get("/retrieve", params={"task": "legs"}).text


def test_folds_page_curves_and_latest(client):
    page = client.get("/folds").text
    assert f'id="latest">{FOLD}' in page and "1.0000 → 0.0833" in page
    fold = client.get(f"/folds/{FOLD}").text
    assert fold.count("<polyline") == 5 and "folded" in fold and "accuracy_off" in fold
    assert "Retention check" in fold and "rg:letter_counting</td><td>436-499</td><td>22/64</td><td>21/64</td>" in fold
    assert "the adapter of step 10, the newest checkpoint that passed, is the one promoted" in fold
    assert "<td>the fold's last</td><td>12/64</td><td>3/16</td><td>dropped</td>" in fold
    assert "<td>step 10</td><td>21/64</td><td>3/16</td><td>passed</td>" in fold
    assert not RAW_HTML.search(fold)  # the hostile family name in the check is escaped
    assert client.get("/folds/..%2F..").status_code == 404


# --------------------------------------------------------------------------------- escaping
def test_hostile_text_is_escaped_everywhere(client, seeded):
    ids = seeded.skill_ids
    urls = ["/", "/?q=xss", "/?mode=semantic&q=alert", f"/skills/{ids['script']}", f"/skills/{ids['img']}",
            f"/skills/{ids['markdown']}", f"/skills/{ids['hostile_family']}", "/trajectories/run-a-1",
            f"/?family={HOSTILE_FAMILY}", "/retrieve?task=alert+xss", "/retrieve?task=<script>alert(9)</script>",
            "/?q=<img src=x onerror=alert(1)>"]
    for url in urls:
        response = client.get(url)
        assert response.status_code == 200, url
        assert not RAW_HTML.search(response.text), (url, RAW_HTML.search(response.text).group(0))
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["x-frame-options"] == "DENY"
    page = client.get(f"/skills/{ids['img']}").text
    assert "&#34;&gt;&lt;img src=x onerror=alert(&#39;xss-img&#39;)&gt;" in page
    markdown = client.get(f"/skills/{ids['markdown']}").text
    assert "[click me](javascript:alert(&#39;xss-md&#39;))" in markdown and 'href="javascript' not in markdown
    shown = "&lt;script&gt;alert(&#39;xss-script&#39;)&lt;/script&gt; always count twice"
    assert HOSTILE[0].startswith("<script>") and shown in client.get(f"/skills/{ids['script']}").text


def test_templates_never_mark_text_safe():
    for template in (REPO / "agent" / "ui" / "templates").glob("*.html"):
        text = template.read_text()
        assert "|safe" not in text.replace(" ", "") and "Markup" not in text and "autoescape false" not in text


# ------------------------------------------------------------------------------------ edits
def test_read_only_refuses_posts(client, seeded):
    response = client.post(f"/skills/{seeded.skill_ids['legs']}/status",
                           data={"action": "retire", "reason": "no", "csrf": "x"})
    assert response.status_code == 403 and "--allow-edits" in response.text
    assert "retire" not in re.sub(r"retired", "", client.get(f"/skills/{seeded.skill_ids['legs']}").text.split("<h2>Edit")[0][-200:])


def test_edits_go_through_memory_with_a_reason(tmp_path):
    seeded = seed_library(tmp_path / "home")
    client = client_for(seeded.home, allow_edits=True)
    skill_id = seeded.skill_ids["taught"]
    page = client.get(f"/skills/{skill_id}").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    assert client.post(f"/skills/{skill_id}/status", data={"action": "retire", "reason": "x"}).status_code == 403
    assert client.post(f"/skills/{skill_id}/status",
                       data={"action": "retire", "reason": "x", "csrf": "forged"}).status_code == 403
    blank = client.post(f"/skills/{skill_id}/status", data={"action": "retire", "reason": " ", "csrf": csrf})
    assert "give a reason" in blank.text
    spoofed = client.get(f"/skills/{skill_id}", params={"done": "you were hacked", "message": "you were hacked"})
    assert "you were hacked" not in spoofed.text
    retired = client.post(f"/skills/{skill_id}/status",
                          data={"action": "retire", "reason": "superseded <b>by</b> the exemplar", "csrf": csrf})
    assert retired.status_code == 200 and 'id="skill-status">retired' in retired.text
    assert "retire in skillfold ui: superseded &lt;b&gt;by&lt;/b&gt; the exemplar" in retired.text
    restored = client.post(f"/skills/{skill_id}/status", data={"action": "restore", "reason": "back", "csrf": csrf})
    assert 'id="skill-status">active' in restored.text
    edited = client.post(f"/skills/{skill_id}/edit", data={
        "text": "For any product over 10, call CALC(a*b) first.", "title": "calculator", "reason": "shorter",
        "csrf": csrf})
    assert "edited in skillfold ui: shorter" in edited.text
    memory = Memory.open(home=seeded.home, embedding=HashingEmbedding(), create=False)
    skill = memory.get_skill(skill_id)
    assert skill.text == "For any product over 10, call CALC(a*b) first." and skill.title == "calculator"
    assert [change.status for change in skill.status_history] == ["retired", "active"]
    assert skill.status_history[0].reason.endswith("the exemplar") and skill.versions[-1].reason.endswith("shorter")
    too_long = client.post(f"/skills/{skill_id}/edit",
                           data={"text": "x" * 5000, "title": "", "reason": "long", "csrf": csrf})
    assert "over the limit" in too_long.text
    assert memory.get_skill(skill_id).text.startswith("For any product")


# --------------------------------------------------------------------------------- security
def test_token_is_required_on_every_request(seeded):
    client = client_for(seeded.home, token="s3cret-token", allowed_hosts=())
    assert client.get("/").status_code == 401
    assert client.get("/static/style.css").status_code == 401
    assert client.get("/?token=wrong-token").status_code == 401
    first = client.get("/?token=s3cret-token")
    assert first.status_code == 200 and "httponly" in first.headers["set-cookie"].lower()
    assert client.get("/trajectories").status_code == 200  # the cookie carries it now
    bare = client_for(seeded.home, token="s3cret-token", allowed_hosts=())
    assert bare.get("/folds", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200


def test_unknown_host_header_is_refused(client):
    assert client.get("/", headers={"host": "evil.example:8765"}).status_code == 400
    assert client.get("/", headers={"host": "localhost:8765"}).status_code == 200


def test_pages_follow_another_writer(tmp_path):
    seeded = seed_library(tmp_path / "home")
    client = client_for(seeded.home)
    assert "added by a run meanwhile" not in client.get("/").text
    writer = Memory.open(home=seeded.home, embedding=HashingEmbedding())
    writer.add_skill(Skill(kind="rule", family=CALC, title="added by a run meanwhile", text="a brand new rule text"))
    assert "added by a run meanwhile" in client.get("/").text


# ------------------------------------------------------------------------------ bad homes
def test_missing_home_gives_a_clear_page_and_writes_nothing(tmp_path):
    client = client_for(tmp_path / "absent")
    response = client.get("/")
    assert response.status_code == 503 and "there is no skillfold home at" in response.text
    assert not (tmp_path / "absent").exists()
    (tmp_path / "empty").mkdir()
    response = client_for(tmp_path / "empty").get("/skills/abc")
    assert response.status_code == 503 and "no skill library in" in response.text
    assert list((tmp_path / "empty").iterdir()) == []


def test_corrupt_home_gives_a_clear_page_and_is_left_alone(tmp_path):
    store = tmp_path / "home" / "chroma"
    store.mkdir(parents=True)
    (store / "chroma.sqlite3").write_bytes(b"this is not a database" * 100)
    before = tree(tmp_path / "home")
    response = client_for(tmp_path / "home").get("/")
    assert response.status_code == 503 and "cannot be opened" in response.text and "Nothing was" in response.text
    assert tree(tmp_path / "home") == before


def test_cli_refuses_bad_homes_and_open_hosts(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(cli_app, ["ui", "--home", str(tmp_path / "absent"), "--port", "0"])
    assert missing.exit_code == 2 and "there is no skillfold home" in missing.output
    assert not (tmp_path / "absent").exists()
    store = tmp_path / "bad" / "chroma"
    store.mkdir(parents=True)
    (store / "chroma.sqlite3").write_bytes(b"garbage" * 100)
    before = tree(tmp_path / "bad")
    corrupt = runner.invoke(cli_app, ["ui", "--home", str(tmp_path / "bad"), "--port", "0"])
    assert corrupt.exit_code == 2 and "cannot be opened" in corrupt.output and tree(tmp_path / "bad") == before
    open_host = runner.invoke(cli_app, ["ui", "--home", str(tmp_path), "--host", "0.0.0.0"])
    assert open_host.exit_code == 2 and "--token" in open_host.output


def test_cli_serves_and_prints_the_url_last(tmp_path):
    from memory import MiniLMEmbedding

    Memory.open(home=tmp_path / "home", embedding=MiniLMEmbedding())  # collections only: no model is loaded
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "ui", "--home", str(tmp_path / "home"), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        url = process.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url), url
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.get(url, timeout=5)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert response.status_code == 200 and "0 skills match" in response.text
    finally:
        process.terminate()
        process.wait(timeout=10)


# ------------------------------------------------------------------------------ experiment
def test_experiment_page_links_cells_to_episodes(tmp_path, seeded):
    out = tmp_path / "experiment"
    out.mkdir()
    shutil.copy(REPO / "docs" / "reference-experiment" / "metrics.json", out / "metrics.json")
    metrics = json.loads((out / "metrics.json").read_text())
    first = metrics["units"][0]["evals"][0]["trajectories"]
    episodes = out / first
    episodes.parent.mkdir(parents=True)
    memory = Memory.open(home=seeded.home, embedding=HashingEmbedding(), create=False)
    episodes.write_text(memory.get_trajectory("run-a-1").model_dump_json() + "\n")
    client = client_for(seeded.home, experiment=out)
    page = client.get("/experiment").text
    assert "Accuracy matrices" in page and "<polyline" in page and "/experiment/episodes?file=" in page
    shown = client.get("/experiment/episodes", params={"file": first})
    assert shown.status_code == 200 and "Result: 84" in shown.text and not RAW_HTML.search(shown.text)
    assert client.get("/experiment/episodes", params={"file": "../../../etc/passwd"}).status_code == 404
    assert client_for(seeded.home).get("/experiment").status_code == 404


def test_a_large_library_is_read_again_in_the_background(tmp_path):
    seeded = seed_library(tmp_path / "home")
    client = client_for(seeded.home, synchronous_rows_below=5)  # 9 skills: "large"
    assert "9 skills match" in client.get("/").text
    writer = Memory.open(home=seeded.home, embedding=HashingEmbedding())
    writer.add_skill(Skill(kind="rule", family=CALC, title="added meanwhile", text="another brand new rule text"))
    first = client.get("/").text  # the rows read before, while they are read again
    assert "9 skills match" in first or "10 skills match" in first
    deadline = time.monotonic() + 20
    while "10 skills match" not in client.get("/").text:
        assert time.monotonic() < deadline, "the library was not read again"
        time.sleep(0.1)
