"""`minicaffe train` when things go wrong: signals, divergence, exit statuses (in-process)."""
import os
import signal

import pytest

from .test_train_cli import SIGNAL_NET, SignalLayer, _layers, run_cli, write_model  # noqa: F401

TRAIN_ONLY_SIGNAL = SIGNAL_NET.replace("bottom: 'innerprod'",
                                       "bottom: 'innerprod' include { phase: TRAIN }")


def test_a_normal_run_says_optimization_done_once(tmp_path, capsys):
    status, _, err = run_cli(capsys, "train", "--solver", str(write_model(tmp_path)))
    assert status == 0
    assert err.count("Optimization Done.") == 1


def test_sigterm_stops_like_ctrl_c_leaves_a_snapshot_and_exits_143(tmp_path, capsys):
    solver = write_model(tmp_path, max_iter=10, snapshot=0, net_extra=TRAIN_ONLY_SIGNAL)
    SignalLayer.signum, SignalLayer.at, SignalLayer.calls = signal.SIGTERM, 3, 0
    previous = signal.getsignal(signal.SIGTERM)
    status, _, err = run_cli(capsys, "train", "--solver", str(solver))
    assert status == 143 and signal.getsignal(signal.SIGTERM) is previous
    assert "Optimization stopped early." in err and "Optimization Done." not in err
    assert "Stopped by SIGTERM at iteration 3 of 10; exit status 143" in err
    assert sorted(os.listdir(tmp_path / "snap")) == [
        "lsq_iter_3.caffemodel", "lsq_iter_3.solverstate", "lsq_iter_3.solverstate.resume.json"]


def test_sigterm_effect_none_keeps_training(tmp_path, capsys):
    solver = write_model(tmp_path, max_iter=4, snapshot=0, net_extra=TRAIN_ONLY_SIGNAL)
    SignalLayer.signum, SignalLayer.at, SignalLayer.calls = signal.SIGTERM, 2, 0
    status, _, err = run_cli(capsys, "train", "--solver", str(solver), "--sigterm_effect", "none")
    assert status == 0 and err.count("Optimization Done.") == 1
    assert sorted(os.listdir(tmp_path / "snap")) == [
        "lsq_iter_4.caffemodel", "lsq_iter_4.solverstate", "lsq_iter_4.solverstate.resume.json"]


def test_sigterm_effect_snapshot_snapshots_and_continues(tmp_path, capsys):
    solver = write_model(tmp_path, max_iter=4, snapshot=0, extra="snapshot_after_train: false\n",
                         net_extra=TRAIN_ONLY_SIGNAL)
    SignalLayer.signum, SignalLayer.at, SignalLayer.calls = signal.SIGTERM, 1, 0
    status, _, _ = run_cli(capsys, "train", "--solver", str(solver), "-sigterm_effect", "snapshot")
    assert status == 0
    assert sorted(os.listdir(tmp_path / "snap")) == [
        "lsq_iter_1.caffemodel", "lsq_iter_1.solverstate", "lsq_iter_1.solverstate.resume.json"]


def test_bad_sigterm_effect(tmp_path, capsys):
    status, _, err = run_cli(capsys, "train", "--solver", str(write_model(tmp_path)),
                             "--sigterm_effect", "explode")
    assert status == 1
    assert err.strip() == ("minicaffe: error: invalid --sigterm_effect 'explode'; use one of "
                           "stop, snapshot, none")


def test_divergence_is_one_error_line_exit_1_and_no_warnings(tmp_path, capsys):
    solver = write_model(tmp_path, max_iter=30, snapshot=1)
    text = solver.read_text().replace("base_lr: 0.05", "base_lr: 1e15")
    solver.write_text(text)
    status, out, err = run_cli(capsys, "train", "--solver", str(solver))
    assert status == 1 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("minicaffe: error:")]
    assert len(errors) == 1 and "training diverged at iteration " in errors[0]
    assert "Warning" not in err and ".py:" not in errors[0]
    assert "Optimization Done." not in err
    # the snapshots on disk are the good ones, each complete
    names = os.listdir(tmp_path / "snap")
    states = sorted(n for n in names if n.endswith(".solverstate"))
    assert all(n[:-len(".solverstate")] + ".caffemodel" in names for n in states)
    assert not [n for n in names if n.startswith(".tmp-")]


def test_time_refuses_a_nan_initial_loss(tmp_path, capsys):
    net = tmp_path / "nan.prototxt"
    net.write_text("""
layer { name: 'data' type: 'DummyData' top: 'data' top: 'label'
        dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 }
                           data_filler { type: 'constant' value: -1 } } }
layer { name: 'log' type: 'Log' bottom: 'data' top: 'logged' }
layer { name: 'loss' type: 'EuclideanLoss' bottom: 'logged' bottom: 'label' top: 'loss' }
""")
    status, _, err = run_cli(capsys, "time", "--model", str(net), "--iterations", "1")
    assert status == 1
    assert err.strip().splitlines()[-1] == (
        "minicaffe: error: the initial loss is nan: layer 'log' (Log) forward: top 'logged' data "
        "has 6 non-finite values (of 6); the timings would be of non-finite arithmetic")
    assert "RuntimeWarning" not in err


@pytest.fixture(autouse=True)
def _reset_signal_layer():
    yield
    SignalLayer.signum, SignalLayer.at, SignalLayer.calls = None, 0, 0
