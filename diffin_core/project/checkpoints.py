"""Checkpoints: the manifest, safe loading (safetensors, or .pt with weights_only=True), the Recorder.

manifest.json: {"train_size": N, "optimizer": "SGD", "momentum": 0.0,
                "checkpoints": [{"file": "ckpt_000.safetensors", "step": 40, "lr": 0.1}, ...]}
step = the global optimiser step at which the weights were saved; lr = the learning rate of the
update taken from those weights. The last checkpoint (highest step) is the model being explained.

Optional keys (written by the Recorder; manifests without them still score, approximated, with
one warning line):
  top level   "dampening", "nesterov", "weight_decay", "decoupled_weight_decay" (bool),
              "betas" [b1, b2], "eps", "amsgrad"       the optimiser's hyper-parameters
              "batch_size"                               samples per step (the first training
                                                         forward's batch, read by a forward hook)
              "step_lrs": "step_lrs.npy"                 float64 (T,): the lr of every optimiser
                                                         step s = 0..T-1 (any schedule, exact)
  checkpoint  "exp_avg_sq": "ckpt_000040.exp_avg_sq.safetensors"   Adam/AdamW: the optimiser's
              second moments (one tensor per parameter name; metadata "step" = Adam's step count
              for bias correction, "checkpoint_step" = the checkpoint's step). For the step-0
              checkpoint it holds the state after the first step (the D of that step).
  checkpoint  "exp_avg": "ckpt_000040.exp_avg.safetensors"   Adam/AdamW: the first moments, the
              same layout and metadata as exp_avg_sq (written beside it by the Recorder)
  checkpoint  "momentum_buffer": "ckpt_000040.momentum_buffer.safetensors"   SGD with momentum:
              torch's momentum buffers at the checkpoint (same layout; none for the step-0
              checkpoint, where torch has none yet). With the batch order, diffin replays SGD's
              weights step by step from each checkpoint (sgd_batches.py)
  top level   "batch_order": "batch_order.npz"           the training-split rows of every
              optimiser step's batch: int64 arrays "ids" (all batches concatenated) and
              "offsets" (T+1,), batch s = ids[offsets[s]:offsets[s+1]] (rows 0..N-1 of the
              training split). Written by the Recorder when every step has its ids
              (rec.track(loader) or rec.step(batch_ids=...)); rewritten atomically at each
              checkpoint, so a killed run's manifest and batch order agree up to its last one.
              With it and exp_avg, diffin replays Adam's moments step by step (adam_batches.py).
  top level   "param_groups": [{"params": [names], "frozen": bool, <the group's hyper-parameters>}]
              every optimiser param group (any torch.optim class); "frozen": requires_grad False
  top level   "group_steps": "group_steps.npz"           float64 arrays "lr", "weight_decay",
              "momentum" (T, G): every step's value per group (momentum: SGD's, or Adam's beta1)
  top level   "clip": {"max_norm", "norm_type", "all_params", "factors": "clip_factors.npy"}
              rec.clip_grad_norm_'s factor min(1, max_norm / (norm + 1e-6)) of every step (T,)
  top level   "detected_clipping": {"max_norm", "steps"}  steps seen at one exact gradient norm
              without rec.clip_grad_norm_ (clipping not recorded: scoring says so)
  top level   "loss": {"name": "cross_entropy", "label_smoothing", "ignore_index", "weight"}
              Recorder(..., loss=nn.CrossEntropyLoss(...)); another loss: {"name", "known": false}
  top level   "rng": {"device", "files": ["rng_000038.npz", ...], "forwards", "bytes"}   the random
              generator states of every training forward that drew random numbers (dropout):
              arrays "step", "rows" (F,), "cpu" (F, 5056) uint8 and "cuda" (F, 16) (a CUDA model)
              at the forward's start, "after" (F,) a hash of the states it left; one file per
              checkpoint interval. diffin redraws each step's dropout masks from them
              (engine/dropout.py)
Old manifests without these keys still read; the step_lrs and checkpoint lrs are the first
trainable group's.
"""
from __future__ import annotations

import copy
import json
import math
import pickle
import re
import zipfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import torch
from torch import nn

from diffin_core.project.atomic import atomic_path, write_text
from diffin_core.errors import DiffinError

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")


RECIPE_KEYS = {"dampening": float, "nesterov": bool, "weight_decay": float, "decoupled_weight_decay": bool,
               "betas": list, "eps": float, "amsgrad": bool, "batch_size": float}


STATE_KEYS = ("exp_avg_sq", "exp_avg", "momentum_buffer")     # optimiser state files beside a checkpoint


@dataclass
class Checkpoint:
    file: str
    step: int
    lr: float
    exp_avg_sq: str | None = None     # Adam's second moments beside the checkpoint (optional)
    exp_avg: str | None = None        # Adam's first moments beside the checkpoint (optional)
    momentum_buffer: str | None = None    # SGD's momentum buffers beside the checkpoint (optional)

    def to_dict(self) -> dict:
        out = {"file": self.file, "step": self.step, "lr": self.lr}
        for key in STATE_KEYS:
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out


@dataclass
class Manifest:
    train_size: int | None
    checkpoints: list[Checkpoint]
    optimizer: str = "SGD"
    momentum: float = 0.0
    path: str = ""
    extra: dict = field(default_factory=dict)     # the optional recipe keys present (RECIPE_KEYS)
    step_lrs: str | None = None                   # side file with every step's lr
    batch_order: str | None = None                # side file with every step's batch (rows)

    def to_json(self) -> str:
        out = {"train_size": self.train_size, "optimizer": self.optimizer, "momentum": self.momentum,
               **self.extra}
        if self.step_lrs:
            out["step_lrs"] = self.step_lrs
        if self.batch_order:
            out["batch_order"] = self.batch_order
        out["checkpoints"] = [c.to_dict() for c in self.checkpoints]
        return json.dumps(out, indent=1)

    def recipe_dict(self) -> dict:
        """The top-level keys a Recipe is read from (recipe.Recipe.from_manifest)."""
        return {"optimizer": self.optimizer, "momentum": self.momentum, **self.extra}


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise DiffinError("checkpoint manifest not found", path)
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiffinError(f"not valid JSON ({e})", path) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("checkpoints"), list) or not raw["checkpoints"]:
        raise DiffinError("needs a non-empty list 'checkpoints'", path)
    ckpts = []
    for i, c in enumerate(raw["checkpoints"]):
        if not isinstance(c, dict):
            raise DiffinError(f"checkpoint {i} is not an object", path)
        for key in ("file", "step", "lr"):
            if key not in c:
                raise DiffinError(f"checkpoint {i} ({c.get('file', '?')}) has no {key!r}", path)
        try:
            step, lr = int(c["step"]), float(c["lr"])
        except (TypeError, ValueError):
            raise DiffinError(f"checkpoint {i} has a non-numeric step or lr", path) from None
        if step < 0 or not lr >= 0:
            raise DiffinError(f"checkpoint {i} needs step >= 0 and lr >= 0", path)
        moments = []
        for key in STATE_KEYS:
            name = c.get(key)
            if name is not None and (not isinstance(name, str) or not name):
                raise DiffinError(f"checkpoint {i} has an {key!r} that is not a file name", path)
            moments.append(name)
        ckpts.append(Checkpoint(str(c["file"]), step, lr, *moments))
    steps = [c.step for c in ckpts]
    if len(set(steps)) != len(steps):
        raise DiffinError("two checkpoints share a step", path)
    ckpts.sort(key=lambda c: c.step)
    extra = {}
    for key, kind in RECIPE_KEYS.items():
        if key not in raw:
            continue
        v = raw[key]
        ok = (isinstance(v, bool) if kind is bool else
              isinstance(v, list) and len(v) == 2 and all(_number(b) for b in v) if kind is list else _number(v))
        if not ok:
            raise DiffinError(f"{key!r} must be {'true/false' if kind is bool else 'two numbers' if kind is list else 'a number'}, "
                              f"not {v!r}", path)
        extra[key] = v
    extra.update(_structured_keys(raw, path))
    step_lrs = raw.get("step_lrs")
    if step_lrs is not None and (not isinstance(step_lrs, str) or not step_lrs):
        raise DiffinError("'step_lrs' must be the name of a .npy file beside the manifest", path)
    batch_file = raw.get("batch_order")
    if batch_file is not None and (not isinstance(batch_file, str) or not batch_file):
        raise DiffinError("'batch_order' must be the name of a .npz file beside the manifest", path)
    try:
        momentum = float(raw.get("momentum", 0.0) or 0.0)
    except (TypeError, ValueError):
        raise DiffinError(f"'momentum' must be a number, not {raw.get('momentum')!r}", path) from None
    return Manifest(raw.get("train_size"), ckpts, str(raw.get("optimizer", "SGD")), momentum, str(path),
                    extra, step_lrs, batch_file)


def _structured_keys(raw: dict, path) -> dict:
    """The optional structured recipe keys (param_groups, group_steps, clip, detected_clipping,
    loss), checked: one-line DiffinError naming the key when malformed."""
    out = {}
    groups = raw.get("param_groups")
    if groups is not None:
        if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                   and all(isinstance(n, str) for n in g["params"]) for g in groups):
            raise DiffinError("'param_groups' must be a list of objects, each with a list of parameter names "
                              "'params'", path)
        out["param_groups"] = groups
    for key in ("group_steps",):
        v = raw.get(key)
        if v is not None:
            if not isinstance(v, str) or not v:
                raise DiffinError(f"{key!r} must be the name of a file beside the manifest", path)
            out[key] = v
    clip = raw.get("clip")
    if clip is not None:
        if not (isinstance(clip, dict) and _number(clip.get("max_norm")) and isinstance(clip.get("factors"), str)):
            raise DiffinError("'clip' must be an object with a number 'max_norm' and a file name 'factors'", path)
        out["clip"] = clip
    rng = raw.get("rng")
    if rng is not None:
        if not (isinstance(rng, dict) and isinstance(rng.get("files"), list) and rng["files"]
                and all(isinstance(f, str) and f for f in rng["files"])):
            raise DiffinError("'rng' must be an object with a non-empty list of file names 'files'", path)
        out["rng"] = rng
    for key in ("detected_clipping", "loss"):
        v = raw.get(key)
        if v is not None:
            if not isinstance(v, dict):
                raise DiffinError(f"{key!r} must be an object", path)
            out[key] = v
    return out


def _side_array(manifest: "Manifest", name: str, what: str):
    src = Path(manifest.path).parent / name
    if not src.is_file():
        raise DiffinError(f"the {what} file {name!r} named by the manifest is missing", Path(manifest.path))
    try:
        with open(src, "rb") as fh:
            out = np.load(fh, allow_pickle=False)
            if isinstance(out, np.lib.npyio.NpzFile):
                with out:
                    out = {k: out[k] for k in out.files}
            return out, src
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DiffinError(f"not a readable numpy file ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})",
                          src) from None


def load_group_steps(manifest: "Manifest") -> dict | None:
    """Every step's per-group hyper-parameters: {"lr", "weight_decay", "momentum"} each (T, G)
    float64 (momentum: SGD's momentum or Adam's beta1), cut to the last checkpoint's step; None
    when the manifest records none. Refused in one line when it disagrees with param_groups."""
    name = manifest.extra.get("group_steps")
    if not name:
        return None
    z, src = _side_array(manifest, name, "per-group step")
    try:
        out = {k: np.asarray(z[k], dtype=np.float64) for k in ("lr", "weight_decay", "momentum")}
    except (KeyError, ValueError, TypeError, IndexError):
        raise DiffinError("needs float arrays 'lr', 'weight_decay' and 'momentum' (steps x groups)", src) from None
    last = max(manifest.checkpoints[-1].step, 1)
    groups = manifest.extra.get("param_groups") or []
    for k, a in out.items():
        if a.ndim != 2 or len(a) < manifest.checkpoints[-1].step or (groups and a.shape[1] != len(groups)):
            raise DiffinError(f"{k!r} must be (steps >= {manifest.checkpoints[-1].step}, groups = {len(groups)}), "
                              f"got {list(a.shape)}", src)
        if not np.isfinite(a).all() or (k == "lr" and (a < 0).any()):
            raise DiffinError(f"{k!r} must be finite{' and >= 0' if k == 'lr' else ''}", src)
        out[k] = a[:last]
    return out


def load_clip_factors(manifest: "Manifest") -> np.ndarray | None:
    """The per-step gradient clip factors (T,) in (0, 1] (rec.clip_grad_norm_), or None."""
    clip = manifest.extra.get("clip")
    if not clip:
        return None
    a, src = _side_array(manifest, clip["factors"], "clip factor")
    last = manifest.checkpoints[-1].step
    if a.ndim != 1 or len(a) < last:
        raise DiffinError(f"needs a 1-D array of at least {last} clip factors, got shape {list(a.shape)}", src)
    a = np.asarray(a[:max(last, 1)], dtype=np.float64)
    if not (np.isfinite(a).all() and (a > 0).all() and (a <= 1).all()):
        raise DiffinError("clip factors must lie in (0, 1]", src)
    return a


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def write_manifest(path: str | Path, manifest: Manifest) -> None:
    write_text(path, manifest.to_json())


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _unpickler_reason(text: str) -> str:
    """What torch's weights_only unpickler refused, in whole words without ANSI escapes (its
    message is a paragraph of advice with terminal colour codes)."""
    text = _ANSI.sub("", text)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return f"it references {m.group(1)}"
    m = re.search(r"(Unsupported operand \d+)", text)
    return m.group(1) if m else "the weights-only unpickler refused it"


def read_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a state_dict and any metadata it carries (step, lr) without running pickled code.

    A .pt may hold a bare state_dict or a dict with "model"/"state_dict" and optional "step",
    "lr" or an "optimizer" state whose param_groups give lr.
    """
    path = Path(path)
    if not path.is_file():
        raise DiffinError("checkpoint file not found", path)
    if path.stat().st_size == 0:
        raise DiffinError("checkpoint file is empty (0 bytes)", path)
    meta: dict = {}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
            from safetensors import safe_open
            with safe_open(str(path), "pt") as fh:
                meta = dict(fh.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            raise DiffinError(f"corrupt or truncated safetensors file ({e})", path) from None
    elif path.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise DiffinError("refused: the .pt file holds pickled code or objects, not plain tensors "
                              f"({_unpickler_reason(str(e))}; diffin loads .pt only with weights_only=True: save "
                              "the model's state_dict, or convert it to .safetensors)", path) from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
            raise DiffinError(f"corrupt or truncated checkpoint ({type(e).__name__})", path) from None
        state = obj
        if isinstance(obj, dict):
            for key in ("model", "state_dict", "model_state_dict"):
                if isinstance(obj.get(key), dict):
                    state = obj[key]
                    meta = {k: obj[k] for k in ("step", "lr", "epoch") if k in obj}
                    opt = obj.get("optimizer") or obj.get("optimizer_state_dict")
                    if "lr" not in meta and isinstance(opt, dict) and opt.get("param_groups"):
                        meta["lr"] = opt["param_groups"][0].get("lr")
                    break
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise DiffinError("the checkpoint is not a state_dict of tensors", path)
    else:
        raise DiffinError(f"unsupported checkpoint format {path.suffix!r}; use .safetensors or .pt", path)
    return state, meta


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], path) -> None:
    """Raise a one-line DiffinError when ``state`` does not fit ``model`` exactly."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(OPTIONAL_BUFFER)]
    extra = [k for k in state if k not in expected and not k.endswith(OPTIONAL_BUFFER)]
    if missing:
        raise DiffinError(f"tensors don't fit the model: missing {missing[0]!r}"
                          + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""), path)
    if extra:
        raise DiffinError(f"tensors don't fit the model: unexpected {extra[0]!r}", path)
    for k, v in expected.items():
        if k not in state:
            continue
        if tuple(state[k].shape) != tuple(v.shape):
            raise DiffinError(f"tensors don't fit the model: {k!r} has shape {list(state[k].shape)}, "
                              f"the model expects {list(v.shape)}", path)
        if not torch.isfinite(state[k].float()).all():
            raise DiffinError(f"tensor {k!r} contains NaN or infinite values", path)


OPTIONAL_BUFFER = "num_batches_tracked"    # BatchNorm's counter: some exporters drop it, some add it


def complete_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with BatchNorm's num_batches_tracked filled from the model when missing and
    dropped when the model has none (only momentum=None BatchNorm reads it)."""
    expected = model.state_dict()
    out = {k: v for k, v in state.items() if k in expected}
    for k, v in expected.items():
        if k not in out and k.endswith(OPTIONAL_BUFFER):
            out[k] = v.detach().clone()
    return out


def check_step(meta: dict, c: Checkpoint, path) -> None:
    """Refuse a checkpoint whose own saved step contradicts the manifest (swapped files)."""
    if "step" not in meta:
        return
    try:
        saved = int(float(meta["step"]))
    except (TypeError, ValueError):
        return
    if saved != c.step:
        raise DiffinError(f"the file was saved at step {saved} but the manifest says step {c.step} "
                          "(swapped or renamed checkpoint files?)", path)


def load_step_lrs(manifest: Manifest) -> np.ndarray | None:
    """The lr of every optimiser step (T,) float64 from the manifest's side file, or None."""
    if not manifest.step_lrs:
        return None
    src = Path(manifest.path).parent / manifest.step_lrs
    if not src.is_file():
        raise DiffinError("the per-step lr file named by the manifest's 'step_lrs' is missing", src)
    try:
        lrs = np.load(src, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DiffinError(f"not a readable .npy array ({str(e).splitlines()[0][:80]})", src) from None
    last = manifest.checkpoints[-1].step
    if lrs.ndim != 1 or not np.issubdtype(lrs.dtype, np.number):
        raise DiffinError(f"needs a 1-D array of learning rates, got shape {list(lrs.shape)}", src)
    if len(lrs) < last:
        raise DiffinError(f"holds {len(lrs)} step lrs but the manifest's last checkpoint is at step {last}", src)
    lrs = lrs[:last].astype(np.float64)
    if not (np.isfinite(lrs).all() and (lrs >= 0).all()):
        raise DiffinError("step lrs must be finite and >= 0", src)
    return lrs


def load_exp_avg_sq(manifest: Manifest, c: Checkpoint, names: list[str],
                    key: str = "exp_avg_sq") -> tuple[torch.Tensor, int] | None:
    """(flat exp_avg_sq (P,) in ``names`` order, Adam's step count) of one checkpoint, or None
    (``key="exp_avg"``: the first moments, same layout; ``"momentum_buffer"``: SGD's buffers).

    Refused with one line when the file's checkpoint_step contradicts the manifest."""
    if not getattr(c, key):
        return None
    src = Path(manifest.path).parent / getattr(c, key)
    state, meta = read_state(src)
    if "checkpoint_step" in meta and int(float(meta["checkpoint_step"])) != c.step:
        raise DiffinError(f"the optimiser state was saved for step {meta['checkpoint_step']} but the manifest "
                          f"says step {c.step} (swapped files?)", src)
    parts = []
    for n in names:
        if n not in state:
            what = {"exp_avg_sq": "second moments", "exp_avg": "first moments"}.get(key, "momentum buffer")
            raise DiffinError(f"no {what} for parameter {n!r}", src)
        parts.append(state[n].reshape(-1).double())
    v = torch.cat(parts)
    if not (torch.isfinite(v).all() and (key != "exp_avg_sq" or (v >= 0).all())):
        raise DiffinError(f"{key} must be finite{' and >= 0' if key == 'exp_avg_sq' else ''}", src)
    return v, int(float(meta.get("step", max(c.step, 1))))


@dataclass
class BatchOrder:
    """The rows of every optimiser step's batch: batch s = ids[offsets[s]:offsets[s+1]]."""
    ids: np.ndarray          # (sum of batch sizes,) int64, training-split rows 0..N-1
    offsets: np.ndarray      # (T+1,) int64, non-decreasing, offsets[0] = 0

    def batch(self, s: int) -> np.ndarray:
        return self.ids[self.offsets[s]:self.offsets[s + 1]]


def load_batch_order(manifest: Manifest, train_size: int) -> BatchOrder | None:
    """The manifest's recorded batch order, checked against the training split, or None.

    One-line DiffinError naming the manifest when the file is missing or unreadable, holds
    fewer batches than the last checkpoint's step, an empty batch, rows outside 0..N-1, or
    leaves a batch's worth of training samples or more in no batch (a batch order of another
    split). Fewer (drop_last without shuffling): one RecipeWarning line with the count; those
    samples never touched the weights, their leave-one-out effect and the replay's influence are 0."""
    if not manifest.batch_order:
        return None
    where = Path(manifest.path)
    src = where.parent / manifest.batch_order
    if not src.is_file():
        raise DiffinError(f"the batch order file {manifest.batch_order!r} it names is missing", where)
    with open(src, "rb") as fh:
        head = fh.read(6)
    if not zipfile.is_zipfile(src):       # np.load would call any non-zip "pickled (object) data"
        what = ("a single .npy array" if head.startswith(b"\x93NUMPY") else "an empty file" if not head
                else "not a zip archive")
        raise DiffinError(f"batch order {manifest.batch_order!r} is not an .npz (it is {what}); it needs int "
                          "arrays 'ids' and 'offsets' saved with np.savez", where)
    try:
        with np.load(src, allow_pickle=False) as z:
            ids, offsets = np.asarray(z["ids"]), np.asarray(z["offsets"])
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise DiffinError(f"batch order {manifest.batch_order!r} is not an .npz with int arrays 'ids' and "
                          f"'offsets' ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})", where) from None
    if not (np.issubdtype(ids.dtype, np.integer) and np.issubdtype(offsets.dtype, np.integer)) \
            or ids.ndim != 1 or offsets.ndim != 1 or len(offsets) < 2:
        raise DiffinError(f"batch order {manifest.batch_order!r} needs 1-D int arrays 'ids' and 'offsets'", where)
    ids, offsets = ids.astype(np.int64), offsets.astype(np.int64)
    last = manifest.checkpoints[-1].step
    if offsets[0] != 0 or offsets[-1] != len(ids) or np.any(np.diff(offsets) <= 0):
        raise DiffinError(f"batch order {manifest.batch_order!r}: offsets must rise from 0 to len(ids) "
                          "(every batch non-empty)", where)
    if len(offsets) - 1 < last:
        raise DiffinError(f"batch order {manifest.batch_order!r} holds {len(offsets) - 1} batches but the last "
                          f"checkpoint is at step {last}", where)
    offsets = offsets[:max(last, 1) + 1]
    ids = ids[:offsets[-1]]
    n = int(train_size)
    if len(ids) and (ids.min() < 0 or ids.max() >= n):
        raise DiffinError(f"batch order {manifest.batch_order!r} has row ids out of range "
                          f"({int(ids.min())}..{int(ids.max())}; the training split has rows 0..{n - 1})", where)
    missing = n - len(np.unique(ids))
    if missing >= int(np.diff(offsets).max()):
        raise DiffinError(f"batch order {manifest.batch_order!r} does not cover the training set: {missing} of "
                          f"{n} samples are in no batch (recorded for another split?)", where)
    if missing:          # drop_last without shuffling: samples that never touched the weights
        import warnings
        from diffin_core.engine.recipe import RecipeWarning
        warnings.warn(RecipeWarning(f"{where}: batch order {manifest.batch_order!r} leaves {missing} of {n} training "
                                    "samples in no batch (drop_last?): their influence is 0"), stacklevel=2)
    return BatchOrder(ids, offsets)


def save_state(path: str | Path, model: nn.Module, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


class Recorder:
    """Drop-in checkpoint recorder for a training loop.

        with Recorder(project_dir, model, optimizer, train_size=len(ds), every=50) as rec:
            for x, y in loader:
                loss.backward(); optimizer.step(); scheduler.step(); rec.step()

    ``train_size`` (recommended) lets the engine check the manifest against the data.
    Saves the initial weights (step 0), every ``every`` optimiser steps, and the final weights,
    as safetensors in <project>/checkpoints with manifest.json: each checkpoint's step and lr,
    the optimiser's type and hyper-parameters (momentum, dampening, nesterov, weight decay,
    betas, eps), the lr of every optimiser step (step_lrs.npy, read by a step pre-hook, so the
    order of scheduler.step() and rec.step() does not matter) and, for Adam/AdamW, exp_avg_sq
    and exp_avg beside each checkpoint (for SGD with momentum, its momentum buffer). The engine
    models all of these exactly (see propagate.py).

    The batch order (batch_order.npz, rewritten at every checkpoint): diffin then replays
    training between checkpoints with each step's real batch (adam_batches.py, sgd_batches.py). Either wrap the loader,
    ``for x, y in rec.track(loader): ...; rec.step()`` (a torch DataLoader over the training split
    in its row order: the indices its batch sampler yields, drawn in the main process, so shuffle,
    a seeded generator, drop_last and num_workers > 0 all work), or pass them,
    ``rec.step(batch_ids=idx)``. Without either, or if any step lacks ids, no batch order is
    written and nothing else changes.
    """

    def __init__(self, project_dir, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 train_size: int | None = None, every: int = 50, folder: str = "checkpoints", loss=None):
        from diffin_core.engine.recipe import Recipe
        self.dir = Path(project_dir) / folder
        self.model, self.optimizer, self.every = model, optimizer, max(1, int(every))
        self._names = {id(p): n for n, p in model.named_parameters()}
        recipe = Recipe.from_optimizer(optimizer, self._names)
        if recipe.refused:
            import warnings
            from diffin_core.engine.recipe import RecipeWarning
            warnings.warn(RecipeWarning(f"{self.dir}: {recipe.refused}; recorded anyway (diffin and TracIn will "
                                        "refuse to score it; the loss-based methods still score)"), stacklevel=2)
        extra = {k: v for k, v in recipe.to_manifest().items() if k not in ("optimizer", "momentum")}
        if loss is not None:
            extra["loss"] = loss_settings(loss)
        self.manifest = Manifest(None if train_size is None else int(train_size), [], recipe.optimizer,
                                 recipe.momentum, extra=extra, step_lrs="step_lrs.npy")
        self.adam = recipe.adam
        live = [i for i, g in enumerate(recipe.groups) if not g.frozen]     # step_lrs / checkpoint lr: the
        self._ref = next((i for i in live if _num(optimizer.param_groups[i].get("lr")) > 0),   # first group
                         live[0] if live else 0)                                             # that trains
        self.global_step = 0
        self.lrs: list[float] = []
        self.group_rows: list[np.ndarray] = []          # per step (3, G): lr, weight decay, momentum/beta1
        self.batches: list[np.ndarray] | None = []     # every step's batch rows, while all steps give them
        self._drawn: list[np.ndarray] = []              # rows of the tracked loader's batches since the last step
        self._pending_first: Checkpoint | None = None
        self._seen = 0                                  # training samples forwarded since the last step
        self.step_samples: list[int] = []               # per step: training samples forwarded before it
        self.clip_factors: list[float] = []             # per step: the rec.clip_grad_norm_ factor (1: none)
        self._clip: dict | None = None                  # max_norm / norm_type of rec.clip_grad_norm_
        self._pending_clip: float | None = None
        self._norms: dict[float, int] = {}              # pre-step gradient norms (rounded) -> count
        self._warned_clip = False
        self._hook = (optimizer.register_step_pre_hook(self._record_lr)
                      if hasattr(optimizer, "register_step_pre_hook") else None)
        self._batch_hook = model.register_forward_pre_hook(self._record_batch)
        self.rng = _RngTap(model)          # the generator states of random training forwards (dropout)

    def _record_batch(self, module, args):
        if module.training and args and isinstance(args[0], torch.Tensor) and args[0].ndim > 0:
            self._seen += int(args[0].shape[0])

    def _group_row(self) -> np.ndarray:
        rows = []
        for g in self.optimizer.param_groups:
            mom = g.get("momentum")
            if mom is None and isinstance(g.get("betas"), (tuple, list)):
                mom = g["betas"][0]
            rows.append([_num(g.get("lr")), _num(g.get("weight_decay")), _num(mom)])
        return np.asarray(rows, dtype=np.float64).T.reshape(3, -1)

    def _record_lr(self, optimizer, *_):
        """Step pre-hook: every group's lr / weight decay / momentum of the step about to be taken,
        the samples forwarded for it (gradient accumulation), the clip factor, and the gradient
        norm (clipping by torch.nn.utils.clip_grad_norm_ leaves clipped steps at exactly max_norm)."""
        row = self._group_row()
        self.group_rows.append(row)
        self.lrs.append(float(row[0, self._ref]) if row.shape[1] else 0.0)
        self.step_samples.append(self._seen)
        if self._seen and "batch_size" not in self.manifest.extra:
            self.manifest.extra["batch_size"] = int(self._seen)        # the first step's real batch
        self._seen = 0
        self.clip_factors.append(1.0 if self._pending_clip is None else self._pending_clip)
        if self._pending_clip is None and self._clip is None and not self._warned_clip:
            self._watch_norm()
        self._pending_clip = None

    def _watch_norm(self) -> None:
        sq, any_grad = 0.0, False
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    sq += float(p.grad.detach().double().pow(2).sum())
                    any_grad = True
        if not any_grad or not sq > 0:
            return
        key = float(f"{math.sqrt(sq):.5g}")
        self._norms[key] = self._norms.get(key, 0) + 1
        if self._norms[key] >= 3 and self._norms[key] >= 0.05 * len(self.group_rows):
            import warnings
            from diffin_core.engine.recipe import RecipeWarning
            self._warned_clip = True
            self.manifest.extra["detected_clipping"] = {"max_norm": key, "steps": int(self._norms[key])}
            warnings.warn(RecipeWarning(
                f"{self.dir}: {self._norms[key]} optimiser steps so far had a gradient norm of exactly {key:g}: "
                "gradient clipping? Clip with rec.clip_grad_norm_(params, max_norm) so diffin models it"), stacklevel=3)

    def clip_grad_norm_(self, parameters, max_norm: float, norm_type: float = 2.0, **kwargs):
        """torch.nn.utils.clip_grad_norm_, recorded: the factor min(1, max_norm / (norm + 1e-6))
        it applies to the next optimiser step's gradient (clip_factors.npy). Returns torch's
        total norm. Call it where you would call torch's (after backward, before optimizer.step())."""
        params = [p for p in (parameters if not isinstance(parameters, torch.Tensor) else [parameters])]
        total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type, **kwargs)
        factor = min(1.0, float(max_norm) / (float(total) + 1e-6)) if math.isfinite(float(total)) else 1.0
        ids = {id(p) for p in params}
        every = all(id(p) in ids for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad)
        self.note_clip(factor, max_norm, norm_type, every)
        return total

    def note_clip(self, factor: float, max_norm: float, norm_type: float = 2.0, all_params: bool = True) -> None:
        """Record that the next optimiser step's gradient was scaled by ``factor`` (a clip done
        elsewhere, e.g. by a trainer: torch's factor is min(1, max_norm / (norm + 1e-6)))."""
        self._pending_clip = float(factor)
        self._clip = {"max_norm": float(max_norm), "norm_type": float(norm_type), "all_params": bool(all_params)}

    def __enter__(self) -> "Recorder":
        self.dir.mkdir(parents=True, exist_ok=True)
        self.save()
        return self

    def track(self, loader) -> "TrackedLoader":
        """``loader`` (a torch DataLoader over the training split, rows in the split's order) as an
        iterable whose batches' row indices the next rec.step() records (all batches drawn since
        the previous step, concatenated: gradient accumulation). Iterate it instead of ``loader``."""
        return TrackedLoader(self, loader)

    def step(self, batch_ids=None) -> None:
        """Call once after every optimizer.step(); ``batch_ids``: that step's training-split rows,
        with gradient accumulation the union of its micro-batches' rows (default: those of the
        batches a ``track``-ed loader yielded since the previous step, all micro-batches)."""
        if batch_ids is None and self._drawn:
            batch_ids = np.concatenate(self._drawn)
        self._drawn = []
        if self.batches is not None:
            if batch_ids is None:
                self.batches = None
            else:
                ids = np.asarray(batch_ids.cpu() if isinstance(batch_ids, torch.Tensor) else batch_ids,
                                 dtype=np.int64).reshape(-1)
                self.batches.append(ids)
                seen = self.step_samples[-1] if len(self.step_samples) > self.global_step else 0
                if seen > len(ids) and not getattr(self, "_warned_accum", False):
                    import warnings
                    from diffin_core.engine.recipe import RecipeWarning
                    self._warned_accum = True
                    warnings.warn(RecipeWarning(
                        f"{self.dir}: step {self.global_step}: the model forwarded {seen} training samples for it but "
                        f"batch_ids names {len(ids)} (gradient accumulation? pass the union of the micro-batches' ids, "
                        "or iterate rec.track(loader))"), stacklevel=2)
                if self.global_step == 0:
                    self.manifest.extra["batch_size"] = int(len(ids))
        self.global_step += 1
        self.rng.step = self.global_step
        if self._hook is None:
            self._record_lr(self.optimizer)
        if self._pending_first is not None:            # step 0's D is the one of the first step
            self._save_exp_avg_sq(self._pending_first)
            self._pending_first = None
            self._write_manifest()
        if self.global_step % self.every == 0:
            self.save()

    def save(self) -> None:
        if self.manifest.checkpoints and self.manifest.checkpoints[-1].step == self.global_step:
            return
        groups = self.optimizer.param_groups
        lr = _num(groups[self._ref]["lr"]) if len(groups) > self._ref else 0.0
        name = f"ckpt_{self.global_step:06d}.safetensors"
        save_state(self.dir / name, self.model, {"step": self.global_step, "lr": lr})
        c = Checkpoint(name, self.global_step, lr)
        self.manifest.checkpoints.append(c)
        if self.adam:
            if self.global_step == 0:
                self._pending_first = c
            else:
                self._save_exp_avg_sq(c)
        elif self.global_step > 0 and self._sgd_momentum():
            self._save_state(c, ("momentum_buffer",))
        self._write_batch_order()          # so a run killed after this checkpoint keeps its order
        self._write_rng()
        self._write_manifest()

    def _save_exp_avg_sq(self, c: Checkpoint) -> None:
        """Adam's second and first moments now, beside checkpoint c."""
        self._save_state(c, ("exp_avg_sq", "exp_avg"))

    def _sgd_momentum(self) -> bool:
        """SGD with momentum in some trainable group: its buffers are part of the state to replay."""
        return self.manifest.optimizer == "SGD" and any(
            _num(g.get("momentum")) > 0 for g in self.optimizer.param_groups)

    def _save_state(self, c: Checkpoint, keys) -> None:
        """The optimiser state ``keys`` (exp_avg_sq, exp_avg, momentum_buffer) now, one safetensors
        file each beside checkpoint c, in float32 (zeros for parameters without that state);
        metadata "step" = the largest step count in the state (Adam's bias correction)."""
        from safetensors.torch import save_file
        step = 0
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        for _n, p in named:
            st = self.optimizer.state.get(p, {})
            if "step" in st:
                step = max(step, int(float(st["step"])))
        meta = {"step": str(step), "checkpoint_step": str(c.step)}
        for key in keys:
            ts = {}
            # SGD's buffers for every parameter (a frozen one's are zeros: it never moves), so the
            # replay finds them whichever parameters the scoring model marks trainable
            for n, p in (self.model.named_parameters() if key == "momentum_buffer" else named):
                v = self.optimizer.state.get(p, {}).get(key)
                ts[n] = (torch.zeros_like(p) if v is None else v).detach().float().cpu().contiguous()
            name = c.file.replace(".safetensors", f".{key}.safetensors")
            with atomic_path(self.dir / name) as tmp:
                save_file(ts, str(tmp), metadata=meta)
            setattr(c, key, name)

    def _write_manifest(self) -> None:
        if len(self.lrs) == self.global_step:
            with atomic_path(self.dir / "step_lrs.npy") as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, np.asarray(self.lrs, dtype=np.float64))
            self.manifest.step_lrs = "step_lrs.npy"
            if self.group_rows and len({r.shape for r in self.group_rows}) == 1:
                rows = np.stack(self.group_rows)                  # (T, 3, G)
                with atomic_path(self.dir / "group_steps.npz") as tmp:
                    with open(tmp, "wb") as fh:
                        np.savez(fh, lr=rows[:, 0], weight_decay=rows[:, 1], momentum=rows[:, 2])
                self.manifest.extra["group_steps"] = "group_steps.npz"
            if self._clip is not None:
                with atomic_path(self.dir / "clip_factors.npy") as tmp:
                    with open(tmp, "wb") as fh:
                        np.save(fh, np.asarray(self.clip_factors, dtype=np.float64))
                self.manifest.extra["clip"] = {**self._clip, "factors": "clip_factors.npy"}
        else:                                   # optimiser steps and rec.step() calls disagree
            self.manifest.step_lrs = None
            for key in ("group_steps", "clip"):
                self.manifest.extra.pop(key, None)
        write_manifest(self.dir / "manifest.json", self.manifest)

    def _write_batch_order(self) -> None:
        """batch_order.npz (atomically) when every optimiser step so far came with its batch ids;
        else none (one written at an earlier checkpoint is removed)."""
        if not self.batches or len(self.batches) != self.global_step:
            if self.manifest.batch_order:         # the manifest stops naming it first
                old, self.manifest.batch_order = self.manifest.batch_order, None
                self._write_manifest()
                (self.dir / old).unlink(missing_ok=True)
            return
        sizes = np.array([len(b) for b in self.batches], dtype=np.int64)
        with atomic_path(self.dir / "batch_order.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, ids=np.concatenate(self.batches), offsets=np.concatenate([[0], np.cumsum(sizes)]))
        self.manifest.batch_order = "batch_order.npz"

    def _write_rng(self) -> None:
        """The random training forwards since the last checkpoint, in their own rng_<step>.npz
        (atomically; earlier files are never rewritten): manifest "rng" lists them."""
        part = self.rng.take(self.global_step)
        if part is None:
            return
        name = f"rng_{self.global_step:06d}.npz"
        with atomic_path(self.dir / name) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **part)
        info = self.manifest.extra.setdefault("rng", {"device": self.rng.device, "files": [], "forwards": 0,
                                                      "bytes": 0})
        info["files"].append(name)
        info["forwards"] += int(len(part["step"]))
        info["bytes"] += int((self.dir / name).stat().st_size)
        if self.rng.device == "cuda":
            info["device"] = "cuda"

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self._write_batch_order()
            self.save()
            self._write_rng()
            self._write_manifest()
        if self._hook is not None:
            self._hook.remove()
        self._batch_hook.remove()
        self.rng.remove()
        return False


def batch_rows(args: tuple, kwargs: dict) -> int | None:
    """The number of rows of a forward call's batch (input_ids, or the first tensor argument)."""
    for v in [kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args, *kwargs.values()]:
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            return int(v.shape[0])
    return None


class _RngTap:
    """Forward hooks that keep the random generator states of every training forward (train
    mode, gradients on) that drew random numbers (dropout): the CPU state and, for a CUDA model,
    its device's, at the forward's start, with the forward's rows, its optimiser step and a hash
    of the states it left (engine/dropout.py redraws the masks from them and checks the hash).
    A forward that drew nothing costs one state comparison and is not kept."""

    def __init__(self, model: nn.Module):
        from diffin_core.engine import dropout
        self._d = dropout
        self.model, self.device = model, "cpu"
        self.pending = None
        self.kept: list[tuple] = []          # (step, rows, cpu state, cuda state or None, after-hash)
        self.step = 0
        self.hooks = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                      model.register_forward_hook(self._after, with_kwargs=True)]

    def _dev(self):
        p = next(self.model.parameters(), None)
        return None if p is None else p.device

    def _before(self, module, args, kwargs):
        self.pending = None
        if module.training and torch.is_grad_enabled():
            dev = self._dev()
            self.pending = (batch_rows(args, kwargs), self._d.get_states(dev), dev)
        return None

    def _after(self, module, args, kwargs, output):
        if self.pending is None:
            return None
        rows, before, dev = self.pending
        self.pending = None
        after = self._d.get_states(dev)
        if all(torch.equal(before[k], after[k]) for k in before):
            return None
        rows = -1 if rows is None else rows           # (unknown rows: scoring names the step)
        if "cuda" in before:
            self.device = "cuda"
        self.kept.append((self.step, rows, before["cpu"].numpy().copy(),
                          before["cuda"].cpu().numpy().copy() if "cuda" in before else None,
                          self._d.state_hash(after)))
        return None

    def take(self, step: int) -> dict | None:
        """The kept forwards of steps before ``step`` as arrays (removed from the tap), or None."""
        part = [k for k in self.kept if k[0] < step]
        self.kept = [k for k in self.kept if k[0] >= step]
        if not part:
            return None
        out = {"step": np.array([k[0] for k in part], dtype=np.int64),
               "rows": np.array([k[1] for k in part], dtype=np.int64),
               "cpu": np.stack([k[2] for k in part]).astype(np.uint8),
               "after": np.array([k[4] for k in part], dtype=np.int64)}
        if all(k[3] is not None for k in part):
            out["cuda"] = np.stack([k[3] for k in part]).astype(np.uint8)
        return out

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


def load_rng(manifest: "Manifest"):
    """The recorded random training forwards (manifest "rng", written by the Recorder) as an
    engine.dropout.ForwardStates, or None. One-line DiffinError naming a missing or malformed file."""
    info = manifest.extra.get("rng")
    if not info:
        return None
    from diffin_core.engine.dropout import ForwardStates
    cols: dict[str, list] = {"step": [], "rows": [], "cpu": [], "after": [], "cuda": []}
    for name in info["files"]:
        z, src = _side_array(manifest, name, "random generator state")
        if not isinstance(z, dict) or any(k not in z for k in ("step", "rows", "cpu", "after")):
            raise DiffinError("needs arrays 'step', 'rows', 'cpu' and 'after' (the Recorder's rng file)", src)
        n = len(z["step"])
        if not (len(z["rows"]) == n == len(z["after"]) == len(z["cpu"])) or z["cpu"].ndim != 2:
            raise DiffinError("its arrays 'step', 'rows', 'cpu' and 'after' disagree in length", src)
        for k in ("step", "rows", "cpu", "after"):
            cols[k].append(z[k])
        cols["cuda"].append(z.get("cuda"))
    cuda = None if any(c is None for c in cols["cuda"]) or not cols["cuda"] else np.concatenate(cols["cuda"])
    return ForwardStates(np.concatenate(cols["step"]).astype(np.int64), np.concatenate(cols["rows"]).astype(np.int64),
                         np.concatenate(cols["cpu"]).astype(np.uint8), cuda,
                         np.concatenate(cols["after"]).astype(np.int64), str(info.get("device", "cpu")))


def _num(v) -> float:
    try:
        return float(v.item() if isinstance(v, torch.Tensor) else v) if v is not None else 0.0
    except (TypeError, ValueError):
        return 0.0


def loss_settings(loss) -> dict:
    """The manifest's "loss" of a torch loss module (nn.CrossEntropyLoss: label_smoothing,
    weight, ignore_index, reduction); another module or function is recorded by name only,
    with "known": false (scoring then needs [model] loss in diffin.toml to state it)."""
    if isinstance(loss, nn.CrossEntropyLoss):
        out = {"name": "cross_entropy", "label_smoothing": float(loss.label_smoothing),
               "ignore_index": int(loss.ignore_index), "reduction": str(loss.reduction)}
        if loss.weight is not None:
            out["weight"] = [float(w) for w in loss.weight.detach().cpu().reshape(-1)]
        return out
    if loss is torch.nn.functional.cross_entropy:
        return {"name": "cross_entropy"}
    return {"name": getattr(loss, "__name__", type(loss).__name__), "known": False}


class _IndexTap:
    """A batch sampler that yields the wrapped one's batches and queues each batch's indices as
    it is drawn (always in the main process: DataLoader workers receive indices from it)."""

    def __init__(self, inner):
        self.inner = inner
        self.fifo: deque[np.ndarray] = deque()

    def __iter__(self):
        for batch in self.inner:
            self.fifo.append(np.asarray(batch.cpu() if isinstance(batch, torch.Tensor) else list(batch),
                                        dtype=np.int64).reshape(-1))
            yield batch

    def __len__(self) -> int:
        return len(self.inner)


class TrackedLoader:
    """A DataLoader (a shallow copy whose batch sampler is tapped; the original is untouched)
    that hands each yielded batch's row indices to its Recorder (Recorder.track)."""

    def __init__(self, rec: Recorder, loader):
        from torch.utils.data import DataLoader, IterableDataset
        if not isinstance(loader, DataLoader):
            raise DiffinError(f"Recorder.track needs a torch DataLoader, not {type(loader).__name__} "
                              "(or pass rec.step(batch_ids=...))")
        if isinstance(loader.dataset, IterableDataset) or loader.batch_sampler is None:
            raise DiffinError("Recorder.track needs a DataLoader over a map-style dataset that batches "
                              "(batch_size or batch_sampler): its indices are the training rows")
        if loader.num_workers > 0 and not getattr(loader, "in_order", True):
            raise DiffinError("Recorder.track needs in_order=True (batches in the order their indices are drawn)")
        self.rec, self.tap = rec, _IndexTap(loader.batch_sampler)
        self.loader = copy.copy(loader)
        object.__setattr__(self.loader, "batch_sampler", self.tap)   # DataLoader refuses setattr after init

    def __iter__(self):
        self.tap.fifo.clear()           # indices queued ahead by an abandoned iteration
        for batch in self.loader:
            self.rec._drawn.append(self.tap.fifo.popleft())
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.__dict__.get("loader"), name)
