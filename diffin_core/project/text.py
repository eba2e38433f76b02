"""Text splits: .csv, .tsv, .jsonl and .parquet files with a text column and a label column,
tokenised once and kept as memory-mapped int arrays (contract: docs/text.md).

``read_text_table`` reads and checks the file (every problem one line naming the file and the
row); ``tokenize_split`` turns it into ``<cache>/input_ids.npy``, ``attention_mask.npy``
(``token_type_ids.npy`` for pairs), labels, ids, the original texts (``text.parquet``) and
``meta.json``, written atomically and reused while the source, the tokenizer and the options
are unchanged. ``TextSource`` reads rows of it as int32 ``(n, C, L)``: channel 0 input_ids,
1 attention_mask, 2 token_type_ids; data.py wraps it in a ``RowArray`` (float32, exact below
2^24) like any other source.

The tokenizer is a Hugging Face tokenizer folder in the project (``AutoTokenizer``, local files
only), or one trained here on the train split's texts with the ``tokenizers`` library.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffin_core.errors import DiffinError

TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
MAX_CHARS = 1_000_000               # any longer text is refused, whatever truncation says
DEFAULT_MAX_LENGTH = 128
DEFAULT_VOCAB = 8000
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CACHE_VERSION = 1


@dataclass
class TextOptions:
    """The [data] keys of a text split (docs/text.md)."""
    text_column: str
    label_column: str = "label"
    text_pair_column: str | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    truncation: bool = False
    tokenizer_dir: Path | None = None      # None: a tokenizer must be passed in (tests)
    vocab_size: int = DEFAULT_VOCAB
    cache_dir: Path | None = None          # None: tokenise in memory, nothing written
    classes: list[str] | None = None       # label names in label order (label_names / the train split's)
    train_tokenizer: bool = True           # False: a missing tokenizer is an error (the query split)
    tokenizer: object = field(default=None, repr=False)   # an already loaded tokenizer


# --- reading the table --------------------------------------------------------------------
@dataclass
class TextTable:
    texts: list[str]
    pairs: list[str] | None
    labels: list
    ids: np.ndarray | None
    true_labels: list | None
    lines: list[int] | None      # 1-based file line of each row (csv/tsv without quoted newlines, jsonl)


def _where(table_lines, i: int) -> str:
    return f"row {i}" + (f" (line {table_lines[i]})" if table_lines is not None else "")


def _utf8(raw: bytes, path, header_lines: int = 1) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        row = line - 1 - header_lines
        where = f"row {row} (line {line})" if row >= 0 else f"line {line}"
        raise DiffinError(f"{where}: bytes that are not UTF-8 (0x{raw[e.start]:02x} at byte {e.start}); "
                          f"save the file as UTF-8", path) from None


def _columns_check(names, opts: TextOptions, path) -> None:
    for key, col in (("text_column", opts.text_column), ("label_column", opts.label_column),
                     ("text_pair_column", opts.text_pair_column)):
        if col is not None and col not in names:
            raise DiffinError(f"no column {col!r} ([data] {key}); columns are {list(names)[:8]}", path)


def _read_delimited(path: Path, opts: TextOptions, sep: str) -> TextTable:
    import pandas as pd
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    text = _utf8(raw, path)
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, na_filter=False,
                         quoting=csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL, engine="c")
    except Exception as e:  # pandas raises several types for a malformed file
        msg = str(e).strip().splitlines()[-1][:160] if str(e).strip() else ""
        raise DiffinError(f"not a readable {path.suffix} table ({type(e).__name__}: {msg})", path) from None
    _columns_check(df.columns, opts, path)
    n_lines = text.count("\n") + (0 if text.endswith("\n") else 1)
    lines = list(range(2, len(df) + 2)) if n_lines == len(df) + 1 else None   # no quoted newlines
    col = lambda c: df[c].tolist() if c in df.columns else None       # noqa: E731
    ids = None
    if "sample_id" in df.columns:
        try:
            ids = np.asarray([int(v) for v in df["sample_id"]], dtype=np.int64)
        except ValueError:
            raise DiffinError("column 'sample_id' must hold whole numbers", path) from None
    return TextTable(col(opts.text_column), col(opts.text_pair_column) if opts.text_pair_column else None,
                     col(opts.label_column), ids, col("true_label"), lines)


def _read_jsonl(path: Path, opts: TextOptions) -> TextTable:
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    rows, lines = [], []
    for n, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DiffinError(f"row {len(rows)} (line {n}): bytes that are not UTF-8 "
                              f"(0x{line[e.start]:02x}); save the file as UTF-8", path) from None
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            raise DiffinError(f"row {len(rows)} (line {n}): not valid JSON ({e.msg})", path) from None
        if not isinstance(obj, dict):
            raise DiffinError(f"row {len(rows)} (line {n}): each line must be a JSON object, "
                              f"not {type(obj).__name__}", path)
        rows.append(obj)
        lines.append(n)
    if not rows:
        return TextTable([], None, [], None, None, [])
    for i, obj in enumerate(rows):
        for key, col in (("text_column", opts.text_column), ("label_column", opts.label_column),
                         ("text_pair_column", opts.text_pair_column)):
            if col is not None and col not in obj:
                raise DiffinError(f"row {i} (line {lines[i]}): no key {col!r} ([data] {key}); "
                                  f"keys are {list(obj)[:8]}", path)
    ids = None
    if all("sample_id" in o for o in rows):
        try:
            ids = np.asarray([int(o["sample_id"]) for o in rows], dtype=np.int64)
        except (TypeError, ValueError):
            raise DiffinError("'sample_id' must hold whole numbers", path) from None
    true = [o.get("true_label") for o in rows] if all("true_label" in o for o in rows) else None
    return TextTable([o[opts.text_column] for o in rows],
                     [o[opts.text_pair_column] for o in rows] if opts.text_pair_column else None,
                     [o[opts.label_column] for o in rows], ids, true, lines)


def _read_parquet(path: Path, opts: TextOptions) -> TextTable:
    import pyarrow.parquet as pq
    try:
        t = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DiffinError(f"not a readable .parquet table ({type(e).__name__})", path) from None
    _columns_check(t.column_names, opts, path)

    def texts(c):
        import pyarrow as pa
        col = t.column(c)
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            out = []
            for i, v in enumerate(col.to_pylist()):
                try:
                    out.append(None if v is None else v.decode("utf-8"))
                except UnicodeDecodeError:
                    raise DiffinError(f"row {i}: bytes that are not UTF-8 in column {c!r}", path) from None
            return out
        return col.to_pylist()
    ids = None
    if "sample_id" in t.column_names:
        ids = np.asarray(t.column("sample_id").to_numpy(zero_copy_only=False))
        if ids.dtype.kind not in "iu":
            raise DiffinError("column 'sample_id' must hold whole numbers", path)
    return TextTable(texts(opts.text_column), texts(opts.text_pair_column) if opts.text_pair_column else None,
                     t.column(opts.label_column).to_pylist(), ids,
                     t.column("true_label").to_pylist() if "true_label" in t.column_names else None, None)


def read_text_table(path: str | Path, opts: TextOptions) -> TextTable:
    """Read and check the texts (empty, missing, over-long in characters) of one text split."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        table = _read_delimited(path, opts, ",")
    elif suffix == ".tsv":
        table = _read_delimited(path, opts, "\t")
    elif suffix == ".jsonl":
        table = _read_jsonl(path, opts)
    elif suffix == ".parquet":
        table = _read_parquet(path, opts)
    else:
        raise DiffinError(f"unsupported text data format {suffix!r}; use .csv, .tsv, .jsonl or .parquet", path)
    for col, values in ((opts.text_column, table.texts), (opts.text_pair_column, table.pairs)):
        if values is None:
            continue
        for i, v in enumerate(values):
            if v is None or (isinstance(v, float) and v != v):
                raise DiffinError(f"{_where(table.lines, i)}: the text in column {col!r} is missing", path)
            if not isinstance(v, str):
                raise DiffinError(f"{_where(table.lines, i)}: the text in column {col!r} is a "
                                  f"{type(v).__name__}, not a string", path)
            if not v.strip():
                raise DiffinError(f"{_where(table.lines, i)}: the text in column {col!r} is empty", path)
            if len(v) > MAX_CHARS:
                raise DiffinError(f"{_where(table.lines, i)}: the text in column {col!r} is {len(v):,} "
                                  f"characters long; at most {MAX_CHARS:,} are accepted", path)
    return table


def label_indices(values: list, classes: list[str] | None, path, lines=None, what: str = "label") -> tuple[np.ndarray, list[str] | None]:
    """(int64 labels, class names or None): class indices as they are, or names mapped to their
    position in ``classes`` (label_names / the train split's), else in the sorted distinct names."""
    def as_int(v):
        if isinstance(v, bool):
            return None
        if isinstance(v, (int, np.integer)):
            return int(v)
        if isinstance(v, float) and v == int(v):
            return int(v)
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v.strip())
        return None
    for i, v in enumerate(values):
        if v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and v != v):
            raise DiffinError(f"{_where(lines, i)}: the {what} is missing", path)
    names = [str(v) for v in values]
    if classes is not None and all(n in classes for n in names):
        index = {c: k for k, c in enumerate(classes)}
        return np.asarray([index[n] for n in names], dtype=np.int64), list(classes)
    ints = [as_int(v) for v in values]
    if all(k is not None for k in ints):
        return np.asarray(ints, dtype=np.int64), classes
    if classes is not None:
        bad = next(i for i, n in enumerate(names) if n not in classes and as_int(values[i]) is None)
        raise DiffinError(f"{_where(lines, bad)}: {what} {names[bad]!r} is not one of the classes "
                          f"{list(classes)[:10]}", path)
    found = sorted(set(names))
    index = {c: k for k, c in enumerate(found)}
    return np.asarray([index[n] for n in names], dtype=np.int64), found


# --- tokenizer ----------------------------------------------------------------------------
def tokenizer_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


def has_tokenizer(directory: Path) -> bool:
    names = {p.name for p in tokenizer_files(directory)}
    return bool(names & {"tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                         "spiece.model", "sentencepiece.bpe.model"})


def tokenizer_fingerprint(directory: Path) -> str:
    h = hashlib.sha256()
    for p in tokenizer_files(directory):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def load_tokenizer(where: str | Path):
    """The tokenizer in ``where`` (a project folder: its ``tokenizer/``; or the tokenizer folder
    itself), loaded with AutoTokenizer from local files only."""
    where = Path(where)
    directory = where / "tokenizer" if (where / "diffin.toml").is_file() and not has_tokenizer(where) else where
    if not has_tokenizer(directory):
        raise DiffinError("no tokenizer here (tokenizer.json, tokenizer_config.json or vocab.txt)", directory)
    import transformers
    transformers.logging.set_verbosity_error()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # transformers raises many types for a broken folder
        raise DiffinError(f"not a loadable tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                          directory) from None


def train_tokenizer(texts, out_dir: str | Path, vocab_size: int = DEFAULT_VOCAB, max_length: int = DEFAULT_MAX_LENGTH,
                    min_frequency: int = 2):
    """Train a lower-cased WordPiece tokenizer on ``texts`` (pieces seen at least ``min_frequency``
    times) and save it (atomically) into
    ``out_dir`` as a PreTrainedTokenizerFast; returns it. Special tokens [PAD]=0 [UNK]=1 [CLS]=2
    [SEP]=3 [MASK]=4; template [CLS] a [SEP] (pairs: [CLS] a [SEP] b [SEP])."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    from diffin_core.project.atomic import staged_dir
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=int(vocab_size), special_tokens=SPECIAL_TOKENS,
                                        min_frequency=int(min_frequency), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=int(max_length),
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as tmp:
        fast.save_pretrained(str(tmp))
    return fast


def _tokenizer_for(opts: TextOptions, table: TextTable, path):
    if opts.tokenizer is not None:
        return opts.tokenizer, "given"
    d = opts.tokenizer_dir
    if d is None:
        raise DiffinError("a text split needs a tokenizer folder ([data] tokenizer)", path)
    if not has_tokenizer(d):
        if not opts.train_tokenizer:
            raise DiffinError("no tokenizer yet: load the train split first (it trains one on its texts)", d)
        train_tokenizer(table.texts + (table.pairs or []), d, opts.vocab_size, opts.max_length)
    return load_tokenizer(d), tokenizer_fingerprint(d)


# --- tokenising ---------------------------------------------------------------------------
def _encode(tok, texts, pairs, **kw):
    return tok(texts, pairs, add_special_tokens=True, return_attention_mask=True, return_token_type_ids=True, **kw) \
        if pairs is not None \
        else tok(texts, add_special_tokens=True, return_attention_mask=True, **kw)


def tokenize_table(table: TextTable, tok, opts: TextOptions, path) -> dict:
    """The arrays (input_ids int32 (N, L), attention_mask int8, token_type_ids int8 for pairs)
    and the number of truncated rows; a text over max_length tokens without truncation is an
    error naming its row."""
    L, n = int(opts.max_length), len(table.texts)
    pair = table.pairs is not None
    if tok.pad_token_id is None:
        raise DiffinError("the tokenizer has no padding token (pad_token); set one in tokenizer_config.json",
                          opts.tokenizer_dir or path)
    ids = np.full((n, L), int(tok.pad_token_id), np.int32)
    mask = np.zeros((n, L), np.int8)
    types = np.zeros((n, L), np.int8) if pair else None
    truncated = 0
    for a in range(0, n, 2048):
        b = min(n, a + 2048)
        enc = _encode(tok, table.texts[a:b], table.pairs[a:b] if pair else None, truncation=False)
        long = [i for i, e in enumerate(enc["input_ids"]) if len(e) > L]
        if long and not opts.truncation:
            i = long[0]
            raise DiffinError(f"{_where(table.lines, a + i)}: the text is {len(enc['input_ids'][i])} tokens long, over "
                              f"max_length = {L}; raise [data] max_length or set truncation = true", path)
        if long:
            truncated += len(long)
            cut = _encode(tok, [table.texts[a + i] for i in long], [table.pairs[a + i] for i in long] if pair else None,
                          truncation=True, max_length=L)
            for k, i in enumerate(long):
                for key in cut.keys():
                    enc[key][i] = cut[key][k]
        for i in range(b - a):
            e = enc["input_ids"][i]
            if tok.padding_side == "left":
                sl = slice(L - len(e), L)
            else:
                sl = slice(0, len(e))
            ids[a + i, sl] = e
            mask[a + i, sl] = enc["attention_mask"][i]
            if pair and "token_type_ids" in enc:
                types[a + i, sl] = enc["token_type_ids"][i]
    if n and int(ids.max()) >= (1 << 24):
        raise DiffinError("token ids must be below 2^24 (16,777,216)", opts.tokenizer_dir or path)
    out = {"input_ids": ids, "attention_mask": mask}
    if pair:
        out["token_type_ids"] = types
    return {"arrays": out, "truncated": truncated}


def _source_stamp(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _options_stamp(opts: TextOptions) -> dict:
    return {"text_column": opts.text_column, "text_pair_column": opts.text_pair_column,
            "label_column": opts.label_column, "max_length": int(opts.max_length),
            "truncation": bool(opts.truncation), "padding": "max_length",
            "label_names": list(opts.classes) if opts.classes is not None else None}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenize_split(path: str | Path, opts: TextOptions) -> "TokenizedSplit":
    """The tokenised split: read from ``opts.cache_dir`` when it matches the source, the tokenizer
    and the options, else built (and written there atomically when a cache dir is set)."""
    path = Path(path)
    cache = opts.cache_dir
    if cache is not None and (cache / "meta.json").is_file():
        try:
            meta = json.loads((cache / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            meta = {}
        fp = None
        if opts.tokenizer is None and opts.tokenizer_dir is not None and has_tokenizer(opts.tokenizer_dir):
            fp = tokenizer_fingerprint(opts.tokenizer_dir)
        if (meta.get("version") == CACHE_VERSION and meta.get("source", {}) | {"sha256": None}
                == _source_stamp(path) | {"sha256": None} and meta.get("options") == _options_stamp(opts)
                and fp is not None and meta.get("tokenizer") == fp):
            return TokenizedSplit.open(cache, path)
    table = read_text_table(path, opts)
    tok, fp = _tokenizer_for(opts, table, path)
    labels, classes = label_indices(table.labels, opts.classes, path, table.lines)
    true = None
    if table.true_labels is not None:
        true, _ = label_indices(table.true_labels, classes, path, table.lines, "true_label")
    arrays = tokenize_table(table, tok, opts, path)
    meta = {"version": CACHE_VERSION, "source": {**_source_stamp(path), "sha256": _sha256(path)},
            "tokenizer": fp, "options": _options_stamp(opts), "classes": classes, "rows": len(table.texts),
            "truncated_rows": arrays["truncated"], "pad_token_id": int(tok.pad_token_id),
            "channels": list(arrays["arrays"])}
    small = {"labels": labels.astype(np.int64),
             "ids": np.arange(len(labels), dtype=np.int64) if table.ids is None else table.ids.astype(np.int64)}
    if true is not None:
        small["true_labels"] = true.astype(np.int64)
    if cache is None:
        return TokenizedSplit(meta, {**arrays["arrays"], **small}, table.texts, table.pairs, None, path)
    import pyarrow as pa
    import pyarrow.parquet as pq
    from diffin_core.project.atomic import staged_dir
    with staged_dir(cache) as tmp:
        for name, a in {**arrays["arrays"], **small}.items():
            np.save(tmp / f"{name}.npy", a)
        cols = {"text": pa.array(table.texts, pa.large_string())}
        if table.pairs is not None:
            cols["text_pair"] = pa.array(table.pairs, pa.large_string())
        pq.write_table(pa.table(cols), tmp / "text.parquet")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return TokenizedSplit.open(cache, path)


class TokenizedSplit:
    """A tokenised text split: ``arrays`` (memory-mapped when read from the cache), ``meta``,
    and the original texts (read lazily from ``text.parquet``)."""

    def __init__(self, meta: dict, arrays: dict, texts, pairs, cache: Path | None, source: Path):
        self.meta, self.arrays, self._texts, self._pairs, self.cache, self.source = meta, arrays, texts, pairs, cache, source

    @classmethod
    def open(cls, cache: Path, source: Path) -> "TokenizedSplit":
        meta = json.loads((cache / "meta.json").read_text())
        arrays = {}
        for name in ("input_ids", "attention_mask", "token_type_ids", "labels", "ids", "true_labels"):
            f = cache / f"{name}.npy"
            if f.is_file():
                arrays[name] = np.load(f, mmap_mode="r" if name in ("input_ids", "attention_mask", "token_type_ids") else None,
                                       allow_pickle=False)
        return cls(meta, arrays, None, None, cache.resolve(), source)

    def source_x(self) -> "TextSource":
        return TextSource(self.cache, [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in self.arrays],
                          self.arrays if self.cache is None else None, str(self.source))

    def texts(self) -> "TextColumn":
        return TextColumn(self.cache, "text", self._texts)

    def pairs(self) -> "TextColumn | None":
        if self.meta["options"]["text_pair_column"] is None:
            return None
        return TextColumn(self.cache, "text_pair", self._pairs)


class TextColumn:
    """The original texts of a split, read on first use (picklable; not read into workers)."""

    def __init__(self, cache: Path | None, column: str, values: list[str] | None = None):
        self.cache, self.column, self._values = cache, column, values

    def __getstate__(self):
        return {**self.__dict__, "_values": self._values if self.cache is None else None}

    def values(self) -> list[str]:
        if self._values is None:
            import pyarrow.parquet as pq
            self._values = pq.read_table(self.cache / "text.parquet", columns=[self.column]).column(0).to_pylist()
        return self._values


class TextSource:
    """Rows of the tokenised arrays as int32 ``(n, C, L)`` (data.py's RowArray makes them
    float32): channel 0 input_ids, 1 attention_mask, 2 token_type_ids (pairs)."""

    def __init__(self, cache: Path | None, channels: list[str], arrays: dict | None, path: str):
        self.cache, self.channels, self.path = cache, list(channels), path
        self.dtype = np.dtype(np.int32)
        self._arrays = arrays
        first = self._get()[self.channels[0]]
        self.shape = (len(first), len(self.channels), first.shape[1])

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None if self.cache is not None else self._arrays}

    def _get(self) -> dict:
        if self._arrays is None:
            self._arrays = {c: np.load(self.cache / f"{c}.npy", mmap_mode="r", allow_pickle=False) for c in self.channels}
        return self._arrays

    @property
    def sample_shape(self) -> tuple:
        return self.shape[1:]

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        a = self._get()
        out = np.empty((len(rows), *self.shape[1:]), np.int32)
        for k, c in enumerate(self.channels):
            out[:, k] = a[c][rows]
        if self.cache is not None:
            self._arrays = None        # unmapped: mapped pages leave the RSS (sources.ArraySource.read)
        return out


