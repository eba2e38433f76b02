"""The checkpoint store: each checkpoint's parameter vector theta_k (P,), loaded when asked for.

A ``CheckpointStore`` is a read-only sequence (``store[k]``, ``store[-1]``, ``len(store)``)
that keeps at most ``keep`` vectors on the device (least recently used goes first) and reads
the others from their safetensors / .pt files again when needed. With ``keep >= m`` it is the
old list of thetas; with ``keep = 1`` only one checkpoint's weights are resident at a time.
``state(k)`` gives the checkpoint's whole state_dict (BatchNorm buffers included) on the device.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import torch


class StateFiles(Sequence):
    """Each checkpoint's state_dict read from its file when asked (nothing kept).

    ``files[k]`` is the full state_dict (CPU); ``files.load(k, names)`` reads only the named
    tensors (safetensors: without touching the others). ``prepare(state)`` is applied to
    every loaded state (e.g. checkpoints.complete_state)."""

    def __init__(self, paths: list[str | Path], prepare: Callable[[dict], dict] | None = None):
        self.paths = [Path(p) for p in paths]
        self.prepare = prepare or (lambda s: s)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, k: int, names=None) -> dict[str, torch.Tensor]:
        path = self.paths[k]
        if names is not None and path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), "pt") as fh:
                keys = set(fh.keys())
                return {n: fh.get_tensor(n) for n in names if n in keys}
        from diffin_core.project.checkpoints import read_state
        state = self.prepare(read_state(path)[0])
        return state if names is None else {n: state[n] for n in names if n in state}

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(len(self))[k]]
        return self.load(range(len(self))[k])


class CheckpointStore(Sequence):
    """theta_k (P,) per checkpoint in step order, on ``device`` in ``dtype``, loaded lazily."""

    def __init__(self, flatten: Callable[[dict], torch.Tensor], loaders: list[Callable[[], dict]],
                 device: torch.device, dtype: torch.dtype = torch.float32, keep: int = 1):
        self._flatten, self._loaders = flatten, list(loaders)
        self.device, self.dtype = torch.device(device), dtype
        self.keep = max(1, int(keep))
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.loads = 0                       # how many times a checkpoint was read (tests, benchmarks)

    @classmethod
    def from_states(cls, flatten, states: list[dict], device, dtype=torch.float32, keep: int | None = None):
        """In-memory state_dicts (tests, make_context): keeps every theta unless ``keep`` says less."""
        return cls(flatten, [lambda s=s: s for s in states], device, dtype, keep or len(states))

    @classmethod
    def from_files(cls, flatten, files: StateFiles, names: list[str], device, dtype=torch.float32, keep: int = 1):
        """Checkpoint files (checked beforehand); only the parameters ``names`` are read, on demand."""
        return cls(flatten, [lambda k=k: files.load(k, names) for k in range(len(files))], device, dtype, keep)

    def __len__(self) -> int:
        return len(self._loaders)

    def state(self, k: int) -> dict[str, torch.Tensor]:
        """Checkpoint k's state_dict (parameters and buffers) on the device."""
        k = range(len(self))[k]
        return {n: v.to(device=self.device, dtype=self.dtype if v.is_floating_point() else v.dtype)
                for n, v in self._loaders[k]().items()}

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(len(self))[k]]
        k = range(len(self))[k]              # negative indices, IndexError
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        raw = self._loaders[k]()
        theta = self._flatten({n: v.to(device=self.device, dtype=self.dtype) for n, v in raw.items()
                               if v.is_floating_point()})
        del raw
        self.loads += 1
        self._cache[k] = theta
        while len(self._cache) > self.keep:
            self._cache.popitem(last=False)
        return theta

    def __iter__(self):
        for k in range(len(self)):
            yield self[k]


class Lazy(Sequence):
    """``fn(k)`` for k < n, computed when asked; at most ``keep`` results kept (LRU).
    Per-checkpoint data other than theta (Adam's preconditioner) use it."""

    def __init__(self, n: int, fn: Callable[[int], object], keep: int = 1):
        self.n, self.fn, self.keep = int(n), fn, max(1, int(keep))
        self._cache: OrderedDict[int, object] = OrderedDict()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(len(self))[k]]
        k = range(len(self))[k]
        if k not in self._cache:
            self._cache[k] = self.fn(k)
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        self._cache.move_to_end(k)
        return self._cache[k]
