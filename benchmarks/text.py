"""Text classifiers (issue 18): ground truth and label errors on SMS messages with a tiny BERT.

    python benchmarks/text.py --part truth  --seeds 0        # ~25 min per recipe and seed on 2 busy cores
    python benchmarks/text.py --part truth --recipes trainer-defaults --checkpoints 0 --own-term on off
        # all checkpoints only; diffin with adam_batches.OWN_TERM on (the product) and off (its linear response)
    python benchmarks/text.py --part labels --seeds 0 1 2

Data: the SMS Spam Collection (Almeida, Gomez Hidalgo and Yamakami, 2011; UCI, CC BY 4.0),
../shared/data/sms_spam.tsv. Model: a 2-layer BERT (hidden 64, 2 heads) built from a config, no
download; tokenizer: WordPiece trained on the training texts (tasks/text_truth.py).

* truth: 300 messages, clean labels, 10 epochs of batch 32 (94 steps), AdamW lr 1e-3 with
  linear warm-up (10%) and linear decay; recipe "adamw" without clipping and dropout, recipe
  "trainer-defaults" with max_grad_norm 1.0 and dropout 0.1 (the Trainer's defaults). Truth:
  float64 trajectory leave-one-out of 40 samples on the mean loss of 100 query messages. diffin,
  tracin and tracin-adam at 5 checkpoints and at all 11, Spearman against the truth.
* labels: 400 messages, 10% labels flipped, recipe "trainer-defaults"; AUROC of label_issue
  against the flips for diffin, loss, cleanlab (final checkpoint), cleanlab-cv (5 folds of
  retraining) and tracin's self-influence.

Appends rows to results/text.csv (part, recipe, seed, method, checkpoints, value, seconds); the truth
rows' note names OWN_TERM's setting, the magnitude ratio (median |estimate| / median |truth|), CPU
seconds and the load. --work keeps a case, and its truths are reused (truth.json) while the case's key holds.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffin_core.methods import ScoreSettings  # noqa: E402
from diffin_core.project.checkpoints import read_manifest  # noqa: E402
from diffin_core.run.context import manifest_context  # noqa: E402
from diffin_core.run.scoring import run_method  # noqa: E402
from diffin_core.tasks.text_truth import TextRecipe, text_case, train_text  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "text.csv"
TRUTH = dict(n_train=300, epochs=10, batch=32, noise=0.0, vocab_size=300, min_frequency=5, max_length=48,
             every=10, samples=40)
LABELS = dict(n_train=400, epochs=10, batch=32, noise=0.1, vocab_size=300, min_frequency=5, max_length=48,
              every=10, samples=0)
RECIPES = {"adamw": dict(max_grad_norm=None, dropout=0.0, lr=1e-3), "trainer-defaults": dict(lr=1e-3)}


def subset(m, count):
    idx = sorted({int(round(i)) for i in np.linspace(0, len(m.checkpoints) - 1, count)})
    return replace(m, checkpoints=[m.checkpoints[i] for i in idx])


def context(case, count=None, settings=None):
    m = read_manifest(case["dir"] / "manifest.json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx = manifest_context(case["model_fn"]().float(), subset(m, count) if count else m, case["train"],
                               settings or ScoreSettings())
    return ctx, [str(w.message) for w in caught if "Recipe" in type(w.message).__name__]


def truth_rows(recipe: str, seed: int, work: Path, counts=None, own_terms=(True,)) -> list[dict]:
    """``own_terms``: diffin is scored once per setting of adam_batches.OWN_TERM (True: the product's
    AdamW replay with each sample's own term of m and v removed exactly; False: its linear response)."""
    from scipy.stats import spearmanr
    from diffin_core.engine import adam_batches
    t0 = time.time()
    case = text_case(work / f"truth-{recipe}-{seed}", recipe=TextRecipe(seed=seed, **RECIPES[recipe]), seed=seed, **TRUTH)
    rows = [dict(part="truth", recipe=recipe, seed=seed, method="(truth)", checkpoints=0,
                 value=float(np.std(case["truth"])), seconds=time.time() - t0,
                 note=f"query accuracy {case['accuracy']:.3f}, loss {case['base_loss']:.4f}")]
    total = len(read_manifest(case["dir"] / "manifest.json").checkpoints)
    runs = [("diffin", own) for own in own_terms] + [("tracin", None), ("tracin-adam", None)]
    for count in [total if c == 0 else c for c in (counts or (5, 0))]:
        for method, own in runs:
            keep = adam_batches.OWN_TERM
            adam_batches.OWN_TERM = keep if own is None else own
            try:
                t0, c0 = time.time(), time.process_time()
                ctx, approx = context(case, count)
                est = run_method(ctx, method, case["query"].x, case["query"].y, need_self=False)["influence"]
            finally:
                adam_batches.OWN_TERM = keep
            r = float(spearmanr(est[case["samples"]], case["truth"])[0])
            mag = float(np.median(np.abs(est[case["samples"]])) / np.median(np.abs(case["truth"])))
            note = ([] if own is None else [f"adam_batches.OWN_TERM = {own}"]) + [
                f"magnitude ratio {mag:.3f}", f"CPU {time.process_time() - c0:.1f} s",
                "load {:.1f}".format(__import__("os").getloadavg()[0])] + approx
            rows.append(dict(part="truth", recipe=recipe, seed=seed, method=method, checkpoints=count, value=r,
                             seconds=time.time() - t0, note=" | ".join(note)[:300]))
            print(rows[-1], flush=True)
    return rows


def label_rows(seed: int, work: Path) -> list[dict]:
    from sklearn.metrics import roc_auc_score
    from diffin_core.tasks.truth import batch_order
    import torch
    recipe = TextRecipe(seed=seed, **RECIPES["trainer-defaults"])
    case = text_case(work / f"labels-{seed}", recipe=recipe, seed=seed, **LABELS)
    flipped = case["train"].true_y != case["train"].y
    rows = []
    for method in ("diffin", "loss", "cleanlab", "tracin", "cleanlab-cv"):
        t0, c0 = time.time(), time.process_time()
        ctx, approx = context(case)
        if method == "cleanlab-cv":
            ctx.trainer = lambda x, y, s: train_text(case["model_fn"], recipe, torch.as_tensor(x, dtype=torch.float64),
                                                     torch.as_tensor(y), batch_order(len(y), LABELS["batch"],
                                                                                     LABELS["epochs"], s)).float()
        out = run_method(ctx, method, case["query"].x, case["query"].y, need_self=True)
        score = out["label_issue"] if method != "tracin" else out["self_influence"]
        rows.append(dict(part="labels", recipe="trainer-defaults", seed=seed, method=method, checkpoints=0,
                         value=float(roc_auc_score(flipped, score)), seconds=time.time() - t0,
                         cpu_seconds=time.process_time() - c0,
                         note=(f"{int(flipped.sum())} of {len(flipped)} flipped, query accuracy {case['accuracy']:.3f}; "
                               + " | ".join(approx))[:300]))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["truth", "labels"], required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES))
    ap.add_argument("--work", default=None, help="keep the cases here (default: a temp folder)")
    ap.add_argument("--out", default=str(OUT), help="the CSV its rows replace (default results/text.csv)")
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[5, 0],
                    help="truth: checkpoint counts scored (0 = all; default 5 0)")
    ap.add_argument("--own-term", nargs="+", choices=["on", "off"], default=["on"],
                    help="truth: score diffin with adam_batches.OWN_TERM on (the product) and/or off")
    a = ap.parse_args()
    out = Path(a.out)
    work = Path(a.work or tempfile.mkdtemp(prefix="diffin-text-"))
    rows = []
    for seed in a.seeds:
        if a.part == "truth":
            for recipe in a.recipes:
                rows += truth_rows(recipe, seed, work, a.checkpoints, [o == "on" for o in a.own_term])
        else:
            rows += label_rows(seed, work)
        df = pd.DataFrame(rows)
        old = pd.read_csv(out) if out.is_file() else None
        if old is not None:
            keys = set(zip(df.part, df.recipe, df.seed))
            old = old[[k not in keys for k in zip(old.part, old.recipe, old.seed)]]
            df = pd.concat([old, df], ignore_index=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(out, index=False, float_format="%.4f")
    print(pd.read_csv(out).to_string())


if __name__ == "__main__":
    main()
