"""Text exports keep the data faithful: .csv/.tsv byte for byte except the decisions, .jsonl
line for line, .parquet table for table (diffin_core/textexport.py via export.export_split)."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pandas as pd
import pytest
from text_fixtures import text_sample  # noqa: F401

from diffin_core.errors import DiffinError
from diffin_core.workspace.export import Source, export_split, manifest_path

NAMES = ["ham", "spam"]

# Awkward on purpose: quoted fields with commas, "" escapes, a newline inside a text, CRLF line
# ends, a text that looks like a number, a non-ASCII text, a quote inside an unquoted field and
# a blank line between rows.
CSV = ('sample_id,label,text\r\n'
       '10,ham,"Hello, world"\r\n'
       '11,spam,"WIN ""free"" tickets\r\nnow"\r\n'
       '12,ham,00123\r\n'
       '\r\n'
       '13,"spam",Grüße aus Köln 😀\r\n'
       '14,ham,a 5" screen\r\n')
ROWS = 5


def state(exclude=(), relabel=None):
    rows = [{"sample_id": s, "action": "exclude", "label": np.nan} for s in exclude]
    rows += [{"sample_id": s, "action": "relabel", "label": float(v)} for s, v in (relabel or {}).items()]
    return pd.DataFrame(rows, columns=["sample_id", "action", "label"]).set_index("sample_id")


def run_export(tmp_path, name, content, fmt, y, st, label_column="label", names=NAMES):
    src = tmp_path / name
    if isinstance(content, bytes):
        src.write_bytes(content)
    else:
        src.write_bytes(content.encode("utf-8"))
    ids = np.arange(10, 10 + len(y))
    out = tmp_path / f"out.{fmt}"
    export_split(out, fmt, np.zeros((len(y), 2, 4), np.float32), np.asarray(y), ids, st, label_names=names,
                 manifest_extra={}, source=Source(src, label_column, "text"))
    return src, out


def test_csv_byte_for_byte_except_decisions(tmp_path):
    y = [0, 1, 0, 1, 0]
    src, out = run_export(tmp_path, "train.csv", CSV, "csv", y, state(exclude=[12], relabel={11: 0, 14: 1}))
    expected = ('sample_id,label,text\r\n'
                '10,ham,"Hello, world"\r\n'
                '11,ham,"WIN ""free"" tickets\r\nnow"\r\n'
                '\r\n'
                '13,"spam",Grüße aus Köln 😀\r\n'
                '14,spam,a 5" screen\r\n')
    assert out.read_bytes() == expected.encode("utf-8")
    assert src.read_bytes() == CSV.encode("utf-8")                  # the input is never touched
    back = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert back["text"].tolist() == ["Hello, world", 'WIN "free" tickets\r\nnow', "Grüße aus Köln 😀", 'a 5" screen']
    man = json.loads(manifest_path(out).read_text())
    assert man["faithful"] and man["n_written"] == 4
    assert {s["sample_id"]: s["decision"] for s in man["samples"]}[12] == "exclude"


def test_csv_nothing_decided_is_the_same_file(tmp_path):
    _, out = run_export(tmp_path, "train.csv", CSV, "csv", [0, 1, 0, 1, 0], state())
    assert out.read_bytes() == CSV.encode("utf-8")


def test_quoted_label_field_stays_quoted_and_index_labels_stay_indices(tmp_path):
    content = 'text,label\n"a, b","1"\nplain,0\n'
    _, out = run_export(tmp_path, "t.csv", content, "csv", [1, 0], state(relabel={10: 0, 11: 1}))
    assert out.read_text() == 'text,label\n"a, b","0"\nplain,1\n'


def test_tsv_line_for_line(tmp_path):
    content = 'label\ttext\nham\tsay "hi", ok\nspam\tFREE!!! call 0800\nham\tsee you\n'
    _, out = run_export(tmp_path, "t.tsv", content, "tsv", [0, 1, 0], state(exclude=[10], relabel={12: 1}))
    assert out.read_text() == 'label\ttext\nspam\tFREE!!! call 0800\nspam\tsee you\n'


def test_jsonl_line_for_line(tmp_path):
    lines = ['{"text": "héllo \\u00e9", "label": 0, "meta": {"a": [1, 2]}}\n',
             '{"label":1,"text":"two"}\n',
             '{"text": "three", "label": 1}\n']
    _, out = run_export(tmp_path, "t.jsonl", "".join(lines), "jsonl", [0, 1, 1], state(exclude=[12], relabel={11: 0}))
    got = out.read_text().splitlines(keepends=True)
    assert got[0] == lines[0]                                       # untouched lines: the same bytes
    assert json.loads(got[1]) == {"label": 0, "text": "two"} and list(json.loads(got[1])) == ["label", "text"]
    assert len(got) == 2


def test_parquet_table_for_table(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({"text": ["a", "b, c", "d\ne"], "label": ["ham", "spam", "ham"], "n": [1, 2, 3]})
    table = table.replace_schema_metadata({b"origin": b"test"})
    src = tmp_path / "t.parquet"
    pq.write_table(table, src, row_group_size=2)
    _, out = run_export(tmp_path, "t.parquet", src.read_bytes(), "parquet", [0, 1, 0], state(exclude=[10], relabel={12: 1}))
    got = pq.read_table(out)
    assert got.schema == table.schema and got.schema.metadata == table.schema.metadata
    assert got.to_pydict() == {"text": ["b, c", "d\ne"], "label": ["spam", "spam"], "n": [2, 3]}


def test_conversions_keep_the_table(tmp_path):
    y = [0, 1, 0, 1, 0]
    st = state(exclude=[12], relabel={11: 0})
    _, out = run_export(tmp_path, "train.csv", CSV, "jsonl", y, st)
    recs = [json.loads(ln) for ln in out.read_text(encoding="utf-8").splitlines()]
    assert [r["sample_id"] for r in recs] == ["10", "11", "13", "14"]
    assert recs[1] == {"sample_id": "11", "label": "ham", "text": 'WIN "free" tickets\r\nnow'}
    _, out = run_export(tmp_path, "train.csv", CSV, "parquet", y, st)
    assert pd.read_parquet(out)["text"].tolist()[-1] == 'a 5" screen'
    with pytest.raises(DiffinError, match="row 1: column 'text' holds a tab or newline"):
        run_export(tmp_path, "train.csv", CSV, "tsv", y, st)
    assert not (tmp_path / "out.tsv").exists()                      # an error leaves nothing behind


def test_changed_file_and_bad_format_are_refused(tmp_path):
    with pytest.raises(DiffinError, match="holds 5 rows but the project's split has 4"):
        run_export(tmp_path, "train.csv", CSV, "csv", [0, 1, 0, 1], state())
    with pytest.raises(DiffinError, match="expected one of csv, tsv, jsonl, parquet for a text split"):
        run_export(tmp_path, "train.csv", CSV, "npz", [0, 1, 0, 1, 0], state())


def test_csv_records_agree_with_the_csv_module(tmp_path):
    rng = np.random.default_rng(0)
    pieces = ["a", "b,c", 'd"e', "f\ng", "", " ", "ü", '"', "x\r\ny"]
    rows = [[str(i), NAMES[i % 2], "".join(rng.choice(pieces, 3))] for i in range(60)]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([["sample_id", "label", "text"]] + rows)
    y = [i % 2 for i in range(60)]
    relabel = {10 + i: 1 - y[i] for i in range(0, 60, 7)}
    _, out = run_export(tmp_path, "r.csv", buf.getvalue(), "csv", y, state(exclude=[13, 40], relabel=relabel))
    back = list(csv.reader(io.StringIO(out.read_bytes().decode("utf-8"), newline="")))[1:]
    expect = [[r[0], NAMES[1 - y[i]] if 10 + i in relabel else r[1], r[2]] for i, r in enumerate(rows) if i not in (3, 30)]
    assert back == expect


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".tsv", ".jsonl", ".csv"])
def test_cli_exports_of_the_text_sample_keep_the_text(text_sample, tmp_path, capsys, suffix):
    """`diffin clean/delete/coreset --out X.tsv` on the text sample (its split is a .tsv): the
    input's own format byte for byte less the dropped rows; .jsonl / .csv the same table (every
    column as text, the kept rows). `--out clean.tsv` used to be refused ('unknown export format
    npz'): the CLI mapped only .npz/.csv/.parquet/.zip suffixes."""
    from helpers import run_cli
    src = text_sample / "data/train.tsv"
    table = pd.read_csv(src, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE)
    out = tmp_path / f"clean{suffix}"
    code, stdout, err = run_cli(["clean", text_sample, "--run", "loss-1", "--fraction", "0.1", "--out", out], capsys)
    assert code is None or code == 0, err
    assert "kept 144 of 160 samples (16 excluded)" in stdout, stdout
    kept_ids = [str(i) for i in json.loads(manifest_path(out).read_text())["written_ids"]]
    issue = pd.read_parquet(text_sample / "runs/loss-1/scores.parquet").set_index("sample_id")["label_issue"]
    kept = issue.index.astype(str).isin(kept_ids)
    assert issue[~kept].min() >= issue[kept].max()                  # the 16 dropped: the top label_issue
    want = table[table["sample_id"].isin(kept_ids)]
    assert len(want) == 144
    if suffix == ".tsv":
        lines = src.read_bytes().split(b"\n")
        expect = [lines[0]] + [ln for ln in lines[1:] if not ln or ln.split(b"\t", 1)[0].decode() in kept_ids]
        assert out.read_bytes().split(b"\n") == expect
    elif suffix == ".jsonl":
        got = [json.loads(ln) for ln in out.read_text(encoding="utf-8").splitlines()]
        assert [{k: str(v) for k, v in r.items()} for r in got] == want.to_dict("records")
    else:
        got = pd.read_csv(out, dtype=str, keep_default_na=False)
        pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))
