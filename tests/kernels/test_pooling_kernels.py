"""The fast pooling kernels (kernels/pooling.py PhasePool, whole-plane AVE) equal the plain path."""
import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe.blob import Blob
from minicaffe.kernels import jit
from minicaffe.kernels import pooling as kernel_module
from minicaffe.layer_factory import create_layer
from minicaffe.proto import caffe_pb2

# (input shape, pooling params): pad, stride < / = / > kernel, ceil and floor borders,
# rows/columns no window reaches, non-square windows, and the nets' shapes (smaller batches).
CONFIGS = [
    ((2, 3, 6, 5), "kernel_size: 3 stride: 2"),
    ((2, 2, 6, 5), "kernel_size: 3 stride: 2 pad: 1"),
    ((1, 2, 5, 7), "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 1"),
    ((2, 1, 7, 7), "kernel_size: 3 stride: 2 round_mode: FLOOR"),
    ((2, 3, 9, 9), "kernel_size: 2 stride: 2 round_mode: FLOOR"),
    ((1, 2, 8, 8), "kernel_size: 2 stride: 3"),
    ((1, 2, 10, 9), "kernel_size: 2 stride: 3 round_mode: FLOOR"),
    ((1, 1, 3, 3), "kernel_size: 2 stride: 2 pad: 1"),
    ((2, 2, 6, 7), "kernel_size: 3 stride: 1 pad: 1"),
    ((1, 2, 6, 7), "kernel_h: 2 kernel_w: 4 stride: 1 pad_h: 0 pad_w: 1"),   # separable MAX, non-square
    ((1, 2, 5, 6), "kernel_h: 1 kernel_w: 3 stride: 1"),             # one row: not separable
    ((1, 6, 14, 14), "kernel_size: 3 stride: 1 pad: 1"),           # GoogLeNet's inception pools
    ((2, 2, 4, 5), "kernel_size: 4"),
    ((1, 3, 5, 5), "kernel_size: 1 stride: 2"),
    ((3, 20, 24, 24), "kernel_size: 2 stride: 2"),         # LeNet pool1
    ((2, 8, 55, 55), "kernel_size: 3 stride: 2"),          # CaffeNet pool1
    ((2, 4, 112, 112), "kernel_size: 3 stride: 2"),        # ResNet-50 pool1 (ceil: one padded row)
    ((2, 5, 7, 7), "kernel_size: 7 stride: 1"),            # ResNet-50 pool5 (whole plane)
    ((2, 3, 4, 5), "global_pooling: true"),
]


def run(params, x, fast, dy, block_bytes=None, with_layer=False):
    param = text_format.Parse(f'name: "p" type: "Pooling" pooling_param {{ {params} }}',
                              caffe_pb2.LayerParameter())
    layer = create_layer(param, caffe_pb2.TRAIN)
    layer.use_fast_kernel = fast
    bottom, top = Blob(x.shape, dtype=x.dtype), Blob(dtype=x.dtype)
    bottom.data[...] = x
    layer.setup([bottom], [top])
    picked = layer._phase_geometry is not None or layer._whole_plane
    layer.forward([bottom], [top])
    top.diff[...] = dy(top.shape)
    bottom.diff[...] = 7.0   # garbage: backward overwrites
    layer.backward([top], [True], [bottom])
    if with_layer:
        return top.data.copy(), bottom.diff.copy(), picked, layer
    return top.data.copy(), bottom.diff.copy(), picked


def inputs(rng, shape, kind, dtype):
    if kind == "ties":       # few distinct values: many windows hold their maximum twice
        return rng.integers(0, 3, shape).astype(dtype)
    x = rng.standard_normal(shape).astype(dtype)
    if kind == "nonfinite":  # NaN is skipped by MAX as Caffe's `>` does; -inf never wins
        x.flat[::7] = np.nan
        x.flat[3::11] = -np.inf
    return x


# MAX's phase grid has a numpy path and, with numba, a compiled one (argmax in forward, a scatter
# in backward); each is checked against the plain path.
PATHS = ["numpy", pytest.param("compiled", marks=pytest.mark.skipif(
    not jit.available(), reason=f"numba is not installed ({jit.INSTALL_HINT})"))]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
# AVE over NaN/inf inputs is NaN/inf on both paths: nothing to compare, so not a case.
@pytest.mark.parametrize("method, kind", [("MAX", "normal"), ("MAX", "ties"), ("MAX", "nonfinite"),
                                          ("AVE", "normal"), ("AVE", "ties")])
@pytest.mark.parametrize("shape, params", CONFIGS, ids=[c[1] for c in CONFIGS])
def test_fast_kernel_equals_plain_path(monkeypatch, shape, params, method, kind, dtype, path):
    # The waste limit is a speed rule only: lift it so that the small shapes run the phase grid.
    monkeypatch.setattr(kernel_module, "MAX_WASTE", np.inf)
    monkeypatch.setattr(jit, "_enabled", path == "compiled")
    rng = np.random.default_rng(0)
    x = inputs(rng, shape, kind, dtype)
    dy = lambda s: np.random.default_rng(1).standard_normal(s).astype(dtype)  # noqa: E731
    params = f"pool: {method} {params}"
    y_plain, dx_plain, _ = run(params, x, False, dy)
    y_fast, dx_fast, picked, layer = run(params, x, True, dy, with_layer=True)
    assert picked, "a fast kernel should apply here"
    if layer._phase_pool is not None:
        assert layer._phase_pool.compiled == (path == "compiled" and method == "MAX")
    # MAX picks the same elements: exact. AVE over a whole plane sums pairwise (np.sum), and
    # gradients that several windows send to one pixel are summed in another order: rounding.
    if method == "MAX":
        np.testing.assert_array_equal(y_fast, y_plain)
    else:
        np.testing.assert_allclose(y_fast, y_plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx_fast, dx_plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("params", ["pool: MAX kernel_size: 3 stride: 2 pad: 1",
                                    "pool: MAX kernel_size: 3 stride: 1 pad: 1"])   # separable
@pytest.mark.parametrize("block_bytes", [1, 700, 1 << 20])
@pytest.mark.parametrize("path", PATHS)
def test_blocks_and_threads_do_not_change_the_result(monkeypatch, block_bytes, params, path):
    """One plane per block, blocks that end inside a plane's grid, one block for everything."""
    monkeypatch.setattr(jit, "_enabled", path == "compiled")
    x = np.random.default_rng(2).standard_normal((3, 7, 13, 11)).astype(np.float32)
    dy = lambda s: np.random.default_rng(3).standard_normal(s).astype(np.float32)  # noqa: E731
    expected = run(params, x, False, dy)
    monkeypatch.setattr(kernel_module, "BLOCK_BYTES", block_bytes)
    from minicaffe import threads
    for count in (1, 2):
        monkeypatch.setattr(threads, "MIN_PARALLEL_ELEMENTS", 1)
        threads.set_num_threads(count)
        try:
            got = run(params, x, True, dy)
        finally:
            threads.set_num_threads(threads._threads_from_env())
        np.testing.assert_array_equal(got[0], expected[0])
        # stride 1: nine windows send gradient to a pixel, summed in another order than plain's
        np.testing.assert_allclose(got[1], expected[1], rtol=1e-5, atol=1e-6)


def test_mask_top_keeps_the_plain_path():
    param = text_format.Parse('name: "p" type: "Pooling" pooling_param { pool: MAX kernel_size: 2 }',
                              caffe_pb2.LayerParameter())
    layer = create_layer(param, caffe_pb2.TRAIN)
    bottom, tops = Blob((1, 1, 4, 4)), [Blob(), Blob()]
    layer.setup([bottom], tops)
    assert layer._phase_geometry is None


def test_stride_one_max_takes_the_separable_peak(monkeypatch):
    monkeypatch.setattr(jit, "_enabled", False)   # the compiled pass takes every offset at once
    param = text_format.Parse('name: "p" type: "Pooling" pooling_param { pool: MAX kernel_size: 3 '
                              'stride: 1 pad: 1 }', caffe_pb2.LayerParameter())
    layer = create_layer(param, caffe_pb2.TEST)
    bottom, top = Blob((1, 2, 5, 5)), Blob()
    layer.setup([bottom], [top])
    assert layer._phase().separable


def test_compiled_max_pool_sources_match_caffes_loops():
    """The compiled MAX kernels' Python sources (run as plain Python here, so this holds without
    numba) against Caffe's loops in float64: the forward starts each window at -FLT_MAX, takes
    `v > max` and keeps the first maximum's position; the backward adds each window's gradient
    at that position. Padded, clipped and overlapping windows, NaN and -inf inputs."""
    from minicaffe.kernels.pooling import PhasePool, _max_pool_backward, _peak_and_offset
    from minicaffe.layers.pooling import PoolWindows
    rng = np.random.default_rng(5)
    planes, height, width = 3, 7, 8
    x = rng.integers(0, 4, (planes, height, width)).astype(np.float64)   # ties
    x.flat[::9] = np.nan
    x.flat[4::13] = -np.inf
    for k, s, p in [(3, 2, 0), (3, 2, 1), (3, 1, 1), (2, 2, 0), (2, 2, 1), (4, 3, 1)]:
        w = PoolWindows(height, width, k, k, s, s, p, p)
        dy = rng.standard_normal((planes, w.pooled_h, w.pooled_w))
        want_y = np.empty_like(dy)
        want_dx = np.zeros((planes, height * width))
        for c in range(planes):
            for r in range(w.pooled_h):
                for q in range(w.pooled_w):
                    h0, w0 = r * s - p, q * s - p
                    peak, where = -np.finfo(np.float32).max, -1
                    for h in range(max(h0, 0), min(h0 + k, height)):
                        for col in range(max(w0, 0), min(w0 + k, width)):
                            if x[c, h, col] > peak:
                                peak, where = x[c, h, col], h * width + col
                    want_y[c, r, q] = peak
                    if where >= 0:
                        want_dx[c, where] += dy[c, r, q]
        pool = PhasePool(w, True, planes, np.float64)   # for its grid (the numpy copy)
        pool.forward(x, np.empty_like(dy))
        best = np.full(pool._acc.size, 7, np.int32)
        offsets = list(w.offsets())
        phase_of = np.array([q for q, _ in pool.offsets])
        shift_of = np.array([t for _, t in pool.offsets])
        _peak_and_offset.py_func(pool._x, phase_of, shift_of, pool._acc, best, 0, pool._acc.size
                                 - max(shift_of))
        got_y = pool._outputs(pool._acc)
        np.testing.assert_array_equal(got_y, want_y, err_msg=f"kernel {k} stride {s} pad {p}")
        got_dx = np.full_like(want_dx, np.nan)
        _max_pool_backward.py_func(dy, best, np.array([i for i, _ in offsets]),
                                   np.array([j for _, j in offsets]), got_dx, 0, planes, s, s, p, p,
                                   width, pool.cols, pool.plane)
        np.testing.assert_array_equal(got_dx, want_dx, err_msg=f"kernel {k} stride {s} pad {p}")
