"""Which solver of how many this process is (Caffe's Caffe::solver_count / solver_rank).

Kept free of MPI and of the rest of minicaffe so that data layers can ask it while
a net is built: a TRAIN data layer built while solver_count() > 1 reads only its
rank's share of the records, as each of Caffe's multi-GPU solvers does.
"""
import os

__all__ = ["solver_count", "solver_rank", "set_solver_count", "set_solver_rank",
           "set_multiprocess", "multiprocess", "launched_size", "shard_bounds_ok"]

_state = {"count": 1, "rank": 0, "multiprocess": False}

# What MPI launchers export to each process: Open MPI, then MPICH/Intel MPI (Hydra), then PMIx.
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")


def solver_count():
    """How many solvers train together (1 unless running data-parallel)."""
    return _state["count"]


def solver_rank():
    """This solver's index among solver_count() (0 is the root: it logs, tests, snapshots)."""
    return _state["rank"]


def set_solver_count(count):
    """pycaffe's caffe.set_solver_count: data layers built afterwards shard by this count."""
    count = int(count)
    if count < 1:
        raise ValueError(f"solver count must be at least 1, got {count}")
    _state["count"] = count


def set_solver_rank(rank):
    """pycaffe's caffe.set_solver_rank: which share of the records this process's data layers read."""
    rank = int(rank)
    if rank < 0:
        raise ValueError(f"solver rank must be >= 0, got {rank}")
    _state["rank"] = rank


def set_multiprocess(flag):
    """pycaffe's caffe.set_multiprocess: recorded only; minicaffe's solvers are processes already."""
    _state["multiprocess"] = bool(flag)


def multiprocess():
    return _state["multiprocess"]


def launched_size():
    """The number of processes an MPI launcher (mpirun/mpiexec) started, from its environment;
    1 when not launched by one."""
    for name in _SIZE_VARS:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1


def shard_bounds_ok():
    """(rank, count) for sharding, after checking rank < count."""
    count, rank = _state["count"], _state["rank"]
    if rank >= count:
        raise ValueError(f"solver rank {rank} is not below the solver count {count}")
    return rank, count
