"""benchmarks/train_bench.py: its quickest run prints its tables, and its PyTorch LeNet does minicaffe's work."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.benchmark_module import load_benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def load_bench():
    return load_benchmark("train_bench")


def rows(out, first_cell):
    """The cells of the markdown rows whose first cell is `first_cell`."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith(f"| {first_cell} |")]


def test_quick_run_prints_the_tables(tmp_path, mnist_dir):
    # A stand-in Caffe binary: checks the `caffe time` call and the parsing of its summary line.
    caffe = tmp_path / "caffe"
    caffe.write_text('#!/bin/sh\n[ "$1" = time ] && [ "$5" = TRAIN ] || exit 3\n'
                     'echo "I1202 01:02:03.000000 1 caffe.cpp:412] Average Forward-Backward: 12.5 ms."\n')
    caffe.chmod(0o755)
    cmd = [sys.executable, str(BENCHMARKS / "train_bench.py"), "--quick", "--nets", "lenet", "--engines",
           "minicaffe", "--threads", "1", "--layers", "--top", "5", "--caffe", str(caffe), "--mnist", str(mnist_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "$ python benchmarks/train_bench.py --quick --nets lenet" in out
    assert "| net | batch | minicaffe ms/step | minicaffe img/s | minicaffe MB | Caffe ms/step" in out
    (lenet,) = rows(out, "lenet")
    ms, per_s, mb, caffe_ms = (float(c) for c in lenet[2:6])
    assert ms > 0 and per_s == pytest.approx(64 * 1000 / ms, rel=0.01) and mb > 20
    assert caffe_ms == 12.5 and float(lenet[-1]) == pytest.approx(ms / 12.5, abs=0.01)
    assert "without the solver's update" in out
    assert [r[0] for r in rows(out, "16") + rows(out, "64") + rows(out, "256")] == ["16", "64", "256"]
    layers = rows(out.split("lenet: minicaffe per layer")[1], "conv1") + rows(out, "ip1")
    assert [r[1] for r in layers] == ["Convolution", "InnerProduct"]


def test_torch_lenet_computes_minicaffe_losses(tmp_path, mnist_dir):
    """Same weights, same real batches: the same loss at the first step and after two SGD updates."""
    try:
        import torch  # noqa: F401
    except ImportError:
        pytest.skip("PyTorch is absent (pip install torch==2.13.0): the fidelity check needs it")
    bench = load_bench()
    spec = bench.prepare("lenet", 64, tmp_path, mnist_dir)
    minicaffe_step, torch_step = bench.minicaffe_trainer(spec), bench.torch_trainer(spec, threads=1)
    ours = [minicaffe_step(i) for i in range(3)]
    theirs = [torch_step(i) for i in range(3)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    assert abs(ours[2] - ours[0]) > 1e-3  # the updates (and the batches) changed the loss


@pytest.mark.parametrize("name, phase", [("caffenet", "TEST"), ("resnet50", "TRAIN")])
def test_torch_twins_score_like_minicaffe(tmp_path, name, phase):
    """CaffeNet (TEST: no Dropout masks to differ) and ResNet-50 (TRAIN: batch-statistics BatchNorm):
    the PyTorch twins take the prototxts' weights unchanged and give minicaffe's loss."""
    try:
        import torch
    except ImportError:
        pytest.skip("PyTorch is absent (pip install torch==2.13.0): the fidelity check needs it")
    import minicaffe
    bench = load_bench()
    spec = bench.prepare(name, 2, tmp_path, mnist_dir=None)
    x, y = np.load(spec["data"])[0], np.load(spec["label"])[0]
    net = minicaffe.Net(spec["prototxt"], getattr(minicaffe, phase))
    bench.load_weights(net, spec["npz"])
    ours = float(net.forward(data=x, label=y)["loss"])
    model, _ = bench.torch_model(spec)
    model.train(phase == "TRAIN")
    with torch.no_grad():
        theirs = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y).long()).item()
    assert ours == pytest.approx(theirs, rel=1e-4)


def test_without_torch_its_column_is_skipped_with_the_install_command(monkeypatch, capsys):
    bench = load_bench()
    monkeypatch.setattr(bench, "torch_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["train_bench.py", "--nets", "lenet", "--engines", "torch"])
    with pytest.raises(SystemExit):
        bench.main()
    err = capsys.readouterr().err
    assert "PyTorch column skipped: pip install torch==2.13.0" in err and "no engine left to run" in err
