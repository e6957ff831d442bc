"""Caffe's closed-form solver check on a least-squares net, for all six update rules.

E = 1/(2N) ||X w + b - y||^2 + wd/2 ||(w, b)||^2, so the gradient is known exactly:
g = X_a^T (X_a theta - y) / N + wd theta with X_a = [X, 1], theta = (w, b). After K
solver iterations we compute the (K+1)-th update by hand from the weights and
history and compare it with what the solver does (as test_gradient_based_solver.cpp).
"""
import numpy as np
import pytest

from minicaffe.solvers import get_solver

from .solver_helpers import lsq_solver_param, make_dataset

NUM, DIM = 4, 6
DELTA = 1e-8     # the default delta, for the adaptive solvers
RMS_DECAY = 0.95
MOMENTUM2 = 0.999


@pytest.fixture(autouse=True)
def dataset():
    return make_dataset("lsq", NUM, DIM)


def flat(solver, blobs):
    """(weights, bias) blobs -> one float64 vector theta = (w, b)."""
    return np.concatenate([b.data.ravel().astype(np.float64) for b in blobs])


def expected_update(kind, data, targets, theta, hist, hist2, lr, wd, mom, t, l1=False):
    """The update value (to subtract) and the new history, in float64."""
    xa = np.hstack([data.astype(np.float64), np.ones((len(data), 1))])
    y = targets.astype(np.float64).ravel()
    grad = xa.T @ (xa @ theta - y) / len(data)
    grad += wd * (np.sign(theta) if l1 else theta)
    if kind == "SGD":
        update = lr * grad + mom * hist
        return update, update, None
    if kind == "Nesterov":
        new_hist = lr * grad + mom * hist
        return (1 + mom) * new_hist - mom * hist, new_hist, None
    if kind == "AdaGrad":
        new_hist = hist + grad ** 2
        return lr * grad / (np.sqrt(new_hist) + DELTA), new_hist, None
    if kind == "RMSProp":
        new_hist = RMS_DECAY * hist + (1 - RMS_DECAY) * grad ** 2
        return lr * grad / (np.sqrt(new_hist) + DELTA), new_hist, None
    if kind == "AdaDelta":
        new_hist = mom * hist + (1 - mom) * grad ** 2
        step = grad * np.sqrt((hist2 + DELTA) / (new_hist + DELTA))
        return lr * step, new_hist, mom * hist2 + (1 - mom) * step ** 2
    if kind == "Adam":
        m = mom * hist + (1 - mom) * grad
        v = MOMENTUM2 * hist2 + (1 - MOMENTUM2) * grad ** 2
        alpha = lr * np.sqrt(1 - MOMENTUM2 ** t) / (1 - mom ** t)
        return alpha * m / (np.sqrt(v) + DELTA), m, v
    raise ValueError(kind)


def make_solver(kind, lr, wd, mom, **kw):
    extra = {"rms_decay": RMS_DECAY} if kind == "RMSProp" else {}
    extra.update(kw)
    return get_solver(lsq_solver_param(kind, base_lr=lr, weight_decay=wd, momentum=mom, num=NUM,
                                       **extra))


def check_next_update(kind, lr=0.1, wd=0.0, mom=0.0, iters_before=0, share=False,
                      **kw):
    solver = make_solver(kind, lr, wd, mom, share=share, **kw)
    solver.step(iters_before)
    params = solver.net.layer_dict["innerprod"].blobs
    assert len(solver.net.learnable_params) == 2      # shared params appear once
    n = len(solver.history) // (2 if kind in ("AdaDelta", "Adam") else 1)
    assert n == 2
    theta = flat(solver, params)
    hist = flat(solver, solver.history[:2])
    hist2 = flat(solver, solver.history[2:]) if len(solver.history) == 4 else None
    data, targets = make_dataset("lsq", NUM, DIM)
    update, new_hist, new_hist2 = expected_update(
        kind, data, targets, theta, hist, hist2, lr, wd, mom, iters_before + 1,
        l1=kw.get("regularization_type") == "L1")

    solver.step(1)
    got = flat(solver, params)
    np.testing.assert_allclose(got, theta - update, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(flat(solver, solver.history[:2]), new_hist, rtol=1e-4, atol=1e-7)
    if new_hist2 is not None:
        np.testing.assert_allclose(flat(solver, solver.history[2:]), new_hist2, rtol=1e-4,
                                   atol=1e-9)
    assert all(b.data.dtype == np.float32 for b in list(params) + solver.history)
    if share:   # the second InnerProduct really uses the same weights
        other = solver.net.layer_dict["innerprod2"].blobs
        np.testing.assert_array_equal(flat(solver, other), got)
    return solver


ALL = ["SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"]
WITH_MOMENTUM = ["SGD", "Nesterov", "AdaDelta", "Adam"]


@pytest.mark.parametrize("kind", ALL)
def test_first_update(kind):
    check_next_update(kind, lr=1.0 if kind == "AdaDelta" else 0.1,
                      mom=0.95 if kind in ("AdaDelta", "Adam") else 0.0)


@pytest.mark.parametrize("kind", ALL)
def test_update_with_weight_decay(kind):
    check_next_update(kind, lr=0.1, wd=0.5, mom=0.9 if kind in ("AdaDelta", "Adam") else 0.0)


@pytest.mark.parametrize("kind", WITH_MOMENTUM)
def test_update_with_momentum_after_several_iterations(kind):
    check_next_update(kind, lr=0.05, mom=0.9, iters_before=4)


@pytest.mark.parametrize("kind", ALL)
def test_update_with_everything_after_several_iterations(kind):
    mom = 0.9 if kind in WITH_MOMENTUM else 0.0
    check_next_update(kind, lr=0.05, wd=0.1, mom=mom, iters_before=4)


@pytest.mark.parametrize("kind", ALL)
def test_update_with_shared_params(kind):
    mom = 0.9 if kind in WITH_MOMENTUM else 0.0
    check_next_update(kind, lr=0.05, wd=0.1, mom=mom, iters_before=2, share=True)


def test_l1_regularization():
    check_next_update("SGD", lr=0.05, wd=0.3, mom=0.5, iters_before=2, regularization_type="L1")


@pytest.mark.parametrize("kind", ALL)
def test_iter_size_accumulation_matches_one_big_batch(kind):
    mom = 0.9 if kind in WITH_MOMENTUM else 0.0
    whole = make_solver(kind, 0.05, 0.1, mom)
    whole.step(4)
    accumulated = make_solver(kind, 0.05, 0.1, mom, iter_size=2)
    assert accumulated.net.blobs["data"].shape[0] == NUM // 2
    accumulated.step(4)
    for a, b in zip(whole.net.learnable_params, accumulated.net.learnable_params):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("share", [False, True])
def test_snapshot_restore_continues_bit_for_bit(kind, share, tmp_path):
    mom = 0.9 if kind in WITH_MOMENTUM else 0.0
    straight = make_solver(kind, 0.05, 0.1, mom, share=share)
    straight.step(6)

    first = make_solver(kind, 0.05, 0.1, mom, share=share, snapshot=3,
                        snapshot_prefix=str(tmp_path / "lsq"), max_iter=3)
    first.solve()
    state = tmp_path / "lsq_iter_3.solverstate"
    assert state.exists() and (tmp_path / "lsq_iter_3.caffemodel").exists()

    second = make_solver(kind, 0.05, 0.1, mom, share=share, seed=99)  # other random init
    second.restore(str(state))
    assert second.iter == 3
    second.step(3)
    for a, b in zip(straight.net.learnable_params, second.net.learnable_params):
        np.testing.assert_array_equal(a.data, b.data)
    for a, b in zip(straight.history, second.history):
        np.testing.assert_array_equal(a.data, b.data)


def test_lr_mult_and_decay_mult_apply_per_param():
    param = lsq_solver_param("SGD", base_lr=0.1, weight_decay=0.5, num=NUM)
    ip = param.net_param.layer[1]
    ip.param[0].lr_mult = 2.0      # weights: twice the rate, no decay
    ip.param[0].decay_mult = 0.0
    ip.param[1].lr_mult = 0.0      # bias frozen
    solver = get_solver(param)
    w, b = solver.net.layer_dict["innerprod"].blobs
    theta = flat(solver, (w, b))
    data, targets = make_dataset("lsq", NUM, DIM)
    xa = np.hstack([data.astype(np.float64), np.ones((NUM, 1))])
    grad = xa.T @ (xa @ theta - targets.ravel()) / NUM
    solver.step(1)
    np.testing.assert_allclose(w.data.ravel(), theta[:-1] - 0.2 * grad[:-1], rtol=1e-5, atol=1e-7)
    assert b.data.ravel()[0] == np.float32(theta[-1])


def test_clip_gradients_scales_by_the_global_norm():
    param = lsq_solver_param("SGD", base_lr=0.1, num=NUM, clip_gradients=0.01)
    solver = get_solver(param)
    params = solver.net.layer_dict["innerprod"].blobs
    theta = flat(solver, params)
    data, targets = make_dataset("lsq", NUM, DIM)
    xa = np.hstack([data.astype(np.float64), np.ones((NUM, 1))])
    grad = xa.T @ (xa @ theta - targets.ravel()) / NUM
    assert np.linalg.norm(grad) > 0.01
    solver.step(1)
    np.testing.assert_allclose(flat(solver, params), theta - 0.1 * grad * 0.01 / np.linalg.norm(grad),
                               rtol=1e-5, atol=1e-7)


def test_deprecated_solver_type_enum_selects_the_solver():
    param = lsq_solver_param("SGD", num=NUM)
    param.ClearField("type")
    param.solver_type = param.ADAM
    solver = get_solver(param)
    assert type(solver).__name__ == "AdamSolver" and len(solver.history) == 4


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_100_straight_equals_50_restore_50(kind, tmp_path):
    straight = make_solver(kind, 0.01, 0.01, 0.9, max_iter=100)
    straight.solve()
    first = make_solver(kind, 0.01, 0.01, 0.9, max_iter=50, snapshot=50,
                        snapshot_prefix=str(tmp_path / "half"))
    first.solve()
    resumed = make_solver(kind, 0.01, 0.01, 0.9, max_iter=100)
    resumed.solve(str(tmp_path / "half_iter_50.solverstate"))
    assert resumed.iter == 100
    for a, b in zip(straight.net.learnable_params + straight.history,
                    resumed.net.learnable_params + resumed.history):
        np.testing.assert_array_equal(a.data, b.data)
