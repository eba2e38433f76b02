"""DiffinCallback: a transformers Trainer run recorded by one added line (diffin_core/hf.py).

A tiny BERT from a config (no download). Row i's first token is i + 1, so a spy on the model's
forward reads which training rows each optimiser step really used: the recorded batch order
must equal them (shuffled sampler, gradient accumulation, an uneven last batch, drop_last)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from diffin_core.project.checkpoints import load_batch_order, load_step_lrs, read_manifest  # noqa: E402
from diffin_core.errors import DiffinError  # noqa: E402
from diffin_core.project.hf import DiffinCallback  # noqa: E402

SEQ = 12


class RowsDataset(torch.utils.data.Dataset):
    """Row i: input_ids[0] = i + 1 (the spy's key), random other tokens, a random label."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(5, 120, (n, SEQ), generator=g)
        self.x[:, 0] = torch.arange(n) + 1
        self.mask = torch.ones(n, SEQ, dtype=torch.long)
        self.mask[::3, SEQ // 2:] = 0                   # some padding
        self.y = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": self.mask[i], "labels": self.y[i]}


class Spy(TrainerCallback):
    """The rows each optimiser step's training forwards really received, and the logged grad norms."""

    def __init__(self):
        self.steps, self.current, self.logged = [], [], []

    def on_train_begin(self, args, state, control, model=None, **kw):
        def hook(module, a, k):
            if module.training:
                self.current.append((k["input_ids"][:, 0] - 1).numpy().copy())
        self.handle = model.register_forward_pre_hook(hook, with_kwargs=True)

    def on_step_end(self, *a, **k):
        self.steps.append(np.concatenate(self.current))
        self.current = []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "grad_norm" in logs:
            self.logged.append(float(logs["grad_norm"]))

    def on_train_end(self, *a, **k):
        self.handle.remove()


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(cfg)


def run_trainer(tmp_path, n=37, batch=4, accum=2, epochs=3, drop_last=False, every=5, **extra):
    args = TrainingArguments(output_dir=str(tmp_path / "hf_out"), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accum, num_train_epochs=epochs,
                             dataloader_drop_last=drop_last, report_to=[], save_strategy="no",
                             logging_steps=1, use_cpu=True, disable_tqdm=True, seed=3, **extra)
    spy = Spy()
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=RowsDataset(n), callbacks=[spy])
    trainer.add_callback(DiffinCallback(tmp_path / "proj", every=every))     # the one added line
    trainer.train()
    return trainer, spy


def recorded_batches(root):
    manifest = read_manifest(root / "checkpoints" / "manifest.json")
    order = load_batch_order(manifest, manifest.train_size)
    return manifest, [order.batch(s) for s in range(len(order.offsets) - 1)]


def test_batch_order_is_the_rows_the_trainer_used(tmp_path):
    trainer, spy = run_trainer(tmp_path, warmup_steps=3, max_grad_norm=0.05, label_smoothing_factor=0.1,
                               weight_decay=0.0)
    manifest, batches = recorded_batches(tmp_path / "proj")
    assert len(batches) == len(spy.steps) == trainer.state.global_step == 15
    for got, used in zip(batches, spy.steps):
        assert np.array_equal(got, used)
    assert [len(b) for b in batches[:5]] == [8, 8, 8, 8, 5]       # 37 rows, 4 x 2 per step, uneven end
    for epoch in range(3):                                         # each epoch: a permutation, shuffled
        rows = np.concatenate(batches[5 * epoch:5 * epoch + 5])
        assert sorted(rows.tolist()) == list(range(37)) and rows.tolist() != list(range(37))
    assert manifest.optimizer == "AdamW" and manifest.train_size == 37
    assert [c.step for c in manifest.checkpoints] == [0, 5, 10, 15]
    assert all(c.exp_avg and c.exp_avg_sq for c in manifest.checkpoints)
    lrs = load_step_lrs(manifest)
    assert len(lrs) == 15 and lrs[0] == 0.0 and lrs[3] == pytest.approx(5e-5)   # linear warm-up, then decay
    info = json.loads((tmp_path / "proj/checkpoints/trainer.json").read_text())
    assert info["complete"] and info["label_smoothing"] == 0.1 and info["max_grad_norm"] == 0.05
    norms = np.load(tmp_path / "proj/checkpoints/grad_norms.npy")
    assert np.allclose(norms, spy.logged, rtol=1e-4)               # the Trainer's own pre-clip norms
    assert info["clipped_steps"] == int((norms > 0.05).sum()) > 0
    from diffin_core.project.checkpoints import Recorder
    if hasattr(Recorder, "note_clip"):            # the per-group Recorder (issue 17) models both
        raw = json.loads((tmp_path / "proj/checkpoints/manifest.json").read_text())
        assert raw["clip"]["max_norm"] == 0.05 and raw["loss"]["label_smoothing"] == 0.1
        factors = np.load(tmp_path / "proj/checkpoints" / raw["clip"]["factors"])
        np.testing.assert_allclose(factors[:15], np.minimum(1, 0.05 / (norms + 1e-6)), rtol=1e-12)


def test_per_group_lrs_and_weight_decay_of_every_step(tmp_path):
    """The Trainer's AdamW has two groups (weight decay on the matrices, none on biases and
    LayerNorm weights): every optimiser step's lr and weight decay are recorded per group, with
    each group's parameter names, so the engine replays each group's own update."""
    from diffin_core.project.checkpoints import load_group_steps
    trainer, _spy = run_trainer(tmp_path, n=20, batch=4, accum=1, epochs=2, warmup_steps=2, weight_decay=0.05,
                                lr_scheduler_type="cosine")
    manifest = read_manifest(tmp_path / "proj/checkpoints/manifest.json")
    groups = manifest.extra["param_groups"]
    assert len(groups) == 2 and [g["weight_decay"] for g in groups] == [0.05, 0.0]
    names = [n for n, _ in trainer.model.named_parameters()]
    assert sorted(groups[0]["params"] + groups[1]["params"]) == sorted(names)
    assert all(n.endswith("bias") or "LayerNorm" in n for n in groups[1]["params"])
    steps = load_group_steps(manifest)
    assert steps["lr"].shape == steps["weight_decay"].shape == (10, 2)
    np.testing.assert_allclose(steps["lr"][:, 0], load_step_lrs(manifest))
    np.testing.assert_allclose(steps["lr"][:, 1], steps["lr"][:, 0])
    assert steps["lr"][0, 0] == 0.0 and steps["lr"][2, 0] == pytest.approx(5e-5)       # warm-up, then cosine
    assert (steps["weight_decay"] == [0.05, 0.0]).all()


def test_drop_last_and_no_accumulation(tmp_path):
    trainer, spy = run_trainer(tmp_path, n=30, batch=8, accum=1, epochs=2, drop_last=True, every=2)
    _, batches = recorded_batches(tmp_path / "proj")
    assert len(batches) == 6 and all(len(b) == 8 for b in batches)
    for got, used in zip(batches, spy.steps):
        assert np.array_equal(got, used)


def test_resume_is_refused(tmp_path):
    cb = DiffinCallback(tmp_path / "proj")

    class State:
        global_step = 7
    args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True)
    with pytest.raises(DiffinError, match="resumes at step 7"):
        cb.on_train_begin(args, State(), None, model=tiny_bert(), optimizer=object())


def test_the_trainers_dropout_masks_are_redrawn(tmp_path):
    """BERT's dropout (0.1 in its hidden layers and attention: nn.Dropout modules and the
    attention's functional dropout) under the Trainer, 2 micro-batches a step: the callback's
    Recorder keeps every training forward's generator state, and the engine's redrawn masks give
    the logits the Trainer's own forwards computed (engine/dropout.py)."""
    from diffin_core.engine import dropout
    from diffin_core.engine.functional import FunctionalModel
    from diffin_core.engine.textmodel import adapt
    from diffin_core.project.checkpoints import load_rng
    seen = []                                       # (weights, logits) of every training forward

    class Logits(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            def pre(module, a, k):
                if module.training:
                    seen.append([torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])])
            def post(module, a, k, out):
                if module.training:
                    seen[-1].append(out.logits.detach().clone())
            self.handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
                            model.register_forward_hook(post, with_kwargs=True)]

        def on_train_end(self, *a, **k):
            for h in self.handles:
                h.remove()
    args = TrainingArguments(output_dir=str(tmp_path / "hf_out"), per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, num_train_epochs=1, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True, seed=3)
    data = RowsDataset(16)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=data, callbacks=[Logits()])
    trainer.add_callback(DiffinCallback(tmp_path / "proj", every=2))
    trainer.train()
    manifest, batches = recorded_batches(tmp_path / "proj")
    rng = load_rng(manifest)
    assert manifest.extra["rng"]["forwards"] == len(seen) == 4 and list(rng.rows) == [4, 4, 4, 4]
    fm = FunctionalModel(adapt(tiny_bert()))
    for s, rows in enumerate(batches):
        x = torch.stack([data.x[rows], data.mask[rows]], 1).float()
        theta = seen[2 * s][0]
        masks = dropout.capture(rng, s, fm, theta, x)
        assert len(masks.parts) == 2 and len(masks.parts[0][1]) >= 4      # embeddings, attention, outputs
        with dropout.applied(masks):
            out = fm.logits(theta, x)
        assert torch.allclose(out, torch.cat([seen[2 * s][1], seen[2 * s + 1][1]]), atol=1e-5)
        assert not torch.allclose(fm.logits(theta, x), out, atol=1e-5)
    assert rng.problems == {}
