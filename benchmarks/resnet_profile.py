"""What a full score of a ResNet-18 spends its CPU on (issue 19, item 2): the unit costs behind
score_parts_resnet18.csv, in CPU seconds of one thread (the work, whatever the machine's load).

    python benchmarks/resnet_profile.py PROJECT [--repeats 3]

PROJECT: scale.py's synthetic ResNet-18 project (make_project(..., "resnet18", n)). Measured at the
last checkpoint, on the run's chunk sizes for --memory-budget 3500MB (5 rows of per-sample
gradients, the 32-row Hessian batch the budget's cut gives; budget.hessian_batch_for):
  per_sample_grad     vmap(grad) of a 5-row chunk, per row (the walk's unit; every method pays it
                      once per row and checkpoint)
  per_sample_loop     the same gradients one row at a time (a plain loop), per row
  sketch              the view-less store's CountSketch of those gradients, per row (SketchSink;
                      Projector's column blocks)
  sketch_unblocked    the same sketch as one scatter over all P columns with its (B, P) signed
                      temporary (the projection before the blocks; what ``sketch`` replaced)
  batch_grad_32       one gradient of the 32-row Hessian batch
  hvp_fd_32 / hvp_exact_32   one Hessian-vector product on that batch, finite differences (one
                      extra gradient) and forward-over-reverse; fd_rel_error = |fd - exact| / |exact|
                      (hvp="auto" takes exact products when it is above 1%)
  hvp_double_backward_32 / hvp_forward_ad_32   the same exact product by reverse-over-reverse
                      (autograd.grad of the gradient with create_graph) and by autograd's forward-mode
                      dual numbers through the backward (is another exact product cheaper?)
  hvp_retained_graph_32 / hvp_retained_32   the exact product as a Lanczos view now makes it
                      (FunctionalModel.hvp_retained): a view's first product (the batch's gradient
                      graph built, then one backward through it), and each later one (that backward)
  jvp                 one directional derivative per row (the influence-only path, a rescored row)
  sink_call           the view-less store's whole share of the walk per row (features.SketchSink
                      on those 5 gradients: the sketch, the exact norms, the rows written to disk)
  ritz_apart / ritz_blocked   the Ritz walk's products of one 5-row chunk over 3 checkpoints
                      (per chunk): at step i, g @ w, Y_j^T g for j <= i, Y_i^T g_F and <g_F, g>,
                      made apart (each product reads the gradients and its view once) and in one
                      pass over blocks of the parameters (ritz_self.blocked_products, what the walk
                      runs on a large model on the CPU); views of 15 random Ritz vectors (the
                      timing depends on the shapes only), the chunk's gradients as g_F and g_k
The median of --repeats. ``--units a,b`` measures only those and merges them into the CSV's other
rows. Writes results/resnet_profile.csv.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("project")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "resnet_profile.csv")
    ap.add_argument("--units", default="", help="comma list of units (default: all)")
    a = ap.parse_args(argv)
    from diffin_core.engine.threads import configure
    configure(1)
    import pandas as pd
    import torch
    from diffin_core.engine.projector import Projector
    from diffin_core.methods import ScoreSettings
    from diffin_core.project.folder import Project
    from diffin_core.run.context import project_context
    project = Project(a.project)
    ctx = project_context(project, ScoreSettings())
    k = ctx.m - 1
    fm, theta = ctx.fm_at(k), ctx.thetas[k]
    x5, y5 = ctx.tensors(project.train.x[:5], project.train.y[:5])
    x32, y32 = ctx.tensors(project.train.x[:32], project.train.y[:32])
    proj = Projector(ctx.fm.num_params, 4096, 1)
    v = torch.randn_like(theta)
    g0 = fm.batch_grad(theta, x32, y32)
    g5 = fm.per_sample_grads(theta, x5, y5)

    def double_backward():                   # reverse-over-reverse: the exact product another way
        with torch.enable_grad():
            t = theta.detach().requires_grad_(True)
            g, = torch.autograd.grad(fm.mean_loss(t, x32, y32), t, create_graph=True)
            return torch.autograd.grad(g, t, grad_outputs=v)[0]

    def forward_ad():                        # autograd's forward-mode dual numbers through the backward
        import torch.autograd.forward_ad as fwad
        with torch.enable_grad():
            t = theta.detach().requires_grad_(True)
            with fwad.dual_level():
                g, = torch.autograd.grad(fm.mean_loss(fwad.make_dual(t, v), x32, y32), t)
                return fwad.unpack_dual(g).tangent

    kept = fm.hvp_retained(theta, x32, y32)
    kept(v)                                  # the graph, built once (what every later product reuses)

    def loop():
        return torch.stack([fm.batch_grad(theta, x5[i:i + 1], y5[i:i + 1]) for i in range(5)])
    units = {"per_sample_grad": (lambda: fm.per_sample_grads(theta, x5, y5), 5),
             "per_sample_loop": (loop, 5),
             "sketch": (lambda: proj(g5), 5),
             "sketch_unblocked": (lambda: torch.zeros(5, proj.dim).index_add_(1, proj.bucket, g5 * proj.sign), 5),
             "batch_grad_32": (lambda: fm.batch_grad(theta, x32, y32), 1),
             "hvp_fd_32": (lambda: fm.hvp_fd(theta, x32, y32, v, base_grad=g0), 1),
             "hvp_exact_32": (lambda: fm.hvp_exact(theta, x32, y32, v), 1),
             "hvp_double_backward_32": (lambda: double_backward(), 1),
             "hvp_forward_ad_32": (lambda: forward_ad(), 1),
             "hvp_retained_graph_32": (lambda: fm.hvp_retained(theta, x32, y32)(v), 1),   # build + one product
             "hvp_retained_32": (lambda: kept(v), 1),
             "jvp": (lambda: fm.directional(theta, x5, y5, v), 5)}
    from diffin_core.methods import ritz_self
    from diffin_core.methods.first_order import rowdot
    gen = torch.Generator().manual_seed(0)
    ritz = [(torch.randn(ctx.fm.num_params, generator=gen), torch.randn(ctx.fm.num_params, 15, generator=gen))
            for _ in range(3)] if not a.units or "ritz" in a.units else []
    gk = [g5] + [g5.clone() for _ in ritz[1:]]

    def ritz_apart():
        for i, (w, y) in enumerate(ritz):
            g = gk[i]
            g @ w, [g @ yy for _, yy in ritz[:i + 1]], (gk[0] @ y if i else None), rowdot(gk[0], g)

    def ritz_blocked():
        for i, (w, _) in enumerate(ritz):
            ritz_self.blocked_products(gk[i], gk[0], w, [yy for _, yy in ritz[:i + 1]])
    units["ritz_apart"] = (ritz_apart, 1)
    units["ritz_blocked"] = (ritz_blocked, 1)
    if not a.units or "sink_call" in a.units:
        import tempfile
        from diffin_core.methods import runner
        from diffin_core.methods.diffin import DiffIn
        from diffin_core.run.features import SketchSink
        runner.configure(ctx, runner.memory_plan(DiffIn(), ctx, True))
        sink = SketchSink.create(ctx, Path(tempfile.mkdtemp(prefix="diffin-prof-")))

        def sink_call():
            sink.rows = slice(0, 5)
            sink(k, g5)
        units["sink_call"] = (sink_call, 5)
    if a.units:
        units = {u: units[u] for u in a.units.split(",")}
    rows = []
    for name, (fn, per) in units.items():
        fn()                                              # warm
        times = []
        for _ in range(a.repeats):
            c = time.process_time()
            fn()
            times.append((time.process_time() - c) / per)
        rows.append({"unit": name, "cpu_s": round(statistics.median(times), 4), "per": "row" if per > 1 else "call",
                     "repeats": a.repeats})
        print(rows[-1], flush=True)
    fd, ex = fm.hvp_fd(theta, x32, y32, v, base_grad=g0), fm.hvp_exact(theta, x32, y32, v)
    err = float(torch.linalg.vector_norm(fd - ex) / torch.linalg.vector_norm(ex))
    if a.units and a.out.is_file():          # the other units' rows are kept
        old = pd.read_csv(a.out)
        rows = old[~old.unit.isin([r["unit"] for r in rows])].drop(
            columns=["num_params", "fd_rel_error", "load_end"], errors="ignore").to_dict("records") + rows
    df = pd.DataFrame(rows)
    df["num_params"] = ctx.fm.num_params
    df["fd_rel_error"] = round(err, 3)
    df["load_end"] = round(os.getloadavg()[0], 2)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(a.out, index=False)
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
