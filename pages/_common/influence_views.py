"""Influence views drawn from a run's feature store (diffin_core/run/features.py): the reverse view of
one training sample (the query samples it helps and harms most, and its per-checkpoint
contributions) and the class-by-class heatmap. Thin: every number comes from diffin_core.
Sign: influence > 0 helpful (removing the sample raises the query loss), < 0 harmful.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

import _common as ui
from diffin_core.run import features

HELPFUL, HARMFUL = "#2166ac", "#b2182b"       # the RdBu ends: blue helpful, red harmful
# how close the per-checkpoint sum must come to the run's value (float32 jvps one row at a time
# against the run's chunks: 2e-4 relative measured, tests/test_features.py), else a warning
ADD_UP_REL, ADD_UP_ABS = 2e-3, 1e-6


@st.cache_resource(max_entries=4, show_spinner=False)
def _store(path: str, stamp: float):
    return features.FeatureStore(path)


def store(project, run: str):
    """The run's FeatureStore (cached until rebuilt), or None."""
    p = project.run(run).path / features.DIRNAME / "meta.json"
    if not p.is_file():
        return None
    s = features.FeatureStore.open(project, run)
    return None if s is None else _store(str(p.parent), p.stat().st_mtime)


def no_store_note(project, run: str) -> None:
    st.info(f"Run {run!r} has no feature store: it is built by `diffin score` for diffin runs "
            f"(or `diffin features {project.root} --run {run}`).")


def query_grid(project, idx, values, columns: int = 8, exact=None) -> None:
    """Query samples with their label and influence value; ``exact`` (bool per value): False marks
    the value approximate (≈, the store's)."""
    q = project.query
    exact = np.ones(len(idx), dtype=bool) if exact is None else np.asarray(exact, dtype=bool)
    for start in range(0, len(idx), columns):
        cols = st.columns(columns)
        for col, i, v, e in zip(cols, idx[start:start + columns], values[start:start + columns],
                                exact[start:start + columns]):
            with col:
                if project.kind == "image":
                    st.image(ui.image(q.x[int(i)]), width="stretch")
                st.caption(f"query #{int(i)} · label {ui.label_name(project, q.y[int(i)])} · influence "
                           f"{'' if e else '≈'}{v:+.3g}")


@st.cache_data(max_entries=16, show_spinner=False)
def _agreement(root: str, run: str, stamp: tuple) -> dict | None:
    from diffin_core.project.folder import Project
    return features.store_agreement(Project(root), run)


def answered(project, run: str, qi: int, k: int = 10) -> bool:
    """Whether query ``qi`` has an answer kept with the run for a top-``k`` grid (read, no model
    code): every row exact, certified to k, or (a store without per-checkpoint sketch) its top k
    rows rescored."""
    from diffin_core.run import answers
    a = answers.load(project.run(run).path, [int(qi)])
    return a is not None and (a.covers(k) or (not a.certified and a.top_exact(k)))


def agreement(project, run: str) -> dict | None:
    """features.store_agreement for the run, recomputed when an answer is added."""
    d = project.run(run).path
    stamp = tuple((p.stat().st_mtime if p.exists() else 0.0) for p in (d / "answers", d / "topk", d / "features"))
    return _agreement(str(project.root), run, stamp)


def agreement_note(a: dict | None) -> str:
    """One line: how far the store's own values were measured from the exact path on this run."""
    if not a or not a.get("error_queries"):
        return "its error against the exact path is not yet measured on this run (no query answered yet)"
    top = (f"top-10 overlap with the exact grid {a['overlap']:.2f} over {a['queries']} queries; "
           if a["queries"] else "")
    return (f"measured on this run: {top}median error {100 * a['rel_error']:.0f}%, opposite sign on "
            f"{100 * a['sign_flips']:.0f}% of pairs ({a['error_queries']} answered queries)")


def filtered_top(project, run: str, qi: int, k: int, keep, kept: bool):
    """(helpful, harmful): the top ``k`` of query ``qi``'s influence among the training samples that
    ``keep`` (a table -> table filter, Explore's) passes, with an ``exact`` column. ``kept``: read
    the query's kept answer (the exact path's values, the rest the store's where it certified
    only its top rows); else the store alone (every value approximate). None without either."""
    from diffin_core.run import answers
    if kept:
        a = answers.load(project.run(run).path, [int(qi)])
        if a is None:
            return None
        values, exact = a.influence, a.exact
    else:
        s = store(project, run)
        if s is None:
            return None
        values = s.query_influence([int(qi)]).astype(np.float64)
        exact = np.zeros(len(values), dtype=bool)
    scores = ui.scores(project, run)
    table = scores[["sample_id", "label", "pred", "label_issue"]
                   + (["true_label"] if "true_label" in scores else [])].copy()
    table["influence"], table["exact"] = values, exact
    table = keep(table)
    order = np.argsort(-table["influence"].to_numpy(), kind="stable")
    return table.iloc[order[:k]].reset_index(drop=True), table.iloc[order[::-1][:k]].reset_index(drop=True)


def reverse_table(project, run: str, sample_id: int, k: int = 8):
    """(helped, values, exact, harmed, values, exact): the query samples one training sample helps /
    harms most. Exact path values where that query has been answered, else the store's (≈)."""
    values, exact = features.reverse_influence(project, run, ui.row_of(project, sample_id), store(project, run))
    order = np.argsort(-values, kind="stable")
    top, bottom = order[:k], order[::-1][:k]
    return top, values[top], exact[top], bottom, values[bottom], exact[bottom]


def contributions(project, run: str, sample_id: int, query_indices=None, key: str = "iv") -> pd.DataFrame | None:
    """Per-checkpoint contributions of one training sample (whole query set by default): from
    their cache, else computed once in the background worker's child process (the model's code
    never runs in the server) while a progress bar shows; None until then."""
    path = features.contributions_path(project, run, sample_id, query_indices)
    if path.is_file():
        return pd.read_json(path, orient="records")
    jm = ui.job_manager()
    jkey = f"{key}_job_{run}_{int(sample_id)}_{path.stem}"
    info = jm.get(st.session_state.get(jkey, ""))
    if info is None or info.status == "cancelled":
        qi = None if query_indices is None else [int(i) for i in np.atleast_1d(query_indices)]
        ui.user_first()        # the plot the user opened, not the queries planned ahead, runs next
        st.session_state[jkey] = jm.submit_child(
            "contributions", "diffin_core.run.features:contributions_for", (str(project.root), run, int(sample_id), qi),
            label=f"per-checkpoint contributions of sample {int(sample_id)} ({run})", project_dir=str(project.root),
            with_progress=False)
        info = jm.get(st.session_state[jkey])
    if info.status == "failed":
        st.error(f"Per-checkpoint contributions failed: {info.error}")
        return None

    ui.wait_for_job(st.session_state[jkey],
                    lambda job: f"Per-checkpoint contributions of sample {int(sample_id)} (background, cached): {job.status}",
                    fraction=lambda job: 0.5 if job.status == "running" else 0.0)
    return None


def contributions_figure(df: pd.DataFrame, title: str) -> go.Figure:
    colours = [HELPFUL if v >= 0 else HARMFUL for v in df["contribution"]]
    fig = go.Figure(go.Bar(x=df["step"], y=df["contribution"], marker_color=colours,
                           customdata=df["checkpoint"],
                           hovertemplate="step %{x} (checkpoint %{customdata})<br>contribution %{y:.3g}<extra></extra>"))
    fig.add_hline(y=0, line_color="#555", line_width=1)
    fig.update_layout(title=title, height=300, margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      xaxis_title="training step (checkpoint)",
                      yaxis_title="contribution (↑ helpful · ↓ harmful)")
    return fig


def reverse_view(project, run: str, sample_id: int, key: str, k: int = 8, query_indices=None) -> None:
    """The reverse view of one training sample + its per-checkpoint plot."""
    s = store(project, run)
    if s is None:
        no_store_note(project, run)
        return
    helped, hv, he, harmed, mv, me = reverse_table(project, run, sample_id, k)
    st.markdown(f"**Query samples training sample {sample_id} helps most** (removing it would raise their loss)")
    query_grid(project, helped, hv, exact=he)
    st.markdown(f"**Query samples it harms most** (removing it would lower their loss)")
    query_grid(project, harmed, mv, exact=me)
    if not (np.all(he) and np.all(me)):
        st.caption(f"≈: the feature store's projected value (approximate; {agreement_note(agreement(project, run))}). "
                   "Values without ≈ are the exact path's, as in that query's top-k grid.")
    which = "the whole query set" if query_indices is None else f"query {', '.join(map(str, np.atleast_1d(query_indices)))}"
    df = contributions(project, run, sample_id, query_indices, key=key)
    if df is None:
        return
    total = float(df["contribution"].sum())
    st.plotly_chart(contributions_figure(df, f"When in training sample {sample_id} mattered for {which}"),
                    key=f"{key}_checkpoints")
    peak = df.iloc[int(np.argmax(np.abs(df["contribution"].to_numpy())))]
    ref = None
    if query_indices is None:              # the run's own number for (sample, query set): scores.parquet
        sc = ui.scores(project, run)
        col = sc["influence"]
        ref = float(col[sc["sample_id"] == int(sample_id)].iloc[0])
        scale = float(np.nanmax(np.abs(col.to_numpy()))) if col.notna().any() else 0.0
        if not np.isfinite(ref) or abs(total - ref) > ADD_UP_REL * max(abs(total), abs(ref)) + ADD_UP_ABS * scale:
            st.warning(f"These per-checkpoint contributions do not add up to the run's value: they sum to "
                       f"{total:+.4g}, the run says {ref:+.4g} for sample {sample_id} on {which}. The plot "
                       "was computed for another state of this run (rescored since?); trust the run's value.")
            return
    said = "" if ref is None else f"; the run's value {ref:+.4g}"
    st.caption(f"Per-checkpoint contributions sum to {total:+.4g} ({'helpful' if total >= 0 else 'harmful'}): "
               f"the run's influence of this sample on {which}, by the exact path (the run's own plan for "
               f"those queries{said}); largest at step {int(peak['step'])} ({peak['contribution']:+.3g}).")


def class_matrix(project, run: str) -> pd.DataFrame:
    """Heatmap values: rows = given training class, columns = query class."""
    s = store(project, run)
    m = s.class_matrix(project.query.y)
    names = [ui.label_name(project, c) for c in range(m.shape[0])]
    return pd.DataFrame(m, index=names[: m.shape[0]], columns=[ui.label_name(project, c) for c in range(m.shape[1])])


def heatmap_figure(df: pd.DataFrame) -> go.Figure:
    """The heatmap, with an invisible marker on every cell's centre: plotly selects no heatmap
    cell on a click (issue 21: clicks did nothing), but it selects the nearest marker, and with no
    hover cut-off the nearest centre is the cell under the pointer."""
    z = df.to_numpy()
    lim = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    xs, ys = [f"query {c}" for c in df.columns], [f"train {r}" for r in df.index]
    fig = go.Figure(go.Heatmap(
        z=z, x=xs, y=ys, colorscale="RdBu", zmid=0, zmin=-lim, zmax=lim, hoverinfo="skip",
        colorbar={"title": "influence", "tickvals": [-lim, 0, lim], "ticktext": ["harmful", "0", "helpful"]}))
    gx, gy = np.meshgrid(np.arange(len(xs)), np.arange(len(ys)))
    fig.add_trace(go.Scatter(
        x=[xs[i] for i in gx.ravel()], y=[ys[j] for j in gy.ravel()], customdata=z.ravel(), mode="markers",
        marker={"size": 24, "symbol": "square", "opacity": 0}, showlegend=False,
        hovertemplate="training class %{y} on %{x}: %{customdata:.3g}<extra></extra>"))
    fig.update_layout(hoverdistance=-1, clickmode="event+select")
    fig.update_layout(height=520, margin={"l": 10, "r": 10, "t": 30, "b": 10},
                      xaxis_title="query class (mean loss of its query samples)",
                      yaxis_title="given training class (sum over its samples)")
    fig.update_yaxes(autorange="reversed")
    return fig


def cell_samples(project, run: str, train_class: int, query_class: int, k: int = 8, keep=None):
    """Training samples of ``train_class`` ranked by influence on the query samples of
    ``query_class`` (projected): (helpful table, harmful table). ``keep`` (table -> table, e.g.
    Explore's filter) narrows the class's rows before they are ranked: the top ``k`` among those."""
    s = store(project, run)
    q = project.query
    qi = np.nonzero(q.y == query_class)[0]
    rows = np.nonzero(project.train.y == train_class)[0]
    if len(qi) == 0 or len(rows) == 0:
        empty = pd.DataFrame(columns=["sample_id", "label", "pred", "influence"])
        return empty, empty
    vec = s.query_rows(qi).mean(0)
    infl = s.train_rows(rows) @ vec
    scores = ui.scores(project, run).set_index("sample_id")
    ids = project.train.ids[rows]
    table = pd.DataFrame({"sample_id": ids, "label": project.train.y[rows],
                          "pred": scores.loc[ids, "pred"].to_numpy(), "influence": infl.astype(np.float64)})
    for col in ("label_issue", "true_label"):        # the filter's score; the true label when known
        if col in scores:
            table[col] = scores.loc[ids, col].to_numpy()
    if keep is not None:
        table = keep(table)
    order = np.argsort(-table["influence"].to_numpy(), kind="stable")
    return table.iloc[order[:k]].reset_index(drop=True), table.iloc[order[::-1][:k]].reset_index(drop=True)


def class_heatmap(project, run: str, key: str, keep=None) -> None:
    """The class-by-class heatmap; a clicked cell (or the two selectboxes) lists its samples (the
    top ones among those ``keep`` passes: Explore's filter)."""
    s = store(project, run)
    if s is None:
        no_store_note(project, run)
        return
    df = class_matrix(project, run)
    st.caption("Each cell: how much the training samples given class a (row) together help (> 0) or "
               "harm (< 0) the mean loss of the query samples of class b (column); from the stored features.")
    st.caption(f"Every value in this view is the feature store's projection (approximate; "
               f"{agreement_note(agreement(project, run))}). A query's exact values are in its Top-k view.")
    event = st.plotly_chart(heatmap_figure(df), key=f"{key}_heatmap", on_select="rerun", selection_mode="points")
    classes = list(range(len(df.index)))
    qclasses = list(range(len(df.columns)))
    rows = {f"train {n}": i for i, n in enumerate(df.index)}
    cols = {f"query {n}": j for j, n in enumerate(df.columns)}
    try:                                     # a clicked cell picks the two classes below
        pt = event["selection"]["points"][0]
        cell = (rows[str(pt["y"])], cols[str(pt["x"])])
    except (KeyError, IndexError, TypeError):
        cell = None
    if cell is not None and cell != st.session_state.get(f"{key}_clicked"):
        st.session_state[f"{key}_clicked"] = cell
        st.session_state[f"{key}_train_class"], st.session_state[f"{key}_query_class"] = cell
    c = st.columns(2)
    a = c[0].selectbox("Training class (row)", classes, key=f"{key}_train_class",
                       format_func=lambda y: ui.label_name(project, y))
    b = c[1].selectbox("Query class (column)", qclasses, key=f"{key}_query_class",
                       format_func=lambda y: ui.label_name(project, y))
    st.markdown(f"Cell ({ui.label_name(project, a)}, {ui.label_name(project, b)}): "
                f"**{df.iloc[a, b]:+.4g}**")
    helpful, harmful = cell_samples(project, run, a, b, keep=keep)
    st.markdown(f"**Training samples labelled {ui.label_name(project, a)} that help query class "
                f"{ui.label_name(project, b)} most**")
    ui.sample_grid(project, helpful)
    st.markdown(f"**…and that harm it most**")
    ui.sample_grid(project, harmful)


# --- the map with image thumbnails on hover ----------------------------------------------------

HOVER_POINTS = 3000          # points in the preview map (each carries a ~300-byte PNG thumbnail)


def _thumb(x) -> str:
    import base64
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(ui.image(x)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def hover_map(project, df: pd.DataFrame, color: str, numeric: bool, extra: dict, colorbar: dict | None) -> None:
    """The map drawn in the page's own plotly.js inside ``st.iframe`` (the supported successor of the
    deprecated v1 components' html), where hovering a point shows the sample's picture: reviewed
    samples and the most suspicious first when over HOVER_POINTS."""
    import json

    import plotly.express as px
    if len(df) > HOVER_POINTS:
        keep = df["_reviewed"] | (df["label_issue"].rank(ascending=False) <= HOVER_POINTS // 2)
        rest = df[~keep].sample(max(0, HOVER_POINTS - int(keep.sum())), random_state=0)
        df = df[keep | df.index.isin(rest.index)].head(HOVER_POINTS)
        st.caption(f"Preview of {len(df):,} points (reviewed, most suspicious, a random rest).")
    df = df.assign(_i=np.arange(len(df)))
    x = project.train.x
    thumbs = [_thumb(x[ui.row_of(project, s)]) for s in df["sample_id"]]
    fig = px.scatter(df, x="umap_x", y="umap_y", color="label_name" if color == "label" else color,
                     custom_data=["sample_id", "_i", "label", "pred"], render_mode="webgl", height=560,
                     opacity=0.75, **extra)
    fig.update_traces(marker={"size": 5}, hovertemplate="sample %{customdata[0]} · label %{customdata[2]} · "
                      "pred %{customdata[3]}<extra></extra>")
    fig.update_layout(margin={"l": 0, "r": 0, "t": 20, "b": 0})
    if colorbar:
        fig.update_layout(coloraxis_colorbar=colorbar)
    html = fig.to_html(include_plotlyjs=True, full_html=True, div_id="diffin-map", config={"displaylogo": False})
    script = """
<div id="thumb" style="position:fixed;display:none;pointer-events:none;z-index:10;background:#fff;
     border:1px solid #888;padding:3px;font:11px sans-serif"><img id="thumb-img" width="84"
     style="image-rendering:pixelated;display:block"><span id="thumb-cap"></span></div>
<script>
const THUMBS = %s;
window.addEventListener("load", () => {
  const gd = document.getElementById("diffin-map"), box = document.getElementById("thumb");
  gd.on("plotly_hover", (e) => {
    const p = e.points[0], i = p.customdata[1];
    document.getElementById("thumb-img").src = THUMBS[i];
    document.getElementById("thumb-cap").textContent = "#" + p.customdata[0];
    box.style.left = (e.event.clientX + 14) + "px"; box.style.top = (e.event.clientY + 14) + "px";
    box.style.display = "block";
  });
  gd.on("plotly_unhover", () => { box.style.display = "none"; });
});
</script>""" % json.dumps(thumbs)
    st.iframe(html.replace("</body>", script + "</body>"), height=580,
              alt="Training-set map: hover a point to see its picture")
    st.caption("Hover a point to see its picture. Switch to Select (lasso) to list a region's samples.")


def review_card_section(project, run: str, sid: int) -> None:
    """On the Review card: a toggle that opens the sample's reverse view (runs with a store)."""
    if store(project, run) is None:
        return
    if st.toggle("Whom this sample helps and harms, and when in training it mattered", key="review_influence"):
        reverse_view(project, run, sid, key="review_rev", k=6)
