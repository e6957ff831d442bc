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
    # A stand-in Caffe binary: checks the `caffe train` call and its solver, and logs one display
    # line per iteration, 12.5 ms apart, as Solver::Step does with display: 1.
    caffe = tmp_path / "caffe"
    caffe.write_text('#!/bin/sh\n[ "$1" = train ] && [ "$2" = -solver ] || exit 3\n'
                     'grep -q "^display: 1$" "$3" && grep -q "^momentum: 0.9$" "$3" || exit 4\n'
                     'net=$(sed -n \'s/^net: "\\(.*\\)"$/\\1/p\' "$3"); [ -f "$net" ] || exit 5\n'
                     'awk -v n="$(sed -n \'s/^max_iter: //p\' "$3")" \'BEGIN { for (i = 0; i < n; i++) '
                     'printf "I1202 01:02:%09.6f 1 solver.cpp:239] Iteration %d (80 iter/s), loss = 2.3\\n", '
                     '3 + i * 0.0125, i }\'\n')
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
    assert "Caffe's column is `caffe train` with the same net and solver settings" in out
    assert [r[0] for r in rows(out, "16") + rows(out, "64") + rows(out, "256")] == ["16", "64", "256"]
    layers = rows(out.split("lenet: minicaffe per layer")[1], "conv1") + rows(out, "ip1")
    assert [r[1] for r in layers] == ["Convolution", "InnerProduct"]


def test_caffe_step_is_the_median_gap_between_its_iteration_lines():
    bench = load_bench()
    line = "I20261202 {} 1 solver.cpp:239] Iteration {} (9 iter/s, 0.1s/1 iters), loss = 2.3\nI1202 x sgd_solver.cpp:112] Iteration {}, lr = 0.01"
    stamps = ["23:59:59.900000", "23:59:59.950000", "00:00:00.010000", "00:00:00.060000", "00:00:00.300000"]
    text = "\n".join(line.format(t, i, i) for i, t in enumerate(stamps))
    # gaps after one warm-up iteration: 60, 50, 240 ms (the first across midnight)
    assert bench.caffe_step_ms(text, 1, 3, "caffe") == pytest.approx(60.0)
    with pytest.raises(RuntimeError, match="caffe train: no 'Iteration N \\(' line for every iteration"):
        bench.caffe_step_ms(text, 1, 4, "caffe")


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
