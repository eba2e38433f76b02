"""Screenshots of the feature-store views for the README (issue 8), from a real browser.

    python docs/explore_screenshots.py [WORKSPACE]   # writes docs/explore-*.png (~3-5 min on 2 CPUs)

The browser test's set-up (tests/explore_browser.py: the sample project with a diffin run whose
feature store is built for real): the fast top-k grid, a training sample's reverse view with its
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
        with explore_page(ws, tmp / "log.txt", height=1000, timeout_ms=180_000) as page:
            def shot(name):
                page.wait_for_selector(IDLE)
                page.wait_for_timeout(1500)                        # plotly draws after the script
                page.screenshot(path=str(ROOT / "docs" / f"explore-{name}.png"), full_page=True)
                print("wrote", f"docs/explore-{name}.png")

            ask_query(page, 17)
            page.get_by_text(re.compile(r"^Produced by the fast path")).wait_for()
            shot("topk")
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
