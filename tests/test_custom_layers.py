"""Custom layers take part in everything built-in layers do: the worked example in
models/custom_layer (LearnableSwish plugin + a Python data layer) trained from the CLI,
snapshots and reloading, lr_mult/decay_mult, shared params, in place, `minicaffe time`,
pycaffe-style registered classes, and run-time checks naming the layer."""
import logging
import pathlib
import sys
import textwrap
import warnings

import numpy as np
import pytest

import minicaffe
from minicaffe import Blob, Layer, Net, caffe_pb2
from minicaffe.cli import main
from minicaffe.layer import LayerError, register_layer
from minicaffe.testing import check_gradient, make_blobs

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "models" / "custom_layer"
PLUGIN = EXAMPLE / "my_layers.py"

sys.path.insert(0, str(EXAMPLE))
import check_my_layers  # noqa: E402  (the example's gradient check; imports my_layers)
import my_layers  # noqa: E402

sys.path.remove(str(EXAMPLE))


# -- custom layers defined here (registered once, under names no one else uses) -------------
@register_layer("CustomTestScale")
class ScaleLayer(Layer):
    """top = w * bottom, one learnable scalar w (starts at 2), minicaffe style."""
    exact_num_bottom = 1
    exact_num_top = 1
    allows_in_place = True

    def layer_setup(self, bottom, top):
        if not self.blobs_loaded:
            self.blobs = [Blob((1,), dtype=self.dtype)]
            self.blobs[0].data[...] = 2

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)
        self.x = np.empty(bottom[0].shape, dtype=self.dtype)

    def forward(self, bottom, top):
        self.x[...] = bottom[0].data
        np.multiply(self.x, self.blobs[0].data[0], out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        if self.param_propagate_down[0]:
            self.blobs[0].diff[0] += np.sum(top[0].diff * self.x)
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff * self.blobs[0].data[0]


@register_layer("CustomTestPycaffeStyle")
class PycaffeStyleLayer(Layer):
    """A pycaffe-style class (overrides setup) registered as a type of its own."""

    def setup(self, bottom, top):
        self.offset = float(self.param_str or 0)
        self.blobs.add_blob(1)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data + self.offset + self.blobs[0].data[0]

    def backward(self, top, propagate_down, bottom):
        self.blobs[0].diff[0] += top[0].diff.sum()
        bottom[0].diff[...] = top[0].diff


@register_layer("CustomTestHalfForward")
class HalfForward(ScaleLayer):
    def forward(self, bottom, top):
        top[0].data[0] = 1


# -- the worked example ------------------------------------------------------------------
def test_example_gradient_check():
    check_my_layers.check_learnable_swish()


def swish_param(beta=1.0, name="swish"):
    lp = caffe_pb2.LayerParameter(name=name, type="LearnableSwish")
    lp.swish_param.beta = beta
    return lp


@pytest.mark.parametrize("shape", [(3, 2), (2, 3, 2, 2), (1, 4, 3)])
def test_learnable_swish_forward_against_loops(shape):
    rng = np.random.default_rng(3)
    x = rng.normal(size=shape)
    layer = minicaffe.create_layer(swish_param())
    layer_beta = rng.uniform(0.5, 2, size=shape[1])
    bottom, top = make_blobs(x), [Blob(dtype=np.float64)]
    layer.setup(bottom, top)
    layer.blobs[0].data[...] = layer_beta
    layer.run_forward(bottom, top)
    expected = np.empty(shape)
    for idx in np.ndindex(*shape):
        b = layer_beta[idx[1]]
        expected[idx] = x[idx] / (1 + np.exp(-b * x[idx]))
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12)


def test_learnable_swish_float32_and_bad_bottoms():
    layer = minicaffe.create_layer(swish_param(0.5))
    bottom, top = [Blob((2, 3))], [Blob()]
    bottom[0].data[...] = -1000  # exp overflows to inf: the result is still 0, with no warning
    layer.setup(bottom, top)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.run_forward(bottom, top)
    assert top[0].dtype == np.float32 and layer.blobs[0].dtype == np.float32
    assert np.all(layer.blobs[0].data == 0.5) and np.all(top[0].data == 0)
    with pytest.raises(LayerError, match="'swish' \\(LearnableSwish\\): needs a bottom with a channel"):
        minicaffe.create_layer(swish_param()).setup([Blob((4,))], [Blob()])
    layer.blobs_loaded = True
    with pytest.raises(LayerError, match="bottom has 5 channels but beta was made for 3"):
        layer.reshape([Blob((2, 5))], [Blob()])


def test_learnable_swish_in_place_matches_separate_blobs():
    rng = np.random.default_rng(4)
    x, g = rng.normal(size=(2, 3, 2)), rng.normal(size=(2, 3, 2))
    results = []
    for in_place in (False, True):
        layer = minicaffe.create_layer(swish_param())
        bottom = make_blobs(x)
        top = bottom if in_place else [Blob(dtype=np.float64)]
        layer.setup(bottom, top)
        layer.blobs[0].data[...] = [0.5, 1.0, 1.5]
        layer.run_forward(bottom, top)
        y = top[0].data.copy()
        top[0].diff[...] = g
        layer.run_backward(top, [True], bottom)
        results.append((y, bottom[0].diff.copy(), layer.blobs[0].diff.copy()))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def write_solver(tmp_path, max_iter=60, snapshot=True):
    solver = tmp_path / "solver.prototxt"
    solver.write_text(textwrap.dedent(f"""
        net: "{EXAMPLE / 'train_val.prototxt'}"
        base_lr: 0.01
        momentum: 0.9
        lr_policy: "fixed"
        display: 0
        max_iter: {max_iter}
        snapshot: {max_iter if snapshot else 0}
        snapshot_prefix: "{tmp_path / 'sine'}"
        random_seed: 1701
    """))
    return solver


def test_plugin_layer_trains_from_the_cli_and_its_weights_round_trip(tmp_path, caplog):
    solver = write_solver(tmp_path)
    assert main(["train", "--solver", str(solver), "--plugin", str(PLUGIN)]) == 0
    model = tmp_path / "sine_iter_60.caffemodel"
    assert model.exists() and (tmp_path / "sine_iter_60.solverstate").exists()
    with caplog.at_level(logging.INFO):
        assert main(["--plugin", str(PLUGIN), "test", "--model", str(EXAMPLE / "train_val.prototxt"),
                     "--weights", str(model), "--iterations", "2"]) == 0
    assert "loss" in caplog.text

    saved = caffe_pb2.NetParameter()
    saved.ParseFromString(model.read_bytes())
    layers = {layer.name: layer for layer in saved.layer}
    assert layers["swish1"].type == "LearnableSwish"
    beta = np.asarray(layers["swish1"].blobs[0].data)
    assert beta.shape == (16,)
    assert not np.allclose(beta, 1.0)  # learned away from its initial value

    net = Net(str(EXAMPLE / "train_val.prototxt"), caffe_pb2.TEST, weights=str(model))
    np.testing.assert_array_equal(net.params["swish1"][0].data, beta.astype(np.float32))
    assert net.layer_dict["data"].type == "Python"


def test_training_reduces_the_loss(tmp_path):
    from minicaffe.solvers import get_solver
    solver = get_solver(str(write_solver(tmp_path, max_iter=300, snapshot=False)))
    solver.step(10)
    first = solver.smoothed_loss
    solver.step(290)
    assert solver.smoothed_loss < 0.25 * first


def test_example_lr_and_decay_mult_reach_the_net():
    net = Net(str(EXAMPLE / "train_val.prototxt"), caffe_pb2.TRAIN)
    names = net.param_display_names
    beta = net.learnable_params.index(net.params["swish1"][0])
    assert net.params_lr[beta] == 1 and net.params_weight_decay[beta] == 0
    assert names[beta] == "swish1[0]"
    assert net.top_ids[net.layer_names.index("swish1")] == ["ip1"]  # in place
    assert net.layer_need_backward[net.layer_names.index("swish1")]


def test_minicaffe_time_with_a_plugin_layer(caplog):
    with caplog.at_level(logging.INFO):
        assert main(["time", "--model", str(EXAMPLE / "train_val.prototxt"), "--iterations", "2",
                     "--plugin", str(PLUGIN)]) == 0
    assert "swish1" in caplog.text


# -- custom layers inside nets -------------------------------------------------------------
NET = """
name: "custom"
input: "data" input_shape {{ dim: 2 dim: 3 }}
{layers}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "{last}" bottom: "data" top: "loss" }}
"""


def build(tmp_path, layers, last, dtype=np.float32):
    path = tmp_path / "custom.prototxt"
    path.write_text(NET.format(layers=layers, last=last))
    return Net(str(path), caffe_pb2.TRAIN, dtype=dtype)


def test_shared_params_lr_decay_and_gradients(tmp_path):
    layers = """
    layer { name: "a" type: "CustomTestScale" bottom: "data" top: "a"
            param { name: "w" lr_mult: 3 decay_mult: 0.5 } }
    layer { name: "b" type: "CustomTestScale" bottom: "a" top: "b" param { name: "w" } }
    """
    net = build(tmp_path, layers, "b", dtype=np.float64)
    assert len(net.learnable_params) == 1
    assert net.params_lr == [3] and net.params_weight_decay == [0.5]
    assert net.params["b"][0].shares_data_with(net.params["a"][0])
    x = np.arange(6.0).reshape(2, 3)
    net.blobs["data"].data[...] = x
    net.clear_param_diffs()
    net.forward_backward()
    # loss = |w^2 x - x|^2 / 4  ->  dL/dw = (w^2 - 1) * 2w * |x|^2 / 2
    w = 2.0
    assert net.learnable_params[0].diff[0] == pytest.approx((w * w - 1) * 2 * w * (x ** 2).sum() / 2)


def test_in_place_custom_layer_in_a_net(tmp_path):
    layers = """
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "h"
            inner_product_param { num_output: 3 weight_filler { type: "constant" value: 1 } } }
    layer { name: "s" type: "CustomTestScale" bottom: "h" top: "h" }
    """
    net = build(tmp_path, layers, "h")
    net.blobs["data"].data[...] = 1
    net.forward()
    assert np.all(net.blobs["h"].data == 6)


def test_pycaffe_style_registered_class_runs_through_the_adapter(tmp_path):
    layers = """
    layer { name: "p" type: "CustomTestPycaffeStyle" bottom: "data" top: "p"
            python_param { param_str: "1.5" } }
    """
    net = build(tmp_path, layers, "p")
    layer = net.layer_dict["p"]
    assert layer.type == "CustomTestPycaffeStyle" and layer.offset == 1.5
    net.blobs["data"].data[...] = 1
    net.forward()
    assert np.all(net.blobs["p"].data == 2.5)
    net.clear_param_diffs()
    net.backward()
    assert len(net.learnable_params) == 1 and net.learnable_params[0].diff[0] != 0
    path = tmp_path / "p.caffemodel"
    layer.blobs[0].data[0] = 4
    net.save(str(path))
    layer.blobs[0].data[0] = 0
    net.copy_from(str(path))
    assert layer.blobs[0].data[0] == 4


def test_custom_layer_mistake_is_reported_by_the_net_naming_the_layer(tmp_path):
    layers = 'layer { name: "half" type: "CustomTestHalfForward" bottom: "data" top: "h" }'
    net = build(tmp_path, layers, "h")
    with pytest.raises(LayerError, match="layer 'half' \\(CustomTestHalfForward\\): forward left 3 "
                                         "of 6 elements of top\\[0\\] 'h'"):
        net.forward()


def test_custom_scale_gradient():
    check_gradient(minicaffe.create_layer(caffe_pb2.LayerParameter(name="s", type="CustomTestScale")),
                   make_blobs(np.random.default_rng(0).normal(size=(2, 3))), [Blob(dtype=np.float64)])


def test_builtin_layers_are_not_checked_and_custom_ones_are():
    relu = minicaffe.create_layer(caffe_pb2.LayerParameter(name="r", type="ReLU"))
    custom = minicaffe.create_layer(caffe_pb2.LayerParameter(name="s", type="CustomTestScale"))
    assert relu.check_io is False and custom.check_io is True


def test_solver_finds_python_layer_module_next_to_the_net_file(tmp_path, monkeypatch):
    """A solver's nets look for python_param.module beside the net prototxt, as Net(path) does."""
    import minicaffe as caffe
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "beside_net_layer.py").write_text(
        "import minicaffe as caffe\n"
        "class Double(caffe.Layer):\n"
        "    def setup(self, bottom, top): pass\n"
        "    def reshape(self, bottom, top): top[0].reshape(*bottom[0].data.shape)\n"
        "    def forward(self, bottom, top): top[0].data[...] = 2 * bottom[0].data\n"
        "    def backward(self, top, propagate_down, bottom):\n"
        "        bottom[0].diff[...] = 2 * top[0].diff\n")
    (folder / "net.prototxt").write_text('''
layer { name: "x" type: "DummyData" top: "x" top: "y"
  dummy_data_param { shape { dim: 2 dim: 3 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" inner_product_param { num_output: 3 } }
layer { name: "double" type: "Python" bottom: "ip" top: "d"
  python_param { module: "beside_net_layer" layer: "Double" } }
layer { name: "loss" type: "EuclideanLoss" bottom: "d" bottom: "y" top: "loss" }
''')
    (folder / "solver.prototxt").write_text('net: "net.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\n'
                                            'max_iter: 2\nsnapshot_after_train: false\n')
    monkeypatch.chdir(tmp_path)  # neither cwd nor sys.path holds the module
    solver = caffe.get_solver(str(folder / "solver.prototxt"))
    solver.step(1)
    assert solver.net.layers[2].type == "Python" and solver.iter == 1
