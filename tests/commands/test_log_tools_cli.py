"""`minicaffe parse-log` and `plot-log` on a log written by `minicaffe train --log`."""
import csv
import math

import pytest

from minicaffe.cli import main
from minicaffe.training_log import LogFormatError, parse_log

NET = """
name: "tiny"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 8 dim: 4 } shape { dim: 8 }
                     data_filler { type: "gaussian" } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy"
  include { phase: TEST } }
"""


@pytest.fixture(scope="module")
def train_log(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    (d / "net.prototxt").write_text(NET)
    (d / "solver.prototxt").write_text(
        f'net: "{d / "net.prototxt"}" test_iter: 2 test_interval: 4 base_lr: 0.5 '
        f'lr_policy: "step" gamma: 0.5 stepsize: 4 display: 2 max_iter: 12 '
        f'snapshot_after_train: false random_seed: 1\n')
    log = d / "tiny.log"
    assert main(["train", "--solver", str(d / "solver.prototxt"), "--log", str(log)]) == 0
    return log


def test_parse_log_writes_caffes_tables(train_log, tmp_path, capsys):
    assert main(["parse-log", str(train_log), str(tmp_path), "--verbose"]) == 0
    with open(tmp_path / "tiny.log.train", newline="") as f:
        train = list(csv.DictReader(f))
    with open(tmp_path / "tiny.log.test", newline="") as f:
        test = list(csv.DictReader(f))
    assert list(train[0]) == ["NumIters", "Seconds", "LearningRate", "loss"]
    assert [float(r["NumIters"]) for r in train] == [0, 2, 4, 6, 8, 10]
    assert list(test[0]) == ["NumIters", "Seconds", "LearningRate", "accuracy", "loss"]
    assert [float(r["NumIters"]) for r in test] == [0, 4, 8, 12]
    # A row holds the rate last printed before its outputs (Caffe prints "Iteration N, lr"
    # after them), so the step policy's halvings at 4 and 8 show one display later.
    assert [float(r["LearningRate"]) for r in train] == [0.5, 0.5, 0.5, 0.25, 0.25, 0.125]
    assert all(float(r["Seconds"]) >= 0 for r in train)
    assert float(test[-1]["accuracy"]) == 1.0   # every label is 1: learnt by the end
    assert "Wrote" in capsys.readouterr().out


def test_parse_log_of_a_caffe_binary_log(tmp_path):
    log = tmp_path / "caffe.INFO"
    log.write_text(
        "I0210 13:39:20.000000 25210 solver.cpp:280] Solving LeNet\n"
        "I0210 13:39:20.100000 25210 solver.cpp:337] Iteration 0, Testing net (#0)\n"
        "I0210 13:39:21.000000 25210 solver.cpp:404]     Test net output #0: accuracy = 0.1\n"
        "I0210 13:39:21.000000 25210 solver.cpp:404]     Test net output #1: loss = 2.3 (* 1 = 2.3 loss)\n"
        "I0210 13:39:21.500000 25210 solver.cpp:228] Iteration 0, loss = 2.31\n"
        "I0210 13:39:21.500000 25210 solver.cpp:244]     Train net output #0: loss = 2.31 (* 1 = 2.31 loss)\n"
        "I0210 13:39:21.500000 25210 sgd_solver.cpp:106] Iteration 0, lr = 0.01\n"
        "I0210 13:39:22.381027 25210 solver.cpp:228] Iteration 100, loss = 0.2\n"
        "I0210 13:39:22.381027 25210 solver.cpp:244]     Train net output #0: loss = 0.2 (* 1 = 0.2 loss)\n"
        "I0210 13:39:22.381027 25210 sgd_solver.cpp:106] Iteration 100, lr = 0.00992565\n")
    train, test = parse_log(log)
    assert [(r["NumIters"], r["loss"]) for r in train] == [(0, 2.31), (100, 0.2)]
    assert train[1]["Seconds"] == pytest.approx(2.381027) and train[1]["LearningRate"] == 0.01
    assert len(test) == 0 or math.isnan(test[0]["LearningRate"])  # one partial test row, never full


def test_parse_log_refuses_a_file_that_is_not_a_log(tmp_path, capsys):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("hello\n")
    with pytest.raises(LogFormatError, match="no 'Solving' line"):
        parse_log(bogus)
    assert main(["parse-log", str(bogus), str(tmp_path)]) == 1
    assert "no 'Solving' line" in capsys.readouterr().err


def test_plot_log_draws_every_chart_type(train_log, tmp_path):
    pytest.importorskip("matplotlib", reason="plot-log needs matplotlib (the plot extra)")
    for chart in range(8):
        out = tmp_path / f"chart{chart}.png"
        assert main(["plot-log", str(chart), str(out), str(train_log)]) == 0
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_log_svg_field_and_errors(train_log, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="plot-log needs matplotlib (the plot extra)")
    out = tmp_path / "acc.svg"
    assert main(["plot-log", "0", str(out), str(train_log), str(train_log)]) == 0
    assert "<svg" in out.read_text()
    assert main(["plot-log", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "0: Test accuracy  vs. Iters" in listing and "7: Train loss  vs. Seconds" in listing
    assert main(["plot-log", "9", str(out), str(train_log)]) == 1
    assert "not a valid chart type" in capsys.readouterr().err
    assert main(["plot-log", "0", str(tmp_path / "x.png"), str(train_log), "--field", "nope"]) == 1
    assert "no net output 'nope'" in capsys.readouterr().err
