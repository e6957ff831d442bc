"""max(x, c) and fmax(x, c) against a constant ARRAY: numpy's loop for a scalar operand is slow.

numpy 2.4 on this machine (x86-64-v3) runs `np.maximum(x, 0)` / `np.fmax(x, c)` with a
scalar (a zero-stride operand) about 4x slower than with two contiguous arrays: 160 us against
40 us for 200K float32 values, where a plain copy takes 28 us. So ReLU and the start of a max
pooling compare against a block of a cached constant array instead; the values are exactly
those of the scalar forms (same ufunc, elementwise; only maximum(-0.0, 0.0) may come out as
either zero), only the inner loop differs.

    clamp_below(x, 0.0, out=x)               # out = maximum(x, 0): ReLU, NaN stays NaN
    clamp_below(x, -FLT_MAX, out=y, fmax=True) # out = fmax(x, -FLT_MAX): NaN becomes -FLT_MAX

x and out are same-shape arrays (out may be x); a C-contiguous pair is walked in flat blocks of
BLOCK values (the constant block stays in L1), anything else falls back to the scalar form.
The work is split over minicaffe.threads' pool like any other elementwise pass.
"""
import numpy as np

from ..threads import parallel_for

__all__ = ["clamp_below", "BLOCK"]

# Length of the constant block (128 KiB of float32); a piece of x is one ufunc call with the
# block broadcast over its rows (a Python loop of one call per block was 1.3-1.6x slower at
# 1.6M values), plus one call for a ragged tail.
BLOCK = 32768

_constants = {}   # (value, dtype) -> a BLOCK-long array of value


def _constant(value, dtype):
    key = (float(value), np.dtype(dtype))
    block = _constants.get(key)
    if block is None:
        block = _constants[key] = np.full(BLOCK, value, dtype=dtype)
        block.flags.writeable = False
    return block


def clamp_below(x, value, out, fmax=False, split=True):
    """out = maximum(x, value) (fmax=True: np.fmax, which replaces NaN by value); returns out.

    split=False runs inline (callers that are already one block of a parallel pass)."""
    if x.shape != out.shape:
        raise ValueError(f"clamp_below: x has shape {x.shape} but out has {out.shape}")
    ufunc = np.fmax if fmax else np.maximum
    if not (x.flags.c_contiguous and out.flags.c_contiguous) or x.dtype != out.dtype:
        ufunc(x, out.dtype.type(value), out=out)
        return out
    const = _constant(value, out.dtype)
    flat_x, flat_out = x.reshape(-1), out.reshape(-1)
    size = flat_x.size

    def blocks(lo, hi):
        start = lo * BLOCK
        stop = min(size, hi * BLOCK)
        whole = start + (stop - start) // BLOCK * BLOCK
        if whole > start:   # all whole blocks in one call: the constant broadcast over rows
            ufunc(flat_x[start:whole].reshape(-1, BLOCK), const,
                  out=flat_out[start:whole].reshape(-1, BLOCK))
        if stop > whole:
            ufunc(flat_x[whole:stop], const[:stop - whole], out=flat_out[whole:stop])

    count = -(-size // BLOCK)
    if split:
        parallel_for(count, blocks, BLOCK)
    else:
        blocks(0, count)
    return out
