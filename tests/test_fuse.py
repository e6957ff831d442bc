"""Training nets run in-place BatchNorm -> Scale (-> ReLU) chains as one step (fuse.py): the same
blobs and running statistics as running the layers one by one, bit for bit, and the same diffs
and parameter gradients to float32 rounding."""
import numpy as np
import pytest

import minicaffe
from minicaffe.kernels import jit
from minicaffe.layers.normalization import BatchNormScaleReLU


@pytest.fixture(autouse=True, params=["numpy", "compiled"])
def passes(request, monkeypatch):
    """Every test runs on both the numpy passes and the compiled ones (kernels/normalization.py)."""
    if request.param == "compiled" and not jit.available():
        pytest.skip(f"numba is not installed ({jit.INSTALL_HINT})")
    monkeypatch.setattr(jit, "_enabled", request.param == "compiled")
    return request.param


def _text(shape, bn="", scale="bias_term: true", relu="", bn_in_place=True):
    dims = " ".join(f"dim: {d}" for d in shape)
    bn_top = "c" if bn_in_place else "n"
    text = (f'layer {{ name: "target" type: "Input" top: "target" input_param {{ shape {{ dim: {shape[0]} dim: 3 }} }} }}\n'
            f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}\n'
            f'layer {{ name: "c" type: "Convolution" bottom: "data" top: "c" '
            f'convolution_param {{ num_output: 5 kernel_size: 3 pad: 1 weight_filler {{ type: "gaussian" std: 0.3 }} }} }}\n'
            f'layer {{ name: "bn" type: "BatchNorm" bottom: "c" top: "{bn_top}" batch_norm_param {{ {bn} }} }}\n'
            f'layer {{ name: "sc" type: "Scale" bottom: "{bn_top}" top: "{bn_top}" scale_param {{ {scale} }} }}\n')
    if relu is not None:
        text += f'layer {{ name: "relu" type: "ReLU" bottom: "{bn_top}" top: "{bn_top}" {relu} }}\n'
    text += (f'layer {{ name: "ip" type: "InnerProduct" bottom: "{bn_top}" top: "ip" '
             f'inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}\n'
             f'layer {{ name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "target" top: "loss" }}\n')
    return text


def _pair(tmp_path, text, phase=minicaffe.TRAIN):
    """Two nets from one prototxt with the same random params: fused (default) and plain."""
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    nets = [minicaffe.Net(str(path), phase) for _ in range(2)]
    rng = np.random.default_rng(0)
    for name, blobs in nets[0].params.items():
        for j, blob in enumerate(blobs):
            if nets[0].layer_dict[name].type == "BatchNorm":
                value = (rng.normal(0, 1, blob.shape), rng.uniform(0.5, 2, blob.shape), 3.0)[j]
            else:
                value = rng.normal(0.5, 0.5, blob.shape)
            for net in nets:
                net.params[name][j].data[...] = value
    nets[1].fuse_chains = False
    for name in nets[0].input_names:
        value = rng.standard_normal(nets[0].blobs[name].shape)
        for net in nets:
            net.blobs[name].data[...] = value
    return nets


def _state(net):
    state = {f"blob {n} {k}": getattr(b, k).copy() for n, b in net.blobs.items() for k in ("data", "diff")}
    for name, blobs in net.params.items():
        for j, b in enumerate(blobs):
            state[f"param {name} {j} data"] = b.data.copy()
            state[f"param {name} {j} diff"] = b.diff.copy()
    return state


def _assert_same(fused, plain, exact):
    """Data (blobs, params, running statistics) bit for bit when `exact`; diffs to float32
    rounding: the fused backward shares one reduction between Scale and BatchNorm."""
    _assert_states_match(_state(fused), _state(plain), exact)


def _assert_states_match(a, b, exact):
    assert a.keys() == b.keys()
    for key in a:
        if exact and key.endswith("data"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            scale = max(1.0, float(np.abs(b[key]).max(initial=0)))
            if key == "param c 1 diff":
                # The convolution's bias gradient sums the chain's dx, which is 0 up to rounding
                # (BatchNorm's output does not move with a shift of its input): compare it at the
                # size of what it sums.
                scale = max(scale, float(np.abs(b["blob c diff"]).sum()))
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5 * scale, err_msg=key)


def _fused_chains(net):
    return [(step.type, chain) for step, chain in net._fused.values()]


def _train_steps(nets, steps=2):
    for _ in range(steps):
        for net in nets:
            net.clear_param_diffs()
            net.forward_backward()


# Spatial size 8x8 = 64 takes Scale's blocked row path, whose sums are the fused step's; 3x3
# takes its broadcast path, which sums in another order (equal to rounding).
@pytest.mark.parametrize("hw, exact", [(8, True), (3, False)])
@pytest.mark.parametrize("relu", ["", "relu_param { negative_slope: 0.1 }", None])
@pytest.mark.parametrize("scale", ["bias_term: true", "bias_term: false"])
def test_train_step_matches_layers(tmp_path, hw, exact, relu, scale):
    nets = _pair(tmp_path, _text((3, 2, hw, hw), scale=scale, relu=relu))
    kind = "BatchNorm+Scale" + ("" if relu is None else "+ReLU")
    assert _fused_chains(nets[0]) == [(kind, [3, 4] + ([] if relu is None else [5]))]
    _train_steps(nets)
    _assert_same(*nets, exact)


@pytest.mark.parametrize("bn", ["use_global_stats: true", "use_global_stats: false moving_average_fraction: 0.9"])
def test_global_and_batch_statistics(tmp_path, bn):
    nets = _pair(tmp_path, _text((2, 2, 8, 8), bn=bn, relu=""))
    _train_steps(nets, steps=3)
    _assert_same(*nets, exact=True)


def test_test_net_forward(tmp_path):
    nets = _pair(tmp_path, _text((2, 2, 8, 8), relu=""), phase=minicaffe.TEST)
    assert len(nets[0]._fused) == 1
    for net in nets:
        net.forward()
    _assert_same(*nets, exact=True)


def test_solver_trajectory_matches(tmp_path):
    """A few SGD iterations with momentum: params equal, to rounding, with and without fusion."""
    nets = _pair(tmp_path, _text((4, 2, 8, 8), relu=""))
    from minicaffe.proto import caffe_pb2
    results = []
    for fuse in (True, False):
        param = caffe_pb2.SolverParameter(base_lr=1e-4, momentum=0.9, weight_decay=1e-3, lr_policy="fixed",
                                          max_iter=100, display=0, type="SGD")
        param.net = str(tmp_path / "net.prototxt")
        solver = minicaffe.get_solver(param)
        for name, blobs in nets[0].params.items():
            for j, b in enumerate(blobs):
                solver.net.params[name][j].data[...] = b.data
        for name in nets[0].input_names:
            solver.net.blobs[name].data[...] = nets[0].blobs[name].data
        solver.net.fuse_chains = fuse
        solver.step(4)
        results.append(_state(solver.net))
    _assert_states_match(*results, exact=False)


def test_partial_backward_after_fused_forward(tmp_path):
    """A fused forward, then backward layer by layer (a range, or with a callback): the chain's
    layers get the state their own backward reads (Scale's copy of its input)."""
    nets = _pair(tmp_path, _text((2, 2, 8, 8), relu=""))
    seen = []
    nets[0].after_backward(seen.append)
    for net in nets:
        net.forward()
        net.backward()
    assert seen == list(range(len(nets[0].layers) - 1, -1, -1))
    _assert_same(*nets, exact=True)
    for net in nets:
        net.forward()
        net._backward(len(net.layers) - 1, 0)
        net._backward(5, 3)     # the chain alone, again
    _assert_same(*nets, exact=True)


def test_forward_hooks_and_debug_info_run_the_layers(tmp_path):
    nets = _pair(tmp_path, _text((2, 2, 8, 8), relu=""))
    seen = []
    nets[0].before_forward(seen.append)
    nets[0].forward()
    assert not nets[0]._forward_fused and seen == list(range(len(nets[0].layers)))
    nets[1].debug_info = True
    nets[1].fuse_chains = True
    nets[1].forward()
    assert not nets[1]._forward_fused


@pytest.mark.parametrize("case", ["not in place", "Bias instead of Scale"])
def test_chains_that_are_not_fused(tmp_path, case):
    if case == "not in place":
        text = _text((2, 2, 8, 8), relu="", bn_in_place=False)
    else:
        text = _text((2, 2, 8, 8), relu="").replace('type: "Scale"', 'type: "Bias"').replace(
            "scale_param { bias_term: true }", "")
    nets = _pair(tmp_path, text)
    assert nets[0]._fused == {}


def test_chain_without_backward_in_a_training_net_is_left_alone(tmp_path):
    """A BatchNorm right on the input of a net whose convolution is frozen: its bottom needs no
    diff while the Scale learns, so the chain is run layer by layer."""
    text = _text((2, 2, 8, 8), relu="").replace('top: "c" convolution_param', 'top: "c" param { lr_mult: 0 } '
                                                 'convolution_param').replace(
        "pad: 1 weight", "pad: 1 bias_term: false weight")
    nets = _pair(tmp_path, text)
    assert nets[0]._fused == {}
    _train_steps(nets)
    _assert_same(*nets, exact=True)


def test_time_layers_reports_the_chain_on_its_batchnorm(tmp_path):
    from minicaffe.commands.time import time_layers
    net = _pair(tmp_path, _text((2, 2, 8, 8), relu=""))[0]
    forward, backward, *_ = time_layers(net, 2)
    names = net.layer_names
    assert forward[names.index("bn")] > 0 and backward[names.index("bn")] > 0
    assert forward[names.index("sc")] == forward[names.index("relu")] == 0
    assert [type(layer) for i, layer, _, _ in net.fused_steps()[0] if i == names.index("bn")] == [BatchNormScaleReLU]


def test_resnet_train_net_fuses_every_chain():
    """ResNet-50's 53 BatchNorm -> Scale chains (33 with a ReLU) all fuse in its training net, and
    one step at batch 1 gives the plain path's loss and gradients."""
    from pathlib import Path
    from tests.benchmark_module import load_benchmark
    root = Path(__file__).resolve().parents[1]
    train_bench = load_benchmark("train_bench")
    param = train_bench.train_net_param(root.parent / "shared" / "models" / "bench" / "resnet50_deploy.prototxt", 1)
    nets = [minicaffe.Net(param, minicaffe.TRAIN) for _ in range(2)]
    assert len(nets[0]._fused) == 53
    assert sum(step.relu is not None for step, _ in nets[0]._fused.values()) == 33
    nets[1].fuse_chains = False
    rng = np.random.default_rng(1)
    for name, blobs in nets[0].params.items():
        for j, b in enumerate(blobs):
            nets[1].params[name][j].data[...] = b.data
    x = rng.standard_normal(nets[0].blobs["data"].shape).astype(np.float32)
    for net in nets:
        net.blobs["data"].data[...] = x
        net.blobs["label"].data[...] = 3
    _train_steps(nets, steps=1)
    _assert_same(*nets, exact=False)


@pytest.mark.parametrize("bn", ["", "use_global_stats: true"])
@pytest.mark.parametrize("relu", ["", None])
def test_fused_net_gradient_check(tmp_path, bn, relu):
    """Caffe's numeric gradient check, in float64, through the fused chain itself: the input's
    and every parameter's gradient of the loss."""
    from minicaffe.testing import check_gradient_net
    path = tmp_path / "net.prototxt"
    path.write_text("force_backward: true\n" + _text((2, 2, 4, 4), bn=bn, relu=relu))
    minicaffe.set_random_seed(0)   # fixed weights: no input sits within a step of the ReLU's kink
    net = minicaffe.Net(str(path), minicaffe.TRAIN, dtype=np.float64)
    assert len(net._fused) == 1 and net._fusing()
    rng = np.random.default_rng(3)
    for name in net.input_names:
        net.blobs[name].data[...] = rng.standard_normal(net.blobs[name].shape)
    if bn:   # running statistics to normalize with
        mean, var, normalizer = net.params["bn"]
        mean.data[...], var.data[...], normalizer.data[...] = rng.normal(0, 1, 5), rng.uniform(0.5, 2, 5), 1
        # The loss moves with the running statistics here, but no backward gives their gradient
        # (they are statistics, not parameters): leave them out of the check.
        stats = {id(b) for b in net.params["bn"]}
        net.learnable_params = [p for p in net.learnable_params if id(p) not in stats]
    net.params["sc"][0].data[...] = rng.uniform(0.5, 1.5, 5)
    net.params["sc"][1].data[...] = rng.normal(0, 0.5, 5)
    check_gradient_net(net, blob_names=["data"], stepsize=1e-3, threshold=1e-3)
