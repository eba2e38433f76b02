"""Regenerate every benchmark table and plot (fixed seeds, 3 seeds per setting, mean +- std).

    python benchmarks/run.py            # full suite, about 30 min on 2 CPU cores
    python benchmarks/run.py --quick    # smoke version (a few minutes), into benchmarks/results/quick
    diffin bench [--quick]              # the same

Writes benchmarks/results/{cleaning,deletion,coreset,ground_truth}.csv (columns method,
setting, metric, mean, std over the seeds) and a PNG per table. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

TASKS = ("cleaning", "deletion", "coreset", "ground_truth")


def _init_worker():
    import torch
    torch.set_num_threads(1)


def _run_job(job):
    import _bench
    kind, kwargs = job
    t = time.time()
    rows, extra = getattr(_bench, kind)(**kwargs)
    return kind, kwargs, rows, extra, time.time() - t


def build_jobs(cfg, seeds, only):
    """Seed-major order (every table gets seed 0 first), heaviest job of each seed first."""
    jobs = []
    want = set(only or TASKS)
    for seed in seeds:
        if want & {"cleaning", "deletion"}:
            jobs.append(("cleaning_job", dict(noise=0.1, seed=seed, cfg=cfg, deletion="deletion" in want)))
        if "ground_truth" in want:
            for name in ("mnist-cnn", "digits-mlp", "digits-logreg"):
                jobs.append(("gt_job", dict(name=name, seed=seed, cfg=cfg)))
        if "coreset" in want:
            jobs.append(("coreset_job", dict(seed=seed, cfg=cfg)))
        if "cleaning" in want:
            jobs.append(("cleaning_job", dict(noise=0.2, seed=seed, cfg=cfg, deletion=False)))
    return jobs


def aggregate(rows):
    import pandas as pd
    df = pd.DataFrame(rows)
    out = {}
    for task, part in df.groupby("task"):
        g = part.groupby(["method", "setting", "metric"], sort=False)["value"]
        table = g.agg(mean="mean", std=lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0).reset_index()
        out[task] = table
    return out


def markdown(table, metric, settings=None, digits=3):
    """A method x setting markdown table of 'mean ± std' for one metric."""
    part = table[table.metric == metric]
    if settings is not None:
        part = part[part.setting.isin(settings)]
    cols = list(dict.fromkeys(part.setting))
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for m in dict.fromkeys(part.method):
        cells = []
        for c in cols:
            r = part[(part.method == m) & (part.setting == c)]
            cells.append(f"{r['mean'].iloc[0]:.{digits}f} ± {r['std'].iloc[0]:.{digits}f}" if len(r) else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(tables, extras, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def bars(ax, table, metric, title):
        part = table[table.metric == metric]
        settings = list(dict.fromkeys(part.setting))
        methods = list(dict.fromkeys(part.method))
        w = 0.8 / max(len(methods), 1)
        for i, m in enumerate(methods):
            vals = [part[(part.method == m) & (part.setting == s)] for s in settings]
            mean = [v["mean"].iloc[0] if len(v) else np.nan for v in vals]
            std = [v["std"].iloc[0] if len(v) else 0 for v in vals]
            ax.bar(np.arange(len(settings)) + i * w, mean, w, yerr=std, label=m, capsize=2)
        ax.set_xticks(np.arange(len(settings)) + 0.4 - w / 2)
        ax.set_xticklabels(settings, fontsize=8)
        ax.set_title(title, fontsize=10)
        lo = np.nanmin(part["mean"] - part["std"]) if len(part) else 0
        hi = np.nanmax(part["mean"] + part["std"]) if len(part) else 1
        ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))

    def save(fig, path):
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    if "cleaning" in tables:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        bars(axes[0], tables["cleaning"], "test_acc", "cleaning: test accuracy after dropping the top k%")
        bars(axes[1], tables["cleaning"], "flipped_found", "cleaning: fraction of flipped labels found")
        axes[0].legend(fontsize=7)
        save(fig, out / "cleaning.png")
    if "deletion" in tables:
        t = tables["deletion"]
        t = t[t.setting.str.startswith("k=")]
        fig, axes = plt.subplots(1, 3, figsize=(16, 4))
        bars(axes[0], t, "query_loss", "deletion: query loss after removing k most harmful")
        bars(axes[1], t, "test_loss", "deletion: held-out test loss")
        axes[0].legend(fontsize=7)
        pairs = extras.get("loo_pairs", {})
        for m, (p, a) in pairs.items():
            axes[2].scatter(a, p, s=10, label=m)
        if pairs:
            axes[2].axhline(0, lw=0.5, c="k")
            axes[2].axvline(0, lw=0.5, c="k")
            axes[2].set_xlabel("actual query-loss change (trajectory LOO)")
            axes[2].set_ylabel("predicted (influence)")
            axes[2].set_yscale("symlog", linthresh=1e-5)
            axes[2].set_title("single samples", fontsize=10)
            axes[2].legend(fontsize=7)
        save(fig, out / "deletion.png")
    if "coreset" in tables:
        t = tables["coreset"]
        fig, ax = plt.subplots(figsize=(8, 4))
        bars(ax, t[t.setting.str.startswith("keep")], "test_acc", "coreset: test accuracy (balanced, retrained)")
        ax.legend(fontsize=7)
        save(fig, out / "coreset.png")
    if "ground_truth" in tables:
        t = tables["ground_truth"]
        t = t[t.metric == "spearman"]
        models = list(dict.fromkeys(s.split(",")[0] for s in t.setting))
        fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
        for ax, mod in zip(axes[0], models):
            part = t[t.setting.str.startswith(mod + ",")]
            for m in dict.fromkeys(part.method):
                r = part[part.method == m]
                counts = [int(s.split(",")[1].split()[0]) for s in r.setting]
                ax.errorbar(counts, r["mean"], yerr=r["std"], marker="o", label=m, capsize=2)
            ax.set_title(f"{mod}: Spearman vs trajectory LOO", fontsize=10)
            ax.set_xlabel("checkpoints")
            ax.axhline(0, lw=0.5, c="k")
        axes[0][0].legend(fontsize=7)
        save(fig, out / "ground_truth.png")


def write_results(rows, extras, out: Path):
    """Aggregate the rows so far into the CSV tables and plots (called after every job)."""
    tables = aggregate(rows)
    if "deletion" in tables and "loo_pairs" in extras:    # pooled over the seeds
        from scipy.stats import pearsonr, spearmanr
        import pandas as pd
        add = []
        for m, (p, act) in extras["loo_pairs"].items():
            s = f"single samples (LOO, {len(p)} pooled)"
            add += [dict(method=m, setting=s, metric="pearson", mean=pearsonr(p, act)[0], std=0.0),
                    dict(method=m, setting=s, metric="spearman", mean=spearmanr(p, act)[0], std=0.0)]
        tables["deletion"] = pd.concat([tables["deletion"], pd.DataFrame(add)], ignore_index=True)
    for task, table in tables.items():
        table.to_csv(out / f"{task}.csv", index=False)
    plots(tables, extras, out)
    return tables


def main(argv=None) -> int:
    import _bench
    ap = argparse.ArgumentParser(description="Regenerate the Diff-In benchmark report.")
    ap.add_argument("--quick", action="store_true", help="smoke version: 1 seed, small sizes")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results[/quick])")
    ap.add_argument("--workers", type=int, default=2, help="parallel worker processes (1 torch thread each)")
    ap.add_argument("--only", nargs="*", choices=TASKS, help="run only these tables")
    a = ap.parse_args(argv)
    cfg = _bench.QUICK if a.quick else _bench.FULL
    seeds = [0] if a.quick else [0, 1, 2]
    out = Path(a.out) if a.out else HERE / "results" / ("quick" if a.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    jobs = build_jobs(cfg, seeds, a.only)
    started = time.time()
    rows, extras = [], {}
    print(f"{len(jobs)} jobs on {a.workers} worker(s); results -> {out}", flush=True)
    ctx = mp.get_context("spawn")
    with ctx.Pool(a.workers, initializer=_bench.init_worker, maxtasksperchild=1) as pool:
        for kind, kwargs, r, extra, secs in pool.imap_unordered(_bench.run_job, jobs):
            rows += r
            for key, val in extra.items():
                for m, (p, act) in val.items():
                    old = extras.setdefault(key, {}).get(m)
                    import numpy as np
                    extras[key][m] = (p, act) if old is None else (np.concatenate([old[0], p]), np.concatenate([old[1], act]))
            desc = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k != "cfg")
            print(f"[{time.time() - started:7.1f}s] {kind}({desc}) done in {secs:.1f}s", flush=True)
            write_results(rows, extras, out)
    tables = write_results(rows, extras, out)
    print(f"\nfinished in {time.time() - started:.0f}s (seeds {seeds}, {'quick' if a.quick else 'full'})\n")
    show = {"cleaning": ["test_acc", "flipped_found", "auroc"],
            "deletion": ["query_loss", "test_loss", "test_acc", "spearman", "pearson"],
            "coreset": ["test_acc"], "ground_truth": ["spearman", "pearson"]}
    for task in TASKS:
        if task in tables:
            for metric in show[task]:
                print(f"### {task}: {metric}\n\n{markdown(tables[task], metric)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
