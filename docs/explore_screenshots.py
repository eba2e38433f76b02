"""Screenshots of the feature-store views for the README (issue 8), from a real browser.

    python docs/explore_screenshots.py [WORKSPACE]   # writes docs/explore-*.png (~3-5 min on 2 CPUs)

The sample project with a diffin run whose feature store is built for real (see
tests/test_browser_explore.py for the same set-up): the fast top-k grid, a training sample's
reverse view with its per-checkpoint plot, the class heatmap with a cell's samples, and the
histogram.
"""
from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from served_app import CHROMIUM, CHROMIUM_ARGS, IDLE, Server  # noqa: E402


def main() -> None:
    import test_browser_explore as tbe
    from playwright.sync_api import sync_playwright
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        given = Path(sys.argv[1]) if len(sys.argv) > 1 else None      # reuse a built workspace
        ws = given if given and (given / "mnist-sample/runs/diffin-1/features").is_dir() else \
            tbe.build_workspace(given or tmp / "ws")
        with Server(ws, tmp / "log.txt") as srv, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(180_000)
            page.goto(srv.url + f"/?project={ws / 'mnist-sample'}")
            page.wait_for_selector(IDLE)
            page.locator("[data-testid='stSidebarNav'] a", has_text=re.compile(r"Explore\s*$")).first.click()  # "exploreExplore": icon ligature, title
            page.get_by_role("heading", name="Explore").wait_for()
            page.wait_for_selector(IDLE)

            def shot(name):
                page.wait_for_selector(IDLE)
                page.wait_for_timeout(1500)                        # plotly draws after the script
                page.screenshot(path=str(ROOT / "docs" / f"explore-{name}.png"), full_page=True)
                print("wrote", f"docs/explore-{name}.png")

            box = page.locator(".st-key-explore_query input")
            box.fill("17")
            box.press("Enter")
            page.wait_for_selector(IDLE)
            page.get_by_role("button", name="Find the most helpful and harmful training samples").click()
            page.get_by_text(re.compile(r"^Produced by the fast path")).wait_for()
            shot("topk")
            for label, name in (("Training sample", "reverse"), ("Class heatmap", "heatmap"),
                                ("Histograms", "histogram")):
                page.get_by_text(label, exact=True).first.click()
                page.wait_for_selector(IDLE)
                if name == "reverse":                      # the per-checkpoint plot (worker's child)
                    page.locator(".st-key-explore_rev_checkpoints").first.wait_for(timeout=300_000)
                shot(name)
            browser.close()


if __name__ == "__main__":
    main()
