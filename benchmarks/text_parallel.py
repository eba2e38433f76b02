"""benchmarks/text.py truth part split over processes (the same computation, run in parallel on a
busy machine): `loo DIR CASE RECIPE k K` computes shares of the leave-one-out truths (k = K: the
base run) into DIR/loo-k.json; `score DIR RECIPE METHOD COUNT` scores one method (COUNT = 0: all
checkpoints) against them and appends a line to DIR/scores.jsonl. DIR is a text_case folder
(tasks/text_truth.py) with its recorded run. Example (the rows of results/text.csv, recipe adamw):

    python benchmarks/text_parallel.py loo /tmp/A "samples=40, n_train=300, epochs=10, batch=32, max_length=48" \\
        "max_grad_norm=None, dropout=0.0, lr=1e-3" 0 4        # ... 1 4, 2 4, 3 4 and 4 4 (base)
    python benchmarks/text_parallel.py score /tmp/A "max_grad_norm=None, dropout=0.0, lr=1e-3" diffin 0
"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if sys.argv[1] == "loo":
    sys.argv = sys.argv[1:]
    # one share of the leave-one-out truths of a text_case folder (same computation as text_case)
    import json, numpy as np, torch
    from pathlib import Path
    import diffin_core.tasks.text_truth as tt
    from diffin_core.project.data import load_split
    from diffin_core.project.text import TextOptions, load_tokenizer
    from diffin_core.tasks.truth import batch_order
    d = Path(sys.argv[1]); kw = eval("dict(" + sys.argv[2] + ")"); rkw = eval("dict(" + sys.argv[3] + ")")
    part, parts = int(sys.argv[4]), int(sys.argv[5])
    recipe = tt.TextRecipe(**rkw)
    n_train, epochs, batch, samples, L, seed = kw["n_train"], kw["epochs"], kw["batch"], kw["samples"], kw["max_length"], 0
    opts = dict(text_column="text", max_length=L, truncation=True, tokenizer_dir=d / "tokenizer", classes=["ham", "spam"])
    train = load_split(d / "train.csv", text=TextOptions(**opts, cache_dir=d / "tokenized" / "train"))
    query = load_split(d / "query.csv", text=TextOptions(**opts, cache_dir=d / "tokenized" / "query"))
    model_fn = tt.tiny_bert(len(load_tokenizer(d / "tokenizer")), L, recipe)
    x, y = torch.as_tensor(train.x, dtype=torch.float64), torch.as_tensor(train.y)
    qx, qy = torch.as_tensor(query.x, dtype=torch.float64), torch.as_tensor(query.y)
    batches = batch_order(n_train, batch, epochs, seed=seed)
    idx = np.random.default_rng(seed + 1).choice(n_train, samples, replace=False)
    out = {}
    if part == parts:      # the base run
        out["base"] = tt.query_loss(tt.train_text(model_fn, recipe, x, y, batches), qx, qy)
    else:
        for k in range(part, samples, parts):
            out[int(k)] = tt.query_loss(tt.train_text(model_fn, recipe, x, y, batches, drop=int(idx[k])), qx, qy)
            (d / f"loo-{part}.json").write_text(json.dumps(out))
    (d / f"loo-{part}.json").write_text(json.dumps(out))
else:
    sys.argv = sys.argv[1:]
    # score one method on a text_case folder whose truths lie in loo-*.json (written by lo.py)
    import json, time, warnings, numpy as np, torch
    from pathlib import Path
    from dataclasses import replace
    from scipy.stats import spearmanr
    import diffin_core.tasks.text_truth as tt
    from diffin_core.project.data import load_split
    from diffin_core.project.text import TextOptions, load_tokenizer
    from diffin_core.project.checkpoints import read_manifest
    from diffin_core.run.context import manifest_context
    from diffin_core.run.scoring import run_method
    from diffin_core.methods import ScoreSettings
    d = Path(sys.argv[1]); rkw = eval("dict(" + sys.argv[2] + ")"); method = sys.argv[3]; count = int(sys.argv[4])
    L, n_train, samples = 48, 300, 40
    recipe = tt.TextRecipe(**rkw)
    loo = {}
    for f in d.glob("loo-*.json"):
        loo.update(json.loads(f.read_text()))
    base = loo.pop("base")
    idx = np.random.default_rng(1).choice(n_train, samples, replace=False)
    have = sorted(int(k) for k in loo)
    truth = np.asarray([loo[str(k)] - base for k in have])
    opts = dict(text_column="text", max_length=L, truncation=True, tokenizer_dir=d / "tokenizer", classes=["ham", "spam"])
    train = load_split(d / "train.csv", text=TextOptions(**opts, cache_dir=d / "tokenized" / "train"))
    query = load_split(d / "query.csv", text=TextOptions(**opts, cache_dir=d / "tokenized" / "query"))
    model_fn = tt.tiny_bert(len(load_tokenizer(d / "tokenizer")), L, recipe)
    m = read_manifest(d / "checkpoints" / "manifest.json")
    if count:
        sel = sorted({int(round(i)) for i in np.linspace(0, len(m.checkpoints) - 1, count)})
        m = replace(m, checkpoints=[m.checkpoints[i] for i in sel])
    t0 = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx = manifest_context(model_fn().float(), m, train, ScoreSettings())
        out = run_method(ctx, method, query.x, query.y, need_self=False)
    est = out["influence"][idx[have]]
    r = spearmanr(est, truth)[0]
    res = dict(dir=str(d), method=method, checkpoints=len(m.checkpoints), samples=len(have), spearman=float(r), seconds=time.time() - t0,
               truth_std=float(truth.std()), base=base, approx=sorted({str(w.message)[:400] for w in caught if "Recipe" in type(w.message).__name__}),
               est_over_truth=float(np.median(np.abs(est)) / np.median(np.abs(truth))))
    print(json.dumps(res), flush=True)
    with open(d / "scores.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")
