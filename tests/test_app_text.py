"""Text in every page (AppTest): the text sample opens from Home; Explore shows text cards and
finds samples by a piece of their text or by id; Review shows the whole text; Export writes the
input's own format, byte for byte except the decisions."""
from __future__ import annotations

import html
import json
import time

import numpy as np
import pandas as pd
import pytest
from app_fixtures import jobs, new_app, texts, workspace  # noqa: F401
from text_fixtures import text_project, text_sample  # noqa: F401

from diffin_core.workspace.review import ReviewLog

pytestmark = pytest.mark.slow


def html_bodies(at) -> list[str]:
    return [e.proto.body for e in at.get("html")]


@pytest.fixture
def opened(workspace, text_project):
    """The scored text sample, opened from Home's "Try the text sample" button."""
    assert text_project.parent == workspace
    at = new_app()
    at.button(key="home_text_sample").click().run()
    assert at.session_state["project_dir"] == str(text_project.resolve())
    assert not at.exception
    return at


def wait_jobs(at, jm, seconds=240):
    deadline = time.monotonic() + seconds
    while jm.active() and time.monotonic() < deadline:
        time.sleep(0.5)
    at.run()


def test_explore_text_cards_search_and_topk(opened, text_project, jobs):
    at = opened
    train = pd.read_csv(text_project / "data/train.tsv", sep="\t", dtype=str, keep_default_na=False, quoting=3)
    at.switch_page("pages/3_Explore.py").run()
    at.selectbox(key="explore_run").set_value("tracin-1").run()
    assert "Search" in at.radio(key="explore_view").options
    q0 = pd.read_csv(text_project / "data/query.tsv", sep="\t", dtype=str, keep_default_na=False, quoting=3)["text"][0]
    assert any(html.escape(q0[:40]) in b for b in html_bodies(at))     # the query's text
    at.button(key="explore_topk").click().run()
    wait_jobs(at, jobs)
    assert not at.exception, at.exception
    cards = [b for b in html_bodies(at) if "diffin-text" in b]
    assert len(cards) >= 1 + 2 * 8                                       # the query + two grids of 8 cards
    assert any("· label **" in c and " · pred " in c and "influence" in c for c in texts(at.caption))

    at.radio(key="explore_view").set_value("Search").run()
    word = "call"
    at.text_input(key="explore_search_q").set_value(word.upper()).run()     # case-insensitive
    hits = train[train["text"].str.casefold().str.contains(word)]
    assert any(f"**{len(hits)} match" in m for m in texts(at.markdown))
    sid = int(train["sample_id"][3])
    at.text_input(key="explore_search_q").set_value(f"#{sid}").run()
    assert any("**1 match**" in m for m in texts(at.markdown))
    assert any(f"#{sid} · label" in c for c in texts(at.caption))
    at.text_input(key="explore_search_q").set_value("zzqqxx-no-such-text").run()
    assert any("No training sample matches" in m for m in texts(at.info))


def test_review_shows_the_whole_text_and_export_is_faithful(opened, text_project, jobs):
    at = opened
    at.switch_page("pages/4_Review.py").run()
    train = pd.read_csv(text_project / "data/train.tsv", sep="\t", dtype=str, keep_default_na=False, quoting=3)
    text_of = dict(zip(train["sample_id"].astype(int), train["text"]))
    decided = []
    for action in ("exclude", "exclude", "keep", "relabel", "exclude"):
        sid = int(next(h for h in texts(at.subheader) if h.startswith("Sample ")).split()[1])
        full = [b for b in html_bodies(at) if "diffin-text-full" in b]
        assert len(full) == 1 and html.escape(text_of[sid]) in full[0]      # the whole text, escaped
        at.button(key=f"review_{action}").click().run()
        decided.append((sid, action))
    assert not at.exception
    sid = int(next(h for h in texts(at.subheader) if h.startswith("Sample ")).split()[1])
    at.button(key=f"review_tokens_{sid}").click().run()        # token highlights, in a child process
    wait_jobs(at, jobs)
    assert any("diffin-text-tokens" in b for b in html_bodies(at)), texts(at.caption)
    assert any("gradient x input" in c.lower() for c in texts(at.caption))
    at.switch_page("pages/5_Export.py").run()
    assert at.selectbox(key="export_format").value == "tsv"
    at.button(key="export_write").click().run()
    out = next(p for p in (text_project / "exports").iterdir() if p.suffix == ".tsv")
    src_lines = (text_project / "data/train.tsv").read_bytes().split(b"\n")
    got_lines = out.read_bytes().split(b"\n")
    state = ReviewLog(text_project).state()
    excluded = {s for s, a in decided if a == "exclude"}
    relabelled = {s for s, a in decided if a == "relabel"}
    expect = [src_lines[0]]
    for ln in src_lines[1:]:
        if not ln:
            expect.append(ln)
            continue
        sid, label, rest = ln.split(b"\t", 2)
        if int(sid) in excluded:
            continue
        if int(sid) in relabelled:
            label = [b"ham", b"spam"][int(state.loc[int(sid), "label"])]
        expect.append(b"\t".join([sid, label, rest]))
    assert got_lines == expect
    man = json.loads(out.with_name(out.stem + ".decisions.json").read_text())
    assert man["faithful"] and man["n_written"] == 160 - len(excluded)


def test_explore_plans_ahead_on_a_run_without_a_store(opened, text_project, jobs):
    """A diffin run of the text sample (Adam's batch-order replay: no feature store): after the
    first query's grid, the next queries of its class are answered in the background by their
    exact path, so opening them reads the kept answer (diffin top's "(cached)")."""
    from diffin_core.run import answers
    from diffin_core.run.features import plan_ahead_queue
    from diffin_core.run.scoring import score
    from diffin_core.project.folder import Project
    score(text_project, "diffin", run="diffin-1", features=False)     # no store (its query-span store: test_span_store)
    project = Project(text_project)
    assert not (text_project / "runs/diffin-1/features/meta.json").is_file()
    at = opened
    at.switch_page("pages/3_Explore.py").run()
    at.selectbox(key="explore_run").set_value("diffin-1").run()
    at.button(key="explore_topk").click().run()
    wait_jobs(at, jobs, 600)                       # the query's own exact path, then its grid
    assert not at.exception, at.exception
    assert any("Planning ahead" in c for c in texts(at.caption)), texts(at.caption)
    wait_jobs(at, jobs, 900)                       # the planning-ahead job
    for qi in plan_ahead_queue(project, "diffin-1", 0):
        a = answers.load(project.run("diffin-1").path, [qi])
        assert a is not None and a.all_exact, qi


def test_the_maps_hover_shows_the_text(opened, text_project):
    """Explore's map of a text project: each point's hover carries its text (first 120
    characters, escaped, newlines as spaces) under its id, label and prediction."""
    scores = pd.read_parquet(text_project / "runs/tracin-1/scores.parquet")
    rng = np.random.default_rng(0)
    pd.DataFrame({"sample_id": scores["sample_id"], "umap_x": rng.random(len(scores)),
                  "umap_y": rng.random(len(scores))}).to_parquet(text_project / "runs/tracin-1/umap.parquet")
    at = opened
    at.switch_page("pages/3_Explore.py").run()
    at.selectbox(key="explore_run").set_value("tracin-1").run()
    at.radio(key="explore_view").set_value("Map").run()
    assert not at.exception, at.exception
    charts = at.get("plotly_chart")
    assert len(charts) == 1
    fig = json.loads(charts[0].proto.spec)
    trace = fig["data"][0]
    assert "sample %{customdata[0]}" in trace["hovertemplate"] and "<br>%{customdata[4]}" in trace["hovertemplate"]
    train = pd.read_csv(text_project / "data/train.tsv", sep="\t", dtype=str, keep_default_na=False, quoting=3)
    text_of = dict(zip(train["sample_id"].astype(int), train["text"]))
    custom = [row for t in fig["data"] for row in t.get("customdata", [])]
    assert len(custom) == len(train)
    for sid, *_rest, shown in custom:
        full = text_of[int(sid)].replace("\n", " ")
        want = html.escape(full if len(full) <= 120 else full[:119] + "…")
        assert shown == want, (sid, shown, want)


def test_a_long_text_card_is_cut_with_the_whole_text_behind_more(opened, text_project):
    """A card shows the first 180 characters; the whole text (escaped) opens behind "more"."""
    train = pd.read_csv(text_project / "data/train.tsv", sep="\t", dtype=str, keep_default_na=False, quoting=3)
    longest = train.loc[train["text"].str.len().idxmax()]
    assert len(longest["text"]) > 180
    at = opened
    at.switch_page("pages/3_Explore.py").run()
    at.selectbox(key="explore_run").set_value("tracin-1").run()
    at.radio(key="explore_view").set_value("Search").run()
    at.text_input(key="explore_search_q").set_value(f"#{longest['sample_id']}").run()
    assert not at.exception, at.exception
    cards = [b for b in html_bodies(at) if 'class="diffin-text"' in b]
    assert len(cards) == 1 and cards[0].startswith("<details"), cards
    summary = cards[0].split("<summary", 1)[1].split("</summary>", 1)[0]
    assert html.escape(longest["text"][:180].rstrip()) + "…" in summary
    assert f"(more, {len(longest['text']):,} characters)" in summary
    assert cards[0].split("</summary>", 1)[1].startswith(html.escape(longest["text"]))
