"""clamp_below (minicaffe/kernels/clamp.py) equals np.maximum / np.fmax with a scalar, value for value (NaN where it gives NaN)."""
import numpy as np
import pytest

from minicaffe import threads
from minicaffe.kernels import clamp
from minicaffe.kernels.clamp import clamp_below


def _values(shape, dtype, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    flat = x.reshape(-1)
    flat[::7] = np.nan
    flat[1::11] = -np.inf
    flat[2::13] = np.inf
    flat[3::17] = -0.0
    return x


@pytest.mark.parametrize("fmax", [False, True])
@pytest.mark.parametrize("value", [0.0, -np.finfo(np.float32).max, 0.5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(0,), (5,), (3, 7, 11), (2, clamp.BLOCK + 3), (3 * clamp.BLOCK,)])
@pytest.mark.parametrize("in_place", [False, True])
def test_equals_the_scalar_ufunc(fmax, value, dtype, shape, in_place):
    x = _values(shape, dtype)
    expected = (np.fmax if fmax else np.maximum)(x, dtype(value))
    out = x if in_place else np.empty_like(x)
    assert clamp_below(x, value, out=out, fmax=fmax) is out
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == dtype
    # (assert_array_equal treats -0.0 == 0.0: maximum(-0.0, 0.0) may keep either sign.)


def test_non_contiguous_falls_back():
    x = _values((6, 10), np.float32)[:, ::3]
    out = np.empty(x.shape, np.float32)
    clamp_below(x, 0.0, out=out)
    np.testing.assert_array_equal(out, np.maximum(x, np.float32(0)))


@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("split", [True, False])
def test_split_over_threads_is_the_same(monkeypatch, count, split):
    monkeypatch.setattr(threads, "MIN_PARALLEL_ELEMENTS", 1)
    monkeypatch.setattr(clamp, "BLOCK", 64)
    monkeypatch.setattr(clamp, "_constants", {})
    before = threads.get_num_threads()
    try:
        threads.set_num_threads(count)
        x = _values((1000,), np.float32)
        out = np.full_like(x, 7)
        clamp_below(x, 0.0, out=out, split=split)
        np.testing.assert_array_equal(out, np.maximum(x, np.float32(0)))
    finally:
        threads.set_num_threads(before)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        clamp_below(np.zeros(3, np.float32), 0.0, out=np.zeros(4, np.float32))
