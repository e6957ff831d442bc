"""Convolution, Deconvolution and Im2col layers: Caffe's own cases, loop references, gradients."""
import importlib
import itertools

import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe.blob import Blob
from minicaffe.layer import LayerError
from minicaffe.layer_factory import create_layer
from minicaffe.proto import caffe_pb2
from tests.gradient_check import check_gradient, make_blobs

conv_module = importlib.import_module("minicaffe.layers.conv")

LAYOUTS = ["auto", "batch_outer", "batch_inner"]


def make_layer(layer_type, conv_text, fillers=True, blobs=None):
    param = caffe_pb2.LayerParameter(name="conv", type=layer_type)
    text_format.Parse(conv_text, param.convolution_param)
    if fillers and layer_type != "Im2col":
        cp = param.convolution_param
        if not cp.HasField("weight_filler"):
            cp.weight_filler.type = "gaussian"
        if not cp.HasField("bias_filler"):
            cp.bias_filler.type = "gaussian"
    for b in blobs or ():
        param.blobs.add().CopyFrom(b.to_proto())
    return create_layer(param)


def setup(layer, bottom_arrays, layout="auto", dtype=np.float64):
    bottom = make_blobs(*bottom_arrays, dtype=dtype)
    top = [Blob(dtype=dtype) for _ in bottom]
    layer.setup(bottom, top)
    if layout != "auto":
        layer.gemm.layout = layout
        layer.reshape(bottom, top)
    return bottom, top


def gaussian(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# -- slow, obvious references ------------------------------------------------------
def geometry(layer):
    return layer.kernel, layer.pad, layer.stride, layer.dilation


def reference_conv(x, weight, bias, kernel, pad, stride, dilation, group):
    """Caffe's caffe_conv test helper, any number of spatial axes: nested loops."""
    num, channels, spatial = x.shape[0], x.shape[1], x.shape[2:]
    num_output = weight.shape[0]
    out_spatial = [(s + 2 * p - (d * (k - 1) + 1)) // st + 1
                   for s, k, p, st, d in zip(spatial, kernel, pad, stride, dilation)]
    out = np.zeros((num, num_output) + tuple(out_spatial))
    c_g, o_g = channels // group, num_output // group
    for n, o in itertools.product(range(num), range(num_output)):
        g = o // o_g
        for pos in itertools.product(*map(range, out_spatial)):
            total = 0.0 if bias is None else bias[o]
            for c, k_idx in itertools.product(range(c_g), itertools.product(*map(range, kernel))):
                src = [q * st - p + k * d for q, st, p, k, d in zip(pos, stride, pad, k_idx, dilation)]
                if all(0 <= v < s for v, s in zip(src, spatial)):
                    total += x[(n, g * c_g + c) + tuple(src)] * weight[(o, c) + k_idx]
            out[(n, o) + pos] = total
    return out


def reference_deconv(x, weight, bias, kernel, pad, stride, dilation, group):
    """Each input pixel scatters weight * value into the output window it maps to."""
    num, channels, spatial = x.shape[0], x.shape[1], x.shape[2:]
    num_output = weight.shape[1] * group
    out_spatial = [st * (s - 1) + d * (k - 1) + 1 - 2 * p
                   for s, k, p, st, d in zip(spatial, kernel, pad, stride, dilation)]
    out = np.zeros((num, num_output) + tuple(out_spatial))
    c_g, o_g = channels // group, num_output // group
    for n, c in itertools.product(range(num), range(channels)):
        g = c // c_g
        for pos in itertools.product(*map(range, spatial)):
            for o, k_idx in itertools.product(range(o_g), itertools.product(*map(range, kernel))):
                dst = [q * st - p + k * d for q, st, p, k, d in zip(pos, stride, pad, k_idx, dilation)]
                if all(0 <= v < s for v, s in zip(dst, out_spatial)):
                    out[(n, g * o_g + o) + tuple(dst)] += x[(n, c) + pos] * weight[(c, o) + k_idx]
    if bias is not None:
        out += bias.reshape((1, -1) + (1,) * len(spatial))
    return out


FORWARD_CASES = [
    # (bottom shape, convolution_param)
    ((2, 3, 6, 4), "num_output: 4 kernel_size: 3 stride: 2"),                       # Caffe's simple case
    ((2, 3, 8, 7), "num_output: 4 kernel_size: 3 dilation: 2"),                     # dilated
    ((2, 3, 6, 4), "num_output: 3 kernel_size: 3 stride: 2 group: 3"),              # group
    ((2, 4, 7, 6), "num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2"),
    ((2, 3, 7, 6), "num_output: 2 kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 0"),
    ((2, 2, 9, 8), "num_output: 2 kernel_size: 2 kernel_size: 3 dilation: 3 dilation: 1 pad: 2 pad: 1"),
    ((2, 3, 6, 4), "num_output: 4 kernel_size: 1 stride: 1"),                       # 1x1 fast path
    ((2, 2, 5, 6, 4), "num_output: 3 kernel_size: 3 stride: 2"),                    # 3-D
    ((1, 2, 6, 7, 8), "num_output: 2 kernel_size: 3 dilation: 2"),                  # dilated 3-D
    ((2, 4, 4, 5, 4), "num_output: 2 kernel_size: 2 kernel_size: 3 kernel_size: 1 pad: 1 group: 2"),
    ((2, 3, 6, 4), "num_output: 4 kernel_size: 3 stride: 2 bias_term: false"),
]


@pytest.mark.parametrize("layer_type,reference", [("Convolution", reference_conv),
                                                  ("Deconvolution", reference_deconv)])
@pytest.mark.parametrize("shape,conv_text", FORWARD_CASES)
def test_forward_matches_loops_in_every_layout(layer_type, reference, shape, conv_text):
    x = gaussian(*shape).astype(np.float32)
    want = None
    for layout in LAYOUTS:
        layer = make_layer(layer_type, conv_text)
        bottom, top = setup(layer, [x], layout, dtype=np.float32)
        if want is None:
            params = [b.data.copy() for b in layer.blobs]
            bias = params[1] if layer.bias_term else None
            want = reference(x, params[0], bias, *geometry(layer), layer.group)
        for b, p in zip(layer.blobs, params):
            b.data[...] = p
        layer.forward(bottom, top)
        assert top[0].data.dtype == np.float32
        np.testing.assert_allclose(top[0].data, want, atol=1e-4, rtol=0, err_msg=layout)


# -- Caffe's test cases ---------------------------------------------------------------
def test_caffe_setup_shapes_two_bottoms():
    bottoms = [gaussian(2, 3, 6, 4), gaussian(2, 3, 6, 4, seed=1)]
    layer = make_layer("Convolution", "num_output: 4 kernel_size: 3 stride: 2")
    _, top = setup(layer, bottoms)
    assert [t.shape for t in top] == [(2, 4, 2, 1)] * 2
    assert layer.blobs[0].shape == (4, 3, 3, 3) and layer.blobs[1].shape == (4,)
    layer = make_layer("Convolution", "num_output: 3 kernel_size: 3 stride: 2 group: 3")
    _, top = setup(layer, bottoms)
    assert [t.shape for t in top] == [(2, 3, 2, 1)] * 2
    assert layer.blobs[0].shape == (3, 1, 3, 3)

    layer = make_layer("Deconvolution", "num_output: 4 kernel_size: 3 stride: 2")
    _, top = setup(layer, bottoms)
    assert [t.shape for t in top] == [(2, 4, 13, 9)] * 2
    assert layer.blobs[0].shape == (3, 4, 3, 3)              # (C_in, num_output/group, kh, kw)
    layer = make_layer("Deconvolution", "num_output: 3 kernel_size: 3 stride: 2 group: 3")
    _, top = setup(layer, bottoms)
    assert [t.shape for t in top] == [(2, 3, 13, 9)] * 2
    assert layer.blobs[0].shape == (3, 1, 3, 3)


def test_two_bottoms_share_the_weights():
    bottoms = [gaussian(2, 3, 6, 4), gaussian(2, 3, 6, 4, seed=1)]
    layer = make_layer("Convolution", "num_output: 4 kernel_size: 3 stride: 2")
    bottom, top = setup(layer, bottoms)
    layer.forward(bottom, top)
    for x, t in zip(bottoms, top):
        want = reference_conv(x, layer.blobs[0].data, layer.blobs[1].data, *geometry(layer), 1)
        np.testing.assert_allclose(t.data, want, atol=1e-10)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_caffe_simple_deconvolution_overlaps(layout):
    layer = make_layer("Deconvolution", """num_output: 4 kernel_size: 3 stride: 2
        weight_filler { type: "constant" value: 1 } bias_filler { type: "constant" value: 0.1 }""")
    bottom, top = setup(layer, [np.ones((2, 3, 6, 4))] * 2, layout, dtype=np.float32)
    layer.forward(bottom, top)
    height, width = top[0].shape[2:]
    h = np.arange(height)[:, None]
    w = np.arange(width)[None, :]
    h_overlap = (h % 2 == 0) & (h > 0) & (h < height - 1)
    w_overlap = (w % 2 == 0) & (w > 0) & (w < width - 1)
    expected = np.where(h_overlap & w_overlap, 12.1, np.where(h_overlap | w_overlap, 6.1, 3.1))
    for t in top:
        np.testing.assert_allclose(t.data, np.broadcast_to(expected, t.shape), atol=1e-4)


def test_caffe_sobel_equals_two_separable_passes():
    x = gaussian(2, 3, 6, 4).astype(np.float32)
    sobel = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float32)
    full = make_layer("Convolution", "num_output: 1 kernel_size: 3 stride: 2 bias_term: false",
                      blobs=[make_blobs(np.broadcast_to(sobel, (1, 3, 3, 3)), dtype=np.float32)[0]])
    bottom, top = setup(full, [x], dtype=np.float32)
    full.forward(bottom, top)

    column = make_layer("Convolution", "num_output: 1 kernel_h: 3 kernel_w: 1 stride_h: 2 stride_w: 1 "
                        "bias_term: false",
                        blobs=make_blobs(np.broadcast_to(np.float32([1, 2, 1])[:, None], (1, 3, 3, 1)),
                                         dtype=np.float32))
    bottom2, middle = setup(column, [x], dtype=np.float32)
    column.forward(bottom2, middle)
    row = make_layer("Convolution", "num_output: 1 kernel_h: 1 kernel_w: 3 stride_h: 1 stride_w: 2 "
                     "bias_term: false", blobs=make_blobs(np.float32([[[[-1, 0, 1]]]]), dtype=np.float32))
    sep_top = [Blob(dtype=np.float32)]
    row.setup(middle, sep_top)
    row.forward(middle, sep_top)
    assert sep_top[0].shape == top[0].shape == (2, 1, 2, 1)
    np.testing.assert_allclose(sep_top[0].data, top[0].data, atol=1e-4)


@pytest.mark.parametrize("layer_type,num_output", [("Convolution", 12), ("Deconvolution", 18)])
def test_caffe_nd_im2col_agrees_with_2d_exactly(layer_type, num_output):
    # Caffe's TestNDAgainst2D, smaller: a rectangular kernel, groups, both directions.
    channels = 18 if layer_type == "Convolution" else 12
    x = gaussian(3, channels, 10, 12).astype(np.float32)
    text = f"num_output: {num_output} bias_term: false group: 6 kernel_h: 5 kernel_w: 6"
    results = []
    for force_nd in ("false", "true"):
        layer = make_layer(layer_type, text + f" force_nd_im2col: {force_nd}")
        bottom, top = setup(layer, [x], dtype=np.float32)
        if not results:
            weights = layer.blobs[0].data.copy()
            top_diff = gaussian(*top[0].shape, seed=5).astype(np.float32)
        layer.blobs[0].data[...] = weights
        layer.forward(bottom, top)
        top[0].diff[...] = top_diff
        layer.blobs[0].diff[...] = 0
        layer.backward(top, [True], bottom)
        results.append((top[0].data.copy(), bottom[0].diff.copy(), layer.blobs[0].diff.copy()))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_caffe_0d_convolution_is_fully_connected():
    x = gaussian(2, 3, 6, 4)
    layer = make_layer("Convolution", "num_output: 3 axis: 3")
    bottom, top = setup(layer, [x])
    assert top[0].shape == (2, 3, 6, 3)
    assert layer.blobs[0].shape == (3, 4)
    layer.forward(bottom, top)
    want = x @ layer.blobs[0].data.T + layer.blobs[1].data
    np.testing.assert_allclose(top[0].data, want, atol=1e-10)
    layer = make_layer("Convolution", "num_output: 3 axis: 3")
    check_gradient(layer, make_blobs(gaussian(1, 2, 2, 3)), [Blob(dtype=np.float64)])


def test_1x1_skips_im2col():
    layer = make_layer("Convolution", "num_output: 4 kernel_size: 1 stride: 1")
    setup(layer, [gaussian(2, 3, 6, 4)])
    assert layer.gemm.is_1x1 and layer.gemm._cols.size == 0
    layer = make_layer("Convolution", "num_output: 4 kernel_size: 1 stride: 2")
    setup(layer, [gaussian(2, 3, 6, 4)])
    assert not layer.gemm.is_1x1


def gradients_with(monkeypatch, setting, values, layer_type, conv_text, x, layout="auto", to_bottom=True):
    """[(layer, weight diff, bottom diff)] of one forward + backward per value of conv.<setting>;
    the weight diff starts at 0.5, so that it must accumulate."""
    results = []
    for value in values:
        monkeypatch.setattr(conv_module, setting, value)
        layer = make_layer(layer_type, conv_text)
        layer.use_depthwise_kernel = False
        bottom, top = setup(layer, [x], layout)
        layer.blobs[0].data[...] = gaussian(*layer.blobs[0].shape, seed=1)
        layer.blobs[0].diff[...] = 0.5
        layer.forward(bottom, top)
        top[0].diff[...] = gaussian(*top[0].shape, seed=2)
        layer.backward(top, [to_bottom], bottom)
        results.append((layer, layer.blobs[0].diff.copy(), bottom[0].diff.copy()))
    return results


def assert_same_gradients(results):
    (_, *first), (_, *second) = results
    for a, b in zip(first, second):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conv_text", ["num_output: 4 kernel_size: 1", "num_output: 6 kernel_size: 1 group: 3"])
def test_1x1_weight_gradient_as_one_gemm_equals_per_image(monkeypatch, conv_text):
    # per-image GEMMs; one GEMM over (C, n*P) copies
    assert_same_gradients(gradients_with(monkeypatch, "ONE_GEMM_1X1_MAX_PIXELS", (0, 1 << 20),
                                         "Convolution", conv_text, gaussian(3, 6, 5, 4)))


@pytest.mark.parametrize("layer_type,conv_text", [
    ("Convolution", "num_output: 4 kernel_size: 3"),                 # 4 x 27: flipped
    ("Convolution", "num_output: 30 kernel_size: 2 group: 3"),        # 10 x 8 per group: direct
    ("Convolution", "num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 3"),
    ("Deconvolution", "num_output: 4 kernel_size: 3 stride: 2"),
])
def test_weight_gradient_flipped_equals_direct(monkeypatch, layer_type, conv_text):
    # The weight gradient computed as its transpose (conv.flipped_weight_grad) equals the
    # direct product, for every orientation the rule can pick (flip whenever cols > rows; never).
    assert_same_gradients(gradients_with(monkeypatch, "FLIPPED_WEIGHT_GRAD_MIN_DEPTH", (0, 1 << 30),
                                         layer_type, conv_text, gaussian(3, 6, 7, 8)))


@pytest.mark.parametrize("layer_type,conv_text", [
    ("Convolution", "num_output: 4 kernel_size: 2"),                 # K = 24 <= 42 pixels
    ("Convolution", "num_output: 6 kernel_size: 2 stride: 2 pad: 1 group: 3"),
    ("Deconvolution", "num_output: 4 kernel_size: 3 stride: 2"),
])
@pytest.mark.parametrize("to_bottom", [False, True])
def test_weight_gradient_per_image_equals_one_gemm(monkeypatch, layer_type, conv_text, to_bottom):
    # Small-K weight gradients sum one GEMM per image reading dout in place (only when no
    # product to data needs dout in column order); the sum equals the single GEMM's.
    results = gradients_with(monkeypatch, "PER_IMAGE_WEIGHT_GRAD_MAX_K", (1 << 20, 0), layer_type,
                             conv_text, gaussian(3, 6, 7, 8), "batch_outer", to_bottom)
    assert [layer.gemm._per_image_weight_grad for layer, _, _ in results] == [True, False]
    assert_same_gradients(results)


def test_weight_gradient_flip_rule():
    # Long pixel axes with more kernel columns than output rows flip; short ones never do.
    assert conv_module.flipped_weight_grad(50, 500, 4096)
    assert not conv_module.flipped_weight_grad(500, 50, 4096)
    assert not conv_module.flipped_weight_grad(50, 500, 1568)


def test_channel_axis_other_than_1():
    # Axis 2: leading axes (2, 3) are all "images"; channels 4; one spatial axis.
    x = gaussian(2, 3, 4, 7)
    layer = make_layer("Convolution", "num_output: 5 kernel_size: 3 axis: 2")
    bottom, top = setup(layer, [x])
    assert top[0].shape == (2, 3, 5, 5)
    layer.forward(bottom, top)
    want = reference_conv(x.reshape(6, 4, 7), layer.blobs[0].data, layer.blobs[1].data,
                          *geometry(layer), 1).reshape(2, 3, 5, 5)
    np.testing.assert_allclose(top[0].data, want, atol=1e-10)


# -- bilinear upsampling ------------------------------------------------------------------
def bilinear_upsample(image, factor):
    """Separable linear interpolation at the output pixel centres, (y + 0.5)/f - 0.5."""
    def along(a, axis):
        size = a.shape[axis]
        src = (np.arange(size * factor) + 0.5) / factor - 0.5
        lo = np.clip(np.floor(src).astype(int), 0, size - 1)
        hi = np.clip(lo + 1, 0, size - 1)
        t = src - np.floor(src)
        shape = [1] * a.ndim
        shape[axis] = -1
        t = t.reshape(shape)
        return np.take(a, lo, axis) * (1 - t) + np.take(a, hi, axis) * t
    return along(along(image, 2), 3)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_bilinear_deconvolution_upsamples_exactly(factor):
    channels, size = 3, 5
    kernel, pad = 2 * factor - factor % 2, int(np.ceil((factor - 1) / 2))
    layer = make_layer("Deconvolution", f"""num_output: {channels} group: {channels}
        kernel_size: {kernel} stride: {factor} pad: {pad} bias_term: false
        weight_filler {{ type: "bilinear" }}""")
    x = gaussian(2, channels, size, size)
    bottom, top = setup(layer, [x])
    layer.forward(bottom, top)
    assert top[0].shape == (2, channels, size * factor, size * factor)
    want = bilinear_upsample(x, factor)
    # Away from the border (where Caffe's kernel sees zeros outside the image) it is exact.
    inner = slice(factor, (size - 1) * factor)
    np.testing.assert_allclose(top[0].data[:, :, inner, inner], want[:, :, inner, inner], atol=1e-12)


# -- gradients -----------------------------------------------------------------------------
GRADIENT_CASES = [
    ("Convolution", (2, 3, 6, 4), "num_output: 2 kernel_size: 3 stride: 2"),            # Caffe TestGradient
    ("Convolution", (2, 3, 5, 6), "num_output: 2 kernel_size: 3 dilation: 2"),          # TestDilatedGradient
    ("Convolution", (1, 2, 5, 3, 4), "num_output: 2 kernel_size: 3 stride: 2"),         # TestGradient3D
    ("Convolution", (2, 3, 4, 3), "num_output: 2 kernel_size: 1 stride: 1"),            # Test1x1Gradient
    ("Convolution", (2, 3, 6, 4), "num_output: 3 kernel_size: 3 stride: 2 group: 3"),   # TestGradientGroup
    ("Convolution", (2, 4, 5, 5), "num_output: 2 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 "
                                  "pad_h: 1 pad_w: 2 group: 2 bias_term: false"),
    ("Convolution", (1, 2, 5, 6), "num_output: 2 kernel_size: 2 pad: 1 dilation: 2 force_nd_im2col: true"),
    ("Convolution", (1, 2, 3, 4, 3), "num_output: 2 kernel_size: 2 pad: 1 dilation: 1 dilation: 2 "
                                     "dilation: 1 bias_term: false"),
    ("Deconvolution", (2, 3, 3, 2), "num_output: 1 kernel_size: 2 stride: 1"),          # Caffe TestGradient
    ("Deconvolution", (2, 4, 3, 2), "num_output: 2 kernel_size: 3 stride: 2 pad: 1 group: 2"),
    ("Deconvolution", (1, 2, 3, 3), "num_output: 2 kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 "
                                    "dilation: 2 bias_term: false"),
    ("Deconvolution", (1, 2, 2, 3, 2), "num_output: 2 kernel_size: 2 stride: 2"),       # 3-D
    ("Deconvolution", (2, 3, 3, 2), "num_output: 2 kernel_size: 1 stride: 1"),          # 1x1
    ("Deconvolution", (1, 2, 3, 3), "num_output: 2 kernel_size: 3 pad: 1 force_nd_im2col: true"),
]


@pytest.mark.parametrize("layout", ["batch_outer", "batch_inner"])
@pytest.mark.parametrize("layer_type,shape,conv_text", GRADIENT_CASES)
def test_gradients(layer_type, shape, conv_text, layout):
    layer = make_layer(layer_type, conv_text)
    bottom = make_blobs(gaussian(*shape))
    top = [Blob(dtype=np.float64)]
    layer.setup(bottom, top)
    layer.gemm.layout = layout
    check_gradient(layer, bottom, top, setup=False)


def test_gradients_two_bottoms():
    layer = make_layer("Convolution", "num_output: 2 kernel_size: 3 stride: 2")
    bottom = make_blobs(gaussian(1, 2, 5, 4), gaussian(1, 2, 5, 4, seed=1))
    check_gradient(layer, bottom, [Blob(dtype=np.float64), Blob(dtype=np.float64)])


@pytest.mark.parametrize("layer_type", ["Convolution", "Deconvolution"])
def test_diffs_accumulate_and_propagate_down_is_respected(layer_type):
    layer = make_layer(layer_type, "num_output: 2 kernel_size: 3 stride: 2 pad: 1")
    bottom, top = setup(layer, [gaussian(2, 3, 5, 4)])
    layer.forward(bottom, top)
    top[0].diff[...] = gaussian(*top[0].shape, seed=3)
    for b in layer.blobs:
        b.diff[...] = 0
    bottom[0].diff[...] = 123.0
    layer.backward(top, [True], bottom)
    once = [b.diff.copy() for b in layer.blobs]
    bottom_diff = bottom[0].diff.copy()
    bottom[0].diff[...] = -7.0
    layer.backward(top, [True], bottom)
    for b, d in zip(layer.blobs, once):
        np.testing.assert_allclose(b.diff, 2 * d)                 # params accumulate
    np.testing.assert_allclose(bottom[0].diff, bottom_diff)       # bottom is overwritten
    # Nothing asked for, nothing touched.
    layer.param_propagate_down = [False, False]
    bottom[0].diff[...] = 5.0
    layer.backward(top, [False], bottom)
    assert np.all(bottom[0].diff == 5.0)
    for b, d in zip(layer.blobs, once):
        np.testing.assert_allclose(b.diff, 2 * d)
    # Weights only, or bias only.
    layer.param_propagate_down = [True, False]
    layer.backward(top, [False], bottom)
    np.testing.assert_allclose(layer.blobs[0].diff, 3 * once[0])
    np.testing.assert_allclose(layer.blobs[1].diff, 2 * once[1])
    assert np.all(bottom[0].diff == 5.0)


def test_deconvolution_is_the_transpose_of_convolution():
    # With the same weight blob, <conv(x), y> == <x, deconv(y)> (no bias).
    x, y = gaussian(2, 3, 5, 5), gaussian(2, 4, 3, 3, seed=1)
    text = "num_output: {} kernel_size: 3 stride: 2 pad: 1 group: 1 bias_term: false"
    conv = make_layer("Convolution", text.format(4))
    xb, conv_top = setup(conv, [x])
    deconv = make_layer("Deconvolution", text.format(3))
    yb, deconv_top = setup(deconv, [y])
    deconv.blobs[0].data[...] = conv.blobs[0].data
    conv.forward(xb, conv_top)
    deconv.forward(yb, deconv_top)
    assert conv_top[0].shape == y.shape and deconv_top[0].shape == x.shape
    np.testing.assert_allclose(np.vdot(conv_top[0].data, y), np.vdot(x, deconv_top[0].data), rtol=1e-10)


@pytest.mark.parametrize("layer_type", ["Convolution", "Deconvolution"])
def test_float32_in_float32_out(layer_type):
    layer = make_layer(layer_type, "num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2")
    bottom, top = setup(layer, [gaussian(2, 4, 6, 5)], dtype=np.float32)
    layer.forward(bottom, top)
    top[0].diff[...] = 1
    layer.backward(top, [True], bottom)
    for arr in (top[0].data, bottom[0].diff, layer.blobs[0].data, layer.blobs[0].diff, layer.blobs[1].diff):
        assert arr.dtype == np.float32


@pytest.mark.parametrize("layout", ["batch_outer", "batch_inner"])
def test_chunked_batches_match_whole_batch(monkeypatch, layout):
    x = gaussian(5, 3, 7, 6)
    padded_channel = (7 + 2) * (6 + 2) * 8          # bytes of one padded float64 channel
    results, weights = [], {}
    # (column budget, im2col working set) -> one chunk; one image per chunk; im2col in pairs
    for budget, working_set in ((1 << 30, 1 << 30), (1, 1), (1 << 30, 2 * padded_channel)):
        monkeypatch.setattr(conv_module, "COL_BUFFER_BYTES", budget)
        monkeypatch.setattr(conv_module, "IM2COL_WORKING_SET_BYTES", working_set)
        for layer_type in ("Convolution", "Deconvolution"):
            layer = make_layer(layer_type, "num_output: 3 kernel_size: 3 pad: 1 "
                               "weight_filler { type: 'gaussian' } bias_filler { type: 'constant' value: 1 }")
            layer.keep_columns = False   # kept columns make the forward one chunk (tested below)
            bottom, top = setup(layer, [x], layout)
            layer.blobs[0].data[...] = weights.setdefault(layer_type, layer.blobs[0].data.copy())
            layer.forward(bottom, top)
            top[0].diff[...] = gaussian(*top[0].shape, seed=4)
            layer.backward(top, [True], bottom)
            results.append((layer.gemm.chunk, layer.gemm.conv_chunk, top[0].data.copy(),
                            bottom[0].diff.copy(), layer.blobs[0].diff.copy()))
    assert [r[:2] for r in results[::2]] == [(5, 5), (1, 1), (5, 2 if layout == "batch_outer" else 5)]
    for i in (0, 1):                       # conv, deconv
        whole = results[i]
        for chunked in results[2 + i::2]:
            for a, b in zip(whole[2:], chunked[2:]):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


KEEP_CASES = [c for c in FORWARD_CASES if "kernel_size: 1 stride: 1" not in c[1]]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,conv_text", KEEP_CASES)
def test_kept_columns_equal_rebuilt_columns(shape, conv_text, layout):
    """TRAIN keeps the forward's columns for the weight gradient; the result is the same as
    building them again (pad, stride, dilation, groups, N-D, both layouts)."""
    x, results = gaussian(*shape), []
    for keep in (False, True):
        layer = make_layer("Convolution", conv_text)
        layer.keep_columns = keep
        layer.use_depthwise_kernel = False
        bottom, top = setup(layer, [x], layout)
        assert (layer.gemm._kept is not None) == keep
        for i, blob in enumerate(layer.blobs):
            blob.data[...] = gaussian(*blob.shape, seed=2 + i)
        for _ in range(2):   # the second step finds last step's diffs and columns
            layer.forward(bottom, top)
            top[0].diff[...] = gaussian(*top[0].shape, seed=3)
            layer.backward(top, [True], bottom)
        results.append((top[0].data.copy(), bottom[0].diff.copy(), layer.blobs[0].diff.copy()))
    for plain, kept in zip(*results):
        np.testing.assert_array_equal(kept, plain)


def test_kept_columns_follow_the_input_and_the_budget(monkeypatch):
    layer = make_layer("Convolution", "num_output: 2 kernel_size: 3 pad: 1")
    bottom, top = setup(layer, [gaussian(2, 3, 5, 5)])
    layer.forward(bottom, top)
    top[0].diff[...] = 1
    # Backward on another bottom array than the forward read: the columns are built again.
    other = Blob(bottom[0].shape)
    other.data[...] = gaussian(2, 3, 5, 5, seed=9)
    layer.blobs[0].diff[...] = 0
    layer.backward(top, [False], [other])
    expected = make_layer("Convolution", "num_output: 2 kernel_size: 3 pad: 1")
    expected.keep_columns = False
    e_bottom, e_top = setup(expected, [other.data])
    e_top[0].diff[...] = 1
    expected.backward(e_top, [False], e_bottom)
    np.testing.assert_allclose(layer.blobs[0].diff, expected.blobs[0].diff, rtol=1e-12)
    # Within the budget only; TEST nets never keep.
    monkeypatch.setattr(conv_module, "KEPT_COLUMNS_BYTES", layer.gemm._kept.nbytes)
    second = make_layer("Convolution", "num_output: 2 kernel_size: 3 pad: 1")
    setup(second, [gaussian(2, 3, 5, 5)])
    assert second.gemm._kept is None
    param = caffe_pb2.LayerParameter(name="conv", type="Convolution")
    text_format.Parse("num_output: 2 kernel_size: 3", param.convolution_param)
    test_layer = create_layer(param, caffe_pb2.TEST)
    setup(test_layer, [gaussian(1, 1, 4, 4)])
    assert test_layer.gemm._kept is None


def test_buffers_are_reused_across_calls():
    layer = make_layer("Convolution", "num_output: 4 kernel_size: 3 pad: 1")
    bottom, top = setup(layer, [gaussian(2, 3, 5, 5)], dtype=np.float32)
    buffers = (layer.gemm._cols, layer.gemm._padded)
    for _ in range(2):
        layer.reshape(bottom, top)
        layer.forward(bottom, top)
        layer.backward(top, [True], bottom)
    assert np.shares_memory(layer.gemm._cols, buffers[0]) and np.shares_memory(layer.gemm._padded, buffers[1])


def test_convolutions_share_one_column_workspace_and_stay_exact():
    """Columns die when a layer's call returns, so every convolution of a thread uses one buffer."""
    fillers = 'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" }'
    small = make_layer("Convolution", "num_output: 4 kernel_size: 3 pad: 1 " + fillers)
    big = make_layer("Convolution", "num_output: 2 kernel_size: 5 pad: 2 stride: 2 " + fillers)
    x = gaussian(2, 3, 9, 9)
    bottom_s, top_s = setup(small, [x], dtype=np.float64)
    bottom_b, top_b = setup(big, [x], dtype=np.float64)
    expected_small = reference_conv(x, small.blobs[0].data, small.blobs[1].data, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    expected_big = reference_conv(x, big.blobs[0].data, big.blobs[1].data, (5, 5), (2, 2), (2, 2), (1, 1), 1)
    for _ in range(2):   # interleaved: each call finds the other's columns in the buffer
        small.forward(bottom_s, top_s)
        big.forward(bottom_b, top_b)
        np.testing.assert_allclose(top_s[0].data, expected_small, rtol=1e-10)
        np.testing.assert_allclose(top_b[0].data, expected_big, rtol=1e-10)
    assert np.abs(expected_small).max() > 0.1 and np.abs(expected_big).max() > 0.1   # non-trivial weights
    assert np.shares_memory(small.gemm._cols, big.gemm._cols)


def test_loaded_weights_skip_the_filler():
    weight = make_blobs(np.full((2, 3, 3, 3), 0.25), dtype=np.float32)[0]
    bias = make_blobs(np.float32([1.0, -1.0]), dtype=np.float32)[0]
    layer = make_layer("Convolution", "num_output: 2 kernel_size: 3", blobs=[weight, bias])
    bottom, top = setup(layer, [np.ones((1, 3, 3, 3))])
    layer.forward(bottom, top)
    np.testing.assert_allclose(top[0].data.ravel(), [27 * 0.25 + 1, 27 * 0.25 - 1])
    assert layer.blobs[0].dtype == np.float64


# -- Im2col layer ----------------------------------------------------------------------------
def test_im2col_layer_setup_and_top_left_block():
    layer = make_layer("Im2col", "kernel_size: 3 stride: 2 dilation: 3")
    _, top = setup(layer, [gaussian(2, 3, 10, 11)])
    assert top[0].shape == (2, 27, 2, 3)
    for text, kh, kw in [("kernel_size: 3 stride: 2", 3, 3), ("kernel_h: 5 kernel_w: 3 stride: 2", 5, 3)]:
        layer = make_layer("Im2col", text)
        x = gaussian(2, 3, 6, 5)
        bottom, top = setup(layer, [x], dtype=np.float32)
        layer.forward(bottom, top)
        assert top[0].dtype == np.float32
        for c in range(3 * kh * kw):
            assert top[0].data[0, c, 0, 0] == np.float32(x[0, c // (kh * kw), (c // kw) % kh, c % kw])


@pytest.mark.parametrize("conv_text", [
    "kernel_size: 3 stride: 2",
    "kernel_size: 3 stride: 2 dilation: 3",
    "kernel_size: 3 stride: 2 force_nd_im2col: true",
    "kernel_size: 3 stride: 2 dilation: 3 force_nd_im2col: true",
    "kernel_h: 5 kernel_w: 3 stride: 2",
    "kernel_size: 2 pad: 1 stride: 1 stride: 2",
])
def test_im2col_layer_gradient(conv_text):
    layer = make_layer("Im2col", conv_text)
    shape = (1, 2, 10, 9) if "dilation" in conv_text else (1, 2, 6, 5)
    check_gradient(layer, make_blobs(gaussian(*shape)), [Blob(dtype=np.float64)], threshold=1e-2)


def test_im2col_layer_3d_matches_function():
    from minicaffe.im2col import im2col
    x = gaussian(2, 2, 4, 5, 3)
    layer = make_layer("Im2col", "kernel_size: 2 pad: 1 stride: 2")
    bottom, top = setup(layer, [x])
    layer.forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, im2col(x, (2, 2, 2), 1, 2).reshape(top[0].shape))


# -- rejected parameters ----------------------------------------------------------------------
BAD = [
    ("Convolution", (1, 3, 6, 6), "kernel_size: 3", "num_output"),
    ("Convolution", (1, 3, 6, 6), "num_output: 4 kernel_size: 3 group: 2", "not divisible by group"),
    ("Convolution", (1, 4, 6, 6), "num_output: 3 kernel_size: 3 group: 2", "multiple of group"),
    ("Convolution", (1, 3, 6, 6), "num_output: 2 kernel_size: 3 group: 0", "group must be positive"),
    ("Convolution", (1, 3, 6, 6), "num_output: 2", "kernel_size must be specified"),
    ("Convolution", (1, 3, 6, 6), "num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3", "not both"),
    ("Convolution", (1, 3, 4, 4, 4), "num_output: 2 kernel_h: 3 kernel_w: 3", "only be used for 2D"),
    ("Convolution", (1, 3, 6, 6), "num_output: 2 kernel_size: 3 kernel_size: 3 kernel_size: 3",
     "once per spatial dimension"),
    ("Convolution", (1, 3, 6, 6), "num_output: 2 kernel_size: 0", "at least 1"),
    ("Convolution", (1, 3, 6, 6), "num_output: 2 kernel_h: 3", "at least 1"),
    ("Convolution", (1, 3, 6, 6), "num_output: 2 kernel_size: 3 stride: 0", "stride must be at least 1"),
    ("Convolution", (1, 3, 6, 6), "num_output: 2 kernel_size: 3 stride: 1 stride: 1 stride: 1",
     "stride must be specified once"),
    ("Convolution", (1, 3, 6, 6), "num_output: 2 kernel_size: 3 pad: 1 pad: 1 pad: 1", "pad must be"),
    ("Convolution", (1, 3, 6, 6), "num_output: 2 kernel_size: 3 dilation: 0", "dilation must be at least 1"),
    ("Convolution", (1, 3, 4, 4), "num_output: 2 kernel_size: 5", "larger than the padded input"),
    ("Convolution", (1, 3, 4, 4), "num_output: 2 kernel_size: 3 axis: 4", "axis"),
    ("Deconvolution", (1, 3, 2, 2), "num_output: 2 kernel_size: 1 pad: 1", "output size"),
    ("Deconvolution", (1, 3, 6, 6), "num_output: 4 kernel_size: 3 group: 3", "multiple of group"),
    ("Im2col", (4, 3), "kernel_size: 3 axis: 1", "at least 1 spatial axis"),
    ("Im2col", (1, 3, 6, 6), "kernel_size: 3 stride_h: 2", "at least 1"),
]


@pytest.mark.parametrize("layer_type,shape,conv_text,message", BAD)
def test_bad_params_are_rejected(layer_type, shape, conv_text, message):
    layer = make_layer(layer_type, conv_text, fillers=False)
    with pytest.raises(LayerError, match=message):
        setup(layer, [np.zeros(shape)])


@pytest.mark.parametrize("layer_type", ["Convolution", "Deconvolution"])
def test_bad_shapes_are_rejected(layer_type):
    layer = make_layer(layer_type, "num_output: 2 kernel_size: 3")
    bottom, top = setup(layer, [np.zeros((1, 3, 6, 6))])
    with pytest.raises(LayerError, match="channels"):
        layer.reshape(make_blobs(np.zeros((1, 4, 6, 6))), top)
    with pytest.raises(LayerError, match="num_axes may not change"):
        layer.reshape(make_blobs(np.zeros((1, 3, 6, 6, 6))), top)
    with pytest.raises(LayerError, match="shape mismatch"):
        layer.reshape(make_blobs(np.zeros((1, 3, 6, 6)), np.zeros((2, 3, 6, 6))), top + [Blob()])
    with pytest.raises(LayerError, match="in place"):
        layer.reshape(bottom, bottom)
    with pytest.raises(LayerError, match="top"):
        make_layer(layer_type, "num_output: 2 kernel_size: 3").setup(bottom, [])
    with pytest.raises(LayerError, match="as many tops as bottoms"):
        make_layer(layer_type, "num_output: 2 kernel_size: 3").setup(bottom, [Blob(), Blob()])


def test_loaded_blobs_with_wrong_shape_are_rejected():
    weight = make_blobs(np.zeros((2, 3, 3, 3)))[0]
    layer = make_layer("Convolution", "num_output: 2 kernel_size: 2 bias_term: false", blobs=[weight])
    with pytest.raises(LayerError, match="incorrect weight shape"):
        setup(layer, [np.zeros((1, 3, 5, 5))])
    layer = make_layer("Convolution", "num_output: 2 kernel_size: 3", blobs=[weight])
    with pytest.raises(LayerError, match="number of weight blobs"):
        setup(layer, [np.zeros((1, 3, 5, 5))])


@pytest.mark.parametrize("layout", ["batch_outer", "batch_inner"])
@pytest.mark.parametrize("shape,conv_text", [
    ((3, 5, 7, 6), "num_output: 4 kernel_size: 3 pad: 1"),
    ((4, 1, 9, 8), "num_output: 3 kernel_size: 3 stride: 2 dilation: 1"),   # 1 channel: split by image
    ((1, 3, 9, 8), "num_output: 2 kernel_size: 3 stride: 2 pad: 1"),        # 1 image: by its 3 channels
    ((2, 6, 8, 7), "num_output: 4 kernel_size: 2 stride: 2 pad: 1 group: 2"),
    ((2, 3, 9, 8), "num_output: 2 kernel_size: 3 dilation: 2"),
])
def test_threaded_im2col_and_col2im_equal_one_thread(monkeypatch, shape, conv_text, layout):
    """im2col / col2im split over channel (or image) blocks on the pool give the same numbers."""
    from minicaffe import threads
    x, results = gaussian(*shape), []
    monkeypatch.setattr(threads, "MIN_PARALLEL_ELEMENTS", 1)
    try:
        for count in (1, 2, 3):
            threads.set_num_threads(count)
            layer = make_layer("Convolution", conv_text)
            layer.use_depthwise_kernel = False
            bottom, top = setup(layer, [x], layout)
            for i, blob in enumerate(layer.blobs):
                blob.data[...] = gaussian(*blob.shape, seed=5 + i)
            layer.forward(bottom, top)
            top[0].diff[...] = gaussian(*top[0].shape, seed=7)
            layer.backward(top, [True], bottom)
            results.append((top[0].data.copy(), bottom[0].diff.copy(), layer.blobs[0].diff.copy()))
    finally:
        threads.set_num_threads(threads._threads_from_env())
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


# -- reshape's fast path: an unchanged reshape only re-sizes the tops ----------------------
@pytest.mark.parametrize("conv_text", ["num_output: 4 kernel_size: 3 pad: 1",
                                       "num_output: 4 kernel_size: 1",
                                       "num_output: 4 kernel_size: 3 stride: 2"])
def test_repeated_reshape_keeps_the_result_and_notices_changes(conv_text):
    layer = make_layer("Convolution", conv_text)
    layer.phase = caffe_pb2.TEST
    bottom, top = setup(layer, [gaussian(2, 3, 9, 9)], dtype=np.float32)
    weight, bias = layer.blobs[0].data.astype(np.float64), layer.blobs[1].data.astype(np.float64)
    for shape in [(2, 3, 9, 9), (2, 3, 9, 9), (1, 3, 12, 10), (1, 3, 12, 10), (2, 3, 9, 9)]:
        bottom[0].reshape(shape)
        bottom[0].data[...] = gaussian(*shape, seed=sum(shape))
        top[0].reshape((1,))   # someone else resized the top: the fast path must undo it
        layer.reshape(bottom, top)
        layer.forward(bottom, top)
        expected = reference_conv(bottom[0].data.astype(np.float64), weight, bias, *geometry(layer), 1)
        assert top[0].shape == expected.shape
        np.testing.assert_allclose(top[0].data, expected, rtol=1e-4, atol=1e-4)
    # a setting that changes the machinery is part of the key too
    layer.winograd = False
    layer.reshape(bottom, top)
    assert layer._winograd is None
