"""A newcomer's first run (issue 19, item 3): from serving a fresh clone to a Home page whose
sample project has a diffin run, quiet and beside two CPU burners.

    python benchmarks/first_run.py                      # ~10-25 min on 2 busy cores
    python benchmarks/first_run.py --cases shipped --timeout 300
    python benchmarks/first_run.py --cases install,shipped --timeout 480   # + the .venv install

Each case: `git clone` of this repository's HEAD into a temp folder, then what `bash
scripts/run.sh` runs after its install: `streamlit run app.py` with DIFFIN_AUTOSCORE=diffin,tracin,loss
and an empty workspace. The install itself is not repeated (the clone imports its own diffin_core
with this machine's .venv: a new .venv would reinstall torch for minutes, measured once in the
README). A headless chromium (Playwright) opens Home and reloads it every few seconds. Times, in
seconds from the server's start:
  health_s       /_stcore/health answers;
  home_s         Home drawn (the script run finished) with the sample project open;
  diffin_s       the first Home that shows a diffin run of the sample (Finished runs >= 1 and
                 the diffin run in the workspace);
  checked_s      the shipped run's check finished (its meta.json says verified or failed), or,
                 without a shipped run, the same as diffin_s;
  all_s          diffin, tracin and loss all have runs (when within the timeout).
Cases: ``install`` (the newcomer's path itself: `bash scripts/run.sh` in the clone, which creates
the clone's own .venv, installs torch and diffin into it with this machine's pip settings and
cache, and serves; every time counts from run.sh's start, and install_s is health_s: the install
plus the server's start), ``shipped`` (the repository as it is: the sample ships its diffin run,
checked in the background) and ``scored`` (the clone without sample_data/mnist/prebuilt: the old
path, diffin scored before any run shows), each quiet and loaded (+2 `while True: pass` burners,
started ``--warmup`` seconds before). The 1-minute load average at each case's start and end is
recorded, with the UTC date and the commit measured. Writes results/first_run.csv (or --out);
rows of the (case, condition) pairs not run now are kept as they are.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from served_app import CHROMIUM, CHROMIUM_ARGS, IDLE, free_port  # noqa: E402  (the browser tests' own set-up)
sys.path.insert(0, str(ROOT / "benchmarks"))
from _load import burners  # noqa: E402  (the speed benchmarks' shared runner)


HEAD = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                      capture_output=True, text=True).stdout.strip()


def runs_of(project: Path) -> dict:
    out = {}
    for meta in (project / "runs").glob("*/meta.json"):
        if meta.parent.name.startswith("."):
            continue
        try:
            m = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if (meta.parent / "scores.parquet").is_file():
            out[m.get("method")] = m
    return out


def install_env(env: dict, port: int) -> dict:
    """The environment of a newcomer's shell for `bash scripts/run.sh`: this benchmark's own
    virtual environment and PYTHONPATH removed (run.sh makes the clone's .venv), the port set."""
    venv = Path(sys.prefix)
    path = [d for d in env.get("PATH", "").split(os.pathsep)
            if d and not Path(d).resolve().is_relative_to(venv.resolve())]
    out = {k: v for k, v in env.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    out.update({"PATH": os.pathsep.join(path), "DIFFIN_PORT": str(port), "DIFFIN_ADDRESS": "127.0.0.1"})
    return out


def one_case(case: str, condition: str, timeout: float, tmp: Path) -> dict:
    clone = tmp / f"clone-{case}-{condition}"
    subprocess.run(["git", "clone", "-q", "--local", str(ROOT), str(clone)], check=True)
    if case == "scored":
        shutil.rmtree(clone / "sample_data" / "mnist" / "prebuilt", ignore_errors=True)
    ws = clone / "workspace"
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "DIFFIN_THREADS")}
    env.update({"PYTHONPATH": str(clone), "DIFFIN_AUTOSCORE": "diffin,tracin,loss", "PYTHONUNBUFFERED": "1",
                "DIFFIN_WORKSPACE": str(ws)})
    if case == "install":                 # the README's first command, in a shell without our .venv
        env = install_env(env, port)
        cmd = ["bash", "scripts/run.sh"]
    else:
        cmd = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
               "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
               "--server.fileWatcherType", "none", "--", "--workspace", str(ws)]
    log = open(tmp / f"server-{case}-{condition}.log", "wb")
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    row = {"case": case, "condition": condition, "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
           "commit": HEAD, "load_start": round(load0, 2)}

    def since():
        return round(time.perf_counter() - t0, 1)
    try:
        url = f"http://127.0.0.1:{port}"
        while since() < timeout:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        row["health_s"] = since()
                        break
            except OSError:
                time.sleep(0.2)
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode} before serving "
                                   f"(log: {tmp / f'server-{case}-{condition}.log'})")
        if case == "install":
            row["install_s"] = row.get("health_s")
        from playwright.sync_api import sync_playwright
        project = ws / "mnist-sample"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(url)
            while since() < timeout:
                try:
                    page.wait_for_selector(IDLE, timeout=60_000)
                    page.get_by_text("Finished runs").first.wait_for(timeout=5_000)
                except Exception:
                    page.wait_for_timeout(1000)
                    page.reload()
                    continue
                text = page.inner_text("body")
                row.setdefault("home_s", since())
                runs = runs_of(project)
                if "diffin" in runs and "diffin_s" not in row and "Finished runs\n0" not in text:
                    row["diffin_s"] = since()
                    row["home_note"] = " ".join(ln for ln in text.splitlines() if "background" in ln)[:300]
                if "diffin" in runs and "checked_s" not in row:
                    state = (runs["diffin"].get("prebuilt") or {}).get("status")
                    if state in (None, "verified", "failed"):
                        row["checked_s"] = since()
                        row["check"] = state or "scored here"
                if {"diffin", "tracin", "loss"} <= set(runs):
                    row["all_s"] = since()
                    break
                page.wait_for_timeout(3000)
                page.reload()
            browser.close()
        runs = runs_of(project)
        d = runs.get("diffin") or {}
        row["diffin_run_seconds"] = d.get("seconds")
        row["check_s"] = (d.get("prebuilt") or {}).get("check_s")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        row["load_end"] = round(os.getloadavg()[0], 2)
        shutil.rmtree(clone, ignore_errors=True)
    print(row, flush=True)
    return row


def merge_rows(new, old):
    """The rows measured now, then the earlier rows of the (case, condition) pairs not run now."""
    import pandas as pd
    ran = set(zip(new["case"], new["condition"]))
    kept = old[[(c, k) not in ran for c, k in zip(old["case"], old["condition"])]]
    return pd.concat([new, kept], ignore_index=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="shipped,scored")
    ap.add_argument("--conditions", default="quiet,loaded")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per case")
    ap.add_argument("--warmup", type=float, default=45)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default="first_run")
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import pandas as pd
    tmp = Path(tempfile.mkdtemp(prefix="diffin-first-run-"))
    rows = []
    try:
        for condition in a.conditions.split(","):
            with burners(2 if condition == "loaded" else 0, a.warmup):     # _load.py
                for case in a.cases.split(","):
                    rows.append(one_case(case, condition, a.timeout, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    df = pd.DataFrame(rows)
    df.insert(0, "timeout_s", a.timeout)
    out = a.out / f"{a.name}.csv"
    if out.is_file():
        df = merge_rows(df, pd.read_csv(out))
    a.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
