"""Data-source benchmark (issue 11): rows/s and peak memory of walking a training split.

    python benchmarks/sources.py                      # N = 20,000 synthetic 3x32x32 images
    python benchmarks/sources.py --n 2000 --out /tmp/x   # a quick run

The same uint8 images are written once per source: an .npz read whole into memory (the old
path, the baseline), a memory-mapped folder of .npy files, an uncompressed .npz mapped in place,
a Hugging Face-style parquet of PNG bytes (row groups of 1,000) and an ImageFolder of PNGs.
Each (source, workers) case runs in a fresh subprocess that loads the split with
``stream = true`` (the baseline: ``stream = false``) and walks it once with
``Split.iter_chunks(256, workers=...)``; it reports rows/s of that walk and the process's peak
resident memory (ru_maxrss: the main process only, DataLoader workers not included) minus the
RSS after imports (torch, pyarrow, Pillow); the clock also starts after them. Writes results/sources.csv (source, N, workers, rows_per_s, peak_rss_mb,
x_float32_mb) and sources.png.
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (3, 32, 32)
SOURCES = {  # name -> (path under the data folder, load_split keyword arguments)
    "npz in memory (baseline)": ("compressed.npz", {"stream": False}),
    "npy folder (mmap)": ("npy", {"stream": True}),
    "uncompressed npz (mmap)": ("raw.npz", {"stream": True}),
    "parquet PNG bytes": ("images.parquet", {"stream": True, "image_column": "image"}),
    "ImageFolder PNG": ("folder", {"stream": True}),
}


def write_sources(folder: Path, n: int) -> None:
    """Smooth random images (they compress like photos, not like noise) in every format."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    if (folder / "done").is_file() and json.loads((folder / "done").read_text()) == n:
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (n, SHAPE[0], 8, 8)).astype(np.uint8)
    x = small.repeat(4, axis=2).repeat(4, axis=3)                      # (n, 3, 32, 32) uint8
    y = rng.integers(0, 10, n).astype(np.int64)
    y.sort()                                                          # ImageFolder lists by class
    np.savez_compressed(folder / "compressed.npz", x=x, y=y)
    np.savez(folder / "raw.npz", x=x, y=y)
    (folder / "npy").mkdir(exist_ok=True)
    np.save(folder / "npy/x.npy", x)
    np.save(folder / "npy/y.npy", y)
    pngs = []
    for i, (a, c) in enumerate(zip(x, y)):
        buf = io.BytesIO()
        Image.fromarray(a.transpose(1, 2, 0)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
        d = folder / "folder" / str(c)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:07d}.png").write_bytes(pngs[-1])
    images = pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(pngs)],
                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": images, "label": pa.array(y)}), folder / "images.parquet", row_group_size=1000)
    (folder / "done").write_text(json.dumps(n))


def measure(folder: Path, source: str, workers: int) -> dict:
    """In this (fresh) process: load the split, walk it once; rows/s and peak RSS."""
    import pyarrow.parquet  # noqa: F401  (imports before the baseline RSS and the clock)
    import torch.utils.data  # noqa: F401
    from PIL import Image, PngImagePlugin  # noqa: F401
    from diffin_core.project.data import load_split
    rel, kwargs = SOURCES[source]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    split = load_split(folder / rel, image_shape=SHAPE, **kwargs)
    total = 0.0
    for _, x, _ in split.iter_chunks(256, workers=workers):
        total += float(x[:, 0, 0, 0].sum())                           # touch the data
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"source": source, "N": len(split), "workers": workers, "rows_per_s": round(len(split) / wall, 1),
            "peak_rss_mb": round(peak - base, 1), "x_float32_mb": round(len(split) * np.prod(SHAPE) * 4 / 2**20, 1),
            "checksum": round(total, 3)}


def plot(df, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, col, title in ((axes[0], "rows_per_s", "rows/s (walk once, chunks of 256)"),
                           (axes[1], "peak_rss_mb", "peak RSS above imports (MB)")):
        pivot = df.pivot(index="source", columns="workers", values=col).reindex(list(SOURCES))
        pivot.plot.barh(ax=ax, legend=True)
        ax.set_title(title)
        ax.set_ylabel("")
        ax.legend(title="DataLoader workers")
    axes[1].axvline(df["x_float32_mb"].iloc[0], color="k", ls="--", lw=1)
    axes[1].text(df["x_float32_mb"].iloc[0], -0.6, " float32 x", fontsize=8)
    fig.suptitle(f"Walking N = {int(df['N'].iloc[0]):,} images of 3x32x32 through Split.iter_chunks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--workers", default="0,2")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--data", type=Path, default=Path("/tmp/diffin-bench-sources"))
    ap.add_argument("--one", nargs=3, metavar=("FOLDER", "SOURCE", "WORKERS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(Path(args.one[0]), args.one[1], int(args.one[2]))))
        return 0
    import pandas as pd
    folder = args.data / str(args.n)
    t = time.perf_counter()
    write_sources(folder, args.n)
    print(f"sources written in {time.perf_counter() - t:.1f} s: {folder}", flush=True)
    rows = []
    for source in SOURCES:
        for w in (int(v) for v in args.workers.split(",")):
            out = subprocess.run([sys.executable, __file__, "--one", str(folder), source, str(w)],
                                 capture_output=True, text=True, check=True, cwd=ROOT)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    assert df["checksum"].nunique() == 1, "sources disagree on the pixels"
    df = df.drop(columns="checksum")
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "sources.csv", index=False)
    plot(df, args.out / "sources.png")
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
