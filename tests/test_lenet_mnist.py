"""A short real-data run: LeNet from models/lenet on the real MNIST, through LMDB and the solver."""
import pathlib

import numpy as np

import minicaffe as caffe
from minicaffe.proto_io import read_net_param, read_solver_param

ROOT = pathlib.Path(__file__).resolve().parents[1]
LENET = ROOT / "models" / "lenet"


def lenet_on(mnist_lmdb):
    """models/lenet's train/test net, its Data layers reading the test session's MNIST LMDBs."""
    net = read_net_param(LENET / "lenet_train_test.prototxt")
    for layer in net.layer:
        if layer.type == "Data":
            split = "train" if "train" in layer.data_param.source else "test"
            layer.data_param.source = str(mnist_lmdb / f"mnist_{split}_lmdb")
    return net


def test_lenet_learns_real_mnist(mnist_lmdb, tmp_path):
    net = lenet_on(mnist_lmdb)
    solver = read_solver_param(LENET / "lenet_solver.prototxt")
    solver.ClearField("net")
    solver.net_param.CopyFrom(net)
    solver.max_iter = 300
    solver.test_interval = 1000
    solver.ClearField("test_iter")
    solver.test_iter.append(20)           # 2,000 test images
    solver.snapshot = 0
    solver.snapshot_after_train = False
    solver.display = 0
    solver.random_seed = 1
    s = caffe.get_solver(solver)

    first = s.net.forward_loss()
    s.step(300)
    scores = s.test(0)
    assert first > 2.0                      # about log(10) at the start
    assert scores["loss"] < 0.3, scores
    assert scores["accuracy"] > 0.93, scores
    assert np.isfinite(s.net.params["conv1"][0].data).all()
