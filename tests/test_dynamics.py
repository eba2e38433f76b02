"""Training-dynamics peers (mean loss, AUM, forgetting, cleanlab-cv) and the trajectory
leave-one-out label_issue: known answers on hand-made trajectories, ground truth on a tiny model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from diffin_core.errors import DiffinError
from diffin_core.methods.label_issue import (accumulated_self, area_under_margin, first_order_self_by_target,
                                     forgetting_counts, label_issue_from_trajectory, mean_loss, margins,
                                     steps_before, trajectory_loo_loss)
from diffin_core.methods import METHODS, ScoreSettings
from diffin_core.methods.dynamics import out_of_sample_probs
from diffin_core.run.scoring import run_method
from diffin_core.run.context import make_context


# --- hand-made trajectories with known answers ---------------------------------------------------
def test_aum_is_the_mean_margin_of_the_logits():
    # 3 checkpoints, 2 samples, 3 classes; sample 0 labelled 0, sample 1 labelled 2
    logits = np.array([[[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]],
                       [[4.0, 1.0, 2.0], [0.0, 1.0, 1.5]],
                       [[0.0, 1.0, 0.5], [5.0, 0.0, 6.0]]])
    y = np.array([0, 2])
    assert margins(logits, y).tolist() == [[1.0, -2.0], [2.0, 0.5], [-1.0, 1.0]]
    assert area_under_margin(logits, y).tolist() == pytest.approx([2.0 / 3, -0.5 / 3])
    assert METHODS["aum"]().score(logits, y).tolist() == pytest.approx([-2.0 / 3, 0.5 / 3])


def test_forgetting_counts_events_and_ranks_never_learned_first():
    correct = np.array([[1, 0, 1, 0],
                        [0, 0, 1, 1],
                        [1, 0, 1, 0],
                        [0, 0, 1, 1]], dtype=bool)      # (K=4 checkpoints, N=4 samples)
    # sample 0: right, wrong, right, wrong = 2 events; sample 1 never right = K + 1;
    # sample 2 always right = 0; sample 3: wrong, right, wrong, right = 1 event
    assert forgetting_counts(correct).tolist() == [2.0, 5.0, 0.0, 1.0]


def test_mean_loss_is_the_average_cross_entropy():
    logits = np.log(np.array([[[0.5, 0.5]], [[0.25, 0.75]]]))   # 2 checkpoints, 1 sample
    assert mean_loss(logits, np.array([0]))[0] == pytest.approx((np.log(2) + np.log(4)) / 2)


def test_steps_before_weights():
    w = steps_before([0, 10, 20, 40], [5.0, 10.0, 15.0, 10.0])
    # j < k fully before step k; j = k: the half-interval before it over the segment's steps
    assert w[0, 1] == w[1, 2] == w[0, 3] == 1.0 and w[2, 1] == 0.0 and w[3, 2] == 0.0
    assert w[1, 1] == pytest.approx(5 / 10) and w[2, 2] == pytest.approx(5 / 15) and w[3, 3] == pytest.approx(1.0)
    assert w[0, 0] == 0.0


def test_trajectory_term_separates_samples_with_the_same_losses():
    """Two samples with identical loss curves (a memorised flip and a clean sample both fitted):
    only the accumulated self-influence tells them apart; zeroed, the rule ties them."""
    losses = np.array([[2.0, 1.0, 0.1], [2.0, 1.0, 0.1]])
    sbc = np.array([[0.0, 1.5, 0.9], [0.0, 0.1, 0.05]])     # per-checkpoint self-influence
    steps, seg = [0, 10, 20], np.array([5.0, 10.0, 5.0])
    up_to = accumulated_self(sbc, steps, seg)
    score = trajectory_loo_loss(losses, up_to, seg, ks=[1, 2])
    assert score[0] > score[1] + 0.5
    zero = trajectory_loo_loss(losses, np.zeros_like(up_to), seg, ks=[1, 2])
    assert zero[0] == zero[1]
    # time-average with the segments as weights: (10 * (1 + I_1) + 5 * (0.1 + I_2)) / 15
    assert score[0] == pytest.approx((10 * (1.0 + 0.75) + 5 * (0.1 + 1.5 + 0.9)) / 15)


# --- a tiny trained model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_run():
    """Logistic regression on 150 digits, 20% flips, plain SGD saved every 5 steps (float64)."""
    from diffin_core.engine.functional import FunctionalModel
    from diffin_core.engine.models import MLP
    from diffin_core.tasks.truth import batch_order, digits_case, train_sgd
    train, query = digits_case(noise=0.2, n_train=150, seed=3)
    torch.manual_seed(0)
    model = MLP(64, (), 10).double()
    fm = FunctionalModel(model)
    batches = batch_order(len(train), 15, 8, seed=0)
    lrs = [0.5] * len(batches)
    x, y = torch.as_tensor(train.x, dtype=torch.float64), torch.as_tensor(train.y)
    traj = train_sgd(fm, fm.theta_of(model), x, y, batches, lrs, save_every=5)
    steps = sorted(traj.saved)
    states = [{k: v.detach() for k, v in fm.unflatten(traj.saved[s]).items()} for s in steps]
    ck_lrs = [0.5] * len(steps)
    return dict(train=train, query=query, fm=fm, traj=traj, steps=steps, states=states, lrs=ck_lrs, x=x, y=y)


def _ctx(r):
    from diffin_core.engine.models import MLP
    return make_context(MLP(64, (), 10), r["states"], r["steps"], r["lrs"], r["train"],
                        ScoreSettings(device="cpu"), dtype=torch.float64)


def test_first_order_self_influence_matches_leave_one_out_along_the_trajectory(digits_run):
    """I_k(z) against the truth: retrain without z (same batches) and measure how much higher
    z's own loss is at checkpoint k."""
    r = digits_run
    ctx = _ctx(r)
    est = first_order_self_by_target(ctx)                        # (N, m)
    k = len(r["steps"]) // 2                                     # a mid-training checkpoint
    upto = r["steps"][k]
    samples = np.random.default_rng(0).choice(len(r["y"]), 12, replace=False)
    truth = _self_loo_at(r, samples, upto)
    assert np.all(est[:, 1:] > -1e-9)                             # training on z lowers its own loss
    assert spearmanr(est[samples, k], truth)[0] > 0.8


def test_label_issue_from_trajectory_finds_flips_and_uses_the_self_term(digits_run):
    r = digits_run
    ctx = _ctx(r)
    flipped = r["train"].y != r["train"].true_y
    li = label_issue_from_trajectory(ctx)
    assert roc_auc_score(flipped, li) > 0.9
    sbc = np.random.default_rng(1).random((ctx.n, ctx.m))
    with_sbc = label_issue_from_trajectory(ctx, self_by_checkpoint=sbc)
    without = label_issue_from_trajectory(ctx, self_by_checkpoint=np.zeros_like(sbc))
    assert not np.allclose(with_sbc, without)                   # the trajectory term is used
    assert np.allclose(with_sbc - without, accumulated_self(sbc, ctx.steps, ctx.segments)[:, 1:] @
                       (ctx.segments[1:] / ctx.segments[1:].sum()))


@pytest.mark.parametrize("method", ["mean-loss", "aum", "forgetting"])
def test_dynamics_methods_score_every_sample(digits_run, method):
    r = digits_run
    out = run_method(_ctx(r), method, r["query"].x, r["query"].y)
    flipped = r["train"].y != r["train"].true_y
    li = out["label_issue"]
    assert li.shape == (len(flipped),) and np.isfinite(li).all()
    assert np.isnan(out["self_influence"]).all()
    assert roc_auc_score(flipped, li) > (0.7 if method == "forgetting" else 0.9), method


def test_cleanlab_cv_uses_out_of_sample_models_only(digits_run):
    from diffin_core.engine.models import MLP
    r = digits_run
    x, y = r["train"].x, r["train"].y
    seen = []

    def trainer(xs, ys, seed):
        seen.append({tuple(row) for row in np.round(xs, 6)})
        torch.manual_seed(seed)
        m = MLP(64, (), 10)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        xt, yt = torch.as_tensor(xs), torch.as_tensor(ys)
        for _ in range(60):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(xt), yt).backward()
            opt.step()
        return m

    probs = out_of_sample_probs(trainer, x, y, folds=3, seed=0)
    assert len(seen) == 3 and probs.shape == (len(y), 10)
    assert np.allclose(probs.sum(1), 1.0)
    assert sum(tuple(row) in s for s in seen for row in np.round(x[:20], 6)) == 2 * 20   # each in 2 of 3 folds
    ctx = _ctx(r)
    ctx.trainer = trainer
    li = run_method(ctx, "cleanlab-cv", r["query"].x, r["query"].y)["label_issue"]
    flipped = y != r["train"].true_y
    assert roc_auc_score(flipped, li) > 0.9


def test_cleanlab_cv_needs_a_recipe(digits_run):
    r = digits_run
    with pytest.raises(DiffinError, match="recipe"):
        run_method(_ctx(r), "cleanlab-cv", r["query"].x, r["query"].y)


# --- the product's rule: estimated LOO loss at the checkpoint with the lowest query loss ----------
def test_best_checkpoint_is_the_lowest_query_loss_after_step_0():
    from diffin_core.methods.label_issue import best_checkpoint
    assert best_checkpoint([2.0, 0.4, 0.6, 0.9], [0, 10, 20, 30]) == 1
    assert best_checkpoint([2.0, 0.5, 0.7, 0.5], [0, 10, 20, 30]) == 3        # ties: the later
    assert best_checkpoint([0.1, 0.5, 0.6], [0, 10, 20]) == 1                 # step 0 never


def test_truncated_context_equals_a_run_that_ended_there(digits_run):
    from diffin_core.methods.label_issue import truncate_context
    from diffin_core.engine.models import MLP
    r = digits_run
    ctx = _ctx(r)
    k = 6
    short = make_context(MLP(64, (), 10), r["states"][:k + 1], r["steps"][:k + 1], r["lrs"][:k + 1],
                         r["train"], ScoreSettings(device="cpu"), dtype=torch.float64)
    cut = truncate_context(ctx, k)
    assert cut.m == k + 1 and list(cut.steps) == r["steps"][:k + 1]
    assert np.allclose(cut.segments, short.segments) and np.allclose(cut.lrs, short.lrs)
    for method in ("diffin", "tracin"):
        a = run_method(cut, method, r["query"].x, r["query"].y)
        b = run_method(short, method, r["query"].x, r["query"].y)
        assert np.allclose(a["influence"], b["influence"]) and np.allclose(a["self_influence"], b["self_influence"])


def test_diffin_label_issue_is_the_loo_loss_where_the_query_loss_is_lowest(digits_run):
    """On a run whose query loss rises after an early minimum, diffin's label_issue is the loss
    plus Diff-In's self-influence at that checkpoint; zeroing the self-influence changes it."""
    from diffin_core.methods.label_issue import best_checkpoint, losses_from_logits, query_loss_by_checkpoint
    from diffin_core.methods.label_issue import checkpoint_logits, truncate_context
    from diffin_core.methods.base import Attributor
    r = digits_run
    ctx = _ctx(r)
    # a query set that the model gets worse on: the training set's own flipped samples
    flipped = r["train"].y != r["train"].true_y
    qx, qy = r["train"].x[flipped], r["train"].true_y[flipped]
    q = query_loss_by_checkpoint(ctx, qx, qy)
    k = best_checkpoint(q, ctx.steps)
    assert 0 < k < ctx.m - 1, q                                          # an early minimum
    li = run_method(ctx, "diffin", qx, qy)["label_issue"]
    cut = truncate_context(ctx, k)
    sub = Attributor.run(METHODS["diffin"](), cut, qx, qy, need_self=True)
    loss_k = losses_from_logits(checkpoint_logits(ctx, [k]), r["train"].y)[0]
    assert np.allclose(li, loss_k + sub["self_influence"])
    assert sub["self_influence"].std() > 0.01 * loss_k.std()            # the self term is not zero
    assert roc_auc_score(flipped, li) > 0.9


# --- Diff-In's self-influence of the model at every checkpoint (trajectory_mean_loo_loss) -----------
def _si_at(ctx, plan, k):
    from diffin_core.methods.label_issue import mean_self_influence
    w = np.zeros(ctx.m)
    w[k] = 1.0
    return np.concatenate([mean_self_influence(ctx, plan, x, y, w).numpy() for _sl, x, y in ctx.chunks()])


def test_self_influence_at_each_checkpoint_matches_leave_one_out_there(digits_run):
    """SI_k (z's gradient at checkpoint k carried back through k..0) is the final self-influence
    at the last checkpoint exactly, and at a mid-training checkpoint it ranks the true
    trajectory leave-one-out rise of z's own loss there (retrain without z up to step_k)."""
    r = digits_run
    ctx = _ctx(r)
    method = METHODS["diffin"]()
    out = run_method(ctx, "diffin", r["query"].x, r["query"].y)
    plan = method.prepare(ctx, r["query"].x, r["query"].y)
    assert np.allclose(_si_at(ctx, plan, ctx.m - 1), out["self_influence"], rtol=1e-9, atol=1e-12)
    k = len(r["steps"]) // 2
    upto = r["steps"][k]
    est = _si_at(ctx, plan, k)
    samples = np.random.default_rng(0).choice(len(r["y"]), 12, replace=False)
    truth = _self_loo_at(r, samples, upto)
    assert spearmanr(est[samples], truth)[0] > 0.8, (est[samples], truth)
    assert not np.allclose(est, out["self_influence"])              # a different model's self-influence


def test_trajectory_mean_loo_loss_is_the_mean_of_loss_plus_self_influence(digits_run):
    from diffin_core.methods.label_issue import checkpoint_logits, losses_from_logits, trajectory_mean_loo_loss
    r = digits_run
    ctx = _ctx(r)
    method = METHODS["diffin"]()
    li = trajectory_mean_loo_loss(method, ctx, r["query"].x, r["query"].y)
    plan = method.prepare(ctx, r["query"].x, r["query"].y)
    ks = [k for k, s in enumerate(ctx.steps) if s > 0]
    losses = losses_from_logits(checkpoint_logits(ctx, ks), r["train"].y)
    expect = np.mean([losses[i] + _si_at(ctx, plan, k) for i, k in enumerate(ks)], 0)
    assert np.allclose(li, expect, rtol=1e-8, atol=1e-10)
    flipped = r["train"].y != r["train"].true_y
    assert roc_auc_score(flipped, li) > 0.9


def _self_loo_at(r, samples, upto: int) -> list[float]:
    """True self leave-one-out at step ``upto``: l_z(theta without z) - l_z(theta), retrained to that step."""
    from diffin_core.tasks.truth import train_sgd
    truth = []
    for z in samples:
        t = train_sgd(r["fm"], r["traj"].theta0, r["x"], r["y"], r["traj"].batches[:upto],
                      r["traj"].lrs[:upto], drop=int(z), save_every=None)
        xz, yz = r["x"][z:z + 1], r["y"][z:z + 1]
        truth.append(float(r["fm"].mean_loss(t.saved[upto], xz, yz) - r["fm"].mean_loss(r["traj"].saved[upto], xz, yz)))
    return truth


# --- Diff-In's estimated leave-one-out logits (loo_logits.py) -------------------------------------
def test_loo_logit_shift_read_through_the_loss_is_the_self_influence(digits_run):
    """g_z = J_z^T (p_z - e_y): the logit shift dotted with the loss's logit gradient is SI_k exactly,
    at the last checkpoint and at a mid-training one."""
    from diffin_core.methods.loo_logits import loo_logits
    r = digits_run
    ctx = _ctx(r)
    method = METHODS["diffin"]()
    plan = method.prepare(ctx, r["query"].x, r["query"].y)
    onehot = np.eye(10)[r["train"].y]
    for k in (ctx.m - 1, ctx.m // 2):
        logits, shift = loo_logits(method, ctx, r["query"].x, r["query"].y, k=k, plan=plan)
        p = torch.softmax(torch.as_tensor(logits), -1).numpy()
        assert np.allclose(((p - onehot) * shift).sum(1), _si_at(ctx, plan, k), rtol=1e-8, atol=1e-10)
        assert np.abs(shift).max() > 0.1                                  # not a zero shift


def test_loo_logit_shift_matches_the_true_leave_one_out_logits(digits_run):
    """Ground truth: retrain without z (same batches) to a mid-training step; the estimated change
    of z's 10 logits points the way the true change does."""
    from diffin_core.methods.loo_logits import loo_logits
    from diffin_core.tasks.truth import train_sgd
    r = digits_run
    ctx = _ctx(r)
    k = len(r["steps"]) // 2
    upto = r["steps"][k]
    logits, shift = loo_logits(METHODS["diffin"](), ctx, r["query"].x, r["query"].y, k=k)
    samples = np.random.default_rng(0).choice(len(r["y"]), 12, replace=False)
    true = []
    for z in samples:
        t = train_sgd(r["fm"], r["traj"].theta0, r["x"], r["y"], r["traj"].batches[:upto],
                      r["traj"].lrs[:upto], drop=int(z), save_every=None)
        with torch.no_grad():
            true.append((r["fm"].logits(t.saved[upto], r["x"][z:z + 1])[0]).numpy() - logits[z])
    true = np.array(true)
    est = shift[samples]
    cos = (true * est).sum(1) / np.linalg.norm(true, axis=1) / np.linalg.norm(est, axis=1)
    assert np.median(cos) > 0.9, cos                                     # measured 0.98
    assert spearmanr(np.linalg.norm(est, axis=1), np.linalg.norm(true, axis=1))[0] > 0.75   # measured 0.90


def test_early_stopped_loo_logit_loss_linearises_to_the_products_rule(digits_run):
    """The candidate rule reads the same truncated run through the logits: at first order it is the
    product's loss + self-influence, and by convexity of the cross-entropy in the logits it is never
    below it."""
    from diffin_core.methods.loo_logits import early_stopped_loo_logit_loss
    r = digits_run
    ctx = _ctx(r)
    flipped = r["train"].y != r["train"].true_y
    qx, qy = r["train"].x[flipped], r["train"].true_y[flipped]             # an early query minimum
    cand, k = early_stopped_loo_logit_loss(METHODS["diffin"](), ctx, qx, qy)
    rule = run_method(ctx, "diffin", qx, qy)["label_issue"]
    assert 0 < k < ctx.m - 1
    assert np.all(cand >= rule - 1e-9)
    assert not np.allclose(cand, rule)
    assert roc_auc_score(flipped, cand) > 0.9


def test_one_run_states_the_sharp_steps_line_once(digits_run):
    """One diffin run whose label_issue plan walks a truncated copy of the context (folded into
    the scoring walk, label_issue.truncate_context) states "SGD steps large against the loss
    curvature" once: one RecipeWarning, one line in the recipe's approximations (meta.json; the
    CLI prints those), naming the checkpoint out of the whole run's count (the sample project
    printed it twice, "checkpoint 9/10" from the label plan and "9/12" from the main walk)."""
    import warnings
    from diffin_core.engine.propagate import SHARP_LINE
    from diffin_core.engine.recipe import RecipeWarning
    from diffin_core.methods.label_issue import best_checkpoint, query_loss_by_checkpoint
    from diffin_core.run.scoring import approximations
    r = digits_run
    ctx = _ctx(r)
    flipped = r["train"].y != r["train"].true_y
    qx, qy = r["train"].x[flipped], r["train"].true_y[flipped]    # an early query-loss minimum
    assert best_checkpoint(query_loss_by_checkpoint(ctx, qx, qy), ctx.steps) < ctx.m - 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_method(ctx, "diffin", qx, qy)
    said = [str(w.message) for w in caught if issubclass(w.category, RecipeWarning) and SHARP_LINE in str(w.message)]
    lines = [a for a in approximations(ctx, "diffin") if a.startswith(SHARP_LINE)]
    assert len(said) == 1 and lines == said, (said, lines)            # lr 0.5 on this model: above the limit
    assert f"/{ctx.m} (step" in lines[0]
