"""Creating a project folder from uploaded files, one file at a time.

Each upload is streamed to a temp file outside the project, checked, and only then moved into
place, so a bad file leaves the project folder exactly as it was. Roles and destinations:

    model       model.py (defines build()) or model.pt2 (torch.export)  -> <project>/model.*
    checkpoint  .safetensors / .pt / .pth, or a .zip of them             -> checkpoints/<name>
    train/query .npz / .csv / .parquet, or an ImageFolder .zip           -> data/<role>.<ext>
                text: .csv / .tsv / .jsonl / .parquet with a text column and a label column
    tokenizer   a Hugging Face tokenizer: a .zip of its folder, or its tokenizer.json -> tokenizer/
                (or the folder itself, every file at once: store_tokenizer_folder)

What the checks learn (step/lr read from a checkpoint, image shape, class names) goes into the
draft ``<project>/.setup.json``; ``finish`` turns the draft plus the step/lr table into
checkpoints/manifest.json and diffin.toml, keeping the old files when the result does not load.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from diffin_core.project.atomic import atomic_path, write_text
from diffin_core.project.checkpoints import CHECKPOINT_SUFFIXES, Checkpoint, Manifest, check_fits, read_state
from diffin_core.project.data import load_split
from diffin_core.errors import DiffinError
from diffin_core.workspace.export import IMAGES_SUFFIX

DRAFT = ".setup.json"
ROLES = ("model", "checkpoint", "train", "query", "tokenizer", "modules")
DATA_SUFFIXES = (".npz", ".csv", ".tsv", ".jsonl", ".parquet", ".zip")
SUFFIXES = {"model": (".py", ".pt2"), "checkpoint": CHECKPOINT_SUFFIXES + (".zip",),
            "train": DATA_SUFFIXES, "query": DATA_SUFFIXES, "tokenizer": (".zip", ".json"), "modules": (".py", ".zip")}
WHAT = {"model": "a model (model.py with build(), or model.pt2)",
        "checkpoint": "a checkpoint (.safetensors, .pt, .pth, or a .zip of them)",
        "train": "data (.npz, .csv, .tsv, .jsonl, .parquet, or an ImageFolder .zip)",
        "query": "data (.npz, .csv, .tsv, .jsonl, .parquet, or an ImageFolder .zip)",
        "tokenizer": "a tokenizer (a .zip of a Hugging Face tokenizer folder, or its tokenizer.json)",
        "modules": "Python files model.py imports (.py files, or a .zip of .py files and packages)"}
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.py$")
_RESERVED = {"model.py", "diffin.toml"}
TEXT_ONLY = (".tsv", ".jsonl")


# --- the draft -----------------------------------------------------------------------------
def read_draft(project_dir: str | Path) -> dict:
    p = Path(project_dir) / DRAFT
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except (OSError, ValueError):
        return {}


def _write_draft(project_dir: Path, draft: dict) -> None:
    write_text(project_dir / DRAFT, json.dumps(draft, indent=1))


# --- checks --------------------------------------------------------------------------------
def build_model_file(path: Path, label: str, project_dir: Path | None = None):
    """Build the model from a model.py (its build()) or a model.pt2; DiffinError naming ``label``.
    ``project_dir`` (default: the file's folder) is on the import path meanwhile, so model.py
    may import the modules uploaded beside it; no bytecode is written."""
    import torch
    from diffin_core.project.folder import user_imports
    if path.suffix == ".pt2":
        try:
            model = torch.export.load(str(path)).module()
        except Exception as e:
            raise DiffinError(f"not a loadable torch.export program ({type(e).__name__})", label) from None
    else:
        name = f"diffin_upload_{uuid.uuid4().hex}"
        folder = Path(project_dir) if project_dir is not None else path.parent
        try:
            with user_imports(folder):
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                code = compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
                exec(code, module.__dict__)
        except ModuleNotFoundError as e:
            hint = (f" (upload {e.name}.py under 'Other Python files model.py imports' first)"
                    if e.name and "." not in e.name and not (folder / f"{e.name}.py").exists() else "")
            raise DiffinError(f"importing it raised ModuleNotFoundError: {e}{hint}", label) from None
        except (Exception, SystemExit) as e:
            raise DiffinError(f"importing it raised {type(e).__name__}: {e}", label) from None
        finally:
            sys.modules.pop(name, None)
        if not callable(getattr(module, "build", None)):
            raise DiffinError("defines no function build()", label)
        try:
            with user_imports(folder):
                model = module.build()
        except (Exception, SystemExit) as e:
            raise DiffinError(f"build() raised {type(e).__name__}: {e}", label) from None
    if not isinstance(model, torch.nn.Module):
        raise DiffinError(f"build() returned {type(model).__name__}, not a torch nn.Module", label)
    return model


def _number(v):
    try:
        return float(v.item() if hasattr(v, "item") else v)
    except (TypeError, ValueError):
        return None


def check_checkpoint(path: Path, label: str, model=None) -> dict:
    """Read one checkpoint; returns {"step", "lr"} as found in it (None when absent)."""
    try:
        state, meta = read_state(path)
        if model is not None:
            check_fits(model, state, path)
    except DiffinError as e:
        raise DiffinError(e.problem, label) from None
    step, lr = _number(meta.get("step")), _number(meta.get("lr"))
    return {"step": None if step is None else int(step), "lr": lr}


def _columns(path: Path, label: str) -> list[str]:
    """The column names of a text data file (its header, first JSON object, or schema). Only the
    first line is decoded: bytes that are not UTF-8 further down are the text reader's to name
    by their row."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv", ".jsonl"):
            with open(path, "rb") as fh:
                first = fh.readline(1 << 20)
            try:
                line = first.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise DiffinError(f"line 1: bytes that are not UTF-8 (0x{first[e.start]:02x} at byte {e.start}); "
                                  "save the file as UTF-8", label) from None
            if suffix == ".jsonl":
                head = json.loads(line or "{}")
                return list(head) if isinstance(head, dict) else []
            import csv
            return next(csv.reader([line.rstrip("\r\n")], delimiter="," if suffix == ".csv" else "\t"), [])
        import pyarrow.parquet as pq
        return list(pq.ParquetFile(path).schema_arrow.names)
    except (ValueError, OSError) as e:
        raise DiffinError(f"cannot read the column names ({type(e).__name__})", label) from None


def check_text_data(path: Path, label: str, text_column: str | None = None) -> dict:
    """A text split: the text column ("text", else the string column with the longest texts),
    the label column "label", every row checked by the text reader (empty or missing texts,
    bytes that are not UTF-8: one line naming the row); labels as indices or class names."""
    from diffin_core.project.text import TextOptions, label_indices, read_text_table
    cols = _columns(path, label)
    if "label" not in cols:
        raise DiffinError(f"a text split needs a 'label' column (it has {cols[:8]})", label)
    candidates = [c for c in cols if c not in ("label", "sample_id", "true_label")]
    if text_column is None:
        if "text" in candidates:
            text_column = "text"
        elif candidates:
            from diffin_core.workspace.textexport import read_table
            df = read_table(path).head(200)
            lengths = {c: df[c].astype(str).str.len().mean() for c in candidates if df[c].dtype == object
                       or str(df[c].dtype).startswith("str")}
            text_column = max(lengths, key=lengths.get) if lengths else None
    if text_column is None:
        raise DiffinError(f"no text column found (columns: {cols[:8]})", label)
    try:
        table = read_text_table(path, TextOptions(text_column=text_column, label_column="label"))
        y, classes = label_indices(table.labels, None, path, table.lines)
    except DiffinError as e:
        raise DiffinError(e.problem, label) from None
    return {"kind": "text", "n": len(y), "text_column": text_column, "label_column": "label",
            "classes": classes, "num_labels": len(classes) if classes else int(y.max()) + 1,
            "min_label": 0 if classes else int(y.min()), "sample_shape": ["text"]}


def check_data(path: Path, label: str) -> dict:
    """Load one split; returns what it tells about the project (kind, image_shape, size)."""
    if path.suffix.lower() in TEXT_ONLY:
        return check_text_data(path, label)
    try:
        split = load_split(path)
    except DiffinError as e:
        if path.suffix.lower() in (".csv", ".parquet") and "holds text" in e.problem:
            return check_text_data(path, label)          # a text column: a text classifier's data
        raise DiffinError(e.problem, label) from None
    return split_info(split.x, split.y)


def split_info(x, y) -> dict:
    """What a loaded split tells about the project: kind, image_shape or features, size, labels."""
    info = {"n": len(y), "num_labels": int(y.max()) + 1, "min_label": int(y.min()),
            "sample_shape": [int(d) for d in x.shape[1:]]}
    if x.ndim == 4:
        info.update(kind="image", image_shape=list(x.shape[1:]))
    elif x.ndim == 3:
        info.update(kind="image", image_shape=[1, *x.shape[1:]])
    else:
        info.update(kind="tabular", features=int(np.prod(x.shape[1:])))
    return info


def _model_outputs(model, model_file: Path, project_dir: Path) -> int | None:
    """How many classes the model outputs: one forward pass on uploaded data when there is
    some, else the out_features of its last nn.Linear; None when neither tells. Called where
    the model is built (a child process in the app), so data uploads never import user code:
    they read the number from the draft."""
    from torch import nn
    draft = read_draft(project_dir)
    for role in ("train", "query"):
        if draft.get(role) and (project_dir / draft[role]).is_file():
            try:
                return fit_input(model_file, project_dir / draft[role], project_dir=project_dir)[1]
            except DiffinError:
                return None
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return int(last[-1].out_features) if last else None


def _check_fits_data(project_dir: Path, role: str, info: dict, label: str, classes: int | None) -> None:
    """At upload time: labels in 0..classes-1 and the same sample shape as the other split."""
    if classes is not None and (info["num_labels"] > classes or info.get("min_label", 0) < 0):
        bad = info["num_labels"] - 1 if info["num_labels"] > classes else info["min_label"]
        raise DiffinError(f"label {bad} is out of range: the model has {classes} classes (0..{classes - 1})", label)
    other = {"train": "query", "query": "train"}.get(role)
    theirs = read_draft(project_dir).get(f"{other}_info", {}).get("sample_shape")
    if other and theirs is not None and info["sample_shape"] != theirs:
        raise DiffinError(f"{role} samples have shape {info['sample_shape']} but the {other} data has {theirs}",
                          label)


def _current_model(project_dir: Path):
    draft = read_draft(project_dir)
    if draft.get("model") and (project_dir / draft["model"]).is_file():
        try:
            return build_model_file(project_dir / draft["model"], draft["model"])
        except DiffinError:
            return None
    return None


# --- storing one upload --------------------------------------------------------------------
def store_upload(project_dir: str | Path, role: str, name: str, fileobj) -> str:
    """Check an uploaded file and move it into the project; returns a one-line success message.

    ``fileobj`` is a binary file object (Streamlit's UploadedFile works). Any problem raises a
    DiffinError "<name>: <problem>" and leaves the project folder unchanged.
    """
    project_dir = Path(project_dir)
    name = Path(str(name)).name
    if role not in ROLES:
        raise DiffinError(f"unknown upload role {role!r}")
    suffix = Path(name).suffix.lower()
    if suffix not in SUFFIXES[role]:
        raise DiffinError(f"wrong kind of file here: expected {WHAT[role]}", name)
    project_dir.parent.mkdir(parents=True, exist_ok=True)
    # the pid in the name lets atomic.clean_staging tell a crashed upload's leftovers from a live one
    staging = Path(tempfile.mkdtemp(prefix=f".diffin-upload-{os.getpid()}-", dir=project_dir.parent))
    try:
        tmp = staging / name
        with open(tmp, "wb") as out:
            if hasattr(fileobj, "seek"):
                fileobj.seek(0)
            shutil.copyfileobj(fileobj, out, 1 << 20)
        if tmp.stat().st_size == 0:
            raise DiffinError("the file is empty (0 bytes)", name)
        return {"model": _store_model, "checkpoint": _store_checkpoint, "tokenizer": _store_tokenizer,
                "modules": _store_modules}.get(role, _store_data)(
            project_dir, role, name, tmp, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _store_modules(project_dir: Path, role, name, tmp: Path, staging: Path) -> str:
    """Python files model.py imports: a .py placed beside it, or a .zip of .py files and
    package folders (safezip limits; nothing but .py files, no model.py inside). Not run here:
    they run when model.py is built (in a child process in the app)."""
    if tmp.suffix.lower() == ".py":
        if not _MODULE_NAME.match(name) or name in _RESERVED:
            raise DiffinError("is not a plain module name (letters, digits, _; not model.py): model.py could "
                              "not import it", name)
        _check_python(tmp, name)
        _place(project_dir, tmp, name)
        return f"{name}: module saved beside model.py"
    from diffin_core.workspace.safezip import safe_extract
    out = safe_extract(tmp, staging / "modules", max_total_bytes=50_000_000, max_files=2_000)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    for f in files:
        rel = f.relative_to(out)
        if f.suffix != ".py" or not all(_MODULE_NAME.match(part + ".py") for part in rel.with_suffix("").parts) \
                or str(rel) in _RESERVED:
            raise DiffinError(f"holds {str(rel)!r}: only .py modules and package folders may be in it "
                              "(and no model.py)", name)
        _check_python(f, f"{name}/{rel}")
    if not files:
        raise DiffinError("holds no .py file", name)
    for f in files:
        _place(project_dir, f, str(f.relative_to(out)))
    return f"{name}: {len(files)} module file(s) saved beside model.py"


def _check_python(path: Path, label: str) -> None:
    try:
        compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:
        raise DiffinError(f"is not valid Python ({type(e).__name__}: {e})", label) from None


def _place(project_dir: Path, src: Path, rel: str) -> None:
    dest = project_dir / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest)


def _store_model(project_dir: Path, role, name, tmp: Path, staging) -> str:
    if tmp.suffix == ".py":
        target = "model.py"
    else:
        target = "model.pt2"
    model = build_model_file(tmp, name, project_dir)
    draft = read_draft(project_dir)
    for f in draft.get("checkpoints", {}):  # say so now if the checkpoints don't fit
        check_checkpoint(project_dir / "checkpoints" / f, f"{name} vs {f}", model)
        break
    outputs = _model_outputs(model, tmp, project_dir)
    for role in ("train", "query"):  # and now if the data's labels don't fit its outputs
        info = draft.get(f"{role}_info", {})
        if draft.get(role) and outputs is not None and info.get("num_labels", 0) > outputs:
            raise DiffinError(f"the model has {outputs} outputs but the {role} data has label "
                              f"{info['num_labels'] - 1} (labels must be 0..{outputs - 1})", name)
    _place(project_dir, tmp, target)
    other = project_dir / ("model.pt2" if target == "model.py" else "model.py")
    other.unlink(missing_ok=True)
    draft["model"] = target
    draft["model_outputs"] = outputs
    _write_draft(project_dir, draft)
    params = sum(p.numel() for p in model.parameters())
    return f"{name}: model OK ({type(model).__name__}, {params:,} parameters)"


def _store_tokenizer(project_dir: Path, role, name, tmp: Path, staging: Path) -> str:
    """A Hugging Face tokenizer into <project>/tokenizer/ (replacing one there), checked by
    loading it with AutoTokenizer from local files only."""
    from diffin_core.project.text import has_tokenizer
    folder = staging / "tokenizer"
    if tmp.suffix.lower() == ".zip":
        from diffin_core.workspace.safezip import safe_extract
        try:
            root = Path(safe_extract(tmp, staging / "unzipped"))
        except DiffinError as e:
            raise DiffinError(e.problem, name) from None
        found = [d for d in [root, *sorted(p for p in root.rglob("*") if p.is_dir())] if has_tokenizer(d)]
        if not found:
            raise DiffinError("the zip holds no tokenizer (tokenizer.json, tokenizer_config.json or vocab.txt)", name)
        shutil.move(str(found[0]), folder)
    else:
        folder.mkdir()
        shutil.move(str(tmp), folder / "tokenizer.json")
    return _place_tokenizer(project_dir, folder, name)


TOKENIZER_FOLDER_FILES, TOKENIZER_FOLDER_BYTES = 200, 500_000_000


def store_tokenizer_folder(project_dir: str | Path, files) -> str:
    """A Hugging Face tokenizer uploaded as its folder (Setup's folder picker): ``files`` are
    (name, binary file object) pairs, each name the file's path inside the chosen folder
    (``my-tokenizer/tokenizer.json``; Streamlit's directory upload names them so). The folder
    holding the tokenizer files (the chosen one or one inside it) becomes <project>/tokenizer/,
    checked by loading it with AutoTokenizer from local files only; any problem is one line
    naming the folder and leaves the project unchanged."""
    from diffin_core.project.text import has_tokenizer
    project_dir = Path(project_dir)
    files = list(files)
    parts = [Path(str(n).replace("\\", "/")).parts for n, _f in files]
    label = (parts[0][0] if parts and len(parts[0]) > 1 else "the tokenizer folder")
    if not files:
        raise DiffinError("no files were uploaded", label)
    if len(files) > TOKENIZER_FOLDER_FILES:
        raise DiffinError(f"{len(files):,} files: a tokenizer folder holds a few (at most "
                          f"{TOKENIZER_FOLDER_FILES})", label)
    project_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".diffin-upload-{os.getpid()}-", dir=project_dir.parent))
    try:
        root, total = staging / "folder", 0
        for rel, (name, fileobj) in zip(parts, files):
            if not rel or any(p in ("", ".", "..") or p.startswith("/") for p in rel) or Path(*rel).is_absolute():
                raise DiffinError(f"{name!r} is not a path inside the folder", label)
            dest = root.joinpath(*rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if hasattr(fileobj, "seek"):
                fileobj.seek(0)
            with open(dest, "wb") as out:
                shutil.copyfileobj(fileobj, out, 1 << 20)
            total += dest.stat().st_size
            if total > TOKENIZER_FOLDER_BYTES:
                raise DiffinError(f"over {TOKENIZER_FOLDER_BYTES // 1_000_000} MB: not a tokenizer folder", label)
        found = [d for d in [root, *sorted(p for p in root.rglob("*") if p.is_dir())] if has_tokenizer(d)]
        if not found:
            raise DiffinError("the folder holds no tokenizer (tokenizer.json, tokenizer_config.json or vocab.txt)",
                              label)
        shutil.move(str(found[0]), staging / "tokenizer")
        return _place_tokenizer(project_dir, staging / "tokenizer", label)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _place_tokenizer(project_dir: Path, folder: Path, name: str) -> str:
    from diffin_core.project.text import load_tokenizer
    try:
        tok = load_tokenizer(folder)
    except DiffinError as e:
        raise DiffinError(e.problem, name) from None
    old = project_dir / "tokenizer"
    if old.exists():
        shutil.rmtree(old)
    _place(project_dir, folder, "tokenizer")
    draft = read_draft(project_dir)
    draft["tokenizer"] = "tokenizer"
    _write_draft(project_dir, draft)
    return f"{name}: tokenizer OK ({type(tok).__name__}, {len(tok):,} tokens)"


def _checkpoint_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES
                  and not any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(folder).parts))


def _store_checkpoint(project_dir: Path, role, name, tmp: Path, staging: Path) -> str:
    if tmp.suffix.lower() == ".zip":
        from diffin_core.workspace.safezip import safe_extract
        try:
            files = _checkpoint_files(safe_extract(tmp, staging / "unzipped"))
        except DiffinError as e:
            raise DiffinError(e.problem, name) from None
        if not files:
            raise DiffinError("the zip holds no .safetensors/.pt/.pth checkpoint", name)
        if len({f.name for f in files}) != len(files):
            raise DiffinError("two checkpoints in the zip share a file name", name)
    else:
        files = [tmp]
    model = _current_model(project_dir)
    found = {f.name: check_checkpoint(f, f"{name}/{f.name}" if f is not tmp else name, model) for f in files}
    for f in files:
        _place(project_dir, f, f"checkpoints/{f.name}")
    draft = read_draft(project_dir)
    draft.setdefault("checkpoints", {}).update(found)
    _write_draft(project_dir, draft)
    known = sum(v["step"] is not None and v["lr"] is not None for v in found.values())
    return (f"{name}: {len(found)} checkpoint(s) OK; step and lr read from {known} of them"
            + ("" if known == len(found) else " (fill in the rest in the table)"))


def _store_data(project_dir: Path, role: str, name: str, tmp: Path, staging: Path) -> str:
    draft = read_draft(project_dir)
    extra = {}
    if tmp.suffix.lower() == ".zip":
        from diffin_core.workspace.safezip import read_imagefolder_zip
        try:
            x, y, label_names, files = read_imagefolder_zip(tmp)
        except DiffinError as e:
            raise DiffinError(e.problem, name) from None
        known = draft.get("label_names")
        if known and known != label_names:
            index = {n: i for i, n in enumerate(known)}
            missing = [n for n in label_names if n not in index]
            if missing:
                raise DiffinError(f"class folder {missing[0]!r} is not among the classes {known}", name)
            y = np.array([index[label_names[i]] for i in y], dtype=np.int64)
            label_names = known
        npz = staging / f"{role}.npz"
        with atomic_path(npz) as t, open(t, "wb") as fh:   # files: each row's image in the zip
            np.savez_compressed(fh, x=x, y=y, files=np.array(files, dtype=str))
        info = split_info(x, y)          # from the array just written: not loaded a second time
        del x
        images, tmp, extra = tmp, npz, {"label_names": label_names}
    else:
        images, info = None, check_data(tmp, name)
    _check_fits_data(project_dir, role, info, name, draft.get("model_outputs") if draft.get("model") else None)
    rel = f"data/{role}{tmp.suffix.lower()}"
    # the original ImageFolder zip stays beside the npz, so an export can copy its files as they were
    kept = project_dir / "data" / f"{role}{IMAGES_SUFFIX}"
    if images is not None:
        _place(project_dir, images, f"data/{role}{IMAGES_SUFFIX}")
    else:
        kept.unlink(missing_ok=True)
    _place(project_dir, tmp, rel)
    old = draft.get(role)
    if old and old != rel:
        (project_dir / old).unlink(missing_ok=True)
    draft[role] = rel
    draft[f"{role}_info"] = info
    draft.update(extra)
    _write_draft(project_dir, draft)
    shape = (f"images {info['image_shape']}" if info["kind"] == "image" else
             f"texts in column {info['text_column']!r}, labels {info['classes'] or 'as indices'}"
             if info["kind"] == "text" else f"{info['features']} features")
    return f"{name}: {role} data OK ({info['n']:,} samples, {shape})"


# --- finishing -----------------------------------------------------------------------------
def checkpoint_table(project_dir: str | Path) -> pd.DataFrame:
    """One row per uploaded checkpoint: file, step, lr (NaN where the file did not say)."""
    found = read_draft(project_dir).get("checkpoints", {})
    rows = [{"file": f, "step": v.get("step"), "lr": v.get("lr")} for f, v in found.items()]
    df = pd.DataFrame(rows, columns=["file", "step", "lr"])
    df["step"] = pd.to_numeric(df["step"]).astype("Float64")
    df["lr"] = pd.to_numeric(df["lr"]).astype("Float64")
    return df.sort_values(["step", "file"], na_position="last").reset_index(drop=True)


def fit_input(model_file: Path, data_file: Path, image_shape=None,
              project_dir: Path | None = None) -> tuple[list[int] | None, int]:
    """(image shape or None for tabular, number of classes): the sample shape the model accepts.

    Tries ``image_shape`` when given, else the data's own shape, then square 1- or 3-channel
    images for flat rows (the MNIST case)."""
    import torch
    x = load_split(data_file).x[:2]
    model = build_model_file(model_file, model_file.name, project_dir).eval()
    feats = int(np.prod(x.shape[1:]))
    own = [1, *x.shape[1:]] if x.ndim == 3 else list(x.shape[1:]) if x.ndim == 4 else None
    squares = []
    for c in (1, 3):
        side = int(round((feats / c) ** 0.5))
        if c * side * side == feats:
            squares.append([c, side, side])
    tries = [list(image_shape)] if image_shape else [own] if own else [None, *squares]
    for shape in tries:
        try:
            if shape and int(np.prod(shape)) != feats:
                continue
            with torch.no_grad():
                out = model(torch.as_tensor(x.reshape(len(x), *(shape or [feats]))))
            if out.ndim == 2:
                return shape, int(out.shape[1])
        except Exception:
            continue
    raise DiffinError(f"the model does not accept samples of shape {list(x.shape[1:])}"
                      + ("" if image_shape else "; set the image shape C,H,W"), data_file.name)


def missing_parts(project_dir: str | Path) -> list[str]:
    draft = read_draft(project_dir)
    need = [("model", "a model"), ("checkpoints", "checkpoints"), ("train", "train data"), ("query", "query data")]
    return [what for key, what in need if not draft.get(key)]


def finish(project_dir: str | Path, table: pd.DataFrame, image_shape: list[int] | None = None,
           name: str | None = None, max_length: int = 128, brief: bool = False) -> list[str]:
    """Write manifest.json and diffin.toml from the draft and the step/lr ``table``; returns the
    problems (empty = the project loads). With problems, the previous files are put back.
    ``brief``: the problems name files without their folders (the app's Setup page)."""
    from diffin_core.project.folder import CONFIG_NAME, Project
    project_dir = Path(project_dir)
    draft = read_draft(project_dir)
    missing = missing_parts(project_dir)
    if missing:
        return [f"still missing: {', '.join(missing)}"]
    ckpts = []
    for row in table.itertuples():
        if pd.isna(row.step) or pd.isna(row.lr):
            return [f"{row.file}: fill in its step and learning rate in the table"]
        ckpts.append(Checkpoint(str(row.file), int(row.step), float(row.lr)))
    info = draft["train_info"]
    if info.get("kind") == "text":      # the model is checked by Project.validate below (tokenised data)
        shape, classes, kind = None, info["num_labels"], "text"
    else:
        try:
            shape, classes = fit_input(project_dir / draft["model"], project_dir / draft["train"], image_shape)
        except DiffinError as e:
            return [str(e)]
        kind = "image" if shape else "tabular"
    lines = [f'[project]\nname = {json.dumps(name or project_dir.name)}\n',
             "[model]\n" + ('factory = "model.py:build"' if draft["model"] == "model.py" else 'program = "model.pt2"')
             + '\nloss = "cross_entropy"\n',
             f'[data]\ntrain = "{draft["train"]}"\nquery = "{draft["query"]}"\nkind = "{kind}"\nnum_classes = {classes}']
    if kind == "text":                  # tokenised once at the first load, by the tokenizer uploaded or trained
        lines[-1] += (f"\ntext_column = {json.dumps(info['text_column'])}\nlabel_column = \"label\""
                      f"\ntokenizer = \"tokenizer\"\nmax_length = {int(max_length)}\ntruncation = true")
        if info.get("classes") and not draft.get("label_names"):
            lines[-1] += f"\nlabel_names = {json.dumps(info['classes'])}"
    if shape:
        lines[-1] += f"\nimage_shape = {json.dumps([int(s) for s in shape])}"
    if draft.get("label_names"):
        lines[-1] += f"\nlabel_names = {json.dumps(draft['label_names'])}"
    lines[-1] += "\n"
    lines.append('[checkpoints]\nmanifest = "checkpoints/manifest.json"\n')
    files = {CONFIG_NAME: "\n".join(lines),
             "checkpoints/manifest.json": Manifest(int(info["n"]), ckpts).to_json()}
    backup = {rel: (project_dir / rel).read_bytes() if (project_dir / rel).is_file() else None for rel in files}
    for rel, text in files.items():
        write_text(project_dir / rel, text)
    try:
        problems = Project(project_dir).validate(brief=brief)
    except DiffinError as e:
        problems = [e.brief() if brief else str(e)]
    except Exception as e:  # a user model can fail in many ways
        problems = [f"{project_dir.name}: the project does not load ({type(e).__name__}: {e})"]
    problems = list(dict.fromkeys(problems))   # train, query and manifest can fail on the same file
    if problems:
        for rel, old in backup.items():
            if old is None:
                (project_dir / rel).unlink(missing_ok=True)
            else:
                write_text(project_dir / rel, old.decode())
    return problems
