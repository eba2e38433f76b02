"""Review as a team (issue 20): accounts, the serving policy, consensus review, agreement."""
from __future__ import annotations

import io
import json
import os
import stat

import numpy as np
import pandas as pd
import pytest

from diffin_core.cli import main
from diffin_core.errors import DiffinError
from diffin_core.workspace.accounts import Accounts, check_serving
from diffin_core.workspace.agreement import cohen_kappa, fleiss_kappa
from diffin_core.workspace.review import ReviewConflict, ReviewLog

PW = "correct horse battery"


# --- accounts ----------------------------------------------------------------------------------

def test_accounts_hash_passwords_and_verify(tmp_path):
    acc = Accounts(tmp_path)
    assert not acc.any()
    acc.add("ann", PW, "admin")
    acc.add("bob", PW + "!", "reviewer")
    text = (tmp_path / "users.json").read_text()
    assert PW not in text and "$argon2id$" in text                 # a hash, never the password
    assert stat.S_IMODE(os.stat(tmp_path / "users.json").st_mode) == 0o600
    assert acc.verify("ann", PW).role == "admin"
    assert acc.verify("bob", PW + "!").role == "reviewer"
    assert acc.verify("ann", PW + "!") is None and acc.verify("nobody", PW) is None
    assert acc.verify("ann", "") is None
    with pytest.raises(DiffinError, match="user 'ann' already exists"):
        acc.add("ann", PW, "reviewer")
    with pytest.raises(DiffinError, match="unknown role 'boss'"):
        acc.add("cy", PW, "boss")
    with pytest.raises(DiffinError, match="at least 8 characters"):
        acc.add("cy", "short", "reviewer")
    with pytest.raises(DiffinError, match="not allowed"):
        acc.add("../x", PW, "reviewer")
    acc.set_role("bob", "admin")
    acc.set_password("bob", "another password")
    assert acc.verify("bob", "another password").role == "admin" and acc.verify("bob", PW + "!") is None
    acc.remove("bob")
    assert [u.name for u in acc.users()] == ["ann"]


def test_serving_beyond_loopback_needs_accounts_or_a_deliberate_flag(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFIN_INSECURE_OPEN", raising=False)
    for local in ("127.0.0.1", "localhost", "::1", None):
        assert check_serving(local, tmp_path) == "local"          # today's single-user default
    with pytest.raises(DiffinError, match=r"refusing to serve on 0.0.0.0 without accounts.*--insecure-open"):
        check_serving("0.0.0.0", tmp_path)
    assert check_serving("0.0.0.0", tmp_path, insecure_open=True) == "open"
    monkeypatch.setenv("DIFFIN_INSECURE_OPEN", "1")
    assert check_serving("10.1.2.3", tmp_path) == "open"
    monkeypatch.delenv("DIFFIN_INSECURE_OPEN")
    assert check_serving("0.0.0.0", tmp_path, oidc=True) == "accounts"
    Accounts(tmp_path).add("ann", PW, "admin")
    assert check_serving("0.0.0.0", tmp_path) == "accounts"


def test_a_visitor_from_another_machine_is_refused_without_accounts(tmp_path, monkeypatch):
    """Streamlit started without server.address (run from another folder: no .streamlit/config.toml)
    listens on every interface while the app reads no address: the connection's own address decides."""
    monkeypatch.delenv("DIFFIN_INSECURE_OPEN", raising=False)
    for client in (None, "127.0.0.1", "::1", "127.0.0.5", "::ffff:127.0.0.1"):
        assert check_serving(None, tmp_path, client=client) == "local"
    for address in (None, "", "127.0.0.1"):
        with pytest.raises(DiffinError, match=r"refusing to serve ::ffff:10\.0\.0\.7 without accounts"):
            check_serving(address, tmp_path, client="::ffff:10.0.0.7")
        with pytest.raises(DiffinError, match=r"refusing to serve 10\.0\.0\.7 without accounts: this server is "
                                              r"reachable from other machines.*--insecure-open"):
            check_serving(address, tmp_path, client="10.0.0.7")
    assert check_serving(None, tmp_path, insecure_open=True, client="10.0.0.7") == "open"
    Accounts(tmp_path).add("ann", PW, "admin")
    assert check_serving(None, tmp_path, client="10.0.0.7") == "accounts"


def _cli(args, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_users_cli_and_serve_check(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DIFFIN_INSECURE_OPEN", raising=False)
    ws = str(tmp_path)
    code, _, err = _cli(["serve-check", "--address", "0.0.0.0", "--workspace", ws], capsys)
    assert code == 2 and err.count("\n") == 1 and "refusing to serve on 0.0.0.0 without accounts" in err
    code, _, err = _cli(["serve-check", "--address", "0.0.0.0", "--workspace", ws, "--insecure-open"], capsys)
    assert code == 0 and "WITHOUT sign-in" in err
    code, out, _ = _cli(["users", "add", "ann", "--role", "admin", "--workspace", ws, "--password-stdin"], capsys,
                        PW + "\n", monkeypatch)
    assert code == 0 and "added ann (admin)" in out
    assert Accounts(tmp_path).verify("ann", PW).role == "admin"   # the newline is not part of it
    code, _, err = _cli(["users", "add", "bob", "--role", "boss", "--workspace", ws, "--password-stdin"], capsys,
                        PW + "\n", monkeypatch)
    assert code == 2 and err == "error: unknown role 'boss' (expected admin or reviewer)\n"
    code, _, err = _cli(["users", "add", "bob", "--role", "reviewer", "--workspace", ws, "--password-stdin"],
                        capsys, "short\n", monkeypatch)
    assert code == 2 and "at least 8 characters" in err and err.count("\n") == 1
    code, out, _ = _cli(["users", "list", "--workspace", ws], capsys)
    assert out == "ann\tadmin\n"
    code, _, err = _cli(["serve-check", "--address", "0.0.0.0", "--workspace", ws], capsys)
    assert code == 0 and "sign-in required" in err
    code, _, err = _cli(["users", "remove", "zed", "--workspace", ws], capsys)
    assert code == 2 and "no user 'zed'" in err


def test_run_sh_checks_before_serving():
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "scripts" / "run.sh").read_text()
    check = text.index("diffin_core.cli serve-check")
    assert check < text.index("exec streamlit run") and "--insecure-open" in text


# --- consensus review --------------------------------------------------------------------------

def test_k1_is_latest_wins_and_reviewers_undo_only_their_own(tmp_path):
    log = ReviewLog(tmp_path)
    assert log.reviewers_per_sample() == 1
    log.decide(3, "exclude", user="ann")
    with pytest.raises(DiffinError, match=r"the decision on sample 3 is ann's \(exclude\): only ann or an admin"):
        log.undo_sample(3, user="bob", any_user=False)
    assert log.state().loc[3, "action"] == "exclude"
    assert log.undo(user="bob") is None                          # history undo: bob has nothing
    assert log.undo_sample(3, user="root", any_user=True) == "exclude"   # an admin may
    assert 3 not in log.state().index
    log.decide(4, "keep", user="bob")
    assert log.undo_sample(4, user="bob", any_user=False) == "keep"


def test_consensus_agree_disagree_resolve(tmp_path):
    log = ReviewLog(tmp_path)
    log.set_reviewers_per_sample(2, user="ann")
    assert log.reviewers_per_sample() == 2
    with pytest.raises(DiffinError, match="reviewers per sample must be 1 to 20, not 0"):
        log.set_reviewers_per_sample(0)
    # sample 1: both exclude -> decided; sample 2: they differ -> disagreement; sample 3: one vote
    seen_b = log.versions([1, 2], user="bob")
    log.decide(1, "exclude", user="ann", seen=log.versions([1], user="ann")[1])
    log.decide(2, "keep", user="ann")
    log.decide(1, "exclude", user="bob", seen=seen_b[1])      # ann's vote is not a stale-page conflict
    log.decide(2, "relabel", new_label=5, user="bob", seen=seen_b[2])
    log.decide(3, "keep", user="bob")
    st = log.state()
    assert list(st.index) == [1] and st.loc[1, "how"] == "consensus" and st.loc[1, "user"] == "ann+bob"
    dis = log.disagreements()
    assert dis["sample_id"].tolist() == [2] and dis.loc[0, "votes"] == "ann: keep; bob: relabel:5"
    # the queue: ann skips what she voted on and what has k votes; bob likewise
    assert log.queue_done("ann") == {1, 2} and log.queue_done("bob") == {1, 2, 3}
    assert log.queue_done("cy") == {1, 2}
    # a reviewer changing their own vote is checked against their own events only
    v = log.versions([2], user="ann")[2]
    log.decide(3, "keep", user="ann")                         # activity elsewhere changes nothing
    log.decide(2, "relabel", new_label=5, user="ann", seen=v)  # ann comes round: now they agree
    assert log.state().loc[2, "how"] == "consensus" and log.disagreements().empty
    log.undo(user="ann")
    log.undo(user="ann")                                       # back to ann: keep on 2
    assert log.disagreements()["sample_id"].tolist() == [2]
    # an admin resolves: the resolution overrides the votes, and a stale resolve is refused
    seen = log.versions([2])[2]
    log.decide(2, "exclude", user="root", resolution=True, seen=seen)
    with pytest.raises(ReviewConflict):
        log.decide(2, "keep", user="root2", resolution=True, seen=seen)
    st = log.state()
    assert st.loc[2, "action"] == "exclude" and st.loc[2, "how"] == "resolution" and st.loc[2, "user"] == "root"
    assert log.disagreements().empty
    counts = log.reviewer_counts().set_index("user")
    assert counts.loc["bob", "decided"] == 3 and counts.loc["root", "resolutions"] == 1
    assert log.undo_sample(2, user="root", any_user=True) == "exclude"   # the admin's undo takes the resolution
    assert log.disagreements()["sample_id"].tolist() == [2]


def test_kappas_match_sklearn_and_the_fleiss_example():
    from sklearn.metrics import cohen_kappa_score
    a = ["keep", "keep", "exclude", "relabel:3", "keep", "exclude"]
    b = ["keep", "exclude", "exclude", "relabel:3", "keep", "keep"]
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))
    assert cohen_kappa(["keep"] * 3, ["keep"] * 3) is None        # undefined, not a fake 1.0
    # Fleiss (1971) as in Wikipedia's worked example: 10 subjects, 14 raters, 5 categories -> 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    ratings = [[c for c, n in enumerate(row) for _ in range(n)] for row in table]
    assert fleiss_kappa(ratings) == pytest.approx(0.2099, abs=5e-4)
    # two raters: Fleiss' kappa is Scott's pi; perfect agreement is 1
    assert fleiss_kappa([["keep", "keep"], ["exclude", "exclude"]]) == pytest.approx(1.0)


def test_log_agreement_over_votes(tmp_path):
    log = ReviewLog(tmp_path)
    log.set_reviewers_per_sample(2)
    for sid, (x, y) in enumerate([("keep", "keep"), ("exclude", "exclude"), ("keep", "exclude"), ("exclude", "exclude")]):
        log.decide(sid, x, user="ann")
        log.decide(sid, y, user="bob")
    ag = log.agreement()
    assert ag["samples"] == 4 and ag["pairs"][0]["n"] == 4
    # observed 3/4; ann 2 keep 2 exclude, bob 1 keep 3 exclude: pe = (2*1 + 2*3)/16 = 0.5 -> 0.5
    assert ag["pairs"][0]["cohen"] == pytest.approx(0.5)
    assert ag["fleiss"] is not None


# --- bounds and the export ---------------------------------------------------------------------

def test_review_log_refuses_labels_and_ids_outside_the_project(tmp_path):
    log = ReviewLog(tmp_path, num_classes=10, sample_ids=range(100))
    with pytest.raises(DiffinError, match=r"label 99 is out of range: the project has 10 classes \(0..9\)"):
        log.decide(3, "relabel", new_label=99)
    with pytest.raises(DiffinError, match=r"sample id 1000000000 is not in the training split \(100 samples"):
        log.decide(10**9, "exclude")
    assert log.history().empty


def test_review_log_reads_its_bounds_from_the_project(tmp_path):
    from helpers import make_tiny_project
    proj = make_tiny_project(tmp_path / "p")
    log = ReviewLog(proj)
    with pytest.raises(DiffinError, match="label 99 is out of range"):
        log.decide(0, "relabel", new_label=99)
    with pytest.raises(DiffinError, match="sample id 1000000000 is not in the training split"):
        log.decide(10**9, "keep")


def test_export_takes_the_resolved_decision_and_records_who(tmp_path):
    from diffin_core.workspace.export import export_split, manifest_path
    log = ReviewLog(tmp_path, num_classes=4, sample_ids=range(6))
    log.set_reviewers_per_sample(2)
    log.decide(1, "exclude", user="ann")
    log.decide(1, "keep", user="bob")                      # disagreement ...
    log.decide(1, "relabel", new_label=2, user="root", resolution=True)   # ... resolved: relabel to 2
    log.decide(4, "exclude", user="ann")
    log.decide(4, "exclude", user="bob")                   # consensus exclude
    log.decide(5, "exclude", user="ann")                   # one vote: undecided, kept
    x, y, ids = np.arange(12, dtype=np.float32).reshape(6, 2), np.array([0, 1, 0, 1, 3, 3]), np.arange(6)
    out = export_split(tmp_path / "clean.npz", "npz", x, y, ids, log.state(), manifest_extra={},
                       votes=log.votes(), num_classes=4)
    with np.load(out) as z:
        assert z["ids"].tolist() == [0, 1, 2, 3, 5] and z["y"].tolist() == [0, 2, 0, 1, 3]
    man = {s["sample_id"]: s for s in json.loads(manifest_path(out).read_text())["samples"]}
    assert man[1]["decision"] == "relabel" and man[1]["decided_by"] == "root" and man[1]["how"] == "resolution"
    assert [(v["user"], v["action"]) for v in man[1]["votes"]] == [("ann", "exclude"), ("bob", "keep")]
    assert man[4]["decided_by"] == "ann+bob" and man[4]["how"] == "consensus" and man[4]["decided_at"]
    assert man[5]["decision"] == "undecided" and man[5]["votes"][0]["user"] == "ann"
    assert "decided_by" not in man[0]
    # a relabel outside the classes never reaches a file
    bad = pd.DataFrame({"action": ["relabel"], "label": pd.array([99], dtype="Int64")}, index=[2])
    with pytest.raises(DiffinError, match=r"sample 2 is relabelled to 99, outside the 4 classes"):
        export_split(tmp_path / "bad.npz", "npz", x, y, ids, bad, manifest_extra={}, num_classes=4)
    assert not (tmp_path / "bad.npz").exists()


def test_under_consensus_a_reviewer_undoes_only_their_own_vote(tmp_path):
    log = ReviewLog(tmp_path)
    log.set_reviewers_per_sample(2)
    log.decide(1, "exclude", user="ann")
    log.decide(1, "exclude", user="bob")
    assert log.state().loc[1, "how"] == "consensus"
    assert log.undo_sample(1, user="bob", any_user=False) == "exclude"     # bob's vote goes ...
    votes = log.votes()
    assert votes["user"].tolist() == ["ann"] and 1 not in log.state().index  # ... ann's stays: pending again
    with pytest.raises(DiffinError, match="is ann's"):
        log.undo_sample(1, user="bob", any_user=False)                       # nothing of bob's left
    assert log.undo(user="bob") is None


def test_bounds_follow_a_new_upload(tmp_path):
    from helpers import make_tiny_project
    proj = make_tiny_project(tmp_path / "p", n=96)
    log = ReviewLog(proj)
    log.decide(95, "keep")
    with pytest.raises(DiffinError, match="sample id 150 is not in the training split"):
        log.decide(150, "keep")
    import time
    time.sleep(0.01)
    make_tiny_project(proj, n=200)                                          # the train split re-uploaded
    log.decide(150, "keep")
    assert 150 in log.state().index
