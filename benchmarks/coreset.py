"""Coreset selection: which rule over Diff-In's scores wins at which budget, then the table.

    nice -n 10 python benchmarks/coreset.py --study   # dev seed 9 only: every candidate rule
                                                       #   -> results/coreset_study.csv
    nice -n 10 python benchmarks/coreset.py           # seeds 0, 1, 2: diffin (the chosen rule)
                                                       #   and its peers -> results/coreset.csv/png

Setup (smaller than benchmarks/run.py's so that 3 seeds fit a tiny shared CPU): MNIST-5k split as
in _bench.mnist_data, 1,200 clean training digits, 500 query (validation) digits for the
influence, 1,500 held-out test digits; SmallCNN, SGD batch 64, 12 epochs (the table; the dev-seed
study used 6), cosine lr from 0.3,
10 checkpoints. A subset is retrained for the same number of SGD steps as the full run (epochs
scaled by 1/fraction); the metric is held-out test accuracy.

Candidate rules over Diff-In's scores (all class-balanced: each class keeps the same fraction):
  diffin-top       the highest influence on the query loss (the additive Diff-In value of a
                   subset, maximised; the rule before issue 9)
  diffin-ccs       coverage-centric sampling (Zheng et al. 2023) over the influence: equal
                   shares from 50 strata of the score
  diffin-ccs-prune the same after dropping the 10% most harmful (lowest influence) per class
  diffin-sorscher  Sorscher et al. 2022 with Diff-In's self-influence as the difficulty: keep the
                   easiest (lowest self-influence) below keep 50%, the hardest from 50% on
Peers: random (per class), forgetting (Toneva et al.), EL2N (Paul et al.).
The study picks, per budget, the rule with the best dev-seed accuracy; ``CHOSEN`` below records
that choice and is what ``diffin`` means in coreset.csv.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

CFG = dict(n_train=1200, n_query=500, n_test=1500, epochs=12, batch=64, lr=0.3, ckpts=10)
FRACTIONS = [0.3, 0.5, 0.7]
CANDIDATES = ["diffin-top", "diffin-ccs", "diffin-ccs-prune", "diffin-sorscher"]
PEERS = ["random", "forgetting", "el2n"]
CHOSEN = {0.3: "diffin-ccs-prune", 0.5: "diffin-ccs-prune", 0.7: "diffin-ccs-prune"}   # the dev-seed study


def select(rule, frac, labels, infl, selfs, seed):
    from diffin_core.tasks.curate import CCS_PRUNE_LOW, ccs_selection, coreset_selection
    if rule == "diffin-top":
        return coreset_selection(None, frac, value=infl, labels=labels)
    if rule == "diffin-ccs":
        return ccs_selection(infl, frac, labels, seed=seed)
    if rule == "diffin-ccs-prune":
        return ccs_selection(infl, frac, labels, prune_low=CCS_PRUNE_LOW, seed=seed)
    if rule == "diffin-sorscher":
        return coreset_selection(None, frac, value=-selfs if frac < 0.5 else selfs, labels=labels)
    raise ValueError(rule)


def job(seed, rules, peers):
    import _bench
    from diffin_core.project.data import Split
    from diffin_core.methods import ScoreSettings
    from diffin_core.engine.models import SmallCNN
    from diffin_core.run.context import make_context
    from diffin_core.tasks.curate import coreset_selection, el2n_scores, forgetting_scores
    d = _bench.mnist_data(CFG)
    model, states, steps, lrs = _bench.train_cnn(d.xtr, d.ytr, seed, CFG)
    full = _bench._eval(model, d.xte, d.yte)["accuracy"]
    split = Split(d.xtr, d.ytr, np.arange(len(d.ytr)))
    t = time.time()
    res, _ = _bench.score_all(states, steps, lrs, split, d.xq, d.yq, ["diffin"], need_self=True)["diffin"]
    secs = {"diffin": time.time() - t}
    infl, selfs = res["influence"], res["self_influence"]
    ctx = make_context(SmallCNN(1, 10, 28), states, steps, lrs, split, ScoreSettings(device="cpu"))
    values = {}
    for name, fn in (("forgetting", forgetting_scores), ("el2n", el2n_scores)):
        if name in peers:
            t = time.time()
            values[name] = fn(ctx)
            secs[name] = time.time() - t
    rows = []

    def add(method, setting, metric, value):
        rows.append({"task": "coreset", "method": method, "setting": setting, "metric": metric,
                     "value": float(value), "seed": seed})

    for frac in FRACTIONS:
        s = f"keep {int(round(frac * 100))}%"
        sub_cfg = dict(CFG, epochs=int(round(CFG["epochs"] / frac)))
        add("full data", s, "test_acc", full)
        chosen = {r: select(CHOSEN[frac] if r == "diffin" else r, frac, d.ytr, infl, selfs, seed) for r in rules}
        for p in peers:
            chosen[p] = (coreset_selection(None, frac, value="random", labels=d.ytr, seed=seed + 11) if p == "random"
                         else coreset_selection(None, frac, value=values[p], labels=d.ytr))
        for name, keep in chosen.items():
            m, *_ = _bench.train_cnn(d.xtr[keep], d.ytr[keep], seed, sub_cfg)
            add(name, s, "test_acc", _bench._eval(m, d.xte, d.yte)["accuracy"])
    for name, v in secs.items():
        add(name, "timing", "score_seconds", v)
    return rows


def main(argv=None):
    from _bench import pool_map
    from run import aggregate, markdown, plots
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", action="store_true", help="dev seed 9, every candidate rule")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    out = HERE / "results"
    if a.study:
        jobs = [(9, CANDIDATES, ["random", "forgetting"])]
        name = "coreset_study"
    else:
        jobs = [(seed, ["diffin", "diffin-top"], PEERS) for seed in (0, 1, 2)]
        name = "coreset"
    rows, started = [], time.time()
    for args, r, secs in pool_map(job, jobs, a.workers):
        rows += r
        print(f"[{time.time() - started:6.0f}s] seed {args[0]} done in {secs:.0f}s", flush=True)
        table = aggregate(rows)["coreset"]
        table.to_csv(out / f"{name}.csv", index=False)
        if not a.study:
            plots({"coreset": table}, {}, out)
    print(markdown(table, "test_acc"))
    print(markdown(table, "score_seconds"))


if __name__ == "__main__":
    main()
