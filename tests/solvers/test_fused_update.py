"""The fused, blocked update (Solver._fused_update) gives the same bits as the per-param path.

Two solvers with the same seed train the same net side by side; one is forced onto the plain
path (normalize / regularize / compute_update_value / net.update, param after param). Blocks
are made small so that params span several blocks, and two threads share them.
"""
import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe import threads
from minicaffe.proto import caffe_pb2
from minicaffe.solvers import get_solver

from .solver_helpers import make_dataset

NET = """
name: 'Fused'
layer { name: 'data' type: 'SolverTestData' top: 'data' top: 'targets'
        hdf5_data_param { source: 'fused' batch_size: BATCH } }
layer { name: 'ip1' type: 'InnerProduct' bottom: 'data' top: 'ip1'
        param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 50 weight_filler { type: 'gaussian' std: 0.3 }
                              bias_filler { type: 'gaussian' std: 0.1 } } }
layer { name: 'relu' type: 'ReLU' bottom: 'ip1' top: 'ip1' }
layer { name: 'ip2' type: 'InnerProduct' bottom: 'ip1' top: 'ip2'
        param { lr_mult: 0.5 decay_mult: 3 } param { lr_mult: 0 }
        inner_product_param { num_output: 1 weight_filler { type: 'gaussian' std: 0.3 } } }
layer { name: 'loss' type: 'EuclideanLoss' bottom: 'ip2' bottom: 'targets' top: 'loss' }
"""

CASES = [
    ("SGD", dict(momentum=0.9, weight_decay=0.01)),
    ("SGD", dict(momentum=0.9, weight_decay=0.01, regularization_type="L1", iter_size=2)),
    ("SGD", dict(momentum=0.5, clip_gradients=0.05)),
    ("Nesterov", dict(momentum=0.9, weight_decay=0.02, iter_size=2)),
    ("AdaGrad", dict(weight_decay=0.01, delta=1e-6)),
    ("RMSProp", dict(rms_decay=0.95, weight_decay=0.01, regularization_type="L1")),
    ("AdaDelta", dict(base_lr=1.0, momentum=0.95, delta=1e-6, weight_decay=0.01)),
    ("Adam", dict(momentum=0.9, momentum2=0.999, delta=1e-8, weight_decay=0.01, iter_size=2)),
]


def _solver(kind, fields, fused):
    num = 8
    make_dataset("fused", num=num, dim=60, seed=3)
    iter_size = fields.get("iter_size", 1)
    param = caffe_pb2.SolverParameter(type=kind, base_lr=fields.pop("base_lr", 0.05),
                                      lr_policy="step", gamma=0.5, stepsize=2, max_iter=100,
                                      random_seed=7, snapshot_after_train=False)
    for key, value in fields.items():
        setattr(param, key, value)
    text_format.Parse(NET.replace("BATCH", str(num // iter_size)), param.net_param)
    solver = get_solver(param)
    if not fused:
        solver._can_fuse = lambda: False
    solver.FUSED_BLOCK = 700    # ip1's 3000 weights span five blocks, one of them partial
    solver._make_blocks()
    return solver


@pytest.mark.parametrize("kind,fields", CASES)
@pytest.mark.parametrize("num_threads", [1, 2])
def test_fused_update_equals_plain_update(kind, fields, num_threads, monkeypatch):
    monkeypatch.setattr(threads, "MIN_PARALLEL_ELEMENTS", 1)   # split even this small net
    before = threads.get_num_threads()
    threads.set_num_threads(num_threads)
    try:
        fused, plain = _solver(kind, dict(fields), True), _solver(kind, dict(fields), False)
        assert fused._can_fuse() and len(fused._blocks) > len(fused.net.learnable_params)
        for _ in range(5):
            fused.step(1)
            plain.step(1)
            for a, b in zip(fused.net.learnable_params, plain.net.learnable_params):
                np.testing.assert_array_equal(a.data, b.data)
                np.testing.assert_array_equal(a.diff, b.diff)   # the step taken, as in Caffe
            for a, b in zip(fused.history, plain.history):
                np.testing.assert_array_equal(a.data, b.data)
    finally:
        threads.set_num_threads(before)


def test_fused_update_reports_non_finite_params():
    solver = _solver("SGD", dict(momentum=0.9), True)
    solver.step(1)
    blob = solver.net.learnable_params[0]
    blob.data.reshape(-1)[1234] = np.inf
    solver.net.clear_param_diffs()
    assert solver._fused_update(0.01) is False
    blob.data.reshape(-1)[1234] = 0
    huge = solver.net.learnable_params[0].data
    huge[...] = 3e38     # the block sums overflow, yet every value is finite
    solver.net.clear_param_diffs()
    with np.errstate(over="ignore"):
        assert solver._fused_update(0.0) is True


def test_subclass_overriding_compute_update_value_uses_its_own_update():
    from minicaffe.solvers.sgd import SGDSolver

    class HalfStep(SGDSolver):
        def compute_update_value(self, param_id, rate):
            super().compute_update_value(param_id, rate)
            self.net.learnable_params[param_id].diff[...] *= 0.5

    solver = _solver("SGD", dict(momentum=0.9), True)
    solver.__class__ = HalfStep
    assert not solver._can_fuse()
