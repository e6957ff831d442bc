"""LeNet on an MNIST LMDB: 20 iterations + resume + 20 equals 40 straight, bit for bit."""
import os
import pathlib

import numpy as np
import pytest

import minicaffe as caffe
from minicaffe.datasets.mnist import LABEL_MAGIC, convert_mnist, read_idx
from minicaffe.proto import caffe_pb2
from minicaffe.proto_io import read_net_param, read_solver_param

ROOT = pathlib.Path(__file__).resolve().parents[1]
LENET = ROOT / "models" / "lenet"


def mnist_labels_path():
    from tests.conftest import SHARED_MNIST
    return SHARED_MNIST / "t10k-labels-idx1-ubyte.gz"


@pytest.fixture(scope="module")
def mnist_lmdb(tmp_path_factory):
    images = mnist_labels_path().parent / "t10k-images-idx3-ubyte.gz"
    if not images.exists():
        pytest.skip(f"real MNIST not found at {images.parent}")
    out = tmp_path_factory.mktemp("mnist") / "mnist_t10k_lmdb"   # 10,000 images: quick to make
    convert_mnist(str(images), str(mnist_labels_path()), str(out))
    return out


def lenet_solver(lmdb, prefix):
    """Caffe's LeNet solver and net, reading `lmdb`, testing 2 batches every 20 iterations."""
    net = read_net_param(LENET / "lenet_train_test.prototxt")
    for layer in net.layer:
        if layer.type == "Data":
            layer.data_param.source = str(lmdb)
    solver = read_solver_param(LENET / "lenet_solver.prototxt")
    solver.ClearField("net")
    solver.net_param.CopyFrom(net)
    solver.max_iter = 40
    solver.snapshot = 20
    solver.snapshot_prefix = str(prefix)
    solver.test_interval = 20          # the test net's cursor is part of the state too
    solver.ClearField("test_iter")
    solver.test_iter.append(2)
    solver.display = 0
    solver.random_seed = 1
    return caffe.get_solver(solver)


def test_lenet_resume_equals_a_straight_run(mnist_lmdb, tmp_path):
    straight = lenet_solver(mnist_lmdb, tmp_path / "straight")
    straight.solve()
    expected = (tmp_path / "straight_iter_40.caffemodel").read_bytes()
    state_20 = str(tmp_path / "straight_iter_20.solverstate")

    resumed = lenet_solver(mnist_lmdb, tmp_path / "resumed")
    resumed.solve(resume_file=state_20)
    assert (tmp_path / "resumed_iter_40.caffemodel").read_bytes() == expected
    a, b = (caffe_pb2.SolverState.FromString((tmp_path / f"{run}_iter_40.solverstate").read_bytes())
            for run in ("straight", "resumed"))
    assert (a.iter, a.current_step, list(a.history)) == (b.iter, b.current_step, list(b.history))
    assert resumed.test(0) == straight.test(0)

    # What Caffe does (no resume file): the cursor restarts at the first record.
    first_batches = []
    for keep in (True, False):
        if not keep:
            os.unlink(state_20 + ".resume.json")
        solver = lenet_solver(mnist_lmdb, tmp_path / "again")
        solver.restore(state_20)
        solver.net.forward_loss()
        first_batches.append(solver.net.blobs["label"].data.copy())
    with_file, without = first_batches
    assert not np.array_equal(with_file, without)
    labels = read_idx(str(mnist_labels_path()), LABEL_MAGIC)
    np.testing.assert_array_equal(with_file, labels[20 * 64: 21 * 64])   # batch 21
    np.testing.assert_array_equal(without, labels[:64])                  # batch 1 again
