"""Two users in a real browser (issue 20): `streamlit run` with accounts, Chromium via Playwright.

Set-up (not in the browser): the sample project with a "loss" run and the accounts ann (admin)
and bob (reviewer). Then, each in their own browser context: bob signs in, his sidebar has no
Setup/Score/Export and /Setup does not open it; ann excludes a sample, bob opens it and cannot
undo her decision; with 2 reviewers per sample bob keeps it, the disagreement reaches ann's
queue, she resolves it, and her export carries the resolved decision with both votes.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from served_app import CHROMIUM, CHROMIUM_ARGS, IDLE, Server

STEP_TIMEOUT_MS = 60_000
PW = "correct horse battery"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                       reason=f"{CHROMIUM} is missing: `apt-get install -y chromium` (scripts/test.sh does it)"),
]


@pytest.fixture
def workspace(tmp_path):
    from diffin_core.project.sample import SAMPLE_DIR
    from diffin_core.run.scoring import score
    from diffin_core.workspace.accounts import Accounts
    ws = tmp_path / "ws"
    proj = ws / "mnist-sample"
    shutil.copytree(SAMPLE_DIR / "mnist", proj, ignore=shutil.ignore_patterns("runs", "review.sqlite*", "exports"))
    score(proj, "loss", run="loss-1")
    Accounts(ws).add("ann", PW, "admin")
    Accounts(ws).add("bob", PW, "reviewer")
    return ws


def idle(page) -> None:
    page.wait_for_selector(IDLE, timeout=STEP_TIMEOUT_MS)


def sign_in(page, url: str, name: str) -> None:
    page.goto(url)
    page.get_by_role("heading", name="diffin: sign in").wait_for()
    idle(page)
    page.get_by_label("User name").fill(name)
    page.get_by_label("User name").press("Enter")
    idle(page)
    page.get_by_label("Password", exact=True).fill(PW)
    page.get_by_label("Password", exact=True).press("Enter")
    idle(page)
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.get_by_text(f"Signed in as {name}", exact=False).wait_for()
    idle(page)


def nav_titles(page) -> list[str]:
    links = page.locator("[data-testid='stSidebarNav'] a").all_inner_texts()
    return [re.sub(r"^[a-z_]+\s*", "", t.strip()) for t in links]   # drop the icon's ligature name


def go(page, name: str, heading: str | None = None) -> None:
    page.locator("[data-testid='stSidebarNav'] a", has_text=re.compile(rf"{re.escape(name)}\s*$")).first.click()
    page.get_by_role("heading", name=heading or name).wait_for()
    idle(page)


def current_sample(page) -> int:
    head = page.get_by_role("heading", name=re.compile(r"^Sample \d+")).first.inner_text()
    return int(re.search(r"\d+", head).group())


def click(page, key: str) -> None:
    page.locator(f".st-key-{key}").get_by_role("button").click()
    idle(page)


def wait_sample(page, sid: int) -> None:
    """Wait until the card shows sample ``sid`` (the rerun after a click may not have begun yet)."""
    page.get_by_role("heading", name=f"Sample {sid}", exact=True).wait_for()
    idle(page)


def test_two_users_roles_undo_and_a_resolved_disagreement(workspace, tmp_path):
    from playwright.sync_api import sync_playwright
    proj = workspace / "mnist-sample"
    scores = pd.read_parquet(proj / "runs/loss-1/scores.parquet")
    ranked = scores.sort_values("label_issue", ascending=False, kind="stable")["sample_id"].tolist()
    with Server(workspace, tmp_path / "streamlit.log") as srv, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        pages = {}
        try:
            for name in ("ann", "bob"):          # two people: two browser contexts, two sessions
                pg = browser.new_context(viewport={"width": 1400, "height": 1600}).new_page()
                pg.set_default_timeout(STEP_TIMEOUT_MS)
                pages[name] = pg
            ann, bob = pages["ann"], pages["bob"]

            # bob, a reviewer: no Setup, Score or Export in his sidebar, and /Setup does not open it
            sign_in(bob, srv.url + "/", "bob")
            assert nav_titles(bob) == ["Home", "Explore", "Review", "What-if"], nav_titles(bob)
            sign_in(bob, srv.url + "/Setup", "bob")          # a new session: sign in again
            idle(bob)
            assert bob.get_by_role("heading", name="Set up a project from uploads").count() == 0
            assert bob.locator("input[type='file']").count() == 0

            sign_in(ann, srv.url + "/", "ann")
            assert nav_titles(ann) == ["Home", "Setup", "Score", "Explore", "Review", "Export", "What-if"]
            go(ann, "Review", "Review suspects")
            assert current_sample(ann) == ranked[0]
            click(ann, "review_exclude")                      # one reviewer per sample: ann's decision
            wait_sample(ann, ranked[1])
            from diffin_core.workspace.review import ReviewLog

            # bob opens ann's sample by id and cannot undo her decision
            go(bob, "Review", "Review suspects")
            assert current_sample(bob) == ranked[1]
            bob.get_by_text("Open a sample by id", exact=False).click()
            bob.get_by_role("spinbutton", name="Sample id").fill(str(ranked[0]))
            bob.get_by_role("spinbutton", name="Sample id").press("Enter")
            idle(bob)
            bob.get_by_role("button", name="Show it on the card").click()
            wait_sample(bob, ranked[0])
            bob.get_by_role("button", name=f"Undo the decision on sample {ranked[0]}").click()
            bob.get_by_text("is ann's (exclude): only ann or an admin can undo it", exact=False).wait_for()
            idle(bob)
            with ReviewLog(proj) as log:
                state = log.state()
            assert (state.loc[ranked[0], "action"], state.loc[ranked[0], "user"]) == ("exclude", "ann")
            if not bob.get_by_role("button", name="Back to the queue").is_visible():
                bob.get_by_text("Open a sample by id", exact=False).click()     # the rerun folded it
            bob.get_by_role("button", name="Back to the queue").click()
            wait_sample(bob, ranked[1])

            # now 2 reviewers per sample: bob's queue has ranked[0] (one vote of 2); he keeps it: a disagreement
            with ReviewLog(proj) as log:
                log.set_reviewers_per_sample(2, user="ann")
            go(bob, "Review", "Review suspects")
            assert current_sample(bob) == ranked[0]
            click(bob, "review_keep")
            wait_sample(bob, ranked[1])
            with ReviewLog(proj) as log:
                assert log.disagreements()["sample_id"].tolist() == [ranked[0]]

            # the disagreement reaches ann's queue; she resolves it: exclude
            ann.reload()                                      # a reload is a new session: sign in again
            sign_in(ann, srv.url + "/", "ann")
            go(ann, "Review", "Review suspects")
            ann.get_by_text(re.compile(r"^Disagreements to resolve \(1\)")).click()
            wait_sample(ann, ranked[0])
            ann.get_by_text("ann: exclude; bob: keep", exact=False).wait_for()
            click(ann, "review_exclude")
            ann.get_by_text("No disagreement is waiting.").wait_for()

            with ReviewLog(proj) as log:
                state = log.state()
            assert state.loc[ranked[0], "action"] == "exclude" and state.loc[ranked[0], "how"] == "resolution"

            # ann exports: the resolved decision and both votes are in the file and its manifest
            go(ann, "Export")
            ann.get_by_role("radio", name=re.compile("^Cleaned split")).check()
            idle(ann)
            ann.get_by_role("button", name="Write export").click()
            ann.get_by_text(re.compile(r"^Wrote ")).wait_for()
            idle(ann)
        except BaseException:
            for name, pg in pages.items():
                pg.screenshot(path=str(tmp_path / f"failure-{name}.png"), full_page=True)
            print(f"\nscreenshots in {tmp_path}\nserver log (tail):\n{srv.log()}")
            raise
        finally:
            browser.close()
    out = proj / "exports" / "mnist-sample-clean-npz.npz"
    from diffin_core.workspace.export import written_ids
    with np.load(out) as z:
        assert "ids" not in z.files and len(z["y"]) == len(scores) - 1
    assert ranked[0] not in written_ids(out).tolist() and len(written_ids(out)) == len(scores) - 1
    man = json.loads(out.with_name(out.stem + ".decisions.json").read_text())
    s0 = next(s for s in man["samples"] if s["sample_id"] == ranked[0])
    assert (s0["decision"], s0["decided_by"], s0["how"]) == ("exclude", "ann", "resolution")
    assert [(v["user"], v["action"]) for v in s0["votes"]] == [("ann", "exclude"), ("bob", "keep")]
