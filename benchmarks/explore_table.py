"""Issue 23's "must show" table: one row per model kind in benchmarks/results/explore.csv, from
one run of benchmarks/explore_query.py per kind, in turn (the same code, the same machine).

    python benchmarks/explore_table.py \\
        --case sample-cnn=SAMPLE:diffin --case mnist-4k=MNIST4K:diffin \\
        --case digits-adamw-1200=DIGITS:d --case sms-bert=TEXT:d \\
        --case resnet18-1k=RESNET:diffin-0 --heavy resnet18-1k [--queries 3] [--ahead 4] [--burners 2]

Each ``--case LABEL=PROJECT:RUN`` is a scored diffin run with its store (`diffin score`; the
ResNet-18 with `--memory-budget 3500MB`, whose store is then the view-less sketch built within
that budget). Per case, explore_query.py measures, through the real CLI on queries never asked:
a new query's `diffin top -q Q --k 10` (wall beyond the CLI's start-up, CPU, peak RSS), the same
query asked again, top-10 overlap and largest value difference against `diffin top --exact`'s
(scoring.top_k(exact=True): every row computed afresh), the store's size on disk, and planning
ahead (the app's answer_ahead job in the run's warm child: queries per wall minute). A case named
in ``--heavy`` (a model whose every plan takes minutes) is measured on one query and planning
ahead's throughput alone (explore_query.py --ahead-only) on ``--heavy-ahead`` queries.

explore_query.py replaces its own rows (model, condition) in explore.csv and explore_query.csv;
this script then writes the table's columns for the cases it ran to results/explore_kinds.csv
(with the load average before and after each case, and the issue's targets beside the figures)
and results/explore_kinds.png.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# issue 23's targets (seconds beyond the CLI's start-up), where it names one for the kind
NEW_TARGET = {"sample-cnn": 2.0, "digits-adamw-1200": 2.0, "digits-adamw-400": 2.0, "resnet18-1k": 20.0}
AGAIN_TARGET = 0.2
OVERLAP_TARGET = 0.95
COLUMNS = ["model", "N", "condition", "load_before", "load_after", "new_query_s", "new_query_cpu_s",
           "new_query_target_s", "asked_before_s", "asked_before_cpu_s", "topk_overlap", "topk_overlap_min",
           "max_abs_diff", "rescored_rows", "ahead_queries", "ahead_per_min", "ahead_cpu_s", "store_mb",
           "peak_rss_mb", "cli_startup_s", "path", "queries", "wall_s"]


def parse_case(text: str) -> tuple[str, str, str]:
    label, _, rest = text.partition("=")
    project, _, run = rest.rpartition(":")
    if not label or not project or not run:
        raise SystemExit(f"--case {text!r}: expected LABEL=PROJECT:RUN")
    return label, project, run


def condition(a) -> str:
    """The rows' condition: "shared load" (no burners: the shared machine's own load, recorded beside
    each row) or "shared load + N burners". Other labels' rows (explore_query.py's "quiet", explore_click.py's
    "no burners", quoted in the docs) are left as they are."""
    return "shared load" if not a.burners else f"shared load + {a.burners} burners"


def run_case(label: str, project: str, run: str, a) -> dict:
    heavy = label in a.heavy
    cmd = [sys.executable, str(ROOT / "benchmarks" / "explore_query.py"), project, "--run", run, "--model", label,
           "--queries", str(1 if heavy else a.queries), "--seed", str(a.seed), "--burners", str(a.burners),
           "--warmup", str(a.warmup), "--condition", condition(a)]
    cmd += ["--ahead", str(a.heavy_ahead), "--ahead-only"] if heavy else ["--ahead", str(a.ahead)]
    load0, t = os.getloadavg()[0], time.perf_counter()
    print(f"[explore_table] {label}: {' '.join(cmd[1:])} (load {load0:.2f})", flush=True)
    res = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode:
        raise SystemExit(f"[explore_table] {label} failed (exit {res.returncode})")
    return {"model": label, "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2),
            "wall_s": round(time.perf_counter() - t, 1)}


def table(done: list[dict], condition: str) -> pd.DataFrame:
    """The table's rows: explore.csv's fresh explore_query.py rows of these cases, with the path
    label of the first query (explore_query.csv) and the load around each case."""
    base = pd.read_csv(RESULTS / "explore.csv")
    per = pd.read_csv(RESULTS / "explore_query.csv")
    rows = []
    for d in done:
        cond = base["condition"].fillna("quiet")
        hit = base[(base["bench"] == "explore_query.py") & (base["model"] == d["model"]) & (cond == condition)]
        r = hit.iloc[-1].to_dict()
        paths = per[(per["model"] == d["model"]) & (per["condition"] == condition)]["path"]
        r["path"] = paths.iloc[0] if len(paths) else ""
        r["new_query_target_s"] = NEW_TARGET.get(d["model"], np.nan)
        rows.append({**r, **d})
    df = pd.DataFrame(rows)
    return df[[c for c in COLUMNS if c in df]]


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=110)
    y = np.arange(len(df))
    names = [f"{m}\n(load {a:.1f}-{b:.1f})" for m, a, b in zip(df["model"], df["load_before"], df["load_after"])]
    axes[0].barh(y - 0.2, df["new_query_s"], 0.4, label="new query, wall beyond start-up", color="#48c")
    axes[0].barh(y + 0.2, df["new_query_cpu_s"], 0.4, label="new query, CPU", color="#8ab")
    for i, t in enumerate(df["new_query_target_s"]):
        if np.isfinite(t):
            axes[0].plot([t, t], [i - 0.45, i + 0.45], color="#c44e52", lw=2, label="target" if i == 0 else None)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("seconds")
    axes[0].set_title("a new query: `diffin top -q Q --k 10`", fontsize=9)
    axes[1].barh(y - 0.2, df["asked_before_s"].clip(lower=0), 0.4, color="#6a6", label="wall beyond start-up")
    axes[1].barh(y + 0.2, df["asked_before_cpu_s"], 0.4, color="#9c9", label="CPU (start-up included)")
    axes[1].axvline(AGAIN_TARGET, color="#c44e52", lw=1, ls="--", label="target (wall beyond start-up)")
    axes[1].set_xlabel("seconds")
    axes[1].set_title("the same query asked again", fontsize=9)
    axes[1].legend(fontsize=6)
    axes[2].barh(y, df["ahead_per_min"], 0.5, color="#c84")
    lo = float(np.nanmin(df["ahead_per_min"])) / 2 if df["ahead_per_min"].notna().any() else 0.1
    for i, (o, s) in enumerate(zip(df["topk_overlap"], df["store_mb"])):
        axes[2].text(lo, i + 0.35, f"top-10 overlap with --exact {o:.2f}, store {s:.1f} MB", va="center", fontsize=7)
    axes[2].set_xscale("log")
    axes[2].set_xlim(left=lo / 1.5)
    axes[2].set_xlabel("queries per wall minute")
    axes[2].set_title("planning ahead (the app's warm worker)", fontsize=9)
    for ax in axes:
        ax.set_yticks(y)
        ax.set_yticklabels(names if ax is axes[0] else [""] * len(y), fontsize=7)
        ax.invert_yaxis()
    axes[0].legend(fontsize=6)
    fig.suptitle("Explore per model kind (2 shared CPU cores, one torch thread; no burners, "
                 "the machine's own load beside each name)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", default=[], help="LABEL=PROJECT:RUN (repeat)")
    ap.add_argument("--heavy", action="append", default=[], help="a case's label measured on one query")
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--ahead", type=int, default=4)
    ap.add_argument("--heavy-ahead", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--burners", type=int, default=0)
    ap.add_argument("--warmup", type=float, default=30)
    ap.add_argument("--only-table", action="store_true", help="rewrite explore_kinds.csv/png from the CSVs only")
    a = ap.parse_args(argv)
    cases = [parse_case(c) for c in a.case]
    done = []
    for label, project, run in cases:
        done.append({"model": label} if a.only_table else run_case(label, project, run, a))
    out = RESULTS / "explore_kinds.csv"
    df = table(done, condition(a))
    if a.only_table and out.is_file():           # keep the loads measured when the cases ran
        old = pd.read_csv(out).set_index("model")
        for col in ("load_before", "load_after", "wall_s"):
            df[col] = [old.at[m, col] if m in old.index else np.nan for m in df["model"]]
    if out.is_file() and not a.only_table:       # other kinds' rows measured in earlier runs stay
        old = pd.read_csv(out)
        df = pd.concat([old[~old["model"].isin(df["model"])], df], ignore_index=True)
    df.to_csv(out, index=False)
    plot(df, out.with_suffix(".png"))
    print(df.round(3).T.to_string())


if __name__ == "__main__":
    main()
