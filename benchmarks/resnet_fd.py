"""Why a ResNet-18's plan takes exact Hessian-vector products (issue 19): finite differences
against the exact product, by step, forward and central, in float32 and in float64.

    python benchmarks/resnet_fd.py PROJECT [--eps 1e-4,1e-3,1e-2,1e-1]

PROJECT: scale.py's synthetic ResNet-18 project. At the last checkpoint, on the plan's 32-row
Hessian batch (ctx.sample_batch(32, k), as --memory-budget 3500MB cuts it), along the query
set's mean gradient (the plan's first Lanczos direction): H v by forward-over-reverse in float64
is the reference; each finite difference (step h with ||h v|| = eps, the engine's convention) is
reported as |fd - ref| / |ref|. hvp="auto" takes exact products when the float32 forward
difference at eps = 1e-3 (the engine's) is more than 1% off. Writes results/resnet_fd.csv.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("project")
    ap.add_argument("--eps", default="1e-4,1e-3,1e-2,1e-1")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "resnet_fd.csv")
    a = ap.parse_args(argv)
    from diffin_core.engine.threads import configure
    configure(1)
    import pandas as pd
    from diffin_core.methods import ScoreSettings
    from diffin_core.project.folder import Project
    from diffin_core.run.context import project_context
    project = Project(a.project)
    ctx = project_context(project, ScoreSettings())
    k = ctx.m - 1
    fm, theta = ctx.fm_at(k), ctx.thetas[k]
    x, y = ctx.sample_batch(32, k)
    qx, qy = ctx.tensors(project.query.x, project.query.y)
    v = fm.batch_grad(theta, qx, qy)
    fm64 = copy.copy(fm)
    fm64.model = copy.deepcopy(fm.model).double()
    fm64.buffers = {n: (b.double() if b.is_floating_point() else b) for n, b in fm.buffers.items()}
    th64, x64, v64 = theta.double(), x.double(), v.double()
    ref = fm64.hvp_exact(th64, x64, y, v64)
    ex32 = fm.hvp_exact(theta, x, y, v)
    rel = lambda a_: float((a_.double() - ref).norm() / ref.norm())      # noqa: E731
    rows = [{"method": "exact", "dtype": "float32", "eps": None, "rel_error": rel(ex32)}]
    g = {"float32": (fm, theta, x, v), "float64": (fm64, th64, x64, v64)}
    base = {d: f.batch_grad(t, xx, y) for d, (f, t, xx, _) in g.items()}
    for eps in (float(e) for e in a.eps.split(",")):
        for d, (f, t, xx, vv) in g.items():
            h = eps / vv.norm()
            plus = f.batch_grad(t + h * vv, xx, y)
            rows.append({"method": "forward", "dtype": d, "eps": eps, "rel_error": rel((plus - base[d]) / h)})
            minus = f.batch_grad(t - h * vv, xx, y)
            rows.append({"method": "central", "dtype": d, "eps": eps, "rel_error": rel((plus - minus) / (2 * h))})
            print(rows[-2], rows[-1], flush=True)
    df = pd.DataFrame(rows)
    df["num_params"] = fm.num_params
    df["hv_over_v"] = round(float(ref.norm() / v64.norm()), 4)
    df["load_end"] = round(os.getloadavg()[0], 2)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    df.round({"rel_error": 5}).to_csv(a.out, index=False)
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
