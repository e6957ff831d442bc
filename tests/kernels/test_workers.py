"""The native workers (minicaffe/kernels/workers.py): split kernel calls equal one inline call."""
import multiprocessing
import time

import numpy as np
import pytest

from minicaffe import threads
from minicaffe.kernels import jit, workers

needs_numba = pytest.mark.skipif(not jit.available(), reason='needs numba: pip install "minicaffe[fast]"')


@jit.kernel
def _affine_rows(x, out, lo, hi, shift, negate, scale32, scale64):
    """out[i] = (-1 if negate else 1) * x[i] * scale32 * scale64 + shift + i, rows lo:hi."""
    for i in range(lo, hi):
        for j in range(x.shape[1]):
            v = x[i, j] * scale32 * scale64 + shift + i
            out[i, j] = -v if negate else v


def _reference(x, shift, negate, scale32, scale64):
    rows = np.arange(x.shape[0], dtype=np.float64)[:, None]
    v = x.astype(np.float64) * np.float64(scale32) * scale64 + shift + rows
    return -v if negate else v


@pytest.fixture
def split_everything(monkeypatch):
    monkeypatch.setattr(workers, "MIN_NATIVE_ELEMENTS", 1)
    previous = threads.get_num_threads()
    yield
    threads.set_num_threads(previous)


@needs_numba
@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 2, 7])
def test_blocks_cover_the_range_with_every_argument_kind(split_everything, count, rows):
    threads.set_num_threads(count)
    x = np.random.default_rng(0).standard_normal((rows, 5)).astype(np.float32)
    out = np.full_like(x, np.nan)
    args = (x, out, 3, True, np.float32(0.5), 2.0)
    workers.parallel_kernel(_affine_rows, args, rows, at=2, cost=1)
    np.testing.assert_allclose(out, _reference(x, 3, True, 0.5, 2.0), rtol=1e-6)
    if count > 1 and rows > 1:
        assert len(workers._workers) >= min(count, rows) - 1


@needs_numba
def test_non_contiguous_arrays_and_plain_callables_take_the_python_pool(split_everything):
    threads.set_num_threads(2)
    x = np.random.default_rng(1).standard_normal((6, 10)).astype(np.float32)[:, ::2]
    out = np.zeros((6, 5), np.float32)
    workers.parallel_kernel(_affine_rows, (x, out, 0, False, np.float32(1), 1.0), 6, at=2)
    np.testing.assert_allclose(out, _reference(x, 0, False, 1, 1.0), rtol=1e-6)
    calls = []
    workers.parallel_kernel(lambda *a: calls.append(a[2:4]), (x, out, 0, False, np.float32(1), 1.0), 6, at=2)
    assert sorted(calls)[0][0] == 0 and sorted(calls)[-1][1] == 6


@needs_numba
def test_idle_workers_sleep_and_wake_for_the_next_job(split_everything, monkeypatch):
    threads.set_num_threads(2)
    monkeypatch.setattr(workers, "POLLS", 10)
    x = np.ones((4, 3), np.float32)
    out = np.zeros_like(x)
    args = (x, out, 0, False, np.float32(1), 1.0)
    workers.parallel_kernel(_affine_rows, args, 4, at=2)
    worker = workers._workers[0]
    deadline = time.monotonic() + 5
    while not worker.sleeping and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.sleeping
    out[...] = 0
    workers.parallel_kernel(_affine_rows, args, 4, at=2)
    np.testing.assert_allclose(out, _reference(x, 0, False, 1, 1.0))


def _split_in_child(queue):
    x = np.ones((4, 3), np.float32)
    out = np.zeros_like(x)
    workers.MIN_NATIVE_ELEMENTS = 1
    threads.set_num_threads(2)
    workers.parallel_kernel(_affine_rows, (x, out, 1, False, np.float32(1), 1.0), 4, at=2)
    queue.put(out.tolist())


@needs_numba
def test_a_forked_child_starts_its_own_workers(split_everything):
    threads.set_num_threads(2)
    x = np.ones((4, 3), np.float32)
    workers.parallel_kernel(_affine_rows, (x, np.zeros_like(x), 0, False, np.float32(1), 1.0), 4, at=2)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_split_in_child, args=(queue,))
    child.start()
    got = np.array(queue.get(timeout=60))
    child.join(60)
    assert child.exitcode == 0
    np.testing.assert_allclose(got, _reference(x, 1, False, 1, 1.0))


def _real_kernel_calls():
    from minicaffe.kernels import depthwise, epilogue, pooling
    rng = np.random.default_rng(7)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    x, w, bias = f32(2, 6, 9, 11), f32(6, 1, 3, 3), f32(6)
    yield "depthwise", depthwise._depthwise_3x3, (x, w, bias, np.zeros((2, 6, 5, 6), np.float32),
                                                  2, 1, 1, True, np.float32(0.1)), 6, 4, 3
    yield "epilogue", epilogue._store, (f32(2, 6, 20), np.zeros((2, 6, 20), np.float32), bias,
                                        True, True, np.float32(0)), 6, 6, 1
    yield "max pool", pooling._max_pool, (f32(12, 9, 11), np.zeros((12, 4, 5), np.float32),
                                          3, 3, 2, 2, 0, 0), 12, 2, 1


@needs_numba
@pytest.mark.parametrize("case", list(_real_kernel_calls()), ids=lambda case: case[0])
def test_layer_kernels_split_natively_equal_one_call(split_everything, case):
    _, kernel, args, n, at, out_index = case
    out = args[out_index]
    kernel(*args[:at], 0, n, *args[at:])
    want = out.copy()
    out[...] = np.nan
    threads.set_num_threads(2)
    workers.parallel_kernel(kernel, args, n, at=at)
    np.testing.assert_array_equal(out, want)


@needs_numba
@pytest.mark.parametrize("c,k,h,w", [(6, 8, 9, 57), (16, 32, 20, 60)])  # >= 14 tiles wide: compiled
def test_winograd_transforms_split_natively_equal_one_thread(split_everything, c, k, h, w):
    from minicaffe.kernels import winograd
    rng = np.random.default_rng(8)
    im = rng.standard_normal((1, c, h, w)).astype(np.float32)
    weights = rng.standard_normal((k, c, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(k).astype(np.float32)
    conv = winograd.WinogradConv(c, k, (1, 1), 4)
    conv.reshape(1, (h, w), np.float32)
    assert conv.compiled
    results = []
    for count in (1, 2):
        threads.set_num_threads(count)
        out = np.full((1, k, h, w), np.nan, np.float32)
        results.append(conv.conv(im, weights, out, bias, 0.0))
    np.testing.assert_array_equal(results[1], results[0])
