"""Regenerate docs/*.png: one screenshot per page of the sample project after scoring.

    python docs/screenshots.py                       # a fresh temp workspace, ~10 min on CPU
    python docs/screenshots.py --workspace DIR       # reuse DIR (runs and the map are kept)
    python docs/screenshots.py --workspace DIR --prepare-only

Steps: copy the sample project into the workspace with its shipped diffin run (as a first start
does; run/prebuilt.py) and check that run, rescored if the check fails (skipped once done); score
it with "loss"; compute the UMAP map of the diffin run (of its stored features when
it has a feature store: the map Explore shows first); record a few review decisions through the
engine (so Review/Export show progress); verify removing the 20 most harmful by paired retraining
on 2 seeds (so What-if shows a verdict; skipped once done); then serve the app with `streamlit run` on
127.0.0.1 and photograph each page with Playwright on Debian's chromium (/usr/bin/chromium).
The viewport is tall (Streamlit scrolls inside its own container) and each shot is cropped to the
page's content; PNGs over 500 KB are re-encoded with a 256-colour palette. Icons are Streamlit's
material icons (a web font served by the app), so no emoji font is needed.
"""
from __future__ import annotations

import argparse
import io
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from served_app import CHROMIUM, CHROMIUM_ARGS, IDLE, Server  # noqa: E402

WIDTH, HEIGHT = 1400, 2000
MAX_BYTES = 500_000


def log(msg: str) -> None:
    print(f"[screenshots] {msg}", flush=True)


def prepare(workspace: Path) -> Path:
    """The scored sample project (diffin + loss runs, the diffin map, a few decisions)."""
    from diffin_core.workspace import appstate
    from diffin_core.tasks import curate as tasks
    from diffin_core.tasks import maps
    from diffin_core.project.folder import Project
    from diffin_core.project.sample import SAMPLE_DIR
    from diffin_core.workspace.review import ReviewLog
    from diffin_core.run import prebuilt
    from diffin_core.run.features import FeatureStore
    from diffin_core.run.scoring import score

    project_dir = appstate.copy_sample(workspace)
    prebuilt.install(SAMPLE_DIR / "mnist", project_dir)          # runs/diffin-1, as a first start has it
    if prebuilt.status(Project(project_dir).run("diffin-1").meta) == "unverified":
        t = time.time()
        rec = prebuilt.verify_then_rescore(str(project_dir))     # what a first start's background job does
        log(f"shipped run check: {rec['status']}{', rescored' if rec.get('rescored') else ''} "
            f"in {time.time() - t:.0f} s")
    if not (project_dir / "runs" / "loss-1" / "scores.parquet").is_file():
        t = time.time()
        score(project_dir, "loss", run="loss-1")
        log(f"scored loss in {time.time() - t:.0f} s")
    project = Project(project_dir)
    if not tasks.whatif_results(project, "diffin-1"):
        t = time.time()
        sc = project.scores("diffin-1")
        harmful = sc["sample_id"].to_numpy()[tasks.drop_most_harmful(sc, 20)]
        tasks.verify_by_retraining(project, harmful, run="diffin-1", seeds=[0, 1])
        log(f"What-if verification in {time.time() - t:.0f} s")
    kind = "stored" if FeatureStore.open(project, "diffin-1") is not None else "activations"
    if maps.load(project, "diffin-1", kind) is None:      # the map Explore shows first
        t = time.time()
        maps.compute(project, "diffin-1", kind=kind)
        log(f"UMAP map ({kind}) in {time.time() - t:.0f} s")
    with ReviewLog(project_dir) as rl:
        if rl.state().empty:
            sc = project.scores("diffin-1").sort_values("label_issue", ascending=False, kind="stable")
            top = sc.head(8)
            for i, r in enumerate(top.itertuples()):
                if i == 5:
                    rl.decide(int(r.sample_id), "keep", user="docs", run="diffin-1", method="diffin")
                elif i == 6:
                    rl.decide(int(r.sample_id), "relabel", new_label=int(r.pred), user="docs",
                              run="diffin-1", method="diffin")
                elif i < 5:
                    rl.decide(int(r.sample_id), "exclude", user="docs", run="diffin-1", method="diffin")
    appstate.remember(workspace, project_dir)
    return project_dir


def settle(page, extra_ms: int = 600) -> None:
    """Script run finished, images loaded, nothing still fading in."""
    page.wait_for_selector(IDLE, timeout=120_000)
    page.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=60_000)
    page.wait_for_timeout(extra_ms)
    page.wait_for_selector(IDLE, timeout=120_000)


def go(page, name: str, heading) -> None:
    """Click the sidebar's link to page ``name`` (st.navigation titles) and wait for its heading."""
    # a material icon's text (its ligature name, e.g. "bolt") comes before the title
    page.locator("[data-testid='stSidebarNav'] a", has_text=re.compile(rf"{re.escape(name)}\s*$")).first.click()
    page.get_by_role("heading", name=heading).first.wait_for()
    settle(page)


def shot(page, name: str) -> Path:
    """Screenshot cropped to the page content, kept under MAX_BYTES."""
    from PIL import Image
    page.mouse.move(WIDTH - 5, HEIGHT - 5)   # no hover highlight on the last clicked button
    page.wait_for_timeout(300)
    height = page.evaluate(
        "() => { const m = document.querySelector(\"[data-testid='stMainBlockContainer']\");"
        " return m ? Math.ceil(m.getBoundingClientRect().bottom) : 0 }")
    height = max(600, min(HEIGHT, int(height) + 24))
    png = page.screenshot(clip={"x": 0, "y": 0, "width": WIDTH, "height": height})
    out = DOCS / f"{name}.png"
    img = Image.open(io.BytesIO(png)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    if buf.tell() > MAX_BYTES:
        buf = io.BytesIO()
        img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buf, "PNG", optimize=True)
    out.write_bytes(buf.getvalue())
    log(f"{out.relative_to(ROOT)}: {WIDTH}x{height}, {len(buf.getvalue()) // 1024} KB")
    return out


def photograph(url: str) -> list[Path]:
    from playwright.sync_api import sync_playwright
    out = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
            page.set_default_timeout(120_000)
            page.goto(url + "/")
            settle(page)
            page.get_by_role("button", name="Try the sample project").click()
            page.get_by_role("heading", name=re.compile("^Open: ")).wait_for()
            settle(page)
            out.append(shot(page, "home"))

            go(page, "Setup", "Set up a project from uploads")
            out.append(shot(page, "setup"))

            go(page, "Score", "Score")
            page.locator("[data-testid='stDataFrame']").first.wait_for()
            settle(page)
            out.append(shot(page, "score"))

            go(page, "Explore", "Explore")
            page.get_by_text("Map", exact=True).first.click()
            chart = page.locator(".st-key-explore_map [data-testid='stPlotlyChart'], "
                                 "[data-testid='stPlotlyChart']").first
            chart.wait_for()
            page.wait_for_function("() => !!document.querySelector('.js-plotly-plot .plot-container')")
            settle(page, 1500)
            out.append(shot(page, "explore"))

            go(page, "Review", "Review suspects")
            out.append(shot(page, "review"))

            go(page, "Export", "Export")
            page.get_by_role("button", name="Write export").click()
            page.get_by_text(re.compile(r"^Wrote ")).wait_for()
            settle(page)
            out.append(shot(page, "export"))

            go(page, "What-if", re.compile("^What-if"))
            out.append(shot(page, "whatif"))
        finally:
            browser.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, help="workspace to use (default: a fresh temp folder)")
    ap.add_argument("--prepare-only", action="store_true", help="prepare the workspace, take no shots")
    args = ap.parse_args()
    if not Path(CHROMIUM).is_file():
        sys.exit(f"{CHROMIUM} is missing: apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="diffin-shots-") as tmp:
        ws = (args.workspace or Path(tmp) / "ws").resolve()
        ws.mkdir(parents=True, exist_ok=True)
        prepare(ws)
        if args.prepare_only:
            return
        with Server(ws, Path(tmp) / "streamlit.log") as srv:
            photograph(srv.url)


if __name__ == "__main__":
    main()
