"""Pooling and SPP: loop references written after Caffe's CPU code, gradients, masks, bad params."""
import math

import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe import Blob, LayerError, create_layer, set_random_seed
from minicaffe.layers.pooling import pooled_size
from minicaffe.proto import caffe_pb2
from tests.gradient_check import check_gradient, make_blobs

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def layer_from(text, phase=TRAIN):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    param.name = param.name or "pool"
    return create_layer(param, phase)


def pooling(params, phase=TRAIN):
    return layer_from(f'type: "Pooling" pooling_param {{ {params} }}', phase)


def forward(layer, x, num_tops=1, dtype=np.float64):
    bottom = Blob(x.shape, dtype=dtype)
    bottom.data[...] = x
    tops = [Blob((), dtype=dtype) for _ in range(num_tops)]
    layer.setup([bottom], tops)
    layer.forward([bottom], tops)
    return bottom, tops


# -- slow references: plain loops, one output element at a time -------------------------
def out_len(size, kernel, pad, stride, ceil_mode=True):
    rounding = math.ceil if ceil_mode else math.floor
    out = int(rounding((size + 2 * pad - kernel) / stride)) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def reference_pool(x, kernel, stride=(1, 1), pad=(0, 0), method="MAX", ceil_mode=True, u=None):
    """Returns (top, index). u: uniforms (N, C, PH, PW) for STOCHASTIC in TRAIN; None means TEST."""
    (kh, kw), (sh, sw), (ph_, pw_) = kernel, stride, pad
    n_, c_, h_, w_ = x.shape
    oh, ow = out_len(h_, kh, ph_, sh, ceil_mode), out_len(w_, kw, pw_, sw, ceil_mode)
    top = np.zeros((n_, c_, oh, ow))
    index = np.full((n_, c_, oh, ow), -1)
    for n in range(n_):
        for c in range(c_):
            for ph in range(oh):
                for pw in range(ow):
                    hs, ws = ph * sh - ph_, pw * sw - pw_
                    if method == "AVE":
                        he, we = min(hs + kh, h_ + ph_), min(ws + kw, w_ + pw_)
                        size = (he - hs) * (we - ws)
                        cells = [(h, w) for h in range(max(hs, 0), min(he, h_))
                                 for w in range(max(ws, 0), min(we, w_))]
                        top[n, c, ph, pw] = sum(x[n, c, h, w] for h, w in cells) / size
                        continue
                    cells = [(h, w) for h in range(max(hs, 0), min(hs + kh, h_))
                             for w in range(max(ws, 0), min(ws + kw, w_))]
                    values = [x[n, c, h, w] for h, w in cells]
                    if method == "MAX":
                        best = -np.finfo(np.float32).max
                        for (h, w), v in zip(cells, values):
                            if v > best:
                                best, index[n, c, ph, pw] = v, h * w_ + w
                        top[n, c, ph, pw] = best
                    elif u is None:
                        s = sum(values)
                        top[n, c, ph, pw] = sum(v * v for v in values) / s if s > 0 else 0
                    else:
                        threshold, running = u[n, c, ph, pw] * sum(values), 0.0
                        for (h, w), v in zip(cells, values):
                            running += v
                            if running >= threshold:
                                top[n, c, ph, pw], index[n, c, ph, pw] = v, h * w_ + w
                                break
    return top, index


GEOMETRIES = [
    # (input shape, params text, kernel, stride, pad, ceil_mode)
    ((2, 3, 6, 5), "kernel_size: 3 stride: 2", (3, 3), (2, 2), (0, 0), True),
    ((2, 2, 6, 5), "kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1), True),
    ((1, 2, 5, 7), "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 1",
     (3, 2), (2, 1), (1, 1), True),
    ((2, 1, 7, 7), "kernel_size: 3 stride: 2 round_mode: FLOOR", (3, 3), (2, 2), (0, 0), False),
    ((1, 2, 4, 4), "kernel_size: 2 stride: 3", (2, 2), (3, 3), (0, 0), True),
    ((1, 1, 3, 3), "kernel_size: 2 stride: 2 pad: 1", (2, 2), (2, 2), (1, 1), True),
    ((2, 2, 4, 5), "kernel_size: 4", (4, 4), (1, 1), (0, 0), True),
]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[g[1] for g in GEOMETRIES])
def test_forward_matches_reference(method, geometry):
    shape, text, kernel, stride, pad, ceil_mode = geometry
    x = np.random.default_rng(0).normal(size=shape)
    num_tops = 2 if method == "MAX" else 1
    _, tops = forward(pooling(f"pool: {method} {text}"), x, num_tops)
    expected, index = reference_pool(x, kernel, stride, pad, method, ceil_mode)
    assert tops[0].shape == expected.shape
    np.testing.assert_allclose(tops[0].data, expected, rtol=1e-12, atol=1e-14)
    if method == "MAX":
        np.testing.assert_array_equal(tops[1].data, index)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("geometry", GEOMETRIES[:4], ids=[g[1] for g in GEOMETRIES[:4]])
def test_gradient(method, geometry):
    shape, text, *_ = geometry
    x = np.random.default_rng(1).normal(size=(1, 2) + shape[2:])
    check_gradient(pooling(f"pool: {method} {text}"), make_blobs(x), [Blob(dtype=np.float64)], stepsize=1e-4,
                   threshold=1e-2)


def test_max_gradient_with_mask_top():
    x = np.random.default_rng(2).normal(size=(2, 2, 5, 4))
    check_gradient(pooling("pool: MAX kernel_size: 3 stride: 2 pad: 1"), make_blobs(x), [Blob(dtype=np.float64), Blob(dtype=np.float64)],
                   top_ids=[0], stepsize=1e-4, threshold=1e-2)


def test_caffe_max_example_and_ties():
    # Values from Caffe's own max pooling test: 3 x 5 input, 2 x 2 kernel, stride 1.
    x = np.array([[1, 2, 5, 2, 3], [9, 4, 1, 4, 8], [1, 2, 5, 2, 3]], float)[None, None]
    _, (top, mask) = forward(pooling("pool: MAX kernel_size: 2"), x, 2)
    np.testing.assert_array_equal(top.data[0, 0], [[9, 5, 5, 8], [9, 5, 5, 8]])
    np.testing.assert_array_equal(mask.data[0, 0], [[5, 2, 2, 9], [5, 12, 12, 9]])
    # A tie goes to the first element in row-major order.
    _, (_, mask) = forward(pooling("pool: MAX kernel_size: 2"), np.ones((1, 1, 2, 2)), 2)
    assert mask.data.item() == 0


def test_max_backward_uses_the_mask_top_and_routes_to_argmax():
    x = np.random.default_rng(3).normal(size=(2, 3, 4, 4))
    layer = pooling("pool: MAX kernel_size: 3 stride: 1")
    bottom, (top, mask) = forward(layer, x, 2)
    top.diff[...] = np.random.default_rng(4).normal(size=top.shape)
    layer.backward([top, mask], [True], [bottom])
    expected = np.zeros_like(x)
    for n, c, ph, pw in np.ndindex(top.shape):
        expected[n, c].flat[int(mask.data[n, c, ph, pw])] += top.diff[n, c, ph, pw]
    np.testing.assert_allclose(bottom.diff, expected)
    # Backward follows the mask it is given, as Caffe reads top[1] back.
    mask.data[...] = 0
    layer.backward([top, mask], [True], [bottom])
    np.testing.assert_allclose(bottom.diff[:, :, 0, 0], top.diff.sum(axis=(2, 3)))


def test_ave_divisor_counts_padding_but_not_the_overhang():
    # 4x4 of ones, kernel 3, stride 2, pad 1: along each axis the windows hold 2, 3 and 1 image
    # cells, and divide by 3, 3 and 2 (the last one is cut at image + pad).
    _, (top,) = forward(pooling("pool: AVE kernel_size: 3 stride: 2 pad: 1"), np.ones((1, 1, 4, 4)))
    per_axis = np.array([2 / 3, 3 / 3, 1 / 2])
    np.testing.assert_allclose(top.data[0, 0], np.outer(per_axis, per_axis))
    # Without padding a window hanging over the edge divides by what lies inside the image.
    _, (top,) = forward(pooling("pool: AVE kernel_size: 2 stride: 2"), np.ones((1, 1, 3, 3)))
    np.testing.assert_allclose(top.data[0, 0], np.ones((2, 2)))


@pytest.mark.parametrize("size, kernel, pad, stride, ceil_mode", [
    (6, 3, 0, 2, True), (6, 3, 1, 2, True), (5, 3, 1, 2, True), (7, 3, 0, 2, False),
    (224, 3, 0, 2, True), (13, 3, 0, 2, True), (5, 2, 1, 2, True), (4, 2, 1, 1, True),
    (10, 4, 3, 4, True), (8, 2, 0, 3, False),
])
def test_output_size(size, kernel, pad, stride, ceil_mode):
    assert pooled_size(size, kernel, pad, stride, ceil_mode) == out_len(size, kernel, pad, stride, ceil_mode)


def test_padded_last_window_must_start_inside_the_image():
    # ceil((4 + 2 - 2) / 2) + 1 = 3 windows, but the third would start in the padding: dropped.
    layer = pooling("pool: MAX kernel_size: 2 stride: 2 pad: 1")
    _, (top,) = forward(layer, np.zeros((1, 1, 4, 4)))
    assert top.shape == (1, 1, 3, 3)
    _, (top,) = forward(pooling("pool: MAX kernel_size: 3 stride: 2 pad: 1"), np.zeros((1, 1, 5, 5)))
    assert top.shape == (1, 1, 3, 3)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_global_pooling(method):
    x = np.random.default_rng(5).normal(size=(2, 3, 4, 5))
    layer = pooling(f"pool: {method} global_pooling: true")
    bottom, (top,) = forward(layer, x)
    assert top.shape == (2, 3, 1, 1)
    reduce = np.max if method == "MAX" else np.mean
    np.testing.assert_allclose(top.data[..., 0, 0], reduce(x, axis=(2, 3)))
    # The kernel follows the input on reshape.
    bottom.reshape(1, 3, 2, 2)
    bottom.data[...] = x[:1, :, :2, :2]
    layer.reshape([bottom], [top])
    layer.forward([bottom], [top])
    np.testing.assert_allclose(top.data[..., 0, 0], reduce(x[:1, :, :2, :2], axis=(2, 3)))
    check_gradient(pooling(f"pool: {method} global_pooling: true"), make_blobs(x[:1, :2, :3, :3]),
                   [Blob(dtype=np.float64)], stepsize=1e-4, threshold=1e-2)


# -- STOCHASTIC ---------------------------------------------------------------------
def test_stochastic_train_samples_like_the_reference():
    x = np.random.default_rng(6).uniform(0, 1, (2, 2, 6, 5))
    layer = pooling("pool: STOCHASTIC kernel_size: 3 stride: 2")
    set_random_seed(9)
    bottom, (top,) = forward(layer, x)
    set_random_seed(9)
    layer.forward([bottom], [top])
    set_random_seed(9)
    from minicaffe.rng import get_rng
    u = get_rng().random(top.shape)
    expected, index = reference_pool(x, (3, 3), (2, 2), (0, 0), "STOCHASTIC", u=u)
    np.testing.assert_array_equal(top.data, expected)
    # Every output is one of its window's inputs, and the gradient goes to that input.
    top.diff[...] = 1
    layer.backward([top], [True], [bottom])
    counts = np.zeros_like(x)
    for n, c, ph, pw in np.ndindex(top.shape):
        counts[n, c].flat[index[n, c, ph, pw]] += 1
    np.testing.assert_array_equal(bottom.diff, counts)


def test_stochastic_train_picks_in_proportion_to_value():
    x = np.array([1.0, 3.0, 0.0, 4.0]).reshape(1, 1, 2, 2)
    layer = pooling("pool: STOCHASTIC kernel_size: 2")
    bottom, (top,) = forward(layer, np.tile(x, (4000, 1, 1, 1)))
    picks = top.data.ravel()
    assert not np.any(picks == 0)
    for value, p in [(1, 0.125), (3, 0.375), (4, 0.5)]:
        assert abs(np.mean(picks == value) - p) < 0.03


def test_stochastic_test_phase_is_weighted_average():
    x = np.random.default_rng(7).uniform(0, 1, (2, 2, 6, 5))
    x[0, 0] = 0  # a window summing to 0 gives 0
    _, (top,) = forward(pooling("pool: STOCHASTIC kernel_size: 3 stride: 2", TEST), x)
    expected, _ = reference_pool(x, (3, 3), (2, 2), (0, 0), "STOCHASTIC")
    np.testing.assert_allclose(top.data, expected, rtol=1e-12)


@pytest.mark.parametrize("phase", [TRAIN, TEST])
def test_stochastic_gradient(phase):
    x = np.random.default_rng(8).uniform(0.1, 1, (1, 2, 5, 5))
    check_gradient(pooling("pool: STOCHASTIC kernel_size: 3 stride: 2", phase), make_blobs(x), [Blob(dtype=np.float64)],
                   stepsize=1e-4, threshold=1e-2)


# -- dtypes and bad params ---------------------------------------------------------------
@pytest.mark.parametrize("params", ["pool: MAX kernel_size: 3 stride: 2 pad: 1",
                                    "pool: AVE kernel_size: 3 stride: 2 pad: 1",
                                    "pool: STOCHASTIC kernel_size: 2"])
def test_float32_in_float32_out(params):
    x = np.random.default_rng(9).uniform(0, 1, (2, 3, 5, 5)).astype(np.float32)
    layer = pooling(params)
    bottom, (top,) = forward(layer, x, dtype=np.float32)
    assert top.data.dtype == np.float32
    top.diff[...] = 1
    layer.backward([top], [True], [bottom])
    assert bottom.diff.dtype == np.float32
    if "STOCHASTIC" not in params:
        _, (top64,) = forward(pooling(params), x.astype(np.float64))
        np.testing.assert_allclose(top.data, top64.data, rtol=1e-6)


@pytest.mark.parametrize("params, message", [
    ("global_pooling: true kernel_size: 2", "global_pooling"),
    ("global_pooling: true kernel_h: 2 kernel_w: 2", "global_pooling"),
    ("global_pooling: true stride: 2", "only pad = 0 and stride = 1"),
    ("kernel_size: 2 kernel_h: 2 kernel_w: 2", "kernel_size OR"),
    ("kernel_h: 2", "both kernel_h and kernel_w"),
    ("", "kernel_size"),
    ("kernel_size: 0", "cannot be zero"),
    ("kernel_size: 2 pad: 1 pad_h: 1 pad_w: 1", "pad"),
    ("kernel_size: 2 pad_h: 1", "pad"),
    ("kernel_size: 2 stride_w: 2", "stride"),
    ("kernel_size: 2 stride: 0", "stride must be positive"),
    ("kernel_size: 2 pad: 2", "smaller than the kernel"),
    ("pool: STOCHASTIC kernel_size: 3 pad: 1", "AVE and MAX"),
    ("kernel_size: 9", "does not fit"),
])
def test_bad_params_are_refused(params, message):
    with pytest.raises(LayerError, match=message):
        forward(pooling(params), np.zeros((1, 1, 4, 4)))


def test_bad_shapes_and_tops_are_refused():
    with pytest.raises(LayerError, match="4 axes"):
        forward(pooling("kernel_size: 2"), np.zeros((2, 4, 4)))
    with pytest.raises(LayerError, match="second top"):
        forward(pooling("pool: AVE kernel_size: 2"), np.zeros((1, 1, 4, 4)), num_tops=2)
    with pytest.raises(LayerError):
        forward(pooling("pool: MAX kernel_size: 2"), np.zeros((1, 1, 4, 4)), num_tops=3)


# -- SPP ------------------------------------------------------------------------------------
def spp(text, phase=TRAIN):
    return layer_from(f'type: "SPP" spp_param {{ {text} }}', phase)


def reference_spp(x, levels, method):
    n, c, h, w = x.shape
    parts = []
    for level in range(levels):
        bins = 2 ** level
        kh, kw = math.ceil(h / bins), math.ceil(w / bins)
        ph, pw = (kh * bins - h + 1) // 2, (kw * bins - w + 1) // 2
        out, _ = reference_pool(x, (kh, kw), (kh, kw), (ph, pw), method)
        parts.append(out.reshape(n, -1))
    return np.concatenate(parts, axis=1)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("shape", [(2, 3, 9, 8), (1, 2, 4, 4), (2, 2, 7, 6)])
def test_spp_forward(method, shape):
    x = np.random.default_rng(10).normal(size=shape)
    _, (top,) = forward(spp(f"pyramid_height: 3 pool: {method}"), x)
    expected = reference_spp(x, 3, method)
    assert top.shape == (shape[0], shape[1] * (1 + 4 + 16))
    np.testing.assert_allclose(top.data, expected, rtol=1e-12)


def test_spp_single_level_stays_4d():
    x = np.random.default_rng(11).normal(size=(2, 3, 5, 4))
    _, (top,) = forward(spp("pyramid_height: 1"), x)
    assert top.shape == (2, 3, 1, 1)
    np.testing.assert_allclose(top.data[..., 0, 0], x.max(axis=(2, 3)))


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_spp_gradient(method):
    x = np.random.default_rng(12).normal(size=(1, 2, 5, 4))
    check_gradient(spp(f"pyramid_height: 2 pool: {method}"), make_blobs(x), [Blob(dtype=np.float64)],
                   stepsize=1e-4, threshold=1e-2)


def test_spp_float32_and_reshape():
    layer = spp("pyramid_height: 2 pool: AVE")
    x = np.random.default_rng(13).normal(size=(2, 2, 6, 6)).astype(np.float32)
    bottom, (top,) = forward(layer, x, dtype=np.float32)
    assert top.data.dtype == np.float32 and top.shape == (2, 10)
    top.diff[...] = 1
    layer.backward([top], [True], [bottom])
    assert bottom.diff.dtype == np.float32
    # Each input cell feeds one bin per level; AVE gradients sum to 1 per bin per level.
    np.testing.assert_allclose(bottom.diff.sum(axis=(2, 3)), np.full((2, 2), 5.0), rtol=1e-5)
    bottom.reshape(2, 2, 9, 7)
    bottom.data[...] = 1
    layer.reshape([bottom], [top])
    layer.forward([bottom], [top])
    assert top.shape == (2, 10)


def test_spp_bad_params():
    with pytest.raises(LayerError, match="pyramid_height"):
        forward(spp("pool: MAX"), np.zeros((1, 1, 4, 4)))
    # An image too small for the finest level needs pad >= kernel, which Pooling refuses.
    with pytest.raises(LayerError, match="smaller than the kernel"):
        forward(spp("pyramid_height: 3"), np.zeros((1, 1, 1, 8)))
    with pytest.raises(LayerError, match="4 axes"):
        forward(spp("pyramid_height: 2"), np.zeros((1, 4, 4)))


@pytest.mark.parametrize("params,shape", [
    ("kernel_size: 2 stride: 2", (2, 3, 6, 8)),                       # exact tiles
    ("kernel_size: 2 stride: 2 round_mode: FLOOR", (2, 3, 7, 9)),     # a row and column left over
    ("kernel_size: 3 stride: 2", (2, 3, 7, 7)),                       # overlapping windows
    ("kernel_size: 3 stride: 2 pad: 1", (1, 2, 6, 5)),                # padding
])
def test_max_backward_with_and_without_mask_top_agree(params, shape):
    """Both backward routes (offsets kept by forward, or the mask top as Caffe reads it) give the
    same gradient, and inputs no window covers get a zero gradient even if dx held garbage."""
    from google.protobuf import text_format
    from minicaffe import Blob
    from minicaffe.layer_factory import create_layer
    from minicaffe.proto import caffe_pb2
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    x[0, 0, :2, :2] = 1.0  # a tie: the first element in row-major order must win
    grads = []
    for ntop in (1, 2):
        layer = create_layer(text_format.Parse(
            f'name: "p" type: "Pooling" pooling_param {{ pool: MAX {params} }}', caffe_pb2.LayerParameter()))
        bottom, top = [Blob(shape)], [Blob() for _ in range(ntop)]
        bottom[0].data[...] = x
        layer.setup(bottom, top)
        layer.forward(bottom, top)
        top[0].diff[...] = np.arange(top[0].count()).reshape(top[0].shape) + 1.0
        bottom[0].diff[...] = 123.0
        layer.backward(top, [True], bottom)
        grads.append((bottom[0].diff.copy(), top[0].diff.copy()))
    np.testing.assert_array_equal(grads[0][0], grads[1][0])
    assert not np.any(grads[0][0] == 123.0)
    if "pad" not in params:
        assert grads[0][0][0, 0, 0, 0] != 0 and grads[0][0][0, 0, 0, 1] == 0  # first of the tie
    if "FLOOR" in params:
        assert not grads[0][0][:, :, -1, :].any() and not grads[0][0][:, :, :, -1].any()
