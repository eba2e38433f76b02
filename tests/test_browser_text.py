"""The text sample end to end in a real browser (`streamlit run` + Playwright on Debian's chromium).

As a user: open the text sample from Home, explore a query (its text, the top-k text cards),
search the training texts, review 5 suspects one click each, export the cleaned split in the
input's own format (.tsv), and check the file against the input: exactly the excluded messages
are gone, the relabel is written as a class name, every other byte is the input's.
Screenshots: ``DIFFIN_SHOTS=docs python -m pytest tests/test_browser_text.py`` writes
docs/text-explore.png, docs/text-search.png and docs/text-review.png.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
from served_app import CHROMIUM, CHROMIUM_ARGS, IDLE, Server
from test_browser_e2e import current_sample, go, idle, metric, wait_metric
from text_fixtures import text_sample  # noqa: F401

STEP_TIMEOUT_MS = 60_000
TOPK_TIMEOUT_MS = 180_000

pytestmark = [
    pytest.mark.browser, pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                       reason=f"{CHROMIUM} is missing: `apt-get install -y chromium` (scripts/test.sh does it)"),
]


@pytest.fixture
def workspace(tmp_path, text_sample):
    """The scored tiny sample; DIFFIN_TEXT_SAMPLE=<folder> takes a full build instead (screenshots),
    which needs a tracin-1 run."""
    ws = tmp_path / "ws"
    src = Path(os.environ.get("DIFFIN_TEXT_SAMPLE") or text_sample)
    shutil.copytree(src, ws / "sms-spam-sample", ignore=shutil.ignore_patterns("review.sqlite*", "exports"))
    return ws


@pytest.fixture
def page(workspace, request, tmp_path):
    from playwright.sync_api import sync_playwright
    with Server(workspace, tmp_path / "streamlit.log") as srv, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1400, "height": 1400})
            pg.set_default_timeout(STEP_TIMEOUT_MS)
            pg.server = srv
            failed_before = request.session.testsfailed
            yield pg
            if request.session.testsfailed > failed_before:
                pg.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
                print(f"\nscreenshot: {tmp_path / 'failure.png'}\nserver log (tail):\n{srv.log()}")
        finally:
            browser.close()


def to_top(page) -> None:
    """Scroll Streamlit's scrolling containers to the top (its sticky header covers widgets there)."""
    page.evaluate("document.querySelectorAll('*').forEach(e => { if (e.scrollTop) e.scrollTop = 0; })")


def shot(page, name: str) -> None:
    where = os.environ.get("DIFFIN_SHOTS")
    if where:
        page.screenshot(path=str(Path(where) / f"text-{name}.png"), full_page=True)


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)


def test_text_sample_explore_review_export(page, workspace):
    project = workspace / "sms-spam-sample"
    train = read_tsv(project / "data/train.tsv")
    query = read_tsv(project / "data/query.tsv")
    page.goto(page.server.url + "/")
    idle(page)
    page.get_by_role("button", name="Try the text sample (SMS spam)").click()
    page.get_by_role("heading", name=re.compile("^Open: SMS spam sample")).wait_for()
    idle(page)

    # Explore: the query's text, then the top-k grids as text cards.
    go(page, "Explore")
    run = page.locator(".st-key-explore_run").get_by_role("combobox")
    run.click()
    page.get_by_role("option", name=re.compile("^tracin-1")).click()
    idle(page)
    q = 3
    box = page.locator(".st-key-explore_query input")
    box.fill(str(q))
    box.press("Enter")
    idle(page)
    page.get_by_text(query["text"][q][:30], exact=False).first.wait_for()
    page.get_by_role("button", name="Find the most helpful and harmful training samples").click()
    page.get_by_text("Most harmful", exact=False).wait_for(timeout=TOPK_TIMEOUT_MS)
    idle(page)
    cards = page.locator(".diffin-text")
    assert cards.count() >= 1 + 16, cards.count()          # the query + 8 helpful + 8 harmful
    caption = page.get_by_text(re.compile(r"^#\d+ · label ")).first.inner_text()
    sid = int(re.match(r"#(\d+)", caption).group(1))
    assert train.set_index("sample_id").loc[str(sid), "text"][:25] in page.inner_text("body")
    shot(page, "explore")

    # Search the training texts by a phrase.
    to_top(page)
    page.locator(".st-key-explore_view").get_by_text("Search", exact=True).click()
    idle(page)
    search = page.locator(".st-key-explore_search_q input")
    search.fill("FREE")
    search.press("Enter")
    idle(page)
    n = int(train["text"].str.casefold().str.contains("free").sum())
    page.get_by_text(re.compile(rf"^{n} match")).wait_for()
    shot(page, "search")

    # Review: 5 suspects, one click each; the card shows the whole text.
    go(page, "Review")
    wait_metric(page, "Reviewed", "0")
    text_of = dict(zip(train["sample_id"].astype(int), train["text"]))
    plan = ["exclude", "exclude", "keep", "relabel", "exclude"]
    done = {}
    for i, action in enumerate(plan, start=1):
        sid = current_sample(page)
        full = page.locator(".diffin-text-full").inner_text()
        assert full.strip() == text_of[sid].strip()
        if i == 1:
            shot(page, "review")
        page.locator(f".st-key-review_{action}").get_by_role("button").click()
        wait_metric(page, "Reviewed", str(i))
        done[sid] = action
    assert metric(page, "Excluded") == "3" and metric(page, "Relabelled") == "1"

    # Export: the input's own format first (a faithful copy), then the file against the input.
    go(page, "Export")
    fmt = page.locator(".st-key-export_format").get_by_role("combobox")
    assert fmt.input_value() == "tsv (same as the input: byte-faithful)", fmt.input_value()
    page.get_by_role("button", name="Write export").click()
    page.get_by_text(re.compile(r"^Wrote ")).wait_for()
    idle(page)
    out = project / "exports" / "sms-spam-sample-clean-tsv.tsv"
    src = (project / "data/train.tsv").read_bytes().split(b"\n")
    got = out.read_bytes().split(b"\n")
    given = dict(zip(train["sample_id"].astype(int), train["label"]))
    expect = [src[0]]
    for line in src[1:]:
        if not line:
            expect.append(line)
            continue
        sid, label, rest = line.split(b"\t", 2)
        action = done.get(int(sid))
        if action == "exclude":
            continue
        if action == "relabel":            # Review's default relabel: the other class, by name
            label = b"spam" if given[int(sid)] == "ham" else b"ham"
        expect.append(b"\t".join([sid, label, rest]))
    assert got == expect
    assert len(got) == len(src) - 3
    assert len(done) == 5
