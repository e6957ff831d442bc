"""Native worker threads for compiled kernels: a split kernel call never needs the GIL.

minicaffe.threads' workers run Python callables, so a worker needs the GIL to start its block,
and the GIL is handed over through a futex: on a VM the waiting virtual CPU halts, and waking it
costs about 100 us, as long as a whole small layer at batch 1 (a SqueezeNet fire module's 3x3
Winograd input transform runs 80 us on one core; split over the Python pool it took 140).
Here a worker is a compiled loop (numba, GIL released) that polls its job counter, calling
sched_yield() between polls so that a BLAS thread that wants the core gets it, and runs each job
from a descriptor of raw pointers and integers: a hand-off costs about 5 us. After POLLS polls
without a job (about 1 ms) the worker blocks on a lock, and the next hand-off wakes it.

    parallel_kernel(_winograd_input_4x4, (im, v, first, pitch, pad_h, pad_w), c, at=4, cost=...)

runs `kernel(*args[:at], lo, hi, *args[at:])` over blocks of range(c): the calling thread takes
the first block and each worker one of the others. A kernel takes its range as two integers
and writes disjoint parts of its outputs for disjoint ranges. Arrays must be C-contiguous (the
worker sees them as raw memory); otherwise, with one thread, or for work under
MIN_NATIVE_ELEMENTS, the call runs through minicaffe.threads.parallel_for.

Each (kernel, argument types) pair is compiled once per process into a C-callable job (numba
cfunc, about 0.5 s; these are not cached on disk, as the job's source is generated).
"""
import os
import threading

import numpy as np

from .. import threads

__all__ = ["parallel_kernel", "MIN_NATIVE_ELEMENTS", "POLLS"]

# The least work (elements, weighted by the caller's cost) worth a native hand-off (~5 us).
MIN_NATIVE_ELEMENTS = 30_000

# Polls (each a sched_yield(), ~0.5 us) without a job before a worker sleeps.
POLLS = 2000

_native = None            # the compiled helpers, built on first use
_jobs = {}                # (kernel, argument kinds) -> compiled job
_workers = []
_lock = threading.Lock()  # guards _native, _jobs and _workers


def parallel_kernel(kernel, args, n, at, cost=1, least=None):
    """kernel(*args[:at], lo, hi, *args[at:]) over blocks covering range(n), on all threads.

    `cost` is the work per index: the call splits when n * cost reaches `least` per block (by
    default, for costs in elements, MIN_NATIVE_ELEMENTS or threads.MIN_PARALLEL_ELEMENTS if
    lower). `kernel` is a jit.kernel; any other callable (a test's wrapper) runs through
    threads.parallel_for."""
    count = threads.get_num_threads()
    if least is None:
        least = min(MIN_NATIVE_ELEMENTS, threads.MIN_PARALLEL_ELEMENTS)
    blocks = min(count, n, int(n * cost) // least)
    native = blocks > 1 and hasattr(kernel, "compiled") and not threads.in_worker()
    kinds = _kinds(args) if native else None
    if kinds is None:
        threads.parallel_for(n, lambda lo, hi: kernel(*args[:at], lo, hi, *args[at:]), cost)
        return
    job = _job(kernel, kinds, at)
    fields = _fields(args)
    bounds = [n * i // blocks for i in range(blocks + 1)]
    workers = _get_workers(blocks - 1)
    posted = [worker.post(job.address, fields, bounds[i + 1], bounds[i + 2])
              for i, worker in enumerate(workers)]
    kernel(*args[:at], bounds[0], bounds[1], *args[at:])
    for worker, seq in zip(workers, posted):
        _native.wait_until_done(worker.control, seq)


# -- describing a call as integers ----------------------------------------------
_ARRAY_DTYPES = {np.dtype(t): t for t in ("float32", "float64", "int64", "int32", "uint8", "bool")}


def _kinds(args):
    """A hashable description of the arguments' numba types, or None if one can't be passed."""
    kinds = []
    for a in args:
        if isinstance(a, np.ndarray):
            if not a.flags.c_contiguous or a.dtype not in _ARRAY_DTYPES:
                return None
            kinds.append((_ARRAY_DTYPES[a.dtype], a.ndim))
        elif isinstance(a, (bool, np.bool_)):
            kinds.append("bool")
        elif isinstance(a, (int, np.integer)):
            kinds.append("int64")
        elif isinstance(a, np.float32):
            kinds.append("float32")
        elif isinstance(a, (float, np.float64)):
            kinds.append("float64")
        else:
            return None
    return tuple(kinds)


def _fields(args):
    fields = []
    for a in args:
        if isinstance(a, np.ndarray):
            fields.append(a.ctypes.data)
            fields.extend(a.shape)
        elif isinstance(a, (float, np.floating)):
            fields.append(int(np.float64(a).view(np.int64)))
        else:
            fields.append(int(a))
    return fields


def _job(kernel, kinds, at):
    key = (kernel, kinds, at)
    job = _jobs.get(key)
    if job is None:
        with _lock:
            _build()
            job = _jobs.get(key) or _jobs.setdefault(key, _compile_job(kernel, kinds, at))
    return job


def _compile_job(kernel, kinds, at):
    """A cfunc `void job(int64 *d)` that unpacks the descriptor and calls the compiled kernel."""
    import numba
    parts, slot = [], 0
    for kind in kinds:
        if isinstance(kind, tuple):
            dtype, ndim = kind
            shape = "".join(f"d[{slot + 1 + i}], " for i in range(ndim))
            parts.append(f"carray(as_pointer(d[{slot}]), ({shape}), np.{dtype})")
            slot += 1 + ndim
        else:
            parts.append({"bool": "d[{}] != 0", "int64": "d[{}]",
                          "float64": "as_float64(d[{}])",
                          "float32": "np.float32(as_float64(d[{}]))"}[kind].format(slot))
            slot += 1
    # the range goes last in the descriptor (post() appends it)
    parts[at:at] = [f"d[{slot}]", f"d[{slot + 1}]"]
    source = f"def job(d):\n    kernel({', '.join(parts)})\n"
    scope = {"kernel": kernel.compiled(), "carray": numba.carray, "np": np,
             "as_pointer": _native.as_pointer, "as_float64": _native.as_float64}
    exec(compile(source, f"<minicaffe job for {kernel.__name__}>", "exec"), scope)
    return numba.cfunc(numba.types.void(numba.types.CPointer(numba.types.int64)),
                       nogil=True)(scope["job"])


# -- the compiled helpers --------------------------------------------------------
def _build():
    """Compile the worker loop and its intrinsics (once; numba is imported only here)."""
    global _native
    if _native is not None:
        return
    import types as pytypes

    import numba
    from llvmlite import ir
    from numba.core import cgutils, types

    intrinsic = numba.extending.intrinsic

    @intrinsic
    def sched_yield(typingctx):
        def codegen(context, builder, signature, args):
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []),
                                                "sched_yield")
            return builder.call(fn, [])
        return types.int32(), codegen

    @intrinsic
    def as_pointer(typingctx, address):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], ir.IntType(8).as_pointer())
        return types.voidptr(types.int64), codegen

    @intrinsic
    def as_float64(typingctx, bits):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.DoubleType())
        return types.float64(types.int64), codegen

    @intrinsic
    def call_job(typingctx, address, descriptor):
        def codegen(context, builder, signature, args):
            fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(64).as_pointer()])
            data = cgutils.create_struct_proxy(signature.args[1])(context, builder, value=args[1]).data
            builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [data])
            return context.get_dummy_value()
        return types.void(types.int64, descriptor), codegen

    # control: [jobs posted, jobs done, stop]; descriptor: [job address, fields...].
    # The calls into libc and into the job keep LLVM from hoisting the loads of control[0].
    @numba.njit(nogil=True)
    def serve(control, descriptor, polls):
        idle = 0
        while idle < polls and control[2] == 0:
            if control[0] > control[1]:
                call_job(descriptor[0], descriptor[1:])
                control[1] += 1
                idle = 0
            else:
                idle += 1
                sched_yield()

    @numba.njit(nogil=True)
    def wait_until_done(control, seq):
        while control[1] < seq:
            sched_yield()

    _native = pytypes.SimpleNamespace(serve=serve, wait_until_done=wait_until_done,
                                      as_pointer=as_pointer, as_float64=as_float64)


class _Worker:
    """A thread that runs jobs in the compiled loop, and sleeps on a lock when idle."""

    def __init__(self, index):
        self.control = np.zeros(3, np.int64)
        self.descriptor = np.zeros(256, np.int64)
        self.gate = threading.Lock()   # orders a hand-off against the worker going to sleep
        self.sleeping = False
        self.wake = threading.Lock()
        self.wake.acquire()
        self.thread = threading.Thread(target=self._loop, name=f"minicaffe-native-{index}",
                                       daemon=True)
        self.thread.start()

    def post(self, address, fields, lo, hi):
        """Hand over one job (the previous one has finished: the caller waited for it)."""
        size = len(fields) + 3
        if size > len(self.descriptor):
            raise ValueError(f"a native job of {size} fields exceeds the {len(self.descriptor)}-field descriptor")
        self.descriptor[0] = address
        self.descriptor[1:size - 2] = fields
        self.descriptor[size - 2:size] = lo, hi
        with self.gate:
            self.control[0] += 1
            seq = int(self.control[0])
            sleeping, self.sleeping = self.sleeping, False
        if sleeping:
            self.wake.release()
        return seq

    def stop(self):
        with self.gate:
            self.control[2] = 1
            sleeping, self.sleeping = self.sleeping, False
        if sleeping:
            self.wake.release()

    def _loop(self):
        control = self.control
        while not control[2]:
            _native.serve(control, self.descriptor, POLLS)
            with self.gate:
                self.sleeping = control[0] == control[1] and not control[2]
                sleep = self.sleeping
            if sleep:
                self.wake.acquire()


def _get_workers(count):
    with _lock:
        _build()
        while len(_workers) < count:
            _workers.append(_Worker(len(_workers) + 1))
        return _workers[:count]


def _forget_workers_after_fork():
    global _lock
    _lock = threading.Lock()
    _workers.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers_after_fork)
