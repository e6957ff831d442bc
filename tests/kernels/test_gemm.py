"""minicaffe.kernels.gemm: products split over the native workers equal np.matmul's."""
import numpy as np
import pytest

from minicaffe import threads
from minicaffe.kernels import gemm, jit

needs_native = pytest.mark.skipif(gemm._blas is None,
                                  reason="needs numba and numpy's own OpenBLAS (scipy-openblas)")


@pytest.fixture
def split_everything(monkeypatch):
    monkeypatch.setattr(gemm, "MIN_NATIVE_MACS", 1)
    previous = threads.get_num_threads()
    yield
    threads.set_num_threads(previous)


def _operand(rng, shape, transposed):
    """A float32 array of `shape`, stored transposed (a strided view) when asked."""
    if not transposed:
        return rng.standard_normal(shape, dtype=np.float32)
    return rng.standard_normal(shape[:-2] + shape[:-3:-1], dtype=np.float32).swapaxes(-1, -2)


# (a shape, b shape): one product, a stack, a shared (broadcast) left matrix, two stack axes
SHAPES = [((64, 300), (300, 500)), ((500, 30), (30, 40)), ((17, 5), (5, 33)),
          ((36, 24, 20), (36, 20, 30)), ((24, 20), (3, 20, 30)), ((1, 2, 16, 20), (3, 2, 20, 40)),
          ((2, 16, 20), (3, 2, 20, 40)), ((5, 16, 20), (5, 20, 1))]


@needs_native
@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: f"{s[0]}@{s[1]}")
def test_split_products_equal_numpy(split_everything, shapes, trans_a, trans_b, count):
    threads.set_num_threads(count)
    rng = np.random.default_rng(0)
    a, b = _operand(rng, shapes[0], trans_a), _operand(rng, shapes[1], trans_b)
    out = np.full(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]),
                  np.nan, np.float32)
    native = gemm._plan(a, b, out) is not None
    assert gemm.matmul(a, b, out) is out
    np.testing.assert_allclose(out, np.matmul(a.astype(np.float64), b), rtol=1e-4, atol=1e-4)
    assert native == (b.shape[-1] > 1)   # only a matrix-vector product goes to numpy


@needs_native
def test_rows_split_when_the_product_is_tall(split_everything):
    threads.set_num_threads(2)
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((300, 40), dtype=np.float32), rng.standard_normal((40, 20), dtype=np.float32)
    out = np.empty((300, 20), np.float32)
    args, items, _ = gemm._plan(a, b, out)
    assert items == 2 and not args[-1]    # two blocks of rows
    gemm.matmul(a, b, out)
    np.testing.assert_allclose(out, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["float64", "overlap", "strided", "one thread", "small"])
def test_what_cannot_split_runs_through_numpy(monkeypatch, case):
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((64, 80), dtype=np.float32), rng.standard_normal((80, 96), dtype=np.float32)
    out = np.empty((64, 96), np.float32)
    previous = threads.get_num_threads()
    threads.set_num_threads(2)
    try:
        if case == "float64":
            a, b, out = a.astype(np.float64), b.astype(np.float64), out.astype(np.float64)
        elif case == "overlap":
            buffer = np.zeros((64 * 96 + 64 * 80,), np.float32)
            out, a = buffer[:64 * 96].reshape(64, 96), buffer[64 * 96 - 64 * 80:64 * 96].reshape(64, 80)
            a[...] = rng.standard_normal((64, 80))
        elif case == "strided":
            b = rng.standard_normal((80, 192), dtype=np.float32)[:, ::2]
        elif case == "one thread":
            threads.set_num_threads(1)
        else:
            monkeypatch.setattr(gemm, "MIN_NATIVE_MACS", 10 ** 9)
        if case != "one thread":
            assert gemm._plan(a, b, out) is None
        expected = np.matmul(a, b)
        gemm.matmul(a, b, out)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    finally:
        threads.set_num_threads(previous)


@needs_native
def test_openblas_thread_count_is_unchanged_after_split_products(split_everything):
    # OpenBLAS's count is process-wide: were a worker to set and restore it too, the restores
    # could interleave and leave every later np.matmul on one thread.
    threads.set_num_threads(2)
    before = gemm._get_blas_threads()
    gemm._set_blas_threads(2)
    try:
        a, b = np.ones((4, 64, 64), np.float32), np.ones((4, 64, 64), np.float32)
        for _ in range(20):
            gemm.matmul(a, b, np.empty((4, 64, 64), np.float32))
        assert gemm._get_blas_threads() == 2
    finally:
        gemm._set_blas_threads(before)


def test_available_follows_the_compiled_kernel_switch():
    previous = jit.enabled()
    try:
        jit.set_enabled(False)
        assert not gemm.available()
    finally:
        if previous:
            jit.set_enabled(True)
