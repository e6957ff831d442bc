"""The training loop around the update: test nets, display, snapshots, files, seeds, errors."""
import os

import numpy as np
import pytest
from google.protobuf import text_format

import minicaffe
from minicaffe.net import Net
from minicaffe.proto import caffe_pb2
from minicaffe.solvers import SNAPSHOT, STOP, SGDSolver, SolverError, get_solver

from .solver_helpers import lsq_net_text, lsq_solver_param, make_dataset


@pytest.fixture(autouse=True)
def dataset():
    return make_dataset("lsq", 4, 6)


def read_state(path):
    state = caffe_pb2.SolverState()
    with open(path, "rb") as f:
        state.ParseFromString(f.read())
    return state


RANDOM_NET = """
name: 'random'
layer { name: 'data' type: 'DummyData' top: 'x' top: 'y'
        dummy_data_param { shape { dim: 8 dim: 5 } shape { dim: 8 dim: 2 }
                           data_filler { type: 'gaussian' std: 1 } } }
layer { name: 'ip' type: 'InnerProduct' bottom: 'x' top: 'ip'
        inner_product_param { num_output: 2 weight_filler { type: 'xavier' } } }
layer { name: 'drop' type: 'Dropout' bottom: 'ip' top: 'ip' include { phase: TRAIN } }
layer { name: 'loss' type: 'EuclideanLoss' bottom: 'ip' bottom: 'y' top: 'loss' }
"""


def random_solver(seed, **fields):
    p = caffe_pb2.SolverParameter(base_lr=0.05, lr_policy="fixed", max_iter=5, momentum=0.9,
                                  random_seed=seed, snapshot_after_train=False, **fields)
    text_format.Parse(RANDOM_NET, p.net_param)
    return get_solver(p)


def losses_of(solver, n):
    out = []
    solver.add_callback(on_gradients_ready=lambda: out.append(float(solver.net.blobs["loss"].data)))
    solver.step(n)
    return out


def test_random_seed_repeats_fillers_dropout_and_data():
    a = losses_of(random_solver(7), 5)
    b = losses_of(random_solver(7), 5)
    c = losses_of(random_solver(8), 5)
    assert a == b
    assert a != c


def test_average_loss_smooths_the_displayed_loss():
    solver = random_solver(3, average_loss=3)
    seen, smoothed = [], []
    solver.add_callback(on_gradients_ready=lambda: (seen.append(float(solver.net.blobs["loss"].data)),
                                                    smoothed.append(solver.smoothed_loss)))
    solver.step(6)
    for i, s in enumerate(smoothed):
        window = seen[max(0, i - 2): i + 1]
        assert s == pytest.approx(np.mean(window), rel=1e-5)


def test_display_logs_caffe_lines(caplog):
    p = lsq_solver_param("SGD", display=2, max_iter=4)
    solver = get_solver(p)
    with caplog.at_level("INFO", logger="minicaffe"):
        solver.solve()
    text = caplog.text
    assert "Solving TestNetwork" in text and "Learning Rate Policy: fixed" in text
    assert "Iteration 2 (" in text and "iters), loss = " in text
    assert "Train net output #0: loss = " in text and "(* 1 = " in text
    assert "Iteration 2, lr = 0.1" in text
    assert "Iteration 4, loss = " in text     # the final display after max_iter
    assert "Optimization Done." in text


def test_test_nets_share_weights_and_report_means(caplog):
    p = lsq_solver_param("SGD", max_iter=4, test_interval=2, test_compute_loss=True)
    p.test_iter.append(3)
    p.test_iter.append(2)     # two generic test nets from `net_param`
    solver = get_solver(p)
    assert len(solver.test_nets) == 2
    assert solver.test_nets[0].phase == caffe_pb2.TEST
    with caplog.at_level("INFO", logger="minicaffe"):
        solver.solve()
    w_train = solver.net.layer_dict["innerprod"].blobs[0]
    w_test = solver.test_nets[1].layer_dict["innerprod"].blobs[0]
    assert w_test.shares_data_with(w_train)
    # test_initialization (default on) + iterations 2 and 4
    assert caplog.text.count("Testing net (#0)") == 3
    assert "Iteration 0, Testing net (#1)" in caplog.text
    assert "Test net output #0: loss = " in caplog.text and "Test loss: " in caplog.text
    result = solver.test(0)
    expected = solver.test_nets[0].forward_loss()   # the data is the same every batch
    assert result["loss"] == pytest.approx(expected, rel=1e-6)


def test_test_initialization_false_and_test_state(tmp_path):
    p = lsq_solver_param("SGD", max_iter=2, test_interval=5, test_initialization=False)
    p.test_iter.append(1)
    p.test_state.add(stage=["val"])
    layer = p.net_param.layer.add()
    text_format.Parse("name: 'only_val' type: 'Silence' bottom: 'innerprod' "
                      "include { stage: 'val' }", layer)
    solver = get_solver(p)
    assert "only_val" in solver.test_nets[0].layer_names
    assert "only_val" not in solver.net.layer_names
    ran = []
    solver.test = lambda i=0: ran.append(i)
    solver.solve()
    assert ran == []


def test_snapshot_files_and_solverstate_contents(tmp_path):
    prefix = str(tmp_path / "snap")
    p = lsq_solver_param("Adam", max_iter=5, snapshot=2, snapshot_prefix=prefix,
                         snapshot_after_train=True, momentum=0.9)
    solver = get_solver(p)
    solver.solve()
    names = sorted(os.listdir(tmp_path))
    assert names == [f"snap_iter_{i}{ext}" for i in (2, 4, 5)
                     for ext in (".caffemodel", ".solverstate", ".solverstate.resume.json")]
    state = read_state(tmp_path / "snap_iter_5.solverstate")
    assert state.iter == 5 and state.learned_net == prefix + "_iter_5.caffemodel"
    assert len(state.history) == 4 and tuple(state.history[0].shape.dim) == (1, 6)
    np.testing.assert_array_equal(np.array(state.history[2].data, np.float32),
                                  solver.history[2].data.ravel())
    net = Net(caffe_pb2.NetParameter(layer=solver.net.net_param.layer), caffe_pb2.TRAIN,
              weights=str(tmp_path / "snap_iter_5.caffemodel"))
    np.testing.assert_array_equal(net.params["innerprod"][0].data,
                                  solver.net.params["innerprod"][0].data)


def test_snapshot_diff_writes_gradients(tmp_path):
    p = lsq_solver_param("SGD", max_iter=1, snapshot_prefix=str(tmp_path / "d"),
                         snapshot_after_train=True, snapshot_diff=True)
    get_solver(p).solve()
    model = caffe_pb2.NetParameter()
    model.ParseFromString((tmp_path / "d_iter_1.caffemodel").read_bytes())
    ip = [layer for layer in model.layer if layer.name == "innerprod"][0]
    assert len(ip.blobs[0].diff) == 6


def test_hdf5_snapshot_and_restore(tmp_path):
    pytest.importorskip("h5py")
    prefix = str(tmp_path / "h")
    fields = dict(snapshot_prefix=prefix, snapshot_format=caffe_pb2.SolverParameter.HDF5,
                  momentum=0.9)
    straight = get_solver(lsq_solver_param("AdaDelta", **fields))
    straight.step(4)
    first = get_solver(lsq_solver_param("AdaDelta", **fields))
    first.step(2)
    model, state = first.snapshot()
    assert model == prefix + "_iter_2.caffemodel.h5" and state == prefix + "_iter_2.solverstate.h5"
    second = get_solver(lsq_solver_param("AdaDelta", seed=5, **fields))
    second.restore(state)
    second.step(2)
    for a, b in zip(straight.net.learnable_params, second.net.learnable_params):
        np.testing.assert_array_equal(a.data, b.data)


def test_hdf5_format_without_h5py_says_so(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_h5py(name, *args, **kwargs):
        if name == "h5py":
            raise ImportError("no h5py")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_h5py)
    p = lsq_solver_param("SGD", snapshot_format=caffe_pb2.SolverParameter.HDF5)
    with pytest.raises(SolverError, match="h5py"):
        get_solver(p)


def test_restore_rejects_a_state_for_another_solver(tmp_path):
    sgd = get_solver(lsq_solver_param("SGD", snapshot_prefix=str(tmp_path / "s")))
    sgd.step(1)
    _, state = sgd.snapshot()
    adam = get_solver(lsq_solver_param("Adam", momentum=0.9))
    with pytest.raises(SolverError, match="holds 2 history blobs"):
        adam.restore(state)


def test_restore_finds_weights_next_to_a_moved_state(tmp_path):
    sgd = get_solver(lsq_solver_param("SGD", snapshot_prefix=str(tmp_path / "a" / "s")))
    (tmp_path / "a").mkdir()
    sgd.step(1)
    sgd.snapshot()
    os.rename(tmp_path / "a", tmp_path / "b")
    again = get_solver(lsq_solver_param("SGD"))
    again.restore(str(tmp_path / "b" / "s_iter_1.solverstate"))
    np.testing.assert_array_equal(again.net.learnable_params[0].data,
                                  sgd.net.learnable_params[0].data)


def test_action_function_stop_and_snapshot(tmp_path):
    p = lsq_solver_param("SGD", max_iter=10, snapshot_prefix=str(tmp_path / "x"),
                         snapshot_after_train=True)
    solver = get_solver(p)
    actions = iter(["none", SNAPSHOT, "none", STOP])
    solver.set_action_function(lambda: next(actions, "none"))
    solver.solve()
    assert solver.iter == 4 and solver.requested_early_exit
    assert sorted(os.listdir(tmp_path)) == [
        f"x_iter_{i}{ext}" for i in (2, 4)
        for ext in (".caffemodel", ".solverstate", ".solverstate.resume.json")]


def test_files_relative_to_the_solver_file_and_default_prefix(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "net.prototxt").write_text(lsq_net_text(4))
    (folder / "solver.prototxt").write_text(
        'net: "net.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 2\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    solver = minicaffe.get_solver(str(folder / "solver.prototxt"))
    solver.solve()       # snapshot_after_train defaults to true
    assert sorted(os.listdir(folder)) == ["net.prototxt", "solver.prototxt",
                                          "solver_iter_2.caffemodel", "solver_iter_2.solverstate",
                                          "solver_iter_2.solverstate.resume.json"]
    assert os.listdir(elsewhere) == []


def test_snapshot_prefix_directory_gets_the_solver_name(tmp_path):
    (tmp_path / "snaps").mkdir()
    (tmp_path / "net.prototxt").write_text(lsq_net_text(4))
    (tmp_path / "lenet_solver.yaml").write_text(
        f"net: net.prototxt\nbase_lr: 0.1\nlr_policy: fixed\nmax_iter: 1\n"
        f"snapshot_prefix: {tmp_path / 'snaps'}\n")
    solver = minicaffe.get_solver(str(tmp_path / "lenet_solver.yaml"))
    solver.solve()
    assert sorted(os.listdir(tmp_path / "snaps")) == [
        "lenet_solver_iter_1.caffemodel", "lenet_solver_iter_1.solverstate",
        "lenet_solver_iter_1.solverstate.resume.json"]


def test_weights_field_finetunes_train_and_test_nets(tmp_path):
    source = get_solver(lsq_solver_param("SGD", snapshot_prefix=str(tmp_path / "w")))
    source.step(3)
    model, _ = source.snapshot()
    p = lsq_solver_param("SGD", seed=123)
    p.weights.append(model)
    tuned = get_solver(p)
    np.testing.assert_array_equal(tuned.net.learnable_params[0].data,
                                  source.net.learnable_params[0].data)


def test_pycaffe_style_classes():
    solver = minicaffe.SGDSolver(lsq_solver_param("Adam"))   # class wins over `type`
    assert isinstance(solver, SGDSolver) and len(solver.history) == 2
    solver.step(2)
    assert solver.iter == 2 and solver.net.name == "TestNetwork"


@pytest.mark.parametrize("change,message", [
    (lambda p: p.ClearField("net_param"), "must specify a train net"),
    (lambda p: setattr(p, "train_net", "x.prototxt"), "specifies 2 train nets"),
    (lambda p: setattr(p, "type", "Adamax"), "unknown solver type 'Adamax'"),
    (lambda p: p.test_iter.append(2), "positive test_interval"),
    (lambda p: (p.test_iter.append(1), setattr(p, "test_interval", 1), p.test_state.add(),
                p.test_state.add()), "test_state must be given once per test net"),
    (lambda p: setattr(p, "average_loss", 0), "average_loss must be at least 1"),
    (lambda p: setattr(p, "iter_size", 0), "iter_size must be at least 1"),
    (lambda p: (setattr(p, "weight_decay", 0.1), setattr(p, "regularization_type", "L3")),
     "unknown regularization_type 'L3'"),
    (lambda p: setattr(p, "lr_policy", "linear"), "unknown lr_policy 'linear'"),
    (lambda p: (setattr(p, "type", "AdaGrad"), setattr(p, "momentum", 0.9)),
     "momentum cannot be used with AdaGrad"),
    (lambda p: (setattr(p, "type", "RMSProp"), setattr(p, "rms_decay", 1.0)),
     r"rms_decay must lie in \[0, 1\)"),
    (lambda p: setattr(p, "snapshot", 10), "snapshot is set but snapshot_prefix is not"),
    (lambda p: (setattr(p, "snapshot", 10), setattr(p, "snapshot_prefix", "/nonexistent/dir/x")),
     "cannot write to snapshot prefix"),
])
def test_bad_solver_settings_are_rejected(change, message):
    p = lsq_solver_param("SGD")
    change(p)
    with pytest.raises((SolverError, ValueError), match=message):
        get_solver(p)


def test_missing_net_file_names_both_places(tmp_path):
    (tmp_path / "s.prototxt").write_text('net: "nope.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\n')
    with pytest.raises(SolverError, match="nope.prototxt.*not found"):
        minicaffe.get_solver(str(tmp_path / "s.prototxt"))
