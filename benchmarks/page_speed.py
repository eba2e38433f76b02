"""Page speed with 50,000 scored training samples: every page should render in under 1 s.

    python benchmarks/page_speed.py                  # AppTest + real browser, ~3-5 min on 2 CPUs
    python benchmarks/page_speed.py --no-browser     # AppTest only
    python benchmarks/page_speed.py --workspace DIR  # build (or reuse) the 50k project in DIR

The project: the MNIST sample project with its train split enlarged to N (50,000) rows by
resampling the 4,000 digits with small pixel noise (labels, flipped labels and true labels carried
along), the checkpoint manifest's train_size set to N, and two runs in the engine's run-folder
format (runs/<run>/scores.parquet + meta.json, see diffin_core/run/scoring.py):

* loss-1   : real final-model predictions, confidence and loss for all N rows (method "loss");
* diffin-1 : the same predictions, with influence / self-influence / label_issue drawn to match
  the distribution of a real diffin run of the sample project (flipped labels score high), plus
  a UMAP map (runs/diffin-1/umap.parquet, one cluster per class) and a cached top-k for query 0.

Review holds 1,000 decisions (600 exclude, 200 relabel, 200 keep). Two modes per page:

* apptest : streamlit.testing.v1.AppTest, the time of ``at.run()`` after a warm first run
            (script execution, caches warm), ``--repeats`` times;
* browser : `streamlit run` + Playwright on /usr/bin/chromium, the time from clicking the page in
            the sidebar to the page's title being shown with the script state "notRunning"
            (script run + websocket + React render of the deltas; plotly's canvas drawing after
            that is not included). Each repeat comes from a different page.

Explore is measured as opened ("explore": the top-k view), after "Find the most helpful and
harmful" for query 0 ("explore+topk": the two image grids too), and for its Map and Histograms
views ("explore+map", "explore+hist": from choosing the view until it is drawn; the map shows at
most 20,000 of the 50,000 points). Results: benchmarks/results/page_speed.csv (page, mode, n_train, median_s,
p90_s, load: the 1-minute load average when the row was done, date: UTC) and page_speed.png.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from served_app import CHROMIUM, CHROMIUM_ARGS, IDLE, Server  # noqa: E402
RESULTS = ROOT / "benchmarks" / "results"
PROJECT = "mnist-50k"
TARGET_S = 1.0

# page name -> (script for AppTest, sidebar link text, title shown on the page)
PAGES = {
    "home": ("app.py", "Home", "diffin: which training samples"),
    "setup": ("pages/1_Setup.py", "Setup", "Set up a project from uploads"),
    "score": ("pages/2_Score.py", "Score", "Score"),
    "explore": ("pages/3_Explore.py", "Explore", "Explore"),
    "explore+topk": ("pages/3_Explore.py", "Explore", "Explore"),
    "explore+map": ("pages/3_Explore.py", "Explore", "Explore"),
    "explore+hist": ("pages/3_Explore.py", "Explore", "Explore"),
    "review": ("pages/4_Review.py", "Review", "Review suspects"),
    "export": ("pages/5_Export.py", "Export", "Export"),
}
# Explore draws one view at a time; these are timed from choosing the view until it is drawn.
VIEWS = {"explore+map": ("Map", "explore_map"), "explore+hist": ("Histograms", "explore_hist")}


def log(msg: str) -> None:
    print(f"[page_speed] {msg}", flush=True)


# --- the 50k project ------------------------------------------------------------------------------

def build_project(workspace: Path, n: int, seed: int = 0) -> Path:
    """Copy the sample project into ``workspace`` and enlarge + score it (skipped if present)."""
    import torch

    from diffin_core.project.folder import Project
    from diffin_core.workspace.review import ReviewLog
    from diffin_core.project.sample import SAMPLE_DIR

    dest = workspace / PROJECT
    done = dest / ".page-speed-ready"
    if done.is_file() and json.loads(done.read_text()).get("n") == n:
        log(f"reusing {dest}")
        return dest
    t0 = time.time()
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(SAMPLE_DIR / "mnist", dest, ignore=shutil.ignore_patterns("runs", "review.sqlite*", "exports"))
    rng = np.random.default_rng(seed)

    # train split: N rows resampled from the 4,000 digits, +-noise on the pixels
    with np.load(dest / "data" / "train.npz") as z:
        x, y, true_y = z["x"], z["y"].astype(np.int64), z["true_y"].astype(np.int64)
    pick = rng.integers(0, len(y), n)
    noise = rng.integers(-12, 13, size=(n, x.shape[1]), dtype=np.int16)
    xn = np.clip(x[pick].astype(np.int16) + noise, 0, 255).astype(np.uint8)
    np.savez_compressed(dest / "data" / "train.npz", x=xn, y=y[pick], true_y=true_y[pick],
                        ids=np.arange(n, dtype=np.int64))
    man = dest / "checkpoints" / "manifest.json"
    m = json.loads(man.read_text())
    m["train_size"] = n
    man.write_text(json.dumps(m, indent=1))

    project = Project(dest)
    tr = project.train
    assert len(tr) == n, len(tr)
    model = project.final_model()
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(torch.as_tensor(tr.x[i:i + 2048])), 1)
                           for i in range(0, n, 2048)]).numpy().astype(np.float64)
    pred = probs.argmax(1)
    loss = -np.log(np.clip(probs[np.arange(n), tr.y], 1e-12, None))
    flipped = tr.y != tr.true_y
    base = {"sample_id": tr.ids, "label": tr.y, "pred": pred, "confidence": probs[np.arange(n), pred],
            "loss": loss, "true_label": tr.true_y}
    now = time.time()
    settings = {"batch_size": 256, "hessian_batch": 256, "lanczos_steps": 10, "eps": 0.001, "hvp": "fd",
                "paper_batch": 128, "damping": 0.01, "explicit_max_params": 5000, "cg_iters": 100,
                "seed": 0, "device": "auto"}

    def write_run(name, method, cols, finished, seconds):
        d = dest / "runs" / name
        d.mkdir(parents=True)
        df = pd.DataFrame({"sample_id": base["sample_id"], "label": base["label"], **cols,
                           "pred": base["pred"], "confidence": base["confidence"], "loss": base["loss"],
                           "true_label": base["true_label"]})
        df = df[["sample_id", "label", "influence", "self_influence", "label_issue", "pred",
                 "confidence", "loss", "true_label"]]
        df.to_parquet(d / "scores.parquet", index=False)
        meta = {"run": name, "method": method, "settings": settings, "device": "cpu", "checkpoints": 12,
                "train_size": n, "query_size": len(project.query), "num_params": 11978,
                "seconds": seconds, "finished": finished,
                "versions": {"torch": torch.__version__, "python": sys.version.split()[0], "diffin": "0.1.0"},
                "note": "synthetic scores for benchmarks/page_speed.py"}
        (d / "meta.json").write_text(json.dumps(meta, indent=1))
        return d

    # a "loss" run: influence = -loss-ish, no self-influence (as the real method writes it)
    write_run("loss-1", "loss", {"influence": 1.0 - loss + rng.normal(0, 0.05, n),
                                 "self_influence": np.full(n, np.nan), "label_issue": loss},
              now - 60, round(6.5 * n / 4000, 3))
    # a "diffin" run shaped like the real one on the sample project (mean self-influence 0.56,
    # label_issue up to ~17, influence ~1e-4 with harmful flipped labels)
    self_inf = np.exp(rng.normal(-1.6, 1.0, n)) + 1.2 * loss * (1 + 0.3 * rng.standard_normal(n)).clip(0.2)
    influence = rng.standard_t(4, n) * 8e-5 - flipped * np.abs(rng.normal(3e-4, 2e-4, n))
    label_issue = self_inf * (1.0 + 0.5 * (1 - base["confidence"])) + 0.5 * loss
    run = write_run("diffin-1", "diffin", {"influence": influence, "self_influence": self_inf,
                                           "label_issue": label_issue}, now, round(94.0 * n / 4000, 3))
    # its UMAP map: one blob per class (given label), misfits nearer their true class
    centres = rng.uniform(-5, 20, size=(10, 2))
    xy = centres[tr.true_y] + rng.normal(0, 0.8, size=(n, 2))
    pd.DataFrame({"sample_id": tr.ids, "umap_x": xy[:, 0].astype(np.float32),
                  "umap_y": xy[:, 1].astype(np.float32)}).to_parquet(run / "umap.parquet", index=False)
    # top-k cache of query 0 (what scoring.top_k writes after its first computation)
    (run / "topk").mkdir()
    np.save(run / "topk" / "q0.npy", rng.standard_t(4, n) * 1e-4)

    # 1,000 review decisions at the top of the diffin queue
    order = np.argsort(-label_issue, kind="stable")[:1000]
    with ReviewLog(dest) as rl:
        ids = [int(tr.ids[i]) for i in order]
        rl.decide_many(ids[:600], "exclude", user="bench", run="diffin-1", method="diffin")
        for i in order[600:800]:
            rl.decide(int(tr.ids[i]), "relabel", new_label=int(pred[i]) if pred[i] != tr.y[i] else int((tr.y[i] + 1) % 10),
                      user="bench", run="diffin-1", method="diffin")
        rl.decide_many(ids[800:], "keep", user="bench", run="diffin-1", method="diffin")
    done.write_text(json.dumps({"n": n}))
    log(f"built {dest} with {n:,} training samples in {time.time() - t0:.0f} s")
    return dest


# --- AppTest --------------------------------------------------------------------------------------

def stats(times: list[float]) -> tuple[float, float]:
    return statistics.median(times), float(np.percentile(times, 90))


def bench_apptest(workspace: Path, project: Path, repeats: int, n: int) -> list[dict]:
    from streamlit.testing.v1 import AppTest
    os.environ["DIFFIN_WORKSPACE"] = str(workspace)
    sys.argv = sys.argv[:1]  # app.py reads --workspace from argv: keep ours out of it
    rows = []
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    t = time.perf_counter()
    at.run()
    at.selectbox(key="home_project").set_value(project.name)
    at.button(key="home_open").click().run()
    log(f"apptest: home + open project (cold, imports included) {time.perf_counter() - t:.2f} s")
    assert not at.exception, at.exception
    for name, (script, _, _) in PAGES.items():
        t = time.perf_counter()
        at.switch_page(script).run()
        if name == "explore+topk":
            at.button(key="explore_topk").click().run()
            assert at.session_state["explore_topk_for"] == ("diffin-1", 0)
        if name in VIEWS:
            at.radio(key="explore_view").set_value(VIEWS[name][0]).run()
        first = time.perf_counter() - t
        assert not at.exception, (name, at.exception)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            at.run()
            times.append(time.perf_counter() - t)
        assert not at.exception, (name, at.exception)
        charts = len(at.get("plotly_chart"))
        med, p90 = stats(times)
        log(f"apptest {name:13s} first {first:6.2f} s · median {med:.3f} s · p90 {p90:.3f} s"
            + (f"  ({charts} plotly charts drawn)" if charts else ""))
        rows.append({"page": name, "mode": "apptest", "n_train": n,
                     "median_s": round(med, 4), "p90_s": round(p90, 4), "load": round(os.getloadavg()[0], 2)})
        if name == "explore+topk":
            at.session_state["explore_topk_for"] = None
    return rows


# --- real browser ---------------------------------------------------------------------------------

def bench_browser(workspace: Path, project: Path, repeats: int, n: int) -> list[dict]:
    from playwright.sync_api import sync_playwright
    rows = []
    log_path = Path(tempfile.gettempdir()) / "page_speed_streamlit.log"
    with Server(workspace, log_path) as srv:
        url = srv.url
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1100})
                page.set_default_timeout(300_000)
                page.goto(url + "/")
                page.wait_for_selector(IDLE)
                page.locator(".st-key-home_project").get_by_role("combobox").click()
                page.get_by_role("option", name=project.name, exact=True).click()
                page.wait_for_selector(IDLE)
                page.locator(".st-key-home_open").get_by_role("button").click()
                page.get_by_role("heading", name=re.compile("^Open: ")).wait_for()
                page.wait_for_selector(IDLE)

                def visit(link: str, title: str) -> float:
                    """Click the sidebar link; seconds until the title shows and the script is idle."""
                    page.evaluate(
                        """([link]) => {
                            const a = [...document.querySelectorAll("[data-testid='stSidebarNav'] a")]
                                .find(e => e.innerText.trim().split("\\n").pop().trim() === link);  // after the icon
                            window.__t0 = performance.now(); window.__t1 = null; a.click(); }""", [link])
                    page.wait_for_function(
                        """([title]) => {
                            const app = document.querySelector("[data-testid='stApp']");
                            const h = document.querySelector("h1");
                            const ok = app && app.getAttribute('data-test-script-state') === 'notRunning'
                                && h && h.innerText.trim().startsWith(title);
                            if (ok && window.__t1 === null) window.__t1 = performance.now();
                            return ok; }""", arg=[title], polling="raf")
                    return (page.evaluate("() => window.__t1 - window.__t0")) / 1000.0

                for name, (_, link, title) in PAGES.items():
                    other = PAGES["setup" if name != "setup" else "score"][1:]   # a light page between visits
                    visit(*other)
                    visit(link, title)                                    # warm
                    if name == "explore+topk":
                        page.get_by_role("button", name="Find the most helpful and harmful training samples").click()
                        page.get_by_text("Most harmful", exact=False).first.wait_for()
                        page.wait_for_selector(IDLE)
                    times = []
                    for _ in range(repeats):
                        visit(*other)
                        times.append(visit(link, title))
                        if name in VIEWS:                      # then the view itself
                            label, key = VIEWS[name]
                            t = time.perf_counter()
                            page.get_by_text(label, exact=True).first.click()
                            page.locator(f".st-key-{key}").first.wait_for()
                            page.wait_for_selector(IDLE)
                            times[-1] = time.perf_counter() - t
                    if name == "explore+topk":
                        assert page.get_by_text("Most harmful", exact=False).count() > 0
                    med, p90 = stats(times)
                    log(f"browser {name:13s} median {med:.3f} s · p90 {p90:.3f} s  ({', '.join(f'{t:.2f}' for t in times)})")
                    rows.append({"page": name, "mode": "browser", "n_train": n,
                                 "median_s": round(med, 4), "p90_s": round(p90, 4),
                                 "load": round(os.getloadavg()[0], 2)})
            finally:
                browser.close()
    return rows


# --- report ---------------------------------------------------------------------------------------

def plot(df: pd.DataFrame, path: Path, note: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pages = list(dict.fromkeys(df["page"]))
    modes = list(dict.fromkeys(df["mode"]))
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=110)
    w = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        sub = df[df["mode"] == mode].set_index("page").reindex(pages)
        xs = np.arange(len(pages)) + (j - (len(modes) - 1) / 2) * w
        ax.bar(xs, sub["median_s"], w, label=f"{mode} (median)", color=["#4c72b0", "#dd8452"][j % 2])
        ax.errorbar(xs, sub["median_s"], yerr=[np.zeros(len(xs)), (sub["p90_s"] - sub["median_s"]).clip(lower=0)],
                    fmt="none", ecolor="#333", capsize=3, lw=1)
        for x, v, top in zip(xs, sub["median_s"], sub["p90_s"]):
            if np.isfinite(v):
                ax.text(x, max(v, top) + 0.03, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(TARGET_S, color="#c44e52", ls="--", lw=1, label=f"target {TARGET_S:.0f} s")
    ax.set_xticks(np.arange(len(pages)), pages, rotation=20, fontsize=8)
    ax.set_ylabel("seconds to render (whiskers: p90)")
    n = int(df["n_train"].iloc[0])
    ax.set_title(f"diffin page render time with {n:,} scored training samples"
                 + (f"\n{note}" if note else ""), fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_ylim(0, max(TARGET_S * 1.25, float(df["p90_s"].max()) * 1.15))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_note(df: pd.DataFrame) -> str:
    """The plot's second title line: the machine and the load while the rows were measured."""
    return (f"{os.cpu_count()} CPUs, load {df['load'].min():.1f}-{df['load'].max():.1f} during the run, "
            f"{df['date'].iloc[0]} UTC\nbrowser: headless chromium, software GL (--disable-gpu) · apptest: script run only")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000, help="training samples (default 50,000)")
    ap.add_argument("--repeats", type=int, default=5, help="timed renders per page and mode")
    ap.add_argument("--workspace", type=Path, help="where to build/reuse the project (default: temp)")
    ap.add_argument("--no-browser", action="store_true", help="AppTest only")
    ap.add_argument("--out", type=Path, default=RESULTS / "page_speed.csv")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot of --out's CSV, measure nothing")
    args = ap.parse_args()
    if args.plot_only:
        plot(pd.read_csv(args.out), args.out.with_suffix(".png"), plot_note(pd.read_csv(args.out)))
        return

    load = os.getloadavg()[0]
    note = (f"{os.cpu_count()} CPUs, load {load:.1f} at start · browser: headless chromium, software GL "
            "(--disable-gpu) · apptest: script run only")
    log(note)
    with tempfile.TemporaryDirectory(prefix="diffin-page-speed-") as tmp:
        ws = (args.workspace or Path(tmp) / "ws").resolve()
        ws.mkdir(parents=True, exist_ok=True)
        project = build_project(ws, args.n)
        rows = bench_apptest(ws, project, args.repeats, args.n)
        if not args.no_browser:
            if Path(CHROMIUM).is_file():
                rows += bench_browser(ws, project, args.repeats, args.n)
            else:
                log(f"{CHROMIUM} missing: browser mode skipped")
    df = pd.DataFrame(rows, columns=["page", "mode", "n_train", "median_s", "p90_s", "load"])
    df["date"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    plot(df, args.out.with_suffix(".png"), plot_note(df))
    log(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    print(df.to_string(index=False))
    slow = df[df["median_s"] >= TARGET_S]
    if len(slow):
        log("slower than the target: " + ", ".join(f"{r.page} ({r.mode}) {r.median_s:.2f} s" for r in slow.itertuples()))


if __name__ == "__main__":
    main()
