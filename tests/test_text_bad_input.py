"""Issue 18's bad text inputs as a user meets them: `diffin score` and the app on a text project
whose split has an empty text, bytes that are not UTF-8, a missing column or an over-long text
answer with one line naming the file and the row (tests/test_text_data.py checks the reader).

The project is fresh, as a user writes it: no tokenizer yet (diffin trains one on the train
texts) and a model.py that reads the tokenizer's size. `diffin score` used to build the model
before the split was read, so every one of these said "tokenizer: no tokenizer here" instead.
"""
from __future__ import annotations

import re

import pytest
from app_fixtures import jobs, new_app, texts, workspace  # noqa: F401
from helpers import run_cli

from diffin_core.project.folder import Project

MODEL_PY = '''
from pathlib import Path
import torch
from diffin_core import load_tokenizer


class Bag(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.emb, self.out = torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).to(self.emb.weight.dtype)
        return self.out((self.emb(input_ids) * m).sum(1) / m.sum(1))


def build():
    torch.manual_seed(0)
    return Bag(len(load_tokenizer(Path(__file__).parent)))
'''

TEXTS = ["Free entry to win a prize, text WIN now", "ok see you at 5", "Call me later pls",
         "URGENT! your mobile won 1000 cash", "lunch?", "are you coming tonight", "WIN a free holiday now",
         "see you soon", "claim your prize today", "thanks, talk later"]
LABELS = ["spam", "ham", "ham", "spam", "ham", "ham", "spam", "ham", "spam", "ham"]


def csv_bytes(texts=TEXTS, labels=LABELS, text_header="text") -> bytes:
    rows = [f"{text_header},label"] + [f'"{t}",{y}' for t, y in zip(texts, labels)]
    return ("\n".join(rows) + "\n").encode()


def text_project(root, train: bytes):
    (root / "data").mkdir(parents=True)
    (root / "data/train.csv").write_bytes(train)
    (root / "data/query.csv").write_bytes(csv_bytes(TEXTS[:4], LABELS[:4]))
    (root / "model.py").write_text(MODEL_PY)
    (root / "diffin.toml").write_text('[model]\nfactory = "model.py:build"\n[data]\nkind = "text"\n'
                                      'train = "data/train.csv"\nquery = "data/query.csv"\ntext_column = "text"\n'
                                      'max_length = 32\nvocab_size = 100\n')
    return root


def long_text():
    return " ".join(["prize"] * 40)


# (name, the train file's bytes, the one line after "<project>/data/train.csv: ")
CASES = [
    ("empty", csv_bytes(TEXTS[:3] + ["   "] + TEXTS[4:]), r"row 3 \(line 5\): the text in column 'text' is empty"),
    ("not-utf8", csv_bytes().replace(b"lunch?", b"caf\xe9?"),
     r"row 4 \(line 6\): bytes that are not UTF-8 \(0xe9 at byte \d+\); save the file as UTF-8"),
    ("no-text-column", csv_bytes(text_header="body"),
     r"no column 'text' \(\[data\] text_column\); columns are \['body', 'label'\]"),
    ("over-long", csv_bytes(TEXTS[:2] + [long_text()] + TEXTS[3:]),
     r"row 2 \(line 4\): the text is 42 tokens long, over max_length = 32; raise \[data\] max_length or set "
     r"truncation = true"),
]


@pytest.mark.parametrize("name, train, problem", CASES, ids=[c[0] for c in CASES])
def test_diffin_score_names_the_row_in_one_line(tmp_path, capsys, name, train, problem):
    proj = text_project(tmp_path / name, train)
    code, out, err = run_cli(["score", proj, "-m", "loss"], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in out + err, (code, err)
    assert len(lines) == 1 and re.fullmatch(rf"error: {re.escape(str(proj / 'data/train.csv'))}: {problem}", lines[0]), lines


@pytest.mark.parametrize("name, train, problem", CASES, ids=[c[0] for c in CASES])
def test_the_app_names_the_row_in_one_line_on_every_page(workspace, name, train, problem):
    proj = text_project(workspace / name, train)
    at = new_app(proj)
    assert not at.exception, at.exception
    want = rf"train\.csv: {problem}"
    for page in (None, "pages/2_Score.py", "pages/3_Explore.py", "pages/4_Review.py", "pages/5_Export.py"):
        if page:
            at.switch_page(page).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        errors = texts(at.error)
        assert any(re.search(want, e) for e in errors), (page, errors)
        assert all("\n" not in e and "Traceback" not in e and str(workspace) not in e for e in errors), (page, errors)


def test_a_fresh_text_project_trains_its_tokenizer_before_model_py_reads_it(tmp_path):
    """The tokenizer is trained on the train texts at the first read, which now comes before the
    model is built: model.py may size its embedding by it."""
    proj = text_project(tmp_path / "fresh", csv_bytes())
    model = Project(proj).build_model()
    assert (proj / "tokenizer/tokenizer.json").is_file()
    assert model.emb.num_embeddings == len(__import__("diffin_core").load_tokenizer(proj))


UPLOADS = [
    ("train.tsv", b"text\tlabel\nhello\tham\ncaf\xe9 au lait\tspam\n",
     r"row 1 \(line 3\): bytes that are not UTF-8 \(0xe9 at byte 24\); save the file as UTF-8"),
    ("train.csv", b"text,label\nhello,ham\ncaf\xe9 au lait,spam\n",
     r"row 1 \(line 3\): bytes that are not UTF-8 \(0xe9 at byte 24\); save the file as UTF-8"),
    ("train.jsonl", b'{"text": "hello", "label": "ham"}\n{"text": "caf\xe9", "label": "spam"}\n',
     r"row 1 \(line 2\): bytes that are not UTF-8"),
    ("train.tsv", b"t\xe9xt\tlabel\nhello\tham\n", r"line 1: bytes that are not UTF-8 \(0xe9 at byte 1\)"),
    ("train.tsv", b"text\tlabel\nhello\tham\n   \tspam\n", r"row 1 \(line 3\): the text in column 'text' is empty"),
    ("train.jsonl", b'{"body": "hello", "label": "ham"}\n{"body": "", "label": "spam"}\n',
     r"row 1 \(line 2\): the text in column 'body' is empty"),
]


@pytest.mark.parametrize("name, data, problem", UPLOADS, ids=["tsv", "csv", "jsonl", "header", "empty", "jsonl-empty"])
def test_setup_uploads_name_the_row_in_one_line(tmp_path, name, data, problem):
    """Setup's text uploads: bytes that are not UTF-8 in a .tsv upload said "<the server's
    staging folder>/train.tsv: cannot read the column names (UnicodeDecodeError)" (the header
    reader decoded a whole buffer), and in a .csv "not a readable .csv table"; now each names the
    upload and the row, and nothing is written."""
    import io

    from diffin_core.errors import DiffinError
    from diffin_core.workspace import uploads
    folder = tmp_path / "ws" / "p"
    with pytest.raises(DiffinError) as e:
        uploads.store_upload(folder, "train", name, io.BytesIO(data))
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) not in msg, msg
    assert re.fullmatch(rf"{re.escape(name)}: {problem}.*", msg), msg
    assert not (folder / "data").exists()
