"""Ray check (issue 11): `diffin score --ray` against a local run on the sample MNIST project.

    python benchmarks/ray_check.py                          # tracin + diffin, every GPU/CPU of this machine
    python benchmarks/ray_check.py --methods tracin --cpus 2   # a quick CPU run

Copies the sample project (4,000 training images, 12 checkpoints, SmallCNN) to a temporary
folder, scores it locally and then on a local Ray instance (``ray.init``: it takes every GPU it
finds, so on a CUDA machine the shard tasks run with ``num_gpus=1``), and prints, per method, both
wall times, the Ray run's device/shards/GPUs and the largest score differences. Exit status 1
when a difference passes the tolerance (relative 1e-4 of the column's scale).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="tracin,diffin")
    ap.add_argument("--cpus", type=int, default=None, help="CPUs for the local Ray instance (default: all)")
    args = ap.parse_args(argv)
    import ray
    from diffin_core.run.distributed import score_on_ray
    from diffin_core.project.sample import SAMPLE_DIR, build_sample_project
    from diffin_core.run.scoring import score
    src = SAMPLE_DIR / "mnist"
    if not (src / "diffin.toml").is_file():
        build_sample_project(src)
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        proj = Path(tmp) / "mnist"
        shutil.copytree(src, proj, ignore=shutil.ignore_patterns("runs", "review.sqlite*", "exports"))
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        print(f"ray resources: {ray.cluster_resources()}")
        for method in args.methods.split(","):
            t = time.perf_counter()
            local = pd.read_parquet(score(proj, method, run=f"{method}-local", features=False) / "scores.parquet")
            t_local = time.perf_counter() - t
            t = time.perf_counter()
            run = score_on_ray(proj, method, run=f"{method}-ray")
            t_ray = time.perf_counter() - t
            sharded = pd.read_parquet(run / "scores.parquet")
            meta = json.loads((run / "meta.json").read_text())
            diffs = {}
            for col in ("influence", "self_influence", "label_issue"):
                a, b = local[col].to_numpy(), sharded[col].to_numpy()
                if np.isnan(a).all():
                    continue
                scale = max(float(np.nanmax(np.abs(a))), 1e-30)
                diffs[col] = float(np.nanmax(np.abs(a - b)) / scale)
            ok = all(v <= 1e-4 for v in diffs.values())
            bad += not ok
            print(f"{method}: local {t_local:.1f} s, ray {t_ray:.1f} s on {meta['device']} "
                  f"({meta['ray']['shards']} shards, {meta['ray']['gpus']} GPUs); "
                  f"max |diff| / max |score|: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
                  + ("" if ok else "  <-- above 1e-4"), flush=True)
        ray.shutdown()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
