"""A new query on a batch-order AdamW run: the query-span store (run/span.py) against the full replay.

    python benchmarks/span_store.py --text PROJECT --run d [--queries 8]    # a scored text sample
    python benchmarks/span_store.py --digits 400 --digits 1200 [--queries 8]

``--text``: a project scored with `diffin score PROJECT -m diffin --run RUN` (its store built by
that command or `diffin features`). ``--digits N``: the digits MLP 64-32-10 trained with AdamW and
recorded with ``rec.track(loader)`` (N = 400: benchmarks/adam_explore.py's project, 50 queries,
52 steps; N = 1200: 10 epochs, 500 queries, a checkpoint every 38 steps, 11 checkpoints, as the
recipe table's runs), built and scored here (`diffin score`, which builds the store).

Per query (seeded; never the pass's own check query), rows of results/span_store.csv:
  new_query_s / new_query_cpu_s  `diffin top P --run R -q Q --k 10` on a query never asked (wall;
                                 the child's user + system CPU), minus the CLI start-up measured
                                 just before it (`diffin --help`; under load the two wall times are
                                 noise of a second or more, the CPU seconds are not);
                                 new_query_wall_total_s / _cpu_total_s the command whole; peak_rss_mb
  asked_before_s / _cpu_s        the same command again (the answer kept with the run)
  exact_cpu_s                    the full replay of the query (scoring.top_k exact=True, in process)
  topk_overlap / _min            top-10 overlap of the store's answer with the full replay (helpful
                                 and harmful sides averaged / the worse side)
  max_error                      max |store - replay| / max |replay|; spearman over all rows
  residual                       the share of the query's gradient outside the store's span
  exact                          whether the store marked its answer exact (residual <= 1e-5)
  topk_overlap_r32               the same store cut to its first 32 directions (what a pass of half
                                 the cost would answer)
One summary row per project (query = "median") carries the store pass (from its meta.json), and
explore.csv gains one row per project (bench = span_store.py).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"


def cli(*args) -> tuple[float, float, float, str]:
    """(wall s, user + system CPU s, peak RSS MB, stdout) of `python -m diffin_core.cli ARGS`."""
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "diffin_core.cli", *args], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"diffin {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", r.stderr).group(1)) for k in ("User", "System"))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) / 1024
    return wall, cpu, rss, r.stdout


def digits_project(root: Path, n_train: int, seed: int = 0) -> Path:
    """The digits AdamW project: adam_explore.make_project (400 rows) or its 1,200-row variant."""
    import adam_explore as ae
    if n_train == 400:
        ae.make_project(root, seed)
        return root
    import torch
    import torch.nn.functional as F_
    from diffin_core.engine.models import MLP
    from diffin_core.project.checkpoints import Recorder
    from diffin_core.tasks.truth import digits_case
    train, query = digits_case(noise=0.1, n_train=n_train, seed=seed)
    (root / "data").mkdir(parents=True)
    np.savez(root / "data/train.npz", x=train.x, y=train.y)
    np.savez(root / "data/query.npz", x=query.x[:500], y=query.y[:500])
    (root / "model.py").write_text(ae.MODEL)
    (root / "diffin.toml").write_text(ae.TOML)
    torch.manual_seed(seed)
    model = MLP(64, (32,), 10)
    opt = torch.optim.AdamW(model.parameters(), lr=ae.LR, weight_decay=ae.WD)
    ds = torch.utils.data.TensorDataset(torch.as_tensor(train.x), torch.as_tensor(train.y))
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    with Recorder(root, model, opt, train_size=len(ds), every=38) as rec:
        for _ in range(10):
            for x, y in rec.track(loader):
                opt.zero_grad()
                F_.cross_entropy(model(x), y).backward()
                opt.step()
                rec.step()
    return root


def measure(name: str, project_dir: Path, run: str, queries: int, seed: int = 0) -> list[dict]:
    from scipy.stats import spearmanr
    from diffin_core.project.folder import Project
    from diffin_core.run import answers, span
    from diffin_core.run.scoring import top_k
    project = Project(project_dir)
    run_dir = project.run(run).path
    meta = json.loads((run_dir / "features" / "meta.json").read_text())
    assert meta["kind"] == "query-span", meta.get("kind")
    store = span.SpanStore.open(run_dir)
    checked = {m["query"] for m in meta["measured"]}
    nq = len(project.query)
    pool = [q for q in range(nq) if q not in checked]
    picks = sorted(np.random.default_rng(seed).choice(pool, min(queries, len(pool)), replace=False).tolist())
    startup = [cli("--help")[:2] for _ in range(3)]
    s_wall, s_cpu = statistics.median(s[0] for s in startup), statistics.median(s[1] for s in startup)
    top_k(project, run, [picks[0]], k=10, exact=True)          # keeps the run's columns; not timed
    rows = []
    for qi in picks:
        for p in (answers.answer_path(run_dir, [qi]), answers.exact_path(run_dir, [qi])):
            p.unlink(missing_ok=True)
        load = os.getloadavg()[0]
        pre_wall, pre_cpu = cli("--help")[:2]            # this query's own start-up, just before it
        wall, cpu, rss, out = cli("top", str(project_dir), "--run", run, "-q", str(qi), "--k", "10")
        wall2, cpu2, _, _ = cli("top", str(project_dir), "--run", run, "-q", str(qi), "--k", "10")
        est = answers.load(run_dir, [qi]).influence
        t = time.process_time()
        top_k(project, run, [qi], k=10, exact=True)
        ex_cpu = time.process_time() - t
        ex = answers.load(run_dir, [qi], exact_only=True).influence
        cut = store.coef[qi, :32] @ np.asarray(store.rows)[:32]
        sides = []
        for sign in (1.0, -1.0):
            sides.append(len(set(np.argsort(-sign * est)[:10]) & set(np.argsort(-sign * ex)[:10])) / 10)
        rows.append({"project": name, "query": qi, "N": project.train.__len__(), "queries_in_set": nq,
                     "rank": meta["rank"], "residual": round(store.residual([qi]), 5),
                     "exact": out.lstrip().startswith("(exact path"),
                     "new_query_s": round(wall - pre_wall, 3), "new_query_cpu_s": round(cpu - pre_cpu, 3),
                     "asked_before_s": round(wall2 - pre_wall, 3), "asked_before_cpu_s": round(cpu2 - pre_cpu, 3),
                     "new_query_wall_total_s": round(wall, 3), "new_query_cpu_total_s": round(cpu, 3),
                     "startup_before_s": round(pre_wall, 3),
                     "peak_rss_mb": round(rss), "cli_startup_s": round(s_wall, 3), "cli_startup_cpu_s": round(s_cpu, 3),
                     "exact_cpu_s": round(ex_cpu, 2), "topk_overlap": float(np.mean(sides)), "topk_overlap_min": min(sides),
                     "max_error": round(float(np.abs(est - ex).max() / np.abs(ex).max()), 6),
                     "spearman": round(float(spearmanr(est, ex)[0]), 4),
                     "topk_overlap_r32": span.top_overlap(cut, ex), "load_1min": round(load, 2)})
        print(rows[-1], flush=True)
    summary = {"project": name, "query": "median", "N": rows[0]["N"], "queries_in_set": nq, "rank": meta["rank"],
               "pass_s": meta["seconds"], "pass_cpu_s": meta["cpu_s"], "store_mb": meta["store_mb"],
               "exact_queries": meta["exact_queries"], "residual_median_all": round(meta["residual_median"], 5),
               "residual_max_all": round(meta["residual_max"], 5), "span_energy": meta["span_energy"]}
    for key in ("new_query_s", "new_query_cpu_s", "asked_before_s", "asked_before_cpu_s", "peak_rss_mb",
                "new_query_wall_total_s", "new_query_cpu_total_s",
                "exact_cpu_s", "topk_overlap", "topk_overlap_min", "max_error", "spearman", "topk_overlap_r32",
                "residual", "load_1min", "cli_startup_s"):
        summary[key] = round(float(statistics.median(r[key] for r in rows)), 4)
    summary["topk_overlap_min"] = min(r["topk_overlap_min"] for r in rows)
    summary["exact"] = all(r["exact"] for r in rows)
    print(summary, flush=True)
    return rows + [summary]


def write(rows: list[dict]) -> None:
    path = RESULTS / "span_store.csv"
    old = []
    if path.is_file():
        with open(path) as f:
            old = [r for r in csv.DictReader(f) if r["project"] not in {r_["project"] for r_ in rows}]
    keys = list(dict.fromkeys(k for r in old + rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(old + rows)
    # explore.csv: one row per project (issue 23's table)
    ex = RESULTS / "explore.csv"
    with open(ex) as f:
        reader = csv.DictReader(f)
        fields, table = list(reader.fieldnames), list(reader)
    for s in (r for r in rows if r["query"] == "median"):
        table = [t for t in table if not (t.get("bench") == "span_store.py" and t["model"] == s["project"])]
        table.append({"model": s["project"], "N": s["N"], "queries": s.get("queries_in_set"),
                      "topk_overlap": s["topk_overlap"], "topk_overlap_min": s["topk_overlap_min"],
                      "store_mb": s["store_mb"], "feature_pass_s": s["pass_s"], "new_query_s": s["new_query_s"],
                      "new_query_cpu_s": s["new_query_cpu_s"], "asked_before_s": s["asked_before_s"],
                      "asked_before_cpu_s": s["asked_before_cpu_s"], "peak_rss_mb": s["peak_rss_mb"],
                      "cli_startup_s": s["cli_startup_s"], "load_avg": s["load_1min"], "bench": "span_store.py",
                      "condition": "quiet" if s["load_1min"] < 3 else f"load {s['load_1min']:.0f}"})
    with open(ex, "w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(table)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", type=Path)
    ap.add_argument("--run", default="d")
    ap.add_argument("--digits", type=int, action="append", default=[])
    ap.add_argument("--queries", type=int, default=8)
    a = ap.parse_args(argv)
    rows = []
    if a.text:
        rows += measure("sms-bert-span", a.text, a.run, a.queries)
    for n in a.digits:
        tmp = Path(tempfile.mkdtemp(prefix="span-digits-"))
        try:
            root = digits_project(tmp / "p", n)
            t = time.perf_counter()
            wall, cpu, rss, _ = cli("score", str(root), "-m", "diffin", "--run", "d")
            print(f"digits {n}: diffin score (with its store) {wall:.1f} s wall, {cpu:.1f} s CPU, {rss:.0f} MB",
                  flush=True)
            got = measure(f"digits-adamw-{n}", root, "d", a.queries)
            got[-1].update({"score_with_store_s": round(wall, 1), "score_with_store_cpu_s": round(cpu, 1)})
            rows += got
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    write(rows)


if __name__ == "__main__":
    main()
