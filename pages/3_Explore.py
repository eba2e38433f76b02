"""Explore a run: top-k helpful/harmful samples for a query, the training-set map, histograms, run comparison."""
import sys
from pathlib import Path

import numpy as np
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as ui  # noqa: E402
from _common import influence_views as iv  # noqa: E402
from _common import triage_views as tri  # noqa: E402
from diffin_core.tasks import compare
from diffin_core.tasks import maps  # noqa: E402
from diffin_core.run import features as F  # noqa: E402
from diffin_core.errors import DiffinError  # noqa: E402
from diffin_core.run.scoring import top_k, topk_cache_path  # noqa: E402

project = ui.page("Explore", "🧭")
run = ui.chosen_run(project, key="explore_run")
scores = ui.scores(project, run)
jm = ui.job_manager()
st.caption("Influence > 0: helpful (removing the sample would raise the query loss); < 0: harmful.")
for _entry in project.run(run).meta.get("approximations") or []:      # what the run's estimate approximates
    st.caption(f"{run} approximates: {_entry}")
# Only the chosen view runs and is sent (tabs would send the 50k-point map on every visit).


def rescore_grid(project, run: str, qi: int, auto: bool, k: int = 10) -> None:
    """Rescore the store's shortlist for query ``qi`` by the exact path in the background
    worker's child process (the model never runs in the server); the grid then redraws from the
    cache that job writes (scoring.rescore_for). ``auto``: start at once, cancelling this
    session's rescore of an earlier query that has not finished; otherwise offer a button."""
    jkey = f"explore_rescore_job_{run}_{qi}_{max(int(k), 10)}"
    info = jm.get(st.session_state.get(jkey, ""))
    if info is None or info.status == "cancelled":
        if not auto and not st.button(
                "Rescore with the exact path", key="explore_rescore",
                help="Runs the exact path's own plan for this query and rescores the store's shortlist "
                     "(top 2% per side) in the background; the grid then shows exact values."):
            return
        ui.user_first()                    # the user's query first: planning ahead waits behind it
        earlier = st.session_state.get("explore_rescore_active")
        if earlier and earlier != jkey:
            jm.cancel(st.session_state.get(earlier, ""))       # a stale query's rescore: not needed
        st.session_state[jkey] = jm.submit_child(
            "rescore", "diffin_core.run.scoring:rescore_for", (str(project.root), run, [int(qi)]), {"k": int(k)},
            label=f"rescore top-k for query {int(qi)} ({run})", project_dir=str(project.root),
            with_progress=False, warm=F.warm_key(project, run))     # the run's warm child: no start-up after the first
        st.session_state["explore_rescore_active"] = jkey
        if not auto:
            st.rerun()
        info = jm.get(st.session_state[jkey])
    if info.status == "failed":
        st.error(f"Rescoring failed: {info.error}")
        return

    ui.wait_for_job(st.session_state[jkey],
                    lambda job: f"Rescoring the shortlist with the exact path in the background: {job.status}")


def _saved_selections() -> dict:
    from diffin_core.workspace import selections
    try:
        return selections.load(project.root)
    except DiffinError as e:
        st.error(e.brief())
        return {}


def plan_ahead(project, run: str, qi: int, k: int, warm: bool = False) -> None:
    """Answer the next queries of ``qi``'s class in the background (scoring.answer_ahead), so that
    opening them draws the exact grid at once; bounded (features.AHEAD), cancelled by any query the
    user asks (rescore_grid), and visible: how many are ready and queued."""
    queue = F.plan_ahead_queue(project, run, qi)
    todo = [i for i in queue if not iv.answered(project, run, i, k)]
    want = (run, tuple(todo), int(k))
    info = jm.get(st.session_state.get("explore_ahead_job", ""))
    busy = info is not None and info.status in ("queued", "running")
    if todo and not busy and st.session_state.get("explore_ahead_for") != want:
        st.session_state["explore_ahead_job"] = jm.submit_child(
            "plan-ahead", "diffin_core.run.scoring:answer_ahead", (str(project.root), run, todo), {"k": int(k)},
            label=f"planning ahead: {len(todo)} queries of query {int(qi)}'s class ({run})",
            project_dir=str(project.root), warm=F.warm_key(project, run) if warm else None)
        st.session_state["explore_ahead_for"] = want
    if queue:
        st.caption(f"Planning ahead (the next {len(queue)} queries of this class, in the background): "
                   f"{len(queue) - len(todo)} ready, {len(todo)} queued.")


VIEWS = ["Top-k for a query", "Map", "Histograms", "Compare runs", "Training sample", "Class heatmap"]
SEARCH = "Search"                 # text projects: find training samples by their text or id
if project.kind == "text":
    VIEWS.insert(1, SEARCH)
# the view, the query, the training sample and the saved selection live in the URL too (issue 21):
# a reload, or a link sent to someone, opens the same view
SLUGS = {"Top-k for a query": "topk", "Map": "map", "Histograms": "histograms", "Compare runs": "compare",
         "Training sample": "sample", "Class heatmap": "heatmap", SEARCH: "search"}
tri.from_url("explore_view", "view", {SLUGS[n]: n for n in VIEWS}.__getitem__)
view = st.radio("View", VIEWS, horizontal=True, key="explore_view", label_visibility="collapsed")
tri.to_url("view", SLUGS[view], "topk")
MAP_POINTS = 20_000
if view in ("Top-k for a query", "Map", "Class heatmap"):     # the views that draw sample grids
    flt = tri.filter_bar(project, scores, "explore_filter", default_states=())     # kept in the URL, as Review's


def filtered(table, what: str):
    """A grid's rows that pass the filter; says how many it hides."""
    if not tri.narrowed("explore_filter"):
        return table
    out = tri.apply_filter(project, table, flt, ui.review_log(str(project.root)).state() if flt.states else None)
    if len(out) < len(table):
        st.caption(f"The filter ({flt.describe(lambda y: ui.label_name(project, y))}) hides {len(table) - len(out)} "
                   f"of {len(table)} {what}.")
    return out


# --- top-k ---------------------------------------------------------------------------------
if view == VIEWS[0]:
    q = project.query
    c = st.columns([1, 1, 2])
    tri.from_url("explore_query", "query", lambda v: min(max(int(v), 0), len(q) - 1))
    st.session_state.setdefault("explore_query", 0)
    qi = c[0].number_input("Query sample index", 0, len(q) - 1, key="explore_query")
    tri.to_url("query", int(qi), 0)
    nav = st.columns([1, 1, 2, 2], vertical_alignment="center")     # keys: never while typing in a box

    def _step_query(d: int) -> None:
        st.session_state["explore_query"] = min(max(int(st.session_state.get("explore_query", 0)) + d, 0), len(q) - 1)
    nav[0].button("Previous query", key="explore_prev_query", on_click=_step_query, args=(-1,), shortcut="P",
                  icon=":material/chevron_left:", disabled=int(qi) <= 0, width="stretch")
    nav[1].button("Next query", key="explore_next_query", on_click=_step_query, args=(1,), shortcut="N",
                  icon=":material/chevron_right:", disabled=int(qi) >= len(q) - 1, width="stretch")
    k = c[1].slider("k", 1, 32, 8, key="explore_k")
    if project.kind == "image":
        with c[2]:
            st.image(ui.image(q.x[int(qi)]), width=96,
                     caption=f"query #{int(qi)} · label {ui.label_name(project, q.y[int(qi)])}")
        with st.expander("…or pick a query sample by clicking it"):
            page = st.number_input("Page", 0, max(0, (len(q) - 1) // 12), 0, key="explore_query_page")
            cols = st.columns(12)
            for j, col in enumerate(cols):
                i = int(page) * 12 + j
                if i < len(q):
                    col.image(ui.image(q.x[i]), width="stretch")
                    col.button(f"#{i}", key=f"explore_pick_{j}", on_click=st.session_state.__setitem__,
                               args=("explore_query", i))
    elif project.kind == "text":
        from _common import text_views as tv
        with c[2]:
            st.caption(f"query #{int(qi)} · label {ui.label_name(project, q.y[int(qi)])}")
            st.html(tv.card_html(tv.texts(q, [int(qi)])[0], 400))
        tv.query_picker(project, "explore_query")
    nav[3].caption("Keys: P previous query · N next query · F find")
    if nav[2].button("Find the most helpful and harmful training samples", key="explore_topk", type="primary",
                     shortcut="F", width="stretch"):
        st.session_state["explore_topk_for"] = (run, int(qi))
    fast = iv.store(project, run) is not None          # the run's feature store: answers at once
    auto = fast and st.toggle(
        "Rescore each grid with the exact path", value=True, key="explore_auto_rescore",
        help="The exact path rescores the feature store's shortlist in the background (kept with the run: "
             "a query asked before is read at once). The store's quick, approximate grid is drawn first only "
             "where this run has measured it to agree with the exact one. Off: the store's grid alone, "
             "labelled approximate, with a button to rescore.")
    if fast and st.session_state.get("explore_topk_for") != (run, int(qi)):
        st.caption("This run has a feature store: a query asked before is read at once; a new one is "
                   "rescored by the exact path in the background.")
    if st.session_state.get("explore_topk_for") == (run, int(qi)):
        if not fast and not topk_cache_path(project, run, [int(qi)]).is_file():
            # A pass over the whole training set: run it in the shared background worker.
            job_key = f"explore_topk_job_{run}_{int(qi)}"
            info = jm.get(st.session_state.get(job_key, ""))
            if info is None or info.status in ("cancelled",):
                root, query = str(project.root), int(qi)
                ui.user_first()            # the user's query first: planning ahead waits behind it

                # fills the on-disk cache the grid below reads; model.py runs in a child process
                st.session_state[job_key] = jm.submit_child("topk", "diffin_core.run.scoring:top_k", (root, run, [query], 1),
                                                            label=f"top-k for query {query} ({run})", project_dir=root)
                info = jm.get(st.session_state[job_key])
            if info.status == "failed":
                st.error(f"Top-k failed: {info.error}")
            else:
                ui.wait_for_job(st.session_state[job_key],
                                lambda job: f"Scoring the training set against query {int(qi)} in the background "
                                            f"(cached afterwards): {job.status} · {job.message}",
                                fraction=lambda job: job.fraction)
            st.stop()
        rescored = fast and iv.answered(project, run, int(qi), int(k))
        if fast and not rescored and auto:
            agreement = iv.agreement(project, run)
            if not F.store_grid_trusted(agreement):
                # issue 21: the store's quick grid can tell another story than the exact one; it is
                # drawn first only where this run measured it to agree; else a progress state
                st.info("Computing the exact grid for this query in the background (it is kept with the run: "
                        "asking again is instant). The store's quick grid is not shown first: "
                        f"{iv.agreement_note(agreement)}; it is drawn first only once it agrees with the "
                        f"exact grid (top-10 overlap at least {F.AGREEMENT_MIN_OVERLAP} over "
                        f"{F.AGREEMENT_MIN_QUERIES} queries).")
                rescore_grid(project, run, int(qi), auto, int(k))
                st.stop()
        try:
            # from the store alone (rerank=0), or the kept answer: no model code in the server
            helpful, harmful = top_k(project, run, [int(qi)], int(k), rerank=None if (rescored or not fast) else 0)
        except DiffinError as e:
            st.error(e.brief())
        else:
            path = helpful.attrs.get("path", "exact path")
            if "true_label" in scores:                   # captions show the true label when known
                truth = scores.set_index("sample_id")["true_label"]
                helpful, harmful = (t.assign(true_label=truth.loc[t["sample_id"]].to_numpy()) for t in (helpful, harmful))
            st.caption(f"Produced by the {path}." + ("" if (rescored or not fast) else
                       f" The store alone is approximate: {iv.agreement_note(iv.agreement(project, run))}."))
            status = st.container()          # above the grids, filled after them: the grid is sent first
            within = (iv.filtered_top(project, run, int(qi), int(k), lambda t: filtered(t, "training samples"),
                                      kept=rescored or not fast) if tri.narrowed("explore_filter") else None)
            if within is not None:           # the top k among the samples the filter passes
                helpful, harmful = within
                approx = not (helpful["exact"].all() and harmful["exact"].all())
                st.caption(f"The grids show the top {int(k)} among the samples the filter passes, by this "
                           "query's influence" + (": ≈ marks values not rescored by the exact path (the feature "
                           f"store's, approximate: {iv.agreement_note(iv.agreement(project, run))}); their order "
                           "among themselves is the store's." if approx else ", every value the exact path's."))
            st.markdown("**Most helpful** (removing them would raise this query's loss)")
            ui.sample_grid(project, helpful if within is not None else filtered(helpful, "most helpful (raise k to see more)"))
            st.markdown("**Most harmful** (removing them would lower this query's loss)")
            ui.sample_grid(project, harmful if within is not None else filtered(harmful, "most harmful (raise k to see more)"))
            if fast and not rescored:
                with status:
                    rescore_grid(project, run, int(qi), auto, int(k))
            elif (fast and auto) or (not fast and project.run(run).method == "diffin"):
                with status:       # a run without a store (Adam's batch-order replay): its exact path
                    plan_ahead(project, run, int(qi), int(k), warm=fast)   # a store's run: in its warm child
            st.session_state["explore_last_topk"] = [int(s) for s in harmful["sample_id"]][:1]

# --- map -----------------------------------------------------------------------------------
elif view == SEARCH:
    from _common import text_views as tv
    tv.search(project, scores, "explore_search", ui.label_name)

elif view == VIEWS[VIEWS.index("Map")]:
    FEATURES = {"penultimate activations": "activations", "projected gradients": "gradients"}
    if iv.store(project, run) is not None:     # the feature pass's features: no gradient pass at all
        FEATURES = {"stored influence features": "stored", **FEATURES}
    kind = FEATURES[st.radio("Map features", list(FEATURES), horizontal=True, key="explore_map_features")]
    coords = maps.load(project, run, kind)
    job_id = st.session_state.get(f"explore_map_job_{run}_{kind}")
    job = jm.get(job_id) if job_id else None
    if coords is None:
        st.write("The map is UMAP of the run's stored influence features (from the feature pass, no "
                 "gradient computed), of the final model's penultimate activations, or of its per-sample "
                 "gradients (randomly projected to 128 dimensions), computed once per run in the "
                 "background (the first fit in a server compiles for about a minute).")
        if job is None or job.status not in ("queued", "running"):
            if job is not None and job.status == "failed":
                st.error(f"The map failed: {job.error}")
            if st.button("Compute the map", key="explore_map_compute"):
                root = str(project.root)
                ui.user_first()
                st.session_state[f"explore_map_job_{run}_{kind}"] = jm.submit(
                    "umap", lambda p: str(maps.compute(ui.open_project(root), run, progress=p.update, kind=kind)),
                    label=f"map of {run} ({kind})", project_dir=root)
                st.rerun()
        else:
            ui.wait_for_job(job_id, lambda job: f"{job.status}: {job.message}", fraction=lambda job: job.fraction)
    else:
        state = ui.review_log(str(project.root)).state()
        df = scores.merge(coords, on="sample_id")
        df["flag"] = df["sample_id"].map(state["action"]).astype(object).fillna("undecided")
        names = dict(enumerate(project.label_names or []))
        df["label_name"] = df["label"].map(lambda y: names.get(int(y), str(int(y))))
        color = st.selectbox("Colour by", ["influence", "self_influence", "label_issue", "label", "flag"],
                             key="explore_color")
        if len(df) > MAP_POINTS:   # keep every decided and the most suspicious samples, sample the rest
            keep = (df["flag"] != "undecided") | (df["label_issue"].rank(ascending=False) <= MAP_POINTS // 4)
            rest = df[~keep].sample(max(0, MAP_POINTS - int(keep.sum())), random_state=0)
            df = df[keep | df.index.isin(rest.index)]
            st.caption(f"Showing {len(df):,} points: every reviewed sample, the most suspicious, and a random rest.")
        df = df.assign(_reviewed=df["flag"] != "undecided").sort_values("_reviewed", kind="stable")  # reviewed drawn last: on top
        numeric = color not in ("label", "flag")
        extra = {}
        if numeric:
            lo, hi = np.nanpercentile(df[color], [1, 99]) if df[color].notna().any() else (0.0, 1.0)
            extra = dict(color_continuous_scale="RdBu" if color == "influence" else "Viridis",
                         range_color=(min(lo, -abs(hi)), max(hi, abs(lo))) if color == "influence" else (lo, hi))
            lo_c, hi_c = extra["range_color"]
            words = {"influence": ("harmful", "helpful"), "label_issue": ("likely fine", "likely mislabelled"),
                     "self_influence": ("generalised", "memorised")}.get(color, ("low", "high"))
            colorbar = {"title": color, "tickvals": [lo_c, hi_c], "ticktext": [f"{words[0]} ({lo_c:.2g})", f"{words[1]} ({hi_c:.2g})"]}
        view_mode = (st.radio("Map mode", ["Select (lasso)", "Preview (thumbnails on hover)"], horizontal=True,
                              key="explore_map_mode") if project.kind == "image" else "Select (lasso)")
        if view_mode.startswith("Preview"):
            iv.hover_map(project, df, color, numeric, extra, colorbar if numeric else None)
            st.stop()
        hover = ["sample_id", "label", "pred", "label_issue"]
        if project.kind == "text":     # the hover shows the text (its first 120 characters)
            from _common import text_views as tv
            import html
            df = df.assign(_text=[html.escape(t if len(t) <= 120 else t[:119] + "…") for t in
                                  tv.texts(project.train, [ui.row_of(project, s) for s in df["sample_id"]])])
            df["_text"] = df["_text"].str.replace("\n", " ")
            hover.append("_text")
        saved = _saved_selections()
        if st.session_state.get("explore_saved_pending") in saved:        # just saved: draw it
            st.session_state["explore_saved"] = st.session_state.pop("explore_saved_pending")
        shown_name = tri.url_selectbox(
            "Draw a saved selection on the map", [""] + list(saved), "explore_saved", "selection",
            format_func=lambda n: "none" if not n else f"{n} ({len(saved[n]['ids']):,} samples)")
        if "explore_saved_note" in st.session_state:
            st.success(st.session_state.pop("explore_saved_note"))
        fig = px.scatter(df, x="umap_x", y="umap_y", color="label_name" if color == "label" else color,
                         custom_data=hover,
                         render_mode="webgl", height=560, opacity=0.7, **extra)
        fig.update_traces(marker={"size": 4}, hovertemplate="sample %{customdata[0]} · label %{customdata[1]} · "
                          "pred %{customdata[2]} · label_issue %{customdata[3]:.3g}"
                          + ("<br>%{customdata[4]}" if project.kind == "text" else "") + "<extra></extra>")
        fig.update_layout(dragmode="lasso", margin={"l": 0, "r": 0, "t": 20, "b": 0})
        if numeric:
            fig.update_layout(coloraxis_colorbar=colorbar)
        in_saved = df[df["sample_id"].isin(saved[shown_name]["ids"])] if shown_name else df.iloc[:0]
        if shown_name:              # rings around the saved selection's points, above the others
            fig.add_trace(go.Scattergl(
                x=in_saved["umap_x"], y=in_saved["umap_y"], mode="markers", name=f"selection: {shown_name}",
                customdata=in_saved[hover].to_numpy(), hovertemplate=fig.data[0].hovertemplate,
                marker={"size": 9, "symbol": "circle-open", "color": "#111", "line": {"width": 1.5}}))
            fig.update_layout(legend={"orientation": "h", "y": 1.08})
        event = st.plotly_chart(fig, key="explore_map", on_select="rerun", selection_mode=("lasso", "points"))
        ids = ui.selected_ids(event)
        if ids:
            st.session_state["explore_selected_ids"] = ids      # the What-if page can remove them
        if ids:
            chosen = df[df["sample_id"].isin(ids)].sort_values("label_issue", ascending=False)
            st.markdown(f"**{len(chosen):,} selected** (the 48 most suspicious shown)")
            ui.sample_grid(project, filtered(chosen, "selected").head(48), score_col="label_issue")
            stored = ui.save_selection(project, chosen["sample_id"].tolist(), f"Explore lasso, run {run}",
                                       key="explore_sel", announce=False)       # its note after the rerun
            if stored:                       # drawn on the map and named in the URL from now on
                st.session_state["explore_saved_pending"] = stored
                st.session_state["explore_saved_note"] = (f"Saved {len(chosen):,} samples as “{stored}”: ringed on "
                                                          "the map, kept after a reload; What-if can remove them.")
                st.rerun()
        elif shown_name:
            missing = len(set(saved[shown_name]["ids"])) - len(in_saved)
            st.markdown(f"**Saved selection “{shown_name}”: {len(saved[shown_name]['ids']):,} samples** "
                        f"(ringed on the map{f'; {missing:,} not drawn' if missing else ''}; the 48 most "
                        "suspicious shown). Draw a lasso to select others.")
            ui.sample_grid(project, filtered(in_saved.sort_values("label_issue", ascending=False), "in the selection")
                           .head(48), score_col="label_issue")
        else:
            st.caption("Draw a lasso around points to list those samples here.")

# --- histograms ----------------------------------------------------------------------------
elif view == "Histograms":
    cols = [c for c in ("influence", "self_influence", "label_issue", "loss") if scores[c].notna().any()]
    col = st.selectbox("Score", cols, key="explore_hist_col")
    group = (np.where(scores["label"] == scores["true_label"], "correct", "flipped")
             if "true_label" in scores else np.full(len(scores), "unknown"))
    bins = compare.histograms(scores[col].to_numpy(), group, bins=80)   # binned here: a few KB to the browser
    fig = px.bar(bins, x="centre", y="count", color="group", barmode="overlay", opacity=0.65,
                 color_discrete_map={"correct": "#4c72b0", "flipped": "#e8a33d", "unknown": "#4c72b0"},
                 labels={"centre": col, "group": "given label", "count": "samples"})
    fig.update_traces(width=float(bins["width"].iloc[0]) if len(bins) else None)
    # log count axis with plain tick labels at 1, 10, 100, ... (not 2, 5, 1k-style clutter)
    fig.update_yaxes(type="log", dtick=1, tickformat=",d", title="samples (log scale)")
    ends = {"influence": ("← harmful", "helpful →"), "self_influence": ("", "memorised →"),
            "label_issue": ("", "more likely mislabelled →"), "loss": ("", "higher loss →")}[col]
    if col == "influence":
        fig.add_vline(x=0, line_color="#555", line_width=1)
    for text, x, anchor in ((ends[0], 0.0, "left"), (ends[1], 1.0, "right")):
        if text:
            fig.add_annotation(text=text, xref="paper", yref="paper", x=x, y=-0.16, showarrow=False,
                               xanchor=anchor, font={"size": 13, "color": iv.HARMFUL if "harm" in text else iv.HELPFUL})
    fig.update_layout(margin={"b": 70})
    st.plotly_chart(fig, key="explore_hist")

# --- compare -------------------------------------------------------------------------------
elif view == "Compare runs":
    names = [r.name for r in project.runs()]
    if len(names) < 2:
        st.info("Score with a second method to compare two runs.")
    else:
        c = st.columns(3)
        a = c[0].selectbox("Run A", names, index=0, key="explore_cmp_a")
        b = c[1].selectbox("Run B", names, index=1, key="explore_cmp_b")
        column = c[2].selectbox("Score", ["label_issue", "influence", "self_influence"], key="explore_cmp_col")
        sa, sb = ui.scores(project, a), ui.scores(project, b)
        r = compare.rank_correlation(sa, sb, column)
        st.metric(f"Spearman rank correlation of {column}", "undefined" if r is None else f"{r:.3f}")
        st.markdown("**Samples the two runs disagree on most** (percentile ranks)")
        st.dataframe(compare.disagreements(sa, sb, column, n=20), hide_index=True, key="explore_cmp_table")

# --- one training sample: whom it helps and harms, and when in training ---------------------
elif view == "Training sample":
    ids = scores["sample_id"]
    default = (st.session_state.get("explore_last_topk") or [int(scores.sort_values("label_issue").iloc[-1]["sample_id"])])[0]
    tri.from_url("explore_sample", "sample", int)
    st.session_state.setdefault("explore_sample", int(default))
    c = st.columns([1, 3])
    sid = int(c[0].number_input("Training sample id", int(ids.min()), int(ids.max()), key="explore_sample"))
    tri.to_url("sample", sid)
    if sid not in ui.positions(str(project.root), (project.root / "diffin.toml").stat().st_mtime):
        st.error(f"No training sample has id {sid}.")
    else:
        with c[0]:
            ui.show_sample(project, sid, width=120)
            r = scores.set_index("sample_id").loc[sid]
            st.caption(f"label {ui.label_name(project, r['label'])} · pred {ui.label_name(project, r['pred'])}"
                       + (f" · true {ui.label_name(project, r['true_label'])}" if "true_label" in r else ""))
        with c[1]:
            iv.reverse_view(project, run, sid, key="explore_rev")

# --- class by class --------------------------------------------------------------------------
else:                  # the filter picks the cell's samples before they are ranked
    iv.class_heatmap(project, run, key="explore_cls", keep=lambda t: filtered(t, "samples of this training class"))
