"""SIGKILL a training process at random moments (seeded), many of them inside snapshot writes:
the newest .solverstate on disk must always load and resume."""
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minicaffe.db import array_to_datum, open_writer
from minicaffe.solvers import get_solver

ROOT = Path(__file__).resolve().parents[2]

# A 1 MB model, snapshotted every iteration: most of the run is spent writing snapshots.
NET = """
name: 'killme'
layer { name: 'data' type: 'Data' top: 'data' top: 'label'
        transform_param { scale: 0.00390625 mirror: true }
        data_param { source: '%s' batch_size: 4 backend: LMDB } }
layer { name: 'wide' type: 'InnerProduct' bottom: 'data' top: 'wide'
        inner_product_param { num_output: 4000 weight_filler { type: 'xavier' } } }
layer { name: 'out' type: 'InnerProduct' bottom: 'wide' top: 'out'
        inner_product_param { num_output: 1 weight_filler { type: 'xavier' } } }
layer { name: 'loss' type: 'EuclideanLoss' bottom: 'out' bottom: 'label' top: 'loss' }
"""


def iteration_of(name):
    return int(re.search(r"_iter_(\d+)\.solverstate$", name).group(1))


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_at_random_moments_never_breaks_the_newest_snapshot(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(16, 1, 8, 8)).astype(np.uint8)
    with open_writer(str(tmp_path / "db"), "lmdb") as db:
        for i, img in enumerate(images):
            db.put(b"%08d" % i, array_to_datum(img, i % 3).SerializeToString())
    (tmp_path / "net.prototxt").write_text(NET % (tmp_path / "db"))
    (tmp_path / "snap").mkdir()
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(
        f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.0001\nmomentum: 0.9\nlr_policy: "fixed"\n'
        f'max_iter: 100000\nsnapshot: 1\nsnapshot_prefix: "{tmp_path / "snap" / "k"}"\n'
        'display: 0\nrandom_seed: 1\n')
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rng = random.Random(14)
    newest = None
    interrupted_writes = 0
    for run in range(6):
        argv = [sys.executable, "-m", "minicaffe", "train", "--solver", str(solver_file)]
        if newest:
            argv += ["--snapshot", str(newest)]      # each run resumes the last one's work
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            start = newest
            while time.monotonic() < deadline and proc.poll() is None:
                states = sorted((tmp_path / "snap").glob("*.solverstate"), key=lambda p:
                                iteration_of(p.name))
                if states and states[-1] != start:
                    break                         # this run has written a snapshot
                time.sleep(0.01)
            assert proc.poll() is None, "training ended before it could be killed"
            if run % 2:
                # the moment a snapshot's temporary appears: inside a snapshot write
                while time.monotonic() < deadline and not any(
                        n.startswith(".tmp-") for n in os.listdir(tmp_path / "snap")):
                    pass
            else:
                time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        names = os.listdir(tmp_path / "snap")
        interrupted_writes += any(n.startswith(".tmp-") for n in names)
        states = sorted((n for n in names if n.endswith(".solverstate")
                         and not n.startswith(".tmp-")), key=iteration_of)
        newest = tmp_path / "snap" / states[-1]
        solver = get_solver(str(solver_file))            # removes the killed run's temporaries
        solver.param.snapshot = 0
        assert not [n for n in os.listdir(tmp_path / "snap") if n.startswith(".tmp-")]
        solver.restore(str(newest))
        assert solver.iter == iteration_of(newest.name)
        solver.step(1)
        assert solver.net.params_finite()
        for layer in solver.net.layers:
            close = getattr(layer, "close", None)
            if close:
                close()
    print(f"{interrupted_writes} of 6 kills interrupted a snapshot write; newest {newest.name}")
    assert interrupted_writes >= 1
