"""The project folder: diffin.toml, the model, checkpoints/manifest.json, data/, runs/, review.sqlite.

    [model]        factory = "model.py:build"    # or program = "model.pt2" (torch.export)
                   loss = "cross_entropy"
    [data]         train = "data/train.npz"   query = "data/query.npz"
                   kind = "image" | "tabular" | "text"   image_shape = [1, 28, 28]
                   label_names = [...]          label_column = "label"   num_classes = 10
                   stream = "auto" | true | false   image_column = "image"   resize = false
                   max_pixels = 50000000        workers = 0   # DataLoader processes reading chunks
                                                # train/query may also be a folder (x.npy + y.npy,
                                                # or <class>/<image> sub-folders): see data.py
                   text_column = "text"   text_pair_column = "..."   max_length = 128
                   truncation = false   tokenizer = "tokenizer"   vocab_size = 8000
                                                # kind = "text": see docs/text.md and text.py
    [checkpoints]  manifest = "checkpoints/manifest.json"
    [train]        recipe = "train.py:train"    # optional: (train_x, train_y, seed, checkpoint_dir) -> None

The CLI and the app both open a folder through ``Project``; nothing else parses these files.
"""
from __future__ import annotations

import contextlib

import difflib
import importlib.util
import os
import sys
import types
import functools
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffin_core.project.checkpoints import Manifest, check_fits, check_step, complete_state, read_manifest, read_state
from diffin_core.project.data import Split, load_split
from diffin_core.errors import DiffinError
from diffin_core.engine.models import eval_mode

SCHEMA = {
    "project": {"name": False, "description": False},
    "model": {"factory": False, "program": False, "loss": False},
    "data": {"train": True, "query": True, "kind": False, "image_shape": False, "label_names": False,
             "label_column": False, "num_classes": False, "stream": False, "image_column": False,
             "resize": False, "max_pixels": False, "workers": False, "text_column": False,
             "text_pair_column": False, "max_length": False, "truncation": False, "tokenizer": False,
             "vocab_size": False},
    "checkpoints": {"manifest": False},
    "train": {"recipe": False},
}
CONFIG_NAME = "diffin.toml"


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(options)}"


LOSS_KEYS = ("name", "label_smoothing", "weight", "ignore_index")


def check_loss(loss, path):
    """[model] loss: "cross_entropy", "file.py:function" (a per-sample loss), or a table
    {name = "cross_entropy", label_smoothing = 0.1, weight = [...], ignore_index = -100}."""
    if isinstance(loss, str):
        if loss == "cross_entropy" or (":" in loss and loss.split(":", 1)[0].endswith(".py") and loss.split(":", 1)[1]):
            return loss
        raise DiffinError(f"[model] loss {loss!r} is not supported; use \"cross_entropy\", a table "
                          "{name = \"cross_entropy\", label_smoothing = ..., weight = [...], ignore_index = ...} "
                          "or \"loss.py:function\" (per-sample losses)", path)
    if not isinstance(loss, dict):
        raise DiffinError("[model] loss must be a string or a table", path)
    for key in loss:
        if key not in LOSS_KEYS:
            raise DiffinError(f"unknown key {key!r} in [model] loss{_suggest(key, LOSS_KEYS)}", path)
    if loss.get("name", "cross_entropy") != "cross_entropy":
        raise DiffinError(f"[model] loss name {loss.get('name')!r}: only \"cross_entropy\" takes options "
                          "(a custom loss is \"loss.py:function\")", path)
    ls = loss.get("label_smoothing", 0.0)
    if not (isinstance(ls, (int, float)) and not isinstance(ls, bool) and 0.0 <= ls < 1.0):
        raise DiffinError(f"[model] loss label_smoothing must be a number in [0, 1), not {ls!r}", path)
    w = loss.get("weight")
    if w is not None and not (isinstance(w, list) and w and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                               and v >= 0 for v in w)):
        raise DiffinError("[model] loss weight must be a list of class weights >= 0", path)
    ii = loss.get("ignore_index", -100)
    if not isinstance(ii, int) or isinstance(ii, bool):
        raise DiffinError(f"[model] loss ignore_index must be an integer, not {ii!r}", path)
    return loss


def check_config(raw: dict, path) -> dict:
    """Reject unknown or missing keys with a one-line error naming diffin.toml."""
    for table, body in raw.items():
        if table not in SCHEMA:
            raise DiffinError(f"unknown table [{table}]{_suggest(table, SCHEMA)}", path)
        if not isinstance(body, dict):
            raise DiffinError(f"[{table}] must be a table", path)
        for key in body:
            if key not in SCHEMA[table]:
                raise DiffinError(f"unknown key {key!r} in [{table}]{_suggest(key, SCHEMA[table])}", path)
    for table, keys in SCHEMA.items():
        for key, required in keys.items():
            if required and key not in raw.get(table, {}):
                raise DiffinError(f"missing key {key!r} in [{table}]", path)
    model = raw.get("model", {})
    if ("factory" in model) == ("program" in model):
        raise DiffinError("[model] needs exactly one of 'factory' (\"model.py:build\") or 'program' (\"model.pt2\")", path)
    kind = raw["data"].get("kind", "image" if "image_shape" in raw["data"] else "tabular")
    if kind not in ("image", "tabular", "text"):
        raise DiffinError(f"[data] kind must be \"image\", \"tabular\" or \"text\", not {kind!r}", path)
    text_keys = [k for k in ("text_column", "text_pair_column", "max_length", "truncation", "tokenizer", "vocab_size")
                 if k in raw["data"]]
    if kind != "text" and text_keys:
        raise DiffinError(f"[data] {text_keys[0]} needs kind = \"text\"", path)
    if kind == "text":
        check_text_keys(raw["data"], path)
    if kind == "image" and "image_shape" not in raw["data"]:
        raise DiffinError("missing key 'image_shape' in [data] (needed for kind = \"image\")", path)
    check_data_keys(raw["data"], path)
    return raw


def check_text_keys(data: dict, path) -> None:
    """Types and values of the [data] keys of a text split (docs/text.md)."""
    if "text_column" not in data:
        raise DiffinError("missing key 'text_column' in [data] (needed for kind = \"text\")", path)
    for key in ("text_column", "text_pair_column", "tokenizer", "label_column"):
        v = data.get(key)
        if v is not None and (not isinstance(v, str) or not v):
            raise DiffinError(f"[data] {key} must be a non-empty string, not {v!r}", path)
    for key, low, high in (("max_length", 2, 1 << 20), ("vocab_size", 10, 1 << 24)):
        v = data.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high):
            raise DiffinError(f"[data] {key} must be a whole number from {low} to {high:,}, not {v!r}", path)
    if not isinstance(data.get("truncation", False), bool):
        raise DiffinError(f"[data] truncation must be true or false, not {data['truncation']!r}", path)
    for key in ("image_shape", "image_column", "resize", "max_pixels"):
        if key in data:
            raise DiffinError(f"[data] {key} does not apply to kind = \"text\"", path)


def check_data_keys(data: dict, path) -> None:
    """Types and values of the [data] keys that pick and decode the sources (data.py)."""
    def positive_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0
    shape = data.get("image_shape")
    if shape is not None and (not isinstance(shape, list) or not 1 <= len(shape) <= 3
                              or not all(positive_int(s) for s in shape)):
        raise DiffinError(f"[data] image_shape must be a list of 1 to 3 positive integers like [3, 32, 32], "
                          f"not {shape!r}", path)
    if data.get("stream", "auto") not in (True, False, "auto"):
        raise DiffinError(f"[data] stream must be true, false or \"auto\", not {data['stream']!r}", path)
    col = data.get("image_column")
    if col is not None and (not isinstance(col, str) or not col):
        raise DiffinError(f"[data] image_column must be a column name (a non-empty string), not {col!r}", path)
    if col is not None and (shape is None or len(shape) != 3):
        raise DiffinError("[data] image_column needs image_shape = [C, H, W] (the decoded size)", path)
    if col is not None and shape[0] not in (1, 3, 4):
        raise DiffinError(f"[data] image_shape channels must be 1, 3 or 4 to decode images, not {shape[0]}", path)
    if not isinstance(data.get("resize", False), bool):
        raise DiffinError(f"[data] resize must be true or false, not {data['resize']!r}", path)
    if "max_pixels" in data and not positive_int(data["max_pixels"]):
        raise DiffinError(f"[data] max_pixels must be a positive integer, not {data['max_pixels']!r}", path)
    workers = data.get("workers", 0)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise DiffinError(f"[data] workers must be a whole number >= 0 (DataLoader worker processes), "
                          f"not {workers!r}", path)
    for key in ("train", "query"):
        if key in data and (not isinstance(data[key], str) or not data[key]):
            raise DiffinError(f"[data] {key} must be a path (a non-empty string), not {data[key]!r}", path)


def load_source(path: str | Path, name: str) -> types.ModuleType:
    """Import a .py file as module ``name`` from its source; never writes ``__pycache__``.

    The module is registered in ``sys.modules`` while it runs (dataclasses and pickling need
    that); on an exception it is removed again and the exception propagates."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        code = compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
        exec(code, module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


_USER_MODULES: dict[str, str] = {}     # module name -> the user-code folder it was imported from


@contextlib.contextmanager
def user_imports(folder: str | Path):
    """While user code is imported or called: its folder on ``sys.path`` (so model.py may say
    ``from nets import Net`` as it would run by itself) and no bytecode written anywhere (no
    ``__pycache__`` in the project). ``sys.path`` is restored afterwards (child processes
    spawned later inherit it: no project folder leaks into them); a module model.py imports
    lazily, inside forward(), is not found then: import siblings at the top of model.py.
    Modules imported from another user-code folder earlier in this process (another
    project's ``nets``) are dropped from ``sys.modules`` first, so each project gets its own."""
    folder = str(Path(folder).resolve())
    for name, where in list(_USER_MODULES.items()):
        if where != folder:
            sys.modules.pop(name, None)
            del _USER_MODULES[name]
    old_path, old_bc = list(sys.path), sys.dont_write_bytecode
    before = set(sys.modules)
    sys.path.insert(0, folder)
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.dont_write_bytecode = old_bc
        sys.path[:] = old_path
        for name in set(sys.modules) - before:
            f = getattr(sys.modules.get(name), "__file__", None)
            if f and str(Path(f).resolve()).startswith(folder + os.sep):
                _USER_MODULES[name] = folder


@dataclass(frozen=True)
class RunInfo:
    name: str
    method: str
    meta: dict
    path: Path


class Project:
    """An opened project folder. Cheap to construct; files are read on demand and cached."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.config_path = self.root / CONFIG_NAME
        if not self.config_path.is_file():
            raise DiffinError("no diffin.toml here: not a diffin project folder", self.config_path)
        try:
            raw = tomllib.loads(self.config_path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise DiffinError(f"not valid TOML ({e})", self.config_path) from None
        self.config = check_config(raw, self.config_path)
        d = self.config["data"]
        self.kind: str = d.get("kind", "image" if "image_shape" in d else "tabular")
        self.image_shape = tuple(d["image_shape"]) if "image_shape" in d else None
        self.label_names: list[str] | None = d.get("label_names")
        self.label_column: str = d.get("label_column", "label")
        self.loss = check_loss(self.config.get("model", {}).get("loss", "cross_entropy"), self.config_path)
        self.name: str = self.config.get("project", {}).get("name", self.root.name)

    # --- paths ------------------------------------------------------------------------------
    def path(self, rel: str) -> Path:
        p = (self.root / rel).resolve()
        if self.root not in p.parents and p != self.root:
            raise DiffinError(f"path {rel!r} points outside the project folder", self.config_path)
        return p

    @property
    def manifest_path(self) -> Path:
        return self.path(self.config.get("checkpoints", {}).get("manifest", "checkpoints/manifest.json"))

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def recipe(self) -> str | None:
        return self.config.get("train", {}).get("recipe")

    # --- model ------------------------------------------------------------------------------
    def load_callable(self, spec: str, what: str):
        """Import ``"file.py:function"`` from the project folder."""
        if ":" not in spec:
            raise DiffinError(f"{what} must look like \"file.py:function\", got {spec!r}", self.config_path)
        file, fn = spec.rsplit(":", 1)
        src = self.path(file)
        if not src.is_file():
            raise DiffinError(f"{what} file not found", src)
        name = f"diffin_user_{abs(hash(str(src)))}"
        try:
            with user_imports(src.parent):   # siblings importable; no __pycache__ in the project folder
                module = load_source(src, name)
        except Exception as e:
            raise DiffinError(f"importing it raised {type(e).__name__}: {e}", src) from None
        if not callable(getattr(module, fn, None)):
            raise DiffinError(f"defines no function {fn!r}", src)
        return getattr(module, fn), src

    def loss_spec(self):
        """The stated per-sample loss (functional.LossSpec), or None when diffin.toml states
        none (plain cross-entropy, or the loss the Recorder recorded)."""
        from diffin_core.engine.functional import LossSpec
        raw = self.config.get("model", {}).get("loss")
        if raw is None:
            return None
        if isinstance(raw, str) and raw != "cross_entropy":
            fn, _src = self.load_callable(raw, "[model] loss")
            return LossSpec(name=raw, fn=fn, where=raw)
        if isinstance(raw, str):
            return LossSpec()
        return LossSpec(label_smoothing=raw.get("label_smoothing", 0.0), weight=raw.get("weight"),
                        ignore_index=raw.get("ignore_index", -100))

    def build_model(self) -> nn.Module:
        """A fresh model (weights as the factory makes them, or as the exported program holds)."""
        model_cfg = self.config["model"]
        if "program" in model_cfg:
            src = self.path(model_cfg["program"])
            if not src.is_file():
                raise DiffinError("model program not found", src)
            try:
                model = torch.export.load(str(src)).module()
            except Exception as e:
                raise DiffinError(f"not a loadable torch.export program ({type(e).__name__})", src) from None
        else:
            build, src = self.load_callable(model_cfg["factory"], "[model] factory")
            if self.kind == "text":
                self.train_unchecked     # first: it trains the tokenizer model.py may read, and names a bad row
            try:
                with user_imports(src.parent):
                    model = build()
            except Exception as e:
                raise DiffinError(f"{model_cfg['factory'].split(':')[1]}() raised {type(e).__name__}: {e}", src) from None
        if not isinstance(model, nn.Module):
            raise DiffinError(f"the model factory returned {type(model).__name__}, not a torch nn.Module", src)
        if self.kind == "text":
            from diffin_core.engine.textmodel import adapt
            adapt(model)
        return model

    @functools.cached_property
    def num_classes(self) -> int:
        if "num_classes" in self.config["data"]:
            return int(self.config["data"]["num_classes"])
        if self.label_names:
            return len(self.label_names)
        if self.kind == "text":
            split = self.train_unchecked           # first: it trains the tokenizer model.py may read
            return int(self._forward_one(eval_mode(self.build_model()), split).shape[-1])
        raw = load_split(self.path(self.config["data"]["train"]), label_column=self.label_column,
                         image_shape=self.image_shape, **{**self.source_options, "stream": True})
        return int(self._forward_one(eval_mode(self.build_model()), raw).shape[-1])

    @staticmethod
    def _forward_one(model: nn.Module, split: Split) -> torch.Tensor:
        training = getattr(model, "training", False)
        try:
            with torch.no_grad():
                return eval_mode(model)(torch.as_tensor(split.x[:1]))   # eval: BatchNorm can't train on 1 sample
        except Exception as e:
            raise DiffinError(f"the model can't take samples of shape {list(split.x.shape[1:])} "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120]})", split.path) from None
        finally:
            if training:
                try:
                    model.train()
                except NotImplementedError:      # torch.export programs refuse train()/eval()
                    pass

    # --- data -------------------------------------------------------------------------------
    @property
    def source_options(self) -> dict:
        """load_split keyword arguments from the [data] keys that pick and decode sources."""
        d = self.config["data"]
        opts = {k: d[k] for k in ("stream", "image_column", "resize", "max_pixels", "workers") if k in d}
        if self.label_names:
            opts["classes"] = [str(n) for n in self.label_names]
        return opts

    def text_options(self, key: str, classes=None):
        """text.TextOptions for split ``key`` ("train" / "query"): the [data] keys, the tokenizer
        folder and the cache folder tokenized/<key>."""
        from diffin_core.project.text import DEFAULT_MAX_LENGTH, DEFAULT_VOCAB, TextOptions
        d = self.config["data"]
        return TextOptions(text_column=d["text_column"], label_column=self.label_column,
                           text_pair_column=d.get("text_pair_column"),
                           max_length=int(d.get("max_length", DEFAULT_MAX_LENGTH)),
                           truncation=bool(d.get("truncation", False)),
                           tokenizer_dir=self.path(d.get("tokenizer", "tokenizer")),
                           vocab_size=int(d.get("vocab_size", DEFAULT_VOCAB)),
                           cache_dir=self.root / "tokenized" / key,
                           classes=classes if classes is not None else self.label_names,
                           train_tokenizer=key == "train")

    @functools.cached_property
    def train_unchecked(self) -> Split:
        """The text train split before its labels are checked against the model (num_classes)."""
        d = self.config["data"]
        return load_split(self.path(d["train"]), label_column=self.label_column,
                          stream=d.get("stream", "auto"), workers=d.get("workers", 0),
                          text=self.text_options("train"))

    def _split(self, key: str) -> Split:
        if self.kind == "text":
            d = self.config["data"]
            classes = None if key == "train" else self.train.classes
            split = load_split(self.path(d[key]), label_column=self.label_column, num_classes=self.num_classes,
                               stream=d.get("stream", "auto"), workers=d.get("workers", 0),
                               text=self.text_options(key, classes))
            if key == "query" and split.meta and self.train.meta and split.meta["tokenizer"] != self.train.meta["tokenizer"]:
                raise DiffinError("the query split was tokenised with another tokenizer than the train split; "
                                  "delete tokenized/ to redo both", split.path)
            return split
        opts = self.source_options
        if key == "query" and "classes" not in opts and self.train.classes is not None:
            opts["classes"] = self.train.classes     # image folders: the train split's class order
        return load_split(self.path(self.config["data"][key]), label_column=self.label_column,
                          image_shape=self.image_shape, num_classes=self.num_classes, **opts)

    @functools.cached_property
    def train(self) -> Split:
        return self._split("train")

    @functools.cached_property
    def query(self) -> Split:
        q = self._split("query")
        if q.x.shape[1:] != self.train.x.shape[1:]:
            raise DiffinError(f"query samples have shape {list(q.x.shape[1:])} but train samples have "
                              f"{list(self.train.x.shape[1:])}", q.path)
        return q

    def check_model_input(self, model: nn.Module) -> None:
        """One forward pass on a training sample: the model must accept the data's shape."""
        out = self._forward_one(model, self.train)
        if out.ndim != 2 or out.shape[-1] != self.num_classes:
            raise DiffinError(f"the model outputs shape {list(out.shape)}, expected [batch, {self.num_classes}] logits",
                              self.config_path)

    # --- checkpoints ------------------------------------------------------------------------
    @functools.cached_property
    def manifest(self) -> Manifest:
        m = read_manifest(self.manifest_path)
        if m.train_size is not None and self.config_path.exists():
            n = len(self.train)
            if int(m.train_size) != n:
                raise DiffinError(f"train_size is {m.train_size} but the train split has {n} samples", m.path)
        return m

    def checkpoint_states(self, model: nn.Module | None = None) -> list[dict[str, torch.Tensor]]:
        """Every checkpoint's state_dict, checked against the model, in step order."""
        model = model or self.build_model()
        out = []
        for c in self.manifest.checkpoints:
            src = self.manifest_path.parent / c.file
            state, meta = read_state(src)
            check_step(meta, c, src)
            check_fits(model, state, src)
            out.append(complete_state(model, state))
        return out

    def final_model(self) -> nn.Module:
        model = self.build_model()
        model.load_state_dict(self.checkpoint_states(model)[-1])
        return eval_mode(model)

    def validate(self, brief: bool = False) -> list[str]:
        """Load everything once; return a list of one-line problems (empty when all is well).
        ``brief``: each names its file without the folders (``DiffinError.brief``, for the app)."""
        problems = []
        for check in (lambda: self.train, lambda: self.query, lambda: self.manifest, self.checkpoint_states):
            try:
                check()
            except DiffinError as e:
                line = e.brief() if brief else str(e)
                if line not in problems:         # one broken model.py fails every check alike: say it once
                    problems.append(line)
        return problems

    # --- runs -------------------------------------------------------------------------------
    def runs(self) -> list[RunInfo]:
        from diffin_core.project.atomic import recover_dirs
        recover_dirs(self.runs_dir)     # a run replacement killed half-way: repaired, leftovers removed
        out = []
        for meta_path in sorted(self.runs_dir.glob("*/meta.json")):
            if meta_path.parent.name.startswith("."):   # temp folders, versions: never runs
                continue
            recover_dirs(meta_path.parent)              # a killed feature pass's .features.tmp-<pid>-*
            try:
                meta = json.loads(meta_path.read_text())
            except (json.JSONDecodeError, OSError):
                continue
            if (meta_path.parent / "scores.parquet").is_file():
                out.append(RunInfo(meta_path.parent.name, meta.get("method", "?"), meta, meta_path.parent))
        return sorted(out, key=lambda r: r.meta.get("finished", 0), reverse=True)

    def run(self, name: str) -> RunInfo:
        for r in self.runs():
            if r.name == name:
                return r
        raise DiffinError(f"no finished run named {name!r}; runs: {[r.name for r in self.runs()]}", self.runs_dir)

    def scores(self, run: str):
        import pandas as pd
        return pd.read_parquet(self.run(run).path / "scores.parquet")
