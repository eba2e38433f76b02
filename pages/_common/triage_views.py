"""The reviewer's pace on Review and Explore (issue 21): filters, the session summary, and page
state kept in the URL (st.query_params) so a reload keeps it. Thin: the filtering, the pace and
the expected label errors are diffin_core/workspace/triage.py's.
"""
from __future__ import annotations

import streamlit as st

import _common as ui
from diffin_core.errors import DiffinError
from diffin_core.workspace import triage

STATE_NAMES = {"undecided": "undecided", "keep": "kept", "exclude": "excluded", "relabel": "relabelled"}


# --- page state in the URL ---------------------------------------------------------------------
def from_url(key: str, param: str, parse=str) -> None:
    """Before widget ``key`` is drawn: on a session's first run (a reload, a shared link) seed it
    from ``?param=``; a value that does not parse is ignored."""
    if key in st.session_state or param not in st.query_params:
        return
    try:
        st.session_state[key] = parse(st.query_params[param])
    except (ValueError, TypeError, KeyError, DiffinError):
        pass


def to_url(param: str, value, default=None) -> None:
    """Write ``?param=value`` (removed when the value is ``default`` or empty)."""
    text = "" if value is None else (",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value))
    if value == default or text == "":
        if param in st.query_params:
            del st.query_params[param]
    elif st.query_params.get(param) != text:
        st.query_params[param] = text


def _ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


def _strs(text: str) -> list[str]:
    out = [v for v in str(text).split(",") if v in triage.STATES]
    if not out:
        raise ValueError(f"no review state in {text!r}")
    return out


def url_selectbox(label: str, options: list, key: str, param: str, parse=str, **kw):
    """st.selectbox whose value lives in ``?param=`` too (an unknown value falls back to the default)."""
    if key not in st.session_state and st.query_params.get(param) is not None:
        try:
            v = parse(st.query_params[param])
        except (ValueError, TypeError):
            v = None
        if v in options:
            st.session_state[key] = v
    value = st.selectbox(label, options, key=key, **kw)
    to_url(param, value)
    return value


# --- filters ------------------------------------------------------------------------------------
def filter_bar(project, scores, key: str, *, states: bool = True, default_states=("undecided",),
               score_col: str = "label_issue", url: bool = True, expanded: bool | None = None) -> triage.Filter:
    """Filter widgets (given class, prediction, review state, score range, ids, text) in an
    expander; their values live in the URL (``url``) so a reload keeps them. Returns the Filter."""
    labels = list(range(project.num_classes))
    name = lambda y: ui.label_name(project, y)      # noqa: E731
    k = lambda part: f"{key}_{part}"                 # noqa: E731
    if url:
        from_url(k("given"), "given", _ints)
        from_url(k("pred"), "pred", _ints)
        from_url(k("ids"), "ids")
        from_url(k("text"), "text")
        if states:
            from_url(k("states"), "state", _strs)
    col = scores[score_col] if score_col in scores.columns else None
    lo = hi = None
    if col is not None and col.notna().any():
        lo, hi = float(col.min()), float(col.max())
        if url and k("score") not in st.session_state and "score" in st.query_params:
            try:
                a, b = (float(v) for v in st.query_params["score"].split(".."))
                st.session_state[k("score")] = (max(lo, min(a, hi)), min(hi, max(b, lo)))
            except ValueError:
                pass
    if states:
        st.session_state.setdefault(k("states"), list(default_states))
    active = any(st.session_state.get(k(p)) for p in ("given", "pred", "ids", "text")) or (
        states and list(st.session_state.get(k("states"), [])) != list(default_states)) or (
        lo is not None and tuple(st.session_state.get(k("score"), (lo, hi))) != (lo, hi))
    with st.expander("Filter" + (" (on)" if active else ""), expanded=active if expanded is None else expanded,
                     icon=":material/filter_list:"):
        c = st.columns(3 if states else 2)
        given = c[0].multiselect("Given class", labels, key=k("given"), format_func=name,
                                 placeholder="any class")
        pred = c[1].multiselect("Predicted class", labels, key=k("pred"), format_func=name,
                                placeholder="any prediction")
        chosen = (c[2].multiselect("Review state", list(triage.STATES), key=k("states"),
                                   format_func=STATE_NAMES.get, placeholder="any state") if states else [])
        rng = None
        if lo is not None and hi > lo:
            rng = st.slider(f"{score_col} range", lo, hi, (lo, hi), key=k("score"), format="%.3g")
        c = st.columns(2)
        ids = c[0].text_input("Sample ids", key=k("ids"), placeholder="e.g. 12, 40-45")
        text = (c[1].text_input("Text contains", key=k("text"), placeholder="a word or phrase, any case")
                if project.kind == "text" else "")
    score_range = None if rng is None or tuple(rng) == (lo, hi) else (float(rng[0]), float(rng[1]))
    st.session_state[k("narrowed")] = bool(given or pred or ids.strip() or text.strip() or score_range is not None
                                           or (states and list(chosen) != list(default_states)))
    if url:
        to_url("given", sorted(given))
        to_url("pred", sorted(pred))
        to_url("ids", ids.strip())
        to_url("text", text.strip())
        if states:
            to_url("state", list(chosen), list(default_states))
        to_url("score", None if score_range is None else f"{score_range[0]:.6g}..{score_range[1]:.6g}")
    return triage.Filter(given=list(given), pred=list(pred), states=list(chosen), score_col=score_col,
                         score_range=score_range, ids=ids, text=text)


def narrowed(key: str) -> bool:
    """Whether filter_bar ``key`` narrows anything beyond its default (for captions)."""
    return bool(st.session_state.get(f"{key}_narrowed"))


def apply_filter(project, table, f: triage.Filter, state=None, done=None):
    """``table`` (rows of a run's scores, any order) filtered by ``f``; a bad part (an id that is
    not one) is shown once and that filter is then not applied."""
    if not f.active():
        return table
    texts = None
    if f.text.strip() and project.kind == "text":
        from _common import text_views
        texts = lambda rows: text_views.texts(project.train, [ui.row_of(project, s)          # noqa: E731
                                                              for s in table["sample_id"].to_numpy()[rows]])
    try:
        return triage.apply(table, f, state, texts, done)
    except DiffinError as e:
        st.error(e.brief())
        return table


# --- the session summary ----------------------------------------------------------------------
def session_summary(log, user: str, scores, queue_ids, method: str, num_classes: int, state) -> None:
    """Decided per minute (this reviewer's current session), left in this view of the queue, and
    the expected number of label errors left, with what that figure assumes."""
    pace = triage.pace(log.history(), user)
    c = st.columns(4)
    rate = pace["per_minute"]
    c[0].metric("Decided per minute", "–" if rate is None else f"{rate:.1f}",
                help=f"Your decisions in this session ({pace['decisions']} in {pace['minutes']:.1f} min; a pause over "
                     f"{triage.SESSION_GAP_S / 60:.0f} min starts a new session).")
    left = len(queue_ids)
    c[1].metric("Left in this queue", str(left),
                help="Samples the card will still show with the current filter." +
                     (f" At your pace about {ui.fmt_seconds(left / rate * 60)}." if rate else ""))
    est = triage.expected_errors(scores, state, num_classes, method, among=queue_ids)
    if est is None:
        c[2].metric("Expected label errors left", "–",
                    help=f"Not estimated for a {method} run: its label_issue is a ranking, not a calibrated "
                         "leave-one-out loss. Review a diffin run for this figure.")
        return
    c[2].metric("Expected label errors left", f"{est['left']:.0f}",
                help=f"Among the {est['undecided']:,} undecided samples: the sum of each one's probability that its "
                     "label is wrong, read from label_issue (an estimated leave-one-out loss: exp(-label_issue) is "
                     "the held-out probability of the given label), with a noise rate fitted to the whole run and "
                     f"your decisions ({100 * est['noise_rate']:.1f}%) and flips assumed spread evenly over the "
                     "other classes. On the sample project it estimated 351 where 400 labels were flipped "
                     "(benchmarks/results/review_estimate.csv).")
    if left < est["undecided"]:            # a filtered queue: its own share
        c[3].metric("…of them in this queue", f"{est['left_among']:.0f}")
    if est["decided"]:
        st.caption(f"Check on what was decided: the estimate expected {est['predicted']:.0f} label errors among the "
                   f"{est['decided']:,} decided samples; {est['found']:,} were excluded or relabelled.")
