"""pages/_common.wait_for_job: the one "wait for a background job" fragment every page uses
(Explore's top-k, rescore and map; the per-checkpoint contributions; the text highlights; Home's
text sample build)."""
from __future__ import annotations

import threading

from app_fixtures import jobs  # noqa: F401


def _script():
    import streamlit as st

    import _common as ui
    if "ended" not in st.session_state:
        ui.wait_for_job(st.session_state["jid"], lambda job: f"waiting: {job.status} · {job.message}",
                        fraction=(lambda job: job.fraction) if st.session_state.get("bar") else None,
                        on_end=lambda job: st.session_state.__setitem__("ended", job.status if job else None))
    else:
        st.write(f"result drawn after {st.session_state['ended']}")


def _blocked_job(jobs, release: threading.Event) -> str:
    def work(p):
        p.update(3, 10, "three of ten")
        release.wait(60)
        return "ok"
    jid = jobs.submit("test", work, label="blocked")
    for _ in range(200):
        if jobs.get(jid).message:
            break
        threading.Event().wait(0.05)
    return jid


def test_wait_for_job_shows_the_state_then_ends_once(jobs):
    from streamlit.testing.v1 import AppTest
    for bar in (False, True):
        release = threading.Event()
        jid = _blocked_job(jobs, release)
        at = AppTest.from_function(_script, default_timeout=60)
        at.session_state["jid"], at.session_state["bar"] = jid, bar
        at.run()
        assert not at.exception, at.exception
        if bar:
            [p] = at.get("progress")
            assert p.proto.value == 30 and p.proto.text == "waiting: running · three of ten"
            assert not at.caption
        else:
            assert [c.value for c in at.caption] == ["waiting: running · three of ten"] and not at.get("progress")
        assert "ended" not in at.session_state
        release.set()
        assert jobs.wait(jid, timeout=30).status == "done"
        at.run()                        # the fragment sees the end: on_end, then the page again
        assert not at.exception, at.exception
        assert at.session_state["ended"] == "done"
        assert [m.value for m in at.markdown] == ["result drawn after done"]
        assert not at.caption and not at.get("progress")
