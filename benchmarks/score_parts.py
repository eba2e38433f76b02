"""Where a full `diffin score` spends its time (issue 19, item 2): the parts of diffin's and
TracIn's full score on the sample project.

    python benchmarks/score_parts.py                    # the sample (4,000 rows), ~10 min on 2 busy cores
    python benchmarks/score_parts.py --n 1000 --repeats 1
    python benchmarks/score_parts.py --side-by-side --configs tracin,diffin --no-feature-pass

Configurations, each in a fresh process (`score(project, method)` as `diffin score` runs it,
one torch thread so that the machine's other load hits every configuration alike):
  tracin            TracIn's full score (influence and self-influence walk; label_issue = its
                    self-influence, no extra pass; no feature store);
  diffin-separate   diffin as before this change: the walk, then label_issue's own pass at the
                    checkpoint k* with the lowest query loss (its plan and a second walk);
  diffin            the label_issue walk folded into the scoring walk (one per-sample gradient
                    per checkpoint for both; methods/diffin.py).
Parts (seconds): plan_s (query side of the influence walk), walk_s (the training-set walk;
with the fold it includes the label walk's extra Ritz work), label_issue_s (k* and the
label plan; the separate pass when not folded), published_s (wall until scores.parquet is
written, start-up of the context included), features_s (the feature pass, run after the scores
are published), total_s. The configurations alternate (ABC ABC ...) and each keeps its fastest
repeat. Writes results/score_parts.csv and .png (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = ("tracin", "diffin-separate", "diffin")


def one(project: str, config: str, run: str) -> dict:
    """One configuration in this process; returns its parts."""
    from diffin_core.engine.threads import configure
    configure(1)
    from diffin_core.methods.diffin import DiffIn
    from diffin_core.run import features as feature_store
    from diffin_core.run.scoring import score
    method = "tracin" if config == "tracin" else "diffin"
    if config == "diffin-separate":
        DiffIn.fold_label_issue = False
    marks = {}

    def progress(done, total, message=""):
        if message.startswith("features") and "features" not in marks:
            marks["features"] = time.perf_counter()
    started = time.perf_counter()
    out = score(project, method, run, progress=progress, features=False)
    published = time.perf_counter()
    meta = json.loads((out / "meta.json").read_text())
    features_s = None
    if method in feature_store.METHODS and os.environ.get("PARTS_FEATURES", "1") == "1":
        from diffin_core.project.folder import Project
        t = time.perf_counter()
        feature_store.build_for_run(Project(project), run)
        features_s = time.perf_counter() - t
    tm = meta.get("timings") or {}
    return {"config": config, "method": method, "train_rows": meta["train_size"], "checkpoints": meta["checkpoints"],
            "plan_s": tm.get("plan_s"), "walk_s": tm.get("scores_s"), "label_issue_s": tm.get("label_issue_s", 0.0),
            "label_issue_checkpoint": tm.get("label_issue_checkpoint"),
            "label_issue_folded": tm.get("label_issue_folded"),
            "published_s": round(published - started, 2),
            "features_s": None if features_s is None else round(features_s, 2),
            "total_s": round(published - started + (features_s or 0.0), 2),
            "cpu_s": round(time.process_time(), 1)}       # this process's CPU seconds: the work, whatever the load


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=0, help="training rows (0: all 4,000 of the sample)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default="score_parts")
    ap.add_argument("--side-by-side", action="store_true",
                    help="run the configurations at the same moment (one process each) instead of in turn")
    ap.add_argument("--one", nargs=3, metavar=("PROJECT", "CONFIG", "RUN"), help=argparse.SUPPRESS)
    ap.add_argument("--no-feature-pass", action="store_true", help="skip timing the feature pass")
    a = ap.parse_args(argv)
    if a.no_feature_pass:
        os.environ["PARTS_FEATURES"] = "0"
    if a.one:
        print("RESULT " + json.dumps(one(*a.one)), flush=True)
        return 0
    from threads import make_project
    import pandas as pd
    tmp = Path(tempfile.mkdtemp(prefix="diffin-parts-"))
    rows = []
    try:
        project = make_project(tmp / "sample", a.n)
        code = tmp / "code"                 # every configuration imports the same code, whatever changes meanwhile
        shutil.copytree(ROOT / "diffin_core", code / "diffin_core", ignore=shutil.ignore_patterns("__pycache__"))
        env = {**os.environ, "PYTHONPATH": str(code) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if a.side_by_side:                 # every configuration at the same moment: the same load for all
            for r in range(a.repeats):
                load0 = os.getloadavg()[0]
                copies = {}
                for c in a.configs.split(","):      # one project copy each: no shared resumable stages
                    copies[c] = tmp / f"sample-{c}-{r}"
                    shutil.copytree(project, copies[c])
                procs = {c: subprocess.Popen([sys.executable, __file__, "--one", str(copies[c]), c, f"{c}-{r}"],
                                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                         for c in a.configs.split(",")}
                outs = {c: p.communicate() for c, p in procs.items()}
                for c, (so, se) in outs.items():
                    line = [ln for ln in so.splitlines() if ln.startswith("RESULT ")]
                    if procs[c].returncode or not line:
                        print(se[-3000:], file=sys.stderr)
                        raise SystemExit(f"{c} failed")
                    row = {**json.loads(line[0][7:]), "repeat": r, "side_by_side": True, "load_start": round(load0, 2),
                           "load_end": round(os.getloadavg()[0], 2)}
                    print(row, flush=True)
                    rows.append(row)
        for r in range(0 if a.side_by_side else a.repeats):
            for config in a.configs.split(","):
                load0 = os.getloadavg()[0]
                res = subprocess.run([sys.executable, __file__, "--one", str(project), config, f"{config}-{r}"],
                                     env=env, capture_output=True, text=True)
                line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
                if res.returncode or not line:
                    print(res.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{config} failed")
                row = {**json.loads(line[0][7:]), "repeat": r, "load_start": round(load0, 2),
                       "load_end": round(os.getloadavg()[0], 2)}
                print(row, flush=True)
                rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    df = pd.DataFrame(rows)
    best = df.loc[df.groupby("config").published_s.idxmin()].set_index("config").reindex(
        [c for c in CONFIGS if c in set(df.config)]).reset_index()
    tr = best[best.config == "tracin"]
    if len(tr):
        for col in ("published_s", "total_s"):
            best[f"{col}_vs_tracin"] = (best[col] / float(tr[col].iloc[0])).round(2)
    best["kept"] = "fastest of %d repeats" % a.repeats
    a.out.mkdir(parents=True, exist_ok=True)
    best.to_csv(a.out / f"{a.name}.csv", index=False)
    df.to_csv(a.out / f"{a.name}_all.csv", index=False)
    plot(best, a.out / f"{a.name}.png")
    print(best.to_string(index=False))
    return 0


def plot(df, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.2))
    parts = [("plan_s", "query plan", "#8ab"), ("walk_s", "training-set walk", "#48c"),
             ("label_issue_s", "label_issue pass", "#c84"), ("features_s", "feature pass (after publishing)", "#aaa")]
    left = [0.0] * len(df)
    for col, label, color in parts:
        vals = df[col].fillna(0).astype(float).tolist()
        ax.barh(range(len(df)), vals, left=left, color=color, label=label)
        left = [a + b for a, b in zip(left, vals)]
    for i, r in enumerate(df.itertuples()):
        ax.annotate(f"published {r.published_s:.0f} s", (left[i], i), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.set_yticks(range(len(df)), df.config)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (one thread)")
    ax.set_xlim(0, max(left) * 1.35)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(f"Full score of the sample project ({int(df.train_rows.iloc[0]):,} rows, "
                 f"{int(df.checkpoints.iloc[0])} checkpoints)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
