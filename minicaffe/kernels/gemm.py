"""Matrix products split over the native workers: each thread makes whole one-thread BLAS calls.

np.matmul hands a product to OpenBLAS, whose own threads split it. For the small products of a
batch-1 net (a 1x1 convolution on a 28x28 map, the 36 per-point products of a Winograd layer)
that second thread gains little: OpenBLAS wakes it for every product (it sleeps ~0.1 ms after
the last one, see minicaffe/_blas_env.py) and splits inside each small product; a stack of 36
is 36 such hand-offs. Here the calling thread and the native workers of minicaffe.kernels.workers
each take a share of the stack's products (or of one product's columns or rows) and call sgemm
themselves. OpenBLAS's thread count is 1 for the length of the call and restored after it:
its only setter is process-wide (openblas_set_num_threads_local, despite its name, sets the
global count in the pthreads build numpy ships), so the caller sets it once around the split
call; the workers never touch it. The calling thread is the only one that calls matmul
(workers run plain np.matmul), so nothing else sees the count at 1.

    gemm.matmul(w, cols, out)      # out[...] = w @ cols, as np.matmul(w, cols, out=out)

Operands are float32 matrices or stacks of them, up to two batch axes, with any strides numpy
would pass to BLAS (a transposed view is fine; a batch axis may be broadcast). It calls the
OpenBLAS that numpy itself loaded (the scipy-openblas of numpy's wheels, 64-bit integers);
with another BLAS, without numba, on one thread, or for a product under MIN_NATIVE_MACS, it is
np.matmul.
"""
import ctypes
import functools

import numpy as np

from .. import threads
from . import jit, workers

__all__ = ["matmul", "available", "MIN_NATIVE_MACS"]

# The least multiply-adds worth splitting: one-thread sgemm makes ~50 per ns here, and a
# hand-off to a polling worker costs ~5 us.
MIN_NATIVE_MACS = 400_000

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_ALIGN = 16                       # blocks of columns / rows in multiples of the SIMD tile


def _symbol(lib, names):
    return next((getattr(lib, name) for name in names if hasattr(lib, name)), None)


def _load_blas():
    """(sgemm, get_threads, set_threads) from the OpenBLAS numpy loaded, or None."""
    paths = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "openblas" in path.lower() and path.startswith("/") and path not in paths:
                    paths.append(path)
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        # only the 64-bit-integer interface: its symbols say so by their suffix
        sgemm = _symbol(lib, ("scipy_cblas_sgemm64_", "cblas_sgemm64_"))
        get_threads = _symbol(lib, ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_"))
        set_threads = _symbol(lib, ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_"))
        if None in (sgemm, get_threads, set_threads):
            continue
        i32, i64 = ctypes.c_int32, ctypes.c_int64
        sgemm.argtypes = [i32, i32, i32, i64, i64, i64, ctypes.c_float, i64, i64, i64, i64,
                          ctypes.c_float, i64, i64]
        sgemm.restype = None
        get_threads.argtypes, get_threads.restype = [], ctypes.c_int
        set_threads.argtypes, set_threads.restype = [ctypes.c_int], None
        return sgemm, get_threads, set_threads
    return None


_blas = _load_blas() if jit.available() else None
if _blas is not None:
    _sgemm, _get_blas_threads, _set_blas_threads = _blas


def available():
    """Whether matmul can split products natively (numba on, numpy's OpenBLAS found)."""
    return _blas is not None and jit.enabled()


# The kernel embeds the BLAS functions' addresses, which change from process to process, so it
# is compiled per process rather than cached on disk.
@functools.partial(jit.kernel, cache=False)
def _products(a, b, c, m, n, k, trans_a, lda, trans_b, ldb, ldc, inner,
              a0, a1, b0, b1, c0, c1, parts, by_columns, lo, hi):
    """Items lo:hi of the grid (outer batch, inner batch, part): c[i][part] = a[i] @ b[i] over one
    block of columns (or rows) of the product. Pointers are byte addresses, strides elements."""
    size = n if by_columns else m
    width = ((size + parts - 1) // parts + 15) // 16 * 16
    for item in range(lo, hi):
        matrix, part = item // parts, item % parts
        outer, within = matrix // inner, matrix % inner
        first = part * width
        count = min(width, size - first)
        if count <= 0:
            continue
        pa = a + 4 * (outer * a0 + within * a1)
        pb = b + 4 * (outer * b0 + within * b1)
        pc = c + 4 * (outer * c0 + within * c1)
        rows, cols = m, n
        if by_columns:
            cols = count
            pb += 4 * first * (ldb if trans_b else 1)
            pc += 4 * first
        else:
            rows = count
            pa += 4 * first * (1 if trans_a else lda)
            pc += 4 * first * ldc
        _sgemm(_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS, _TRANS if trans_b else _NO_TRANS,
               rows, cols, k, 1.0, pa, lda, pb, ldb, 0.0, pc, ldc)


def _matrix_layout(x):
    """(transposed, leading dimension) of the last two axes as BLAS reads them, or None."""
    rows, cols = x.shape[-2:]
    s_rows, s_cols = x.strides[-2:]
    if s_rows % 4 or s_cols % 4:
        return None
    if s_cols == 4 or cols == 1:
        ld = s_rows // 4 if rows > 1 else cols
        return (False, ld) if ld >= max(1, cols) else None
    if s_rows == 4 or rows == 1:
        ld = s_cols // 4 if cols > 1 else rows
        return (True, ld) if ld >= max(1, rows) else None
    return None


def _batch_strides(x, batch):
    """Element strides of x over the two batch axes of `batch` (0 where x is broadcast), or None."""
    extra = x.ndim - 2
    strides = [0, 0]
    for axis in range(extra):
        size, stride = x.shape[axis], x.strides[axis]
        slot = 2 - extra + axis
        if size == 1:
            continue
        if size != batch[slot] or stride % 4 or stride < 0:
            return None
        strides[slot] = stride // 4
    return strides


def _plan(a, b, out):
    """The kernel's arguments and item count for out = a @ b, or None for np.matmul."""
    if not (a.dtype == b.dtype == out.dtype == np.float32) or out.ndim < 2 or out.ndim > 4:
        return None
    if a.ndim < 2 or b.ndim < 2 or a.ndim > out.ndim or b.ndim > out.ndim:
        return None
    m, k = a.shape[-2:]
    n = b.shape[-1]
    batch = (1, 1, *out.shape[:-2])[-2:]        # (outer, inner) stack axes
    if b.shape[-2] != k or out.shape[-2:] != (m, n) or 0 in batch or k == 0:
        return None
    if m == 1 or n == 1:    # a matrix-vector product: numpy calls sgemv, which sgemm is not
        return None
    macs = m * n * k * batch[0] * batch[1]
    if macs < MIN_NATIVE_MACS or not out.flags.c_contiguous:
        return None
    if not (a.flags.aligned and b.flags.aligned):
        return None
    la, lb = _matrix_layout(a), _matrix_layout(b)
    sa, sb, sc = _batch_strides(a, batch), _batch_strides(b, batch), _batch_strides(out, batch)
    if None in (la, lb, sa, sb, sc):
        return None
    if np.may_share_memory(out, a) or np.may_share_memory(out, b):
        return None
    count = threads.get_num_threads()
    matrices = batch[0] * batch[1]
    # whole products when they share out evenly; otherwise each is cut along its longer side
    parts = 1 if matrices % count == 0 or matrices >= 4 * count else count
    by_columns = n >= m
    args = (a.ctypes.data, b.ctypes.data, out.ctypes.data, m, n, k, la[0], la[1], lb[0], lb[1],
            n, batch[1], sa[0], sa[1], sb[0], sb[1], sc[0], sc[1], parts, by_columns)
    return args, matrices * parts, macs // (matrices * parts)


def matmul(a, b, out):
    """out[...] = a @ b (float32; out C-contiguous, not overlapping a or b), on all threads."""
    plan = None
    if _blas is not None and threads.get_num_threads() > 1 and jit.enabled() \
            and not threads.in_worker():
        plan = _plan(a, b, out)
    if plan is None:
        np.matmul(a, b, out=out)
        return out
    args, items, macs_per_item = plan
    blas_threads = _get_blas_threads()
    _set_blas_threads(1)
    try:
        workers.parallel_kernel(_products, args, items, at=len(args), cost=macs_per_item,
                                least=MIN_NATIVE_MACS)
    finally:
        _set_blas_threads(blas_threads)
    return out
