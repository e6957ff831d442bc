"""One shared pool of worker threads for memory-bound numpy work (ReLU, pooling, Eltwise, ...).

numpy releases the GIL inside its loops, so an elementwise pass split into row blocks runs on
all cores at once. GEMMs are left to the BLAS library's own threads; layers run one after
another, so the pool and the BLAS threads never compete for the cores.

The thread count comes from, in order: `set_num_threads(n)` (the CLI's `--threads`), the
environment's `MINICAFFE_THREADS`, `OMP_NUM_THREADS`, and the number of cores.

    threads.parallel_for(n_rows, lambda lo, hi: np.maximum(x[lo:hi], 0, out=y[lo:hi]))
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["get_num_threads", "set_num_threads", "parallel_for", "MIN_PARALLEL_ELEMENTS"]

# Handing a block to a worker costs ~10-30 us; below this many float32 elements the work itself
# takes less than that, so it runs on the calling thread.
MIN_PARALLEL_ELEMENTS = 1 << 15

_num_threads = None
_executor = None
_lock = threading.Lock()
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
    global _num_threads, _executor
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"thread count must be a positive integer, got {count!r}")
    with _lock:
        _num_threads = count
        if _executor is not None:
            _executor.shutdown(wait=True)
            _executor = None


def _get_executor(workers):
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="minicaffe",
                                           initializer=_mark_worker)
        return _executor


def _mark_worker():
    _local.in_worker = True


def _forget_pool_after_fork():
    # A forked child (DataLoader-style workers, MPI launchers) inherits no live threads.
    global _executor
    _executor = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def parallel_for(n, fn, elements_per_item=1):
    """Call fn(lo, hi) over contiguous blocks that cover range(n), on all threads at once.

    `elements_per_item` is the work per index (e.g. the row length) and decides whether the
    split is worth it. fn must write disjoint parts of its outputs for disjoint blocks. Runs
    inline when one thread is configured, the work is small, or it is called from a worker.
    """
    threads = get_num_threads()
    if threads > 1 and n > 1 and not getattr(_local, "in_worker", False):
        blocks = min(threads, n, max(1, (n * elements_per_item) // MIN_PARALLEL_ELEMENTS))
    else:
        blocks = 1
    if blocks == 1:
        fn(0, n)
        return
    bounds = [n * i // blocks for i in range(blocks + 1)]
    executor = _get_executor(threads - 1)
    futures = [executor.submit(fn, bounds[i], bounds[i + 1]) for i in range(1, blocks)]
    error = None
    try:
        fn(bounds[0], bounds[1])
    except BaseException as exc:  # the other blocks still finish before this returns
        error = exc
    for future in futures:
        try:
            future.result()
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error
