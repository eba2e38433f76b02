"""Setup's ImageFolder zip upload: peak memory of the server process (issue 20).

    python benchmarks/upload_memory.py                 # 16 blank 4096x4096 PNGs -> results/upload_memory.csv
    python benchmarks/upload_memory.py --images 4      # smaller

The issue's zip: ``--images`` blank 4096 x 4096 greyscale PNGs (a few KB zipped, 64 MiB each as
float32). Each row uploads it as a project's train split in a fresh process and records that
process's peak RSS (``ru_maxrss``; the "server") and the peak of its child processes
(``RUSAGE_CHILDREN``):

- ``before``: Setup's code as of a5d1596 in the calling process, as the app ran it then: its
  reader (a stacked uint8 copy, then ``astype`` and ``/ 255``) and its store (the npz loaded
  again to check it while the decoded array was still alive);
- ``in-process``: today's reader (one float32 array filled image by image) in the calling process;
- ``app``: what Setup does now (``usercode.store_upload``): the decode in a child process.

The baseline row (``empty``) is a process that imports the same modules and uploads nothing.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OLD_COMMIT = "a5d1596"

CHILD = r"""
import resource, sys, time
mode, project, zip_path, old, old_uploads = sys.argv[1:6]
from diffin_core.workspace import uploads, usercode, safezip
if mode == "before":
    ns = {"__name__": "old_safezip"}
    exec(compile(open(old).read(), "old_safezip", "exec"), ns)
    safezip.read_imagefolder_zip = ns["read_imagefolder_zip"]
    ns = {"__name__": "old_uploads"}
    exec(compile(open(old_uploads).read(), "old_uploads", "exec"), ns)
    uploads = type("old", (), {"store_upload": staticmethod(ns["store_upload"])})
t0 = time.perf_counter()
if mode != "empty":
    with open(zip_path, "rb") as f:
        store = usercode.store_upload if mode == "app" else uploads.store_upload
        print(store(project, "train", "images.zip", f), file=sys.stderr)
took = time.perf_counter() - t0
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, took)
"""


def blank_zip(path: Path, images: int) -> Path:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("L", (4096, 4096)).save(buf, format="PNG", optimize=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(images):
            zf.writestr(f"{'ab'[i % 2]}/{i:02d}.png", buf.getvalue())
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "upload_memory.csv")
    args = ap.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        z = blank_zip(d / "images.zip", args.images)
        old, old_uploads = d / "old_safezip.py", d / "old_uploads.py"
        for path, name in ((old, "safezip"), (old_uploads, "uploads")):
            path.write_text(subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:diffin_core/workspace/{name}.py"],
                                           capture_output=True, text=True, check=True).stdout)
        for mode in ("empty", "before", "in-process", "app"):
            r = subprocess.run([sys.executable, "-c", CHILD, mode, str(d / "ws" / mode), str(z), str(old), str(old_uploads)],
                               capture_output=True, text=True, env=env)
            if r.returncode != 0:
                print(r.stderr, file=sys.stderr)
                return 1
            server, children, took = r.stdout.split()
            rows.append({"mode": mode, "images": args.images, "zip_bytes": z.stat().st_size,
                         "decoded_mib": args.images * 4096 * 4096 * 4 / 2**20,
                         "server_peak_mib": round(int(server) / 2**20), "child_peak_mib": round(int(children) / 2**20),
                         "seconds": round(float(took), 1), "load": round(os.getloadavg()[0], 1),
                         "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
            print(rows[-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
