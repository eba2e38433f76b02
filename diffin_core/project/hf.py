"""The Hugging Face Trainer records its own run: ``DiffinCallback``.

    from diffin_core import DiffinCallback
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, ...)
    trainer.add_callback(DiffinCallback(project_dir))          # the one added line
    trainer.train()

It writes what the Recorder writes (checkpoints.py) into ``<project_dir>/checkpoints``: the
weights at step 0, every ``every`` optimiser steps and at the end (safetensors), the lr of every
optimiser step, the optimiser's type and hyper-parameters, Adam's ``exp_avg`` and ``exp_avg_sq``
beside each checkpoint, and the batch order: the training-set rows of every optimiser step,
read from the Trainer's own batch sampler as it draws them (shuffle seed, ``data_seed``,
``dataloader_drop_last``, ``group_by_length`` and gradient accumulation are all whatever the
Trainer really did: every training forward takes the next drawn batch, and an optimiser step
gets all the forwards since the previous one). Beside them, the Trainer's clipping
(``max_grad_norm`` and every step's gradient norm before clipping, so the clip factor
``min(1, max_grad_norm / (norm + 1e-6))`` of each step is known) and its label smoothing
(``label_smoothing_factor``), in ``trainer.json`` and, where the Recorder can carry them, the
manifest. Dropout: the Recorder keeps the random generator states of every training forward
(manifest "rng"), so diffin redraws the masks the Trainer's forwards used (engine/dropout.py).

The rows are positions in ``train_dataset`` as the Trainer indexes it: keep the dataset in the
order of the project's training split (one row per sample, the same rows), as the sample project
does. Not supported (one-line DiffinError at train start): several processes (DDP, FSDP,
DeepSpeed), resuming from a Trainer checkpoint (the record starts at step 0), an iterable
dataset (no indices).
"""
from __future__ import annotations

import json
import warnings
from collections import deque
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from diffin_core.project.atomic import write_text
from diffin_core.project.checkpoints import Recorder, _IndexTap, batch_rows
from diffin_core.errors import DiffinError

TRAINER_FILE = "trainer.json"


class _BatchTap(_IndexTap):
    """Stands in for a DataLoader's batch sampler: the Recorder's _IndexTap (yields the wrapped
    one's batches and queues each batch's indices as it is drawn, in the main process, also with
    workers) that also passes everything else (sampler, set_epoch, batch_size, drop_last) to the
    wrapped sampler, so accelerate's and the Trainer's per-epoch reseeding reach it unchanged."""

    def __init__(self, inner):
        self.__dict__["inner"] = inner
        self.__dict__["fifo"] = deque()

    def __getattr__(self, name):
        return getattr(self.__dict__["inner"], name)

    def __setattr__(self, name, value):
        setattr(self.__dict__["inner"], name, value)


class DiffinCallback(TrainerCallback):
    """Records a ``transformers.Trainer`` run into ``<project_dir>/<folder>`` for ``diffin score``.

    ``every``: optimiser steps between checkpoints (default: about 20 checkpoints over the run,
    ``max_steps // 20``). ``train_size``: the training split's length (default: the Trainer's
    ``len(train_dataset)``)."""

    def __init__(self, project_dir, *, every: int | None = None, folder: str = "checkpoints",
                 train_size: int | None = None):
        self.project_dir, self.folder = Path(project_dir), folder
        self.every, self.train_size = every, train_size
        self.rec: Recorder | None = None
        self._tap: _BatchTap | None = None
        self._loader = None
        self._hooks: list = []
        self._micro: list[np.ndarray] = []       # rows of this step's forwards so far
        self._order_ok = True
        self._why_no_order = ""
        self._sq_norms: dict[int, float] = {}     # parameter id -> squared norm of its accumulated grad
        self.grad_norms: list[float] = []         # every optimiser step's gradient norm before clipping
        self.max_grad_norm = 0.0

    # --- start -------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if getattr(args, "world_size", 1) > 1:
            raise DiffinError(f"DiffinCallback records one process; this run has {args.world_size} (DDP/FSDP/DeepSpeed)")
        if state.global_step > 0:
            raise DiffinError(f"DiffinCallback records a run from its first step; this one resumes at step "
                              f"{state.global_step} (train without resume_from_checkpoint)")
        if model is None or optimizer is None:
            raise DiffinError("DiffinCallback needs the Trainer's model and optimizer (transformers >= 4.36)")
        inner = getattr(optimizer, "optimizer", optimizer)         # accelerate's AcceleratedOptimizer
        dataset = getattr(train_dataloader, "dataset", None)
        n = self.train_size if self.train_size is not None else (len(dataset) if hasattr(dataset, "__len__") else None)
        every = self.every or max(1, int(state.max_steps) // 20)
        self.max_grad_norm = float(args.max_grad_norm or 0.0)
        self.label_smoothing = float(args.label_smoothing_factor or 0.0)
        import inspect
        kwargs = {}
        problem = getattr(getattr(model, "config", None), "problem_type", None)
        self.loss_known = problem in (None, "single_label_classification")
        if self.loss_known and "loss" in inspect.signature(Recorder.__init__).parameters:
            # the Trainer's loss: the model's mean cross-entropy, or its LabelSmoother (the same
            # as torch's label_smoothing) when label_smoothing_factor > 0
            kwargs["loss"] = torch.nn.CrossEntropyLoss(label_smoothing=self.label_smoothing)
        self.rec = Recorder(self.project_dir, model, inner, train_size=n, every=every, folder=self.folder, **kwargs)
        self.rec.manifest.extra["batch_size"] = int(args.per_device_train_batch_size * args.gradient_accumulation_steps)
        self.rec.__enter__()
        self._tap_loader(train_dataloader)
        self._hooks.append(model.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        if self.max_grad_norm > 0:
            for p in model.parameters():
                if p.requires_grad:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))
        self._write_trainer_json(args, final=False)

    def _tap_loader(self, loader) -> None:
        loader = getattr(loader, "base_dataloader", loader)          # accelerate's DataLoaderShard iterates it
        sampler = getattr(loader, "batch_sampler", None)
        if loader is None or sampler is None:
            self._drop_order("the Trainer's dataloader has no batch sampler (an iterable dataset?)")
            return
        self._tap, self._loader = _BatchTap(sampler), loader
        object.__setattr__(loader, "batch_sampler", self._tap)      # DataLoader refuses setattr after init

    def _drop_order(self, why: str) -> None:
        if self._order_ok:
            warnings.warn(f"DiffinCallback: no batch order recorded: {why}", stacklevel=3)
        self._order_ok, self._why_no_order = False, why
        if self.rec is not None:
            self.rec.batches = None

    # --- every training forward takes the next drawn batch --------------------------------------
    def _on_forward(self, module, args, kwargs):
        if not (module.training and torch.is_grad_enabled()) or not self._order_ok:
            return None
        if self._tap is None or not self._tap.fifo:
            self._drop_order("a training forward with no batch drawn from the Trainer's sampler")
            return None
        rows = self._tap.fifo.popleft()
        size = batch_rows(args, kwargs)
        if size is not None and size != len(rows):
            self._drop_order(f"a training forward of {size} rows where the sampler drew {len(rows)}")
            return None
        self._micro.append(rows)
        return None

    def _on_grad(self, p) -> None:
        if p.grad is not None:
            self._sq_norms[id(p)] = float(p.grad.detach().double().pow(2).sum())

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self._tap is not None:
            self._tap.fifo.clear()        # batches drawn ahead by an epoch that stopped early

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # clip_grad_norm_ has run, but the norm is the one the hooks saw after the last backward
        if self.max_grad_norm > 0:
            norm = float(np.sqrt(sum(self._sq_norms.values())))
            self.grad_norms.append(norm)
            self._sq_norms.clear()
            if hasattr(self.rec, "note_clip"):        # the Recorder models the clip factor per step
                self.rec.note_clip(min(1.0, self.max_grad_norm / (norm + 1e-6)), self.max_grad_norm, 2.0, True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.rec is None:
            return
        ids = np.concatenate(self._micro) if (self._order_ok and self._micro) else None
        if self._order_ok and ids is None:
            self._drop_order("an optimiser step with no training forward")
        self._micro = []
        self.rec.step(batch_ids=ids)
        if self.rec.global_step != state.global_step:
            raise DiffinError(f"DiffinCallback counted {self.rec.global_step} optimiser steps, the Trainer "
                              f"{state.global_step}")
        if self.rec.global_step % self.rec.every == 0:
            self._write_trainer_json(args, final=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.rec is None:
            return
        try:
            self.rec.__exit__(None, None, None)
            self._write_trainer_json(args, final=True)
        finally:
            for h in self._hooks:
                h.remove()
            self._hooks = []
            if self._loader is not None:
                object.__setattr__(self._loader, "batch_sampler", self._tap.inner)
            self.rec = None

    # --- the Trainer's own settings ----------------------------------------------------------
    def clip_factors(self) -> np.ndarray:
        """Every optimiser step's clip factor min(1, max_grad_norm / (norm + 1e-6)) (torch's formula);
        ones when the run did not clip."""
        norms = np.asarray(self.grad_norms, dtype=np.float64)
        if self.max_grad_norm <= 0:
            return np.ones(len(norms))
        return np.minimum(1.0, self.max_grad_norm / (norms + 1e-6))

    def _write_trainer_json(self, args, final: bool) -> None:
        folder = self.rec.dir
        if self.max_grad_norm > 0:
            with open(folder / "grad_norms.npy.tmp", "wb") as fh:
                np.save(fh, np.asarray(self.grad_norms, dtype=np.float64))
            (folder / "grad_norms.npy.tmp").replace(folder / "grad_norms.npy")
        info = {
            "written_by": "diffin_core.project.hf.DiffinCallback",
            "complete": final,
            "steps": self.rec.global_step,
            "max_grad_norm": self.max_grad_norm,
            "grad_norms": "grad_norms.npy" if self.max_grad_norm > 0 else None,
            "clipped_steps": int((self.clip_factors() < 1).sum()),
            "label_smoothing": self.label_smoothing,
            "loss": ("cross_entropy" if self.loss_known else
                     f"not cross-entropy (problem_type {getattr(getattr(self.rec.model, 'config', None), 'problem_type', None)!r}): "
                     "state it in diffin.toml [model] loss"),
            "per_device_train_batch_size": int(args.per_device_train_batch_size),
            "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
            "dataloader_drop_last": bool(args.dataloader_drop_last),
            "seed": int(args.seed),
            "data_seed": None if args.data_seed is None else int(args.data_seed),
            "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "warmup_steps": getattr(args, "warmup_steps", None),
            "batch_order": self.rec.manifest.batch_order,
            "no_batch_order_because": None if self._order_ok else self._why_no_order,
        }
        write_text(folder / TRAINER_FILE, json.dumps(info, indent=1, default=str))
