"""minicaffe against files written by real BVLC Caffe (commit 9b89154, CPU build, OpenBLAS).

The files in tests/data/golden/ were produced by running Caffe's own `caffe` and
`extract_features` tools; nothing in them was written by minicaffe:

* tiny_net.prototxt is a small convnet (HDF5Data -> Convolution 3x3 pad 1 -> ReLU ->
  2x2 max pooling -> InnerProduct -> SoftmaxWithLoss) reading 10 rows of 2x6x6 data in
  batches of 4, so the fourth batch wraps around to the first rows.
* For each of tiny_sgd_solver.prototxt (momentum SGD, weight decay, multistep lr with a
  step at iteration 2 and 4) and tiny_adam_solver.prototxt (Adam, weight decay,
  iter_size 2, clip_gradients), Caffe trained from its own random initialisation for
  3 iterations and wrote tiny_<solver>_iter_3.caffemodel and .solverstate. Then a
  second `caffe train -snapshot tiny_<solver>_iter_3.solverstate` run resumed to
  iteration 6; its weights, solver history, iter and current_step, and the loss and
  learning rate Caffe logged for iterations 3-5 are stored in tiny_caffe_expected.npz.
* With each iteration-3 caffemodel, `extract_features` recorded conv1 (after the
  in-place ReLU), pool1, ip1 and loss for 3 TEST-phase batches (also in the .npz).
* tiny_adam_iter_3.caffemodel.h5 / .solverstate.h5 come from a separate Caffe run of
  the Adam solver with `snapshot_format: HDF5` (its own random initialisation), again
  resumed by Caffe to iteration 6 for the expected values under the adam_h5_ keys.

Caffe's data layers restart from the first row when training resumes, and so do
minicaffe's, so the resumed runs see the same batches. Agreement is to float32 rounding
(Caffe and numpy sum in different orders), hence the 1e-5 relative tolerances.
"""
import os
import pathlib
import sys

import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe import Net
from minicaffe.proto import caffe_pb2
from minicaffe.proto_io import read_net_param, read_solver_param
from minicaffe.solvers import get_solver

GOLDEN = pathlib.Path(__file__).with_name("data") / "golden"


@pytest.fixture(scope="module")
def expected():
    with np.load(GOLDEN / "tiny_caffe_expected.npz") as f:
        return dict(f)


@pytest.fixture
def net_param(tmp_path, expected, monkeypatch):
    """The golden net, reading the golden rows from an HDF5 file written here."""
    h5py = pytest.importorskip("h5py")
    monkeypatch.chdir(tmp_path)   # relative learned_net names must resolve next to the state
    with h5py.File(tmp_path / "tiny_data.h5", "w") as f:
        f["data"] = expected["data"]
        f["label"] = expected["label"]
    (tmp_path / "tiny_data_list.txt").write_text(f"{tmp_path / 'tiny_data.h5'}\n")
    param = read_net_param(GOLDEN / "tiny_net.prototxt")
    param.layer[0].hdf5_data_param.source = str(tmp_path / "tiny_data_list.txt")
    return param


def make_solver(kind, net_param, tmp_path):
    sp = read_solver_param(GOLDEN / f"tiny_{kind}_solver.prototxt")
    sp.ClearField("net")
    sp.net_param.CopyFrom(net_param)
    sp.snapshot = 0
    sp.snapshot_after_train = False
    sp.snapshot_prefix = str(tmp_path / f"mini_{kind}")
    return get_solver(sp)


def assert_close(got, want, what):
    scale = float(np.abs(want).max()) or 1.0
    np.testing.assert_allclose(np.asarray(got, np.float64).reshape(want.shape), want,
                               rtol=1e-5, atol=1e-5 * scale, err_msg=what)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_caffe_weights_reproduce_caffe_forward(kind, net_param, expected):
    net = Net(net_param, caffe_pb2.TEST, weights=str(GOLDEN / f"tiny_{kind}_iter_3.caffemodel"))
    got = {name: [] for name in ("conv1", "pool1", "ip1", "loss")}
    for _ in range(3):
        net.forward_loss()
        for name in got:
            got[name].append(np.array(net.blobs[name].data, ndmin=1))
    for name, batches in got.items():
        want = expected[f"{kind}_iter3_forward/{name}"]
        assert_close(np.concatenate(batches), want, f"{kind} {name}")


def resume_and_run(kind, solver, state_file, expected_prefix, expected):
    solver.restore(state_file)
    assert solver.iter == 3
    log = []
    solver.add_callback(on_iteration_end=lambda: log.append(
        (solver.iter - 1, solver.smoothed_loss, solver.learning_rate)))
    solver.step(3)
    it, current_step = expected[f"{expected_prefix}_state"]
    assert (solver.iter, solver.current_step) == (it, current_step)
    n = 0
    for layer in solver.net.layers:
        for j, blob in enumerate(layer.blobs):
            assert_close(blob.data, expected[f"{expected_prefix}_weights/{layer.name}/{j}"],
                         f"{kind} weights {layer.name}[{j}] at iteration 6")
            n += 1
    assert n == 4
    assert len(solver.history) == (8 if kind == "adam" else 4)
    for i, h in enumerate(solver.history):
        assert_close(h.data, expected[f"{expected_prefix}_history/{i}"], f"{kind} history {i}")
    return log


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_resume_from_caffe_solverstate_continues_like_caffe(kind, net_param, tmp_path, expected):
    solver = make_solver(kind, net_param, tmp_path)
    log = resume_and_run(kind, solver, GOLDEN / f"tiny_{kind}_iter_3.solverstate",
                         f"{kind}_iter6", expected)
    # Caffe's log lines print 6 significant digits.
    want_loss, want_lr = expected[f"{kind}_resume_log_loss"], expected[f"{kind}_resume_log_lr"]
    assert [i for i, _, _ in log] == list(want_loss[:, 0]) == list(want_lr[:, 0])
    np.testing.assert_allclose([loss for _, loss, _ in log], want_loss[:, 1], rtol=2e-5)
    np.testing.assert_allclose([lr for _, _, lr in log], want_lr[:, 1], rtol=1e-6)


def test_resume_from_caffe_hdf5_solverstate(net_param, tmp_path, expected):
    solver = make_solver("adam", net_param, tmp_path)
    resume_and_run("adam", solver, GOLDEN / "tiny_adam_iter_3.solverstate.h5", "adam_h5_iter6",
                   expected)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_snapshots_have_caffes_layout(kind, net_param, tmp_path):
    """What minicaffe writes is laid out field for field like Caffe's own snapshot."""
    solver = make_solver(kind, net_param, tmp_path)
    solver.restore(GOLDEN / f"tiny_{kind}_iter_3.solverstate")
    model_file, state_file = solver.snapshot()

    def read(path, message):
        message.ParseFromString(pathlib.Path(path).read_bytes())
        return message

    ours, theirs = (read(p, caffe_pb2.NetParameter()) for p in
                    (model_file, GOLDEN / f"tiny_{kind}_iter_3.caffemodel"))
    assert ours.name == theirs.name
    assert [(l.name, l.type, list(l.bottom), list(l.top), l.phase) for l in ours.layer] == \
        [(l.name, l.type, list(l.bottom), list(l.top), l.phase) for l in theirs.layer]
    for a, b in zip(ours.layer, theirs.layer):
        assert [[f.name for f, _ in x.ListFields()] for x in a.blobs] == \
            [[f.name for f, _ in x.ListFields()] for x in b.blobs]
        assert [list(x.shape.dim) for x in a.blobs] == [list(x.shape.dim) for x in b.blobs]
        for x, y in zip(a.blobs, b.blobs):   # restored weights are written back unchanged
            np.testing.assert_array_equal(np.array(x.data, np.float32), np.array(y.data, np.float32))

    ours, theirs = (read(p, caffe_pb2.SolverState()) for p in
                    (state_file, GOLDEN / f"tiny_{kind}_iter_3.solverstate"))
    assert [f.name for f, _ in ours.ListFields()] == [f.name for f, _ in theirs.ListFields()]
    assert (ours.iter, ours.current_step) == (theirs.iter, theirs.current_step)
    assert os.path.basename(ours.learned_net) == os.path.basename(model_file)
    for x, y in zip(ours.history, theirs.history):
        assert [f.name for f, _ in x.ListFields()] == [f.name for f, _ in y.ListFields()]
        assert list(x.shape.dim) == list(y.shape.dim)
        np.testing.assert_array_equal(np.array(x.data, np.float32), np.array(y.data, np.float32))
    assert len(ours.history) == len(theirs.history)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_snapshot_files_are_readable_like_caffes(tmp_path):
    """Caffe's snapshots get the umask's usual mode (e.g. 0644), not a private 0600."""
    net = Net(text_format.Parse(
        'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }'
        'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" '
        '  inner_product_param { num_output: 1 } }', caffe_pb2.NetParameter()), caffe_pb2.TEST)
    old = os.umask(0o022)
    try:
        net.save(tmp_path / "w.caffemodel")
    finally:
        os.umask(old)
    assert (tmp_path / "w.caffemodel").stat().st_mode & 0o777 == 0o644


def test_net_outputs_are_listed_like_caffes():
    """Caffe keeps leftover blobs in a std::set: outputs sorted by name, anonymous tops left out.

    For this net Caffe's `caffe test` prints "This network produces output accuracy" then
    "... prob", and no loss line: the loss layer has no named top.
    """
    net = Net(text_format.Parse("""
        layer { name: "in" type: "Input" top: "x" top: "label"
          input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
        layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
          inner_product_param { num_output: 5 } }
        layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" }
        layer { name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" }
        """, caffe_pb2.NetParameter()), caffe_pb2.TEST)
    assert net.outputs == ["accuracy", "prob"]
    net.blobs["x"].data[...] = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    net.blobs["label"].data[...] = [0, 1, 2, 3]
    assert net.forward_loss() > 0   # the anonymous top still counts toward the loss
    assert sorted(net.forward()) == ["accuracy", "prob"]
