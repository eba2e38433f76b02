"""The feature pass's Hessian views on the score's own context (reusing its Hessian-batch
gradients and HVP probes) against a fresh context (computing them): CPU seconds and bits, on the
sample project (its 4,000 rows scored with diffin first, the feature pass left out).

    python benchmarks/views_reuse.py      # results/views_reuse.csv
"""
from __future__ import annotations

import diffin_core  # noqa: F401  first: OpenMP's passive wait and the thread count before torch loads
import csv
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from diffin_core.run import features as F

ROOT = Path(__file__).resolve().parents[1]


def main():
    from diffin_core.methods import runner
    from diffin_core.methods.diffin import DiffIn
    from diffin_core.project.folder import Project
    from diffin_core.run.context import project_context
    from diffin_core.run.scoring import score
    rank = F.FeatureSettings().view_rank
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "sample"
        shutil.copytree(ROOT / "sample_data" / "mnist", root, ignore=shutil.ignore_patterns("prebuilt"))
        project = Project(root)
        captured = {}
        real = F.build
        F.build = lambda ctx, *a, **kw: captured.setdefault("ctx", ctx)
        load0 = os.getloadavg()[0]
        score(project, "diffin", run="d")
        F.build = real
        scored = captured["ctx"]
        fresh = project_context(project)
        runner.configure(fresh, runner.memory_plan(DiffIn(), fresh, True))
        rows, views = [], {}
        for name, ctx in (("fresh context", fresh), ("score's context", scored)):
            t0 = time.process_time()
            views[name] = F.hessian_views(ctx, rank)
            rows.append({"context": name, "views": len(views[name]), "rank": rank,
                         "cpu_s": round(time.process_time() - t0, 2)})
        a, b = views["fresh context"], views["score's context"]
        same = all(torch.equal(a[k].values, b[k].values) and torch.equal(a[k].vectors, b[k].vectors) for k in a)
        out = ROOT / "benchmarks" / "results" / "views_reuse.csv"
        extra = {"same_bits": same, "load_start": round(load0, 2), "load_end": round(os.getloadavg()[0], 2),
                 "threads": torch.get_num_threads()}
        with open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) + list(extra))
            w.writeheader()
            w.writerows({**r, **extra} for r in rows)
        print(open(out).read())


if __name__ == "__main__":
    main()
