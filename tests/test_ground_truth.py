"""The engine's backbone: every estimator against true trajectory leave-one-out on a tiny model.

Digits, tanh MLP 64-32-10, 10% flipped labels, SGD batch 32, cosine lr from 0.2, float64 truth
(retrain with the sample's weight 0 in every batch that holds it); estimators run in float32.
"""
import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from diffin_core.engine.functional import FunctionalModel
from diffin_core.methods import METHODS, ScoreSettings
from diffin_core.engine.models import MLP
from diffin_core.run.scoring import run_method
from diffin_core.run.context import make_context
from diffin_core.tasks.truth import batch_order, cosine_lrs, digits_case, leave_one_out, sgd_influence, train_sgd

pytestmark = pytest.mark.slow
N_TRAIN, EPOCHS, SAMPLES = 800, 8, 40


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    train, query = digits_case(noise=0.1, n_train=N_TRAIN, seed=0)
    model = MLP(64, (32,), 10).double()
    fm = FunctionalModel(model)
    x, y = torch.as_tensor(train.x, dtype=torch.float64), torch.as_tensor(train.y)
    qx, qy = torch.as_tensor(query.x, dtype=torch.float64), torch.as_tensor(query.y)
    batches = batch_order(N_TRAIN, 32, EPOCHS, seed=0)
    traj = train_sgd(fm, fm.theta_of(model), x, y, batches, cosine_lrs(0.2, len(batches)))
    samples = np.random.default_rng(1).choice(N_TRAIN, SAMPLES, replace=False)
    truth = leave_one_out(fm, traj, x, y, qx, qy, samples)
    return dict(fm=fm, traj=traj, train=train, query=query, samples=samples, truth=truth)


def estimate(case, method, checkpoints):
    steps, thetas, lrs = case["traj"].checkpoints(checkpoints)
    states = [{k: v.float() for k, v in case["fm"].unflatten(t).items()} for t in thetas]
    ctx = make_context(MLP(64, (32,), 10), states, steps, lrs, case["train"], ScoreSettings())
    out = run_method(ctx, method, case["query"].x, case["query"].y, need_self=False)
    return out["influence"][case["samples"]]


def test_truth_is_not_degenerate(case):
    assert np.std(case["truth"]) > 0
    assert (case["truth"] > 0).any() and (case["truth"] < 0).any()   # helpful and harmful both exist


def test_diffin_reaches_spearman_09_with_10_checkpoints_and_beats_tracin(case):
    d = spearmanr(estimate(case, "diffin", 10), case["truth"])[0]
    t = spearmanr(estimate(case, "tracin", 10), case["truth"])[0]
    assert d >= 0.9, d
    assert d > t + 0.1, (d, t)
    p = pearsonr(estimate(case, "diffin", 10), case["truth"])[0]
    assert p >= 0.9, p


def test_diffin_improves_with_more_checkpoints(case):
    s5 = spearmanr(estimate(case, "diffin", 5), case["truth"])[0]
    s20 = spearmanr(estimate(case, "diffin", 20), case["truth"])[0]
    assert s20 >= 0.9 and s20 >= s5 - 0.02, (s5, s20)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_has_the_truths_sign(case, method):
    est = estimate(case, method, 10)
    assert pearsonr(est, case["truth"])[0] > 0, method


def test_every_step_sgd_influence_is_the_first_order_term_of_the_truth(case):
    """The reference itself: with the real batches, every step's exact Hessian, it is the linear
    term of trajectory leave-one-out (so the LDS diagnosis in benchmarks/lds.py can lean on it)."""
    x, y = torch.as_tensor(case["train"].x, dtype=torch.float64), torch.as_tensor(case["train"].y)
    qx, qy = torch.as_tensor(case["query"].x, dtype=torch.float64), torch.as_tensor(case["query"].y)
    ref = sgd_influence(case["fm"], case["traj"], x, y, qx, qy, "batch", mean=True)[case["samples"], 0]
    assert spearmanr(ref, case["truth"])[0] >= 0.98
    assert pearsonr(ref, case["truth"])[0] >= 0.98


def test_diffin_approximates_the_every_step_expected_membership_influence(case):
    """Diff-In's estimand with no batch knowledge: z injected at every step with weight lr/N, the
    whole training set's Hessian at every step. Diff-In from 20 checkpoints reproduces it on all
    N samples; TracIn (the same without curvature) does not."""
    x, y = torch.as_tensor(case["train"].x, dtype=torch.float64), torch.as_tensor(case["train"].y)
    qx, qy = torch.as_tensor(case["query"].x, dtype=torch.float64), torch.as_tensor(case["query"].y)
    ref = sgd_influence(case["fm"], case["traj"], x, y, qx, qy, "expected", mean=True)[:, 0]

    def everywhere(method):
        steps, thetas, lrs = case["traj"].checkpoints(20)
        states = [{k: v.float() for k, v in case["fm"].unflatten(t).items()} for t in thetas]
        ctx = make_context(MLP(64, (32,), 10), states, steps, lrs, case["train"], ScoreSettings())
        return run_method(ctx, method, case["query"].x, case["query"].y, need_self=False)["influence"]
    d, t = pearsonr(everywhere("diffin"), ref)[0], pearsonr(everywhere("tracin"), ref)[0]
    print(d, t)
    assert d >= 0.95 and d > t + 0.1, (d, t)
