"""Two signed-in app sessions (issue 20): an admin (ann) and a reviewer (bob) on one project.

A reviewer cannot open Setup (not in the navigation, and the page itself refuses); bob cannot
undo ann's decision; with 2 reviewers per sample their disagreement reaches ann's queue, she
resolves it, and the export carries the resolved decision and every vote.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from app_fixtures import (APP, PAGES, TIMEOUT, add_users, current_sample, jobs, loss_run, new_app,  # noqa: F401
                          scored, sign_in, texts, workspace)

from diffin_core.workspace.review import ReviewLog


def test_sign_in_is_required_once_the_workspace_has_accounts(workspace):
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()   # no accounts: single user, as before
    assert not at.exception and "diffin: sign in" not in texts(at.title)
    add_users(workspace, ann="admin", bob="reviewer")
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert texts(at.title) == ["diffin: sign in"] and not at.text_input(key="signin_name").value
    sign_in(at, "bob", "not bob's password")
    assert texts(at.error) == ["Wrong user name or password."] and "auth_user" not in at.session_state
    sign_in(at, "bob")
    assert at.session_state["auth_user"]["name"] == "bob"
    assert any("Signed in as **bob** (reviewer)" in c for c in texts(at.sidebar.caption))
    with pytest.raises(ValueError, match="Could not find a navigation page"):   # not in bob's sidebar
        at.switch_page(str(PAGES / "1_Setup.py"))
    # and the page itself refuses a reviewer, however it is reached
    for page in ("1_Setup.py", "2_Score.py", "5_Export.py"):
        direct = AppTest.from_file(str(PAGES / page), default_timeout=TIMEOUT)
        direct.session_state["auth_user"] = {"name": "bob", "source": "local"}
        direct.run()
        assert any("is for admins: you are signed in as bob (reviewer)" in e for e in texts(direct.error)), page
        assert not direct.file_uploader
    at.button(key="signout").click().run()
    assert "auth_user" not in at.session_state and "signout" not in [b.key for b in at.sidebar.button]


def test_two_users_undo_consensus_and_the_resolved_export(scored):
    add_users(scored.parent, ann="admin", bob="reviewer")
    scores = pd.read_parquet(scored / "runs/loss-1/scores.parquet")
    ranked = scores.sort_values("label_issue", ascending=False, kind="stable")["sample_id"].tolist()
    given = scores.set_index("sample_id")["label"]
    ann = new_app(scored, "pages/4_Review.py", user="ann")
    bob = new_app(scored, "pages/4_Review.py", user="bob")
    assert "review_user" not in [t.key for t in ann.text_input]      # no name box: the sign-in is who

    # k = 1: ann excludes the first suspect; bob cannot undo it
    ann.button(key="review_exclude").click().run()
    bob.run()
    bob.number_input(key="review_open_id").set_value(ranked[0]).run()
    bob.button(key="review_open").click().run()
    assert current_sample(bob) == ranked[0]
    bob.button(key="review_undo_sample").click().run()
    assert any("is ann's (exclude): only ann or an admin can undo it" in e for e in texts(bob.error))
    state = ReviewLog(scored).state()
    assert state.loc[ranked[0], "action"] == "exclude" and state.loc[ranked[0], "user"] == "ann"
    assert "review_undo" not in [b.key for b in bob.button]             # bob has no decision to undo
    bob.button(key="review_back").click().run()

    # ann asks for 2 reviewers per sample
    ann.number_input(key="review_k").set_value(2).run()
    ann.button(key="review_k_save").click().run()
    assert ReviewLog(scored).reviewers_per_sample() == 2
    bob.run()
    assert current_sample(bob) == ranked[0]          # one vote (ann's) so far: bob's turn
    assert current_sample(ann) == ranked[1]          # ann voted on ranked[0] already
    bob.button(key="review_keep").click().run()      # bob disagrees with ann's exclude
    assert not bob.error, texts(bob.error)
    assert current_sample(bob) == ranked[1]
    # the same sample decided by both at once is not a conflict under consensus
    ann.button(key="review_keep").click().run()      # ranked[1]
    bob.button(key="review_keep").click().run()      # ranked[1]
    assert not ann.error and not bob.error, texts(ann.error) + texts(bob.error)
    log = ReviewLog(scored)
    assert log.state().loc[ranked[1], "how"] == "consensus"
    assert log.disagreements()["sample_id"].tolist() == [ranked[0]]
    assert "review_mode" not in [r.key for r in bob.radio]             # reviewers have no resolve queue

    # the disagreement reaches ann's queue; she resolves it with a relabel
    ann.run()
    assert any("1 disagreements waiting for an admin" in c for c in texts(ann.caption)), texts(ann.caption)
    ann.radio(key="review_mode").set_value("disagreements").run()
    assert current_sample(ann) == ranked[0]
    assert any("ann: exclude" in m and "bob: keep" in m for m in texts(ann.markdown))
    new_label = next(y for y in (3, 4) if y != int(given[ranked[0]]))
    ann.selectbox(key=f"review_new_label_{ranked[0]}").set_value(new_label).run()
    ann.button(key="review_relabel").click().run()
    assert not ann.error, texts(ann.error)
    state = ReviewLog(scored).state()
    assert state.loc[ranked[0], "action"] == "relabel" and state.loc[ranked[0], "how"] == "resolution"
    assert any("No disagreement is waiting" in s for s in texts(ann.success))

    # the Team section: per-reviewer counts and agreement
    counts = next(d.value for d in ann.dataframe if "resolutions" in d.value.columns).set_index("user")
    assert counts.loc["bob", "decided"] == 2 and counts.loc["ann", "resolutions"] == 1
    metrics = {m.label: m.value for m in ann.metric}
    assert metrics["Samples with 2+ reviewers"] == "2" and "Fleiss' kappa" in metrics

    # the export (ann is an admin) carries the resolved decision and who decided what
    ann.switch_page("pages/5_Export.py").run()
    ann.button(key="export_write").click().run()
    assert not ann.error, texts(ann.error)
    out = scored / "exports" / "mnist-sample-clean-npz.npz"
    from diffin_core.workspace.export import written_ids
    with np.load(out) as z:
        ids = written_ids(out).tolist()                       # the rows' ids, from the decisions manifest
        assert len(ids) == 4000
        row = ids.index(ranked[0])
        assert int(z["y"][row]) == new_label
    man = json.loads(out.with_name(out.stem + ".decisions.json").read_text())
    s0 = next(s for s in man["samples"] if s["sample_id"] == ranked[0])
    assert (s0["decision"], s0["final_label"], s0["decided_by"], s0["how"]) == ("relabel", new_label, "ann", "resolution")
    assert [(v["user"], v["action"]) for v in s0["votes"]] == [("ann", "exclude"), ("bob", "keep")]
    s1 = next(s for s in man["samples"] if s["sample_id"] == ranked[1])
    assert s1["decided_by"] == "ann+bob" and s1["how"] == "consensus"
    assert man["review"] == {"reviewers_per_sample": 2, "exported_by": "ann", "unresolved_disagreements": []}


def test_an_admin_manages_users_in_the_app_and_a_reviewer_cannot(workspace):
    from diffin_core.workspace.accounts import Accounts
    add_users(workspace, ann="admin", bob="reviewer")
    ann = new_app(user="ann")
    ann.text_input(key="users_new_name").set_value("cy")
    ann.text_input(key="users_new_password").set_value("short")
    ann.button(key="users_add").click().run()
    assert any("at least 8 characters" in e for e in texts(ann.error))
    ann.text_input(key="users_new_password").set_value("a long enough one")
    ann.button(key="users_add").click().run()
    assert Accounts(workspace).verify("cy", "a long enough one").role == "reviewer"
    ann.button(key="users_role_cy").click().run()
    assert Accounts(workspace).get("cy").role == "admin"
    ann.button(key="users_remove_ann").click().run()                 # not your own account
    assert any("cannot change or remove your own account" in e for e in texts(ann.error))
    assert Accounts(workspace).get("ann") is not None
    bob = new_app(user="bob")
    assert not [b for b in bob.button if b.key.startswith("users_")]


def test_the_app_refuses_to_serve_beyond_loopback_without_accounts(workspace, monkeypatch):
    from streamlit import config
    from streamlit.testing.v1 import AppTest
    monkeypatch.delenv("DIFFIN_INSECURE_OPEN", raising=False)
    old = config.get_option("server.address")
    config.set_option("server.address", "0.0.0.0")
    try:
        at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
        assert any("refusing to serve on 0.0.0.0 without accounts" in e for e in texts(at.error))
        assert not at.button and not at.selectbox          # nothing of the app
        monkeypatch.setenv("DIFFIN_INSECURE_OPEN", "1")   # opened on purpose: the single-user app
        at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
        assert not at.error and "diffin: sign in" not in texts(at.title)
    finally:
        config.set_option("server.address", old)


def test_a_visitor_from_another_machine_is_refused_without_accounts(workspace, monkeypatch):
    """No server.address set (Streamlit then listens on every interface): a session whose
    connection comes from another machine gets the refusal, not the single-user app."""
    import _common
    from streamlit.testing.v1 import AppTest
    monkeypatch.delenv("DIFFIN_INSECURE_OPEN", raising=False)
    monkeypatch.setattr(_common, "client_address", lambda: "10.0.0.7")
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert any("refusing to serve 10.0.0.7 without accounts" in e for e in texts(at.error)), texts(at.error)
    assert not at.button and not at.selectbox
    monkeypatch.setattr(_common, "client_address", lambda: None)     # this machine's own browser
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.error and "diffin: sign in" not in texts(at.title)
    add_users(workspace, ann="admin")                                   # with accounts: the sign-in
    monkeypatch.setattr(_common, "client_address", lambda: "10.0.0.7")
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert texts(at.title) == ["diffin: sign in"] and not at.error


# --- OIDC (st.login) configured from secrets.toml: the configuration path, no real provider ------
AUTH = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "x" * 32,
        "client_id": "diffin-test", "client_secret": "not-a-secret",
        "server_metadata_url": "https://idp.invalid/.well-known/openid-configuration"}


def test_oidc_from_secrets_offers_the_provider_and_signs_in_its_user(workspace):
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.secrets["auth"] = dict(AUTH)                # no local accounts: OIDC alone requires sign-in
    at.user = {"is_logged_in": False}
    at.run()
    assert not at.exception and texts(at.title) == ["diffin: sign in"]
    assert [b.label for b in at.button if b.key == "signin_oidc"] == ["Sign in with your identity provider"]
    # back from the provider (st.user filled by Streamlit): the e-mail names the reviewer
    add_users(workspace, **{"ann@example.org": "admin"})
    for email, role in (("ann@example.org", "admin"), ("carl@example.org", "reviewer")):
        at = AppTest.from_file(APP, default_timeout=TIMEOUT)
        at.secrets["auth"] = dict(AUTH)
        at.user = {"is_logged_in": True, "email": email, "name": email.split("@")[0].title()}
        at.run()
        assert not at.exception and "diffin: sign in" not in texts(at.title)
        assert at.session_state["auth_user"] == {"name": email, "source": "oidc"}
        assert any(f"Signed in as **{email}** ({role})" in c for c in texts(at.sidebar.caption)), texts(at.sidebar.caption)


def test_oidc_configured_reads_the_auth_table_of_secrets_toml(tmp_path, monkeypatch, capsys):
    from diffin_core.cli import main
    from diffin_core.workspace.accounts import oidc_configured
    folder = tmp_path / ".streamlit"
    folder.mkdir()
    assert not oidc_configured((folder,))                               # no secrets.toml
    (folder / "secrets.toml").write_text('[other]\nkey = "v"\n')
    assert not oidc_configured((folder,))                               # no [auth] table
    (folder / "secrets.toml").write_text("[auth\nbroken")
    assert not oidc_configured((folder,))                               # unreadable: not configured
    (folder / "secrets.toml").write_text("[auth]\n" + "".join(f'{k} = "{v}"\n' for k, v in AUTH.items()))
    assert oidc_configured((tmp_path / "none", folder))
    # serve-check: OIDC counts as sign-in beyond loopback (read from ./.streamlit/secrets.toml)
    monkeypatch.delenv("DIFFIN_INSECURE_OPEN", raising=False)
    monkeypatch.chdir(tmp_path)
    ws = tmp_path / "ws"
    ws.mkdir()
    main(["serve-check", "--address", "0.0.0.0", "--workspace", str(ws)])
    assert "OIDC from secrets.toml" in capsys.readouterr().err
    (folder / "secrets.toml").unlink()
    if not oidc_configured((Path.home() / ".streamlit",)):              # this machine's own: none
        with pytest.raises(SystemExit) as e:
            main(["serve-check", "--address", "0.0.0.0", "--workspace", str(ws)])
        assert e.value.code == 2 and "refusing to serve on 0.0.0.0" in capsys.readouterr().err
