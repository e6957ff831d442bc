"""Data-parallel solvers on MPI (mpi4py): weight broadcast, bucketed gradient allreduce.

One iteration on each of N ranks, as Caffe's multi-GPU training (P2PSync/NCCL):

    forward/backward on the rank's own batch(es) -> as backward passes the last layer
    writing a bucket's params, that bucket's diffs start an Iallreduce (SUM) -> after
    backward: wait, diff = sum / N -> the solver's own update (clip, normalize by
    iter_size, regularize, step), identical on every rank

so the gradient equals one process's with iter_size x N passes. Rank 0 alone
tests, snapshots and logs; a resume restores rank 0 and broadcasts its state.
Actions (Ctrl-C's stop, SIGHUP's snapshot) are agreed on after every iteration,
so every rank stops at the same iteration.
"""
import logging
import os
import sys

import numpy as np

from ..solvers.base import NONE, RESUME_SUFFIX, SNAPSHOT, STOP, Solver
from . import ParallelError, context

__all__ = ["init", "data_parallel", "abort", "DEFAULT_BUCKET_BYTES"]

log = logging.getLogger("minicaffe.parallel")

DEFAULT_BUCKET_BYTES = 1 << 20   # about per-layer granularity for LeNet-sized nets
_ACTION_CODE = {NONE: 0, SNAPSHOT: 1, STOP: 2}
_CODE_ACTION = {code: action for action, code in _ACTION_CODE.items()}
_comm = None


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        launched = context.launched_size()
        how = f"started by mpirun with {launched} processes, but " if launched > 1 else ""
        raise ParallelError(f"data-parallel training {how}needs mpi4py and an MPI library: pip "
                            f"install 'minicaffe[mpi]' ({exc})") from None
    return MPI


def init():
    """Start MPI and set solver_count()/solver_rank() to the world's size and this rank."""
    global _comm
    MPI = _mpi()
    if _comm is None:
        _comm = MPI.COMM_WORLD
        context.set_solver_count(_comm.Get_size())
        context.set_solver_rank(_comm.Get_rank())
        if _comm.Get_rank() != 0:
            # Rank 0 speaks for the job; the others still report warnings and errors.
            logging.getLogger("minicaffe").setLevel(logging.WARNING)
    return _comm


def abort(exc, code=1):
    """One line naming this rank and the cause on stderr, then end every rank (MPI_Abort)."""
    rank, size = context.solver_rank(), context.solver_count()
    print(f"minicaffe: error: rank {rank} of {size}: {exc or type(exc).__name__}", file=sys.stderr, flush=True)
    if _comm is not None:
        _comm.Abort(code)


class _Bucket:
    __slots__ = ("params", "views", "buffer", "trigger", "request")

    def __init__(self, params, trigger, dtype):
        self.params = params
        self.trigger = trigger          # fire once backward has run layer `trigger`
        self.buffer = np.empty(sum(p.count() for p in params), dtype)
        self.views, offset = [], 0
        for p in params:
            self.views.append(self.buffer[offset:offset + p.count()].reshape(p.shape))
            offset += p.count()
        self.request = None


class GradientReducer:
    """Sums the train net's param diffs over the ranks, bucket by bucket, during backward."""

    def __init__(self, solver, comm, bucket_bytes=DEFAULT_BUCKET_BYTES):
        self.MPI = _mpi()
        self.comm = comm
        self.solver = solver
        net = solver.net
        params = net.learnable_params
        # The lowest layer index writing each param's diff: once backward has passed it, the
        # diff is final. Params no backward writes are summed at the end anyway (cheap, safe).
        ready = [-1] * len(params)
        for i, owners in enumerate(net._param_owner_of):
            if not net.layer_need_backward[i]:
                continue
            for j, owner in enumerate(owners):
                if net.layers[i].param_propagate_down[j]:
                    ready[owner] = i if ready[owner] < 0 else min(ready[owner], i)
        order = sorted(range(len(params)), key=lambda k: -ready[k])   # reverse net order
        self.buckets, group, size = [], [], 0
        for k in order:
            if group and (size >= bucket_bytes or ready[k] < 0 <= ready[group[-1]]):
                self._add_bucket(params, group, ready, solver.dtype)
                group, size = [], 0
            group.append(k)
            size += params[k].diff.nbytes
        if group:
            self._add_bucket(params, group, ready, solver.dtype)
        need = [i for i, n in enumerate(net.layer_need_backward) if n]
        self.last_layer = min(need) if need else -1
        self.scale = solver._scalar(1.0 / comm.Get_size())
        self.passes = 0
        self.next_bucket = 0
        solver.add_callback(on_start=self.start, on_gradients_ready=self.finish)
        net.after_backward(self.after_layer)

    def _add_bucket(self, params, group, ready, dtype):
        self.buckets.append(_Bucket([params[k] for k in group], ready[group[-1]], dtype))

    def start(self):
        self.passes = 0
        self.next_bucket = 0

    def _fire(self, bucket):
        for view, p in zip(bucket.views, bucket.params):
            view[...] = p.diff
        bucket.request = self.comm.Iallreduce(self.MPI.IN_PLACE, bucket.buffer, op=self.MPI.SUM)

    def after_layer(self, i):
        """Net callback after layer i's backward: start the buckets it completed (last pass only)."""
        if self.passes == self.solver.param.iter_size - 1:
            buckets = self.buckets
            while self.next_bucket < len(buckets) and 0 <= buckets[self.next_bucket].trigger >= i:
                self._fire(buckets[self.next_bucket])
                self.next_bucket += 1
            # Without a progress thread, MPI moves nonblocking collectives on only inside calls.
            pending = [b.request for b in buckets[:self.next_bucket] if b.request is not None]
            if pending:
                self.MPI.Request.Testall(pending)
        if i == self.last_layer:
            self.passes += 1

    def finish(self):
        """After backward: the remaining buckets, wait for all, diff = sum over ranks / N."""
        for bucket in self.buckets[self.next_bucket:]:
            self._fire(bucket)
        self.next_bucket = len(self.buckets)
        for bucket in self.buckets:
            bucket.request.Wait()
            bucket.request = None
            for view, p in zip(bucket.views, bucket.params):
                np.multiply(view, self.scale, out=p.diff)


class DataParallelSolver(Solver):
    """Mixed in before a solver's class by data_parallel(); the single-process template is untouched."""

    _mpi_comm = None

    def _is_root(self):
        return self._mpi_comm.Get_rank() == 0

    def test_all(self):
        return super().test_all() if self._is_root() else []

    def test(self, test_net_id=0):
        self._in_test = True
        try:
            return super().test(test_net_id)
        finally:
            self._in_test = False

    def snapshot(self):
        return super().snapshot() if self._is_root() else None

    def requested_action(self):
        """Every rank's action, agreed: any rank's stop stops all; any snapshot request snapshots."""
        action = super().requested_action()
        if self._in_test:
            # Only rank 0 tests, so no collective here; a stop waits for the iteration's end.
            if action == STOP:
                self._pending_stop = True
                return NONE
            return action
        code = max(_ACTION_CODE[action], 2 if self._pending_stop else 0)
        self._pending_stop = False
        code = self._mpi_comm.allreduce(code, op=_mpi().MAX)
        return _CODE_ACTION[code]

    def restore(self, path):
        """Rank 0 reads the state; every rank gets its weights, history, iter and lr step."""
        if self._is_root():
            super().restore(path)
        self.sync_state()
        # Data positions and random states: rank 0's, each data layer offsetting to its share.
        # They are read from the file where it is visible (one machine, a shared file system).
        if not self._is_root() and os.path.exists(os.fspath(path) + RESUME_SUFFIX):
            self._restore_resume_state(os.fspath(path))

    def sync_state(self):
        """Broadcast rank 0's weights, solver history, iter and current_step to every rank."""
        comm = self._mpi_comm
        for blob in self.net.learnable_params:
            comm.Bcast(blob.data, root=0)
        for blob in self.history:
            comm.Bcast(blob.data, root=0)
        self.iter, self.current_step = comm.bcast((self.iter, self.current_step), root=0)


_CLASSES = {}


def data_parallel(solver, comm=None, bucket_bytes=DEFAULT_BUCKET_BYTES):
    """Turn `solver` (built after init()) into one of solver_count() data-parallel solvers.

    Broadcasts rank 0's weights and solver state, and hooks the gradient allreduce
    into its training loop. Returns the solver. With one rank, returns it as is.
    """
    if comm is None:
        if _comm is None:
            raise ParallelError("call minicaffe.parallel.init() before building the solver, so "
                                "that its data layers read only their rank's records")
        comm = _comm
    if isinstance(solver, DataParallelSolver):
        return solver
    if comm.Get_size() == 1:
        return solver
    if context.solver_count() != comm.Get_size():
        raise ParallelError(f"the solver's data layers were built for {context.solver_count()} "
                            f"solvers but MPI runs {comm.Get_size()}; call "
                            "minicaffe.parallel.init() before building the solver")
    cls = type(solver)
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"DataParallel{cls.__name__}", (DataParallelSolver, cls),
                             {"__doc__": f"{cls.__name__}, data-parallel over MPI."})
    solver.__class__ = _CLASSES[cls]
    solver._mpi_comm = comm
    solver._in_test = False
    solver._pending_stop = False
    solver.sync_state()
    solver._reducer = GradientReducer(solver, comm, bucket_bytes)
    net = solver.net
    batch = net._top_vecs[0][0].shape[0] if net.layers and net._top_vecs[0] else 0
    n, k = comm.Get_size(), solver.param.iter_size
    log.info("Data-parallel training on %d MPI processes: effective batch = %d processes x "
             "batch %d x iter_size %d = %d; gradients summed in %d bucket(s)", n, n, batch, k,
             n * batch * k, len(solver._reducer.buckets))
    return solver
