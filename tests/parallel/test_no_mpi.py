"""Asking for data-parallel training without mpi4py says which extra to install."""
import sys

import pytest

from minicaffe import cli, parallel
from minicaffe.parallel import context, mpi


@pytest.fixture
def no_mpi4py(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)   # `import mpi4py` now raises ImportError
    monkeypatch.setattr(mpi, "_comm", None)


def test_train_under_mpirun_without_mpi4py(tmp_path, monkeypatch, capsys, no_mpi4py):
    net = tmp_path / "net.prototxt"
    net.write_text('name: "n" layer { name: "x" type: "Input" top: "x" '
                   'input_param { shape { dim: 1 } } }')
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{net}"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 1\n')
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert cli.main(["train", "--solver", str(solver)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "started by mpirun with 2 processes" in err[0] and "minicaffe[mpi]" in err[0]
    assert context.solver_count() == 1


def test_init_without_mpi4py(no_mpi4py):
    with pytest.raises(parallel.ParallelError, match=r"pip install 'minicaffe\[mpi\]'"):
        parallel.init()


def test_data_parallel_before_init(no_mpi4py):
    with pytest.raises(parallel.ParallelError, match="init"):
        parallel.data_parallel(object())
