"""BVLC's example nets build, run, and (the trainable ones) learn in minicaffe.

Data layers are swapped for Input layers holding a fixed random batch so the
tests need no datasets; everything else is the prototxt as Caffe ships it.
"""
import pathlib

import numpy as np
import pytest

import minicaffe as caffe
from minicaffe.proto import caffe_pb2
from minicaffe.proto_io import read_net_param

# BVLC example prototxts, read from the shared tree rather than copied into this project
BVLC = pathlib.Path(__file__).resolve().parents[2] / "shared" / "models" / "bvlc"
DATA_TYPES = ("Data", "HDF5Data", "ImageData")


def with_inputs(path, shapes):
    """The net at `path` with its data layers replaced by one Input layer of `shapes`."""
    param = read_net_param(BVLC / path)
    layers = [l for l in param.layer if l.type not in DATA_TYPES]
    inp = caffe_pb2.LayerParameter(name="input", type="Input", top=list(shapes))
    for shape in shapes.values():
        inp.input_param.shape.add().dim.extend(shape)
    param.ClearField("layer")
    param.layer.extend([inp] + layers)
    return param


def fill_inputs(net, labels):
    rng = np.random.default_rng(0)
    for name in net.inputs:
        blob = net.blobs[name]
        if name in labels:
            blob.data[...] = rng.integers(0, labels[name], blob.shape)
        else:
            blob.data[...] = rng.random(blob.shape)


def sgd_steps(net, steps, lr):
    losses = []
    for _ in range(steps):
        net.clear_param_diffs()
        losses.append(net.forward_backward())
        for blob, mult in zip(net.learnable_params, net.params_lr):
            blob.data[...] -= lr * mult * blob.diff
    return losses


TRAINABLE = [
    ("mnist__lenet_train_test.prototxt", {"data": (8, 1, 28, 28), "label": (8,)}, {"label": 10}, 0.01),
    ("cifar10__cifar10_full_train_test.prototxt", {"data": (4, 3, 32, 32), "label": (4,)},
     {"label": 10}, 0.001),
    ("mnist__mnist_autoencoder.prototxt", {"data": (8, 1, 28, 28)}, {}, 0.01),
    ("siamese__mnist_siamese_train_test.prototxt", {"pair_data": (8, 2, 28, 28), "sim": (8,)},
     {"sim": 2}, 0.01),
]


@pytest.mark.parametrize("path,shapes,labels,lr", TRAINABLE, ids=[t[0] for t in TRAINABLE])
def test_trainable_example_nets_learn(path, shapes, labels, lr):
    caffe.set_random_seed(1)
    net = caffe.Net(with_inputs(path, shapes), caffe.TRAIN)
    fill_inputs(net, labels)
    losses = sgd_steps(net, 12, lr)
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0], losses
    test_net = caffe.Net(with_inputs(path, shapes), caffe.TEST)
    test_net.share_with(net)
    fill_inputs(test_net, labels)
    assert np.isfinite(test_net.forward_loss())


def test_siamese_shares_weights_between_towers():
    net = caffe.Net(with_inputs("siamese__mnist_siamese_train_test.prototxt",
                                {"pair_data": (2, 2, 28, 28), "sim": (2,)}), caffe.TRAIN)
    assert net.params["conv1"][0].shares_data_with(net.params["conv1_p"][0])
    assert len(net.learnable_params) == 10  # conv1, conv2, ip1, ip2, feat: weights and biases


@pytest.mark.parametrize("path,classes", [("bvlc_reference_caffenet__deploy.prototxt", 1000),
                                          ("bvlc_googlenet__deploy.prototxt", 1000)])
def test_imagenet_deploy_nets_run_forward(path, classes):
    caffe.set_random_seed(2)
    net = caffe.Net(str(BVLC / path), caffe.TEST)
    out = net.forward(data=np.random.default_rng(0).random((1,) + net.blobs["data"].shape[1:]))
    prob = out["prob"]
    assert prob.shape == (1, classes) and prob.dtype == np.float32
    np.testing.assert_allclose(prob.sum(), 1, rtol=1e-4)
