"""One shared pool of worker threads for memory-bound numpy work (ReLU, pooling, Eltwise, ...).

numpy releases the GIL inside its loops, so an elementwise pass cut into blocks runs on all
cores at once. GEMMs are left to the BLAS library's own threads; layers run one after another,
so the pool's threads sleep (blocked on a lock, never spinning) while a GEMM runs; OpenBLAS's
threads, which spin after a GEMM, go to sleep within about 0.1 ms of it (minicaffe/_blas_env.py
sets OPENBLAS_THREAD_TIMEOUT), so the two never compete for the cores for long.

The thread count comes from, in order: `set_num_threads(n)` (the CLI's `--threads N`), the
environment's `MINICAFFE_THREADS`, `OMP_NUM_THREADS`, and the number of cores. `--threads` sets
this pool only; the BLAS library reads its own count (OMP_NUM_THREADS / OPENBLAS_NUM_THREADS)
when numpy loads.

    threads.parallel_for(n_rows, lambda lo, hi: np.maximum(x[lo:hi], 0, out=y[lo:hi]), row_len)
    threads.map_flat(lambda x, y: np.maximum(x, 0, out=y), x, y)   # same-size contiguous arrays

How a call is shared: the range is cut into blocks of at least MIN_PARALLEL_ELEMENTS elements
(at most BLOCKS_PER_THREAD per thread); the calling thread wakes the idle workers and then takes
blocks itself, one at a time, as do the workers when they wake. A worker that wakes late (the
other core is busy, or its core was asleep) finds the blocks taken and the caller never waits
for it; the caller pays only the wake-up call (measured on a 2-core VM: ~7 us when the worker
ran just before, ~120 us after it slept through a GEMM, which is what MIN_PARALLEL_ELEMENTS
is set from). Exceptions raised by fn in any thread are re-raised in the caller once every
started block has finished.
"""
import _thread
import os
import threading

__all__ = ["get_num_threads", "set_num_threads", "in_worker", "parallel_for", "map_flat", "map_positions",
           "copy_2d", "MIN_PARALLEL_ELEMENTS", "BLOCKS_PER_THREAD"]

# The least work (float32 elements of a streaming pass) worth handing to another thread. On the
# 2-core VM this was measured on (benchmarks/threads_bench.py --after-gemm), a worker that slept
# through a GEMM takes 100-200 us to wake, so splitting a ReLU paid only from ~1.2M elements
# (2 blocks of this size); tests patch it down to exercise the split path.
MIN_PARALLEL_ELEMENTS = 600_000

# More blocks than threads let a thread that is free take the next one (the other core may be
# busy with another process); more than this and the per-block Python cost shows.
BLOCKS_PER_THREAD = 2

_num_threads = None
_workers = []
_lock = threading.Lock()   # guards _workers (creation, shutdown)
_local = threading.local()


def _threads_from_env():
    for name in ("MINICAFFE_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            try:
                count = int(value.split(",")[0])
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a thread count (a positive integer)") from None
            if count < 1:
                raise ValueError(f"{name}={value!r} is not a thread count (a positive integer)")
            return count
    return os.cpu_count() or 1


def get_num_threads():
    """The number of threads memory-bound layers split their work over (1 = no pool)."""
    global _num_threads
    if _num_threads is None:
        _num_threads = _threads_from_env()
    return _num_threads


def set_num_threads(count):
    """Use `count` threads for memory-bound work from now on (1 runs everything inline)."""
    global _num_threads
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"thread count must be a positive integer, got {count!r}")
    with _lock:
        _num_threads = count
        if len(_workers) != count - 1:
            for worker in _workers:
                worker.stop()
            _workers.clear()


class _Job:
    """One parallel_for call: blocks [bounds[i], bounds[i+1]) handed out one at a time."""

    def __init__(self, fn, bounds):
        self.fn = fn
        self.bounds = bounds
        self.next_block = 0
        self.unfinished = len(bounds) - 1
        self.error = None
        self.lock = _thread.allocate_lock()
        self.finished = _thread.allocate_lock()
        self.finished.acquire()   # released by whichever thread finishes the last block

    def run_blocks(self):
        """Take and run blocks until none is left (called by the caller and by workers)."""
        lock, bounds = self.lock, self.bounds
        while True:
            with lock:
                i = self.next_block
                if i >= len(bounds) - 1:
                    return
                self.next_block = i + 1
            try:
                self.fn(bounds[i], bounds[i + 1])
            except BaseException as exc:
                with lock:
                    self.error = self.error or exc
            with lock:
                self.unfinished -= 1
                last = self.unfinished == 0
            if last:
                self.finished.release()


class _Worker:
    """A daemon thread that sleeps on a lock until a job is handed to it."""

    def __init__(self, index):
        self.job = None
        self.wake = _thread.allocate_lock()
        self.wake.acquire()
        self.idle = _thread.allocate_lock()   # held from hand-off until the worker is done
        self.thread = threading.Thread(target=self._loop, name=f"minicaffe-{index}", daemon=True)
        self.thread.start()

    def try_give(self, job):
        """Hand `job` over unless the worker is still busy with an earlier one."""
        if not self.idle.acquire(blocking=False):
            return False
        self.job = job
        self.wake.release()
        return True

    def stop(self):
        self.idle.acquire()   # let a late worker finish its (already finished) job first
        self.job = None
        self.wake.release()

    def _loop(self):
        _local.in_worker = True
        while True:
            self.wake.acquire()
            job, self.job = self.job, None
            if job is None:
                return
            job.run_blocks()
            self.idle.release()


def _get_workers(count):
    with _lock:
        while len(_workers) < count:
            _workers.append(_Worker(len(_workers) + 1))
        return list(_workers)


def _forget_pool_after_fork():
    # A forked child (DataLoader-style workers, MPI launchers) inherits no live threads, and
    # the parent's locks may be held: start afresh.
    global _lock
    _lock = threading.Lock()
    _workers.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def in_worker():
    """Whether the calling thread is one of the pool's workers (which never split further)."""
    return getattr(_local, "in_worker", False)


def parallel_for(n, fn, elements_per_item=1):
    """Call fn(lo, hi) over contiguous blocks that cover range(n), on all threads at once.

    `elements_per_item` is the work per index (e.g. the row length; scale it up for costlier
    ops such as exp) and decides whether and how finely to split. fn must write disjoint parts
    of its outputs for disjoint blocks. Runs fn(0, n) inline when one thread is configured,
    the work is small, or it is called from a worker (no nesting).
    """
    threads = get_num_threads()
    blocks = 1
    if threads > 1 and n > 1 and not in_worker():
        blocks = min(n, threads * BLOCKS_PER_THREAD,
                     int(n * elements_per_item) // MIN_PARALLEL_ELEMENTS)
    if blocks <= 1:
        fn(0, n)
        return
    job = _Job(fn, [n * i // blocks for i in range(blocks + 1)])
    for worker in _get_workers(threads - 1)[:blocks - 1]:
        worker.try_give(job)
    job.run_blocks()
    job.finished.acquire()   # blocks a worker took are still running
    if job.error is not None:
        raise job.error


def map_flat(fn, *arrays, cost=1):
    """fn(*pieces) over matching flat pieces of same-size arrays, split over the threads.

    For elementwise ops: `map_flat(lambda x, y: np.tanh(x, out=y), x, y, cost=4)`. The
    arrays must be C-contiguous (else fn runs once on the arrays as given, inline); `cost` is
    the op's work per element relative to a plain copy. fn may run in place (y is x).
    """
    size = arrays[0].size
    if any(a.size != size for a in arrays):
        raise ValueError(f"map_flat needs arrays of one size, got sizes {[a.size for a in arrays]}")
    if not all(a.flags.c_contiguous for a in arrays):
        fn(*arrays)
        return
    flat = [a.reshape(-1) for a in arrays]
    parallel_for(size, lambda lo, hi: fn(*[a[lo:hi] for a in flat]), cost)


def copy_2d(pairs):
    """dst[...] = src for each (dst, src) pair of same-shape 2-D arrays, split over the threads.

    Concat and Slice copy (outer, part) blocks between a blob and a column range of another;
    each copy is cut along its columns so that one big part, or a batch of 1, still splits.
    """
    for dst, src in pairs:
        if dst.shape != src.shape or dst.ndim != 2:
            raise ValueError(f"copy_2d needs pairs of one 2-D shape, got {dst.shape} and {src.shape}")
    total = sum(src.size for _, src in pairs)
    if total == 0:
        return
    threads = get_num_threads()
    pieces_total = max(1, min(threads * BLOCKS_PER_THREAD, total // MIN_PARALLEL_ELEMENTS))
    columns = []   # (pair index, first column, end column): all pieces in one index space
    for k, (dst, src) in enumerate(pairs):
        # Each pair gets pieces in proportion to its size (at least one).
        count = min(src.shape[1], max(1, round(pieces_total * src.size / total)))
        columns.extend((k, src.shape[1] * j // count, src.shape[1] * (j + 1) // count)
                       for j in range(count))

    def copy(lo, hi):
        for k, start, stop in columns[lo:hi]:
            dst, src = pairs[k]
            dst[:, start:stop] = src[:, start:stop]

    parallel_for(len(columns), copy, total / len(columns))


def map_positions(fn, *arrays, cost=1):
    """fn(*blocks) over blocks of same-shape (outer, channels, inner) arrays, channels whole.

    For work that reduces over axis 1 at each (outer, inner) position (softmax, LRN across
    channels): the blocks cut the outer axis when it has enough rows, else the inner one, so
    a batch of 1 still splits. `cost` is the work per element relative to a plain copy.
    """
    outer, channels, inner = arrays[0].shape
    if any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError(f"map_positions needs arrays of one shape, got {[a.shape for a in arrays]}")
    if outer >= inner or outer >= get_num_threads() * BLOCKS_PER_THREAD:
        parallel_for(outer, lambda lo, hi: fn(*[a[lo:hi] for a in arrays]),
                     channels * inner * cost)
        return
    # Blocks of whole column groups: a block one column wide would make numpy reduce along
    # the channels in another order (pairwise), changing the last bits of the result.
    groups = inner // _COLUMN_GROUP

    def columns(lo, hi):
        stop = inner if hi == groups else hi * _COLUMN_GROUP
        fn(*[a[:, :, lo * _COLUMN_GROUP:stop] for a in arrays])

    if groups < 2:
        fn(*arrays)
    else:
        parallel_for(groups, columns, outer * channels * _COLUMN_GROUP * cost)


_COLUMN_GROUP = 16
