"""Bounded-memory scoring (issue 11, engine half): the streamed, chunked, budgeted and resumed
paths give the in-memory scores; chunk sizes respect the budget; checkpoints load lazily."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffin_core.methods import runner
from diffin_core.engine.budget import GRAD_ROWS, parse_bytes, plan_memory
from diffin_core.project.data import Split
from diffin_core.errors import DiffinError
from diffin_core.methods import METHODS, ScoreSettings
from diffin_core.engine.models import SmallCNN, build_resnet18, count_parameters
from diffin_core.run.context import make_context
from diffin_core.project.stages import Stages, StageSettings
from diffin_core.project.store import CheckpointStore

METHODS_UNDER_TEST = ["diffin", "tracin", "diffin-paper", "grad-dot", "influence-function"]


class Killed(RuntimeError):
    pass


@pytest.fixture(scope="module")
def case():
    """A tiny image CNN trained 3 x 20 SGD steps, 4 checkpoints (states in memory)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n, nq = 90, 12
    x = rng.random((n, 1, 12, 12), dtype=np.float32)
    y = rng.integers(0, 3, n)
    x[np.arange(n), 0, y * 4, y * 4] += 2.0                 # learnable signal
    model = SmallCNN(1, 3, 12 + 8)                          # any size; pad the input below
    model = torch.nn.Sequential(torch.nn.ZeroPad2d(4), model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    states, steps, lrs = [], [], []
    step = 0
    for epoch in range(3):
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        steps.append(step)
        lrs.append(0.1)
        for idx in torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).split(15):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
            step += 1
    states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    steps.append(step)
    lrs.append(0.1)
    train = Split(x, y, np.arange(n))
    return model, states, steps, lrs, train, x[:nq], y[:nq]


def context(case, **settings):
    model, states, steps, lrs, train, _, _ = case
    s = ScoreSettings(**{"lanczos_steps": 4, "hessian_batch": 32, "paper_batch": 16, **settings})
    return make_context(model, states, steps, lrs, train, s)


def reference(case, method, need_self=True):
    """The engine's in-memory path: every checkpoint resident, one chunk for the whole set."""
    torch.manual_seed(0)                  # diffin-paper / influence-function start Lanczos at random
    ctx = context(case, batch_size=10_000, memory_budget=2**33) if "memory_budget" in ScoreSettings.__dataclass_fields__ \
        else context(case, batch_size=10_000)
    qx, qy = case[5], case[6]
    m = METHODS[method]()
    mem = plan_memory(ctx.fm.num_params, 10_000, method, need_self, budget=2**33, batch_size=10_000,
                      checkpoints=len(ctx.thetas))
    return runner.run(m, ctx, qx, qy, need_self, mem=mem)


def lazy_context(case, keep=1, **settings):
    """The same context with thetas in a CheckpointStore keeping ``keep`` at a time."""
    ctx = context(case, **settings)
    states = case[1]
    ctx.thetas = CheckpointStore.from_states(ctx.fm.flatten, states, ctx.device, keep=keep)
    return ctx


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7 * max(1.0, float(np.abs(b).max())))


@pytest.mark.parametrize("method", METHODS_UNDER_TEST)
def test_streamed_chunked_path_matches_in_memory(case, method):
    ref = reference(case, method)
    ctx = lazy_context(case, keep=1)
    mem = plan_memory(ctx.fm.num_params, 10_000, method, True, budget=2**33, batch_size=7, checkpoints=1)
    assert mem.grad_chunk == 7 and mem.cached_checkpoints == 1
    torch.manual_seed(0)
    out = runner.run(METHODS[method](), ctx, case[5], case[6], True, mem=mem)
    for key in ("influence", "self_influence", "label_issue", "probs"):
        close(out[key], ref[key])
    if method in ("diffin", "tracin", "diffin-paper"):      # every checkpoint, re-read per chunk: none kept
        assert ctx.thetas.loads > len(ctx.thetas)


@pytest.mark.parametrize("method", ["diffin", "tracin"])
def test_influence_only_walks_checkpoint_by_checkpoint(case, method):
    ref = reference(case, method, need_self=False)["influence"]
    ctx = lazy_context(case, keep=1)
    mem = plan_memory(ctx.fm.num_params, 10_000, method, False, budget=2**33, batch_size=11, checkpoints=1)
    out = runner.run(METHODS[method](), ctx, case[5], case[6], False, mem=mem)["influence"]
    close(out, ref)
    # checkpoint-by-checkpoint: each checkpoint's theta is read about once, not once per chunk
    assert ctx.thetas.loads <= 2 * len(ctx.thetas) + 2


def test_different_budgets_give_the_same_scores(case):
    outs = []
    for budget in ("200MB", "2GB"):
        ctx = context(case, batch_size=256)
        mem = plan_memory(ctx.fm.num_params, 4_000_000, "diffin", True, budget=parse_bytes(budget),
                          batch_size=256, checkpoints=len(ctx.thetas))
        outs.append((mem.grad_chunk, runner.run(METHODS["diffin"](), ctx, case[5], case[6], True, mem=mem)))
    (c1, a), (c2, b) = outs
    assert c1 < c2                                          # the budget really changed the chunks
    for key in ("influence", "self_influence"):
        close(a[key], b[key])


def test_chunk_sizes_respect_the_budget_at_any_size():
    for p in (10_000, 11_000_000, 100_000_000):
        for method in GRAD_ROWS:
            for budget in (2**30, 4 * 2**30, 16 * 2**30):
                try:
                    mem = plan_memory(p, 3_000_000, method, True, budget=budget, batch_size=4096,
                                      checkpoints=50, plan_vectors=11)
                except DiffinError as e:
                    assert "too small" in str(e)
                    continue
                live = mem.fixed_bytes + mem.cached_checkpoints * mem.checkpoint_bytes
                assert live + mem.grad_chunk * mem.row_bytes_grad <= budget, (p, method, budget, mem)
                assert live + mem.jvp_chunk * mem.row_bytes_jvp <= budget
                # the counted parts: every resident checkpoint's theta and plan entry, the rows
                assert mem.checkpoint_bytes == 12 * 4 * p and mem.fixed_bytes >= (6 + 11) * 4 * p
                assert mem.row_bytes_grad >= GRAD_ROWS[method] * 4 * p + 6 * 3_000_000
    with pytest.raises(DiffinError, match="too small"):
        plan_memory(100_000_000, 1000, "diffin", True, budget=2**30, plan_vectors=11)
    assert parse_bytes("4GB") == 4 * 2**30 and parse_bytes("512m") == 512 * 2**20 and parse_bytes("auto") == 0
    with pytest.raises(DiffinError):
        parse_bytes("lots")


@pytest.mark.parametrize("method,need_self,kill_at", [
    ("diffin", True, "query plan: checkpoint 2/"),      # killed while propagating the query
    ("diffin", True, "rows 0-"),                        # killed after the first row range
    ("diffin", False, "checkpoint 2/4 scored"),         # influence-only walk, after checkpoint 2
    ("tracin", False, "query plan: checkpoint 3/"),
])
def test_killed_run_resumes_and_gives_the_same_scores(case, tmp_path, method, need_self, kill_at):
    ref = reference(case, method, need_self)
    key = StageSettings(method, {"x": 1}, "q", "t", need_self=need_self)
    mem = plan_memory(1000, 10_000, method, need_self, budget=2**33, batch_size=5, checkpoints=4)

    def killer(done, total, message):
        if kill_at in message:
            raise Killed(message)

    ctx = lazy_context(case, keep=4)
    ctx.progress = killer
    with pytest.raises(Killed):
        runner.run(METHODS[method](), ctx, case[5], case[6], need_self, Stages(tmp_path, key), mem)
    # the next job resumes: saved plan steps and score pieces are not recomputed
    ctx = lazy_context(case, keep=4)
    m = METHODS[method]()
    steps, chunks = [], []
    step, chunk = m.prepare_step, m.chunk
    m.prepare_step = lambda *a: (steps.append(a[1]), step(*a))[1]
    m.chunk = lambda *a: (chunks.append(1), chunk(*a))[1]
    out = runner.run(m, ctx, case[5], case[6], need_self, Stages(tmp_path, key), mem)
    for k in ref:
        close(out[k], ref[k])
    fresh_chunks = (-(-90 // 5)) * (1 if need_self else 4)
    if kill_at.startswith("query plan"):
        done = int(kill_at.split("checkpoint ")[1].split("/")[0])
        assert steps == list(range(done, 4))                 # the plan resumed at the next checkpoint
        assert len(chunks) == fresh_chunks
    else:
        assert steps == [] and 0 < len(chunks) < fresh_chunks
    # a settings change invalidates the saved stages (the folder starts empty)
    changed = StageSettings(method, {"x": 1}, "q", "t", need_self=need_self)
    folder = tmp_path / f"{method}-{key.digest}"
    (folder / "settings.json").write_text("{}")            # as if written by other settings
    assert Stages(tmp_path, changed).plan_done() is None and not list((folder / "scores").iterdir())


def test_plan_stage_saves_entries_and_loads_them_lazily(case, tmp_path):
    """tracin's plan (one g_Q per checkpoint) is saved, then read back one entry at a time."""
    key = StageSettings("tracin", {}, "q", "t")
    ctx = lazy_context(case, keep=4)
    mem = plan_memory(1000, 10_000, "tracin", True, budget=2**33, batch_size=30, checkpoints=1)
    first = runner.run(METHODS["tracin"](), ctx, case[5], case[6], True, Stages(tmp_path, key), mem)
    stages = Stages(tmp_path, key)
    assert stages.plan_done() == 4
    plan = runner.prepare(METHODS["tracin"](), ctx, case[5], case[6], stages, mem)
    assert len(plan) == 4 and len(plan._cache) <= 1 if hasattr(plan, "_cache") else True
    # rows already scored: a second run reads everything from the stages
    ctx2 = lazy_context(case, keep=4)
    m = METHODS["tracin"]()
    m.prepare = lambda *a: (_ for _ in ()).throw(AssertionError("plan recomputed"))
    m.chunk = lambda *a: (_ for _ in ()).throw(AssertionError("rows rescored"))
    again = runner.run(m, ctx2, case[5], case[6], True, Stages(tmp_path, key), mem)
    close(again["influence"], first["influence"])


def test_resnet18_has_11m_parameters_and_batchnorm():
    model = build_resnet18((3, 32, 32), 10)
    assert count_parameters(model) > 10_000_000
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_project_score_killed_halfway_resumes_from_its_stages(tmp_path):
    """scoring.score on a project folder: killed after the plan's 2nd checkpoint, rerun with the
    same settings; the rerun resumes (no plan step redone before it) and matches a clean run."""
    from helpers import make_tiny_project
    from diffin_core.project.folder import Project
    from diffin_core.run.scoring import score
    root = make_tiny_project(tmp_path / "p", n=60)
    settings = ScoreSettings(batch_size=16, lanczos_steps=4, hessian_batch=32, memory_budget=256 * 2**20)
    clean = Project(root).scores(score(root, "diffin", run="clean", settings=settings, features=False).name)

    def killer(done, total, message):
        if "query plan: checkpoint 2/" in message:
            raise Killed(message)
    with pytest.raises(Killed):
        score(root, "diffin", run="again", settings=settings, progress=killer, features=False)
    stages = list((root / "runs" / ".stages").iterdir())
    assert len(stages) == 1 and (stages[0] / "plan" / "001.json").is_file()
    messages = []
    out = score(root, "diffin", run="again", settings=settings, progress=lambda d, t, m: messages.append(m),
                features=False)
    assert any("resumed the query plan after 2" in m for m in messages)
    assert not any("query plan: checkpoint 1/" in m for m in messages)
    again = Project(root).scores(out.name)
    for col in ("influence", "self_influence", "label_issue"):
        close(again[col].to_numpy(), clean[col].to_numpy())
    assert not list((root / "runs" / ".stages").iterdir())          # removed once the run is written
    meta = Project(root).run("again").meta
    assert meta["memory"]["budget"] == 256 * 2**20 and meta["memory"]["grad_chunk"] <= 16


def test_cli_memory_budget_and_batch_size(tmp_path, capsys):
    from helpers import make_tiny_project
    from diffin_core.cli import main
    from diffin_core.project.folder import Project
    root = make_tiny_project(tmp_path / "p", n=40)
    main(["score", str(root), "-m", "tracin", "--run", "t", "--memory-budget", "300MB", "--batch-size", "7",
          "--no-features"])
    meta = Project(root).run("t").meta
    assert meta["settings"]["memory_budget"] == 300 * 2**20 and meta["settings"]["batch_size"] == 7
    assert meta["memory"]["grad_chunk"] == 7
    with pytest.raises(SystemExit) as e:
        main(["score", str(root), "-m", "tracin", "--memory-budget", "lots"])
    assert e.value.code == 2 and "not a size like 4GB" in capsys.readouterr().err


MEMORY_SCRIPT = r'''
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
from diffin_core.methods import runner
from diffin_core.project.data import Split
from diffin_core.methods import METHODS, ScoreSettings
from diffin_core.engine.models import MLP
from diffin_core.run.context import make_context

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

method, budget = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = MLP(512, (2048, 512), 10)                       # 2.1M parameters: 8.4 MB per P-vector
rng = np.random.default_rng(0)
x, y = rng.normal(size=(96, 512)).astype(np.float32), rng.integers(0, 10, 96)
states = []
for k in range(3):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    states.append({k: v.clone() for k, v in model.state_dict().items()})
ctx = make_context(model, states, [0, 10, 20], [0.1] * 3, Split(x, y, np.arange(96)),
                   ScoreSettings(batch_size=96, memory_budget=budget, hessian_batch=64))
open("/proc/self/clear_refs", "w").write("5")           # peak (VmHWM) := current RSS
base = rss("VmRSS:")
runner.run(METHODS[method](), ctx, x[:8], y[:8], True)
print(json.dumps({"peak": rss("VmHWM:") - base, "grad_chunk": ctx.memory.grad_chunk}))
'''


@pytest.mark.parametrize("method,budget_mb", [("diffin", 700), ("tracin", 500)])
def test_measured_peak_memory_stays_under_the_budget(tmp_path, method, budget_mb):
    """Peak resident memory of a whole scoring run (plan + every chunk) above what was resident
    before it, on a 2.1M-parameter model whose every P-vector is 8.4 MB: within the budget."""
    import json
    import os
    import subprocess
    import sys
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to reset the peak RSS")
    script = tmp_path / "mem.py"
    script.write_text(MEMORY_SCRIPT)
    budget = budget_mb * 2**20
    res = subprocess.run([sys.executable, str(script), method, str(budget)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["grad_chunk"] >= 1
    assert got["peak"] <= budget, f"{method}: peak {got['peak'] / 2**20:.0f} MB over a {budget_mb} MB budget"
