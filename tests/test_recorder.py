"""The Recorder records any torch.optim optimiser per param group; scoring models it or refuses
in one line naming it (issue 17). Recipe features against true leave-one-out live in
tests/test_recipe_features.py."""
import inspect
import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from diffin_core.project.checkpoints import Recorder, read_manifest
from diffin_core.errors import DiffinError
from diffin_core.engine.recipe import MODELLED, Recipe, RecipeWarning

OPTIMIZERS = sorted((c for c in vars(torch.optim).values()
                     if inspect.isclass(c) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer),
                    key=lambda c: c.__name__)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def _make(cls, model):
    """The optimiser with two param groups (weights / biases, wd on weights only, bias lr 3x),
    or what the class accepts: one group (LBFGS), 2-D parameters only (Muon)."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    tries = [lambda: cls([{"params": weights, "weight_decay": 0.01}, {"params": biases, "lr": 0.03}], lr=0.01),
             lambda: cls([{"params": weights}, {"params": biases, "lr": 0.03}], lr=0.01),
             lambda: cls(model.parameters(), lr=0.01),
             lambda: cls(weights, lr=0.01)]
    for make in tries:
        try:
            return make()
        except (ValueError, TypeError, RuntimeError):
            continue
    raise AssertionError(f"{cls.__name__}: no way to construct it")


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=[c.__name__ for c in OPTIMIZERS])
def test_every_torch_optimizer_is_recorded_or_refused_in_one_line(cls, tmp_path):
    """Recipe.from_optimizer and the Recorder never crash; a modelled optimiser has no refusal, any
    other one a one-line refusal naming it, after the manifest round trip too."""
    model = _model()
    opt = _make(cls, model)
    recipe = Recipe.from_optimizer(opt, {id(p): n for n, p in model.named_parameters()})
    assert len(recipe.groups) == len(opt.param_groups)
    assert sum(len(g.params) for g in recipe.groups) == sum(len(g["params"]) for g in opt.param_groups)
    assert all(not n.startswith("param") for g in recipe.groups for n in g.params)
    x = torch.randn(6, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Recorder(tmp_path, model, opt, every=2) as rec:
            for _ in range(3):
                def closure():
                    opt.zero_grad()
                    loss = model(x).pow(2).mean()
                    loss.backward()
                    return loss
                closure()
                try:
                    opt.step(closure)
                except RuntimeError:                # SparseAdam: dense gradients refused by torch
                    pass
                rec.step()
    m = read_manifest(tmp_path / "checkpoints/manifest.json")
    assert m.optimizer == cls.__name__
    assert len(m.extra["param_groups"]) == len(opt.param_groups)
    back = Recipe.from_manifest(m.recipe_dict())
    modelled = cls.__name__ in MODELLED
    for r in (recipe, back):
        if modelled:
            assert r.refused is None
        else:
            assert r.refused and cls.__name__ in r.refused and "\n" not in r.refused
    refusals = [str(w.message) for w in caught if issubclass(w.category, RecipeWarning)]
    assert bool(refusals) != modelled


def test_recorded_groups_and_every_steps_hyper_parameters(tmp_path):
    """Per group: the parameter names, weight decay, betas, eps and a frozen group; per step and
    group: lr (a scheduler multiplying each group's own base lr), weight decay, beta1."""
    model = _model()
    model[0].bias.requires_grad_(False)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    opt = torch.optim.AdamW([{"params": weights, "weight_decay": 0.05},
                             {"params": [model[2].bias], "weight_decay": 0.0, "lr": 3e-2},
                             {"params": [model[0].bias], "lr": 0.0}], lr=1e-2, betas=(0.8, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    x = torch.randn(8, 4)
    with Recorder(tmp_path, model, opt, every=2) as rec:
        for _ in range(5):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            sched.step()
            rec.step()
    raw = json.loads((tmp_path / "checkpoints/manifest.json").read_text())
    groups = raw["param_groups"]
    assert [g["params"] for g in groups] == [["0.weight", "2.weight"], ["2.bias"], ["0.bias"]]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0, 0.01]
    assert [g["frozen"] for g in groups] == [False, False, True]
    assert groups[0]["betas"] == [0.8, 0.99] and raw["betas"] == [0.8, 0.99]
    with np.load(tmp_path / "checkpoints" / raw["group_steps"]) as z:
        lr, wd, mom = z["lr"], z["weight_decay"], z["momentum"]
    steps = np.arange(5)
    np.testing.assert_allclose(lr[:, 0], 1e-2 / (1 + steps))
    np.testing.assert_allclose(lr[:, 1], 3e-2 / (1 + steps))
    assert (lr[:, 2] == 0).all() and (wd[:, 0] == 0.05).all() and (mom == 0.8).all()
    np.testing.assert_allclose(np.load(tmp_path / "checkpoints/step_lrs.npy"), lr[:, 0])


def test_manifest_keeps_nesterov_and_dampening_beside_the_batch_size():
    """to_manifest wrote nesterov/dampening only without a batch size (a misplaced else)."""
    r = Recipe(momentum=0.9, dampening=0.1, nesterov=False, batch_size=32)
    out = r.to_manifest()
    assert out["batch_size"] == 32 and out["dampening"] == 0.1 and out["nesterov"] is False
    r2 = Recipe.from_manifest(out)
    assert (r2.dampening, r2.nesterov, r2.batch_size) == (0.1, False, 32)
    assert not r2.approximations


def test_amsgrad_is_recorded_and_refused():
    model = _model()
    recipe = Recipe.from_optimizer(torch.optim.Adam(model.parameters(), amsgrad=True))
    assert recipe.refused and "amsgrad" in recipe.refused


def test_unmodelled_optimizer_scores_the_loss_baseline_and_refuses_diffin(tmp_path):
    """Adagrad: recorded; diffin and TracIn refuse in one line naming it, the loss baseline scores."""
    from diffin_core.project.data import Split
    from diffin_core.methods import ScoreSettings
    from diffin_core.run.context import manifest_context
    from diffin_core.run.scoring import run_method
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    y = rng.integers(0, 2, 40)
    model = _model()
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecipeWarning)
        with Recorder(tmp_path, model, opt, train_size=40, every=3) as rec:
            for idx in np.array_split(np.arange(40), 8):
                opt.zero_grad()
                nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
                opt.step()
                rec.step(batch_ids=idx)
    m = read_manifest(tmp_path / "checkpoints/manifest.json")
    train = Split(x, y, np.arange(40))
    ctx = manifest_context(_model(), m, train, ScoreSettings(device="cpu"))
    for method in ("diffin", "tracin"):
        with pytest.raises(DiffinError, match="Adagrad") as err:
            run_method(ctx, method, x[:3], y[:3])
        assert "\n" not in str(err.value)
    out = run_method(ctx, "loss", x[:3], y[:3])
    assert np.isfinite(out["label_issue"]).all()


def test_meta_json_lists_the_approximations_and_the_cli_prints_each_once(tmp_path, capsys):
    """meta.json's "approximations": [] when the recipe is modelled exactly; with clipping seen but
    not recorded, its line, printed once by `diffin score` even for two methods."""
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from helpers import make_tiny_project
    from diffin_core.cli import main
    root = make_tiny_project(tmp_path / "tiny")
    main(["score", str(root), "--method", "tracin", "--run", "exact", "--no-features"])
    meta = json.loads((root / "runs/exact/meta.json").read_text())
    assert meta["approximations"] == []
    path = root / "checkpoints/manifest.json"
    raw = json.loads(path.read_text())
    raw["detected_clipping"] = {"max_norm": 1.0, "steps": 12}
    path.write_text(json.dumps(raw))
    capsys.readouterr()
    main(["score", str(root), "--method", "tracin", "--method", "grad-dot", "--no-features"])
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("approximated:")]
    assert len(lines) == 1 and "rec.clip_grad_norm_" in lines[0]
    meta = json.loads((root / "runs/tracin-1/meta.json").read_text())
    assert len(meta["approximations"]) == 1 and "gradient clipping" in meta["approximations"][0]
    assert json.loads((root / "runs/grad-dot-1/meta.json").read_text())["approximations"] == []   # no recipe


@pytest.mark.parametrize("opt_name", ["SGD", "AdamW"])
def test_a_momentum_schedule_is_modelled_for_sgd_and_named_for_adam(opt_name, tmp_path):
    """OneCycleLR cycles SGD's momentum (Adam's beta1) by default: recorded per step; SGD's is
    modelled per step (ctx.momenta, no line), Adam's beta1 schedule is named in one line."""
    import warnings as _w
    from diffin_core.project.data import Split
    from diffin_core.methods import ScoreSettings
    from diffin_core.run.context import manifest_context
    model = _model()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if opt_name == "SGD"
           else torch.optim.AdamW(model.parameters(), lr=0.01))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1 if opt_name == "SGD" else 0.01, total_steps=8)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    with Recorder(tmp_path, model, opt, train_size=32, every=4) as rec:
        for idx in torch.arange(32).split(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
            rec.step(batch_ids=idx)
    with np.load(tmp_path / "checkpoints/group_steps.npz") as z:
        assert np.ptp(z["momentum"][:, 0]) > 0.01
    m = read_manifest(tmp_path / "checkpoints/manifest.json")
    with _w.catch_warnings(record=True) as caught:
        _w.simplefilter("always")
        ctx = manifest_context(_model(), m, Split(x.numpy(), y.numpy(), np.arange(32)), ScoreSettings(device="cpu"))
    named = any("momentum / beta1 schedule" in str(w.message) for w in caught)
    if opt_name == "SGD":
        assert not named and ctx.momenta is not None and np.ptp(ctx.momenta) > 0.01
    else:
        assert named and ctx.momenta is None
