"""Threads under load (issue 19, item 1): the sample project scored quiet and beside two busy
processes, with torch's old default and with the product's setting (diffin_core/threads.py).

    python benchmarks/threads.py                       # ~10 min on 2 busy cores
    python benchmarks/threads.py --n 1000 --timeout 900 --warmup 45

Settings (the same code, the same `diffin score SAMPLE -m diffin` command line, a fresh process
each):
  default   torch's default as it was before threads.py: one thread per usable CPU and OpenMP's
            default wait (torch is imported before diffin_core, so OMP_WAIT_POLICY is unset when
            OpenMP loads; `--threads CPUS`);
  product   what `diffin score` now does: OMP_WAIT_POLICY=PASSIVE, threads from the CPUs and the
            load average (no OMP_NUM_THREADS / DIFFIN_THREADS in the environment).
Conditions: quiet (whatever else runs on the machine: the CSV records the 1-minute load average
at each case's start and end) and loaded (plus two CPU burners, `while True: pass` processes the
benchmark starts, lets run ``--warmup`` seconds so the load average sees them, and stops).
Order: quiet default, quiet product, loaded product, loaded default (ratios are taken within the
run). ``--n`` rows of the sample's training split are scored (the first n; all 4,000 with 0).
A case past ``--timeout`` is stopped and recorded as at least that long.
Writes results/threads.csv and .png (or --out).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _load import burners, code_env, frozen_code, run_case as run_child  # noqa: E402

DEFAULT_LAUNCH = ("import torch, sys; from diffin_core.cli import main; "       # OpenMP loads first
                  "sys.argv[0] = 'diffin'; main(sys.argv[1:])")
PRODUCT_LAUNCH = "import sys; from diffin_core.cli import main; main(sys.argv[1:])"


def make_project(dest: Path, n: int) -> Path:
    from diffin_core.project.sample import SAMPLE_DIR, build_sample_project
    src = SAMPLE_DIR / "mnist"
    if not (src / "diffin.toml").is_file():
        build_sample_project(src)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("runs", "review.sqlite*", "exports", "prebuilt"))
    if n:
        path = dest / "data" / "train.npz"
        with np.load(path) as d:
            arrays = {k: d[k][:n] for k in d.files}
        np.savez(path, **arrays)
        man = dest / "checkpoints" / "manifest.json"      # the subset stands in for the whole split
        meta = json.loads(man.read_text())
        meta["train_size"] = int(n)
        man.write_text(json.dumps(meta, indent=1))
    return dest


CODE = ROOT           # where the scored code is imported from (main: a frozen copy)


def run_case(project: Path, setting: str, condition: str, timeout: float, cpus: int, features: bool = True) -> dict:
    name = f"{setting}-{condition}"
    launch = DEFAULT_LAUNCH if setting == "default" else PRODUCT_LAUNCH
    args = [sys.executable, "-c", launch, "score", str(project), "-m", "diffin", "--run", name]
    if not features:
        args.append("--no-features")
    if setting == "default":
        args += ["--threads", str(cpus)]
    res = run_child(args, code_env(CODE, clean_threads=True), timeout, stdout=subprocess.DEVNULL)
    finished = res["finished"]
    meta_path = project / "runs" / name / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    th = meta.get("threads") or {}
    if not finished and res["returncode"] not in (None, -9):
        print(res["stderr"][-2000:], file=sys.stderr)
    row = {"setting": setting, "condition": condition, "finished": finished,
           "wall_s": res["wall_s"], "cpu_s": res["cpu_s"],
           "threads": th.get("torch_threads", cpus if setting == "default" else None),
           "wait_policy": "PASSIVE" if setting == "product" else "unset (libgomp default)",
           "load_start": res["load_start"], "load_end": res["load_end"],
           "load_seen_by_run": th.get("load_1min"), "train_rows": meta.get("train_size")}
    print(row, flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="training rows scored (0: all 4,000)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per case before it is stopped")
    ap.add_argument("--warmup", type=float, default=45, help="seconds the burners run before the loaded cases")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default="threads")
    ap.add_argument("--no-features", action="store_true", help="score without the feature pass (shorter)")
    a = ap.parse_args(argv)
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))      # the finally below stops the burners
    global CODE
    from diffin_core.engine.threads import usable_cpus
    cpus = usable_cpus()
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="diffin-threads-"))
    try:
        project = make_project(tmp / "sample", a.n)
        CODE = frozen_code(tmp)              # every case imports the same code, whatever changes meanwhile
        feats = not a.no_features
        for setting in ("default", "product"):
            rows.append(run_case(project, setting, "quiet", a.timeout, cpus, feats))
        with burners(2, a.warmup):
            for setting in ("product", "default"):
                rows.append(run_case(project, setting, "loaded", a.timeout, cpus, feats))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import pandas as pd
    df = pd.DataFrame(rows)
    df.insert(0, "cpus", cpus)
    df["feature_pass"] = not a.no_features
    for cond in ("quiet", "loaded"):
        sel = df[df.condition == cond].set_index("setting")
        if {"default", "product"} <= set(sel.index) and bool(sel.loc["product", "finished"]):
            df.loc[df.condition == cond, "speedup_vs_default"] = round(
                float(sel.loc["default", "wall_s"]) / float(sel.loc["product", "wall_s"]), 2)
            # a default stopped at the timeout: its true time is longer, the speedup a lower bound
            df.loc[df.condition == cond, "speedup_is_lower_bound"] = not bool(sel.loc["default", "finished"])
    a.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(a.out / f"{a.name}.csv", index=False)
    plot(df, a.out / f"{a.name}.png")
    print(df.to_string(index=False))
    return 0


def plot(df, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    conds = ["quiet", "loaded"]
    for i, (setting, color) in enumerate((("default", "#c44"), ("product", "#48c"))):
        vals = [float(df[(df.condition == c) & (df.setting == setting)].wall_s.iloc[0]) for c in conds]
        bars = ax.bar(np.arange(2) + (i - 0.5) * 0.38, vals, 0.36, color=color,
                      label={"default": "torch default (2 threads, default wait)",
                             "product": "diffin's setting (passive, threads from load)"}[setting])
        for b, c in zip(bars, conds):
            r = df[(df.condition == c) & (df.setting == setting)].iloc[0]
            ax.annotate(f"{r.wall_s:.0f} s{'' if r.finished else '+ (stopped)'}\n{r.threads} thr",
                        (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    loads = [f"{c}\nload {df[df.condition == c].load_start.min():.1f}-{df[df.condition == c].load_end.max():.1f}"
             for c in conds]
    ax.set_xticks(range(2), loads)
    ax.set_ylabel("wall seconds, diffin score")
    rows = int(df.train_rows.dropna().iloc[0]) if df.train_rows.notna().any() else 0
    ax.set_title(f"Sample project ({rows:,} training rows), {int(df.cpus.iloc[0])} CPUs; loaded = +2 CPU burners",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
