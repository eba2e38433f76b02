"""Ground truth on text (issue 18, the CI case): a 2-layer BERT (hidden 64) built from a config,
trained on SMS messages with AdamW + linear warm-up/decay, and scored by diffin from the
Recorder's folder, against float64 trajectory leave-one-out of 40 samples (tasks/text_truth.py).
The full case (two recipes, seeds, label errors) is benchmarks/text.py."""
import warnings
from pathlib import Path
from dataclasses import replace

import numpy as np
import pytest
from scipy.stats import spearmanr

from diffin_core.methods import ScoreSettings
from diffin_core.project.checkpoints import read_manifest
from diffin_core.run.context import manifest_context
from diffin_core.run.scoring import run_method
from diffin_core.tasks.text_truth import TextRecipe, text_case

CASE = dict(n_train=300, epochs=10, batch=32, noise=0.0, vocab_size=300, min_frequency=5, max_length=48,
            every=10, samples=40, tokenizer_from=Path(__file__).parent / "data" / "sms_tokenizer")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return text_case(tmp_path_factory.mktemp("text-truth"), recipe=TextRecipe(**RECIPE), **CASE)


RECIPE = dict(lr=1e-3, max_grad_norm=None, dropout=0.0)


def estimate(case, method, count=None):
    """(Spearman against the truth, the RecipeWarning lines, median |estimate| / median |truth|)."""
    m = read_manifest(case["dir"] / "manifest.json")
    if count:
        idx = sorted({int(round(i)) for i in np.linspace(0, len(m.checkpoints) - 1, count)})
        m = replace(m, checkpoints=[m.checkpoints[i] for i in idx])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx = manifest_context(case["model_fn"]().float(), m, case["train"], ScoreSettings())
    est = run_method(ctx, method, case["query"].x, case["query"].y, need_self=False)["influence"][case["samples"]]
    ratio = np.median(np.abs(est)) / np.median(np.abs(case["truth"]))
    return (spearmanr(est, case["truth"])[0], [str(w.message) for w in caught if "Recipe" in w.category.__name__],
            ratio)


@pytest.mark.slow
def test_the_model_learns_and_the_truth_is_a_ranking(case):
    assert case["accuracy"] >= 0.93                      # majority class (ham) is ~0.87
    t = case["truth"]
    assert np.isfinite(t).all() and np.std(t) > 0.2 * np.abs(t).mean()


@pytest.mark.slow
def test_diffin_follows_the_truth_on_a_transformer_far_above_tracin(case):
    """Measured (benchmarks/results/text.csv, this exact case: same data, the shipped tokenizer,
    deterministic float64 training): diffin 0.775 at 11 and at 5 checkpoints (Adam's batch-order
    replay, nothing approximated), magnitude ratio 1.03; tracin 0.253, tracin-adam 0.274. The
    issue's target 0.8 is NOT met (0.775); the floor below guards this measurement."""
    d, approx, ratio = estimate(case, "diffin")
    t, _, _ = estimate(case, "tracin-adam")
    assert not approx, approx                          # the recipe is modelled, not approximated
    assert d >= 0.7 and d > t + 0.3, (d, t)
    assert 0.5 <= ratio <= 2.0, ratio                  # calibrated loss changes, not just a ranking
