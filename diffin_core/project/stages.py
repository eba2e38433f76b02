"""Named, saved, resumable stages (Kronfluence-style) of one scoring job.

    runs/.stages/<method>-<job digest>/
        settings.json              StageSettings of the job; a change wipes the folder
        plan/000.safetensors       query-side vectors of plan entry 0 (+ .json: its scalars)
        plan/000_carry.*           the query vector carried to the next checkpoint (diffin)
        scores/ckpt_000.npz        influence-only walk: checkpoint 0's contribution (N,)
        scores/rows_0_4096.npz     row-range walk: influence, self_influence, probs of rows [0, 4096)

Every file is written to a temp name and renamed, so a killed job leaves only whole items;
the next job with the same settings loads them and carries on. ``scoring.score`` deletes the
folder once the run folder is complete.

Plan entries are nested tuples / lists / dicts of tensors, numbers and diffin_core dataclasses
(e.g. lanczos.SpectralView); they are stored without pickle (safetensors + JSON) and can be read
back lazily, one checkpoint's entry at a time (``LazyPlan``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffin_core.project.atomic import atomic_path, write_text


class NotStorable(TypeError):
    """A plan entry holds something that cannot be saved without pickle (e.g. a closure)."""


@dataclass(frozen=True)
class StageSettings:
    """Everything that decides a job's stage results. Any change invalidates saved stages."""
    method: str
    settings: dict                      # ScoreSettings fields that change results (not budget/chunks)
    query_digest: str                   # the query samples
    train_digest: str                   # size and identity of the training split
    checkpoints: list = field(default_factory=list)   # [(file, size, mtime_ns, step, lr), ...]
    need_self: bool = True
    version: int = 2                    # 2: classes stored by their diffin_core.<package>.<module> path

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))

    @property
    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def array_digest(*arrays) -> str:
    """A short digest of arrays (shapes, dtypes and bytes; large arrays are sampled)."""
    h = hashlib.sha1()
    for a in arrays:
        a = np.asarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        flat = a.reshape(-1)
        if flat.size > 1_000_000:
            flat = flat[:: flat.size // 1_000_000 + 1]
        h.update(np.ascontiguousarray(flat).tobytes())
    return h.hexdigest()[:16]


# --- a pickle-free codec for plan entries ---------------------------------------------------
def encode(obj, tensors: dict, prefix: str = "t"):
    """JSON-able tree of ``obj``; tensors go into ``tensors`` under generated names."""
    if isinstance(obj, torch.Tensor):
        name = f"{prefix}{len(tensors)}"
        tensors[name] = obj.detach().contiguous()
        return {"tensor": name}
    if isinstance(obj, np.ndarray):
        name = f"{prefix}{len(tensors)}"
        tensors[name] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"ndarray": name}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    if isinstance(obj, np.generic):
        return {"value": obj.item()}
    if isinstance(obj, tuple):
        return {"tuple": [encode(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return {"list": [encode(v, tensors, prefix) for v in obj]}
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return {"dict": {k: encode(v, tensors, prefix) for k, v in obj.items()}}
    cls = type(obj)
    if dataclasses.is_dataclass(obj) and cls.__module__.startswith("diffin_core."):
        return {"dataclass": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: encode(getattr(obj, f.name), tensors, prefix)
                           for f in dataclasses.fields(obj) if f.init}}
    raise NotStorable(f"cannot store a {cls.__name__} in a stage")


def decode(tree, tensors: dict, device=None):
    if "tensor" in tree:
        t = tensors[tree["tensor"]]
        return t.to(device) if device is not None else t
    if "ndarray" in tree:
        return tensors[tree["ndarray"]].numpy()
    if "value" in tree:
        return tree["value"]
    if "tuple" in tree:
        return tuple(decode(v, tensors, device) for v in tree["tuple"])
    if "list" in tree:
        return [decode(v, tensors, device) for v in tree["list"]]
    if "dict" in tree:
        return {k: decode(v, tensors, device) for k, v in tree["dict"].items()}
    if "dataclass" in tree:
        module, qualname = tree["dataclass"].split(":")
        if not module.startswith("diffin_core."):
            raise NotStorable(f"refusing to build {tree['dataclass']} from a stage file")
        cls = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        return cls(**{k: decode(v, tensors, device) for k, v in tree["fields"].items()})
    raise NotStorable(f"unknown stage item {list(tree)}")


def save_item(path: Path, obj) -> None:
    """``obj`` -> path.safetensors (tensors) + path.json (structure), each written atomically."""
    from safetensors.torch import save_file
    tensors: dict = {}
    tree = encode(obj, tensors)
    with atomic_path(path.with_suffix(".safetensors")) as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp))
    write_text(path.with_suffix(".json"), json.dumps(tree))      # written last: marks the item whole


def load_item(path: Path, device=None):
    from safetensors.torch import load_file
    tree = json.loads(path.with_suffix(".json").read_text())
    tensors = load_file(str(path.with_suffix(".safetensors")), device=str(device) if device else "cpu")
    return decode(tree, tensors)


def has_item(path: Path) -> bool:
    return path.with_suffix(".json").is_file() and path.with_suffix(".safetensors").is_file()


class Stages:
    """The stage folder of one job. ``Stages(None, ...)`` keeps nothing (in-memory scoring)."""

    def __init__(self, root: Path | None, settings: StageSettings):
        self.settings = settings
        self.root = None if root is None else Path(root) / f"{settings.method}-{settings.digest}"
        if self.root is None:
            return
        meta = self.root / "settings.json"
        if self.root.exists():
            try:
                same = json.loads(meta.read_text()) == settings.to_dict()
            except (OSError, json.JSONDecodeError):
                same = False
            if not same:
                shutil.rmtree(self.root, ignore_errors=True)
        self._prune_stale()
        for sub in ("plan", "scores"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if not meta.is_file():
            write_text(meta, json.dumps(settings.to_dict(), indent=1))

    def _prune_stale(self) -> None:
        """Remove this method's other stage folders that no job can resume: saved for a training
        split or checkpoint files that are not the project's any more (a killed or failed job's
        stages, left behind once the checkpoints were re-recorded or the data re-uploaded).
        Folders of the same inputs with other settings stay (another job may be using them)."""
        mine = self.settings.to_dict()
        for other in self.root.parent.glob(f"{self.settings.method}-*"):
            if other == self.root or not other.is_dir():
                continue
            try:
                theirs = json.loads((other / "settings.json").read_text())
            except (OSError, json.JSONDecodeError):
                continue                            # being written right now, or not ours: leave it
            if theirs.get("method") == mine["method"] and (
                    theirs.get("train_digest") != mine["train_digest"] or theirs.get("checkpoints") != mine["checkpoints"]):
                shutil.rmtree(other, ignore_errors=True)

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def path(self, stage: str, name: str) -> Path | None:
        return None if self.root is None else self.root / stage / name

    # plan entries --------------------------------------------------------------------------
    def save_plan_entry(self, i: int, entry, carry=None) -> bool:
        """Save entry i (and the carried query state); False when the entry is not storable."""
        if self.root is None:
            return False
        try:
            save_item(self.root / "plan" / f"{i:03d}_carry", carry)
            save_item(self.root / "plan" / f"{i:03d}", entry)
        except NotStorable:
            return False
        return True

    def plan_done(self) -> int | None:
        """Number of entries when the plan stage finished, else None."""
        if self.root is None:
            return None
        done = self.root / "plan" / "done.json"
        return json.loads(done.read_text())["entries"] if done.is_file() else None

    def mark_plan_done(self, entries: int) -> None:
        if self.root is not None:
            write_text(self.root / "plan" / "done.json", json.dumps({"entries": entries}))

    def saved_plan_entries(self) -> int:
        """How many leading plan entries (with their carries) are on disk."""
        if self.root is None:
            return 0
        i = 0
        while has_item(self.root / "plan" / f"{i:03d}") and has_item(self.root / "plan" / f"{i:03d}_carry"):
            i += 1
        return i

    def lazy_plan(self, entries: int, device, keep: int) -> "LazyPlan":
        return LazyPlan([self.root / "plan" / f"{i:03d}" for i in range(entries)], device, keep)

    def load_carry(self, i: int, device):
        return load_item(self.root / "plan" / f"{i:03d}_carry", device)

    # score pieces --------------------------------------------------------------------------
    def save_scores(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        if self.root is None:
            return
        with atomic_path(self.root / "scores" / f"{name}.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

    def load_scores(self, name: str) -> dict[str, np.ndarray] | None:
        if self.root is None:
            return None
        p = self.root / "scores" / f"{name}.npz"
        if not p.is_file():
            return None
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def remove(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def remove_if_empty(self) -> None:
        """After a failed job: drop the folder when it saved nothing to resume from (only its
        settings.json), so a job that fails at once leaves no leftover behind."""
        if self.root is None or not self.root.is_dir():
            return
        saved = [p for p in self.root.rglob("*") if p.is_file() and p.name != "settings.json"]
        if not saved:
            shutil.rmtree(self.root, ignore_errors=True)
            try:
                self.root.parent.rmdir()            # runs/.stages itself when nothing else is in it
            except OSError:
                pass


class LazyPlan(Sequence):
    """Plan entries read from a stage folder on demand; at most ``keep`` stay in memory."""

    def __init__(self, paths: list[Path], device, keep: int = 1):
        self.paths, self.device, self.keep = list(paths), device, max(1, int(keep))
        self._cache: OrderedDict[int, object] = OrderedDict()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        i = range(len(self))[i]
        if i not in self._cache:
            self._cache[i] = load_item(self.paths[i], self.device)
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        self._cache.move_to_end(i)
        return self._cache[i]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]
