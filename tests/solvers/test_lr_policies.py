"""lr_policy values against their formulas, and how the solver uses them."""
import math

import numpy as np
import pytest

from minicaffe.proto import caffe_pb2
from minicaffe.solvers import get_solver, learning_rate
from minicaffe.solvers.lr_policies import check_lr_policy

from .solver_helpers import lsq_solver_param, make_dataset

ITERS = [0, 1, 2, 9, 10, 11, 99, 100, 101, 250, 999]


def solver_param(**fields):
    p = caffe_pb2.SolverParameter(base_lr=0.01, max_iter=1000)
    for k, v in fields.items():
        getattr(p, k).extend(v) if isinstance(v, list) else setattr(p, k, v)
    return p


def rates(p):
    out, step = [], 0
    for it in ITERS:
        rate, step = learning_rate(p, it, step)
        out.append(rate)
    return out


F32 = dict(rel=1e-6)   # the fields are float32, the formulas below use the same values


@pytest.mark.parametrize("policy,fields,formula", [
    ("fixed", {}, lambda p, it: p.base_lr),
    ("step", {"gamma": 0.5, "stepsize": 10}, lambda p, it: p.base_lr * p.gamma ** (it // 10)),
    ("exp", {"gamma": 0.99}, lambda p, it: p.base_lr * p.gamma ** it),
    ("inv", {"gamma": 1e-4, "power": 0.75},
     lambda p, it: p.base_lr * (1 + p.gamma * it) ** -p.power),
    ("poly", {"power": 2.0}, lambda p, it: p.base_lr * (1 - it / 1000) ** 2),
    ("poly", {"power": 0.5}, lambda p, it: p.base_lr * math.sqrt(1 - it / 1000)),
    ("sigmoid", {"gamma": 0.05, "stepsize": 100},
     lambda p, it: p.base_lr / (1 + math.exp(-p.gamma * (it - 100)))),
])
def test_policy_values(policy, fields, formula):
    p = solver_param(lr_policy=policy, **fields)
    for it, rate in zip(ITERS, rates(p)):
        assert rate == pytest.approx(formula(p, it), **F32), (policy, it)


def test_multistep_counts_the_stepvalues_reached():
    p = solver_param(lr_policy="multistep", gamma=0.1, stepvalue=[10, 100, 250])
    expected_steps = [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    for it, rate, steps in zip(ITERS, rates(p), expected_steps):
        assert rate == pytest.approx(0.01 * 0.1 ** steps, **F32), it


def test_multistep_advances_at_most_one_step_per_call_like_caffe():
    p = solver_param(lr_policy="multistep", gamma=0.1, stepvalue=[10, 20])
    rate, step = learning_rate(p, 50, 0)   # e.g. a restored iter with current_step 0
    assert step == 1 and rate == pytest.approx(0.001, **F32)
    rate, step = learning_rate(p, 51, step)
    assert step == 2


def test_step_sets_current_step():
    p = solver_param(lr_policy="step", gamma=0.1, stepsize=10)
    assert learning_rate(p, 35, 0)[1] == 3


@pytest.mark.parametrize("fields,message", [
    ({}, "lr_policy is not set"),
    ({"lr_policy": "cosine"}, "unknown lr_policy 'cosine'"),
    ({"lr_policy": "step", "gamma": 0.1}, "positive stepsize"),
    ({"lr_policy": "sigmoid", "gamma": 0.1}, "positive stepsize"),
    ({"lr_policy": "exp", "gamma": -1.0}, "gamma >= 0"),
    ({"lr_policy": "poly", "power": 1.0, "max_iter": 0}, "positive max_iter"),
])
def test_bad_policies_are_rejected(fields, message):
    p = solver_param(**fields)
    with pytest.raises(ValueError, match=message):
        check_lr_policy(p)


def test_solver_uses_and_logs_the_rate(caplog):
    make_dataset("lsq", 4, 6)
    param = lsq_solver_param("SGD", base_lr=0.1, max_iter=30, display=10)
    param.lr_policy = "step"
    param.gamma = 0.5
    param.stepsize = 10
    solver = get_solver(param)
    seen = []
    solver.add_callback(on_iteration_end=lambda: seen.append(solver.learning_rate))
    with caplog.at_level("INFO", logger="minicaffe"):
        solver.step(25)
    assert seen[0] == seen[9] == np.float32(0.1)
    assert seen[10] == np.float32(0.05) and seen[24] == np.float32(0.025)
    assert solver.current_step == 2
    assert "Iteration 20, lr = 0.025" in caplog.text


def test_multistep_current_step_survives_snapshot(tmp_path):
    make_dataset("lsq", 4, 6)
    fields = dict(lr_policy="multistep", gamma=0.1, stepvalue=[2, 4],
                  snapshot_prefix=str(tmp_path / "ms"))
    straight = get_solver(lsq_solver_param("SGD", **fields))
    straight.step(6)
    first = get_solver(lsq_solver_param("SGD", **fields))
    first.step(3)
    first.snapshot()
    second = get_solver(lsq_solver_param("SGD", **fields))
    second.restore(str(tmp_path / "ms_iter_3.solverstate"))
    assert second.current_step == 1
    second.step(3)
    assert second.current_step == straight.current_step == 2
    for a, b in zip(straight.net.learnable_params, second.net.learnable_params):
        np.testing.assert_array_equal(a.data, b.data)
