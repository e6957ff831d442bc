"""pycaffe's API as its own unit tests exercise it (BVLC python/caffe/test), written anew:
Net's underscore views and hooks, forward_backward_all, HDF5 weights, Solver.lr and
share_weights, caffe.Timer/log/has_nccl, array_to_datum without a label, NetSpec's error text.
"""
import logging
import re

import numpy as np
import pytest
from google.protobuf import text_format

import minicaffe as caffe
from minicaffe.proto import caffe_pb2

NET = """
name: "small" force_backward: true
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 4 dim: 2 dim: 3 dim: 3 } shape { dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 3 kernel_size: 2 weight_filler { type: "gaussian" std: 0.5 }
                      bias_filler { type: "constant" value: 0.1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def make_net(text=NET, phase=caffe.TRAIN):
    caffe.set_random_seed(3)
    return caffe.Net(text_format.Parse(text, caffe_pb2.NetParameter()), phase)


def fill(net, seed=0):
    rng = np.random.default_rng(seed)
    net.blobs["data"].data[...] = rng.normal(size=net.blobs["data"].shape)
    net.blobs["label"].data[...] = rng.integers(0, 5, size=4)


def test_underscore_views_index_blobs_in_creation_order():
    net = make_net()
    assert net._layer_names == ["data", "conv", "ip", "loss"]
    assert net._blob_names == list(net.blobs) == ["data", "label", "conv", "ip", "loss"]
    assert [b is net.blobs[n] for b, n in zip(net._blobs, net._blob_names)] == [True] * 5
    assert net._inputs == [0, 1] and net._outputs == [4]
    assert net._bottom_ids(3) == [3, 1] and net._top_ids(1) == [2]
    assert list(net.layer_dict) == net._layer_names


def test_forward_backward_by_index_and_hooks_order():
    net = make_net()
    fill(net)
    calls = []
    for hook in ("before_forward", "after_forward", "before_backward", "after_backward"):
        getattr(net, hook)(lambda i, hook=hook: calls.append((hook, i)))
    loss = net._forward(0, 3)
    assert loss == pytest.approx(float(net.blobs["loss"].data))
    net._backward(3, 0)
    fwd = [c for c in calls if "forward" in c[0]]
    bwd = [c for c in calls if "backward" in c[0]]
    assert fwd == [(h, i) for i in range(4) for h in ("before_forward", "after_forward")]
    assert bwd == [(h, i) for i in (3, 2, 1, 0) for h in ("before_backward", "after_backward")]


def test_forward_backward_all_batches_and_trims_padding():
    net = make_net()
    rng = np.random.default_rng(1)
    data = rng.normal(size=(6, 2, 3, 3)).astype(np.float32)
    labels = rng.integers(0, 5, size=6).astype(np.float32)
    outs, diffs = net.forward_backward_all(data=data, label=labels)
    assert set(outs) == {"loss"} and set(diffs) == {"data", "label"}
    assert outs["loss"].shape == (2,) and diffs["data"].shape == (6, 2, 3, 3)
    # the first batch alone gives the same diffs as a plain forward/backward
    net.forward(data=data[:4], label=labels[:4])
    net.backward()
    np.testing.assert_array_equal(diffs["data"][:4], net.blobs["data"].diff)


def test_set_input_arrays_feeds_the_first_memory_data_layer():
    with pytest.raises(RuntimeError, match="first layer is a MemoryDataLayer"):
        make_net().set_input_arrays(np.zeros((4, 2, 3, 3), np.float32), np.zeros(4, np.float32))
    memory = NET.replace('type: "Input" top: "data" top: "label"\n  input_param { shape { dim: 4 dim: 2 dim: 3 dim: 3 } shape { dim: 4 } } }',
                         'type: "MemoryData" top: "data" top: "label"\n  memory_data_param { batch_size: 4 channels: 2 height: 3 width: 3 } }')
    net = make_net(memory)
    data = np.arange(8 * 18, dtype=np.float32).reshape(8, 2, 3, 3)
    labels = np.arange(8, dtype=np.float32) % 5
    net.set_input_arrays(data, labels)      # 1-d labels become (N, 1, 1, 1), as pycaffe
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data, data[:4])
    net.forward()
    np.testing.assert_array_equal(net.blobs["label"].data.ravel(), labels[4:])


def test_save_is_binary_whatever_the_extension_and_hdf5_loads_by_content(tmp_path):
    pytest.importorskip("h5py", reason="HDF5 weights need h5py")
    net = make_net()
    net.save(str(tmp_path / "w.h5"))
    assert (tmp_path / "w.h5").read_bytes()[:8] != b"\x89HDF\r\n\x1a\n"
    net.save_hdf5(str(tmp_path / "w.caffemodel"))            # HDF5 under a protobuf name
    assert (tmp_path / "w.caffemodel").read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    for path in ("w.h5", "w.caffemodel"):
        other = make_net()
        for blob in other.learnable_params:
            blob.data[...] = 0
        other.copy_from(str(tmp_path / path))
        for a, b in zip(net.learnable_params, other.learnable_params):
            np.testing.assert_array_equal(a.data, b.data)
    other = make_net()
    other.load_hdf5(str(tmp_path / "w.caffemodel"))
    np.testing.assert_array_equal(other.params["ip"][0].data, net.params["ip"][0].data)


def test_empty_weights_file_is_an_error_naming_it(tmp_path):
    empty = tmp_path / "empty.caffemodel"
    empty.write_bytes(b"")
    with pytest.raises(caffe.proto_io.ProtoFileError, match=re.escape(str(empty)) + ".*empty"):
        make_net().copy_from(str(empty))
    # serialized NetParameter without layers (not a weights file)
    nolayers = tmp_path / "name_only.caffemodel"
    nolayers.write_bytes(caffe_pb2.NetParameter(name="x").SerializeToString())
    with pytest.raises(caffe.proto_io.ProtoFileError, match="holds no layers"):
        make_net().copy_from(str(nolayers))


def test_copy_from_logs_ignored_layers_and_warns_when_nothing_matches(tmp_path, caplog):
    net = make_net()
    extra = net.to_proto()
    extra.layer.add(name="fc_extra", type="ReLU")
    path = tmp_path / "w.caffemodel"
    path.write_bytes(extra.SerializeToString())
    with caplog.at_level(logging.INFO, logger="minicaffe"):
        make_net().copy_from(str(path))
    assert "Ignoring source layer fc_extra" in caplog.text
    renamed = net.to_proto()
    for layer in renamed.layer:
        layer.name = "other_" + layer.name
    path.write_bytes(renamed.SerializeToString())
    with pytest.warns(UserWarning, match="copied weights for 0 layers"):
        make_net().copy_from(str(path))


def test_force_backward_computes_diffs_of_frozen_params():
    frozen = NET.replace('top: "ip"\n', 'top: "ip" param { lr_mult: 0 }\n')
    net = make_net(frozen)
    fill(net)
    net.clear_param_diffs()
    net.forward()
    net.backward()
    assert np.abs(net.params["ip"][0].diff).sum() > 0
    no_force = make_net(frozen.replace("force_backward: true", ""))
    fill(no_force)
    no_force.clear_param_diffs()
    no_force.forward()
    no_force.backward()
    assert np.abs(no_force.params["ip"][0].diff).sum() == 0


def test_shapeless_net_input_is_dropped():
    text = 'input: "input"\n' + NET.replace('name: "data" type: "Input"', 'name: "input" type: "Input"')
    net = make_net(text)
    assert net._layer_names[0] == "input" and net.layer_dict["input"].type == "Input"
    assert len(net.layers) == 4


def test_layers_with_params_must_have_unique_names():
    dup = NET.replace('name: "ip"', 'name: "conv"')
    with pytest.raises(caffe.LayerError, match=r"layer 1 \(Convolution\) and layer 2 \(InnerProduct\)"
                                               r" are both named 'conv'"):
        make_net(dup)
    # parameterless layers may share a name, as in BVLC's mnist_autoencoder
    two_losses = NET + ('layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "ip" '
                        'top: "l2" loss_weight: 0 }\n')
    assert [l.type for l in make_net(two_losses).layers][-2:] == ["SoftmaxWithLoss", "EuclideanLoss"]


def test_solver_lr_and_share_weights(tmp_path):
    net_file = tmp_path / "net.prototxt"
    net_file.write_text(NET.replace('type: "Input" top: "data" top: "label"',
                                    'type: "DummyData" top: "data" top: "label"').replace(
        "input_param { shape { dim: 4 dim: 2 dim: 3 dim: 3 } shape { dim: 4 } }",
        "dummy_data_param { shape { dim: 4 dim: 2 dim: 3 dim: 3 } shape { dim: 4 } }"))
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(f'net: "{net_file}" base_lr: 0.1 lr_policy: "step" gamma: 0.5 '
                           f'stepsize: 2 max_iter: 4 display: 0 snapshot_after_train: false\n')
    solver = caffe.get_solver(str(solver_file))
    assert solver.lr == pytest.approx(0.1)
    solver.step(2)
    assert solver.lr == pytest.approx(0.05)
    other = caffe.Net(str(net_file), caffe.TEST)
    solver.share_weights(other)
    assert other.params["ip"][0].data is solver.net.params["ip"][0].data or \
        np.shares_memory(other.params["ip"][0].data, solver.net.params["ip"][0].data)


def test_timer_log_and_nccl(caplog):
    timer = caffe.Timer()
    timer.start()
    timer.stop()
    assert timer.ms >= 0
    with caplog.at_level(logging.INFO, logger="minicaffe"):
        caffe.log("hello from pycaffe")
    assert "hello from pycaffe" in caplog.text
    assert caffe.has_nccl() is False


def test_array_to_datum_leaves_a_none_label_unset():
    with_label = caffe.io.array_to_datum(np.ones((3, 2, 2)), label=1)
    without = caffe.io.array_to_datum(np.ones((3, 2, 2)))
    assert not without.HasField("label") and with_label.label == 1
    assert with_label.ByteSize() > without.ByteSize()


def test_net_spec_type_error_text_is_pycaffes():
    with pytest.raises(TypeError, match=r"^Silence input 0 is not a Top \(type is <class 'tuple'>\)$"):
        caffe.layers.Silence(("a", "b"), ntop=0)


def test_hdf5_weights_log_ignored_layers_too(tmp_path, caplog):
    h5py = pytest.importorskip("h5py", reason="HDF5 weights need h5py")
    net = make_net()
    path = tmp_path / "w.weights"                      # no telling extension at all
    net.save_hdf5(str(path))
    with h5py.File(path, "a") as f:
        f["data"].create_group("gone")
    with caplog.at_level(logging.INFO, logger="minicaffe"):
        make_net().copy_from(str(path))
    assert "Ignoring source layer gone" in caplog.text


def test_upgrade_drops_a_shapeless_input_and_keeps_shaped_ones():
    from minicaffe.proto_io import read_net_param
    legacy = read_net_param(text_format.Parse('input: "data"\nlayer { name: "r" type: "ReLU" '
                                              'bottom: "x" top: "x" }', caffe_pb2.NetParameter()))
    assert [l.name for l in legacy.layer] == ["r"] and not len(legacy.input)
    shaped = read_net_param(text_format.Parse('input: "data" input_shape { dim: 1 dim: 2 }',
                                              caffe_pb2.NetParameter()))
    assert shaped.layer[0].type == "Input" and list(shaped.layer[0].input_param.shape[0].dim) == [1, 2]
