"""End to end in a real browser: serve the app with `streamlit run`, drive it with Playwright on
Debian's chromium (/usr/bin/chromium, never `playwright install`).

As a user: open the sample project, score it ("loss", the fast method), review 5 samples
(3 excludes, 1 keep, 1 relabel); open a second tab on the same sample, exclude it in the first
tab and check the second tab's stale Keep is refused with who changed it and when; export the
cleaned split as .npz, then check the file on disk against the review log and the input: exactly
the excluded samples are gone, the relabel is applied, every other array is byte-faithful.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from served_app import CHROMIUM, CHROMIUM_ARGS, IDLE, Server

SCORING_TIMEOUT_MS = 150_000   # "loss" on the 4,000 sample digits takes ~10 s on 2 CPU cores
STEP_TIMEOUT_MS = 60_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                       reason=f"{CHROMIUM} is missing: `apt-get install -y chromium` (scripts/test.sh does it)"),
]


@pytest.fixture
def workspace(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws


@pytest.fixture
def server(workspace, tmp_path):
    with Server(workspace, tmp_path / "streamlit.log") as srv:
        yield srv


@pytest.fixture
def page(server, request, tmp_path):
    """A chromium page; on failure a screenshot and the server log land in tmp_path."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1400, "height": 1100})
            pg.set_default_timeout(STEP_TIMEOUT_MS)
            failed_before = request.session.testsfailed
            yield pg
            if request.session.testsfailed > failed_before:
                shot = tmp_path / "failure.png"
                pg.screenshot(path=str(shot), full_page=True)
                print(f"\nscreenshot: {shot}\nserver log (tail):\n{server.log()}")
        finally:
            browser.close()


# --- helpers ---------------------------------------------------------------------------------

def idle(page) -> None:
    """Wait until the script run has finished (the app shows no "running" state)."""
    page.wait_for_selector(IDLE, timeout=STEP_TIMEOUT_MS)


def go(page, name: str) -> None:
    """Open a page from the sidebar navigation (same session, like a user would)."""
    # the link's text is the material icon's ligature name, then the title: "boltScore"
    page.locator("[data-testid='stSidebarNav'] a", has_text=re.compile(rf"{re.escape(name)}\s*$")).first.click()
    page.get_by_role("heading", name=name if name != "Review" else "Review suspects").wait_for()
    idle(page)


def metric(page, label: str) -> str:
    m = page.locator("[data-testid='stMetric']").filter(has=page.get_by_text(label, exact=True))
    return m.locator("[data-testid='stMetricValue']").inner_text().strip()


def wait_metric(page, label: str, value: str) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        try:
            if metric(page, label) == value:
                idle(page)
                return
        except Exception:  # noqa: BLE001 - the element is being redrawn
            pass
        page.wait_for_timeout(100)
    raise AssertionError(f"metric {label!r} never showed {value!r} (last: {metric(page, label)!r})")


def current_sample(page) -> int:
    head = page.get_by_role("heading", name=re.compile(r"^Sample \d+")).first.inner_text()
    return int(re.search(r"\d+", head).group())


def given_label(page) -> str:
    text = page.locator("[data-testid='stMarkdownContainer'] p", has_text="Given label:").first.inner_text()
    return re.search(r"Given label:\s*(\S+)", text).group(1)


def choose(page, key: str, option: str) -> None:
    """Pick an option of the selectbox with widget key ``key``."""
    page.locator(f".st-key-{key}").get_by_role("combobox").click()
    page.get_by_role("option", name=option, exact=True).click()


# --- the test --------------------------------------------------------------------------------

def test_sample_project_score_review_export(page, server, workspace):
    t0 = time.monotonic()
    page.goto(server.url + "/")
    idle(page)
    # the toolbar has no Deploy button (.streamlit/config.toml client.toolbarMode = "viewer"; issue 21)
    page.locator("[data-testid='stToolbar']").wait_for()
    page.locator("[data-testid='stMainMenu']").wait_for()
    assert page.locator("[data-testid='stAppDeployButton']").count() == 0

    # Home: one click opens the sample project (copied into the workspace).
    page.get_by_role("button", name="Try the sample project").click()
    page.get_by_role("heading", name=re.compile("^Open: ")).wait_for()
    idle(page)
    project = workspace / "mnist-sample"
    assert (project / "diffin.toml").is_file()

    # Score: replace the default method by "loss" (fast) and start; wait for "done" on the page.
    go(page, "Score")
    methods = page.locator(".st-key-score_methods")
    remove = methods.get_by_role("button", name=re.compile("^Remove "))
    remove.first.wait_for()                  # the default choice ("diffin", slow) is shown
    while remove.count():
        n = remove.count()
        remove.first.click()
        page.wait_for_function(
            "([sel, n]) => document.querySelectorAll(sel).length < n",
            arg=[".st-key-score_methods [data-tag] button", n])
        idle(page)
    box = methods.get_by_role("combobox")
    box.click()
    box.fill("loss")
    page.get_by_role("option", name="loss", exact=True).click()
    page.keyboard.press("Escape")
    idle(page)
    assert [t.strip() for t in methods.locator("[data-tag]").all_inner_texts()] == ["loss"]
    page.get_by_role("button", name="Start scoring").click()
    page.get_by_text(re.compile(r"^loss: done in")).wait_for(timeout=SCORING_TIMEOUT_MS)
    page.locator("[data-testid='stDataFrame']").first.wait_for()   # the finished-runs table
    idle(page)
    runs = [p.name for p in (project / "runs").iterdir() if not p.name.startswith(".")]
    assert runs == ["loss-1"], runs
    scores = pd.read_parquet(project / "runs" / "loss-1" / "scores.parquet")
    ranked = scores.sort_values("label_issue", ascending=False, kind="stable")["sample_id"].tolist()

    # Review: 5 one-click decisions, each followed by the next sample of the queue.
    go(page, "Review")
    wait_metric(page, "Reviewed", "0")
    plan = ["exclude", "exclude", "keep", "relabel", "exclude"]
    done: dict[int, tuple[str, int | None]] = {}
    for n, action in enumerate(plan, start=1):
        sid = current_sample(page)
        assert sid == ranked[n - 1], (n, sid, ranked[:6])   # the queue is ranked by label_issue
        new = None
        if action == "relabel":
            given = int(scores.loc[scores["sample_id"] == sid, "label"].iloc[0])
            assert given_label(page) == str(given)   # label names of the sample project are "0".."9"
            new = next(y for y in range(10) if y != given)   # a label that really changes
            choose(page, f"review_new_label_{sid}", str(new))   # keyed by sample: nothing carries over
            # the name may end in the button's key ("Relabel to 7 Shortcut L") when 7 is the suggestion
            page.get_by_role("button", name=re.compile(rf"^Relabel to {new}( Shortcut L)?$")).wait_for()
            idle(page)
            page.locator(".st-key-review_relabel").get_by_role("button").click()
        else:
            page.locator(f".st-key-review_{action}").get_by_role("button").click()
        wait_metric(page, "Reviewed", str(n))
        assert current_sample(page) != sid
        done[sid] = (action, new)
    assert metric(page, "Excluded") == "3" and metric(page, "Relabelled") == "1"
    assert metric(page, "Remaining") == str(len(scores) - 5)

    # Two tabs on one sample: tab B still shows it when tab A excludes it; B's Keep is refused
    # with who changed it and when, and nothing is written.
    tab_b = page.context.browser.new_page(viewport={"width": 1400, "height": 1100})   # a second tab
    tab_b.set_default_timeout(STEP_TIMEOUT_MS)
    tab_b.goto(server.url + "/")
    idle(tab_b)
    go(tab_b, "Review")
    wait_metric(tab_b, "Reviewed", "5")
    shared = current_sample(page)
    assert current_sample(tab_b) == shared == ranked[5]
    page.locator(".st-key-review_exclude").get_by_role("button").click()
    wait_metric(page, "Reviewed", "6")
    tab_b.bring_to_front()
    # without a reload, tab B's counts catch up and its card says it is out of date (every 5 s)
    tab_b.locator("[data-testid='stAlert']", has_text="in another tab").wait_for(timeout=30_000)
    wait_metric(tab_b, "Excluded", "4")
    tab_b.locator(".st-key-review_keep").get_by_role("button").click()   # the stale card's Keep
    alert = tab_b.locator("[data-testid='stAlert']", has_text="nothing was written")
    alert.wait_for()
    assert f"sample {shared} was changed by" in alert.inner_text() and " UTC " in alert.inner_text()
    idle(tab_b)
    assert metric(tab_b, "Excluded") == "4" and current_sample(tab_b) == ranked[6]   # redrawn as it is
    tab_b.close()
    page.bring_to_front()
    done[shared] = ("exclude", None)

    from diffin_core.workspace.review import ReviewLog
    with ReviewLog(project) as log:
        state = log.state()
        assert len(log.history(shared)) == 1          # the stale Keep wrote nothing
    assert {int(s): (a, None if pd.isna(lab) else int(lab)) for s, a, lab in
            zip(state.index, state["action"], state["label"])} == done

    # Export: the cleaned split (review decisions applied) as .npz.
    go(page, "Export")
    page.get_by_text("4 excluded, 1 relabelled, 1 kept", exact=False).wait_for()
    page.get_by_role("radio", name=re.compile("^Cleaned split")).check()
    idle(page)
    fmt = page.locator(".st-key-export_format").get_by_role("combobox")
    # the input's own format comes first and says so
    assert fmt.input_value() == "npz (same as the input: byte-faithful)", fmt.input_value()
    page.get_by_role("button", name="Write export").click()
    page.get_by_text(re.compile(r"^Wrote ")).wait_for()
    idle(page)
    out = project / "exports" / "mnist-sample-clean-npz.npz"
    assert out.is_file(), sorted(p.name for p in (project / "exports").iterdir())
    page.get_by_role("button", name=f"Download {out.name}").wait_for()   # drawn once its data is ready

    # The file on disk: exactly the excluded samples are gone, the relabel is applied, and
    # everything else is the input's own arrays byte for byte (dtype, shape, values).
    with np.load(project / "data" / "train.npz") as z:
        source = {k: z[k] for k in z.files}
    with np.load(out) as z:
        exported = {k: z[k] for k in z.files}
    train_y = source["y"].astype(np.int64)
    train_x = source["x"]
    train_ids = source["ids"].astype(np.int64) if "ids" in source else np.arange(len(train_y))
    x, y = exported["x"], exported["y"]
    from diffin_core.workspace.export import written_ids
    ids = written_ids(out)                    # the rows' ids live in the decisions manifest (issue 21)
    excluded = {int(s) for s in state.index[state["action"] == "exclude"]}
    assert len(excluded) == 4
    assert set(ids.tolist()) == set(train_ids.tolist()) - excluded
    assert len(ids) == len(train_ids) - 4 == len(y) == len(x)
    row = {int(s): i for i, s in enumerate(train_ids)}
    rows = np.array([row[int(s)] for s in ids])
    expected = train_y[rows].copy()
    for sid, (action, new) in done.items():
        if action == "relabel":
            i = int(np.flatnonzero(ids == sid)[0])
            assert y[i] == new != train_y[row[sid]]
            expected[i] = new
    np.testing.assert_array_equal(y, expected)
    assert list(exported) == list(source)          # the same arrays in the same order, and no other
    for k, a in source.items():
        b = exported[k]
        assert b.dtype == a.dtype and b.shape[1:] == a.shape[1:], (k, a.dtype, b.dtype, a.shape, b.shape)
        if k != "y":
            np.testing.assert_array_equal(b, a[rows])             # uint8 (N, 784) stays uint8 (N, 784)
    assert x.dtype == train_x.dtype and x.shape == (len(rows), *train_x.shape[1:])
    assert time.monotonic() - t0 < 240
