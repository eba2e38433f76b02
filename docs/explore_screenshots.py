"""Screenshots of the feature-store views for the README (issue 8), from a real browser.

    python docs/explore_screenshots.py [WORKSPACE]   # writes docs/explore-*.png (~8 min on 2 busy CPUs, ~1 min reusing WORKSPACE)

The browser test's set-up (tests/explore_browser.py: the sample project with a diffin run whose
feature store is built for real): query 17's top-k grid by the exact path (as Explore shows it:
the store's shortlist rescored in the background), a training sample's reverse view with its
per-checkpoint plot, the class heatmap, the histogram, and the map of the stored features
(maps.compute(kind="stored"): PCA + UMAP of the store's rows, no gradient pass).
"""
from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from explore_browser import PROJECT, ask_query, build_workspace, explore_page, has_workspace  # noqa: E402
from served_app import IDLE  # noqa: E402
sys.path.insert(0, str(ROOT / "docs"))
import screenshots  # noqa: E402  (docs/screenshots.py: its viewport and cropped, size-capped shot)


def main() -> None:
    from diffin_core.tasks import maps
    from diffin_core.project.folder import Project
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        given = Path(sys.argv[1]) if len(sys.argv) > 1 else None      # reuse a built workspace
        ws = given if has_workspace(given) else build_workspace(given or tmp / "ws")
        project = Project(ws / PROJECT)
        if maps.load(project, "diffin-1", "stored") is None:
            maps.compute(project, "diffin-1", kind="stored")           # the store's rows: no gradients
        # a tall viewport (Streamlit scrolls inside its own container: a full-page shot of a
        # short one cuts the grids off), each shot cropped to the page's content as docs/*.png are
        with explore_page(ws, tmp / "log.txt", height=screenshots.HEIGHT, timeout_ms=180_000) as page:
            def shot(name):
                page.wait_for_selector(IDLE)
                page.wait_for_timeout(1500)                        # plotly draws after the script
                screenshots.shot(page, f"explore-{name}")

            ask_query(page, 17)
            # the grid Explore shows: the exact path's, computed in the background (minutes on a
            # loaded 2-core machine; the store's quick grid is drawn first only where the run
            # measured it to agree, tests/test_browser_explore.py)
            page.get_by_text(re.compile(r"^Produced by the exact path")).wait_for(timeout=900_000)
            page.get_by_text("Most harmful", exact=False).first.wait_for()
            shot("topk")
            # The Training sample view opens on this grid's most harmful sample. Its per-checkpoint
            # plot is a job in the project's one background slot, queued behind the planning-ahead
            # job this grid started (12 queries: it was not drawn within 300 s at load 14), so it
            # is computed here, as that job would, and read from its cache by the page.
            from diffin_core.run import features as F
            from diffin_core.run.scoring import top_k
            _, harmful = top_k(project, "diffin-1", [17], 8)       # the kept exact answer: a read
            F.contributions_for(str(project.root), "diffin-1", int(harmful["sample_id"].iloc[0]))
            for label, name in (("Training sample", "reverse"), ("Class heatmap", "heatmap"),
                                ("Histograms", "histogram"), ("Map", "map")):
                page.get_by_text(label, exact=True).first.click()
                page.wait_for_selector(IDLE)
                if name == "reverse":                      # the per-checkpoint plot (worker's child)
                    page.locator(".st-key-explore_rev_checkpoints").first.wait_for(timeout=300_000)
                if name == "map":
                    page.locator(".st-key-explore_map").first.wait_for()
                shot(name)


if __name__ == "__main__":
    main()
