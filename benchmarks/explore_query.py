"""A new query and a query asked before, through the real CLI, against `diffin top --exact` (issue 23).

    nice -n 10 python benchmarks/explore_query.py PROJECT --run diffin --model sample-cnn [--queries 5]

PROJECT: a project scored with `diffin score PROJECT --method diffin --run RUN` (its feature store
built by that command or `diffin features`). Per query (seeded, distinct classes where possible):
  new_query_s / new_query_cpu_s   `diffin top PROJECT --run RUN -q Q --k 10` on a query never asked
                                  (wall, and the child's user+system CPU), minus the CLI start-up
                                  (`diffin --help`, measured in the same run, median of 3);
  asked_before_s                  the same command again (the answer kept with the run);
  peak_rss_mb                     the new query's peak resident memory;
  topk_overlap                    |top-10 ∩ exact top-10| / 10 (helpful and harmful, averaged),
                                  exact = scoring.top_k(exact=True) in this process (all N rows),
                                  and max_abs_diff the largest |value - exact value| over the rows
                                  both show;
  rescored_rows                   rows the fast path rescored exactly (its label says how many);
  context_s, plan_s, bounds_s,     where the new query's time went inside `diffin top` (wall and that
  rescore_s (and _cpu_s)          process's CPU, kept with its answer: answers.timings): loading the
                                  run's context, the query's plan (Lanczos at every checkpoint), the
                                  store's bounds, the exact rescoring of the rows not ruled out;
  user_job_s                      a new query as the app's job in a fresh child (rescore_for,
                                  start-up included: what every query cost before the warm child);
  user_job_warm_first_s           the same in the run's warm child, its first call (it starts it);
  rows_left_d4x/16x/64x           an estimate of the rows a sketch 4, 16, 64 times larger would leave to
                                  the exact rescoring (rows_left; sketch_d the store's d)
  ahead_per_min / ahead_cpu_s     planning ahead: the app's background job (scoring.answer_ahead
                                  in the run's warm child, as the page runs it) on ``--ahead`` new
                                  queries of one class: queries answered per wall minute, CPU s each;
  user_job_ahead_s                a new query in the warm child asked while planning ahead runs
                                  there (the page cancels the ahead job first, the child stays):
                                  planning ahead must not slow it; app_worker says whether the
                                  child stayed the same process.
``--ahead-only`` measures planning ahead's throughput alone (the warm child started by an asked-before
query; for a model whose plans take minutes). ``--burners 2`` runs the whole measurement beside two CPU burners (benchmarks/_load.py), the
row's ``condition`` says which. The answers are removed first (each query is new) and the exact
ones are computed last.
Appends one row per model (medians over the queries) to benchmarks/results/explore.csv (its other
rows, written by benchmarks/explore.py, are kept) and per-query rows to explore_query.csv.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
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


def cli(*args) -> tuple[float, float, float, str]:
    """(wall s, child CPU s, peak RSS MB, stdout) of one `python -m diffin_core.cli ...`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "diffin_core.cli", *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise SystemExit(f"diffin {' '.join(args)} failed: {res.stderr.strip()[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, after.ru_maxrss / 1024, res.stdout


def parse(out: str) -> tuple[list[int], list[float], list[int], list[float]]:
    """(helpful ids, values, harmful ids, values) from `diffin top`'s printout."""
    blocks = out.split("most harmful")
    def rows(text):
        ids, vals = [], []
        for ln in text.splitlines():
            parts = ln.split()
            if len(parts) == 5 and parts[0].lstrip("-").isdigit():
                ids.append(int(parts[0]))
                vals.append(float(parts[4]))
        return ids, vals
    h, hv = rows(blocks[0])
    m, mv = rows(blocks[1])
    return h, hv, m, mv


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("project")
    ap.add_argument("--run", default="diffin")
    ap.add_argument("--model", required=True, help="the row's model label (sample-cnn, mnist-4k, ...)")
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ahead", type=int, default=6, help="queries the planning-ahead job answers (0: skip)")
    ap.add_argument("--ahead-only", action="store_true",
                    help="measure only planning ahead's throughput (the warm child started by an asked-before "
                         "query, then the ahead job): for models whose every plan takes minutes (a ResNet-18)")
    ap.add_argument("--burners", type=int, default=0, help="CPU burners beside the measurement")
    ap.add_argument("--condition", default=None,
                    help="the rows' condition label (default: quiet, or N burners); rows of the same model "
                         "and condition are replaced")
    ap.add_argument("--warmup", type=float, default=30, help="seconds the burners run first")
    a = ap.parse_args()
    from _load import burners
    with burners(a.burners, a.warmup):
        measure(a)


def against_exact(project, run: str, r: dict, k: int) -> dict:
    """Fill r's topk_overlap and max_abs_diff from its printout r["out"] (popped) against
    `diffin top --exact`'s top-k for r["query"]; returns the exact values by sample id."""
    from diffin_core.run.scoring import top_k
    h, hv, m_, mv = parse(r.pop("out"))
    eh, em = top_k(project, run, [r["query"]], k=k, exact=True)
    ex = dict(zip(eh["sample_id"], eh["influence"])) | dict(zip(em["sample_id"], em["influence"]))
    r["topk_overlap"] = (len(set(h) & set(eh["sample_id"])) + len(set(m_) & set(em["sample_id"]))) / (2 * k)
    both = [(v, ex[i]) for i, v in zip(h + m_, hv + mv) if i in ex]
    r["max_abs_diff"] = max(abs(v - e) for v, e in both) if both else np.nan
    return ex


def app_job(jm, target: str, args: tuple, kwargs: dict, warm: str | None = None) -> float:
    """Wall seconds of one app job (a spawned child, or the run's warm child, as the page submits
    it) to its end."""
    t = time.perf_counter()
    job = jm.submit_child("bench", target, args, kwargs, label="bench", with_progress=False, warm=warm)
    info = jm.wait(job, timeout=1800)
    if info is None or info.status != "done":
        raise SystemExit(f"{target} did not finish: {getattr(info, 'status', None)} {getattr(info, 'error', '')}")
    return time.perf_counter() - t


def proc_cpu(pid: int) -> float:
    """user + system CPU seconds of a live process (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def planning_ahead(project, run: str, picks: list[int], n: int) -> dict:
    """The app's jobs: a new query in a fresh child (what every query cost before the warm child),
    then, in the run's warm child as the page runs them now, a first query (starting it), planning
    ahead (throughput) and a new query asked while planning ahead runs (the page cancels it first):
    planning ahead must not slow it."""
    from diffin_core.run import features as F
    from diffin_core.workspace import usercode
    from diffin_core.workspace.jobs import JobManager
    root, jm = str(project.root), JobManager()
    y = np.asarray(project.query.y)
    cls = int(y[picks[0]])
    fresh = [int(i) for i in np.flatnonzero(y == cls) if int(i) not in picks]
    ahead, user = fresh[:n], fresh[n:n + 3]
    key = F.warm_key(project, run)
    alone = app_job(jm, "diffin_core.run.scoring:rescore_for", (root, run, [user[0]]), {})
    first = app_job(jm, "diffin_core.run.scoring:rescore_for", (root, run, [user[1]]), {}, warm=key)
    pid = usercode.warm_pids()[key]
    cpu0 = proc_cpu(pid)
    wall = app_job(jm, "diffin_core.run.scoring:answer_ahead", (root, run, ahead), {}, warm=key)
    cpu = proc_cpu(pid) - cpu0
    rest = [int(i) for i in np.flatnonzero(y != cls) if int(i) not in picks][:F.AHEAD]   # an ahead job still busy
    job = jm.submit_child("plan-ahead", "diffin_core.run.scoring:answer_ahead", (root, run, rest), {},
                          label="ahead", with_progress=True, warm=key)
    time.sleep(3.0)
    jm.cancel(job)                                                     # what the page does first
    beside = app_job(jm, "diffin_core.run.scoring:rescore_for", (root, run, [user[2]]), {}, warm=key)
    same = usercode.warm_pids().get(key) == pid
    usercode.close_warm(key)
    return {"ahead_queries": len(ahead), "ahead_per_min": 60 * len(ahead) / wall, "ahead_cpu_s": cpu / len(ahead),
            "user_job_s": alone, "user_job_warm_first_s": first, "user_job_ahead_s": beside,
            "app_worker": "warm" if same else "warm (restarted)"}


def ahead_only(project, run: str, picks: list[int], n: int) -> dict:
    """Planning ahead's throughput alone: the run's warm child started by a query asked before
    (its kept answer read: the context loaded, no plan made), then the app's ahead job on ``n`` new
    queries of the first query's class there, as the page runs it: queries answered per wall
    minute and the child's CPU seconds each."""
    from diffin_core.run import features as F
    from diffin_core.workspace import usercode
    from diffin_core.workspace.jobs import JobManager
    root, jm = str(project.root), JobManager()
    y = np.asarray(project.query.y)
    cls = int(y[picks[0]])
    ahead = [int(i) for i in np.flatnonzero(y == cls) if int(i) not in picks][:n]
    key = F.warm_key(project, run)
    first = app_job(jm, "diffin_core.run.scoring:rescore_for", (root, run, [picks[0]]), {}, warm=key)
    pid = usercode.warm_pids()[key]
    cpu0 = proc_cpu(pid)
    wall = app_job(jm, "diffin_core.run.scoring:answer_ahead", (root, run, ahead), {}, warm=key)
    cpu = proc_cpu(pid) - cpu0
    usercode.close_warm(key)
    return {"ahead_queries": len(ahead), "ahead_per_min": 60 * len(ahead) / wall, "ahead_cpu_s": cpu / len(ahead),
            "ahead_warm_start_s": first, "app_worker": "warm"}


SCALES = (4, 16, 64)      # sketch dimensions d' = d x these, for rows_left


def rows_left(run_dir, qi: int, store) -> dict:
    """An estimate of the rows a larger per-checkpoint sketch (d' = d x SCALES) would still leave to
    the exact rescoring of a certified answer: the kept bounds (answers.bounds: the store's
    estimate and sigma at d), sigma shrunk by sqrt(d' / d) (a CountSketch's variance is 1 / d), and
    every row's value taken as the answer's (exact where rescored, else the estimate): the rows within
    CERTIFIED_Z sigma of the k-th exact value of either side. {} without kept bounds."""
    from diffin_core.run import answers
    from diffin_core.run.features import CERTIFIED_K, CERTIFIED_Z
    kept, ans = answers.bounds(run_dir, [qi]), answers.load(run_dir, [qi])
    if kept is None or ans is None or ans.exact.sum() < 2 * CERTIFIED_K:
        return {}
    est, sigma = kept
    v = np.where(ans.exact, ans.influence, est)
    known = np.sort(ans.influence[ans.exact])
    hi, lo = known[-CERTIFIED_K], known[CERTIFIED_K - 1]
    out = {"sketch_d": int(getattr(store, "checkpoint_dim", 0) or 0)}
    for f in SCALES:
        s = CERTIFIED_Z * sigma / np.sqrt(f)
        out[f"rows_left_d{f}x"] = int(((v + s >= hi) | (v - s <= lo)).sum())
    return out


STEPS = [f"{s}_{u}" for s in ("context", "plan", "bounds", "rescore") for u in ("s", "cpu_s")]   # features._Clock


def measure(a) -> None:
    from diffin_core.project.folder import Project
    from diffin_core.run import answers
    from diffin_core.run.features import FeatureStore
    project = Project(a.project)
    run_dir = project.run(a.run).path
    for sub in ("answers", "topk"):
        shutil.rmtree(run_dir / sub, ignore_errors=True)
    store = FeatureStore.open(project, a.run)
    q = project.query
    rng = np.random.default_rng(a.seed)
    classes = rng.permutation(np.unique(q.y))
    picks = [int(rng.choice(np.flatnonzero(q.y == c))) for c in classes[: a.queries]]
    startup = statistics.median(cli("--help")[0] for _ in range(3))
    recs = []
    for qi in picks:
        wall, cpu, rss, out = cli("top", a.project, "--run", a.run, "-q", str(qi), "--k", str(K))
        wall2, cpu2, _, out2 = cli("top", a.project, "--run", a.run, "-q", str(qi), "--k", str(K))
        assert "answered before" in out2 or "(cached)" in out2, out2[:300]   # a run without a store: the exact path, kept
        label = out.splitlines()[0]
        m = re.search(r"the (\d+) rows", label)
        steps = {k: v for k, v in answers.timings(run_dir, [qi]).items() if k != "rescored_rows"}
        steps.update(rows_left(run_dir, qi, store))
        recs.append({"query": qi, "new_query_s": wall - startup, "new_query_cpu_s": cpu,
                     "asked_before_s": wall2 - startup, "asked_before_cpu_s": cpu2, "peak_rss_mb": rss,
                     "rescored_rows": int(m.group(1)) if m else np.nan, "path": label.strip("()"), "out": out,
                     **steps})
        print(f"[explore_query] q{qi}: new {wall - startup:.2f} s (cpu {cpu:.2f}), again {wall2 - startup:.3f} s",
              flush=True)
    load = os.getloadavg()[0]
    ahead = ((ahead_only if a.ahead_only else planning_ahead)(project, a.run, picks, a.ahead) if a.ahead else {})
    for r in recs:                        # the exact path last (it would answer the query otherwise)
        ex = against_exact(project, a.run, r, K)
        r["max_abs_value"] = max(abs(e) for e in ex.values())
    df = pd.DataFrame(recs)
    condition = a.condition or ("quiet" if not a.burners else f"{a.burners} burners")
    df.insert(0, "model", a.model)
    df.insert(1, "condition", condition)
    per_query = RESULTS / "explore_query.csv"
    old = pd.read_csv(per_query) if per_query.is_file() else pd.DataFrame()
    if len(old) and "condition" not in old:
        old["condition"] = "quiet"
    old = old[(old["model"] != a.model) | (old["condition"] != condition)] if len(old) else old
    pd.concat([old, df], ignore_index=True).round(4).to_csv(per_query, index=False)
    size = sum(p.stat().st_size for p in (run_dir / "features").rglob("*") if p.is_file()) / 2 ** 20
    row = {"model": a.model, "N": len(project.train), "d": store.dim if store else np.nan,
           "checkpoint_dim": getattr(store, "checkpoint_dim", 0) if store else 0,
           "queries": len(df), "new_query_s": df["new_query_s"].median(),
           "new_query_cpu_s": df["new_query_cpu_s"].median(), "asked_before_s": df["asked_before_s"].median(),
           "asked_before_cpu_s": df["asked_before_cpu_s"].median(),
           "topk_overlap": df["topk_overlap"].mean(), "topk_overlap_min": df["topk_overlap"].min(),
           "max_abs_diff": df["max_abs_diff"].max(), "rescored_rows": df["rescored_rows"].median(),
           "store_mb": round(size, 1), "peak_rss_mb": df["peak_rss_mb"].max(), "cli_startup_s": startup,
           **{c: df[c].median() for c in STEPS + ["sketch_d"] + [f"rows_left_d{f}x" for f in SCALES] if c in df},
           **ahead, "condition": condition, "load_avg": load, "bench": "explore_query.py"}
    csv = RESULTS / "explore.csv"
    base = pd.read_csv(csv) if csv.is_file() else pd.DataFrame()
    if len(base) and "bench" in base:
        cond = base["condition"].fillna("quiet") if "condition" in base else "quiet"
        base = base[~((base["bench"] == "explore_query.py") & (base["model"] == a.model) & (cond == condition))]
    pd.concat([base, pd.DataFrame([row])], ignore_index=True).to_csv(csv, index=False)
    print(pd.DataFrame([row]).round(3).T.to_string())


if __name__ == "__main__":
    main()
