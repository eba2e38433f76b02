"""Bad input: a one-line error naming the file and the problem, exit status 2, nothing on disk changed."""
import json
import re
import shutil

import numpy as np
import pytest
import torch

from diffin_core.cli import main

from helpers import make_tiny_project, tree_digest


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_tiny_project(tmp_path_factory.mktemp("bad") / "proj")


@pytest.fixture
def proj(pristine, tmp_path):
    dest = tmp_path / "proj"
    shutil.copytree(pristine, dest)
    return dest


def break_toml_missing(p):
    t = (p / "diffin.toml").read_text().replace('query = "data/query.npz"\n', "")
    (p / "diffin.toml").write_text(t)
    return "diffin.toml", r"missing key 'query' in \[data\]"


def break_toml_misspelt(p):
    t = (p / "diffin.toml").read_text().replace("train = ", "trian = ")
    (p / "diffin.toml").write_text(t)
    return "diffin.toml", r"unknown key 'trian' in \[data\]; did you mean 'train'"


def break_checkpoint_shape(p):
    from safetensors.torch import load_file, save_file
    m = json.loads((p / "checkpoints/manifest.json").read_text())
    f = p / "checkpoints" / m["checkpoints"][3]["file"]
    state = load_file(str(f))
    key = next(k for k in state if k.endswith("weight"))
    state[key] = torch.zeros(5, 5)
    save_file(state, str(f))
    return f.name, r"tensors don't fit the model: .* has shape \[5, 5\]"


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def break_pickled_code(p):
    m = json.loads((p / "checkpoints/manifest.json").read_text())
    torch.save({"model": {"x": torch.zeros(1)}, "extra": Payload()}, p / "checkpoints/evil.pt")
    m["checkpoints"][2]["file"] = "evil.pt"
    (p / "checkpoints/manifest.json").write_text(json.dumps(m))
    return "evil.pt", r"pickled code"


def break_manifest_lr(p):
    m = json.loads((p / "checkpoints/manifest.json").read_text())
    del m["checkpoints"][1]["lr"]
    (p / "checkpoints/manifest.json").write_text(json.dumps(m))
    return "manifest.json", r"checkpoint 1 .* has no 'lr'"


def break_manifest_step(p):
    m = json.loads((p / "checkpoints/manifest.json").read_text())
    del m["checkpoints"][0]["step"]
    (p / "checkpoints/manifest.json").write_text(json.dumps(m))
    return "manifest.json", r"checkpoint 0 .* has no 'step'"


def break_labels(p):
    d = dict(np.load(p / "data/train.npz"))
    d["y"][5] = 7
    np.savez(p / "data/train.npz", **d)
    return "train.npz", r"label 7 is out of range: the model has 3 classes"


def break_nan(p):
    d = dict(np.load(p / "data/train.npz"))
    d["x"][10, 2] = np.nan
    np.savez(p / "data/train.npz", **d)
    return "train.npz", r"NaN or infinite values \(first at row 10\)"


def break_empty_query(p):
    np.savez(p / "data/query.npz", x=np.zeros((0, 6), np.float32), y=np.zeros(0, np.int64))
    return "query.npz", r"no samples"


def break_truncated_checkpoint(p):
    m = json.loads((p / "checkpoints/manifest.json").read_text())
    f = p / "checkpoints" / m["checkpoints"][-1]["file"]
    f.write_bytes(f.read_bytes()[:100])
    return f.name, r"corrupt or truncated"


def break_shapes(p):
    d = dict(np.load(p / "data/query.npz"))
    d["x"] = d["x"][:, :4]
    np.savez(p / "data/query.npz", **d)
    return "query.npz", r"query samples have shape \[4\] but train samples have \[6\]"


def break_model_input(p):
    (p / "model.py").write_text("from diffin_core.engine.models import MLP\n\n\ndef build():\n    return MLP(5, (8,), 3)\n")
    return "train.npz", r"the model can't take samples of shape \[6\]"


def break_model_raises(p):
    (p / "model.py").write_text("def build():\n    raise ValueError('no GPU here')\n")
    return "model.py", r"build\(\) raised ValueError: no GPU here"


CASES = [break_toml_missing, break_toml_misspelt, break_checkpoint_shape, break_pickled_code,
         break_manifest_lr, break_manifest_step, break_labels, break_nan, break_empty_query,
         break_truncated_checkpoint, break_shapes, break_model_input, break_model_raises]


@pytest.mark.parametrize("breaker", CASES, ids=[c.__name__[6:] for c in CASES])
def test_one_line_error_naming_the_file_and_nothing_changes(proj, breaker, capsys):
    fname, pattern = breaker(proj)
    before = tree_digest(proj)
    with pytest.raises(SystemExit) as ex:
        main(["score", str(proj), "--method", "tracin"])
    assert ex.value.code == 2
    err = capsys.readouterr()
    lines = [ln for ln in err.err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err.err
    assert "Traceback" not in err.err and "pickled code ran" not in err.out
    assert fname in lines[0], lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    assert tree_digest(proj) == before
    assert not (proj / "runs").exists()


def test_top_with_out_of_range_query_index(proj, capsys):
    main(["score", str(proj), "--method", "grad-dot", "--run", "g"])
    with pytest.raises(SystemExit) as ex:
        main(["top", str(proj), "--run", "g", "--query-index", "999"])
    assert ex.value.code == 2
    assert "query index out of range" in capsys.readouterr().err


def test_unknown_method_and_missing_project(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["score", str(tmp_path), "--method", "tracin"])
    assert "diffin.toml" in capsys.readouterr().err


# --- replacing a run: a kill at any point leaves a whole run (old or new), and no leftovers -----

import json as _json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from diffin_core.project.atomic import clean_staging, recover_dirs, replace_dir, staged_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KILLER = r"""
import importlib.util, os, sys, json
spec = importlib.util.spec_from_file_location("atomic", sys.argv[1] + "/diffin_core/project/atomic.py")
atomic = importlib.util.module_from_spec(spec)   # stdlib only: no torch import, a fast child
spec.loader.exec_module(atomic)
final, kill_at = sys.argv[2], int(sys.argv[3])
calls = [0]
def wrap(fn):
    def inner(*a, **k):
        calls[0] += 1
        if calls[0] == kill_at:
            os._exit(137)                     # a kill: no finally, no cleanup
        return fn(*a, **k)
    return inner
atomic.os.rename, atomic.os.symlink, atomic.os.replace = wrap(os.rename), wrap(os.symlink), wrap(os.replace)
real_remove = atomic._remove
atomic._remove = lambda p: os._exit(137) if kill_at == 99 else real_remove(p)
with atomic.staged_dir(final) as tmp:
    (tmp / "scores.parquet").write_bytes(b"new" * 1000)
    if kill_at == 0:
        os._exit(137)                         # killed during the parquet write
    (tmp / "meta.json").write_text(json.dumps({"v": "new"}))
"""


def _write_run(runs, version, legacy):
    final = runs / "r"
    if legacy:                                  # a run written by older diffin: a real folder
        final.mkdir(parents=True)
        (final / "scores.parquet").write_bytes(version.encode() * 1000)
        (final / "meta.json").write_text(_json.dumps({"v": version}))
    else:
        with staged_dir(final) as tmp:
            (tmp / "scores.parquet").write_bytes(version.encode() * 1000)
            (tmp / "meta.json").write_text(_json.dumps({"v": version}))
    return final


def _whole(final):
    meta = _json.loads((final / "meta.json").read_text())["v"]
    assert (final / "scores.parquet").read_bytes() == meta.encode() * 1000
    return meta


@pytest.mark.parametrize("legacy", [False, True], ids=["versioned", "legacy-folder"])
@pytest.mark.parametrize("kill_at", [0, 1, 2, 3, 4, 99])
def test_kill_during_run_replacement_never_leaves_no_run(tmp_path, legacy, kill_at):
    runs = tmp_path / "runs"
    final = _write_run(runs, "old", legacy)
    for p in runs.iterdir():                       # the old version was written a while ago
        if ".v-" in p.name:
            pid, ns = p.name.split(".v-")[1].split("-")[:2]
            p.rename(p.with_name(f".r.v-{pid}-{int(ns) - 120 * 10**9}"))
            final.unlink()
            final.symlink_to(p.with_name(f".r.v-{pid}-{int(ns) - 120 * 10**9}").name)
    proc = subprocess.run([sys.executable, "-c", KILLER, str(REPO), str(final), str(kill_at)], timeout=60)
    window = legacy and kill_at in (3, 4)      # killed before call k: after the old folder moved aside
    if window:
        # the one window, in the one-time move of an old real folder: repaired on start
        assert proc.returncode == 137 and not final.exists()
    elif proc.returncode == 137:
        assert _whole(final) in ("old", "new")     # readers see a whole run at every moment
    recover_dirs(runs)                             # "on start"
    swapped = proc.returncode == 0 or kill_at > (4 if legacy else 3) or window
    assert _whole(final) == ("new" if swapped else "old")
    assert [p.name for p in runs.iterdir() if not (p.is_symlink() and p.name == "r")
            and p.resolve() != final.resolve()] in ([], ["r"])
    assert len(list(runs.iterdir())) == (2 if final.is_symlink() else 1)   # r (+ its version)


def test_recovery_leaves_a_live_writer_alone(tmp_path):
    runs = tmp_path / "runs"
    final = _write_run(runs, "old", legacy=False)
    with staged_dir(final) as tmp:                 # this process is mid-write
        (tmp / "meta.json").write_text("{}")
        assert recover_dirs(runs) == []
        assert tmp.is_dir()
    assert _json.loads((final / "meta.json").read_text()) == {}
    assert sorted(p.name.split(".v-")[0] for p in runs.iterdir()) == [".r", "r"]


def test_replace_dir_swaps_and_removes_the_old_version(tmp_path):
    runs = tmp_path / "runs"
    final = _write_run(runs, "one", legacy=True)
    for v in ("two", "three"):
        src = tmp_path / f"src-{v}"
        src.mkdir()
        (src / "scores.parquet").write_bytes(v.encode() * 1000)
        (src / "meta.json").write_text(_json.dumps({"v": v}))
        replace_dir(src, final)
        assert _whole(final) == v and final.is_symlink()
        assert len(list(runs.iterdir())) == 2


def test_hidden_folders_and_leftovers_are_not_runs(proj):
    from diffin_core.project.folder import Project
    from diffin_core.run.scoring import score
    score(proj, "grad-dot", run="g")
    runs = proj / "runs"
    dead = 2 ** 22 + 12345                          # no such pid
    for name in (f".g.tmp-{dead}-1", f".h.tmp-{dead}-2", ".hidden"):
        (runs / name).mkdir()
        (runs / name / "meta.json").write_text('{"method": "x"}')
        (runs / name / "scores.parquet").write_bytes(b"")
    old = runs / ".g.tmp-1700000000000"             # older diffin's name (no pid), clearly stale
    old.mkdir()
    os.utime(old, (1, 1))
    assert [r.name for r in Project(proj).runs()] == ["g"]
    left = sorted(p.name for p in runs.iterdir() if not p.name.startswith(".g.v-") and p.name != ".stages")
    assert left == [".hidden", "g"]                 # dead writers' leftovers gone; others kept, unlisted
    score(proj, "grad-dot", run="g")                # a second score of the same name: replaced whole
    assert [r.name for r in Project(proj).runs()] == ["g"]
    assert len([p for p in runs.iterdir() if p.name.startswith(".g.v-")]) == 1


def test_upload_staging_left_by_a_dead_process_is_cleaned(tmp_path):
    dead = 2 ** 22 + 12346
    (tmp_path / f".diffin-upload-{dead}-abc").mkdir()
    (tmp_path / f".diffin-upload-{dead}-abc" / "model.py").write_text("x")
    (tmp_path / f".diffin-upload-{os.getpid()}-live").mkdir()   # an upload in progress here
    stale = tmp_path / ".diffin-upload-old123"                   # older diffin's name
    stale.mkdir()
    os.utime(stale, (1, 1))
    fresh = tmp_path / ".diffin-upload-new456"
    fresh.mkdir()
    assert sorted(clean_staging(tmp_path)) == [f".diffin-upload-{dead}-abc", ".diffin-upload-old123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".diffin-upload-new456",
                                                                 f".diffin-upload-{os.getpid()}-live"])


# --- Ctrl-C on `diffin score`: exit 130 with one line, nothing written ----------------------------

import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402


@pytest.mark.parametrize("when", ["importing", "scoring"])
def test_ctrl_c_on_score_exits_130_with_one_line(proj, when):
    cmd = [sys.executable, "-c", "from diffin_core.cli import main; main()", "score", str(proj), "--method", "diffin"]
    # a shell started in the background ignores SIGINT and its children inherit that: restore it
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err = []
    # os.read returns what the pipe holds now (a buffered read(64) waits for 64 bytes, so a line could
    # sit unseen until the next write: under load the signal then landed after the run was published)
    fd = proc.stderr.fileno()
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: os.read(fd, 65536), b"")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    if when == "importing":
        time.sleep(0.8)                              # inside the command, importing torch
    else:
        # the engine is running: its first announcement comes before the query plan's walk over every
        # checkpoint (seconds), the scores are published only after it
        while (b"preparing query vectors" not in b"".join(err) and b"%|" not in b"".join(err)
               and time.monotonic() < deadline):
            time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    reader.join(timeout=10)
    text = b"".join(err).decode()
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln
             and not ln.startswith("diffin: ")]
    assert lines == ["error: interrupted (Ctrl-C)"], text[-2000:]
    assert "Traceback" not in text
    # no run published (runs/.stages may keep resumable stage results: that is on purpose)
    assert not (proj / "runs").exists() or [p.name for p in (proj / "runs").iterdir()
                                            if not p.name.startswith(".stages")] == []


def test_ctrl_c_in_the_feature_pass_keeps_the_published_scores_and_says_so(proj):
    cmd = [sys.executable, "-c", "from diffin_core.cli import main; main()", "score", str(proj), "--method", "diffin"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out, err = [], []
    for pipe, sink in ((proc.stdout, out), (proc.stderr, err)):
        fd = pipe.fileno()
        threading.Thread(target=lambda fd=fd, sink=sink: sink.extend(iter(lambda: os.read(fd, 65536), b"")),
                         daemon=True).start()
    deadline = time.monotonic() + 120
    while b"building its feature store" not in b"".join(out) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    time.sleep(0.2)
    text = b"".join(err).decode()
    assert "Traceback" not in text
    assert text.rstrip().endswith("error: interrupted (Ctrl-C)"), text[-2000:]
    run = proj / "runs" / "diffin-1"
    assert f"Ctrl-C in the feature pass: {run / 'scores.parquet'} is kept" in text
    assert "diffin features" in text
    import pyarrow.parquet as pq
    table = pq.read_table(run / "scores.parquet")              # the published scores are whole
    assert table.num_rows == 96 and "influence" in table.column_names
    assert not (run / "features").exists()                      # no half-built store published


def _as_dead_writers(runs):
    """Rename runs/'s versions as if a process that has exited wrote them (a later start)."""
    dead = 2 ** 22 + 12345                          # no such pid
    for link in [p for p in runs.iterdir() if p.is_symlink()]:
        version = runs / os.readlink(link)
        moved = version.with_name(version.name.split(".v-")[0] + f".v-{dead}-1")
        version.rename(moved)
        link.unlink()
        link.symlink_to(moved.name)


def test_a_run_deleted_by_hand_stays_deleted(proj):
    """`rm -rf runs/<name>` removes the link only: the next listing (this process, or a later
    start) must not bring the run back from its version folder, and the folder goes too."""
    from diffin_core.project.folder import Project
    from diffin_core.run.scoring import score
    score(proj, "loss", run="loss-3", features=False)
    score(proj, "loss", run="loss-4", features=False)
    runs = proj / "runs"
    _as_dead_writers(runs)
    (runs / "loss-3").unlink()                      # what `rm -rf runs/loss-3` does to a link
    assert sorted(r.name for r in Project(proj).runs()) == ["loss-4"]
    assert sorted(r.name for r in Project(proj).runs()) == ["loss-4"]
    assert not any(p.name.startswith(".loss-3.") for p in runs.iterdir())
    assert _json.loads((runs / "loss-4" / "meta.json").read_text())["method"] == "loss"


def test_a_run_deleted_by_hand_in_a_live_process_stays_deleted(tmp_path):
    runs = tmp_path / "runs"
    final = _write_run(runs, "old", legacy=False)  # written by this (live) process
    version = runs / os.readlink(final)
    pid, ns = version.name.split(".v-")[1].split("-")[:2]
    aged = version.with_name(f".r.v-{pid}-{int(ns) - 120 * 10**9}")   # a while ago
    version.rename(aged)
    final.unlink()                                 # deleted by hand
    recover_dirs(runs)
    assert list(runs.iterdir()) == []
