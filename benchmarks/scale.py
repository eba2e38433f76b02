"""Scale benchmark (issue 11): throughput and peak memory of `diffin score` at real sizes.

    python benchmarks/scale.py --device cpu                      # the CPU rows (small CNN + ResNet-18)
    python benchmarks/scale.py --device cuda --cases gpu         # the GPU row (ResNet-18, N = 100k)
    python benchmarks/scale.py --cases cnn --sizes 10000,100000  # a subset

Every case runs in a fresh subprocess (VmHWM is that case's peak resident memory) on a
real project folder: synthetic 3x32x32 images stored as a memory-mapped uint8 x.npy (never
loaded whole; the data source streams it), labels y.npy, 200 query samples, checkpoints
written by the Recorder from a few SGD steps (momentum 0.9, weight decay 5e-4).

Paths (the ``path`` column):
  score      ``scoring.score`` as ``diffin score --no-features`` runs it: influence +
             self-influence + label_issue (the feature pass, features.py, is measured in
             benchmarks/explore.py)
  influence  ``scoring.query_influence``: influence on one query set only (jvp, the top-k path)
  inference  a plain forward pass over the same checkpoints and training set, same batch size

Writes benchmarks/results/scale.csv (N, params, method, path, device, samples_per_s,
peak_rss_mb, wall_s, peak_gpu_mb, batch, budget_mb, threads), scale.png and scale.md (the
table, also written into docs/scale.md between its scale-table markers). Rows of other
devices already in scale.csv are kept (``--fresh`` drops them).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
COLUMNS = ["N", "params", "method", "path", "device", "samples_per_s", "peak_rss_mb", "wall_s",
           "peak_gpu_mb", "batch", "budget_mb", "threads", "model", "checkpoints", "hessian_batch", "plan_s"]

MODEL_PY = '''from diffin_core.engine.models import SmallCNN, build_resnet18


def build():
    return {factory}
'''
FACTORIES = {"cnn": "SmallCNN(3, 10, 32)", "resnet18": "build_resnet18((3, 32, 32), 10)"}

TOML = """[model]
factory = "model.py:build"

[data]
train = "data/train"
query = "data/query.npz"
kind = "image"
image_shape = [3, 32, 32]
num_classes = 10

[checkpoints]
manifest = "checkpoints/manifest.json"
"""


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB): VmHWM from /proc (Linux), which starts afresh at
    exec. ru_maxrss does not: Linux carries the parent's peak across fork + exec, so every case
    used to report at least the (large) driver's RSS."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the project ----------------------------------------------------------------------------------
def make_images(folder: Path, n: int, seed: int = 0, block: int = 50_000) -> None:
    """x.npy (n, 3, 32, 32) uint8 written block by block through a memmap, y.npy (n,) int64."""
    import numpy as np
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "y.npy").is_file() and len(np.load(folder / "y.npy", mmap_mode="r")) == n:
        return
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 256, (10, 3, 32, 32)).astype(np.float32)
    x = np.lib.format.open_memmap(folder / "x.tmp.npy", mode="w+", dtype=np.uint8, shape=(n, 3, 32, 32))
    y = rng.integers(0, 10, n)
    for a in range(0, n, block):
        b = min(n, a + block)
        noise = rng.integers(0, 256, (b - a, 3, 32, 32)).astype(np.float32)
        x[a:b] = (0.5 * noise + 0.5 * patterns[y[a:b]]).astype(np.uint8)
    x.flush()
    del x
    os.replace(folder / "x.tmp.npy", folder / "x.npy")
    np.save(folder / "y.npy", y)


def make_project(root: Path, model: str, n: int, checkpoints: int = 3, seed: int = 0, queries: int = 200) -> Path:
    """A project folder with n memory-mapped training images, ``queries`` query samples (drawn from
    the training rows) and ``checkpoints`` checkpoints."""
    import numpy as np
    import torch
    from diffin_core.project.checkpoints import Recorder
    root = root / (f"{model}-{n}" if queries == 200 else f"{model}-{n}-q{queries}")
    if (root / "checkpoints" / "manifest.json").is_file():
        return root
    make_images(root / "data" / "train", n, seed)
    x = np.load(root / "data" / "train" / "x.npy", mmap_mode="r")
    y = np.load(root / "data" / "train" / "y.npy")
    rng = np.random.default_rng(seed + 1)
    qi = rng.choice(n, min(queries, n), replace=False)
    np.savez(root / "data" / "query.npz", x=np.asarray(x[np.sort(qi)]), y=y[np.sort(qi)])
    (root / "model.py").write_text(MODEL_PY.format(factory=FACTORIES[model]))
    (root / "diffin.toml").write_text(TOML)
    sys.path.insert(0, str(root))
    from diffin_core.engine.models import SmallCNN, build_resnet18  # noqa: F401  (the factory's names)
    torch.manual_seed(seed)
    net = eval(FACTORIES[model])
    # the ResNet's few steps are taken in eval mode (BatchNorm statistics frozen, as the engine
    # evaluates every checkpoint) on batches of the query rows with a small lr, so that its query
    # loss falls from checkpoint to checkpoint as a trained model's does: otherwise it rose, and
    # Diff-In's label issue then pays a second self-influence pass up to the lowest-loss checkpoint
    lr, every = (0.005, 2) if model == "resnet18" else (0.05, 2)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    batch = 32
    net.train(model != "resnet18")
    with Recorder(root, net, opt, train_size=n, every=every) as rec:
        for s in range(every * (checkpoints - 1)):
            pool = np.sort(qi) if model == "resnet18" else np.arange(min(n, 4096))   # the ResNet: on the query rows
            idx = np.sort(rng.choice(pool, min(batch, len(pool)), replace=False))
            xb = torch.as_tensor(np.asarray(x[idx], dtype=np.float32) / 255.0)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xb), torch.as_tensor(y[idx])).backward()
            opt.step()
            rec.step()
    return root


# --- one case, in a fresh process -----------------------------------------------------------------
def child(case: dict) -> dict:
    import numpy as np
    import torch
    torch.set_num_threads(case["threads"])
    from diffin_core.methods import ScoreSettings
    from diffin_core.project.folder import Project
    from diffin_core.run.scoring import query_influence, score
    project = Project(case["project"])
    s = ScoreSettings(device=case["device"], batch_size=case["batch"], hessian_batch=case["hessian_batch"])
    if hasattr(s, "memory_budget"):
        s.memory_budget = int(case["budget_mb"]) * 2**20
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    meta = {}
    if case["path"] == "score":
        out = score(project, case["method"], run=f"bench-{case['method']}", settings=s, features=False)
        meta = json.loads((out / "meta.json").read_text())
    elif case["path"] == "influence":
        query_influence(project, case["method"], np.arange(min(10, len(project.query))), s)
    else:
        inference(project, s)
    wall = time.perf_counter() - started
    if case["device"] == "cuda":
        torch.cuda.synchronize()
    n = len(project.train)
    model = project.build_model()
    return {"N": n, "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "method": case["method"] if case["path"] != "inference" else "forward",
            "path": case["path"], "device": case["device"], "samples_per_s": round(n / wall, 2),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "wall_s": round(wall, 2),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else 0.0,
            "batch": meta.get("memory", {}).get("grad_chunk", case["batch"]) if meta else case["batch"],
            "budget_mb": case["budget_mb"], "threads": case["threads"], "model": case["model"],
            "checkpoints": len(project.manifest.checkpoints), "hessian_batch": case["hessian_batch"],
            "plan_s": (meta.get("timings") or {}).get("plan_s", 0.0) if meta else 0.0}


def inference(project, settings) -> None:
    """Forward passes over the whole training set at every checkpoint (the throughput ceiling)."""
    import torch
    from diffin_core.project.checkpoints import read_state
    from diffin_core.methods import pick_device
    device = pick_device(settings.device)
    model = project.build_model().to(device).eval()
    train = project.train
    for c in project.manifest.checkpoints:
        state, _ = read_state(project.manifest_path.parent / c.file)
        model.load_state_dict(state, strict=False)
        with torch.no_grad():
            for _, x, y in train.iter_chunks(settings.batch_size):
                model(torch.as_tensor(x, device=device))


# --- the driver -----------------------------------------------------------------------------------
def cases(args) -> list[dict]:
    out = []
    base = {"device": args.device, "threads": args.threads, "budget_mb": args.budget_mb,
            "hessian_batch": args.hessian_batch}
    if "cnn" in args.cases:
        for n in args.sizes:
            for path in args.cnn_paths:
                if path == "score" and n > args.score_max_n:
                    continue
                out.append({**base, "model": "cnn", "n": n, "method": "diffin", "path": path, "batch": args.batch})
    if "resnet" in args.cases:
        for method, path in (("diffin", "score"), ("tracin", "score"), ("diffin", "inference")):
            out.append({**base, "model": "resnet18", "n": args.resnet_n, "method": method, "path": path,
                        "batch": args.resnet_batch})
    if "gpu" in args.cases:           # first: they hardly compete with the CPU cases for cores
        gpu = [{**base, "device": "cuda", "threads": 1, "budget_mb": args.gpu_budget_mb, "model": "resnet18",
                "n": args.gpu_n, "method": method, "path": path, "batch": args.gpu_batch}
               for method, path in (run.split(":") for run in args.gpu_runs.split(","))]
    else:
        gpu = []
    # most telling first (a --deadline cuts the tail): ResNet scores, then the biggest N; the GPU
    # cases keep the order --gpu-runs gives them
    rank = {"score": 0, "influence": 0, "inference": 1}
    return gpu + sorted(out, key=lambda c: (c["device"] != "cuda", c["path"] == "inference" and c["model"] == "resnet18",
                                      c["model"] != "resnet18", rank[c["path"]], -c["n"]))


DEADLINE = [float("inf")]           # time.time() after which no case starts and running ones stop


def run_case(case: dict, work: Path, timeout: float) -> dict | None:
    timeout = min(timeout, DEADLINE[0] - time.time())
    if timeout <= 5:
        print(f"[scale] {case['model']} N={case['n']} {case['method']} {case['path']}: skipped (--deadline)", flush=True)
        return None
    case = {**case, "project": case.get("project") or str(make_project(work, case["model"], case["n"]))}
    env = {**os.environ, "OMP_NUM_THREADS": str(case["threads"]), "MKL_NUM_THREADS": str(case["threads"])}
    cmd = [sys.executable, __file__, "--child", json.dumps(case)]
    print(f"[scale] {case['model']} N={case['n']} {case['method']} {case['path']} {case['device']} started", flush=True)
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"[scale] {case['model']} N={case['n']} {case['method']} {case['path']}: timed out after {timeout:.0f} s",
              flush=True)
        return None
    if res.returncode != 0:
        print(f"[scale] {case['model']} N={case['n']} {case['method']} {case['path']} failed:\n{res.stderr[-2000:]}",
              flush=True)
        return None
    row = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"[scale] {case['model']} N={case['n']} {case['method']} {case['path']} {case['device']}: "
          f"{row['samples_per_s']} samples/s, peak RSS {row['peak_rss_mb']} MB, {row['wall_s']} s", flush=True)
    return row


def write_outputs(rows: list[dict], out: Path, fresh: bool) -> None:
    import pandas as pd
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "scale.csv"
    df = pd.DataFrame(rows, columns=COLUMNS)
    if csv.is_file() and not fresh:
        old = pd.read_csv(csv)
        key = ["N", "model", "method", "path", "device"]
        old = old[~old.set_index(key).index.isin(df.set_index(key).index)]
        df = pd.concat([old, df], ignore_index=True)
    df = df.sort_values(["device", "model", "N", "path", "method"]).reset_index(drop=True)
    df.to_csv(csv, index=False)
    (out / "scale.md").write_text(table(df))
    plot(df, out / "scale.png")
    readme = ROOT / "docs" / "scale.md"
    if out.resolve() == RESULTS.resolve() and readme.is_file():      # the docs/scale.md table, between its markers
        text = readme.read_text()
        begin, end = "<!-- scale-table:begin -->", "<!-- scale-table:end -->"
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            readme.write_text(head + begin + "\n" + table(df) + rest[rest.index(end):])


def table(df) -> str:
    """The docs/scale.md table, with diffin's throughput as a fraction of plain inference's."""
    lines = ["| model | params | N | device | method | path | samples/s | peak RSS MB | wall s | query side s | vs inference |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in df.iterrows():
        ref = df[(df.model == r.model) & (df.N == r.N) & (df.device == r.device) & (df.path == "inference")]
        ratio = f"{r.samples_per_s / ref.samples_per_s.iloc[0]:.3f}" if len(ref) and r.path != "inference" else ""
        plan = f"{r.plan_s:,.1f}" if r.path == "score" and r.plan_s == r.plan_s else ""
        lines.append(f"| {r.model} | {r.params / 1e6:.2f}M | {r.N:,} | {r.device} | {r.method} | {r.path} | "
                     f"{r.samples_per_s:,.3g} | {r.peak_rss_mb:,.0f} | {r.wall_s:,.1f} | {plan} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(df, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (model, device, p, method), g in df.groupby(["model", "device", "path", "method"]):
        g = g.sort_values("N")
        label = f"{model} {method} {p} ({device})"
        axes[0].plot(g.N, g.samples_per_s, "o-", label=label)
        axes[1].plot(g.N, g.peak_rss_mb, "o-", label=label)
    for ax, title in zip(axes, ("throughput (samples/s)", "peak resident memory (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training samples N")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cases", default="cnn,resnet", help="comma list of cnn, resnet, gpu")
    ap.add_argument("--sizes", default="10000,100000,1000000", help="N of the small-CNN rows")
    ap.add_argument("--batch", type=int, default=512, help="--batch-size of the small-CNN rows")
    ap.add_argument("--cnn-paths", default="score,influence,inference", help="paths of the small-CNN rows")
    ap.add_argument("--score-max-n", type=int, default=100_000,
                    help="small-CNN score path only up to this N (self-influence needs per-sample gradients)")
    ap.add_argument("--resnet-n", type=int, default=1000)
    ap.add_argument("--resnet-batch", type=int, default=64)
    ap.add_argument("--gpu-n", type=int, default=100_000)
    ap.add_argument("--gpu-batch", type=int, default=256)
    ap.add_argument("--gpu-runs", default="diffin:score,diffin:inference,diffin:influence",
                    help="the GPU cases in order, as method:path (path: score, influence, inference)")
    ap.add_argument("--gpu-budget-mb", type=int, default=0, help="GPU cases' memory budget (0 = auto: 80%% of free VRAM)")
    ap.add_argument("--budget-mb", type=int, default=3000, help="--memory-budget of every case (MB)")
    ap.add_argument("--hessian-batch", type=int, default=256, help="diffin's Hessian batch (ScoreSettings)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    ap.add_argument("--jobs", type=int, default=1, help="CPU cases run at the same time (each with --threads)")
    ap.add_argument("--deadline", type=float, default=0, help="seconds after the projects are built when "
                    "running cases are stopped and no new one starts (0 = none)")
    ap.add_argument("--checkpoints", type=int, default=3, help="checkpoints of every synthetic project")
    ap.add_argument("--work", default="/tmp/diffin_scale", help="where the synthetic projects live")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--fresh", action="store_true", help="drop the rows already in scale.csv")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    args.cases = args.cases.split(",")
    args.cnn_paths = args.cnn_paths.split(",")
    args.sizes = [int(v) for v in args.sizes.split(",") if v]
    todo = cases(args)
    for c in todo:                       # build every project first (serially: they share the disk)
        c["project"] = str(make_project(Path(args.work), c["model"], c["n"], args.checkpoints))
    import threading
    rows, lock = [], threading.Lock()
    if args.deadline:
        DEADLINE[0] = time.time() + args.deadline

    def one(c):
        row = run_case(c, Path(args.work), args.timeout)
        if row is not None:
            with lock:                   # results written after every case: a cut-short run keeps them
                rows.append(row)
                write_outputs(rows, Path(args.out), args.fresh)

    # GPU cases one after another in their own thread; CPU cases ``--jobs`` at a time, in order
    # (diffin and tracin on the ResNet start together: their wall times compare like for like)
    import concurrent.futures as cf
    gpu = [c for c in todo if c["device"] == "cuda"]
    cpu = [c for c in todo if c["device"] != "cuda"]
    with cf.ThreadPoolExecutor(1) as gpool, cf.ThreadPoolExecutor(max(1, args.jobs)) as cpool:
        futures = [gpool.submit(lambda cs=gpu: [one(c) for c in cs])] + [cpool.submit(one, c) for c in cpu]
        for f in futures:
            f.result()
    if rows:
        print(table(__import__("pandas").read_csv(Path(args.out) / "scale.csv")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
