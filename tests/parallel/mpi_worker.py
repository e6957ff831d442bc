"""Run under mpirun by test_mpi.py: data-parallel training from the Python API.

    python mpi_worker.py SOLVER ITERS OUT_PREFIX [kill]

Trains ITERS iterations data-parallel and saves every rank's weights to
OUT_PREFIX.rank<r>.npz; with `kill`, rank 1 SIGKILLs itself after 2 iterations.
"""
import os
import signal
import sys

import numpy as np

import minicaffe
from minicaffe import parallel


def main(solver_path, iters, out_prefix, mode=""):
    parallel.init()
    solver = minicaffe.get_solver(solver_path)
    parallel.data_parallel(solver)
    rank = minicaffe.solver_rank()
    if mode == "kill" and rank == 1:
        def die():
            if solver.iter == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        solver.add_callback(on_iteration_end=die)
    solver.step(int(iters))
    np.savez(f"{out_prefix}.rank{rank}.npz",
             **{str(i): p.data for i, p in enumerate(solver.net.learnable_params)})


if __name__ == "__main__":
    main(*sys.argv[1:])
