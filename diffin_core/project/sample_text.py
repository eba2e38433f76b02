"""The text sample project: real SMS messages (the SMS Spam Collection), 10% flipped labels.

    python -m diffin_core.project.sample_text [--out sample_data/sms-spam]

builds sample_data/sms-spam/ from sample_data/sms_spam.tsv (5,574 real SMS messages, ham or
spam; Almeida, Gomez Hidalgo and Yamakami, 2011, UCI Machine Learning Repository, CC BY 4.0):
2,000 train and 400 query messages (seed 0), 200 train labels flipped (ham <-> spam; the given
label is in ``label``, the clean one in ``true_label``), a WordPiece tokenizer trained on the
train texts with the ``tokenizers`` library, and a 2-layer BERT (hidden 64) built from a
config (no download), trained by the project's ``[train]`` recipe: the transformers Trainer
(AdamW, warm-up + linear decay, gradient clipping at 1.0, dropout 0.1: the Trainer's defaults
except the lr) with ``DiffinCallback`` recording its checkpoints, moments and batch order.
``sample_id`` is the message's data row in sms_spam.tsv. Building takes about a minute on
2 CPU cores; the folder is about 60 MB (checkpoints with Adam's moments), so it is built on
first use, not shipped.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from diffin_core.project.atomic import write_text

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "sample_data"
RAW = SAMPLE_DIR / "sms_spam.tsv"
NAME = "sms-spam"
LABELS = ["ham", "spam"]
CITATION = ("SMS Spam Collection: T. A. Almeida, J. M. Gomez Hidalgo, A. Yamakami, \"Contributions to the "
            "study of SMS spam filtering: new collection and results\", DocEng 2011; UCI Machine Learning "
            "Repository, CC BY 4.0")

TOML = """[project]
name = "SMS spam sample (10% flipped labels)"

[model]
factory = "model.py:build"
loss = "cross_entropy"

[data]
train = "data/train.tsv"
query = "data/query.tsv"
kind = "text"
text_column = "text"
label_column = "label"
label_names = ["ham", "spam"]
max_length = {max_length}
truncation = true
tokenizer = "tokenizer"

[checkpoints]
manifest = "checkpoints/manifest.json"

[train]
recipe = "train.py:train"
"""

MODEL_PY = '''"""The text sample's model: a 2-layer BERT built from a config (nothing downloaded)."""
from transformers import BertConfig, BertForSequenceClassification

CONFIG = dict(vocab_size={vocab_size}, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=128, max_position_embeddings={max_length}, num_labels=2)


def build():
    return BertForSequenceClassification(BertConfig(**CONFIG))
'''

TRAIN_PY = '''"""The text sample's training recipe: the transformers Trainer, recorded by DiffinCallback.

(train_x, train_y, seed, checkpoint_dir) -> None. train_x is the tokenised training split
packed as (N, 2, max_length): channel 0 input_ids, channel 1 attention_mask (docs/text.md).
An existing Trainer script needs only the trainer.add_callback(...) line.
"""
import importlib.util
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainingArguments

from diffin_core import DiffinCallback

EPOCHS, BATCH, LR, WARMUP, CHECKPOINTS = {epochs}, 32, 2e-3, 0.1, 10


def _build(seed):
    spec = importlib.util.spec_from_file_location("sample_model", Path(__file__).with_name("model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(seed)
    return mod.build()


class Rows(torch.utils.data.Dataset):
    """The training split in its row order: row i is sample i (the batch order's ids)."""

    def __init__(self, x, y):
        x = np.asarray(x)
        self.ids = torch.as_tensor(x[:, 0]).long()
        self.mask = torch.as_tensor(x[:, 1]).long()
        self.y = torch.as_tensor(np.asarray(y)).long()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {{"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.y[i]}}


def train(train_x, train_y, seed, checkpoint_dir):
    """AdamW lr 2e-3, 10% linear warm-up then linear decay, clipping at 1.0, dropout 0.1,
    batch 32, {epochs} epochs; about 10 checkpoints (and the first) into checkpoint_dir."""
    model = _build(seed)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH,
                                 learning_rate=LR, warmup_steps=WARMUP, lr_scheduler_type="linear",
                                 max_grad_norm=1.0, weight_decay=0.0, seed=int(seed), save_strategy="no",
                                 logging_strategy="no", report_to=[], disable_tqdm=True,
                                 dataloader_pin_memory=False)
        trainer = Trainer(model=model, args=args, train_dataset=Rows(train_x, train_y))
        every = max(1, EPOCHS * math.ceil(len(train_y) / BATCH) // CHECKPOINTS)
        trainer.add_callback(DiffinCallback(checkpoint_dir, folder=".", every=every))
        trainer.train()
'''


def read_raw(path: Path = RAW) -> tuple[list[str], list[str]]:
    """(labels, texts) of sms_spam.tsv, line by line (header ``label<TAB>text``)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines[0] != "label\ttext":
        from diffin_core.errors import DiffinError
        raise DiffinError("expected the header 'label<TAB>text'", path)
    labels, texts = [], []
    for line in lines[1:]:
        if line:
            label, text = line.split("\t", 1)
            labels.append(label)
            texts.append(text)
    return labels, texts


def write_tsv(path: Path, ids, labels, true_labels, texts) -> None:
    rows = ["sample_id\tlabel\ttrue_label\ttext"]
    rows += [f"{i}\t{a}\t{b}\t{t}" for i, a, b, t in zip(ids, labels, true_labels, texts)]
    write_text(path, "\n".join(rows) + "\n")


def build_text_sample(out: str | Path = SAMPLE_DIR / NAME, n_train: int = 800, n_query: int = 200,
                      noise: float = 0.1, seed: int = 0, epochs: int = 3, max_length: int = 32,
                      vocab_size: int = 1000) -> Path:
    """Write the whole text sample project; replaces an existing one atomically."""
    from diffin_core.project.sample import train_and_place
    from diffin_core.project.text import train_tokenizer
    out = Path(out)
    labels, texts = read_raw()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(texts))
    tr, q = np.sort(perm[:n_train]), np.sort(perm[n_train:n_train + n_query])
    given = [labels[i] for i in tr]
    flipped = rng.choice(n_train, int(round(noise * n_train)), replace=False)
    for j in flipped:
        given[j] = LABELS[1 - LABELS.index(given[j])]
    tmp = out.parent / f".{out.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    write_tsv(tmp / "data/train.tsv", tr, given, [labels[i] for i in tr], [texts[i] for i in tr])
    write_tsv(tmp / "data/query.tsv", q, [labels[i] for i in q], [labels[i] for i in q], [texts[i] for i in q])
    tok = train_tokenizer([texts[i] for i in tr], tmp / "tokenizer", vocab_size, max_length)
    write_text(tmp / "diffin.toml", TOML.format(max_length=max_length))
    write_text(tmp / "model.py", MODEL_PY.format(vocab_size=len(tok), max_length=max_length))
    write_text(tmp / "train.py", TRAIN_PY.format(epochs=epochs))
    write_text(tmp / "README.md", f"# SMS spam sample\n\n{__doc__.split(chr(10), 2)[2]}\nData: {CITATION}.\n")
    return train_and_place(tmp, out, seed, drop=("tokenized",))   # a cache; rebuilt where the folder lands


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(SAMPLE_DIR / NAME))
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(build_text_sample(a.out, noise=a.noise, seed=a.seed))


if __name__ == "__main__":
    main()
