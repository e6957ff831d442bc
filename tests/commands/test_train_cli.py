"""`minicaffe train / test / time` end to end on a tiny least-squares net (in-process)."""
import os
import re
import signal
import subprocess
import sys

import pytest

from minicaffe import Layer, register_layer
from minicaffe import layer as layer_module
from minicaffe.cli import main
from minicaffe.proto import caffe_pb2

from ..solvers.solver_helpers import lsq_net_text, make_dataset, registered_data_layer

GLOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] ")


class SignalLayer(Layer):
    """Passes nothing on; sends `signum` to this process on forward call number `at`."""

    exact_num_bottom = 1
    exact_num_top = 0
    signum, at, calls = None, 0, 0

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        cls = type(self)
        cls.calls += 1
        if cls.calls == cls.at:
            os.kill(os.getpid(), cls.signum)


@pytest.fixture(autouse=True)
def _layers():
    make_dataset("lsq", 4, 6)
    register_layer("SignalAtForward")(SignalLayer)
    try:
        with registered_data_layer():
            yield
    finally:
        layer_module._REGISTRY.pop("SignalAtForward", None)
        layer_module._SOURCES.pop("SignalAtForward", None)


def write_model(folder, max_iter=6, snapshot=3, prefix="snap/lsq", extra="", net_extra=""):
    folder.mkdir(exist_ok=True)
    (folder / "snap").mkdir(exist_ok=True)
    (folder / "net.prototxt").write_text(lsq_net_text(4) + net_extra)
    solver = folder / "solver.prototxt"
    solver.write_text(
        f'net: "net.prototxt"\nbase_lr: 0.05\nmomentum: 0.9\nweight_decay: 0.01\n'
        f'lr_policy: "inv"\ngamma: 0.01\npower: 0.75\ndisplay: 2\nmax_iter: {max_iter}\n'
        f'snapshot: {snapshot}\nsnapshot_prefix: "{folder / prefix}"\nrandom_seed: 3\n'
        f'test_iter: 2\ntest_interval: 3\nsolver_mode: GPU\n{extra}')
    return solver


def run_cli(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_train_writes_snapshots_and_caffe_log_lines(tmp_path, capsys):
    solver = write_model(tmp_path)
    status, out, err = run_cli(capsys, "train", "--solver", str(solver))
    assert status == 0
    assert sorted(os.listdir(tmp_path / "snap")) == [
        "lsq_iter_3.caffemodel", "lsq_iter_3.solverstate", "lsq_iter_3.solverstate.resume.json",
        "lsq_iter_6.caffemodel", "lsq_iter_6.solverstate", "lsq_iter_6.solverstate.resume.json"]
    lines = err.strip().splitlines()
    assert all(GLOG_LINE.match(line) for line in lines), [l for l in lines if not GLOG_LINE.match(l)]
    assert "Use CPU." in err and "Solving TestNetwork" in err
    assert re.search(r"Iteration 2 \(.* iter/s, .*s/2 iters\), loss = [\d.e+-]+\n", err)
    assert re.search(r"Iteration 2, lr = 0.04\d+", err)
    assert re.search(r"Test net output #0: loss = [\d.e+-]+ \(\* 1 = [\d.e+-]+ loss\)", err)
    assert "Iteration 6, loss = " in err and "Optimization Done." in err
    assert out == ""     # no progress bar when stdout is not a terminal


def test_log_file_parses_like_a_caffe_log(tmp_path, capsys):
    solver = write_model(tmp_path)
    log = tmp_path / "train.log"
    assert main(["train", "--solver", str(solver), "--log", str(log)]) == 0
    text = log.read_text()
    assert text.strip() == capsys.readouterr().err.strip()
    # The regexes of Caffe's tools/extra/parse_log.py.
    iterations = [int(m) for m in re.findall(r"Iteration (\d+)", text)]
    assert max(iterations) == 6
    tests = re.findall(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)", text)
    train = re.findall(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)", text)
    rates = re.findall(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)", text)
    assert len(tests) == 3 and len(train) == 3 and len(rates) == 3    # iterations 0, 3, 6 / 0, 2, 4
    assert any("] Solving " in line for line in text.splitlines())


def test_resume_from_snapshot_is_bit_for_bit(tmp_path, capsys):
    straight = write_model(tmp_path / "a")
    assert main(["train", "--solver", str(straight)]) == 0
    resumed = write_model(tmp_path / "b")
    state = tmp_path / "a" / "snap" / "lsq_iter_3.solverstate"
    assert main(["train", "-solver", str(resumed), "--snapshot", str(state)]) == 0  # Caffe spelling
    assert not (tmp_path / "b" / "snap" / "lsq_iter_3.caffemodel").exists()
    assert (tmp_path / "a" / "snap" / "lsq_iter_6.caffemodel").read_bytes() == \
        (tmp_path / "b" / "snap" / "lsq_iter_6.caffemodel").read_bytes()
    a = caffe_pb2.SolverState.FromString((tmp_path / "a/snap/lsq_iter_6.solverstate").read_bytes())
    b = caffe_pb2.SolverState.FromString((tmp_path / "b/snap/lsq_iter_6.solverstate").read_bytes())
    assert a.iter == b.iter == 6 and list(a.history) == list(b.history)
    assert "Resuming from" in capsys.readouterr().err


def test_finetune_from_weights(tmp_path, capsys):
    solver = write_model(tmp_path, max_iter=3, snapshot=0, prefix="snap/ft")
    first = write_model(tmp_path / "pre", max_iter=3)
    assert main(["train", "--solver", str(first)]) == 0
    weights = tmp_path / "pre" / "snap" / "lsq_iter_3.caffemodel"
    status, _, err = run_cli(capsys, "train", "--solver", str(solver), "--weights", str(weights))
    assert status == 0 and f"Finetuning from {weights}" in err


def test_yaml_solver(tmp_path, capsys):
    write_model(tmp_path)
    (tmp_path / "solver.yaml").write_text(
        "net: net.prototxt\nbase_lr: 0.05\nlr_policy: fixed\nmax_iter: 2\n"
        f"snapshot_prefix: {tmp_path / 'snap' / 'y'}\ntype: Adam\nmomentum: 0.9\n")
    status, _, err = run_cli(capsys, "train", "--solver", str(tmp_path / "solver.yaml"))
    assert status == 0
    assert (tmp_path / "snap" / "y_iter_2.solverstate").exists()


@pytest.mark.parametrize("argv,message", [
    (["train"], "need a solver definition"),
    (["train", "--solver", "s.prototxt", "--weights", "w", "--snapshot", "s"],
     "give a snapshot to resume training or weights to finetune, not both"),
    (["train", "--solver", "s.prototxt", "--sigint_effect", "pause"], "invalid --sigint_effect"),
    (["train", "--solver", "missing.prototxt"], "missing.prototxt: no such file"),
    (["test", "--model", "net.prototxt"], "need model weights"),
    (["test", "--weights", "w.caffemodel"], "need a model definition"),
    (["time", "--model", "net.prototxt", "--phase", "DEPLOY"], '--phase must be "TRAIN" or "TEST"'),
    (["time"], "need a model definition"),
])
def test_bad_flags_give_one_line_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.prototxt").write_text("")
    status, _, err = run_cli(capsys, *argv)
    assert status == 1
    assert err.count("\n") == 1 and err.startswith("minicaffe: error: ") and message in err


def test_unknown_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--solvr", "x"])
    assert info.value.code == 2


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="no such file"):
        main(["--debug", "train", "--solver", str(tmp_path / "missing.prototxt")])
    with pytest.raises(Exception, match="no such file"):
        main(["train", "--solver", str(tmp_path / "missing.prototxt"), "--debug"])


def test_test_command_reports_batches_and_means(tmp_path, capsys):
    solver = write_model(tmp_path)
    assert main(["train", "--solver", str(solver)]) == 0
    capsys.readouterr()
    weights = tmp_path / "snap" / "lsq_iter_6.caffemodel"
    status, _, err = run_cli(capsys, "test", "--model", str(tmp_path / "net.prototxt"),
                             "--weights", str(weights), "--iterations", "3")
    assert status == 0
    batch = re.findall(r"Batch (\d), loss = ([\d.e+-]+)", err)
    assert [b for b, _ in batch] == ["0", "1", "2"]
    mean = re.search(r"\] loss = ([\d.e+-]+) \(\* 1 = ([\d.e+-]+) loss\)", err)
    assert float(mean.group(1)) == pytest.approx(float(batch[0][1]), rel=1e-5)
    assert re.search(r"Loss: [\d.e+-]+", err)


def test_time_command_reports_every_layer(tmp_path, capsys):
    write_model(tmp_path)
    for phase in ("TRAIN", "TEST"):
        status, _, err = run_cli(capsys, "time", "--model", str(tmp_path / "net.prototxt"),
                                 "--iterations", "2", "--phase", phase)
        assert status == 0
        for layer in ("data", "innerprod", "loss"):
            assert re.search(rf"{layer}\tforward: [\d.e+-]+ ms\.", err)
            assert re.search(rf"{layer}\tbackward: [\d.e+-]+ ms\.", err)
        for total in ("Average Forward pass", "Average Backward pass", "Average Forward-Backward",
                      "Total Time"):
            assert re.search(rf"{total}: [\d.e+-]+ ms\.", err)
        assert err.count("forward-backward time") == 2


SIGNAL_NET = """
layer { name: 'signal' type: 'SignalAtForward' bottom: 'innerprod' }
"""


def test_ctrl_c_stops_after_the_iteration_and_leaves_a_snapshot(tmp_path, capsys):
    solver = write_model(tmp_path, max_iter=10, snapshot=0, net_extra=SIGNAL_NET.replace(
        "bottom: 'innerprod'", "bottom: 'innerprod' include { phase: TRAIN }"))
    SignalLayer.signum, SignalLayer.at, SignalLayer.calls = signal.SIGINT, 3, 0
    previous = signal.getsignal(signal.SIGINT)
    status, _, err = run_cli(capsys, "train", "--solver", str(solver))
    assert status == 130 and signal.getsignal(signal.SIGINT) is previous
    assert "Optimization stopped early." in err
    assert sorted(os.listdir(tmp_path / "snap")) == [
        "lsq_iter_3.caffemodel", "lsq_iter_3.solverstate", "lsq_iter_3.solverstate.resume.json"]


def test_sighup_snapshots_and_continues(tmp_path, capsys):
    if not hasattr(signal, "SIGHUP"):
        pytest.skip("no SIGHUP on this platform")
    solver = write_model(tmp_path, max_iter=5, snapshot=0, net_extra=SIGNAL_NET.replace(
        "bottom: 'innerprod'", "bottom: 'innerprod' include { phase: TRAIN }"))
    SignalLayer.signum, SignalLayer.at, SignalLayer.calls = signal.SIGHUP, 2, 0
    status, _, err = run_cli(capsys, "train", "--solver", str(solver))
    assert status == 0
    assert sorted(os.listdir(tmp_path / "snap")) == [
        "lsq_iter_2.caffemodel", "lsq_iter_2.solverstate", "lsq_iter_2.solverstate.resume.json",
        "lsq_iter_5.caffemodel", "lsq_iter_5.solverstate", "lsq_iter_5.solverstate.resume.json"]


def test_sigint_effect_snapshot(tmp_path, capsys):
    solver = write_model(tmp_path, max_iter=4, snapshot=0, extra="snapshot_after_train: false\n",
                         net_extra=SIGNAL_NET.replace(
                             "bottom: 'innerprod'", "bottom: 'innerprod' include { phase: TRAIN }"))
    SignalLayer.signum, SignalLayer.at, SignalLayer.calls = signal.SIGINT, 1, 0
    status, _, _ = run_cli(capsys, "train", "--solver", str(solver), "--sigint_effect", "snapshot")
    assert status == 0
    assert sorted(os.listdir(tmp_path / "snap")) == [
        "lsq_iter_1.caffemodel", "lsq_iter_1.solverstate", "lsq_iter_1.solverstate.resume.json"]


def test_progress_bar_shows_loss_and_lr(tmp_path):
    import io

    from minicaffe.commands.train import progress_bar
    from minicaffe.solvers import get_solver
    write_model(tmp_path, max_iter=4, snapshot=0)
    solver = get_solver(str(tmp_path / "solver.prototxt"))
    stream = io.StringIO()
    with progress_bar(solver, True, file=stream):
        solver.step(4)
    text = stream.getvalue()
    assert "4/4" in text and "loss=" in text and "lr=" in text


def test_python_dash_m_help_runs():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "minicaffe", "--help"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0
    for command in ("train", "test", "time"):
        assert command in done.stdout
    done = subprocess.run([sys.executable, "-m", "minicaffe", "train", "--help"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "--sigint_effect" in done.stdout
