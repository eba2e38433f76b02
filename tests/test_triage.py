"""Review filters, session pace and the expected label errors left (diffin_core/workspace/triage.py)."""
import numpy as np
import pandas as pd
import pytest

from diffin_core.errors import DiffinError
from diffin_core.workspace import triage
from diffin_core.workspace.review import ReviewLog


def _scores():
    return pd.DataFrame({"sample_id": [10, 11, 12, 13, 14, 15],
                         "label": [0, 1, 1, 2, 0, 1],
                         "pred": [0, 2, 1, 2, 1, 1],
                         "label_issue": [0.1, 3.0, 0.5, 2.0, np.nan, 1.0]})


def test_filter_parts_combine_with_and(tmp_path):
    s = _scores()
    with ReviewLog(tmp_path) as log:
        log.decide(11, "exclude")
        log.decide(12, "keep")
        log.decide(15, "relabel", new_label=2)
        state = log.state()
    ids = lambda f: triage.apply(s, f, state)["sample_id"].tolist()
    assert ids(triage.Filter()) == [10, 11, 12, 13, 14, 15]
    assert ids(triage.Filter(given=[1])) == [11, 12, 15]
    assert ids(triage.Filter(given=[1], pred=[1])) == [12, 15]
    assert ids(triage.Filter(states=["undecided"])) == [10, 13, 14]
    assert ids(triage.Filter(states=["exclude", "relabel"])) == [11, 15]
    assert ids(triage.Filter(score_range=(0.5, 2.0))) == [12, 13, 15]      # inclusive; NaN never passes
    assert ids(triage.Filter(ids="15, 10-11 #13")) == [10, 11, 13, 15]
    assert ids(triage.Filter(given=[1], states=["undecided"])) == []
    assert not triage.Filter().active() and triage.Filter(pred=[2]).active()
    assert triage.Filter(given=[1], states=["keep"]).describe() == "given 1 · state keep"
    # under consensus a reviewer's queue: "undecided" = not in queue_done(user); voted-on, no state
    done = {11, 12, 13, 15}
    assert triage.apply(s, triage.Filter(states=["undecided"]), state, done=done)["sample_id"].tolist() == [10, 14]
    assert triage.apply(s, triage.Filter(states=["keep"]), state, done=done)["sample_id"].tolist() == [12]


def test_text_filter_is_a_case_insensitive_substring():
    s = _scores()
    texts = ["Call NOW", "hello", "call me", "x", "", "recall"]
    got = triage.apply(s, triage.Filter(text="CALL"), texts=lambda rows: [texts[r] for r in rows])
    assert got["sample_id"].tolist() == [10, 12, 15]
    # combined with another part, only the rows that survive it are read
    seen = []
    triage.apply(s, triage.Filter(text="call", given=[0]), texts=lambda rows: seen.extend(rows) or [texts[r] for r in rows])
    assert seen == [0, 4]
    with pytest.raises(DiffinError, match="no text"):
        triage.apply(s, triage.Filter(text="call"))


@pytest.mark.parametrize("bad", ["12a", "9-3", "x"])
def test_bad_ids_are_one_line_errors(bad):
    with pytest.raises(DiffinError) as e:
        triage.parse_ids(bad)
    assert "\n" not in str(e.value)


def test_state_filter_without_the_log_or_with_an_unknown_state_refuses():
    with pytest.raises(DiffinError, match="review log"):
        triage.apply(_scores(), triage.Filter(states=["keep"]))
    with pytest.raises(DiffinError, match="unknown review state"):
        triage.apply(_scores(), triage.Filter(states=["maybe"]), pd.DataFrame(columns=["action"]))


def _history(user, seconds, actions=None):
    t0 = pd.Timestamp("2026-12-07T10:00:00+00:00")
    return pd.DataFrame({"user": user, "action": actions or ["keep"] * len(seconds),
                         "ts": [(t0 + pd.Timedelta(seconds=s)).isoformat() for s in seconds]})


def test_pace_counts_the_current_session_only():
    t0 = pd.Timestamp("2026-12-07T10:00:00+00:00")
    # an earlier session, a 20-minute pause, then 5 decisions over 2 minutes (4 intervals)
    h = _history("ann", [0, 10, 1200, 1230, 1260, 1290, 1320])
    p = triage.pace(h, "ann", now=t0 + pd.Timedelta(seconds=1330))
    assert p["decisions"] == 5 and p["minutes"] == pytest.approx(2.0)
    assert p["per_minute"] == pytest.approx(2.0)
    # other users' decisions and undo events do not count
    other = pd.concat([h, _history("bob", [1300, 1310]), _history("ann", [1325], ["undo"])])
    assert triage.pace(other, "ann", now=t0 + pd.Timedelta(seconds=1330))["decisions"] == 5
    # one decision has no rate; a long pause ends the session
    assert triage.pace(_history("ann", [0]), "ann", now=t0 + pd.Timedelta(seconds=5))["per_minute"] is None
    assert triage.pace(h, "ann", now=t0 + pd.Timedelta(hours=2))["decisions"] == 0
    assert triage.pace(h.iloc[:0], "ann")["decisions"] == 0


def test_error_posterior_recovers_the_noise_rate_of_data_drawn_from_its_model():
    """Draw labels from the model itself: K = 10 classes, the held-out class probabilities are
    calibrated (the true class is drawn from them), then 15% of the labels flip evenly to another
    class; the fitted rate and the expected count of errors must match what was drawn."""
    rng = np.random.default_rng(0)
    n, k, e = 20000, 10, 0.15
    probs = rng.dirichlet(np.full(k, 0.3), n)                 # the held-out model's class probabilities
    true = (probs.cumsum(1) > rng.random((n, 1))).argmax(1)    # calibrated: drawn from them
    wrong = rng.random(n) < e
    given = np.where(wrong, (true + rng.integers(1, k, n)) % k, true)
    q = probs[np.arange(n), given]
    post, rate = triage.error_posterior(-np.log(q), k)
    assert rate == pytest.approx(e, abs=0.01)
    assert post.sum() == pytest.approx(wrong.sum(), rel=0.08)      # seeds 0-5: within 5.4%
    # decisions stand in for the posterior of the decided samples
    known = np.full(n, np.nan)
    known[:100] = wrong[:100]
    post2, _ = triage.error_posterior(-np.log(q), k, known)
    assert np.array_equal(post2[:100], wrong[:100].astype(float))


def test_expected_errors_counts_undecided_samples_and_checks_itself(tmp_path):
    s = pd.DataFrame({"sample_id": np.arange(6), "label": 0, "pred": 0,
                      "label_issue": [5.0, 4.0, 0.01, 0.02, 3.0, 0.05]})
    with ReviewLog(tmp_path) as log:
        log.decide(0, "exclude")
        log.decide(2, "keep")
        state = log.state()
    out = triage.expected_errors(s, state, 10, "diffin")
    post, _ = triage.error_posterior(s["label_issue"], 10, [1.0, np.nan, 0.0, np.nan, np.nan, np.nan])
    assert out["left"] == pytest.approx(post[[1, 3, 4, 5]].sum())
    assert out["undecided"] == 4 and out["decided"] == 2 and out["found"] == 1
    assert 1.0 < out["left"] < 3.0          # two high scores left, two low ones
    among = triage.expected_errors(s, state, 10, "diffin", among=[3, 5, 0])      # 0 is decided: not counted
    assert among["left_among"] == pytest.approx(post[[3, 5]].sum()) and among["left_among"] < 0.2
    assert triage.expected_errors(s, state, 10, "tracin") is None      # a ranking, not a LOO loss
