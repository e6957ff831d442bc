"""Data-parallel training across processes (and machines) on MPI, as Caffe's multi-GPU training.

    mpirun -n 4 python -m minicaffe train --solver lenet_solver.prototxt

or from a script started with mpirun:

    from minicaffe import parallel
    parallel.init()                                   # before any net is built
    solver = minicaffe.get_solver("lenet_solver.prototxt")
    parallel.data_parallel(solver)                    # broadcast rank 0's weights, hook the reduce
    solver.step(100)                                  # every rank; rank 0 logs/tests/snapshots

Each rank reads its own batches (TRAIN data layers shard their records by rank),
the param diffs are summed over the ranks and divided by their number after
backward, and every rank applies the same update: N ranks x batch B train like
one process with batch B and iter_size N. MPI comes from mpi4py
(pip install 'minicaffe[mpi]'), imported only when asked for.
"""
from .context import (launched_size, multiprocess, set_multiprocess, set_solver_count,  # noqa: F401
                      set_solver_rank, solver_count, solver_rank)

__all__ = ["init", "data_parallel", "ParallelError", "solver_count", "solver_rank",
           "set_solver_count", "set_solver_rank", "set_multiprocess", "launched_size", "NCCL"]


class ParallelError(RuntimeError):
    """Data-parallel training asked for but impossible as set up (no MPI, wrong order)."""


def init():
    """Start MPI (mpi4py) and set solver_count()/solver_rank() from it; returns the communicator."""
    from .mpi import init as _init
    return _init()


def data_parallel(solver, *, comm=None, **kwargs):
    """Make `solver` train data-parallel over MPI's ranks (see minicaffe.parallel.mpi)."""
    from .mpi import data_parallel as _data_parallel
    return _data_parallel(solver, comm=comm, **kwargs)


class NCCL:
    """pycaffe's caffe.NCCL: minicaffe has no GPUs; the same training runs over MPI."""

    def __init__(self, *args, **kwargs):
        raise ParallelError("caffe.NCCL is GPU-only; minicaffe trains data-parallel over MPI: "
                            "start the script with mpirun, call minicaffe.parallel.init() before "
                            "building the solver and minicaffe.parallel.data_parallel(solver) "
                            "after (pip install 'minicaffe[mpi]')")
