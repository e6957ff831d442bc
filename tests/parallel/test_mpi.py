"""Data-parallel training under `mpirun -n 2` equals one process with iter_size 2; faults end the job.

Tolerance: the 2-rank weights after K iterations match the 1-rank iter_size-2 weights to
rtol 1e-5, atol 1e-6 (float32 rounding: the layers may accumulate a param's gradient in
another order when its two halves are summed by MPI instead of inside the layer). For this
net they come out bitwise equal (measured).
"""
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("mpi4py", reason="data-parallel tests need mpi4py (pip install 'minicaffe[mpi]')")

import minicaffe  # noqa: E402
from minicaffe.db import array_to_datum, open_writer  # noqa: E402
from minicaffe.proto import caffe_pb2  # noqa: E402

MPIRUN = shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep +
                      os.environ.get("PATH", ""))
pytestmark = pytest.mark.skipif(MPIRUN is None, reason="no mpirun on PATH (pip install "
                                                       "'minicaffe[mpi]' brings Open MPI's)")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mpi_worker.py")
B, K, RECORDS = 4, 5, 48

NET = """name: "tiny"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ scale: 0.00390625 }}
  data_param {{ source: "{source}" batch_size: {batch} backend: LMDB prefetch: 1 }} }}
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ scale: 0.00390625 }}
  data_param {{ source: "{source}" batch_size: {batch} backend: LMDB prefetch: 1 }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param {{ num_output: 4 kernel_size: 3 weight_filler {{ type: "xavier" }}
                       bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "conv" top: "conv" }}
layer {{ name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
"""

SOLVERS = {
    "SGD": 'type: "SGD" base_lr: 0.1 momentum: 0.9 weight_decay: 0.0005',
    "Adam": 'type: "Adam" base_lr: 0.01 momentum: 0.9 momentum2: 0.999 delta: 1e-8',
}


def mpirun(args, tmp_path, timeout=60, n=2):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    cmd = [MPIRUN, "-n", str(n), "--oversubscribe"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return subprocess.run(cmd + [sys.executable] + args, cwd=tmp_path, env=env, timeout=timeout,
                          capture_output=True, text=True)


def write_db(path, images, labels, corrupt=()):
    with open_writer(str(path)) as db:
        for i, (img, label) in enumerate(zip(images, labels)):
            value = b"not a datum" if i in corrupt else array_to_datum(img, int(label)).SerializeToString()
            db.put(b"%08d" % i, value)
    return str(path)


def dataset(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (RECORDS, 1, 8, 8), dtype=np.uint8), rng.integers(0, 3, RECORDS)


def serial_order():
    """Record order making one reader's iteration t, pass r read what rank r reads at iteration t:
    rank r reads records r, r+2, r+4, ... of the 2-rank database."""
    order = []
    for t in range(K):
        for r in range(2):
            order += [2 * (t * B + i) + r for i in range(B)]
    return order + [i for i in range(RECORDS) if i not in order]


def write_solver(path, net_path, kind, iter_size, max_iter=K, prefix="snap", extra=""):
    path.write_text(f'net: "{net_path}"\n{SOLVERS[kind]}\nlr_policy: "fixed"\nrandom_seed: 7\n'
                    f'max_iter: {max_iter}\niter_size: {iter_size}\ndisplay: 1\n'
                    f'snapshot_after_train: true\nsnapshot_prefix: "{prefix}"\n{extra}')
    return str(path)


def setup_case(tmp_path, kind):
    images, labels = dataset()
    parallel_db = write_db(tmp_path / "parallel_lmdb", images, labels)
    order = serial_order()
    serial_db = write_db(tmp_path / "serial_lmdb", images[order], labels[order])
    (tmp_path / "par.prototxt").write_text(NET.format(source=parallel_db, batch=B))
    (tmp_path / "ser.prototxt").write_text(NET.format(source=serial_db, batch=B))
    par = write_solver(tmp_path / "par_solver.prototxt", tmp_path / "par.prototxt", kind, 1,
                       prefix=str(tmp_path / "par"))
    ser = write_solver(tmp_path / "ser_solver.prototxt", tmp_path / "ser.prototxt", kind, 2,
                       prefix=str(tmp_path / "ser"))
    return par, ser


def serial_weights(solver_path):
    solver = minicaffe.get_solver(solver_path)
    solver.step(K)
    return [p.data.copy() for p in solver.net.learnable_params]


def check_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_cli_sgd_two_ranks_equal_one_rank_iter_size_two(tmp_path):
    par, ser = setup_case(tmp_path, "SGD")
    result = mpirun(["-m", "minicaffe", "train", "--solver", par], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "effective batch = 2 processes x batch 4 x iter_size 1 = 8" in result.stderr
    assert result.stderr.count("Snapshotting to binary proto") == 1   # rank 0 alone writes
    net = minicaffe.Net(str(tmp_path / "par.prototxt"), minicaffe.TRAIN,
                        weights=str(tmp_path / f"par_iter_{K}.caffemodel"))
    check_close([p.data for p in net.learnable_params], serial_weights(ser))


def test_api_adam_two_ranks_equal_one_rank_iter_size_two(tmp_path):
    par, ser = setup_case(tmp_path, "Adam")
    result = mpirun([WORKER, par, str(K), str(tmp_path / "w")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [np.load(tmp_path / f"w.rank{r}.npz") for r in range(2)]
    for key in ranks[0].files:   # every rank applied the same update
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key])
    check_close([ranks[0][str(i)] for i in range(len(ranks[0].files))], serial_weights(ser))


def test_resume_restores_every_rank(tmp_path):
    par, ser = setup_case(tmp_path, "SGD")
    short = write_solver(tmp_path / "short.prototxt", tmp_path / "par.prototxt", "SGD", 1,
                         max_iter=2, prefix=str(tmp_path / "par"),
                         extra="test_iter: 2\ntest_interval: 1\ntest_initialization: false\n")
    first = mpirun(["-m", "minicaffe", "train", "--solver", short], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    # Rank 0 alone tests (at iterations 1 and 2) while rank 1 waits for its gradients.
    assert first.stderr.count("Testing net (#0)") == 2
    assert first.stderr.count("Test net output #0: loss") == 2
    # Rank 1 gets weights and history from rank 0; its data position is rank 0's saved one,
    # one record on: the resumed run ends where the uninterrupted serial one does.
    resumed = mpirun(["-m", "minicaffe", "train", "--solver", par, "--snapshot",
                      str(tmp_path / "par_iter_2.solverstate")], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "restored iteration 2" in resumed.stderr
    net = minicaffe.Net(str(tmp_path / "par.prototxt"), minicaffe.TRAIN,
                        weights=str(tmp_path / f"par_iter_{K}.caffemodel"))
    check_close([p.data for p in net.learnable_params], serial_weights(ser))


def test_bad_record_on_one_rank_stops_every_rank(tmp_path):
    images, labels = dataset()
    db = write_db(tmp_path / "bad_lmdb", images, labels, corrupt={7})   # rank 1's 4th record
    (tmp_path / "net.prototxt").write_text(NET.format(source=db, batch=B))
    solver = write_solver(tmp_path / "solver.prototxt", tmp_path / "net.prototxt", "SGD", 1,
                          max_iter=1000, prefix=str(tmp_path / "bad"))
    start = time.monotonic()
    result = mpirun(["-m", "minicaffe", "train", "--solver", solver], tmp_path)
    assert time.monotonic() - start < 30
    assert result.returncode != 0
    # mpirun forwards each rank's stderr as it comes, so the line may follow other output.
    lines = [l[l.index("minicaffe: error"):] for l in result.stderr.splitlines()
             if "minicaffe: error: rank 1 of 2:" in l]
    assert lines and "'00000007'" in lines[0], result.stderr[-3000:]
    assert not list(tmp_path.glob("bad_iter_*"))


def test_killed_rank_ends_the_job(tmp_path):
    par, _ = setup_case(tmp_path, "SGD")
    long = write_solver(tmp_path / "long.prototxt", tmp_path / "par.prototxt", "SGD", 1,
                        max_iter=100000, prefix=str(tmp_path / "long"))
    start = time.monotonic()
    result = mpirun([WORKER, long, "100000", str(tmp_path / "k"), "kill"], tmp_path)
    elapsed = time.monotonic() - start
    assert elapsed < 30, f"took {elapsed:.1f}s"
    assert result.returncode != 0
    assert "rank 1" in result.stderr and "signal 9" in result.stderr, result.stderr[-3000:]
    assert not list(tmp_path.glob("k.rank*.npz"))
