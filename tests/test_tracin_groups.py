"""Issue 17, item 1: TracIn weighs each coordinate by its own param group's lr at every step (and a
frozen group by 0), checked against the formula written out from the recorded per-group lrs:
    tracin(z) = (1 / N) sum_k sum_{s owned by k} <g_Q(theta_k), lr_group(s) * g_z(theta_k)>
(SGD without momentum: a checkpoint's weight is its steps' summed lr)."""
import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim import SGD
from torch.optim.lr_scheduler import CosineAnnealingLR

from diffin_core.methods import ScoreSettings
from diffin_core.project.checkpoints import Recorder, read_manifest
from diffin_core.run.context import manifest_context
from diffin_core.run.scoring import run_method
from diffin_core.tasks.truth import digits_case, digits_mlp

N, BATCH, EPOCHS = 160, 20, 3


@pytest.mark.parametrize("body_lr", [0.02, 0.0], ids=["body-lr-10x-lower", "body-frozen"])
def test_tracin_weighs_each_group_by_its_own_lr(body_lr, tmp_path):
    train, query = digits_case(noise=0.1, n_train=N, seed=0)
    x, y = torch.as_tensor(train.x, dtype=torch.float64), torch.as_tensor(train.y)
    model = digits_mlp()()
    p = list(model.parameters())
    opt = SGD([{"params": p[:2], "lr": body_lr}, {"params": p[2:], "lr": 0.2}], lr=0.1)
    steps = EPOCHS * N // BATCH
    sched = CosineAnnealingLR(opt, T_max=steps)
    rng = np.random.default_rng(0)
    with Recorder(tmp_path, model, opt, train_size=N, every=N // BATCH) as rec:
        for _ in range(EPOCHS):
            for idx in np.split(rng.permutation(N), N // BATCH):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
                sched.step()
                rec.step(batch_ids=idx)
    raw = json.loads((tmp_path / "checkpoints/manifest.json").read_text())
    with np.load(tmp_path / "checkpoints" / raw["group_steps"]) as z:
        lr = z["lr"]                                                   # (steps, groups), as recorded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctx = manifest_context(digits_mlp()(), read_manifest(tmp_path / "checkpoints/manifest.json"), train,
                               ScoreSettings(device="cpu"))
        got = run_method(ctx, "tracin", query.x[:40], query.y[:40], need_self=False)["influence"]
    assert ctx.groups is not None
    group_of = {n: g for g, grp in enumerate(raw["param_groups"]) for n in grp["params"]}
    fm = ctx.fm
    coord_group = np.concatenate([np.full(size, group_of[n]) for n, size in zip(fm.names, fm.sizes)])
    qx, qy = ctx.tensors(np.asarray(query.x[:40], dtype=np.float32), np.asarray(query.y[:40]))
    tx, ty = ctx.tensors(np.asarray(train.x, dtype=np.float32), np.asarray(train.y))
    ref = np.zeros(N)
    for k in range(ctx.m):
        lo, hi = int(ctx.bounds[k]), int(ctx.bounds[k + 1])
        if hi <= lo:
            continue
        L = lr[lo:hi].sum(0)[coord_group]                              # summed lr per coordinate
        gq = ctx.mean_grad(k, qx, qy).double().cpu().numpy()
        G = ctx.fm_at(k).per_sample_grads(ctx.thetas[k], tx, ty).double().cpu().numpy()
        ref += G @ (L * gq) / N
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    if body_lr == 0.0:                                                 # a frozen group adds nothing
        assert np.abs(got).max() > 0
