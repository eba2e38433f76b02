"""Exports of text splits that keep the data faithful (called by export.py for kind = "text").

The split's rows are the data rows of its file, in order (docs/text.md). Decisions: excluded
rows are removed, a relabel rewrites the label field only, in the vocabulary the file uses
(a class name where the file holds names, an index where it holds indices).

* same format as the input (a faithful copy):
  - ``.csv``: the input's bytes, record by record (quoted fields, embedded newlines and ``""``
    escapes as the file has them; blank lines kept); only a relabelled record's label field is
    rewritten (quoted if it was quoted or must be).
  - ``.tsv``: the input's lines (no quoting, as it is read); a relabel rewrites one field.
  - ``.jsonl``: the input's lines; a relabelled line is the same JSON object (key order kept)
    with the new label, re-serialised.
  - ``.parquet``: the input's Arrow table, row group by row group (schema and metadata kept);
    the label column replaced in its own type (string names or integers).
* another format (converted): the same table (every column of the input, kept rows, final
  labels) written as csv, tsv, jsonl or parquet. TSV cannot hold a tab or newline inside a
  value: such a table is refused in one line naming the row.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np

from diffin_core.errors import DiffinError

TEXT_FORMATS = ("csv", "tsv", "jsonl", "parquet")
SUFFIX_FORMAT = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}


def text_format(path: Path) -> str | None:
    return SUFFIX_FORMAT.get(Path(path).suffix.lower())


class _Labels:
    """Writes a final label index in the file's own vocabulary."""

    def __init__(self, label_names, path):
        self.names = None if label_names is None else [str(n) for n in label_names]
        self.path = path

    def text(self, old: str, new: int) -> str:
        old_s = old.strip()
        if self.names is not None and old_s in self.names and not _is_int(old_s):
            return self.names[int(new)]
        if _is_int(old_s) or self.names is None:
            return str(int(new))
        if self.names is not None and 0 <= int(new) < len(self.names):
            return self.names[int(new)]
        raise DiffinError(f"cannot write label {int(new)} in the vocabulary of the file's label {old_s!r}", self.path)

    def value(self, old, new: int):
        """For JSON / Arrow: a string label stays a string (its name), a number stays a number."""
        if isinstance(old, str):
            return self.text(old, new)
        return int(new)


def _is_int(s: str) -> bool:
    return bool(re.fullmatch(r"[+-]?\d+", s))


# --- csv: records and fields by the csv module's rules (a field is quoted iff it starts with ") --
def _csv_patterns(delim: str):
    d = re.escape(delim)
    field = rf'(?:"[^"]*(?:""[^"]*)*"[^{d}\r\n]*|[^{d}\r\n"][^{d}\r\n]*|)'
    return re.compile(rf"{field}(?:{d}{field})*(?:\r\n|\n|\r|$)"), re.compile(field)


def _csv_records(text: str, delim: str, path) -> list[tuple[int, int]]:
    """Spans of every record (its line end included) of a csv text; blank lines are records of
    their own (kept, not counted as rows by the caller)."""
    rec, _ = _csv_patterns(delim)
    spans, pos, n = [], 0, len(text)
    while pos < n:
        nl = text.find("\n", pos)
        end = n if nl < 0 else nl + 1
        line = text[pos:end]
        cr = line.find("\r")
        if '"' not in line and (cr < 0 or (cr == len(line) - 2 and line.endswith("\r\n"))):
            spans.append((pos, end))                 # the fast path: a line without quotes is a record
            pos = end
            continue
        m = rec.match(text, pos)
        if m is None or m.end() == pos:
            raise DiffinError(f"cannot split the file into csv records near character {pos}", path)
        spans.append((pos, m.end()))
        pos = m.end()
    return spans


def _csv_fields(record: str, delim: str) -> list[tuple[int, int]]:
    """Spans of each field of one record (line end excluded)."""
    _, field = _csv_patterns(delim)
    body = record.rstrip("\r\n")
    spans, pos = [], 0
    while True:
        m = field.match(body, pos)
        spans.append((m.start(), m.end()))
        pos = m.end()
        if pos >= len(body) or body[pos] != delim:
            break
        pos += 1
    return spans


def _unquote(raw: str) -> str:
    if raw.startswith('"'):
        return next(csv.reader([raw]))[0]
    return raw


def _quote_if(raw_old: str, new: str, delim: str) -> str:
    if raw_old.startswith('"') or any(c in new for c in (delim, '"', "\n", "\r")) or new.startswith('"'):
        return '"' + new.replace('"', '""') + '"'
    return new


def _delimited_faithful(tmp: Path, path: Path, delim: str, quoted: bool, label_column: str, final, keep,
                        relabel, labels: _Labels) -> None:
    text = path.read_bytes().decode("utf-8")
    if quoted:
        spans = _csv_records(text, delim, path)
        records = [text[a:b] for a, b in spans]
    else:
        records = text.splitlines(keepends=True)
    if not records:
        raise DiffinError("the file is empty", path)
    header = records[0]
    names = ([_unquote(header[a:b]) for a, b in _csv_fields(header, delim)] if quoted
             else header.rstrip("\r\n").split(delim))
    if label_column not in names:
        raise DiffinError(f"no label column {label_column!r}", path)
    col = names.index(label_column)
    out, row = [header], 0
    for r in records[1:]:
        if not r.strip("\r\n"):                 # a blank line: kept, not a row
            out.append(r)
            continue
        if row >= len(keep):
            raise _mismatch(path, row + 1, len(keep))
        if keep[row]:
            if relabel[row]:
                body, eol = r.rstrip("\r\n"), r[len(r.rstrip("\r\n")):]
                if quoted:
                    fs = _csv_fields(body, delim)
                    a, b = fs[col]
                    old = body[a:b]
                    new = _quote_if(old, labels.text(_unquote(old), final[row]), delim)
                    body = body[:a] + new + body[b:]
                else:
                    fields = body.split(delim)
                    new = labels.text(fields[col], final[row])
                    if delim in new or "\n" in new:
                        raise DiffinError(f"row {row}: the label {new!r} cannot be written into a TSV field", path)
                    fields[col] = new
                    body = delim.join(fields)
                r = body + eol
            out.append(r)
        row += 1
    if row != len(keep):
        raise _mismatch(path, row, len(keep))
    tmp.write_bytes("".join(out).encode("utf-8"))


def _mismatch(path, found: int, n: int) -> DiffinError:
    return DiffinError(f"the file now holds {found} rows but the project's split has {n} "
                       "(changed since it was loaded?)", path)


def _jsonl_faithful(tmp: Path, path: Path, label_column: str, final, keep, relabel, labels: _Labels) -> None:
    text = path.read_bytes().decode("utf-8")
    out, row = [], 0
    for line_no, ln in enumerate(text.splitlines(keepends=True), 1):
        if not ln.strip():
            out.append(ln)
            continue
        if row >= len(keep):
            raise _mismatch(path, row + 1, len(keep))
        if keep[row]:
            if relabel[row]:
                obj = json.loads(ln)
                if not isinstance(obj, dict) or label_column not in obj:
                    raise DiffinError(f"line {line_no}: no label {label_column!r}", path)
                obj[label_column] = labels.value(obj[label_column], final[row])
                eol = ln[len(ln.rstrip("\r\n")):]
                ln = json.dumps(obj, ensure_ascii=False) + eol
            out.append(ln)
        row += 1
    if row != len(keep):
        raise _mismatch(path, row, len(keep))
    tmp.write_bytes("".join(out).encode("utf-8"))


def _label_array(pa, old_column, final, labels: _Labels):
    """The label column with ``final`` written in its own Arrow type."""
    typ = old_column.type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        olds = old_column.to_pylist()
        return pa.array([labels.value(o if o is not None else "", int(f)) for o, f in zip(olds, final)], type=typ)
    return pa.array(np.asarray(final, dtype=np.int64), type=pa.int64()).cast(typ)


def _parquet_faithful(tmp: Path, path: Path, label_column: str, final, keep, relabel, labels: _Labels) -> None:
    """The file's Arrow table (export.relabel_parquet); only relabelled rows get a new label, written
    as the column wrote its labels (a name in a string column, else the id in its own type)."""
    import pyarrow as pa
    from diffin_core.workspace.parquetcopy import relabel_parquet

    def column(old, a, b):
        new = _label_array(pa, old, final[a:b], labels)
        return pa.array([n if r else o for n, o, r in zip(new.to_pylist(), old.to_pylist(), relabel[a:b])],
                        type=old.type)
    relabel_parquet(tmp, path, label_column, keep, relabel, column, lambda found, n: _mismatch(path, found, n))


# --- conversions: the same table in another format ------------------------------------------------
def read_table(path: Path):
    """The whole input table as a pandas DataFrame (text read as str, nothing parsed as numbers
    for csv/tsv, as the text reader does)."""
    import pandas as pd
    fmt = text_format(path)
    if fmt in ("csv", "tsv"):
        raw = path.read_bytes().decode("utf-8")
        return pd.read_csv(io.StringIO(raw), sep="," if fmt == "csv" else "\t", dtype=str, keep_default_na=False,
                           na_filter=False, quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL)
    if fmt == "jsonl":
        rows = [json.loads(ln) for ln in path.read_bytes().decode("utf-8").splitlines() if ln.strip()]
        return pd.DataFrame(rows)
    if fmt == "parquet":
        return pd.read_parquet(path)
    raise DiffinError(f"not a text data file ({path.suffix})", path)


def _convert(tmp: Path, fmt: str, path: Path, label_column: str, final, keep, relabel, labels: _Labels) -> None:
    df = read_table(path)
    if len(df) != len(keep):
        raise _mismatch(path, len(df), len(keep))
    if label_column not in df.columns:
        raise DiffinError(f"no label column {label_column!r}", path)
    old = df[label_column].tolist()
    df[label_column] = [labels.value(o, f) if r else o for o, f, r in zip(old, final, relabel)]
    df = df[np.asarray(keep, dtype=bool)].reset_index(drop=True)
    if fmt == "csv":
        df.to_csv(tmp, index=False)
    elif fmt == "tsv":
        for c in df.columns:
            bad = df[c].astype(str).str.contains(r"[\t\r\n]", regex=True)
            if bad.any():
                raise DiffinError(f"row {int(np.flatnonzero(bad.to_numpy())[0])}: column {c!r} holds a tab or "
                                  "newline, which a TSV cannot hold: export csv, jsonl or parquet", path)
        df.to_csv(tmp, index=False, sep="\t", quoting=csv.QUOTE_NONE, escapechar=None)
    elif fmt == "jsonl":
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for rec in df.to_dict(orient="records"):
                f.write(json.dumps(rec, ensure_ascii=False, default=_json_value) + "\n")
    elif fmt == "parquet":
        df.to_parquet(tmp, index=False)
    else:
        raise DiffinError(f"unknown export format {fmt!r} for text (use {', '.join(TEXT_FORMATS)})")


def _json_value(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def write_text_export(tmp: Path, fmt: str, path: Path, label_column: str, y, final, decision,
                      label_names) -> None:
    """Write the text split's export into ``tmp`` (see the module docstring)."""
    if fmt not in TEXT_FORMATS:
        raise DiffinError(f"text splits export as {', '.join(TEXT_FORMATS)}, not {fmt!r}")
    y, final = np.asarray(y), np.asarray(final)
    keep, relabel = np.asarray(decision) != "exclude", final != y
    labels = _Labels(label_names, path)
    own = text_format(path)
    if fmt == own == "csv":
        return _delimited_faithful(tmp, path, ",", True, label_column, final, keep, relabel, labels)
    if fmt == own == "tsv":
        return _delimited_faithful(tmp, path, "\t", False, label_column, final, keep, relabel, labels)
    if fmt == own == "jsonl":
        return _jsonl_faithful(tmp, path, label_column, final, keep, relabel, labels)
    if fmt == own == "parquet":
        return _parquet_faithful(tmp, path, label_column, final, keep, relabel, labels)
    return _convert(tmp, fmt, path, label_column, final, keep, relabel, labels)
