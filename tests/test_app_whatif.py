"""What-if page: predicted change from influence, verify by retraining in the background job."""
import json

import numpy as np
import pandas as pd

from app_fixtures import jobs, loss_run, new_app, scored, workspace  # noqa: F401


def test_prediction_then_verified_by_retraining(scored, jobs):
    at = new_app(scored, "pages/6_What-if.py")
    at.number_input(key="whatif_k").set_value(15).run()
    scores = pd.read_parquet(scored / "runs/loss-1/scores.parquet")
    expected = np.sort(scores["influence"].to_numpy())[:15].sum()
    shown = [m.value for m in at.metric if m.label.startswith("Predicted change")][0]
    assert float(shown.split()[0]) == round(expected, 4)
    assert expected < 0 and "falls" in [m.value for m in at.metric if m.label == "Direction"][0]

    at.button(key="whatif_verify").click().run()
    job = jobs.list()[0]
    assert job.kind == "whatif"
    assert jobs.wait(job.id, timeout=300).status == "done", jobs.get(job.id).error
    at.run()
    assert not at.exception
    table = at.dataframe[0].value
    assert len(table) == 1 and table["removed"].iloc[0] == 15
    assert table["predicted Δ loss"].iloc[0] == expected
    stored = list((scored / "runs/loss-1/whatif").glob("*.json"))
    result = [json.loads(p.read_text()) for p in stored if not p.name.startswith("baseline-")][0]
    assert sorted(result["removed_ids"]) == sorted(scores.nsmallest(15, "influence")["sample_id"].tolist())
    assert result["actual_loss_change"] == result["after"]["loss"] - result["before"]["loss"]


def test_review_exclusions_as_the_selection(scored, jobs):
    from diffin_core.review import ReviewLog
    ReviewLog(scored).decide_many([3, 5, 8], "exclude")
    at = new_app(scored, "pages/6_What-if.py")
    at.radio(key="whatif_source").set_value("the samples excluded in review").run()
    assert [m.value for m in at.metric if m.label == "Samples to remove"][0] == "3"
