"""Compiled kernels (numba): each equals the numpy path it replaces, and the switch between them."""
import numpy as np
import pytest

from minicaffe.blob import Blob
from minicaffe.kernels import depthwise, jit
from minicaffe.kernels.depthwise import DepthwiseConv
from minicaffe.kernels.pooling import PhasePool
from tests.gradient_check import make_blobs
from tests.layers.test_conv import make_layer, reference_conv
from tests.layers.test_depthwise import conv_text, run

needs_numba = pytest.mark.skipif(not jit.available(), reason=f"numba is not installed ({jit.INSTALL_HINT})")

# 3x3 geometries the compiled depthwise forward takes (stride 1 or 2, any padding) and some it leaves
COMPILED = ["kernel_size: 3 pad: 1", "kernel_size: 3 stride: 2 pad: 1", "kernel_size: 3",
            "kernel_size: 3 stride: 2", "kernel_size: 3 pad: 2", "kernel_size: 3 stride: 2 pad_h: 0 pad_w: 2",
            "kernel_size: 3 stride: 2 pad_h: 2 pad_w: 1", "kernel_size: 3 pad: 1 bias_term: false"]
NOT_COMPILED = [(1, "kernel_size: 3 pad: 2 dilation: 2"), (1, "kernel_size: 5 pad: 2"),
                (1, "kernel_size: 3 stride: 3 pad: 1"), (2, "kernel_size: 3 pad: 1"),
                (1, "kernel_h: 3 kernel_w: 1 pad_h: 1")]


def _forward_both(monkeypatch, text, x, dtype, multiplier=1):
    """(compiled layer, its top, numpy-path layer, its top), the same weights in both."""
    text = conv_text(x.shape[1], multiplier, text)
    weights, _ = run(make_layer("Convolution", text), x, dtype)   # both copy these (via BlobProto)
    monkeypatch.setattr(jit, "_enabled", True)
    fast, a = run(make_layer("Convolution", text, fillers=False, blobs=weights.blobs), x, dtype)
    monkeypatch.setattr(jit, "_enabled", False)
    plain, b = run(make_layer("Convolution", text, fillers=False, blobs=weights.blobs), x, dtype)
    return fast, a["top"], plain, b["top"]


@needs_numba
@pytest.mark.parametrize("text", COMPILED)
@pytest.mark.parametrize("num,height,width", [(1, 15, 13), (3, 8, 9), (2, 4, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_depthwise_equals_numpy_path(monkeypatch, text, num, height, width, dtype):
    x = np.random.default_rng(2).standard_normal((num, 5, height, width))
    fast, got, plain, want = _forward_both(monkeypatch, text, x, dtype)
    assert fast.gemm.compiled and not plain.gemm.compiled
    assert got.dtype == dtype
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@needs_numba
@pytest.mark.parametrize("multiplier,text", NOT_COMPILED)
def test_other_depthwise_geometries_keep_the_numpy_path(monkeypatch, multiplier, text):
    x = np.random.default_rng(3).standard_normal((1, 4, 9, 9))
    fast, got, _, want = _forward_both(monkeypatch, text, x, np.float32, multiplier)
    assert isinstance(fast.gemm, DepthwiseConv) and not fast.gemm.compiled
    np.testing.assert_array_equal(got, want)


@needs_numba
def test_compiled_depthwise_splits_channels_over_the_pool(monkeypatch):
    """Channel blocks on two threads (each block writes only its channels) equal the numpy path."""
    import minicaffe.threads as threads
    calls = []
    kernel = depthwise._depthwise_3x3
    monkeypatch.setattr(depthwise, "_depthwise_3x3", lambda *args: calls.append(args[4:6]) or kernel(*args))
    monkeypatch.setattr(threads, "MIN_PARALLEL_ELEMENTS", 1)
    previous = threads.get_num_threads()
    threads.set_num_threads(2)
    try:
        x = np.random.default_rng(4).standard_normal((2, 7, 10, 10))
        _, got, _, want = _forward_both(monkeypatch, "kernel_size: 3 stride: 2 pad: 1", x, np.float32)
    finally:
        threads.set_num_threads(previous)
    assert len(calls) > 1 and sorted(calls)[0][0] == 0 and sorted(calls)[-1][1] == 7
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_numba
def test_compiled_depthwise_follows_new_weights_and_shapes(monkeypatch):
    """One compiled layer reshaped to a new batch and size, with new weights, still equals the numpy path."""
    text = conv_text(3, 1, "kernel_size: 3 pad: 1")
    rng = np.random.default_rng(5)
    monkeypatch.setattr(jit, "_enabled", True)
    layer, _ = run(make_layer("Convolution", text), rng.standard_normal((1, 3, 6, 6)), np.float32)
    for shape in [(2, 3, 9, 5), (1, 3, 4, 4)]:
        x = rng.standard_normal(shape).astype(np.float32)
        layer.blobs[0].data[...] = rng.standard_normal(layer.blobs[0].shape)
        bottom, top = make_blobs(x, dtype=np.float32), [Blob(dtype=np.float32)]
        layer.reshape(bottom, top)
        layer.forward(bottom, top)
        assert layer.gemm.compiled
        monkeypatch.setattr(jit, "_enabled", False)
        _, expected = run(make_layer("Convolution", text, fillers=False, blobs=layer.blobs), x, np.float32)
        monkeypatch.setattr(jit, "_enabled", True)
        np.testing.assert_allclose(top[0].data, expected["top"], rtol=1e-5, atol=1e-5)


def test_the_python_kernel_matches_loops():
    """The kernel's Python source (what numba compiles, and what runs without it) against the
    obvious loops, in float64."""
    python_kernel = depthwise._depthwise_3x3.py_func
    rng = np.random.default_rng(6)
    for stride, pad in [(1, 1), (2, 1), (1, 0), (2, 2)]:
        x = rng.standard_normal((2, 3, 7, 6))
        w = rng.standard_normal((3, 1, 3, 3))
        bias = rng.standard_normal(3)
        want = reference_conv(x, w, bias, (3, 3), (pad, pad), (stride, stride), (1, 1), 3)
        got = np.full_like(want, np.nan)
        python_kernel(x, w, bias, got, 0, 3, stride, pad, pad, False, 0.0)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        for slope in (0.0, 0.1):
            python_kernel(x, w, bias, got, 0, 3, stride, pad, pad, True, slope)
            np.testing.assert_allclose(got, np.maximum(want, 0) + slope * np.minimum(want, 0),
                                       rtol=1e-12, atol=1e-12)


@needs_numba
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_compiled_depthwise_relu_is_caffes_on_nan_and_negative_zero(stride, slope):
    """The kernel's branch-free ReLU is Caffe's std::max(v, 0) + slope * std::min(v, 0) on the
    plain kernel's output, bit for bit: NaN stays NaN and -0.0 stays -0.0 (Python's max / min
    keep their first argument on ties and NaN, as std::max / std::min do)."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 4, 9, 8)).astype(np.float32)
    x[0, 1, 4, 4] = np.nan
    x[0, 2] = np.abs(x[0, 2]) + 0.5
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    w[2] = -0.0                                    # channel 2: sums of -0.0 products, -0.0 out
    bias = np.array([0.1, -0.2, -0.0, 0.3], np.float32)
    shape = (1, 4, (9 + 2 - 3) // stride + 1, (8 + 2 - 3) // stride + 1)
    fused, plain = np.empty(shape, np.float32), np.empty(shape, np.float32)
    depthwise._depthwise_3x3(x, w, bias, fused, 0, 4, stride, 1, 1, True, np.float32(slope))
    depthwise._depthwise_3x3(x, w, bias, plain, 0, 4, stride, 1, 1, False, np.float32(slope))
    f32, zero = np.float32, np.float32(0)
    want = np.array([max(v, zero) + f32(slope) * min(v, zero) for v in plain.ravel()], np.float32)
    assert np.isnan(want).any() and np.signbit(want.reshape(shape)[0, 2]).all()
    np.testing.assert_array_equal(fused.ravel(), want)    # NaN where NaN
    np.testing.assert_array_equal(np.signbit(fused.ravel()), np.signbit(want))


def test_without_numba_layers_take_the_numpy_path(monkeypatch):
    monkeypatch.setattr(jit, "available", lambda: False)
    monkeypatch.setattr(jit, "_enabled", None)
    monkeypatch.delenv("MINICAFFE_JIT", raising=False)
    assert not jit.available() and not jit.enabled()
    layer, _ = run(make_layer("Convolution", conv_text(3, 1, "kernel_size: 3 pad: 1")),
                   np.ones((1, 3, 5, 5)), np.float32)
    assert not layer.gemm.compiled
    with pytest.raises(RuntimeError, match=r'pip install "minicaffe\[fast\]"'):
        jit.set_enabled(True)


@pytest.mark.parametrize("value,expected", [("0", False), ("off", False), ("", None), ("1", None)])
def test_minicaffe_jit_environment_switch(monkeypatch, value, expected):
    monkeypatch.setattr(jit, "_enabled", None)
    monkeypatch.setenv("MINICAFFE_JIT", value)
    assert jit.enabled() is (jit.available() if expected is None else expected)


def test_bad_minicaffe_jit_value_names_the_variable(monkeypatch):
    monkeypatch.setattr(jit, "_enabled", None)
    monkeypatch.setenv("MINICAFFE_JIT", "fast")
    with pytest.raises(ValueError, match="MINICAFFE_JIT='fast'"):
        jit.enabled()
    with pytest.raises(ValueError, match="True or False"):
        jit.set_enabled(1)


def test_a_kernel_runs_its_python_source_without_numba(monkeypatch):
    monkeypatch.setattr(jit, "available", lambda: False)
    calls = []
    doubled = jit.kernel(lambda x, out: calls.append(1) or np.multiply(x, 2, out=out))
    out = np.empty(3)
    doubled(np.arange(3.0), out)
    assert doubled._compiled is doubled.py_func and calls == [1]
    np.testing.assert_array_equal(out, [0, 2, 4])


def test_numba_is_imported_only_when_a_kernel_runs():
    """Importing minicaffe and running a net without compiled layers loads no numba (its LLVM
    would add over 100 MB of resident memory)."""
    import subprocess
    import sys
    code = ("import sys, numpy as np, minicaffe\n"
            "from minicaffe.kernels import depthwise\n"
            "assert 'numba' not in sys.modules\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@needs_numba
@pytest.mark.parametrize("slope", [0.0, 0.2])
@pytest.mark.parametrize("stride", [1, 2])
def test_inference_net_fuses_the_relu_into_the_compiled_depthwise_forward(monkeypatch, tmp_path, slope, stride):
    """In an inference net a ReLU after a depthwise convolution runs inside the compiled kernel;
    the net's output equals the default net's, whose ReLU is a layer of its own."""
    import minicaffe
    monkeypatch.setattr(jit, "_enabled", True)
    prototxt = tmp_path / "dw.prototxt"
    prototxt.write_text(f"""
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 dim: 6 dim: 11 dim: 10 }} }} }}
layer {{ name: "dw" type: "Convolution" bottom: "data" top: "dw"
  convolution_param {{ num_output: 6 group: 6 kernel_size: 3 pad: 1 stride: {stride}
    weight_filler {{ type: "gaussian" std: 0.5 }} bias_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "dw" top: "dw" relu_param {{ negative_slope: {slope} }} }}
layer {{ name: "pw" type: "Convolution" bottom: "dw" top: "pw" convolution_param {{ num_output: 4 kernel_size: 1
    weight_filler {{ type: "gaussian" std: 0.5 }} }} }}
""")
    plain = minicaffe.Net(str(prototxt), minicaffe.TEST)
    weights = tmp_path / "dw.caffemodel"
    plain.save(str(weights))
    lean = minicaffe.Net(str(prototxt), minicaffe.TEST, weights=str(weights), inference=True)
    x = np.random.default_rng(8).standard_normal(plain.blobs["data"].shape).astype(np.float32)
    calls = []
    conv = DepthwiseConv.conv
    monkeypatch.setattr(DepthwiseConv, "conv", lambda self, *a, **k: calls.append(k.get("relu_slope")) or conv(self, *a, **k))
    for net in (plain, lean):
        net.blobs["data"].data[...] = x
        net.forward()
    assert calls[0] is None and calls[1] == pytest.approx(slope)   # default net, then the fused one
    np.testing.assert_allclose(lean.blobs["pw"].data, plain.blobs["pw"].data, rtol=1e-5, atol=1e-5)


def test_relu_slope_is_refused_by_a_forward_that_cannot_fuse_it(monkeypatch):
    monkeypatch.setattr(jit, "_enabled", False)
    layer, _ = run(make_layer("Convolution", conv_text(3, 1, "kernel_size: 3 pad: 1")),
                   np.ones((1, 3, 5, 5)), np.float32)
    with pytest.raises(ValueError, match="relu_slope"):
        layer.gemm.conv(np.ones((1, 3, 5, 5), np.float32), layer.blobs[0].data,
                        out=np.empty((1, 3, 5, 5), np.float32), relu_slope=0.0)


# col2im geometries (compiled for 2-D kernels with stride_w 1), as (bottom shape, convolution_param)
COL2IM = [((2, 3, 9, 8), "num_output: 4 kernel_size: 3 pad: 1"),
          ((3, 2, 12, 12), "num_output: 5 kernel_size: 5"),
          ((2, 3, 10, 9), "num_output: 4 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 2 pad_w: 1"),
          ((2, 4, 11, 10), "num_output: 4 kernel_size: 3 pad: 2 dilation: 2 group: 2"),
          ((1, 3, 7, 7), "num_output: 2 kernel_size: 3 pad: 1"),
          ((2, 2, 4, 3), "num_output: 3 kernel_size: 3 pad: 2")]


@needs_numba
@pytest.mark.parametrize("shape,text", COL2IM)
@pytest.mark.parametrize("layout", ["batch_inner", "batch_outer"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_col2im_equals_numpy_col2im(monkeypatch, shape, text, layout, dtype):
    """The convolution's backward to data (GEMM, then col2im) with the compiled col2im equals the
    numpy one, in both column layouts; so does a Deconvolution's forward, which is the same col2im."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal(shape)
    results = {}
    for flag in (True, False):
        monkeypatch.setattr(jit, "_enabled", flag)
        for kind in ("Convolution", "Deconvolution"):
            blobs = results.get(("blobs", kind))
            layer = make_layer(kind, text) if blobs is None else make_layer(kind, text, fillers=False, blobs=blobs)
            bottom, top = make_blobs(x, dtype=dtype), [Blob(dtype=dtype)]
            layer.setup(bottom, top)
            layer.gemm.layout = layout
            layer.reshape(bottom, top)
            assert layer.gemm._compiled_col2im is flag
            if blobs is None:   # the numpy run below copies these weights (via BlobProto, as does this one)
                results[("blobs", kind)] = layer.blobs
                layer = make_layer(kind, text, fillers=False, blobs=layer.blobs)
                layer.setup(bottom, top)
                layer.gemm.layout = layout
                layer.reshape(bottom, top)
            layer.forward(bottom, top)
            top[0].diff[...] = np.random.default_rng(10).standard_normal(top[0].shape)
            layer.backward(top, [True], bottom)
            results[(flag, kind)] = (top[0].data.copy(), bottom[0].diff.copy())
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for kind in ("Convolution", "Deconvolution"):
        for got, want in zip(results[(True, kind)], results[(False, kind)]):
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=kind)


def test_col2im_rows_python_source_matches_col2im():
    """The kernel's Python source against im2col.col2im, both layouts' shapes."""
    from minicaffe.im2col import col2im, col2im_rows
    rng = np.random.default_rng(12)
    kernel, pad, stride, dilation = (3, 2), (1, 2), (2, 1), (1, 2)
    image_shape = (3, 7, 8)                                 # (C, H, W), one lead image, trail 1
    out_h = (7 + 2 - 3) // 2 + 1
    out_w = (8 + 4 - (2 * 1 + 1)) // 1 + 1
    cols = rng.standard_normal((3,) + kernel + (out_h, out_w))
    want = col2im(cols, image_shape, kernel, pad, stride, dilation, axis=1)
    got = np.full((3, 1, 7, 8), np.nan)
    col2im_rows.py_func(cols[:, :, :, None], got, 1, 0, 3, stride[0], pad[0], pad[1], dilation[0], dilation[1])
    np.testing.assert_allclose(got[:, 0], want, rtol=1e-12, atol=1e-12)


# -- max pooling ---------------------------------------------------------------------------------

def _pool_layer(params, shape, dtype, forward_only, compiled, monkeypatch):
    from google.protobuf import text_format
    from minicaffe.layer_factory import create_layer
    from minicaffe.proto import caffe_pb2
    monkeypatch.setattr(jit, "_enabled", compiled)
    param = text_format.Parse(f'name: "p" type: "Pooling" pooling_param {{ pool: MAX {params} }}',
                              caffe_pb2.LayerParameter())
    layer = create_layer(param, caffe_pb2.TEST)
    layer.forward_only = forward_only
    bottom, top = Blob(shape, dtype=dtype), Blob(dtype=dtype)
    layer.setup([bottom], [top])
    return layer, bottom, top


def _pool_forward(params, x, forward_only, compiled, monkeypatch, fast=True):
    layer, bottom, top = _pool_layer(params, x.shape, x.dtype, forward_only, compiled, monkeypatch)
    layer.use_fast_kernel = fast
    layer.reshape([bottom], [top])
    bottom.data[...] = x
    top.data[...] = 12345.0
    layer.forward([bottom], [top])
    return layer, bottom, top


@needs_numba
@pytest.mark.parametrize("shape,params", [
    (s, p) for s, p in __import__("tests.kernels.test_pooling_kernels", fromlist=["CONFIGS"]).CONFIGS
    if "global" not in p and "kernel_size: 7" not in p])
@pytest.mark.parametrize("kind", ["normal", "ties", "nonfinite"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_max_pool_equals_the_plain_path(monkeypatch, shape, params, kind, dtype):
    """A forward_only layer's compiled MAX forward equals the plain (non-kernel) path exactly:
    the pooling geometries of test_pooling_kernels, ties, NaN (never wins) and -inf."""
    from tests.kernels.test_pooling_kernels import inputs
    x = inputs(np.random.default_rng(13), shape, kind, dtype)
    fast, _, got = _pool_forward(params, x, True, True, monkeypatch)
    # Taken wherever the phase grid is (other geometries keep the plain path); no phase buffers made
    assert (fast._compiled_max is not None) == PhasePool.applies(fast.windows)
    assert fast._phase_pool is None
    _, _, want = _pool_forward(params, x, False, False, monkeypatch, fast=False)
    np.testing.assert_array_equal(got.data, want.data)


@needs_numba
def test_compiled_max_pool_only_runs_where_backward_never_does(monkeypatch):
    x = np.random.default_rng(14).standard_normal((2, 3, 9, 9)).astype(np.float32)
    layer, _, _ = _pool_forward("kernel_size: 3 stride: 2", x, False, True, monkeypatch)
    assert layer._compiled_max is not None and layer._phase_pool is not None   # phase path ran


@needs_numba
def test_backward_after_a_compiled_forward_rebuilds_its_state(monkeypatch):
    """A forward_only layer run backward by hand still routes the gradient to each window's first
    maximum (the phase state is recomputed from the input), and leaves its top alone."""
    x = np.random.default_rng(15).integers(0, 3, (2, 3, 9, 8)).astype(np.float32)   # ties
    dy = np.random.default_rng(16).standard_normal((2, 3, 4, 4)).astype(np.float32)
    results = []
    for forward_only, compiled in [(True, True), (False, False)]:
        layer, bottom, top = _pool_forward("kernel_size: 3 stride: 2", x, forward_only, compiled, monkeypatch)
        top.diff[...] = dy
        before = top.data.copy()
        layer.backward([top], [True], [bottom])
        np.testing.assert_array_equal(top.data, before)
        results.append(bottom.diff.copy())
    np.testing.assert_array_equal(*results)


@needs_numba
def test_compiled_max_pool_splits_planes_over_the_pool(monkeypatch):
    import minicaffe.threads as threads
    x = np.random.default_rng(17).standard_normal((4, 16, 30, 30)).astype(np.float32)
    monkeypatch.setattr(threads, "MIN_PARALLEL_ELEMENTS", 1)
    threads.set_num_threads(2)
    try:
        _, _, got = _pool_forward("kernel_size: 3 stride: 2", x, True, True, monkeypatch)
    finally:
        threads.set_num_threads(threads._threads_from_env())
    _, _, want = _pool_forward("kernel_size: 3 stride: 2", x, False, False, monkeypatch, fast=False)
    np.testing.assert_array_equal(got.data, want.data)


def test_max_pool_python_source_matches_loops():
    """The kernel's Python source against Caffe's loop (start at -FLT_MAX, take v > max), float64,
    with every specialised window (3x3 s1/s2, 2x2 s2) and a generic one, padded and clipped."""
    from minicaffe.kernels.pooling import _max_pool
    from minicaffe.layers.pooling import PoolWindows
    rng = np.random.default_rng(18)
    x = rng.standard_normal((3, 7, 8))
    x.flat[::9] = np.nan
    x.flat[4::13] = -np.inf
    for k, s, p in [(3, 2, 0), (3, 2, 1), (3, 1, 1), (2, 2, 0), (2, 2, 1), (4, 3, 1), (1, 1, 0)]:
        w = PoolWindows(7, 8, k, k, s, s, p, p)
        want = np.empty((3, w.pooled_h, w.pooled_w))
        for c in range(3):
            for r in range(w.pooled_h):
                for q in range(w.pooled_w):
                    h0, w0 = r * s - p, q * s - p
                    peak = -np.finfo(np.float32).max
                    for h in range(max(h0, 0), min(h0 + k, 7)):
                        for v in x[c, h, max(w0, 0):min(w0 + k, 8)]:
                            if v > peak:
                                peak = v
                    want[c, r, q] = peak
        got = np.full_like(want, 12345.0)
        _max_pool.py_func(x, got, 0, 3, k, k, s, s, p, p)
        np.testing.assert_array_equal(got, want, err_msg=f"kernel {k} stride {s} pad {p}")


def test_the_net_marks_layers_whose_backward_never_runs(tmp_path):
    from minicaffe.net import Net
    from minicaffe.proto import caffe_pb2
    text = '''
    layer { name: "data" type: "Input" top: "data" top: "label"
            input_param { shape { dim: 2 dim: 1 dim: 6 dim: 6 } shape { dim: 2 } } }
    layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
            convolution_param { num_output: 2 kernel_size: 3 } }
    layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
            pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
    layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param { num_output: 3 } }
    '''
    loss = 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }'
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    deploy = Net(str(path), caffe_pb2.TEST)
    assert all(layer.forward_only for layer in deploy.layers)
    path.write_text(text + loss)
    train = Net(str(path), caffe_pb2.TRAIN)
    assert [layer.forward_only for layer in train.layers] == [True, False, False, False, False]
    assert all(layer.forward_only for layer in Net(str(path), caffe_pb2.TEST, inference=True).layers)


# -- Winograd F(4x4, 3x3) transforms --------------------------------------------------------------

@needs_numba
@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_inference_net_fuses_the_relu_into_the_compiled_winograd_output(monkeypatch, tmp_path, slope):
    """A ReLU after a Winograd convolution runs in the compiled output transform of an inference
    net; the output equals the default net's (a ReLU layer of its own, on the numpy transforms)."""
    import minicaffe
    from minicaffe.kernels import winograd
    monkeypatch.setattr(winograd, "MIN_IN_CHANNELS", 4)
    monkeypatch.setattr(winograd, "MIN_TILES", 1)
    monkeypatch.setattr(winograd, "MIN_OUT_CHANNELS", 1)
    monkeypatch.setattr(winograd, "COMPILED_MIN_TILE_COLUMNS", 1)
    prototxt = tmp_path / "wg.prototxt"
    prototxt.write_text(f"""
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 dim: 5 dim: 13 dim: 10 }} }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param {{ num_output: 6 kernel_size: 3 pad: 1
    weight_filler {{ type: "gaussian" std: 0.3 }} bias_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "conv" top: "conv" relu_param {{ negative_slope: {slope} }} }}
""")
    monkeypatch.setattr(jit, "_enabled", False)
    plain = minicaffe.Net(str(prototxt), minicaffe.TEST)
    weights = tmp_path / "wg.caffemodel"
    plain.save(str(weights))
    x = np.random.default_rng(19).standard_normal(plain.blobs["data"].shape).astype(np.float32)
    want = plain.forward(data=x)["conv"].copy()
    assert plain.layers[1]._winograd is not None and not plain.layers[1]._winograd.compiled
    monkeypatch.setattr(jit, "_enabled", True)
    lean = minicaffe.Net(str(prototxt), minicaffe.TEST, weights=str(weights), inference=True)
    calls = []
    conv = winograd.WinogradConv.conv
    monkeypatch.setattr(winograd.WinogradConv, "conv",
                        lambda self, *a, **k: calls.append((self.compiled, k.get("relu_slope"))) or conv(self, *a, **k))
    got = lean.forward(data=x)["conv"]
    assert calls == [(True, pytest.approx(slope))]
    # the two paths round F(4x4)'s transforms differently: test_winograd.py's ACCURACY bound
    assert np.abs(got - want).max() / np.abs(want).max() < 5e-5


def test_winograd_refuses_relu_slope_without_the_compiled_transforms(monkeypatch):
    from minicaffe.kernels.winograd import WinogradConv
    monkeypatch.setattr(jit, "_enabled", False)
    conv = WinogradConv(2, 2, (1, 1), 4)
    conv.reshape(1, (6, 6), np.float32)
    assert not conv.fuses_relu
    with pytest.raises(ValueError, match="relu_slope"):
        conv.conv(np.ones((1, 2, 6, 6), np.float32), np.ones((2, 2, 3, 3), np.float32),
                  np.empty((1, 2, 6, 6), np.float32), relu_slope=0.0)


@pytest.mark.parametrize("pad,height,width,first,rows", [((1, 1), 9, 11, 0, 3), ((0, 2), 10, 5, 1, 1),
                                                          ((2, 0), 6, 7, 0, 2)])
def test_winograd_kernels_python_source_matches_the_numpy_transforms(pad, height, width, first, rows):
    """The compiled transforms' Python source, on one block of tile rows, against the numpy path's
    B^T d B (patches of the padded image) and A^T M A, in float64."""
    from minicaffe.kernels import winograd
    bt, _, at = winograd.TRANSFORMS[4]
    rng = np.random.default_rng(20)
    im = rng.standard_normal((2, 3, height, width))
    out_h, out_w = height + 2 * pad[0] - 2, width + 2 * pad[1] - 2
    tw = -(-out_w // 4)
    pitch = tw + 1
    rows = min(rows, -(-out_h // 4) - first)
    padded = np.zeros((2, 3, 4 * (first + rows + 1) + 2, 4 * pitch + 2))
    padded[:, :, pad[0]:pad[0] + height, pad[1]:pad[1] + width] = im
    v = np.full((36, 3, 2, rows * pitch), np.nan)
    winograd._winograd_input_4x4.py_func(im, v, first, pitch, 0, 3, pad[0], pad[1])
    for r in range(rows):
        for j in range(tw):            # the spare tile j = tw is dropped, whatever it holds
            y0, x0 = 4 * (first + r), 4 * j
            patch = padded[:, :, y0:y0 + 6, x0:x0 + 6]
            want = np.einsum("xi,ncij,yj->xycn", bt, patch, bt).reshape(36, 3, 2)
            np.testing.assert_allclose(v[:, :, :, r * pitch + j], want, rtol=1e-12, atol=1e-12)
    m = rng.standard_normal((36, 4, 2, rows * pitch))
    bias = rng.standard_normal(4)
    out = np.full((2, 4, out_h, out_w), 7.0)
    winograd._winograd_output_4x4.py_func(m, out, bias, first, pitch, 0, 4, False, 0.0)
    want = out.copy()
    for r in range(rows):
        for j in range(tw):
            tile = np.einsum("ri,ijkn,sj->knrs", at, m[:, :, :, r * pitch + j].reshape(6, 6, 4, 2), at)
            y0, x0 = 4 * (first + r), 4 * j
            h, w = min(4, out_h - y0), min(4, out_w - x0)
            want[:, :, y0:y0 + h, x0:x0 + w] = tile[:, :, :h, :w].transpose(1, 0, 2, 3) + bias[:, None, None]
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    winograd._winograd_output_4x4.py_func(m, out, bias, first, pitch, 0, 4, True, 0.25)
    np.testing.assert_allclose(out, np.maximum(want, 0) + 0.25 * np.minimum(want, 0), rtol=1e-12, atol=1e-12)


# -- the convolution epilogue: bias and ReLU in one pass ------------------------------------------

@needs_numba
@pytest.mark.parametrize("num", [1, 3])                  # batch 3: the batch_inner column layout
@pytest.mark.parametrize("slope", [0.0, 0.25])
@pytest.mark.parametrize("bias_term", ["true", "false"])
def test_inference_net_applies_bias_and_relu_in_one_compiled_pass(monkeypatch, tmp_path, num, slope, bias_term):
    """ReLUs after im2col and 1x1 convolutions run in the compiled epilogue of an inference net;
    the outputs equal the numpy path's exactly (the same sums, then the same ReLU)."""
    import minicaffe
    from minicaffe.layers.conv import ConvGemm
    prototxt = tmp_path / "ep.prototxt"
    prototxt.write_text(f"""
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: {num} dim: 3 dim: 9 dim: 8 }} }} }}
layer {{ name: "c3" type: "Convolution" bottom: "data" top: "c3"
  convolution_param {{ num_output: 5 kernel_size: 3 pad: 1 bias_term: {bias_term}
    weight_filler {{ type: "gaussian" std: 0.5 }} bias_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "r3" type: "ReLU" bottom: "c3" top: "c3" relu_param {{ negative_slope: {slope} }} }}
layer {{ name: "c1" type: "Convolution" bottom: "c3" top: "c1"
  convolution_param {{ num_output: 4 kernel_size: 1 bias_term: {bias_term}
    weight_filler {{ type: "gaussian" std: 0.5 }} bias_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "r1" type: "ReLU" bottom: "c1" top: "c1" relu_param {{ negative_slope: {slope} }} }}
""")
    weights = tmp_path / "ep.caffemodel"
    minicaffe.Net(str(prototxt), minicaffe.TEST).save(str(weights))
    x = np.random.default_rng(21).standard_normal((num, 3, 9, 8)).astype(np.float32)
    x[0, 0, 0, :3] = [np.nan, -0.0, 0.0]
    calls, conv = [], ConvGemm.conv
    monkeypatch.setattr(ConvGemm, "conv", lambda self, *a, **k: calls.append(k.get("relu_slope")) or conv(self, *a, **k))
    outputs = {}
    for flag in (False, True):
        monkeypatch.setattr(jit, "_enabled", flag)
        net = minicaffe.Net(str(prototxt), minicaffe.TEST, weights=str(weights), inference=True,
                            keep_blobs=("c3",))
        out = net.forward(data=x)
        outputs[flag] = (net.blobs["c3"].data.copy(), out["c1"].copy())
    assert calls == [None, None, pytest.approx(slope), pytest.approx(slope)]
    for got, want in zip(outputs[True], outputs[False]):
        np.testing.assert_array_equal(got, want)
        assert np.signbit(got).tolist() == np.signbit(want).tolist()   # -0.0 where numpy has it


def test_store_python_source_matches_caffe():
    """The epilogue's Python source against numpy: bias, Caffe's ReLU, and a values view in another
    order (the batch_inner layout's (C, P, N) product seen as (N, C, P))."""
    from minicaffe.kernels.epilogue import _store
    rng = np.random.default_rng(22)
    columns = rng.standard_normal((3, 5, 2))                 # (C, P, N)
    columns[0, :2, 0] = [np.nan, -0.0]
    values = columns.transpose(2, 0, 1)
    bias = rng.standard_normal(3)
    for has_bias, relu, slope in [(True, True, 0.0), (True, True, 0.3), (False, True, 0.1),
                                  (True, False, 0.0), (False, False, 0.0)]:
        v = values + (bias[:, None] if has_bias else 0)
        want = np.maximum(v, 0) + slope * np.minimum(v, 0) if relu else v
        got = np.empty(values.shape)
        _store.py_func(values, got, bias, has_bias, relu, slope, 0, 3)
        np.testing.assert_array_equal(got, want)


@needs_numba
@pytest.mark.parametrize("shape", [(4, 3, 9, 8), (2, 3, 30, 30)])   # batch_inner, batch_outer
def test_training_convolution_stores_through_the_compiled_epilogue(monkeypatch, shape):
    """A TRAIN convolution's forward (bias added as the product moves to blob order) equals the
    numpy path's exactly, in both column layouts."""
    text = "num_output: 6 kernel_size: 3 pad: 1 bias_filler { type: 'gaussian' std: 1 }"
    x = np.random.default_rng(26).standard_normal(shape).astype(np.float32)
    weights, _ = run(make_layer("Convolution", text), x, np.float32)
    tops = []
    for flag in (False, True):
        monkeypatch.setattr(jit, "_enabled", flag)
        layer, blobs = run(make_layer("Convolution", text, fillers=False, blobs=weights.blobs), x, np.float32)
        tops.append(blobs["top"])
    assert layer.gemm.batch_inner == (shape[2] <= 16)
    np.testing.assert_array_equal(tops[1], tops[0])


# -- BatchNorm passes -----------------------------------------------------------------------------

@needs_numba
@pytest.mark.parametrize("relu", ["", "relu_param { negative_slope: 0.1 }", None])
@pytest.mark.parametrize("bias_term", ["true", "false"])
@pytest.mark.parametrize("fuse", [True, False])
def test_compiled_batch_norm_passes_equal_numpy_bit_for_bit(monkeypatch, tmp_path, relu, bias_term, fuse):
    """A training step through BatchNorm -> Scale (-> ReLU), fused into one step or run layer by
    layer, leaves the same blobs, diffs and gradients with compiled passes as with numpy's."""
    from tests.test_fuse import _pair, _state, _text
    states = []
    for flag in (False, True):
        monkeypatch.setattr(jit, "_enabled", flag)
        net = _pair(tmp_path, _text((2, 3, 5, 6), scale=f"bias_term: {bias_term}", relu=relu))[0]
        net.fuse_chains = fuse
        net.forward()
        net.backward()
        states.append(_state(net))
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        np.testing.assert_array_equal(states[1][key], states[0][key], err_msg=key)


@needs_numba
def test_pooling_follows_the_switch_at_its_next_reshape(monkeypatch):
    x = np.random.default_rng(25).standard_normal((1, 2, 9, 9)).astype(np.float32)
    layer, bottom, top = _pool_forward("kernel_size: 3 stride: 2", x, True, True, monkeypatch)
    assert layer._compiled_max is not None
    monkeypatch.setattr(jit, "_enabled", False)
    layer.reshape([bottom], [top])
    assert layer._compiled_max is None


# -- LRN across channels ------------------------------------------------------------------------
def _lrn_forward_backward(monkeypatch, compiled, x, dy, params, forward_only=False):
    """(layer, top data, bottom diff) of an ACROSS_CHANNELS LRN layer, compiled kernels on or off."""
    from google.protobuf import text_format
    from minicaffe.layer_factory import create_layer
    from minicaffe.proto import caffe_pb2
    monkeypatch.setattr(jit, "_enabled", compiled)
    param = text_format.Parse(f'name: "n" type: "LRN" lrn_param {{ {params} }}', caffe_pb2.LayerParameter())
    layer = create_layer(param, caffe_pb2.TRAIN)
    layer.forward_only = forward_only
    bottom, top = Blob(x.shape, dtype=x.dtype), Blob(dtype=x.dtype)
    layer.setup([bottom], [top])
    bottom.data[...] = x
    top.data[...] = 12345.0
    layer.forward([bottom], [top])
    data = top.data.copy()
    top.diff[...] = dy
    layer.backward([top], [True], [bottom])
    np.testing.assert_array_equal(top.data, data)   # backward leaves the top alone
    return layer, data, bottom.diff.copy()


LRN_CONFIGS = ["local_size: 5 alpha: 0.0001 beta: 0.75", "local_size: 3 alpha: 0.2 beta: 0.5 k: 2",
               "local_size: 1 alpha: 1 beta: 1", "local_size: 7 alpha: 0.5 beta: 0.75 k: 0.5"]


@needs_numba
@pytest.mark.parametrize("params", LRN_CONFIGS)
@pytest.mark.parametrize("shape", [(1, 7, 5, 6), (2, 3, 4, 5), (1, 4, 30, 41)])   # 1230 pixels: 3 blocks
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("forward_only", [False, True])
def test_compiled_lrn_equals_the_numpy_path(monkeypatch, params, shape, dtype, forward_only):
    """The compiled forward makes the numpy passes' float operations in their order: the top, and
    the backward that reads its scale and power, equal the numpy path's bit for bit. A
    forward_only layer keeps neither; run backward by hand, it recomputes them."""
    rng = np.random.default_rng(18)
    x, dy = (rng.standard_normal(shape).astype(dtype) * 3 for _ in range(2))
    fast, got, got_dx = _lrn_forward_backward(monkeypatch, True, x, dy, params, forward_only)
    plain, want, want_dx = _lrn_forward_backward(monkeypatch, False, x, dy, params)
    assert fast._compiled and not plain._compiled
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_dx, want_dx)


@needs_numba
def test_lrn_with_another_beta_or_within_channel_keeps_the_numpy_path(monkeypatch):
    x = np.random.default_rng(19).standard_normal((1, 5, 6, 6)).astype(np.float32)
    for params in ["local_size: 5 beta: 0.6", "local_size: 3 norm_region: WITHIN_CHANNEL"]:
        layer, _, _ = _lrn_forward_backward(monkeypatch, True, x, x, params)
        assert not layer._compiled


@needs_numba
def test_compiled_lrn_splits_pixel_blocks_over_the_pool(monkeypatch):
    import minicaffe.threads as threads
    rng = np.random.default_rng(20)
    x, dy = (rng.standard_normal((1, 12, 40, 50)).astype(np.float32) for _ in range(2))
    monkeypatch.setattr(threads, "MIN_PARALLEL_ELEMENTS", 1)
    threads.set_num_threads(2)
    try:
        _, got, _ = _lrn_forward_backward(monkeypatch, True, x, dy, LRN_CONFIGS[0])
    finally:
        threads.set_num_threads(threads._threads_from_env())
    _, want, _ = _lrn_forward_backward(monkeypatch, False, x, dy, LRN_CONFIGS[0])
    np.testing.assert_array_equal(got, want)


def test_lrn_python_source_matches_the_numpy_path(monkeypatch):
    """The kernel's Python source (what runs without numba), on pixels q0:q1 of a small input."""
    from minicaffe.kernels.normalization import LRN_BETAS, lrn_across_channels
    rng = np.random.default_rng(21)
    x = rng.standard_normal((2, 6, 1, 700)).astype(np.float32)
    for kind, beta in enumerate(LRN_BETAS):
        _, want, _ = _lrn_forward_backward(monkeypatch, False, x, x, f"local_size: 5 alpha: 0.3 beta: {beta} k: 1.5")
        flat = x.reshape(2, 6, 700)
        coef = np.float32(float(np.float32(0.3)) / 5)   # alpha is a float field, as the layer reads it
        for keep in (True, False):
            y, scale, power = (np.full_like(flat, np.nan) for _ in range(3))
            lrn_across_channels.py_func(flat, y, scale, power, keep, 5, coef, np.float32(1.5), kind, 100, 650)
            np.testing.assert_array_equal(y[:, :, 100:650], want.reshape(2, 6, 700)[:, :, 100:650])
            assert np.isnan(y[:, :, :100]).all() and np.isnan(y[:, :, 650:]).all()
            assert np.isnan(scale).all() != keep and np.isnan(power).all() != keep


def test_lrn_backward_python_source_matches_the_numpy_path(monkeypatch):
    from minicaffe.kernels.normalization import lrn_across_channels_backward
    rng = np.random.default_rng(22)
    x, dy = (rng.standard_normal((2, 6, 1, 600)).astype(np.float32) for _ in range(2))
    layer, y, want = _lrn_forward_backward(monkeypatch, False, x, dy, "local_size: 3 alpha: 0.3 beta: 0.75 k: 1.5")
    flat = [a.reshape(2, 6, 600) for a in (x, y, dy, layer._scale, layer._power)]
    dx = np.full_like(flat[0], np.nan)
    factor = np.float32(2 * float(np.float32(0.3)) * 0.75 / 3)
    lrn_across_channels_backward.py_func(*flat, dx, 3, factor, 50, 600)
    np.testing.assert_array_equal(dx[:, :, 50:], want.reshape(2, 6, 600)[:, :, 50:])
    assert np.isnan(dx[:, :, :50]).all()
