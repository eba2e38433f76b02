"""Issue 23: an asked-before `diffin top` reads its kept printout (run/printed.py, stdlib only)
while that printout belongs to the answer answers.load would read; otherwise it reads the answer."""
from __future__ import annotations

import json
import subprocess
import sys

from diffin_core.cli import main
from diffin_core.project.folder import Project
from diffin_core.run import answers, printed
from diffin_core.run.scoring import score, top_k

from helpers import make_tiny_project


def test_asked_again_prints_the_kept_text_while_it_is_the_answers(tmp_path, capsys):
    project = Project(make_tiny_project(tmp_path / "p"))
    run = score(project, "diffin", run="d")
    root = str(project.root)
    main(["top", root, "--run", "d", "-q", "5", "--k", "3"])           # new: certified, kept
    first = capsys.readouterr().out
    text = run / "answers" / "q5.k3.txt"
    assert text.is_file() and "(exact path: this query's own plan" in first
    main(["top", root, "--run", "d", "-q", "5", "--k", "3"])
    again = capsys.readouterr().out
    assert "answered before)" in again
    assert [ln.split() for ln in again.splitlines()[1:]] == [ln.split() for ln in first.splitlines()[1:]]
    # read without numpy, torch or pandas, and the same as reading the answer itself
    code = ("import sys; from diffin_core.run.printed import print_kept; out = []; "
            f"ok = print_kept({root!r}, 'd', [5], 3, echo=out.append); "
            "print(ok, 'numpy' in sys.modules, 'torch' in sys.modules, 'pandas' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["True", "False", "False", "False"]
    via_answer = []
    assert answers.print_cached(root, "d", [5], 3, via_answer.append)
    assert "\n".join(via_answer) == again.rstrip("\n")
    # another k has no printout yet: read from the answer, then kept
    assert not printed.print_kept(root, "d", [5], 2, lambda s: None)
    main(["top", root, "--run", "d", "-q", "5", "--k", "2"])
    capsys.readouterr()
    assert (run / "answers" / "q5.k2.txt").is_file()
    # a rebuilt store: the fast answer (and its printout) are not this store's
    meta = run / "features" / "meta.json"
    m = json.loads(meta.read_text())
    m["finished"] = float(m["finished"]) + 1.0
    meta.write_text(json.dumps(m))
    assert not printed.print_kept(root, "d", [5], 3, lambda s: None)
    m["finished"] -= 1.0
    meta.write_text(json.dumps(m))
    assert printed.print_kept(root, "d", [5], 3, lambda s: None)
    # the answer rewritten (a deeper grid): its old printout is not read
    ans = answers.load(run, [5])
    answers.save(run, [5], ans.influence, ans.exact, ans.path, uses_store=True, certified=ans.certified)
    assert not printed.print_kept(root, "d", [5], 3, lambda s: None)
    # the exact path's answer kept: it goes first, as answers.load reads it
    top_k(project, "d", [5], k=3, exact=True)
    assert not printed.print_kept(root, "d", [5], 3, lambda s: None)
    main(["top", root, "--run", "d", "-q", "5", "--k", "3"])
    exact_first = capsys.readouterr().out
    assert exact_first.startswith("(exact path (cached))") and (run / "topk" / "q5.k3.txt").is_file()
    main(["top", root, "--run", "d", "-q", "5", "--k", "3", "--exact"])
    assert capsys.readouterr().out == exact_first
    assert printed.query_key([17, 3, 3]) == answers.query_key([3, 17]) == "q3_17"
    long = list(range(0, 400, 3))
    assert printed.query_key(long) == answers.query_key(long) and printed.query_key(long).startswith("qset-")


def test_columns_are_kept_at_score_time_and_top_reads_them(tmp_path, capsys):
    """answers/columns.npz (the columns `diffin top` prints, numpy only) is published with the run:
    the first `top` reads it (never rewrites it), and it holds what the lazy write from
    scores.parquet holds (that write stays, for runs scored before)."""
    import numpy as np
    project = Project(make_tiny_project(tmp_path / "p"))
    run = score(project, "diffin", run="d")
    root = str(project.root)
    path = answers.columns_path(run)
    assert path.is_file()
    kept = answers.load_columns(run)
    answers.save_columns(tmp_path / "lazy", project.scores("d"))     # the lazy write, from the parquet
    lazy = answers.load_columns(tmp_path / "lazy")
    assert kept is not None and lazy is not None and kept.keys() == lazy.keys()
    for c in kept:
        assert kept[c].dtype == lazy[c].dtype and np.array_equal(kept[c], lazy[c]), c
    before = path.stat()
    main(["top", root, "--run", "d", "-q", "5", "--k", "3"])
    first = capsys.readouterr().out
    helpful, harmful = top_k(project, "d", [5], k=3)
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert [int(ln.split()[0]) for ln in first.splitlines()[4:7]] == helpful["sample_id"].tolist()
    # a run scored before this change (no columns.npz, no kept printout): `top` writes them, same answer
    path.unlink()
    (run / "answers" / "q5.k3.txt").unlink()
    main(["top", root, "--run", "d", "-q", "5", "--k", "3"])
    old_run = capsys.readouterr().out
    assert path.is_file()
    assert [ln.split() for ln in old_run.splitlines()[1:]] == [ln.split() for ln in first.splitlines()[1:]]
