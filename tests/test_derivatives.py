"""Finite-difference HVPs, Lanczos views and checkpoint segments against exact references."""
import numpy as np
import torch

from diffin_core.engine.functional import FunctionalModel
from diffin_core.engine.lanczos import lanczos
from diffin_core.methods import segment_lengths
from diffin_core.methods.diffin import interval_functions
from diffin_core.engine.models import MLP, SmallCNN


def _batch(shape, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g), torch.randint(0, 10, (n,), generator=g)


def test_fd_hvp_matches_double_backward_float32():
    torch.manual_seed(0)
    model = MLP(20, (16,), 10)
    fm = FunctionalModel(model)
    theta = fm.theta_of(model)
    x, y = _batch((20,))
    for seed in range(3):
        v = torch.randn(fm.num_params, generator=torch.Generator().manual_seed(seed))
        exact = fm.hvp_exact(theta, x, y, v)
        approx = fm.hvp_fd(theta, x, y, v, eps=1e-3)
        rel = float(torch.linalg.vector_norm(approx - exact) / torch.linalg.vector_norm(exact))
        assert approx.dtype == torch.float32
        assert rel < 1e-2, rel


def test_fd_hvp_on_cnn_float32():
    torch.manual_seed(1)
    model = SmallCNN(1, 10, 28)
    fm = FunctionalModel(model)
    theta = fm.theta_of(model)
    x, y = _batch((1, 28, 28), n=32)
    v = fm.batch_grad(theta, x, y)            # the kind of vector Diff-In multiplies
    exact = fm.hvp_exact(theta, x, y, v)
    rel = float(torch.linalg.vector_norm(fm.hvp_fd(theta, x, y, v) - exact) / torch.linalg.vector_norm(exact))
    assert rel < 1e-2, rel


def test_per_sample_grads_and_directional_agree_with_loops():
    torch.manual_seed(2)
    model = MLP(8, (6,), 3)
    fm = FunctionalModel(model)
    theta = fm.theta_of(model)
    x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))
    psg = fm.per_sample_grads(theta, x, y)
    for i in range(5):
        assert torch.allclose(psg[i], fm.batch_grad(theta, x[i:i + 1], y[i:i + 1]), atol=1e-6)
    v = torch.randn(fm.num_params)
    assert torch.allclose(fm.directional(theta, x, y, v), psg @ v, atol=1e-5)


def test_lanczos_view_applies_matrix_functions():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    eig = np.linspace(0.0, 5.0, 30)
    H = torch.tensor(q @ np.diag(eig) @ q.T)
    u = torch.tensor(rng.normal(size=30))
    view = lanczos(lambda v: H @ v, u, 30)              # full Krylov space: exact
    phi, a = interval_functions(lr=0.1, steps=7)
    ref_a = torch.tensor(q @ np.diag((1 - 0.1 * eig) ** 7) @ q.T) @ u
    assert torch.allclose(view.apply(a, u), ref_a, atol=1e-8)
    ref_phi = sum(torch.linalg.matrix_power(torch.eye(30, dtype=H.dtype) - 0.1 * H, j) @ u for j in range(7))
    assert torch.allclose(view.apply(phi, u), ref_phi, atol=1e-8)
    small = lanczos(lambda v: H @ v, u, 8)              # few steps: still close for smooth f
    err = torch.linalg.vector_norm(small.apply(a, u) - ref_a) / torch.linalg.vector_norm(ref_a)
    assert err < 0.05


def test_interval_functions_stay_contracting_for_large_curvature():
    phi, a = interval_functions(lr=0.05, steps=50)
    big = torch.tensor([37.0, 100.0, 1e4, -3.0])      # 0.05 * 37 > 1: substeps would explode
    assert torch.all(a(big).abs() <= 1.0)
    assert torch.all((phi(big) >= 0) & (phi(big) <= 50))
    assert float(a(torch.tensor([-3.0]))) == 1.0         # negative curvature clipped to flat


def test_segments_cover_training_and_centre_on_checkpoints():
    seg = segment_lengths([0, 50, 100, 150])
    assert seg.sum() == 150
    assert list(seg) == [25, 50, 50, 25]
    assert segment_lengths([40, 80]).tolist() == [60, 20]
    assert segment_lengths([7]).tolist() == [7]


def test_conjugate_gradient_solves_spd_and_stays_finite_on_indefinite():
    from diffin_core.methods.influence_function import conjugate_gradient
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    b = torch.tensor(rng.normal(size=20))
    spd = torch.tensor(q @ np.diag(np.linspace(0.5, 4, 20)) @ q.T)
    assert torch.allclose(spd @ conjugate_gradient(lambda v: spd @ v, b, 100, tol=1e-10), b, atol=1e-6)
    indefinite = torch.tensor(q @ np.diag(np.linspace(-3, 4, 20)) @ q.T)
    x = conjugate_gradient(lambda v: indefinite @ v, b, 100)
    assert torch.isfinite(x).all() and torch.dot(x, b) > 0


def test_no_tf32_turns_both_flags_off_and_restores_them():
    """The FD-HVP guard: TF32 off inside (matmul and cuDNN), the caller's flags back after,
    whichever values the caller had set (touching only the allow_tf32 flags, see no_tf32)."""
    from diffin_core.engine.functional import no_tf32
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        for value in (True, False):
            torch.backends.cuda.matmul.allow_tf32 = value
            torch.backends.cudnn.allow_tf32 = value
            with no_tf32():
                assert torch.backends.cuda.matmul.allow_tf32 is False
                assert torch.backends.cudnn.allow_tf32 is False
            assert torch.backends.cuda.matmul.allow_tf32 is value
            assert torch.backends.cudnn.allow_tf32 is value
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_retained_graph_hvp_equals_the_exact_product():
    """Issue 19: a Lanczos view's exact products keep the batch's gradient graph
    (FunctionalModel.hvp_retained, reverse-over-reverse): every product of one closure equals
    hvp_exact's (forward-over-reverse) to float rounding, whole or in slices (the slice-order
    mean), on a BatchNorm CNN in eval mode with its own buffers; and hvp.product takes it for
    views (the graph is built once per view, not once per product)."""
    from types import SimpleNamespace
    from diffin_core.engine import hvp
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10))
    model.train()
    model(torch.rand(16, 1, 8, 8))                    # running statistics not at their initial values
    fm = FunctionalModel(model)
    theta = fm.theta_of(model)
    x, y = _batch((1, 8, 8), n=20)
    vs = [torch.randn(fm.num_params, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    for rows in (None, 8):                            # one graph; three slices (8, 8, 4 rows)
        fm.max_rows = rows
        hv = fm.hvp_retained(theta, x, y)
        for v in vs:
            exact = fm.hvp_exact(theta, x, y, v)
            torch.testing.assert_close(hv(v), exact, rtol=1e-5, atol=1e-6)
    fm.max_rows = None
    builds = []
    real = FunctionalModel.hvp_retained
    FunctionalModel.hvp_retained = lambda self, *a: (builds.append(1), real(self, *a))[1]
    try:
        ctx = SimpleNamespace(settings=SimpleNamespace(hvp="exact", eps=1e-3), memory=None)
        mv = hvp.product(ctx, 0, fm, theta, x, y, None)
        outs = [mv(v) for v in vs]
    finally:
        FunctionalModel.hvp_retained = real
    assert builds == [1]
    for v, out in zip(vs, outs):
        torch.testing.assert_close(out, fm.hvp_exact(theta, x, y, v), rtol=1e-5, atol=1e-6)
