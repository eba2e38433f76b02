"""No CLI verb prints a traceback for its documented bad inputs (issue 20): each is one line
"error: ..." on stderr and exit status 2. Plus the bad inputs of issue 20's sweep, each with
its one-line message: a model.py importing a sibling module, leftovers after failures, os._exit
in model.py, a too-small memory budget, the .pt refusal, a non-npz batch order, negative
counts, and --help's percent sign."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffin_core.cli import app

from helpers import make_tiny_project, run_cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """The tiny project with a finished "loss-1" run (a few seconds)."""
    from diffin_core.run.scoring import score
    proj = make_tiny_project(tmp_path_factory.mktemp("cli") / "proj")
    score(proj, "loss", run="loss-1")
    return proj


def _device_cases() -> list:
    """--device naming hardware this machine lacks (issue 20: cuda / mps were tracebacks)."""
    import torch
    cases = []
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        cases.append(("score", ["P", "-m", "loss", "--device", f"cuda:{n}"],
                      rf"--device cuda:{n}: there are only {n} CUDA devices"))
    else:
        for dev in ("cuda", "cuda:1"):
            cases.append(("score", ["P", "-m", "loss", "--device", dev], rf"--device {dev}: this machine has no usable CUDA GPU"))
        cases.append(("demo", ["--workspace", "W", "-m", "loss", "--device", "cuda"], r"--device cuda: this machine has no usable CUDA GPU"))
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        cases.append(("score", ["P", "-m", "loss", "--device", "mps"], r"--device mps: MPS \(Apple GPU\) is not available on this machine"))
    return cases


_DEVICE_CASES = _device_cases()

# (verb, arguments with P = the scored project, W = a workspace, F = a plain file, the message)
CASES = [
    ("score", ["{missing}"], r"no diffin.toml here"),
    ("score", ["P", "-m", "nope"], r"unknown method 'nope'"),
    ("score", ["P", "-m", "loss", "--device", "banana"], r"--device 'banana' is not a device"),
    *_DEVICE_CASES,
    ("score", ["P", "-m", "loss", "--device", "xla"], r"--device 'xla': diffin runs on cpu, cuda or mps"),
    ("score", ["P", "-m", "loss", "--memory-budget", "lots"], r"memory budget 'lots' is not a size"),
    ("score", ["P", "-m", "loss", "--batch-size", "0"], r"--batch-size must be at least 1, not 0"),
    ("score", ["P", "-m", "loss", "--precision", "float8"], r"float8"),
    ("score", ["P", "-m", "loss", "--ray-timeout", "-5"], r"--ray-timeout must be a positive number of seconds, not -5"),
    ("score", ["P", "-m", "loss", "--ray", "--ray-timeout", "-5"], r"--ray-timeout must be a positive number of seconds, not -5"),
    ("score", ["P", "-m", "loss", "--ray-timeout", "30"], r"--ray-timeout 30 needs --ray: it limits reaching the Ray cluster"),
    ("top", ["P", "--run", "loss-1", "-q", "0", "--k", "-5"], r"--k must be at least 1, not -5"),
    ("top", ["P", "--run", "loss-1", "-q", "0", "--shortlist", "-4"], r"--shortlist must be at least 0, not -4"),
    ("top", ["P", "--run", "nope", "-q", "0"], r"nope"),
    ("top", ["P", "--run", "loss-1", "-q", "999"], r"query index out of range: the query set has 30 samples"),
    ("serve", ["P", "--run", "nope"], r"nope"),
    ("serve", ["P", "--run", "loss-1"], r"has no feature store"),
    ("serve", ["P", "--run", "loss-1", "--idle", "0"], r"--idle must be at least 1, not 0"),
    ("features", ["P", "--run", "loss-1", "--dim", "0"], r"--dim must be at least 1, not 0"),
    ("features", ["P", "--run", "nope"], r"nope"),
    ("demo", ["--workspace", "F", "-m", "loss"], r"cannot use it as the workspace folder"),
    ("clean", ["P", "--run", "loss-1", "--fraction", "1.5", "--out", "W/c.npz"], r"--fraction must be in \(0, 1\), not 1.5"),
    ("delete", ["P", "--run", "loss-1", "--k", "-1", "--out", "W/d.npz"], r"--k must be at least 1, not -1"),
    ("clean", ["P", "--run", "loss-1", "--out", "P/data/train.npz"],
     r"refusing to write the export into the project's own train.npz: it would overwrite what the project reads"),
    ("delete", ["P", "--run", "loss-1", "--k", "3", "--out", "P/checkpoints/d.npz"],
     r"refusing to write the export into the project's checkpoints/ folder"),
    ("coreset", ["P", "--run", "loss-1", "--out", "P/data/core.npz"], r"refusing to write the export into the project's data/ folder"),
    ("coreset", ["P", "--run", "loss-1", "--fraction", "0", "--out", "W/c.npz"], r"--fraction must be in \(0, 1\], not 0"),
    ("coreset", ["P", "--run", "loss-1", "--rule", "bogus", "--out", "W/c.npz"], r"unknown coreset rule 'bogus'"),
    ("coreset", ["P", "--run", "loss-1", "--fraction", "0.001", "--out", "W/c.npz"],
     r"the selection keeps none of the 96 training samples: nothing to export"),
    ("clean", ["P", "--run", "loss-1", "--out", "W"], r"is a folder: --out takes a file name"),
    ("delete", ["P", "--run", "loss-1", "--k", "3", "--out", "F/d.npz"], r"cannot write the export \(.*\)"),
    ("verify", ["P", "--run", "loss-1", "--k", "0"], r"--k must be at least 1, not 0"),
    ("verify", ["P", "--run", "loss-1"], r"no \[train\] recipe"),
    ("bench", ["--workers", "0"], r"--workers must be at least 1, not 0"),
    ("users add", ["bob", "--role", "boss", "--workspace", "W", "--password-stdin"], r"unknown role 'boss'"),
    ("users add", ["bob", "--role", "reviewer", "--workspace", "W", "--password-stdin"], r"at least 8 characters"),
    ("users add", ["../bob", "--role", "reviewer", "--workspace", "W", "--password-stdin"], r"user name '../bob' is not allowed"),
    ("users list", ["--workspace", "F"], r"cannot use it as the workspace folder"),
    ("users remove", ["zed", "--workspace", "W"], r"no user 'zed'"),
    ("users passwd", ["zed", "--workspace", "W", "--password-stdin"], r"no user 'zed'"),
    ("users role", ["zed", "admin", "--workspace", "W"], r"no user 'zed'"),
    ("serve-check", ["--address", "0.0.0.0", "--workspace", "W"], r"refusing to serve on 0.0.0.0 without accounts"),
    ("review-settings", ["P", "-k", "0"], r"reviewers per sample must be 1 to 20, not 0"),
    ("review-settings", ["{missing}"], r"no diffin.toml here"),
]


def test_the_table_covers_every_verb():
    import typer.main
    group = typer.main.get_command(app)
    verbs = set()
    for name, cmd in group.commands.items():
        sub = getattr(cmd, "commands", None)
        verbs |= {f"{name} {s}" for s in sub} if sub else {name}
    tested = {v for v, _, _ in CASES} | {"methods"}       # methods takes no input (below)
    assert verbs <= tested, f"verbs without a bad-input case: {sorted(verbs - tested)}"


@pytest.mark.parametrize("verb,args,message", CASES, ids=[f"{v}:{' '.join(a)}" for v, a, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(verb, args, message, scored, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DIFFIN_INSECURE_OPEN", raising=False)
    plain = tmp_path / "plain.txt"
    plain.write_text("not a folder")
    ws = tmp_path / "ws"
    ws.mkdir()
    subst = {"P": str(scored), "W": str(ws), "F": str(plain), "{missing}": str(tmp_path / "missing")}
    argv = verb.split() + [subst.get(a, a.replace("W/", f"{ws}/").replace("P/", f"{scored}/").replace("F/", f"{plain}/")) for a in args]
    from helpers import tree_digest
    before = tree_digest(scored / "data"), tree_digest(scored / "checkpoints")
    code, out, err = run_cli(argv, capsys, stdin="short\n", monkeypatch=monkeypatch)
    assert (tree_digest(scored / "data"), tree_digest(scored / "checkpoints")) == before   # the input untouched
    assert "Traceback" not in out + err
    assert code == 2, (code, out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(message, lines[0]), lines[0]


def _verbs() -> list[str]:
    import typer.main
    group = typer.main.get_command(app)
    verbs = []
    for name, cmd in sorted(group.commands.items()):
        sub = getattr(cmd, "commands", None)
        verbs += [f"{name} {s}" for s in sorted(sub)] if sub else [name]
    return verbs


# usage errors (typer/click's own): a word for a number, an option or command that does not
# exist, a missing argument or option value; every verb gets an unknown option
USAGE = [(v, ["--no-such-option"], r"No such option: --no-such-option \(see diffin .*--help\)") for v in _verbs()] + [
    ("top", ["P", "--run", "loss-1", "-q", "abc"], r"Invalid value for '--query-index' / '-q': .*valid integer"),
    ("top", ["P", "--run", "loss-1", "-q", "1e9"], r"Invalid value for '--query-index' / '-q'"),
    ("score", ["P", "-m", "loss", "--batch-size", "x"], r"Invalid value for '--batch-size'"),
    ("clean", ["P", "--run", "loss-1", "--fraction", "half", "--out", "W/c.npz"], r"Invalid value for '--fraction'"),
    ("score", [], r"Missing argument 'PROJECT'|Missing argument 'project'"),
    ("top", ["P", "--run"], r"Option '--run' requires an argument"),
    ("no-such-verb", [], r"No such command 'no-such-verb'"),
]


@pytest.mark.parametrize("verb,args,message", USAGE, ids=[f"{v}:{' '.join(a)}" for v, a, _ in USAGE])
def test_usage_errors_are_one_line_and_exit_2(verb, args, message, scored, tmp_path, capsys):
    """typer >= 0.2x raises its own (vendored) click exceptions: they must not reach the user as a
    traceback either."""
    subst = {"P": str(scored)}
    argv = verb.split() + [subst.get(a, a.replace("W/", f"{tmp_path}/")) for a in args]
    code, out, err = run_cli(argv, capsys)
    assert "Traceback" not in out + err
    assert code == 2, (code, out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(message, lines[0]), lines[0]


def test_a_usage_error_in_a_fresh_process_is_one_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "diffin_core.cli", "top", "nowhere", "--run", "r", "-q", "abc"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == [
        "error: Invalid value for '--query-index' / '-q': Input should be a valid integer, unable to parse string "
        "as an integer (see diffin top --help)"], r.stderr


@pytest.mark.parametrize("verb", [["clean"], ["delete", "--k", "3"], ["coreset"]])
def test_a_refused_export_path_is_checked_before_any_work_is_printed(verb, scored, capsys):
    code, out, err = run_cli([verb[0], scored, "--run", "loss-1", *verb[1:], "--out", scored / "data" / "x.npz"], capsys)
    assert code == 2 and "refusing to write the export into the project's data/ folder" in err, err
    assert out == "", out                          # delete printed its predicted loss change first


def test_methods_lists_and_help_shows_no_doubled_percent(capsys):
    code, out, _ = run_cli(["methods"], capsys)
    assert code == 0 and "diffin" in out
    code, out, _ = run_cli(["score", "--help"], capsys)
    flat = " ".join(out.replace("│", " ").split())
    assert "%%" not in out and "80 percent of the free VRAM" in flat, flat


def test_exports_never_overwrite_any_file_the_project_reads(tmp_path, capsys):
    """Beyond data/ and checkpoints/: the [train] recipe, modules model.py imports (files and
    package folders), the review log, Setup's draft, the text cache; a new file beside them is fine."""
    from diffin_core.errors import DiffinError
    from diffin_core.project.folder import Project
    from diffin_core.workspace.export import check_out_path
    proj = make_tiny_project(tmp_path / "p")
    (proj / "diffin.toml").write_text((proj / "diffin.toml").read_text() + '\n[train]\nrecipe = "fit.py:train"\n')
    (proj / "fit.py").write_text("def train(x, y, seed, checkpoint_dir):\n    pass\n")
    (proj / "nets.py").write_text("X = 1\n")
    (proj / "blocks").mkdir()
    (proj / "blocks" / "__init__.py").write_text("")
    (proj / "review.sqlite").write_bytes(b"")
    (proj / ".setup.json").write_text("{}")
    (proj / "tokenized").mkdir()
    project = Project(proj)
    for target, what in [("fit.py", "the project's own fit.py"), ("nets.py", "the project's own nets.py"),
                         ("blocks/more.npz", "the project's blocks/ folder"),
                         ("review.sqlite", "the project's own review.sqlite"),
                         ("review.sqlite-wal", "the project's own review.sqlite-wal"),
                         (".setup.json", "the project's own .setup.json"),
                         ("tokenized/t.npz", "the project's tokenized/ folder")]:
        with pytest.raises(DiffinError, match=re.escape(f"refusing to write the export into {what}")):
            check_out_path(project, proj / target)
    assert check_out_path(project, proj / "clean.npz") == (proj / "clean.npz").resolve()
    assert check_out_path(project, proj / "exports" / "fit.npz") == (proj / "exports" / "fit.npz").resolve()
    score_before = (proj / "fit.py").read_bytes()
    from diffin_core.run.scoring import score
    score(proj, "loss", run="loss-1")
    code, _, err = run_cli(["clean", proj, "--run", "loss-1", "--out", proj / "fit.py"], capsys)
    assert code == 2 and "refusing to write the export into the project's own fit.py" in err, err
    assert (proj / "fit.py").read_bytes() == score_before


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_a_text_column_declared_tabular_is_one_line_in_the_cli(tmp_path, capsys, ext):
    import pandas as pd
    proj = make_tiny_project(tmp_path / "p")
    for split in ("train", "query"):
        with np.load(proj / f"data/{split}.npz") as z:
            df = pd.DataFrame(z["x"], columns=[f"f{i}" for i in range(z["x"].shape[1])])
            df.insert(2, "note", [f"row {i}" for i in range(len(df))])
            df["label"] = z["y"]
        if ext == "csv":
            df.to_csv(proj / f"data/{split}.csv", index=False)
        else:
            df.to_parquet(proj / f"data/{split}.parquet")
    toml = (proj / "diffin.toml").read_text()
    (proj / "diffin.toml").write_text(toml.replace(".npz", f".{ext}"))
    code, out, err = run_cli(["score", proj, "-m", "loss"], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in out + err, (code, err)
    assert lines == [f"error: {proj / 'data' / ('train.' + ext)}: column 'note' holds text, not numbers: for a "
                         "text classifier set [data] kind = \"text\" and text_column = 'note' in diffin.toml"], err


# --- issue 20's sweep, one test each ------------------------------------------------------------

def test_model_py_may_import_a_sibling_module_and_no_bytecode_is_written(tmp_path, capsys):
    proj = make_tiny_project(tmp_path / "p")
    (proj / "nets.py").write_text("from diffin_core.engine.models import MLP\n\n\ndef make():\n"
                                  "    return MLP(6, (8,), 3)\n")
    (proj / "model.py").write_text("from nets import make\n\n\ndef build():\n    return make()\n")
    code, out, err = run_cli(["score", proj, "-m", "loss", "--run", "sib"], capsys)
    assert code == 0, err
    assert (proj / "runs/sib/scores.parquet").is_file()
    assert not list(proj.rglob("__pycache__")) and not list(proj.rglob("*.pyc"))
    # the app's child process checks the project the same way
    from diffin_core.workspace.usercode import check_project
    assert check_project(str(proj)) == []
    assert not list(proj.rglob("__pycache__"))


def test_with_the_project_on_pythonpath_the_cli_writes_no_bytecode(tmp_path):
    proj = make_tiny_project(tmp_path / "p")
    (proj / "nets.py").write_text("from diffin_core.engine.models import MLP\n\n\ndef make():\n"
                                  "    return MLP(6, (8,), 3)\n")
    (proj / "model.py").write_text("from nets import make\n\n\ndef build():\n    return make()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(proj)]), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    r = subprocess.run([sys.executable, "-m", "diffin_core.cli", "score", str(proj), "-m", "loss", "--run", "pp"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (proj / "runs/pp/scores.parquet").is_file()
    assert not list(proj.rglob("__pycache__")) and not list(proj.rglob("*.pyc"))


def test_os_exit_in_model_py_says_so_in_one_line(tmp_path):
    proj = make_tiny_project(tmp_path / "p")
    (proj / "model.py").write_text("import os\n\n\ndef build():\n    os._exit(3)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "diffin_core.cli", "score", str(proj), "-m", "loss"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "sample/s" not in ln and "it/s" not in ln]
    assert lines[-1] == (f"error: {(proj / 'model.py').resolve()}: line 5 called os._exit(3), which ended diffin "
                         "mid-run (the run was not written)"), r.stderr
    assert "Traceback" not in r.stderr


def test_a_memory_budget_below_the_minimum_is_raised_with_a_warning(scored, capsys):
    code, out, err = run_cli(["score", scored, "-m", "loss", "--run", "small-budget", "--memory-budget", "10MB"], capsys)
    assert code == 0
    assert "warning: --memory-budget 10MB is below the minimum of 64 MiB; using 64 MiB" in err
    meta = json.loads((scored / "runs/small-budget/meta.json").read_text())
    assert meta["settings"]["memory_budget"] == 64 * 2**20


def test_pt_refusal_names_the_global_in_whole_words_without_escapes(tmp_path):
    import torch
    from diffin_core.errors import DiffinError
    from diffin_core.project.checkpoints import read_state

    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    f = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload()}, f)
    with pytest.raises(DiffinError) as e:
        read_state(f)
    msg = str(e.value)
    assert "\x1b" not in msg and "\n" not in msg
    assert msg == (f"{f}: refused: the .pt file holds pickled code or objects, not plain tensors (it references "
                   "print; diffin loads .pt only with weights_only=True: save the model's state_dict, or convert "
                   "it to .safetensors)")


@pytest.mark.parametrize("content,what", [(b"ids,offsets\n1,2\n", "not a zip archive"), (b"", "an empty file"),
                                          ("npy", "a single .npy array")])
def test_a_batch_order_that_is_not_an_npz_says_what_it_is(tmp_path, content, what):
    from diffin_core.errors import DiffinError
    from diffin_core.project.checkpoints import load_batch_order, read_manifest
    proj = make_tiny_project(tmp_path / "p")
    m = json.loads((proj / "checkpoints/manifest.json").read_text())
    m["batch_order"] = "order.npz"
    (proj / "checkpoints/manifest.json").write_text(json.dumps(m))
    target = proj / "checkpoints/order.npz"
    if content == "npy":
        with open(target, "wb") as fh:
            np.save(fh, np.arange(10))
    else:
        target.write_bytes(content)
    with pytest.raises(DiffinError, match=rf"batch order 'order.npz' is not an .npz \(it is {re.escape(what)}\); "
                                          r"it needs int arrays 'ids' and 'offsets' saved with np.savez") as e:
        load_batch_order(read_manifest(proj / "checkpoints/manifest.json"), 96)
    assert "pickled" not in str(e.value)


def test_a_killed_feature_pass_leaves_nothing_behind(scored, tmp_path):
    from diffin_core.project.folder import Project
    run = scored / "runs" / "loss-1"
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()                                               # a pid that is surely dead now
    dead = run / f".features.tmp-{p.pid}-1700000000000000000"
    (dead / "sub").mkdir(parents=True)
    (dead / "train.npy").write_bytes(b"partial")
    live = run / f".features.tmp-{os.getpid()}-1700000000000000001"  # a live writer's: left alone
    live.mkdir()
    Project(scored).runs()
    assert not dead.exists() and live.exists()
    shutil.rmtree(live)


def test_a_failed_score_leaves_no_stage_folder(tmp_path, monkeypatch, capsys):
    from diffin_core.errors import DiffinError
    import diffin_core.run.scoring as scoring
    proj = make_tiny_project(tmp_path / "p")

    def boom(*a, **k):
        raise DiffinError("the estimator refused this project")
    monkeypatch.setattr(scoring, "run_method", boom)
    code, _, err = run_cli(["score", proj, "-m", "loss"], capsys)
    assert code == 2 and "the estimator refused this project" in err
    stages = proj / "runs" / ".stages"
    assert not stages.exists() or not any(stages.iterdir()), list(stages.rglob("*"))


def test_stages_no_job_can_resume_are_removed(tmp_path):
    """A failed job's saved stages stay for a resume with the same inputs; once the checkpoints
    (or the training split) changed, the next job of that method removes them."""
    from diffin_core.project.stages import Stages, StageSettings
    old = StageSettings("diffin", {"precision": "float32"}, "q", "t", [["ckpt_0.safetensors", 10, 1, 0, 0.1]])
    st = Stages(tmp_path, old)
    st.save_scores("ckpt_000", {"influence": np.zeros(3)})
    other_settings = StageSettings("diffin", {"precision": "bfloat16"}, "q", "t", old.checkpoints)
    Stages(tmp_path, other_settings).save_scores("ckpt_000", {"influence": np.ones(3)})
    tracin = Stages(tmp_path, StageSettings("tracin", {}, "q", "t", old.checkpoints))
    assert st.root.is_dir() and tracin.root.is_dir()          # same inputs: both kept
    rerecorded = StageSettings("diffin", {"precision": "float32"}, "q", "t", [["ckpt_0.safetensors", 10, 2, 0, 0.1]])
    new = Stages(tmp_path, rerecorded)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([new.root.name, tracin.root.name]), left
    Stages(tmp_path, StageSettings("diffin", {"precision": "float32"}, "q", "t2", rerecorded.checkpoints))
    assert not new.root.exists()                              # a new training split: gone too
    assert tracin.root.is_dir()                               # another method's: its own next job decides


def test_setup_takes_the_modules_model_py_imports(tmp_path):
    import io
    import zipfile
    from diffin_core.errors import DiffinError
    from diffin_core.workspace import usercode
    from diffin_core.workspace.uploads import store_upload
    folder = tmp_path / "ws" / "proj"
    model = b"from nets import make\nfrom blocks.mlp import width\n\n\ndef build():\n    return make(width)\n"
    with pytest.raises(DiffinError, match=r"No module named 'nets' \(upload nets.py under 'Other Python files"):
        usercode.store_upload(folder, "model", "model.py", io.BytesIO(model))
    nets = b"from diffin_core.engine.models import MLP\n\n\ndef make(w):\n    return MLP(6, (w,), 3)\n"
    assert "module saved" in store_upload(folder, "modules", "nets.py", io.BytesIO(nets))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("blocks/__init__.py", "")
        z.writestr("blocks/mlp.py", "width = 8\n")
    assert "2 module file(s)" in store_upload(folder, "modules", "blocks.zip", io.BytesIO(buf.getvalue()))
    msg = usercode.store_upload(folder, "model", "model.py", io.BytesIO(model))   # built in a child process
    assert "model OK (MLP" in msg
    assert not list(folder.rglob("__pycache__"))
    for name, data, problem in [("model.py", b"x = 1\n", "not a plain module name"),
                                ("my-net.py", b"x = 1\n", "not a plain module name"),
                                ("bad.py", b"def (:\n", "is not valid Python")]:
        with pytest.raises(DiffinError, match=re.escape(problem)):
            store_upload(folder, "modules", name, io.BytesIO(data))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("weights.bin", b"\0" * 10)
    with pytest.raises(DiffinError, match=r"holds 'weights.bin': only .py modules"):
        store_upload(folder, "modules", "more.zip", io.BytesIO(buf.getvalue()))


def test_a_broken_model_py_is_reported_once(tmp_path):
    from diffin_core.project.folder import Project
    proj = make_tiny_project(tmp_path / "p")
    (proj / "model.py").write_text("from nets import Net\n\n\ndef build():\n    return Net()\n")
    problems = Project(proj).validate()
    assert len(problems) == len(set(problems)) >= 1
    assert sum("No module named 'nets'" in p for p in problems) <= 1


CLAIMER = """
import sys, time
from pathlib import Path
from diffin_core.project.folder import Project
from diffin_core.run.scoring import run_name
go, hold = Path(sys.argv[2]), Path(sys.argv[3])
while not go.exists():
    time.sleep(0.01)
with run_name(Project(sys.argv[1]), "loss", None) as name:
    print(name, flush=True)
    while not hold.exists():            # neither has published its run yet
        time.sleep(0.01)
"""


def test_two_processes_never_claim_the_same_default_run_name(tmp_path):
    proj = make_tiny_project(tmp_path / "p")
    go, hold = tmp_path / "go", tmp_path / "hold"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(proj), str(go), str(hold)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    names = []
    try:
        import time
        time.sleep(0.5)
        go.touch()                                          # all three ask at once
        names = [p.stdout.readline().strip() for p in procs]
        hold.touch()
        for p in procs:
            assert p.wait(timeout=120) == 0, p.stderr.read()
    finally:
        for p in procs:
            p.kill()
    assert sorted(names) == ["loss-1", "loss-2", "loss-3"], names
    assert not list((proj / "runs").glob(".*.claim"))          # released


def test_default_run_names_of_two_scores_at_once_and_a_dead_claim(tmp_path):
    proj = make_tiny_project(tmp_path / "p")
    (proj / "runs").mkdir()
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    (proj / "runs" / ".loss-1.claim").write_text(str(p.pid))   # a killed score's claim: taken back
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "diffin_core.cli", "score", str(proj), "-m", "loss"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for q in procs:
        out, err = q.communicate(timeout=300)
        assert q.returncode == 0, err
    runs = sorted(r.name for r in (proj / "runs").iterdir() if not r.name.startswith("."))
    assert runs == ["loss-1", "loss-2"], runs
    assert not list((proj / "runs").glob(".*.claim"))
