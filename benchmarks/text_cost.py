"""Cost of `diffin score` on the text sample (SMS spam, project/sample_text.py) on this machine.

    python benchmarks/text_cost.py [--project DIR] [--methods diffin,tracin,loss]

Each method runs as its own `python -m diffin_core.cli score DIR -m METHOD` under
`/usr/bin/time -v` (wall time, peak RSS of the process), beside plain inference: the final
checkpoint's forward pass over the training and query texts in eval mode (this script's
`--infer`, also under time -v). The 1-minute load average before each run is recorded: on a
shared machine the wall times scale with it. Writes benchmarks/results/text_cost.csv.

    python benchmarks/text_cost.py --before /path/to/old/checkout --queries 3

``--before DIR``: every `diffin` command also runs with the code in DIR (a checkout of an earlier
commit: `git worktree add --detach DIR COMMIT`), right after the current code's, so the two are
measured in the same conditions; the rows' ``code`` says which ("before <commit>" / "after
<commit>"). ``--queries N``: then N new queries on the current code's diffin run, each
`diffin top DIR --run cost-diffin -q Q --k 10` on a query never asked (its answers removed
first), with each code in turn; ``topk_equal`` / ``max_rel_diff``: the current code's answer
(runs/<run>/topk/qQ.npy, all N rows) against the earlier code's for the same query.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "text_cost.csv"


def infer(project_dir: str) -> None:
    """Plain inference: the final checkpoint's logits for every training and query text."""
    import torch
    from diffin_core.project.checkpoints import complete_state, read_state
    from diffin_core.project.folder import Project
    p = Project(project_dir)
    model = p.build_model().eval()
    state, _ = read_state(Path(p.manifest.path).parent / p.manifest.checkpoints[-1].file)
    model.load_state_dict(complete_state(model, state))
    n = 0
    with torch.no_grad():
        for split in (p.train, p.query):
            for _, x, _ in split.iter_chunks(256):
                model(torch.as_tensor(x))
                n += len(x)
    print(f"inferred {n} samples")


def timed(cmd: list[str], root: Path = ROOT) -> dict:
    load = os.getloadavg()[0]
    t0 = time.monotonic()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=root, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(root)})
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", r.stderr).group(1)) for k in ("User", "System"))
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_mb": round(rss / 1024),
            "load_1min_before": round(load, 1), "load_1min_after": round(os.getloadavg()[0], 1)}


def parts(project: Path, run: str) -> dict:
    """Where a run's time went (meta.json, wall seconds): the query plan, the training-set walk,
    label_issue's share, the feature store's own pass and its kind."""
    import json
    run_dir = project / "runs" / run
    meta = json.loads((run_dir / "meta.json").read_text())
    t = meta.get("timings") or {}
    out = {"plan_s": t.get("plan_s"), "walk_s": t.get("scores_s"), "label_issue_s": t.get("label_issue_s"),
           "published_s": meta.get("seconds"), "hvp": json.dumps((meta.get("hvp") or {}).get("lanczos_views")),
           "adam_check": (meta.get("adam_check") or {}).get("passed") if isinstance(meta.get("adam_check"), dict) else None}
    store = run_dir / "features" / "meta.json"
    if store.is_file():
        f = json.loads(store.read_text())
        out.update(features_s=f.get("seconds"), features_cpu_s=f.get("cpu_s"), features_views_s=f.get("views_s"),
                   store_kind=f.get("kind", "views"), store_mb=f.get("store_mb"))
    return out


def commit(root: Path) -> str:
    r = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h"], capture_output=True, text=True)
    return r.stdout.strip() or "?"


def new_queries(project: Path, run: str, codes: list, n: int, seed: int, n_train: int) -> list[dict]:
    """``n`` new queries on ``run`` with each code: `diffin top` timed, answers removed before each,
    the current code's answer compared with the other's."""
    import numpy as np
    from diffin_core.project.folder import Project
    q = Project(project).query
    rng = np.random.default_rng(seed)
    picks = [int(i) for i in rng.choice(len(q), n, replace=False)]
    run_dir = project / "runs" / run
    out = []
    for qi in picks:
        answers = {}
        for code, root in codes:
            for sub in ("answers", "topk"):
                shutil.rmtree(run_dir / sub, ignore_errors=True)
            row = {"what": f"diffin top --run {run} -q {qi} --k 10 (new query)", "code": code, "query_index": qi,
                   **timed([sys.executable, "-m", "diffin_core.cli", "top", str(project), "--run", run, "-q", str(qi),
                            "--k", "10"], root), "samples": n_train}
            answers[code] = np.load(run_dir / "topk" / f"q{qi}.npy")
            out.append(row)
        if len(codes) > 1:
            new, old = answers[codes[0][0]], answers[codes[1][0]]
            same = (set(np.argsort(-new, kind="stable")[:10]) == set(np.argsort(-old, kind="stable")[:10])
                    and set(np.argsort(new, kind="stable")[:10]) == set(np.argsort(old, kind="stable")[:10]))
            for row in out[-len(codes):]:
                row.update(topk_equal=same, max_rel_diff=float(np.abs(new - old).max() / np.abs(old).max()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", default=str(ROOT / "sample_data" / "sms-spam"))
    ap.add_argument("--methods", default="loss,tracin,diffin",
                    help="comma-separated; METHOD+FLAG+FLAG adds CLI flags (diffin+--no-features)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--before", help="a checkout of earlier code: each diffin command runs with it too")
    ap.add_argument("--queries", type=int, default=0, help="new queries timed on the diffin run (each code)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--infer", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.infer:
        return infer(a.infer)
    project = Path(a.project)
    if not (project / "diffin.toml").is_file():
        from diffin_core.project.sample_text import build_text_sample
        build_text_sample(project)
    from diffin_core.project.folder import Project
    p = Project(project)
    n_train, n_query = len(p.train), len(p.query)
    rows = [{"what": "plain inference (final checkpoint, train + query)",
             **timed([sys.executable, __file__, "--infer", str(project)]), "samples": n_train + n_query}]
    codes = [("after " + commit(ROOT), ROOT)] + ([("before " + commit(Path(a.before)), Path(a.before))]
                                                  if a.before else [])
    for m in a.methods.split(","):
        name, *flags = m.split("+")                      # diffin+--no-features: a variant with CLI flags
        for code, root in codes if name == "diffin" else codes[:1]:
            run = f"cost-{name}{'-' + str(len(rows)) if flags else ''}{'-before' if root != ROOT else ''}"
            rows.append({"what": f"diffin score -m {name} {' '.join(flags)}".strip(), "code": code,
                         **timed([sys.executable, "-m", "diffin_core.cli", "score", str(project), "-m", name, "--run",
                                  run, *flags], root),
                         "samples": n_train, **parts(project, run)})
    if a.queries:
        rows += new_queries(project, "cost-diffin", codes, a.queries, a.seed, n_train)
    for r in rows:
        r["samples_per_s"] = round(r["samples"] / r["wall_s"], 1)
        r["samples_per_cpu_s"] = round(r["samples"] / r["cpu_s"], 1)
        r.update(train=n_train, query=n_query, checkpoints=len(p.manifest.checkpoints), cpus=os.cpu_count(),
                 threads=os.environ.get("OMP_NUM_THREADS", ""))
        print(r)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    print(out)


if __name__ == "__main__":
    main()
