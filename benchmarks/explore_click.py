"""Issue 23's fourth pass: a new query and an asked-before one, each way `diffin top` can answer,
on the same queries in one run (ratios in the same conditions).

    nice -n 10 python benchmarks/explore_click.py PROJECT --run diffin --model sample-cnn [--queries 3] [--burners 2]

Per query (seeded, distinct classes), its kept answer removed before each mode (the run's kept
Hessian batch gradients stay: every mode has them):
  alone      `diffin top -q Q --k 10` in a fresh process, DIFFIN_TWIN=0 (one process: the
             previous pass's code path), DIFFIN_SERVE=0 (the server beside it not asked)
  twin       the same with the process's forked twin (engine/twin.py; the default)
  served     the same while `diffin serve PROJECT --run R` runs (run/serve.py, its twin included):
             the CLI sends the query, prints the kept answer; cpu = the CLI's + the server's and
             its twin's CPU during the call
  again      the served query asked again (its kept printout: run/printed.py); again_npz the same
             with the printout removed (the answer's .npz read with numpy, the previous pass)
``--split``: instead, in this process (the run's context loaded once, as in `diffin serve`), each
query's features.fast_answer (plan, bounds, certified rescoring) with the twin taking every batch
gradient it can (its timing gate off) and then alone, recording this process's CPU seconds
(``parent_cpu_s``), the twin's (``twin_cpu_s``) and the wall: on a loaded machine the wall measures
the machine, while ``parent_cpu_s`` is what the answer's critical path costs where the second core
is free (the twin's half runs beside it), an estimate, labelled so in the CSV (``mode`` split-*).
Each wall time minus the CLI's start-up (`diffin --help`, median of 3, measured in the run). The
printed rows of every mode must be the same (ids and values: the same bits); top-10 overlap and
largest difference against scoring.top_k(exact=True) (all N rows) computed last.
Appends per-query rows to benchmarks/results/explore_query.csv and one row per run to explore.csv
(``bench`` explore_click.py).
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"
K = 10

from explore_query import against_exact, cli, parse, proc_cpu   # noqa: E402


def tree_cpu(pid: int) -> float:
    """CPU seconds of a live process and its live children (the server and its twin)."""
    total = proc_cpu(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                total += proc_cpu(int(child))
            except OSError:
                pass
    return total


def forget(run_dir: Path, qi: int) -> None:
    for sub in ("answers", "topk"):
        for p in (run_dir / sub).glob(f"q{qi}.*"):
            p.unlink()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("project")
    ap.add_argument("--run", default="diffin")
    ap.add_argument("--model", required=True)
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--burners", type=int, default=0)
    ap.add_argument("--warmup", type=float, default=30)
    ap.add_argument("--split", action="store_true", help="in process: CPU of this process and its twin")
    a = ap.parse_args()
    from _load import burners
    with burners(a.burners, a.warmup):
        split(a) if a.split else measure(a)


def pick_queries(project, a) -> list[int]:
    """One query of each of a.queries classes, in a seeded random class order."""
    q = project.query
    rng = np.random.default_rng(a.seed)
    classes = rng.permutation(np.unique(q.y))
    return [int(rng.choice(np.flatnonzero(q.y == c))) for c in classes[: a.queries]]


def split(a) -> None:
    from diffin_core.engine import functional
    from diffin_core.project.folder import Project
    from diffin_core.run import features as F
    project = Project(a.project)
    run_dir = project.run(a.run).path
    picks = pick_queries(project, a)
    ctx = F._context(project, a.run)
    tw = F.with_twin(ctx)
    if tw is None:
        raise SystemExit("no twin here (DIFFIN_TWIN=0, or one CPU)")
    tw.wanted = lambda: tw.alive                                       # every call it can take
    load0 = os.getloadavg()[0]
    recs = []
    for qi in picks:
        rec = {"query": qi}
        for mode in ("twin", "alone"):
            forget(run_dir, qi)
            F._PLANS.clear()
            ctx.twin, functional._TWIN = (tw, tw) if mode == "twin" else (None, None)
            t, c, c2 = time.perf_counter(), time.process_time(), proc_cpu(tw.pid)
            ans = F.fast_answer(project, a.run, [qi], k=K)
            rec[f"{mode}_wall_s"] = time.perf_counter() - t
            rec[f"{mode}_parent_cpu_s"] = time.process_time() - c
            rec[f"{mode}_twin_cpu_s"] = proc_cpu(tw.pid) - c2
            rec[f"{mode}_rows"] = int(ans.exact.sum())
            rec[f"{mode}_infl"] = ans.influence.copy()
        rec["same_bits"] = int(np.array_equal(rec.pop("twin_infl"), rec.pop("alone_infl")))
        recs.append(rec)
        print(f"[explore_click --split] q{qi}: " + ", ".join(f"{k} {v:.3f}" for k, v in rec.items()
                                                            if isinstance(v, float)), flush=True)
    ctx.twin, functional._TWIN = tw, tw
    df = pd.DataFrame(recs)
    df.insert(0, "model", a.model)
    df.insert(1, "condition", "no burners" if not a.burners else f"{a.burners} burners")
    df["mode"] = "split (in process, context loaded)"
    df["load_avg"] = round((load0 + os.getloadavg()[0]) / 2, 1)
    df["bench"] = "explore_click.py --split"
    df["measured"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    per_query = RESULTS / "explore_query.csv"
    old = pd.read_csv(per_query) if per_query.is_file() else pd.DataFrame()
    pd.concat([old, df], ignore_index=True).round(4).to_csv(per_query, index=False)
    print(df.round(3).to_string())


def measure(a) -> None:
    from diffin_core.project.folder import Project
    project = Project(a.project)
    run_dir = project.run(a.run).path
    picks = pick_queries(project, a)
    for qi in picks:
        forget(run_dir, qi)
    load0 = os.getloadavg()[0]
    startup = statistics.median(cli("--help")[0] for _ in range(3))
    top = ("top", a.project, "--run", a.run, "--k", str(K), "-q")
    server = subprocess.Popen([sys.executable, "-m", "diffin_core.cli", "serve", a.project, "--run", a.run,
                               "--idle", "900"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    t_serve = time.perf_counter()
    if not server.stdout.readline().startswith("serving run"):        # once warm
        raise SystemExit("diffin serve did not start (another server on this run?)")
    serve_ready_s = time.perf_counter() - t_serve
    recs = []
    try:
        for qi in picks:
            out = {}
            rec = {"query": qi}
            for mode in ("alone", "twin", "served"):
                forget(run_dir, qi)
                env = {"alone": {"DIFFIN_TWIN": "0", "DIFFIN_SERVE": "0"}, "twin": {"DIFFIN_SERVE": "0"}}.get(mode, {})
                c0 = tree_cpu(server.pid)
                os.environ.update(env)
                try:
                    wall, cpu_s, rss, text = cli(*top, str(qi))
                finally:
                    for v in env:
                        os.environ.pop(v, None)
                if mode == "served":
                    cpu_s += tree_cpu(server.pid) - c0
                rec[f"{mode}_s"] = wall - startup
                rec[f"{mode}_cpu_s"] = cpu_s
                rec[f"{mode}_rss_mb"] = rss
                out[mode] = text
            wall, cpu_s, _, again = cli(*top, str(qi))
            assert "answered before" in again, again[:200]
            rec["again_s"], rec["again_cpu_s"] = wall - startup, cpu_s
            for p in (run_dir / "answers").glob(f"q{qi}.k*.txt"):
                p.unlink()
            wall, cpu_s, _, again2 = cli(*top, str(qi))
            rec["again_npz_s"], rec["again_npz_cpu_s"] = wall - startup, cpu_s
            rows = {m: parse(t) for m, t in out.items()}
            rec["modes_same"] = int(rows["alone"] == rows["twin"] == rows["served"] == parse(again) == parse(again2))
            first = out["twin"].splitlines()[0]
            import re
            m = re.search(r"the (\d+) rows", first)
            rec["rescored_rows"] = int(m.group(1)) if m else np.nan
            rec["out"] = out["twin"]
            recs.append(rec)
            print(f"[explore_click] q{qi}: " + ", ".join(f"{k} {v:.3f}" for k, v in rec.items()
                                                          if isinstance(v, float)), flush=True)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    load1 = os.getloadavg()[0]
    for r in recs:
        against_exact(project, a.run, r, K)
    df = pd.DataFrame(recs)
    condition = "no burners" if not a.burners else f"{a.burners} burners"
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    df.insert(0, "model", a.model)
    df.insert(1, "condition", condition)
    df["load_avg"] = round((load0 + load1) / 2, 1)
    df["bench"] = "explore_click.py"
    df["measured"] = stamp
    df["cli_startup_s"] = startup
    per_query = RESULTS / "explore_query.csv"
    old = pd.read_csv(per_query) if per_query.is_file() else pd.DataFrame()
    pd.concat([old, df], ignore_index=True).round(4).to_csv(per_query, index=False)
    med = {c: df[c].median() for c in df.columns if c.endswith("_s")}
    row = {"model": a.model, "N": len(project.train), "queries": len(df), "condition": condition,
           "new_query_s": med["served_s"], "new_query_cpu_s": med["served_cpu_s"],
           "asked_before_s": med["again_s"], "asked_before_cpu_s": med["again_cpu_s"],
           "new_query_alone_s": med["alone_s"], "new_query_twin_s": med["twin_s"],
           "new_query_alone_cpu_s": med["alone_cpu_s"], "new_query_twin_cpu_s": med["twin_cpu_s"],
           "asked_before_npz_s": med["again_npz_s"], "serve_ready_s": serve_ready_s,
           "twin_ratio": med["alone_s"] / med["twin_s"], "served_ratio": med["alone_s"] / med["served_s"],
           "modes_same": int(df["modes_same"].min()),
           "topk_overlap": df["topk_overlap"].mean(), "topk_overlap_min": df["topk_overlap"].min(),
           "max_abs_diff": df["max_abs_diff"].max(), "rescored_rows": df["rescored_rows"].median(),
           "peak_rss_mb": df[["alone_rss_mb", "twin_rss_mb"]].max().max(), "cli_startup_s": startup,
           "load_avg": round((load0 + load1) / 2, 1), "bench": "explore_click.py", "measured": stamp}
    csv = RESULTS / "explore.csv"
    base = pd.read_csv(csv) if csv.is_file() else pd.DataFrame()
    pd.concat([base, pd.DataFrame([row])], ignore_index=True).to_csv(csv, index=False)
    print(pd.DataFrame([row]).round(3).T.to_string())


if __name__ == "__main__":
    main()
