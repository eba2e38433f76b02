"""Ground truth on text (issue 18, the CI case): a 2-layer BERT (hidden 64) built from a config,
trained on SMS messages with the Trainer's defaults (AdamW + linear warm-up/decay, clipping at
1.0, dropout 0.1), and scored by diffin from the Recorder's folder (batch order and dropout
generator states), against float64 trajectory leave-one-out of 40 samples (tasks/text_truth.py).
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


RECIPE = dict(lr=1e-3)          # the Trainer's defaults: max_grad_norm 1.0, dropout 0.1 (TextRecipe)


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
    """Issue 18's target on its own recipe (clipping and dropout included): Spearman >= 0.8 against
    the truth and above TracIn. Measured on this exact case (benchmarks/results/text.csv, part
    "truth-ci"; 2026-12-08, load 4-12): diffin 0.875 on main at e110381 (Adam's batch-order replay
    with the dropout masks redrawn and each sample's own term of Adam's moments removed exactly,
    adam_batches.OWN_TERM, b021cff), magnitude ratio 0.86; 0.988 (ratio 0.80) with OWN_TERM off,
    the engine before b021cff; tracin-adam 0.479, tracin 0.458. The case (training and 40
    retrainings) about 180 s of CPU, each estimate 20-60 s. Without clipping and dropout (recipe
    "adamw" in benchmarks/text.py) diffin reached 0.775 before b021cff: below the target."""
    d, approx, ratio = estimate(case, "diffin")
    t, _, _ = estimate(case, "tracin-adam")
    assert not approx, approx                          # the recipe is modelled, not approximated
    assert d >= 0.8 and d > t + 0.3, (d, t)
    assert 0.5 <= ratio <= 2.0, ratio                  # calibrated loss changes, not just a ranking
