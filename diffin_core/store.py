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
    def from_files(cls, flatten, paths: list[str | Path], device, dtype=torch.float32, keep: int = 1):
        """Checkpoint files (checked beforehand); each read on demand with weights-only loaders."""
        from .checkpoints import read_state
        return cls(flatten, [lambda p=p: read_state(p)[0] for p in paths], device, dtype, keep)

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
