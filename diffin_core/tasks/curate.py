"""The three data-centric tasks on top of a run's scores, their baselines, and what-if retraining.

Selections (each returns a boolean mask over the rows of the scores table / arrays):

    cleaning_selection(scores, fraction)   -> flagged: the top ``fraction`` by label_issue
    drop_most_harmful(scores, k)           -> removed: the ``k`` lowest influence (most harmful)
    coreset_selection(scores, fraction)    -> kept: the top ``fraction`` by a value column,
                                              class-stratified (each class keeps ``fraction``
                                              of its own samples, largest-remainder rounding)
    ccs_selection(values, fraction, labels, prune_low=0.1)
                                           -> kept: coverage-centric sampling over the value
                                              after dropping its lowest 10% per class (Diff-In's
                                              coreset rule in benchmarks/coreset.py: it beat the
                                              top-by-influence rule at keep 30% and 50%)
    coreset_keep(scores, fraction)         -> kept: the product's coreset (CLI and Export page):
                                              ccs_selection over influence by default

Coreset baselines computed from a scoring Context (its checkpoints and training split):

    el2n_scores(ctx)        mean ||softmax(f(x)) - onehot(y)||_2 over the early checkpoints
                            (those in the first ``early`` fraction of training, step 0 excluded)
    forgetting_scores(ctx)  forgetting events counted at checkpoint resolution: transitions
                            correct -> wrong between consecutive saved checkpoints; a sample never
                            classified correctly at any checkpoint gets (checkpoints + 1)
    moso_scores(ctx)        first-order moving-one-sample-out score (MoSo, Tan et al. 2023):
                            sum_k (lr_k * segment_k / N) * < g_{D\\z}(theta_k), g_z(theta_k) >,
                            g_{D\\z} = (N g_D - g_z) / (N - 1) the mean gradient of the other
                            samples: how much the rest of the training loss went down thanks to z
    (higher = more valuable, keep first, for all three)

What-if: ``verify_by_retraining(project, remove_ids, seeds=[0, 1, 2], run=...)`` runs the
project's ``[train] recipe`` in pairs, on all samples and without ``remove_ids`` with the same
seed, for every seed, and compares the mean +- std of the paired change of the mean query loss
with the influence prediction sum_{z removed} influence(z) (the product's sign convention:
influence(z) = L_Q(without z) - L_Q(with z)); ``noise_verdict`` says what the retrains measured
against it (a 95% t-interval over the seeds): sign and size confirmed, sign confirmed with the size
off by a factor, inside the noise, or contradicted (only a sign wrong beyond the noise). The result is stored atomically as
runs/<run>/whatif/<hash>.json.
"""
from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pandas as pd
import torch

from diffin_core.errors import DiffinError
from diffin_core.project.training import query_metrics, recipe_trainer


# --- selections -------------------------------------------------------------------------------
def _column(scores, name: str) -> np.ndarray:
    if isinstance(scores, pd.DataFrame):
        if name not in scores.columns:
            raise DiffinError(f"the scores have no column {name!r}; columns: {list(scores.columns)}")
        values = scores[name].to_numpy(dtype=np.float64)
    else:
        values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1:
        raise DiffinError(f"scores must be one value per sample, got shape {values.shape}")
    return values


def _count(fraction: float, n: int, what: str) -> int:
    if not 0.0 <= float(fraction) <= 1.0:
        raise DiffinError(f"{what} must be between 0 and 1, got {fraction}")
    return int(round(float(fraction) * n))


def _top(values: np.ndarray, k: int, largest: bool = True) -> np.ndarray:
    """Mask of the k largest (or smallest) values; NaN never chosen first; ties by row order."""
    v = np.where(np.isnan(values), -np.inf if largest else np.inf, values)
    order = np.argsort(-v if largest else v, kind="stable")
    mask = np.zeros(len(v), dtype=bool)
    mask[order[:max(0, min(k, len(v)))]] = True
    return mask


def cleaning_selection(scores, fraction: float, column: str = "label_issue") -> np.ndarray:
    """Flag the top ``fraction`` of samples by label_issue (higher = more likely mislabelled)."""
    values = _column(scores, column)
    if isinstance(scores, pd.DataFrame) and np.isnan(values).all():
        raise DiffinError(f"this run has no {column} scores")
    return _top(values, _count(fraction, len(values), "fraction"), largest=True)


def drop_most_harmful(scores, k: int, column: str = "influence") -> np.ndarray:
    """Remove the ``k`` samples with the lowest influence (most harmful for the query set)."""
    values = _column(scores, column)
    k = int(k)
    if k < 0:
        raise DiffinError(f"k must be >= 0, got {k}")
    if k > len(values):
        raise DiffinError(f"k = {k} is more than the {len(values)} training samples")
    return _top(values, k, largest=False)


def coreset_selection(scores, fraction: float, value="influence", balanced: bool = True,
                      labels: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Keep the top ``fraction`` of samples by ``value`` (a column name or an array).

    ``balanced``: every class keeps ``fraction`` of its own samples (largest-remainder rounding so
    that the total is exactly round(fraction * N)); otherwise the global top. ``value="random"``
    keeps a seeded random subset (the baseline)."""
    n = len(scores) if labels is None else len(labels)
    if isinstance(value, str) and value == "random":
        values = np.random.default_rng(seed).random(n)
    elif isinstance(value, str):
        values = _column(scores, value)
    else:
        values = _column(value, "value")
    if labels is None:
        if not isinstance(scores, pd.DataFrame):
            raise DiffinError("coreset_selection needs labels= when scores is not a table")
        labels = scores["label"].to_numpy()
    labels = np.asarray(labels)
    if len(values) != len(labels):
        raise DiffinError(f"{len(values)} values but {len(labels)} labels")
    total = _count(fraction, len(values), "fraction")
    if not balanced:
        return _top(values, total)
    classes, quota = _class_quotas(labels, fraction, total)
    keep = np.zeros(len(values), dtype=bool)
    for c, q in zip(classes, quota):
        rows = np.flatnonzero(labels == c)
        keep[rows[_top(values[rows], int(q))]] = True
    return keep


def _class_quotas(labels: np.ndarray, fraction: float, total: int) -> tuple[np.ndarray, np.ndarray]:
    """(classes, quota): each class's share of ``total`` kept samples, its count times
    ``fraction`` rounded by largest remainder so that the quotas sum to ``total``."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * float(fraction)
    quota = np.floor(exact).astype(int)
    extra = total - quota.sum()
    if extra > 0:
        quota[np.argsort(-(exact - quota), kind="stable")[:extra]] += 1
    return classes, quota


def ccs_selection(values, fraction: float, labels, prune_low: float = 0.0, bins: int = 50,
                  seed: int = 0) -> np.ndarray:
    """Coverage-centric coreset selection (CCS, Zheng et al. 2023) over a value score, per class.

    In each class (quota = its share of round(fraction * N), largest-remainder rounding as in
    ``coreset_selection``): drop the ``prune_low`` fraction with the lowest value, split the rest
    into ``bins`` equal-width strata of the value, and fill the quota from the smallest stratum
    up, each stratum taking at most an equal share of what is left (seeded random within a
    stratum). The subset covers the whole range of the score instead of its top."""
    values = _column(values, "value")
    labels = np.asarray(labels)
    if len(values) != len(labels):
        raise DiffinError(f"{len(values)} values but {len(labels)} labels")
    total = _count(fraction, len(values), "fraction")
    classes, quota = _class_quotas(labels, fraction, total)
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(values), dtype=bool)
    for c, q in zip(classes, quota):
        rows = np.flatnonzero(labels == c)
        v = np.nan_to_num(values[rows], nan=-np.inf)
        order = np.argsort(v, kind="stable")
        cut = min(int(round(prune_low * len(rows))), len(rows) - int(q))
        pool = rows[order[cut:]]
        pv = values[pool]
        edges = np.linspace(np.nanmin(pv), np.nanmax(pv) + 1e-12, bins + 1) if len(pool) else np.zeros(2)
        strata = [pool[(pv >= lo) & (pv < hi)] for lo, hi in zip(edges[:-1], edges[1:])]
        strata = sorted([s for s in strata if len(s)], key=len)
        left = int(q)
        for i, s in enumerate(strata):
            take = min(len(s), left // (len(strata) - i))
            keep[rng.choice(s, take, replace=False)] = True
            left -= take
        if left > 0:                       # rounding leftovers: random from what is not kept yet
            rest = pool[~keep[pool]]
            keep[rng.choice(rest, left, replace=False)] = True
    return keep


CORESET_RULES = ("ccs", "top", "random")


def coreset_keep(scores, fraction: float, rule: str = "ccs", value: str = "influence",
                 labels: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """The product's coreset (CLI ``diffin coreset`` and the Export page): kept mask (N,).

    ``rule="ccs"`` (default): ``ccs_selection`` over the ``value`` column with the 10% lowest per
    class pruned, the rule benchmarks/coreset.py chose (CHOSEN there) and measured against its
    peers; ``"top"``: the class-balanced top by value (``coreset_selection``); ``"random"``: a
    seeded class-balanced random subset. Labels default to the table's ``label`` column."""
    if rule not in CORESET_RULES:
        raise DiffinError(f"unknown coreset rule {rule!r}; choose one of {', '.join(CORESET_RULES)}")
    if labels is None:
        if not isinstance(scores, pd.DataFrame) or "label" not in scores.columns:
            raise DiffinError("coreset_keep needs labels= when the scores have no 'label' column")
        labels = scores["label"].to_numpy()
    if rule == "random":
        return coreset_selection(scores, fraction, value="random", labels=labels, seed=seed)
    if rule == "top":
        return coreset_selection(scores, fraction, value=value, labels=labels)
    return ccs_selection(_column(scores, value), fraction, labels, prune_low=CCS_PRUNE_LOW, seed=seed)


CCS_PRUNE_LOW = 0.1     # the lowest-value share per class that ccs drops first (benchmarks/coreset.py)

# --- coreset baselines ------------------------------------------------------------------------
def _probs(ctx, k: int) -> np.ndarray:
    out = []
    with torch.no_grad():
        for _sl, x, _y in ctx.chunks():
            out.append(torch.softmax(ctx.fm_at(k).logits(ctx.thetas[k], x), -1).double().cpu())
    return torch.cat(out).numpy()


def el2n_scores(ctx, early: float = 0.25) -> np.ndarray:
    """EL2N (Paul et al. 2021): ||p - onehot(y)||_2 averaged over the early checkpoints."""
    total = max(ctx.steps[-1], 1)
    ks = [k for k, s in enumerate(ctx.steps) if 0 < s <= early * total] or [min(1, ctx.m - 1)]
    y = ctx.train.y
    score = np.zeros(ctx.n)
    for k in ks:
        p = _probs(ctx, k)
        p[np.arange(ctx.n), y] -= 1.0
        score += np.linalg.norm(p, axis=1)
    return score / len(ks)


def forgetting_scores(ctx) -> np.ndarray:
    """Forgetting events (Toneva et al. 2019) at checkpoint resolution (step 0 excluded)."""
    from diffin_core.methods.label_issue import checkpoint_logits, forgetting_counts
    return forgetting_counts(checkpoint_logits(ctx).argmax(-1) == ctx.train.y[None, :])


def moso_scores(ctx) -> np.ndarray:
    """First-order MoSo: sum_k (lr_k seg_k / N) <(N g_D - g_z)/(N-1), g_z> at each checkpoint."""
    n = ctx.n
    score = torch.zeros(n, dtype=torch.float64)
    coef = ctx.lrs * ctx.segments / n
    for k in range(ctx.m):
        if coef[k] <= 0:
            continue
        gd = ctx.mean_grad(k, ctx.train.x, ctx.train.y)
        for sl, x, y in ctx.chunks():
            g = ctx.fm_at(k).per_sample_grads(ctx.thetas[k], x, y)
            dot = g @ gd
            sq = (g * g).sum(-1)
            score[sl] += float(coef[k]) * ((n * dot - sq) / max(n - 1, 1)).double().cpu()
        ctx.progress(k + 1, ctx.m, "moso: checkpoints")
    return score.numpy()


# --- what-if: verify by retraining ------------------------------------------------------------

def _retrain(project, keep: np.ndarray, seed: int) -> dict:
    model = recipe_trainer(project)(project.train.x[keep], project.train.y[keep], seed)
    return query_metrics(model, project.query.x, project.query.y)


def predicted_loss_change(scores, remove_ids) -> float:
    """Predicted change of the mean query loss (nats) if ``remove_ids`` were left out of
    training: the sum of their influences (first-order additivity; > 0 = the loss would rise)."""
    mask = np.isin(scores["sample_id"].to_numpy(), np.asarray(list(remove_ids), dtype=np.int64))
    return float(np.nansum(scores["influence"].to_numpy()[mask]))


def whatif_results(project, run: str) -> list[dict]:
    """Stored verify-by-retraining results of a run, newest first. The verdict is read again from
    the stored per-seed changes, so results stored under older wording say what was measured."""
    folder = project.run(run).path / "whatif"
    out = []
    for path in folder.glob("*.json") if folder.is_dir() else []:
        if path.name.startswith("baseline-"):
            continue
        try:
            r = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        changes = [p.get("loss_change") for p in r.get("per_seed") or []]
        if changes and all(isinstance(c, (int, float)) for c in changes) and "predicted_loss_change" in r:
            v = noise_verdict(float(r["predicted_loss_change"]), changes)
            r.update(verdict=v["verdict"], verdict_text=v["verdict_text"], interval95=v["interval95"])
        out.append(r)
    return sorted(out, key=lambda r: r.get("created", 0), reverse=True)


def whatif_key(run: str, remove_ids, seeds) -> str:
    ids = ",".join(str(int(i)) for i in sorted(set(int(i) for i in remove_ids)))
    seeds = ",".join(str(int(s)) for s in np.atleast_1d(seeds))
    return hashlib.sha1(f"{run}|{seeds}|{ids}".encode()).hexdigest()[:16]


def noise_verdict(predicted: float, changes) -> dict:
    """What the paired retrains measured against the prediction. ``changes``: the paired per-seed
    changes of the mean query loss.

    A 95% Student-t interval for the mean paired change, mean +- t_{0.975, n-1} * std / sqrt(n)
    (sample std over seeds), read for sign and size separately. Verdicts:

    * "confirmed": the interval excludes 0 and holds the prediction;
    * "size off": the interval excludes 0 on the prediction's side (the sign is confirmed) but not
      the prediction: the size is off by ``factor`` = predicted / measured mean (1.5 = 1.5x too
      large), with ``factor_range`` over the interval;
    * "inside noise": the interval holds both 0 and the prediction: retraining can neither confirm
      nor refute an effect this small;
    * "smaller than predicted": the interval holds 0 but not the prediction: no effect is seen
      beyond the noise, and its size in the predicted direction is at most the interval's end
      (``factor_range``: the prediction is at least that many times too large);
    * "contradicted": only when the sign is wrong beyond the noise (the interval excludes 0 on the
      side opposite the prediction, or the prediction is exactly 0);
    * "one seed": the noise is unknown.

    Returns the verdict, the interval, the factor(s) and a sentence saying it in words."""
    from scipy.stats import t as student_t
    d = np.asarray(changes, dtype=np.float64)
    n = len(d)
    mean = float(d.mean())
    std = float(d.std(ddof=1)) if n > 1 else float("nan")
    half = float(student_t.ppf(0.975, n - 1) * std / np.sqrt(n)) if n > 1 else float("inf")
    lo, hi = mean - half, mean + half
    inside = lo <= predicted <= hi
    zero = lo <= 0.0 <= hi
    same_sign = predicted != 0 and (np.sign(predicted) == np.sign(mean)) and not zero
    measured = f"measured {mean:+.4f} ± {std:.4f} nats (mean ± std over {n} paired seeds"
    interval = f"95% interval [{lo:+.4f}, {hi:+.4f}])"
    said = f"predicted {predicted:+.4f} nats"
    factor, factor_range = float("nan"), [float("nan"), float("nan")]
    if n < 2:
        verdict, text = "one seed", (f"One seed only: {said}, {measured}); the retrain noise is unknown, "
                                     "run at least 3 seeds to judge the prediction.")
    elif inside and not zero:
        factor = predicted / mean
        verdict, text = "confirmed", (f"Confirmed: sign and size: {said} lies inside the retrain noise of "
                                      f"the {measured}, {interval}.")
    elif inside:
        verdict, text = "inside noise", (f"Inside the noise: {said} and 0 both lie inside the retrain noise: "
                                         f"{measured}, {interval}. Retraining can neither confirm nor refute "
                                         "an effect this small.")
    elif same_sign:
        factor = predicted / mean
        factor_range = sorted([predicted / lo, predicted / hi])
        verdict, text = "size off", (f"Sign confirmed, size off by {factor:.2f}x: {said}, {measured}, "
                                     f"{interval}. The direction is right; the prediction is "
                                     f"{factor:.2f}x the measured change ({factor_range[0]:.2f}x to "
                                     f"{factor_range[1]:.2f}x over the interval).")
    elif zero:
        end = lo if predicted < 0 else hi          # the most the retrains allow in the predicted direction
        least = abs(predicted / end) if end != 0 else float("inf")
        factor_range = [least, float("inf")]
        verdict, text = "smaller than predicted", (
            f"Smaller than predicted: no effect beyond the retrain noise ({measured}, {interval}); in the "
            f"predicted direction the change is at most {end:+.4f} nats, so {said} is at least "
            f"{least:.2f}x too large. The sign is not established either way.")
    else:
        verdict, text = "contradicted", (f"Contradicted: the sign is wrong beyond the retrain noise: {said}, "
                                         f"{measured}, {interval}.")
    return {"verdict": verdict, "verdict_text": text, "interval95": [lo, hi], "std": std, "mean": mean,
            "factor": factor, "factor_range": factor_range}


def verify_by_retraining(project, remove_ids, seed: int = 0, progress=None, run: str | None = None,
                         seeds=None) -> dict:
    """Paired retrains with and without ``remove_ids`` (sample ids) over several seeds, compared
    with the influence prediction.

    For each seed (default ``seed, seed + 1, seed + 2``) the project's [train] recipe runs on all
    training samples (the baseline, cached in runs/<run>/whatif/baseline-<seed>-<data hash>.json)
    and without the removed ones, with the same seed: the change of the mean query loss is
    paired, so init and batch-order noise shared by the two runs cancels. Returns (and stores in
    runs/<run>/whatif/<hash>.json) the predicted change, the per-seed changes, their mean and
    std, ``before``/``after`` averaged over seeds, and ``noise_verdict``'s verdict in words.
    ``run`` defaults to the newest run.
    """
    from diffin_core.project.atomic import write_text
    from diffin_core.project.folder import Project
    project = project if isinstance(project, Project) else Project(project)
    progress = progress or (lambda d, t, m: None)
    seeds = [int(seed) + i for i in range(3)] if seeds is None else [int(s) for s in np.atleast_1d(seeds)]
    if not seeds:
        raise DiffinError("choose at least one seed")
    if not project.recipe:
        raise DiffinError("no [train] recipe in diffin.toml: add `[train] recipe = \"train.py:train\"` "
                          "to verify by retraining", project.config_path)
    runs = project.runs()
    if not runs:
        raise DiffinError("score the project first: there is no finished run", project.runs_dir)
    info = project.run(run) if run else runs[0]
    scores = project.scores(info.name)
    ids = scores["sample_id"].to_numpy()
    remove = np.asarray(sorted(set(int(i) for i in np.atleast_1d(remove_ids))), dtype=np.int64)
    if len(remove) == 0:
        raise DiffinError("choose at least one sample to remove")
    unknown = np.setdiff1d(remove, ids)
    if len(unknown):
        raise DiffinError(f"sample id {int(unknown[0])} is not in the training set")
    removed_mask = np.isin(ids, remove)
    if removed_mask.all():
        raise DiffinError("cannot remove every training sample")
    train_ids = project.train.ids
    if len(train_ids) != len(ids) or not np.array_equal(train_ids, ids):
        raise DiffinError(f"run {info.name!r} was scored on a different train split", info.path)
    predicted = predicted_loss_change(scores, remove)
    started = time.time()
    whatif = info.path / "whatif"
    data_hash = hashlib.sha1(np.ascontiguousarray(project.train.y).tobytes()
                             + np.ascontiguousarray(project.train.x[:64]).tobytes()).hexdigest()[:10]
    total = 2 * len(seeds)
    per_seed = []
    for i, sd in enumerate(seeds):
        base_path = whatif / f"baseline-{sd}-{data_hash}.json"
        if base_path.is_file():
            before = json.loads(base_path.read_text())
        else:
            progress(2 * i, total, f"seed {sd}: retraining on all samples (baseline)")
            before = _retrain(project, np.ones(len(ids), dtype=bool), sd)
            write_text(base_path, json.dumps(before))
        progress(2 * i + 1, total, f"seed {sd}: retraining without {len(remove)} samples")
        after = _retrain(project, ~removed_mask, sd)
        per_seed.append({"seed": sd, "before": before, "after": after,
                         "loss_change": after["loss"] - before["loss"],
                         "accuracy_change": after["accuracy"] - before["accuracy"]})
    progress(total, total, "done")
    mean = lambda key, part: float(np.mean([r[part][key] for r in per_seed]))   # noqa: E731
    before = {"loss": mean("loss", "before"), "accuracy": mean("accuracy", "before")}
    after = {"loss": mean("loss", "after"), "accuracy": mean("accuracy", "after")}
    changes = [r["loss_change"] for r in per_seed]
    verdict = noise_verdict(predicted, changes)
    result = {
        "run": info.name, "method": info.method, "seed": seeds[0], "seeds": seeds,
        "removed_ids": [int(i) for i in remove], "n_removed": int(len(remove)),
        "predicted_loss_change": predicted,
        "actual_loss_change": after["loss"] - before["loss"],
        "actual_loss_change_std": verdict["std"],
        "actual_accuracy_change": after["accuracy"] - before["accuracy"],
        "actual_accuracy_change_std": (float(np.std([r["accuracy_change"] for r in per_seed], ddof=1))
                                       if len(seeds) > 1 else float("nan")),
        "interval95": verdict["interval95"], "verdict": verdict["verdict"],
        "verdict_text": verdict["verdict_text"], "per_seed": per_seed,
        "before": before, "after": after,
        "query_size": int(len(project.query)), "seconds": round(time.time() - started, 2),
        "created": time.time(),
    }
    key = whatif_key(info.name, remove, seeds)
    result["path"] = str(whatif / f"{key}.json")
    write_text(whatif / f"{key}.json", json.dumps(result, indent=1))
    return result


def whatif_table(results: list[dict]) -> pd.DataFrame:
    """One row per stored verification: predicted vs the paired mean ± std over seeds."""
    rows = []
    for r in results:
        seeds = r.get("seeds", [r.get("seed")])
        rows.append({"removed": r["n_removed"], "predicted Δ loss": r["predicted_loss_change"],
                     "actual Δ loss (mean)": r["actual_loss_change"],
                     "actual Δ loss (std)": r.get("actual_loss_change_std", float("nan")),
                     "predicted ÷ measured": (r["predicted_loss_change"] / r["actual_loss_change"]
                                              if r["actual_loss_change"] else float("nan")),
                     "seeds": len(seeds), "verdict": r.get("verdict", "one seed"),
                     "actual Δ accuracy": r["actual_accuracy_change"], "seconds": r["seconds"]})
    return pd.DataFrame(rows)


def per_seed_table(result: dict) -> pd.DataFrame:
    """The paired retrains of one verification: one row per seed, with and without the selection."""
    per = result.get("per_seed") or [{"seed": result.get("seed"), "before": result["before"],
                                      "after": result["after"], "loss_change": result["actual_loss_change"],
                                      "accuracy_change": result["actual_accuracy_change"]}]
    return pd.DataFrame([{"seed": p["seed"], "loss with all": p["before"]["loss"],
                          "loss without": p["after"]["loss"], "Δ loss": p["loss_change"],
                          "Δ accuracy": p["accuracy_change"]} for p in per])
