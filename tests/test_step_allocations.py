"""Allocation per training iteration, in steady state (tracemalloc; numpy reports its array
buffers to it). After warm-up a step should only create small Python objects and array views:
every layer's forward and backward, clearing the diffs and the solver's update are measured
by their peak of newly allocated memory.

Layer types in ALLOCATING still make per-call temporaries (their fixes are elsewhere); they are
measured and listed but not held to the limit, so this test catches new offenders now and
holds each of them once taken off the list.
"""
import tracemalloc

import pytest
from google.protobuf import text_format

import minicaffe as caffe
from minicaffe.proto import caffe_pb2

# Bytes: bookkeeping and views only, no batch- or param-sized array. numpy's buffered ufunc
# loops (any broadcast operand, e.g. a per-channel (rows, 1) column) allocate one 32 KiB
# iterator buffer per call (bufsize 8192 x 4 bytes); that is not an array and is allowed.
LIMIT = 48 * 1024
# Known to allocate per call at the time of writing: conv.py / im2col.py (Convolution),
# pooling.py (Pooling, and the average_pool_backward that WITHIN_CHANNEL LRN uses).
ALLOCATING = {"Convolution", "Pooling"}


def _peaks(solver, steps=2):
    """{(phase, layer name, type): peak bytes allocated} over `steps` solver iterations, with
    the update ('solver' phases) measured on its own."""
    net = solver.net
    peaks = {}
    start = {}

    def before(i):
        tracemalloc.reset_peak()
        start["bytes"] = tracemalloc.get_traced_memory()[0]

    def after(kind):
        def record(i):
            current, peak = tracemalloc.get_traced_memory()
            key = (kind, net.layer_names[i], net.layers[i].type)
            peaks[key] = max(peaks.get(key, 0), peak - start["bytes"])
        return record

    net.before_forward(before)
    net.after_forward(after("forward"))
    net.before_backward(before)
    net.after_backward(after("backward"))
    tracemalloc.start()
    try:
        solver.step(steps)
        for name, fn in (("clear_param_diffs", net.clear_param_diffs),
                         ("apply_update", solver.apply_update),
                         ("params_finite", net.params_finite)):
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            fn()
            peaks[("solver", name, "")] = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
        for hooks in net._hooks.values():
            hooks.clear()
    return peaks


def _check(peaks, known=()):
    """No peak above LIMIT, except for ALLOCATING types and the (phase, layer name) in known."""
    over = {k: v for k, v in peaks.items()
            if v > LIMIT and k[2] not in ALLOCATING and k[:2] not in known}
    listed = sorted(((v, k) for k, v in peaks.items() if v > LIMIT), reverse=True)
    assert not over, (f"allocations above {LIMIT} bytes per call: {over}; all offenders: "
                      + ", ".join(f"{k[0]} {k[1]} ({k[2]}) {v / 1024:.0f} KiB" for v, k in listed))


@pytest.mark.parametrize("solver_type", ["SGD", "Adam"])
def test_lenet_step_allocates_no_large_arrays(mnist_lmdb, solver_type):
    from tests.test_lenet_mnist import LENET, lenet_on
    from minicaffe.proto_io import read_solver_param
    net = lenet_on(mnist_lmdb)
    for layer in net.layer:
        if layer.type == "Data":
            # Batches made in the calling thread: a prefetch thread's work would be
            # counted against whichever layer runs meanwhile.
            layer.data_param.prefetch = 0
    param = read_solver_param(LENET / "lenet_solver.prototxt")
    param.ClearField("net")
    param.net_param.CopyFrom(net)
    param.ClearField("test_iter")
    param.test_interval = 0
    param.snapshot = 0
    param.display = 0
    param.type = solver_type
    if solver_type == "Adam":
        param.momentum2 = 0.999
    solver = caffe.get_solver(param)
    solver.step(3)   # warm-up: buffers and scratch arrays reach their steady sizes
    peaks = _peaks(solver)
    # Decoding a batch (Datum parsing, joining the records' bytes) allocates; that runs in
    # the prefetch thread in training, so it is left out here.
    peaks = {k: v for k, v in peaks.items() if k[2] != "Data"}
    _check(peaks)


NORM_NET = """
name: "norm" force_backward: true
layer { name: "in" type: "Input" top: "x" top: "t"
        input_param { shape { dim: 4 dim: 16 dim: 24 dim: 24 } shape { dim: 4 dim: 16 dim: 24 dim: 24 } } }
layer { name: "lrn" type: "LRN" bottom: "x" top: "lrn" lrn_param { local_size: 5 alpha: 1e-4 beta: 0.75 } }
layer { name: "lrn_w" type: "LRN" bottom: "lrn" top: "lrn_w"
        lrn_param { local_size: 3 norm_region: WITHIN_CHANNEL } }
layer { name: "bn" type: "BatchNorm" bottom: "lrn_w" top: "lrn_w"
        batch_norm_param { use_global_stats: false } }
layer { name: "scale" type: "Scale" bottom: "lrn_w" top: "lrn_w" scale_param { bias_term: true } }
layer { name: "bn2" type: "BatchNorm" bottom: "lrn_w" top: "bn2" }
layer { name: "scale2" type: "Scale" bottom: "bn2" top: "scale2" scale_param { bias_term: true } }
layer { name: "loss" type: "EuclideanLoss" bottom: "scale2" bottom: "t" top: "loss" }
"""


def test_normalization_layers_train_without_allocating():
    param = caffe_pb2.SolverParameter(type="SGD", base_lr=0.01, momentum=0.9, weight_decay=1e-3,
                                      lr_policy="fixed", max_iter=10, snapshot_after_train=False)
    text_format.Parse(NORM_NET, param.net_param)
    solver = caffe.get_solver(param)
    rng = __import__("numpy").random.default_rng(0)
    solver.net.blobs["x"].data[...] = rng.normal(size=solver.net.blobs["x"].shape)
    solver.step(3)
    peaks = _peaks(solver)
    assert {k[2] for k in peaks} >= {"LRN", "BatchNorm", "Scale"}
    _check(peaks, known={("backward", "lrn_w")})   # pooling.average_pool_backward


def test_params_finite_without_float64_sums():
    import numpy as np
    param = caffe_pb2.SolverParameter(type="SGD", base_lr=0.01, lr_policy="fixed", max_iter=1)
    text_format.Parse(NORM_NET, param.net_param)
    net = caffe.get_solver(param).net
    assert net.params_finite()
    weights = net.learnable_params[0].data
    weights[...] = 3e38           # finite, though its float32 sum overflows
    assert net.params_finite()
    weights.reshape(-1)[3] = np.nan
    assert not net.params_finite()
    weights.reshape(-1)[3] = -np.inf
    assert not net.params_finite()


FUSED_NET = """
name: "fused" force_backward: true
layer { name: "in" type: "Input" top: "x" top: "t"
        input_param { shape { dim: 4 dim: 16 dim: 24 dim: 24 } shape { dim: 4 dim: 16 dim: 24 dim: 24 } } }
layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" }
layer { name: "scale" type: "Scale" bottom: "x" top: "x" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "x" top: "x" }
layer { name: "loss" type: "EuclideanLoss" bottom: "x" bottom: "t" top: "loss" }
"""


def test_fused_normalization_chain_steps_without_allocating():
    """The fused BatchNorm -> Scale -> ReLU step (fuse.py) runs only without callbacks, so it is
    measured over whole solver steps: nothing near a blob's size (147 KiB here) is allocated."""
    param = caffe_pb2.SolverParameter(type="SGD", base_lr=0.01, momentum=0.9, lr_policy="fixed",
                                      max_iter=10, snapshot_after_train=False)
    text_format.Parse(FUSED_NET, param.net_param)
    solver = caffe.get_solver(param)
    net = solver.net
    assert len(net._fused) == 1
    rng = __import__("numpy").random.default_rng(0)
    net.blobs["t"].data[...] = rng.normal(size=net.blobs["t"].shape)
    solver.step(3)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        solver.step(2)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert net._forward_fused
    assert peak <= LIMIT, f"a fused step allocated {peak / 1024:.0f} KiB"
