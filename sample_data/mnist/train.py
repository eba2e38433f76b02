"""The sample project's training recipe: (train_x, train_y, seed, checkpoint_dir) -> None."""
import math

import torch
from torch.nn import functional as F

from diffin_core.project.checkpoints import Recorder
from diffin_core.engine.models import SmallCNN

EPOCHS, BATCH, LR, FLOOR, EVERY = 8, 64, 0.3, 0.01, 50


def train(train_x, train_y, seed, checkpoint_dir):
    """SGD, batch 64, 8 epochs, lr cosine-decayed from 0.3 to 0.003 (a stable end, so that
    leave-one-out effects are reproducible); checkpoints every 50 steps into checkpoint_dir."""
    torch.manual_seed(seed)
    x = torch.as_tensor(train_x, dtype=torch.float32).reshape(-1, 1, 28, 28)
    y = torch.as_tensor(train_y, dtype=torch.long)
    model = SmallCNN(1, 10, 28)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    total = EPOCHS * math.ceil(len(y) / BATCH)
    cosine = lambda t: FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * min(t, total) / total))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    gen = torch.Generator().manual_seed(seed)
    with Recorder(checkpoint_dir, model, opt, train_size=len(y), every=EVERY, folder=".") as rec:
        for _ in range(EPOCHS):
            for idx in torch.randperm(len(y), generator=gen).split(BATCH):
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
                sched.step()
                rec.step()
