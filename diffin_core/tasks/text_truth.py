"""Ground truth on text: a tiny transformer trained on SMS messages, against true trajectory
leave-one-out (float64).

The case: ``n_train`` messages of the SMS Spam Collection (Almeida, Gomez Hidalgo and Yamakami,
2011; UCI, CC BY 4.0; ``../shared/data/sms_spam.tsv``), a share of labels flipped; a WordPiece
tokenizer trained on the training texts and the split tokenised by the project pipeline
(text.py); a 2-layer BERT (hidden 64) built from a config, no download; trained with the
Trainer's defaults: AdamW (betas 0.9/0.999, eps 1e-8, weight decay), linear warm-up then linear
decay, gradient clipping at ``max_grad_norm`` and dropout 0.1, recorded by the Recorder with the
batch order. The truth retrains with sample z's weight 0 in every batch holding it (same batch
shapes, so the same dropout masks from the same seed) and measures the mean query loss:
    truth(z) = L_Q(theta_T without z) - L_Q(theta_T)
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SMS = Path(__file__).resolve().parents[3] / "shared" / "data" / "sms_spam.tsv"


def sms_path() -> Path:
    for p in (SMS, Path("/work/shared/data/sms_spam.tsv")):
        if p.is_file():
            return p
    raise FileNotFoundError("sms_spam.tsv not found (../shared/data)")


def sms_frame():
    """The SMS Spam Collection: label ('ham'/'spam') and text, 5,574 rows."""
    import pandas as pd
    return pd.read_csv(sms_path(), sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False)


@dataclass
class TextRecipe:
    """The Trainer's defaults unless changed: AdamW, linear warm-up + decay, clipping, dropout."""
    name: str = "adamw-warmup-linear-clip-dropout"
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    max_grad_norm: float | None = 1.0
    dropout: float = 0.1
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    intermediate: int = 128
    seed: int = 0
    optimizer: str = "adamw"          # "adamw" (the Trainer's) or "sgd" (plain, same schedule)
    arch: str = "bert"                # "bert", or "bag" (mean of token embeddings + linear: a control)


def tiny_bert(vocab_size: int, max_length: int, recipe: TextRecipe, num_labels: int = 2, dtype=torch.float64):
    """model_fn: a fresh BertForSequenceClassification from a config (same initial weights every
    call), adapted to packed batches (textmodel.adapt)."""
    from transformers import BertConfig, BertForSequenceClassification
    from diffin_core.engine.textmodel import adapt

    def build():
        torch.manual_seed(recipe.seed)
        if recipe.arch == "bag":
            return adapt(_Bag(vocab_size, recipe.hidden, num_labels).to(dtype))
        cfg = BertConfig(vocab_size=vocab_size, hidden_size=recipe.hidden, num_hidden_layers=recipe.layers,
                         num_attention_heads=recipe.heads, intermediate_size=recipe.intermediate,
                         max_position_embeddings=max_length, num_labels=num_labels,
                         hidden_dropout_prob=recipe.dropout, attention_probs_dropout_prob=recipe.dropout,
                         classifier_dropout=recipe.dropout)
        return adapt(BertForSequenceClassification(cfg).to(dtype))
    return build


class _Bag(torch.nn.Module):
    """Mean of the token embeddings (padding masked), tanh, linear: a smooth control model."""

    def __init__(self, vocab: int, hidden: int, num_labels: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, hidden)
        self.out = torch.nn.Linear(hidden, num_labels)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).to(self.emb.weight.dtype)
        return self.out(torch.tanh((self.emb(input_ids) * m).sum(1) / m.sum(1)))


def train_text(model_fn, recipe: TextRecipe, x: torch.Tensor, y: torch.Tensor, batches: list[np.ndarray],
               drop: int | None = None, record_dir=None, every: int = 1):
    """Train over the batch order; ``drop``: a training row whose loss weight is 0 in every batch
    (the batch mean keeps its denominator; dropout masks are the same draws as the full run)."""
    from transformers import get_linear_schedule_with_warmup
    from diffin_core.project.checkpoints import Recorder
    model = model_fn()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    total = len(batches)
    sched = get_linear_schedule_with_warmup(opt, int(recipe.warmup_frac * total), total)
    rec = Recorder(record_dir, model, opt, train_size=len(y), every=every) if record_dir else None
    if rec:
        rec.__enter__()
    gen = torch.random.fork_rng()
    gen.__enter__()
    torch.manual_seed(1000 + recipe.seed)          # dropout draws: identical in every retraining
    try:
        for idx in batches:
            t = torch.as_tensor(idx)
            w = torch.ones(len(idx), dtype=x.dtype)
            if drop is not None:
                w[t == drop] = 0.0
            loss = (F.cross_entropy(model(x[t]), y[t], reduction="none") * w).sum() / len(idx)
            opt.zero_grad()
            loss.backward()
            if recipe.max_grad_norm is not None:          # the Recorder's clip records each step's factor
                (rec.clip_grad_norm_ if rec else torch.nn.utils.clip_grad_norm_)(params, recipe.max_grad_norm)
            opt.step()
            sched.step()
            if rec:
                rec.step(batch_ids=idx)
    finally:
        gen.__exit__(None, None, None)
    if rec:
        rec.__exit__(None, None, None)
    return model.eval()


def query_loss(model, qx, qy) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(qx), qy))


def text_case(record_dir, n_train: int = 300, n_query: int = 100, epochs: int = 4, batch: int = 16,
              samples: int = 40, every: int = 10, noise: float = 0.1, max_length: int = 40,
              vocab_size: int = 1000, min_frequency: int = 2, tokenizer_from=None, recipe: TextRecipe | None = None, seed: int = 0) -> dict:
    """The ground-truth case (module docstring): splits, recipe, recorded run in
    ``record_dir/checkpoints`` and the float64 truths of ``samples`` training rows."""
    from diffin_core.project.data import load_split
    from diffin_core.project.text import TextOptions, train_tokenizer
    from diffin_core.tasks.truth import batch_order
    recipe = recipe or TextRecipe(seed=seed)
    record_dir = Path(record_dir)
    record_dir.mkdir(parents=True, exist_ok=True)
    df = sms_frame()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(df))
    tr, q = df.iloc[perm[:n_train]].copy(), df.iloc[perm[n_train:n_train + n_query]].copy()
    tr["true_label"] = tr["label"]
    flip = rng.choice(n_train, int(round(noise * n_train)), replace=False)
    col = tr.columns.get_loc("label")
    for i in flip:
        tr.iloc[i, col] = "spam" if tr.iloc[i, col] == "ham" else "ham"
    tr.to_csv(record_dir / "train.csv", index=False)
    q.to_csv(record_dir / "query.csv", index=False)
    tok_dir = record_dir / "tokenizer"
    if tokenizer_from is not None and not (tok_dir / "tokenizer.json").is_file():
        import shutil
        shutil.copytree(tokenizer_from, tok_dir)     # the tokenizers trainer is not deterministic
    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer(tr["text"].tolist(), tok_dir, vocab_size, max_length, min_frequency=min_frequency)
    opts = dict(text_column="text", max_length=max_length, truncation=True, tokenizer_dir=tok_dir,
                classes=["ham", "spam"])
    train = load_split(record_dir / "train.csv", text=TextOptions(**opts, cache_dir=record_dir / "tokenized" / "train"))
    query = load_split(record_dir / "query.csv", text=TextOptions(**opts, cache_dir=record_dir / "tokenized" / "query"))
    from diffin_core.project.text import load_tokenizer
    model_fn = tiny_bert(len(load_tokenizer(tok_dir)), max_length, recipe)
    x, y = torch.as_tensor(train.x, dtype=torch.float64), torch.as_tensor(train.y)
    qx, qy = torch.as_tensor(query.x, dtype=torch.float64), torch.as_tensor(query.y)
    batches = batch_order(n_train, batch, epochs, seed=seed)
    import shutil
    shutil.rmtree(record_dir / "checkpoints", ignore_errors=True)
    full = train_text(model_fn, recipe, x, y, batches, record_dir=record_dir, every=every)
    base = query_loss(full, qx, qy)
    idx = np.random.default_rng(seed + 1).choice(n_train, samples, replace=False)
    import json
    key = json.dumps([n_train, n_query, epochs, batch, samples, noise, max_length, vocab_size, min_frequency, repr(recipe), seed])
    cached = record_dir / "truth.json"
    if cached.is_file() and json.loads(cached.read_text()).get("key") == key:
        truth = np.asarray(json.loads(cached.read_text())["truth"])
    else:
        truth = np.asarray([query_loss(train_text(model_fn, recipe, x, y, batches, drop=int(z)), qx, qy) - base
                            for z in idx])
        cached.write_text(json.dumps({"key": key, "truth": truth.tolist()}))
    return dict(recipe=recipe, model_fn=model_fn, train=train, query=query, samples=idx, truth=truth,
                dir=record_dir / "checkpoints", batches=batches, base_loss=base,
                accuracy=float((full(qx).argmax(1) == qy).double().mean()))
