"""One set-up for real-browser work on the Explore page (tests/test_browser_explore.py and
docs/explore_screenshots.py): the sample project with a diffin run whose feature store is built
for real, the app served on it, and Debian's chromium opened at Explore.

    ws = build_workspace(tmp / "ws")
    with explore_page(ws, tmp / "log.txt") as page:
        ask_query(page, 17)
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from pathlib import Path

from served_app import CHROMIUM, CHROMIUM_ARGS, IDLE, Server

PROJECT = "mnist-sample"
TOPK_BUTTON = "Find the most helpful and harmful training samples"


def has_workspace(ws: Path | None) -> bool:
    return ws is not None and (Path(ws) / PROJECT / "runs/diffin-1/features/meta.json").is_file()


def build_workspace(ws: Path) -> Path:
    """The sample project, scored with "loss" (fast), that run copied as a diffin run whose
    feature store is then built for real by features.build_for_run (small d and rank to keep it
    short; the grid's numbers come from the store, the label and prediction columns from
    scores.parquet)."""
    from diffin_core.run import features as F
    from diffin_core.project.folder import Project
    from diffin_core.project.sample import SAMPLE_DIR
    from diffin_core.run.scoring import score
    ws.mkdir(parents=True, exist_ok=True)
    proj = ws / PROJECT
    shutil.copytree(SAMPLE_DIR / "mnist", proj, ignore=shutil.ignore_patterns("runs", "review.sqlite*", "exports"))
    loss = score(proj, "loss", run="loss-1")
    run = proj / "runs" / "diffin-1"
    shutil.copytree(loss, run)
    meta = json.loads((run / "meta.json").read_text())
    (run / "meta.json").write_text(json.dumps({**meta, "run": "diffin-1", "method": "diffin",
                                               "finished": meta["finished"] + 1}))
    F.build_for_run(Project(proj), "diffin-1", F.FeatureSettings(dim=256, view_rank=8, rerank=20))
    return ws


@contextlib.contextmanager
def explore_page(ws: Path, log: Path, height: int = 1100, timeout_ms: int = 120_000):
    """The app served on ``ws``, a headless chromium page at the sample project's Explore page."""
    from playwright.sync_api import sync_playwright
    with Server(ws, log) as srv, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": height})
            page.set_default_timeout(timeout_ms)
            page.goto(srv.url + f"/?project={Path(ws) / PROJECT}")
            page.wait_for_selector(IDLE)
            # "exploreExplore": the icon's ligature, then the title
            page.locator("[data-testid='stSidebarNav'] a", has_text=re.compile(r"Explore\s*$")).first.click()
            page.get_by_role("heading", name="Explore").wait_for()
            page.wait_for_selector(IDLE)
            yield page
        finally:
            browser.close()


def ask_query(page, query: int) -> float:
    """Type a query index, wait for the script to settle, press the top-k button; returns
    time.perf_counter() just before the click (the caller waits for what it needs)."""
    box = page.locator(".st-key-explore_query input")
    box.fill(str(query))
    box.press("Enter")
    page.wait_for_selector(IDLE)
    t0 = time.perf_counter()
    page.get_by_role("button", name=TOPK_BUTTON).click()
    return t0
