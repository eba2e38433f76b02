"""Text samples in the app: cards (truncated, with expand), the whole text, search by substring
or sample id, and a query picker. Texts are escaped and shown as plain text (never markdown)."""
from __future__ import annotations

import html

import numpy as np
import streamlit as st

CARD_CHARS = 180          # a card shows this much, the rest behind "more"

_STYLE = ("font-family: sans-serif; font-size: 0.92rem; line-height: 1.35; white-space: pre-wrap; "
          "overflow-wrap: anywhere; margin: 0")


def is_text(project) -> bool:
    return getattr(project, "kind", "") == "text"


def texts(split, rows) -> list[str]:
    """The original texts of ``rows`` (positions in the split), pairs joined by a marked line."""
    rows = [int(r) for r in rows]
    out = split.texts(rows)
    pairs = split.text_pairs(rows)
    if pairs is not None:
        out = [f"{a}\n[second text] {b}" for a, b in zip(out, pairs)]
    return out


def card_html(text: str, limit: int = CARD_CHARS) -> str:
    """A card's text: the first ``limit`` characters, the whole text behind a "more" toggle."""
    esc = html.escape(text)
    if len(text) <= limit:
        return f'<p class="diffin-text" style="{_STYLE}">{esc}</p>'
    short = html.escape(text[:limit].rstrip())
    return (f'<details class="diffin-text" style="{_STYLE}"><summary style="cursor: pointer">{short}… '
            f'<span style="color: #1f77b4">(more, {len(text):,} characters)</span></summary>{esc}</details>')


def show_text(text: str) -> None:
    """The whole text, as plain text."""
    st.html(f'<div class="diffin-text-full" style="{_STYLE}; font-size: 1.05rem; padding: 0.6rem 0.8rem; '
            f'border-left: 3px solid #bbb; background: rgba(128,128,128,0.06)">{html.escape(text)}</div>')


def text_grid(project, table, rows, score_col: str, label_name, columns: int = 2) -> None:
    """Text cards: the text (truncated, expandable), then id, label, prediction and score."""
    body = texts(project.train, rows)
    records = list(table.itertuples(index=False))
    for start in range(0, len(records), columns):
        cols = st.columns(columns)
        for col, r, text in zip(cols, records[start:start + columns], body[start:start + columns]):
            r = r._asdict()
            with col.container(border=True):
                st.html(card_html(text))
                true = (f" (true {label_name(project, r['true_label'])})"
                        if "true_label" in r and r["true_label"] == r["true_label"] else "")
                score = r.get(score_col)
                approx = "≈" if "exact" in r and not r["exact"] else ""      # a value not the exact path's
                st.caption(f"#{int(r['sample_id'])} · label **{label_name(project, r['label'])}**{true} · "
                           f"pred {label_name(project, r['pred'])}"
                           + (f" · {score_col} {approx}{score:+.3g}" if score is not None and score == score else ""))


def search(project, scores, key: str, label_name, limit: int = 50) -> None:
    """Find training samples by a piece of their text (case-insensitive) or by sample id."""
    c = st.columns([3, 1])
    q = c[0].text_input("Search the training texts", key=f"{key}_q",
                        placeholder="a word or phrase, or #123 for a sample id")
    sort = c[1].selectbox("Order", ["label_issue", "influence", "self_influence", "sample_id"], key=f"{key}_sort")
    if not q.strip():
        st.caption("Type a piece of text (any case) or a sample id (#123) to list matching training samples.")
        return
    split = project.train
    ids = np.asarray(split.ids)
    s = q.strip()
    if s.lstrip("#").isdigit():
        hit = np.flatnonzero(ids == int(s.lstrip("#")))
        what = f"sample id {int(s.lstrip('#'))}"
    else:
        needle = s.casefold()
        hit = np.asarray([i for i, t in enumerate(split.texts()) if needle in t.casefold()], dtype=np.int64)
        what = f"“{s}”"
    if len(hit) == 0:
        st.info(f"No training sample matches {what}.")
        return
    table = scores.set_index("sample_id").loc[ids[hit]].reset_index()
    table["_row"] = hit
    if sort != "sample_id":
        table = table.sort_values(sort, ascending=False, kind="stable")
    st.markdown(f"**{len(table):,} match{'es' if len(table) != 1 else ''}** for {what}"
                + (f" (the first {limit} by {sort} shown)" if len(table) > limit else ""))
    shown = table.head(limit)
    text_grid(project, shown.drop(columns="_row"), shown["_row"].tolist(), sort if sort != "sample_id" else "label_issue",
              label_name)


def query_picker(project, key: str) -> None:
    """Pick the query sample by a piece of its text: matching query texts, each with a button
    that makes it the query (sets st.session_state[key])."""
    q = st.text_input("…or find a query by its text", key=f"{key}_find", placeholder="e.g. prize, call, tonight")
    if not q.strip():
        return
    needle = q.strip().casefold()
    all_texts = project.query.texts()
    hits = [i for i, t in enumerate(all_texts) if needle in t.casefold()][:12]
    if not hits:
        st.caption("No query text matches.")
        return
    for i in hits:
        c = st.columns([6, 1])
        with c[0]:
            st.html(card_html(all_texts[i], 140))
        c[1].button(f"#{i}", key=f"{key}_use_{i}", on_click=st.session_state.__setitem__, args=(key, i),
                    help="Use this query sample")


def highlight_html(result: dict) -> str:
    """The text with each token's background by its gradient x input score: red raises the loss
    of the given label, blue lowers it; the score is in each token's tooltip."""
    text, spans = result["text"], result["spans"]
    top = max((abs(s) for *_, s in spans), default=0.0) or 1.0
    out, pos = [], 0
    for a, b, name, s in spans:
        if a < pos:
            continue
        out.append(html.escape(text[pos:a]))
        alpha = min(1.0, abs(s) / top) * 0.75
        rgb = "214,39,40" if s > 0 else "31,119,180"
        out.append(f'<span title="{html.escape(name)}: {s:+.3g}" style="background: rgba({rgb},{alpha:.2f}); '
                   f'border-radius: 3px">{html.escape(text[a:b])}</span>')
        pos = b
    rest = text[pos:]
    if result.get("cut") is not None and rest.strip():
        out.append(f'<span style="color: #999" title="not read by the model (cut at max_length)">'
                   f'{html.escape(rest)}</span>')
    else:
        out.append(html.escape(rest))
    return f'<div class="diffin-text-tokens" style="{_STYLE}; font-size: 1.05rem">{"".join(out)}</div>'


def highlight_section(project, sample_id: int, jm) -> None:
    """A button that computes the token highlights of one sample in the background worker's
    child process (the model never runs in the server), then shows them with what they mean."""
    key = f"tokens_{project.root}_{int(sample_id)}"
    job_id = st.session_state.get(key)
    job = jm.get(job_id) if job_id else None
    if job is None or job.status == "cancelled":
        if st.button("Highlight the tokens that matter", key=f"review_tokens_{int(sample_id)}",
                     help="Gradient x input on the word embeddings at the final checkpoint, for the given label: "
                          "red tokens raise this sample's loss (they speak against its label), blue ones lower it."):
            import _common as ui
            ui.user_first()
            st.session_state[key] = jm.submit_child("tokens", "diffin_core.tasks.tokens:token_saliency",
                                                    (str(project.root), int(sample_id)),
                                                    label=f"token highlights of sample {int(sample_id)}",
                                                    project_dir=str(project.root), with_progress=False)
            st.rerun()
        return
    if job.status in ("queued", "running"):
        import _common as ui
        ui.wait_for_job(st.session_state[key], lambda job: f"Computing the token highlights in the background: {job.status}")
        return
    if job.status == "failed":
        st.caption(f"No token highlights: {job.error}")
        return
    result = job.result
    st.html(highlight_html(result))
    st.caption("Red: the token raises the loss of the given label (it speaks against the label); blue: it "
               "lowers it. Gradient x input on the word embeddings of the final checkpoint (eval mode): a "
               "first-order, local attribution of this model's loss, not a training-data influence"
               + ("; grey text was cut at max_length and not read by the model." if result.get("cut") is not None
                  else "."))
