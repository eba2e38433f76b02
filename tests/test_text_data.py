"""Text splits (docs/text.md): the four formats, the tokenised cache, and every bad input's
one-line message naming the file and the row."""
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from diffin_core.project.data import load_split
from diffin_core.errors import DiffinError
from diffin_core.project.text import MAX_CHARS, TextOptions, load_tokenizer, train_tokenizer

TEXTS = ["Free entry to win a prize, text WIN now", "ok see you at 5", "NA", "00123",
         'she said "hi", then left', "Call me later pls", "URGENT! your mobile won £1000 cash",
         "lunch?"]
LABELS = ["spam", "ham", "ham", "ham", "ham", "ham", "spam", "ham"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(TEXTS * 3, d, vocab_size=200, max_length=32)
    return d


def opts(tok_dir, cache=None, **kw):
    return TextOptions(**{"text_column": "text", "tokenizer_dir": tok_dir, "max_length": 32, "cache_dir": cache, **kw})


def write(path, texts=TEXTS, labels=LABELS, **extra):
    df = pd.DataFrame({"text": texts, "label": labels, **extra})
    s = path.suffix
    if s == ".csv":
        df.to_csv(path, index=False)
    elif s == ".tsv":
        path.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(texts, labels)))
    elif s == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in df.to_dict("records")))
    else:
        df.to_parquet(path)
    return path


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_formats_tokenise_alike_and_keep_the_text(tmp_path, tok_dir, suffix):
    path = write(tmp_path / f"train{suffix}")
    s = load_split(path, text=opts(tok_dir, tmp_path / "cache"))
    assert s.kind == "text" and s.x.shape == (8, 2, 32) and s.x.dtype == np.float32
    assert s.texts() == TEXTS                          # "NA" and "00123" stay text, quotes kept
    assert s.classes == ["ham", "spam"] and s.y.tolist() == [1, 0, 0, 0, 0, 0, 1, 0]
    tok = load_tokenizer(tok_dir)
    enc = tok(TEXTS[4])["input_ids"]
    assert s.x[4, 0, :len(enc)].astype(int).tolist() == enc
    assert s.x[4, 1].sum() == len(enc) and (s.x[4, 0, len(enc):] == tok.pad_token_id).all()
    assert s.rows(4, 6).texts([0]) == [TEXTS[4]]
    assert s.meta["options"]["max_length"] == 32 and s.meta["options"]["padding"] == "max_length"


def test_cache_is_reused_and_rebuilt_when_the_source_changes(tmp_path, tok_dir):
    path, cache = write(tmp_path / "train.csv"), tmp_path / "cache"
    load_split(path, text=opts(tok_dir, cache))
    for name in ("input_ids.npy", "attention_mask.npy", "labels.npy", "ids.npy", "text.parquet", "meta.json"):
        assert (cache / name).is_file()
    stamp = (cache / "meta.json").stat().st_mtime_ns
    again = load_split(path, text=opts(tok_dir, cache))
    assert (cache / "meta.json").stat().st_mtime_ns == stamp and again.texts() == TEXTS
    write(path, TEXTS[:-1] + ["changed text"])
    third = load_split(path, text=opts(tok_dir, cache))
    assert third.texts()[-1] == "changed text"
    assert load_split(path, text=opts(tok_dir, cache, max_length=24)).x.shape == (8, 2, 24)


def test_streamed_text_split_reads_rows_on_demand(tmp_path, tok_dir):
    path = write(tmp_path / "train.parquet")
    s = load_split(path, text=opts(tok_dir, tmp_path / "c"), stream=True)
    assert s.streamed
    whole = load_split(path, text=opts(tok_dir, tmp_path / "c"), stream=False)
    np.testing.assert_array_equal(s.x[[5, 1]], whole.x[[5, 1]])
    chunks = np.concatenate([x for _a, x, _y in s.iter_chunks(3)])
    np.testing.assert_array_equal(chunks, whole.x)


def test_pairs_give_token_type_ids(tmp_path, tok_dir):
    path = write(tmp_path / "nli.csv", hyp=TEXTS[::-1])
    s = load_split(path, text=opts(tok_dir, tmp_path / "c", text_pair_column="hyp"))
    assert s.x.shape == (8, 3, 32) and s.text_pairs([0]) == [TEXTS[-1]]
    assert s.x[:, 2].max() == 1 and (s.x[:, 2] <= s.x[:, 1]).all()


def test_trained_tokenizer_is_an_autotokenizer_folder(tmp_path):
    path = write(tmp_path / "train.csv")
    d = tmp_path / "tokenizer"
    load_split(path, text=TextOptions("text", tokenizer_dir=d, vocab_size=120, max_length=32))
    tok = load_tokenizer(d)
    assert tok.pad_token_id == 0 and tok.cls_token_id == 2 and len(tok) <= 120


# --- bad input: one line naming the file and the row ------------------------------------------
def test_empty_text_names_the_row(tmp_path, tok_dir):
    path = write(tmp_path / "t.csv", TEXTS[:3] + ["   "] + TEXTS[4:])
    with pytest.raises(DiffinError) as e:
        load_split(path, text=opts(tok_dir))
    assert re.search(r"t\.csv: row 3 \(line 5\): the text in column 'text' is empty", one_line(e))


def test_missing_text_in_jsonl_and_parquet(tmp_path, tok_dir):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "hi there", "label": 0}\n{"text": null, "label": 1}\n')
    with pytest.raises(DiffinError) as e:
        load_split(path, text=opts(tok_dir))
    assert re.search(r"t\.jsonl: row 1 \(line 2\): the text in column 'text' is missing", one_line(e))
    pq = write(tmp_path / "t.parquet", ["hello", None, "x"], [0, 1, 0])
    with pytest.raises(DiffinError) as e:
        load_split(pq, text=opts(tok_dir))
    assert re.search(r"t\.parquet: row 1: the text in column 'text' is missing", one_line(e))


def test_non_utf8_bytes_name_the_row(tmp_path, tok_dir):
    path = tmp_path / "t.csv"
    path.write_bytes(b"text,label\nhello there,0\ncaf\xe9 au lait,1\n")
    with pytest.raises(DiffinError) as e:
        load_split(path, text=opts(tok_dir))
    assert re.search(r"t\.csv: row 1 \(line 3\): bytes that are not UTF-8 \(0xe9", one_line(e))
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"text": "ok", "label": 0}\n{"text": "caf\xe9", "label": 1}\n')
    with pytest.raises(DiffinError) as e:
        load_split(path, text=opts(tok_dir))
    assert re.search(r"t\.jsonl: row 1 \(line 2\): bytes that are not UTF-8", one_line(e))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_missing_column_is_named(tmp_path, tok_dir, suffix):
    path = write(tmp_path / f"t{suffix}")
    with pytest.raises(DiffinError) as e:
        load_split(path, text=opts(tok_dir, text_column="body"))
    assert re.search(r"no (column|key) 'body' \(\[data\] text_column\)", one_line(e)) and f"t{suffix}" in str(e.value)
    with pytest.raises(DiffinError) as e:
        load_split(path, text=opts(tok_dir, label_column="target"))
    assert re.search(r"no (column|key) 'target' \(\[data\] label_column\)", one_line(e))


def test_over_long_text_names_the_row_unless_truncated(tmp_path, tok_dir):
    long = " ".join(["prize"] * 50)
    path = write(tmp_path / "t.csv", TEXTS[:2] + [long] + TEXTS[3:])
    with pytest.raises(DiffinError) as e:
        load_split(path, text=opts(tok_dir))
    assert re.search(r"t\.csv: row 2 \(line 4\): the text is 52 tokens long, over max_length = 32; "
                     r"raise \[data\] max_length or set truncation = true", one_line(e))
    s = load_split(path, text=opts(tok_dir, truncation=True))
    assert s.meta["truncated_rows"] == 1 and s.x[2, 1].sum() == 32
    assert s.x[2, 0, 31] == load_tokenizer(tok_dir).sep_token_id     # cut inside, [SEP] kept
    huge = write(tmp_path / "h.csv", ["a" * (MAX_CHARS + 1), "ok"], [0, 1])
    with pytest.raises(DiffinError) as e:
        load_split(huge, text=opts(tok_dir, truncation=True))
    assert re.search(r"h\.csv: row 0 \(line 2\): the text in column 'text' is 1,000,001 characters long", one_line(e))


def test_unknown_label_name_in_the_query_split(tmp_path, tok_dir):
    path = write(tmp_path / "q.csv", TEXTS[:3], ["ham", "spma", "ham"])
    with pytest.raises(DiffinError) as e:
        load_split(path, text=opts(tok_dir, classes=["ham", "spam"]))
    assert re.search(r"q\.csv: row 1 \(line 3\): label 'spma' is not one of the classes \['ham', 'spam'\]", one_line(e))


def test_text_csv_declared_tabular_says_so(tmp_path):
    """pandas 3 reads a text column as StringDtype; np.issubdtype used to raise a TypeError."""
    path = write(tmp_path / "t.csv", TEXTS, [1, 0, 0, 0, 0, 0, 1, 0])
    with pytest.raises(DiffinError) as e:
        load_split(path)
    assert re.search(r"t\.csv: column 'text' holds text, not numbers: for a text classifier set \[data\] "
                     r"kind = \"text\" and text_column = 'text'", one_line(e))


def test_packed_batches_call_the_model_with_integer_inputs():
    from diffin_core.engine.textmodel import adapt, unpack

    class Bag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = torch.nn.Embedding(50, 4), torch.nn.Linear(4, 3)
            self.seen = None

        def forward(self, input_ids, attention_mask):
            self.seen = (input_ids.dtype, attention_mask.dtype)
            m = attention_mask.unsqueeze(-1).to(self.emb.weight.dtype)
            return self.out((self.emb(input_ids) * m).sum(1) / m.sum(1))

    model = adapt(Bag())
    names = [n for n, _ in model.named_parameters()]
    x = torch.tensor([[[3, 7, 0], [1, 1, 0]]], dtype=torch.float32)
    assert model(x).shape == (1, 3) and model.seen == (torch.long, torch.long)
    assert names == ["emb.weight", "out.weight", "out.bias"] and set(model.state_dict()) == set(names)
    with pytest.raises(DiffinError, match="token ids exact"):
        unpack(x.to(torch.bfloat16))


@pytest.mark.parametrize("data, message", [
    ('kind = "text"\n', r"missing key 'text_column' in \[data\] \(needed for kind = \"text\"\)"),
    ('kind = "tabular"\ntext_column = "text"\n', r"\[data\] text_column needs kind = \"text\""),
    ('kind = "text"\ntext_column = "text"\nmax_length = 1\n', r"\[data\] max_length must be a whole number from 2"),
    ('kind = "text"\ntext_column = "text"\ntruncation = "yes"\n', r"\[data\] truncation must be true or false"),
    ('kind = "text"\ntext_column = "text"\nimage_shape = [1, 2, 2]\n', r"\[data\] image_shape does not apply to kind = \"text\""),
    ('kind = "txt"\ntext_column = "text"\n', r"\[data\] kind must be \"image\", \"tabular\" or \"text\""),
])
def test_text_keys_in_diffin_toml_are_checked(tmp_path, data, message):
    from diffin_core.project.folder import Project
    (tmp_path / "diffin.toml").write_text('[model]\nfactory = "model.py:build"\n[data]\ntrain = "t.csv"\n'
                                          'query = "q.csv"\n' + data)
    with pytest.raises(DiffinError) as e:
        Project(tmp_path)
    assert re.search(message, one_line(e)) and "diffin.toml" in str(e.value)
