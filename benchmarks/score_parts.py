"""Where a full `diffin score` spends its time (issue 19, item 2): the parts of diffin's and
TracIn's full score, on the sample project or on a ResNet-18.

    python benchmarks/score_parts.py                    # the sample (4,000 rows), ~10 min on 2 busy cores
    python benchmarks/score_parts.py --n 1000 --repeats 1
    python benchmarks/score_parts.py --side-by-side --configs tracin,diffin --no-feature-pass
    python benchmarks/score_parts.py --model resnet18 --n 1000 --queries 200 --memory-budget 3500MB \
        --side-by-side --configs tracin,diffin --repeats 1 --name score_parts_resnet18

Configurations, each in a fresh process (`score(project, method)` as `diffin score` runs it,
one torch thread so that the machine's other load hits every configuration alike):
  tracin            TracIn's full score (influence and self-influence walk; label_issue = its
                    self-influence, no extra pass; no feature store);
  diffin-separate   diffin as before this change: the walk, then label_issue's own pass at the
                    checkpoint k* with the lowest query loss (its plan and a second walk);
  diffin-svd-basis  diffin with the feature store's gradient bases from the float64 SVD at
                    every checkpoint, as before features.basis_of's Gram route;
  diffin            the label_issue walk folded into the scoring walk (one per-sample gradient
                    per checkpoint for both; methods/diffin.py), then the feature store.
Parts (seconds): plan_s (query side of the influence walk), walk_s (the training-set walk;
with the fold it includes the label walk's extra Ritz work; on a view-less store, the sketch of
each gradient too), label_issue_s (k* and the label plan; the separate pass when not folded),
published_s (wall until scores.parquet is written, start-up of the context included),
features_s (the feature pass after the scores are published: the whole pass with Hessian views,
or a view-less store's completion: query rows and files), sketch_in_walk_s (a view-less store's
sketching inside the walk, features.SketchSink; part of walk_s), total_s, and cpu_s (the
process's CPU seconds: the work, whatever the load). The sample's feature store has Hessian views; a ResNet-18
at --memory-budget 3500MB gets the view-less store fed by the walk's own gradients.
The configurations alternate (ABC ABC ...) and each keeps its fastest repeat; ``--side-by-side``
starts them at the same moment instead, ``--burners N`` runs N busy processes beside (_load.py).
Writes results/<name>.csv and .png (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _load import burners, code_env, frozen_code, load, result_line, run_case  # noqa: E402

CONFIGS = ("tracin", "diffin-separate", "diffin-svd-basis", "diffin")


def one(project: str, config: str, run: str) -> dict:
    """One configuration in this process; returns its parts."""
    from diffin_core.engine.threads import configure
    configure(1)
    from diffin_core.engine.budget import parse_bytes
    from diffin_core.methods import ScoreSettings
    from diffin_core.methods.diffin import DiffIn
    from diffin_core.run.scoring import score
    from scale import peak_rss_mb
    method = "tracin" if config == "tracin" else "diffin"
    if config == "diffin-separate":
        DiffIn.fold_label_issue = False
    if config == "diffin-svd-basis":
        from diffin_core.run import features
        features.GRAM_TOL = 0.0            # fit_basis's float64 SVD at every checkpoint (the Gram route never)
    settings = ScoreSettings(memory_budget=parse_bytes(os.environ.get("PARTS_BUDGET", "0")))
    features = os.environ.get("PARTS_FEATURES", "1") == "1"
    marks = {}
    started = time.perf_counter()
    out = score(project, method, run, settings=settings, features=features,
                on_published=lambda _p: marks.setdefault("published", (time.perf_counter(), time.process_time())))
    done, done_cpu = time.perf_counter(), time.process_time()
    published, published_cpu = marks.get("published", (done, done_cpu))
    meta = json.loads((out / "meta.json").read_text())
    store = out / "features" / "meta.json"
    fmeta = json.loads(store.read_text()) if store.is_file() else {}
    tm = meta.get("timings") or {}
    has_store = bool(fmeta)
    return {"config": config, "method": method, "train_rows": meta["train_size"], "query_rows": meta["query_size"],
            "checkpoints": meta["checkpoints"], "num_params": meta["num_params"],
            "plan_s": tm.get("plan_s"), "walk_s": tm.get("scores_s"), "label_issue_s": tm.get("label_issue_s", 0.0),
            "label_issue_checkpoint": tm.get("label_issue_checkpoint"),
            "label_issue_folded": tm.get("label_issue_folded"),
            "published_s": round(published - started, 2),
            "features_s": round(done - published, 2) if has_store else None,
            "sketch_in_walk_s": fmeta.get("sketch_s") if has_store else None,
            "plan_cpu_s": tm.get("plan_cpu_s"), "walk_cpu_s": tm.get("scores_cpu_s"),
            "sketch_in_walk_cpu_s": fmeta.get("sketch_cpu_s") if has_store else None,
            "published_cpu_s": round(published_cpu, 1),
            "features_cpu_s": round(done_cpu - published_cpu, 1) if has_store else None,
            "store": fmeta.get("kind", "hessian-views") if has_store else None,
            "store_mb": fmeta.get("store_mb"),
            "total_s": round(done - started, 2),
            "grad_chunk": (meta.get("memory") or {}).get("grad_chunk"),
            "budget_mb": round(settings.memory_budget / 2 ** 20) if settings.memory_budget else None,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "cpu_s": round(time.process_time(), 1)}       # this process's CPU seconds: the work, whatever the load


def make(tmp: Path, model: str, n: int, queries: int) -> Path:
    """The project: the sample (its first n rows) or scale.py's synthetic ResNet-18 project."""
    if model == "sample":
        from threads import make_project
        return make_project(tmp / "sample", n)
    from scale import make_project as make_scale
    return make_scale(tmp, model, n or 1000, checkpoints=3, queries=queries)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sample", choices=("sample", "resnet18"))
    ap.add_argument("--n", type=int, default=0, help="training rows (0: all 4,000 of the sample; 1,000 for resnet18)")
    ap.add_argument("--queries", type=int, default=200, help="query rows of the resnet18 project")
    ap.add_argument("--memory-budget", default="0", help="the scoring runs' --memory-budget (0: auto)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default="score_parts")
    ap.add_argument("--side-by-side", action="store_true",
                    help="run the configurations at the same moment (one process each) instead of in turn")
    ap.add_argument("--burners", type=int, default=0, help="busy processes running beside the cases")
    ap.add_argument("--work", type=Path, default=None,
                    help="build the project here and keep it with its runs (default: a temp folder, removed)")
    ap.add_argument("--one", nargs=3, metavar=("PROJECT", "CONFIG", "RUN"), help=argparse.SUPPRESS)
    ap.add_argument("--no-feature-pass", action="store_true", help="score without the feature store")
    a = ap.parse_args(argv)
    if a.one:                    # the driver's settings come through the environment
        print("RESULT " + json.dumps(one(*a.one)), flush=True)
        return 0
    os.environ["PARTS_FEATURES"] = "0" if a.no_feature_pass else "1"
    os.environ["PARTS_BUDGET"] = str(a.memory_budget)
    import pandas as pd
    tmp = a.work or Path(tempfile.mkdtemp(prefix="diffin-parts-"))
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    configs = a.configs.split(",")

    def record(config, res, r, **extra):
        row = result_line(res["stdout"])
        if res["returncode"] or row is None:
            print(res["stderr"][-3000:], file=sys.stderr)
            raise SystemExit(f"{config} failed")
        row = {**row, "repeat": r, **extra, "wall_s": res["wall_s"], "load_start": res["load_start"],
               "load_end": res["load_end"], "burners": a.burners}
        print(row, flush=True)
        rows.append(row)
    try:
        project = make(tmp, a.model, a.n, a.queries)
        env = code_env(frozen_code(tmp))     # every configuration imports the same code, whatever changes meanwhile
        with burners(a.burners, 45.0 if a.burners else 0.0):
            for r in range(a.repeats):
                if a.side_by_side:          # every configuration at the same moment: the same load for all
                    from concurrent.futures import ThreadPoolExecutor
                    copies = {}
                    for c in configs:       # one project copy each: no shared resumable stages
                        copies[c] = tmp / f"{project.name}-{c}-{r}"
                        shutil.copytree(project, copies[c])
                    with ThreadPoolExecutor(len(configs)) as pool:
                        futs = {c: pool.submit(run_case, [sys.executable, __file__, "--one", str(copies[c]), c,
                                                          f"{c}-{r}"], env) for c in configs}
                        results = {c: f.result() for c, f in futs.items()}
                    for c in configs:
                        record(c, results[c], r, side_by_side=True)
                    for c in configs:
                        if a.work is None:
                            shutil.rmtree(copies[c], ignore_errors=True)
                    continue
                for config in configs:
                    record(config, run_case([sys.executable, __file__, "--one", str(project), config,
                                             f"{config}-{r}"], env), r)
    finally:
        if a.work is None:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(tmp / "code", ignore_errors=True)
    df = pd.DataFrame(rows)
    best = df.loc[df.groupby("config").published_s.idxmin()].set_index("config").reindex(
        [c for c in CONFIGS if c in set(df.config)]).reset_index()
    tr = best[best.config == "tracin"]
    if len(tr):
        for col in ("published_s", "total_s", "cpu_s"):
            best[f"{col}_vs_tracin"] = (best[col] / float(tr[col].iloc[0])).round(2)
    best["kept"] = "fastest of %d repeats" % a.repeats
    best.insert(0, "model", a.model)
    a.out.mkdir(parents=True, exist_ok=True)
    best.to_csv(a.out / f"{a.name}.csv", index=False)
    df.to_csv(a.out / f"{a.name}_all.csv", index=False)
    plot(best, a.out / f"{a.name}.png")
    print(best.to_string(index=False), f"\nload now {load()}")
    return 0


def plot(df, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.2))
    cpu = all(c in df and df[c].notna().all() for c in ("plan_cpu_s", "walk_cpu_s", "published_cpu_s"))
    if cpu:                     # CPU seconds (the work, whatever the load) where the rows have them
        df = df.copy()
        df["rest_cpu_s"] = (df.published_cpu_s - df.plan_cpu_s - df.walk_cpu_s).clip(lower=0)
        parts = [("plan_cpu_s", "query plan", "#8ab"), ("walk_cpu_s", "training-set walk (store's sketch included)", "#48c"),
                 ("rest_cpu_s", "the rest until published (start-up, label_issue)", "#c84"),
                 ("features_cpu_s", "feature pass (after publishing)", "#aaa")]
    else:
        parts = [("plan_s", "query plan", "#8ab"), ("walk_s", "training-set walk", "#48c"),
                 ("label_issue_s", "label_issue pass", "#c84"), ("features_s", "feature pass (after publishing)", "#aaa")]
    left = [0.0] * len(df)
    for col, label, color in parts:
        vals = df[col].fillna(0).astype(float).tolist() if col in df else [0.0] * len(df)
        ax.barh(range(len(df)), vals, left=left, color=color, label=label)
        left = [a + b for a, b in zip(left, vals)]
    for i, r in enumerate(df.itertuples()):
        text = (f"CPU {r.cpu_s:.0f} s" + (f" ({r.cpu_s_vs_tracin:.2f}x TracIn)" if hasattr(r, "cpu_s_vs_tracin") else "")
                if cpu else f"published {r.published_s:.0f} s")
        ax.annotate(text, (left[i], i), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(range(len(df)), df.config)
    ax.invert_yaxis()
    ax.set_xlabel("CPU seconds (one thread each, side by side)" if cpu else "seconds (one thread)")
    ax.set_xlim(0, max(left) * 1.35)
    ax.legend(fontsize=7, loc="upper right")
    what = "the sample project" if df.model.iloc[0] == "sample" else df.model.iloc[0]
    ax.set_title(f"Full score of {what} ({int(df.train_rows.iloc[0]):,} rows, "
                 f"{int(df.checkpoints.iloc[0])} checkpoints)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
