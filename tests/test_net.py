import pathlib

import numpy as np
import pytest
from google.protobuf import text_format

import minicaffe as caffe
from minicaffe import Net
from minicaffe.layer import LayerError
from minicaffe.proto import caffe_pb2
from minicaffe.proto_io import ProtoFileError
from minicaffe.testing import check_gradient_net

# BVLC example prototxts, read from the shared tree rather than copied into this project
BVLC = pathlib.Path(__file__).resolve().parents[2] / "shared" / "models" / "bvlc"


def net_param(text):
    return text_format.Parse(text, caffe_pb2.NetParameter())


def lenet_with_inputs(batch=2):
    """BVLC's LeNet train/test net with its two Data layers swapped for one Input layer."""
    param = caffe.proto_io.read_net_param(BVLC / "mnist__lenet_train_test.prototxt")
    layers = [l for l in param.layer if l.type != "Data"]
    inp = caffe_pb2.LayerParameter(name="mnist", type="Input", top=["data", "label"])
    inp.input_param.shape.add().dim.extend([batch, 1, 28, 28])
    inp.input_param.shape.add().dim.extend([batch])
    param.ClearField("layer")
    param.layer.extend([inp] + layers)
    return param


TWO_HEADS = """
name: "two_heads"
force_backward: true
layer { name: "in" type: "Input" top: "x" top: "y1" top: "y2"
  input_param { shape { dim: 3 dim: 4 } shape { dim: 3 dim: 2 } shape { dim: 3 dim: 5 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "h"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 }
                        bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "ipa" type: "InnerProduct" bottom: "h" top: "a"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "ipb" type: "InnerProduct" bottom: "h" top: "b"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "la" type: "EuclideanLoss" bottom: "a" bottom: "y1" top: "la" }
layer { name: "lb" type: "EuclideanLoss" bottom: "b" bottom: "y2" top: "lb" loss_weight: 0.5 }
"""


def test_lenet_builds_with_right_shapes():
    net = Net(lenet_with_inputs(batch=4), caffe.TRAIN)
    shapes = {k: v.shape for k, v in net.blobs.items()}
    assert shapes["conv1"] == (4, 20, 24, 24) and shapes["pool1"] == (4, 20, 12, 12)
    assert shapes["conv2"] == (4, 50, 8, 8) and shapes["pool2"] == (4, 50, 4, 4)
    assert shapes["ip1"] == (4, 500) and shapes["ip2"] == (4, 10) and shapes["loss"] == ()
    assert [b.shape for b in net.params["conv1"]] == [(20, 1, 5, 5), (20,)]
    assert [b.shape for b in net.params["ip1"]] == [(500, 800), (500,)]
    assert net.params_lr == [1, 2, 1, 2, 1, 2, 1, 2]
    assert net.outputs == ["loss"]
    net.blobs["data"].data[...] = np.random.default_rng(0).random((4, 1, 28, 28))
    net.blobs["label"].data[...] = [1, 2, 3, 4]
    loss = net.forward_loss()
    assert 1.5 < loss < 3.5  # about log(10) with xavier weights


def test_lenet_test_phase_has_accuracy():
    net = Net(lenet_with_inputs(), caffe.TEST)
    assert "accuracy" in net.layer_names and set(net.outputs) == {"accuracy", "loss"}
    assert "label_mnist_1_split" in net.layer_names


def test_lenet_whole_net_gradient():
    caffe.set_random_seed(3)
    param = lenet_with_inputs(batch=2)
    # keep the check cheap: fewer channels and hidden units, same structure
    for layer in param.layer:
        if layer.name == "conv1":
            layer.convolution_param.num_output = 2
        if layer.name == "conv2":
            layer.convolution_param.num_output = 3
        if layer.name == "ip1":
            layer.inner_product_param.num_output = 5
    net = Net(param, caffe.TRAIN, dtype=np.float64)
    rng = np.random.default_rng(1)
    net.blobs["data"].data[...] = rng.random((2, 1, 28, 28))
    net.blobs["label"].data[...] = [3, 7]
    # a small step keeps max-pooling winners fixed while the weights move
    check_gradient_net(net, stepsize=1e-6, threshold=1e-3)


def test_gradient_through_split_fan_out():
    caffe.set_random_seed(1)
    net = Net(net_param(TWO_HEADS), caffe.TRAIN, dtype=np.float64)
    assert "h_ip_0_split" in net.layer_names
    assert net.bottom_ids[net.layer_names.index("ipa")] == ["h_ip_0_split_0"]
    assert net.bottom_ids[net.layer_names.index("ipb")] == ["h_ip_0_split_1"]
    rng = np.random.default_rng(0)
    for name in ("x", "y1", "y2"):
        net.blobs[name].data[...] = rng.normal(size=net.blobs[name].shape)
    check_gradient_net(net, blob_names=["x"])


def test_param_diffs_accumulate_and_clear():
    net = Net(net_param(TWO_HEADS), caffe.TRAIN)
    net.blobs["x"].data[...] = 1
    net.forward_backward()
    first = net.params["ip"][0].diff.copy()
    net.forward_backward()
    np.testing.assert_allclose(net.params["ip"][0].diff, 2 * first, rtol=1e-5)
    net.clear_param_diffs()
    assert not net.params["ip"][0].diff.any()


def test_loss_weight_on_split_top():
    text = TWO_HEADS.replace('layer { name: "ipb"', 'layer { name: "ipb"') + """
layer { name: "c" type: "Softmax" bottom: "a" top: "c" }
"""
    text = text.replace('top: "a"\n', 'top: "a" loss_weight: 2\n')
    param = caffe.net.insert_splits(net_param(text))
    names = [l.name for l in param.layer]
    split = param.layer[names.index("a_ipa_0_split")]
    assert list(split.loss_weight) == [2, 0, 0] and len(split.top) == 3
    assert not len(param.layer[names.index("ipa")].loss_weight)
    assert list(param.layer[names.index("c")].bottom) == ["a_ipa_0_split_2"]


def test_phase_level_and_stage_filtering():
    text = """
layer { name: "d" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }
layer { name: "train_only" type: "Softmax" bottom: "x" top: "t" include { phase: TRAIN } }
layer { name: "not_test" type: "Softmax" bottom: "x" top: "nt" exclude { phase: TEST } }
layer { name: "lvl" type: "Softmax" bottom: "x" top: "l" include { min_level: 2 } }
layer { name: "staged" type: "Softmax" bottom: "x" top: "s" include { stage: "deploy" } }
layer { name: "unstaged" type: "Softmax" bottom: "x" top: "u" include { not_stage: "deploy" } }
"""
    names = lambda **kw: Net(net_param(text), **kw).layer_names[1:]
    assert names(phase=caffe.TRAIN) == ["x_d_0_split", "train_only", "not_test", "unstaged"]
    assert names(phase=caffe.TEST) == ["unstaged"]
    assert names(phase=caffe.TEST, level=2) == ["x_d_0_split", "lvl", "unstaged"]
    assert names(phase=caffe.TEST, stages=["deploy"]) == ["staged"]


def test_bvlc_autoencoder_stages():
    path = BVLC / "mnist__mnist_autoencoder.prototxt"
    param = caffe.proto_io.read_net_param(path)
    on_test = caffe.net.filter_net(param, caffe_pb2.NetState(phase=caffe.TEST, stage=["test-on-test"]))
    on_train = caffe.net.filter_net(param, caffe_pb2.NetState(phase=caffe.TEST, stage=["test-on-train"]))
    sources = lambda p: [l.data_param.source for l in p.layer if l.type == "Data"]
    assert sources(on_test) == ["examples/mnist/mnist_test_lmdb"]
    assert sources(on_train) == ["examples/mnist/mnist_train_lmdb"]


def test_in_place_layers_share_the_blob():
    net = Net(net_param("""
layer { name: "d" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "sm" type: "Softmax" bottom: "x" top: "x" }
"""), caffe.TEST)
    assert list(net.blobs) == ["x"]
    out = net.forward(x=np.zeros((2, 3)))
    np.testing.assert_allclose(out["x"], 1 / 3, rtol=1e-6)


def test_errors_name_the_layer_and_blob():
    with pytest.raises(LayerError, match=r"layer 'sm'.*unknown bottom blob 'nope'"):
        Net(net_param('layer { name: "sm" type: "Softmax" bottom: "nope" top: "y" }'), caffe.TEST)
    dup = """
layer { name: "a" type: "Input" top: "x" input_param { shape { dim: 1 } } }
layer { name: "b" type: "Input" top: "x" input_param { shape { dim: 1 } } }
"""
    with pytest.raises(LayerError, match=r"'x' is produced by both layer 'a' and layer 'b'"):
        Net(net_param(dup), caffe.TEST)
    with pytest.raises(LayerError, match=r"unknown layer type 'Softmx'.*Did you mean 'Softmax'"):
        Net(net_param('layer { name: "s" type: "Softmx" }'), caffe.TEST)
    with pytest.raises(ValueError, match="needs a phase"):
        Net(net_param(dup))


def test_prototxt_error_names_file(tmp_path):
    f = tmp_path / "n.prototxt"
    f.write_text('layer { name: "sm" type: "Softmax" bottom: "nope" top: "y" }\n')
    with pytest.raises(LayerError, match=rf"^{f}: layer 'sm'"):
        Net(str(f), caffe.TEST)
    f.write_text('layer { name: "sm" type: "Softmax"\n')
    with pytest.raises(ProtoFileError, match=rf"^{f}:\d+:\d+: Expected"):
        Net(str(f), caffe.TEST)


def test_need_backward_rules():
    net = Net(net_param("""
layer { name: "in" type: "Input" top: "x" top: "y" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "frozen" type: "InnerProduct" bottom: "x" top: "f"
  param { lr_mult: 0 } param { lr_mult: 0 } inner_product_param { num_output: 3 } }
layer { name: "ip" type: "InnerProduct" bottom: "f" top: "g" inner_product_param { num_output: 3 } }
layer { name: "side" type: "InnerProduct" bottom: "x" top: "s" inner_product_param { num_output: 3 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "g" bottom: "y" top: "loss" }
"""), caffe.TRAIN)
    need = dict(zip(net.layer_names, net.layer_need_backward))
    assert need["frozen"] is False and need["ip"] is True and need["side"] is False
    assert net.layers[net.layer_names.index("frozen")].param_propagate_down == [False, False]
    assert net.bottom_need_backward[net.layer_names.index("ip")] == [False]


def test_force_backward_reaches_inputs():
    net = Net(net_param(TWO_HEADS), caffe.TRAIN)
    net.blobs["x"].data[...] = 1
    net.forward()
    diffs = net.backward()
    assert diffs["x"].shape == (3, 4) and np.abs(diffs["x"]).sum() > 0


SHARED = """
layer { name: "in" type: "Input" top: "a" top: "b" top: "y" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ipa" type: "InnerProduct" bottom: "a" top: "fa"
  param { name: "w" } param { name: "bias" } inner_product_param { num_output: 3 } }
layer { name: "ipb" type: "InnerProduct" bottom: "b" top: "fb"
  param { name: "w" } param { name: "bias" } inner_product_param { num_output: NB } }
layer { name: "la" type: "EuclideanLoss" bottom: "fa" bottom: "y" top: "la" }
layer { name: "lb" type: "EuclideanLoss" bottom: "fb" bottom: "y" top: "lb" }
"""


def test_shared_params_are_one_learnable_blob():
    net = Net(net_param(SHARED.replace("NB", "3")), caffe.TRAIN)
    assert len(net.learnable_params) == 2 and net.param_display_names == ["w", "bias"]
    wa, wb = net.params["ipa"][0], net.params["ipb"][0]
    assert wa.shares_data_with(wb)
    rng = np.random.default_rng(0)
    a, b, y = (rng.normal(size=(2, 3)) for _ in range(3))
    net.forward(a=a, b=b, y=y)
    net.backward_from_to()
    # the shared diff is the sum of both layers' contributions: (fa - y)^T a + (fb - y)^T b with W = 0
    expected = (-y).T @ a / 2 + (-y).T @ b / 2
    np.testing.assert_allclose(wa.diff, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(LayerError, match=r"shared param 'w' has shape \(4, 3\) here but \(3, 3\)"):
        Net(net_param(SHARED.replace("NB", "4")), caffe.TRAIN)


def test_save_and_copy_from_give_identical_outputs(tmp_path):
    caffe.set_random_seed(7)
    net = Net(lenet_with_inputs(batch=3), caffe.TEST)
    x = np.random.default_rng(2).random((3, 1, 28, 28)).astype(np.float32)
    out = net.forward(data=x, label=np.array([1, 2, 3]))
    path = tmp_path / "lenet.caffemodel"
    net.save(path)
    caffe.set_random_seed(8)
    other = Net(lenet_with_inputs(batch=3), caffe.TEST, weights=str(path))
    out2 = other.forward(data=x, label=np.array([1, 2, 3]))
    np.testing.assert_array_equal(out["loss"], out2["loss"])
    for name in net.params:
        for a, b in zip(net.params[name], other.params[name]):
            np.testing.assert_array_equal(a.data, b.data)
    # pycaffe's older argument order
    third = Net(lenet_with_inputs(batch=3), str(path), caffe.TEST)
    np.testing.assert_array_equal(third.params["ip2"][0].data, net.params["ip2"][0].data)
    # the saved file is a NetParameter that names layers and carries shaped blobs
    saved = caffe_pb2.NetParameter.FromString(path.read_bytes())
    conv1 = [l for l in saved.layer if l.name == "conv1"][0]
    assert list(conv1.blobs[0].shape.dim) == [20, 1, 5, 5] and conv1.type == "Convolution"


def test_copy_from_shape_mismatch_names_layer_and_shapes(tmp_path):
    net = Net(lenet_with_inputs(), caffe.TEST)
    path = tmp_path / "w.caffemodel"
    net.save(path)
    param = lenet_with_inputs()
    for layer in param.layer:
        if layer.name == "ip1":
            layer.inner_product_param.num_output = 400
    with pytest.raises(LayerError, match=r"layer 'ip1' param 0: the file has shape \(500, 800\) but "
                                         r"the net expects \(400, 800\)"):
        Net(param, caffe.TEST, weights=str(path))


def test_copy_from_ignores_unknown_layers_and_accepts_legacy_shapes(tmp_path):
    net = Net(net_param(TWO_HEADS), caffe.TEST)
    src = caffe_pb2.NetParameter()
    layer = src.layer.add(name="ip")
    w = layer.blobs.add(num=1, channels=1, height=3, width=4)
    w.data.extend(range(12))
    b = layer.blobs.add()
    b.shape.dim.append(3)
    b.data.extend([1, 2, 3])
    src.layer.add(name="not_in_net").blobs.add(data=[1])
    net.copy_from(src)
    np.testing.assert_array_equal(net.params["ip"][0].data.ravel(), np.arange(12))
