"""The forks' layers: ShuffleChannel, Axpy, Interp, Upsample, BN, ROIPooling, SmoothL1Loss,
Pooling's ceil_mode. Loop references written after the forks' CPU code, gradients, bad params."""
import importlib
import math

import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe import Blob, LayerError, create_layer
from minicaffe.proto import caffe_pb2
from tests.gradient_check import check_gradient, make_blobs

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def layer_from(text, phase=TRAIN, blobs=()):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    param.name = param.name or "fork"
    for b in blobs:
        param.blobs.add().CopyFrom(make_blobs(b)[0].to_proto())
    return create_layer(param, phase)


def forward(layer, *arrays, dtype=np.float64, num_tops=1):
    bottom = make_blobs(*arrays, dtype=dtype)
    top = [Blob(dtype=dtype) for _ in range(num_tops)]
    layer.setup(bottom, top)
    layer.forward(bottom, top)
    return bottom, top


def rng(seed=0):
    return np.random.default_rng(seed)


# -- ShuffleChannel -------------------------------------------------------------------
def test_shuffle_channel_matches_loop_and_inverts_in_backward():
    x = rng().standard_normal((2, 6, 3, 2))
    layer = layer_from('type: "ShuffleChannel" shuffle_channel_param { group: 3 }')
    bottom, top = forward(layer, x)
    expected = np.empty_like(x)
    for i in range(3):           # farmingyard's loop: group i, column j -> channel j * g + i
        for j in range(2):
            expected[:, j * 3 + i] = x[:, i * 2 + j]
    np.testing.assert_array_equal(top[0].data, expected)
    top[0].diff[...] = top[0].data
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, x)
    check_gradient(layer_from('type: "ShuffleChannel" shuffle_channel_param { group: 2 }'),
                   make_blobs(rng(1).standard_normal((1, 4, 2, 2))), [Blob(dtype=np.float64)])


def test_shuffle_channel_bad_group():
    with pytest.raises(LayerError, match=r"'fork' \(ShuffleChannel\).*not divisible by group 4"):
        forward(layer_from('type: "ShuffleChannel" shuffle_channel_param { group: 4 }'),
                np.zeros((1, 6, 2, 2)))
    with pytest.raises(LayerError, match="group must be positive"):
        forward(layer_from('type: "ShuffleChannel" shuffle_channel_param { group: 0 }'),
                np.zeros((1, 6, 2, 2)))


# -- Axpy --------------------------------------------------------------------------------
def test_axpy_forward_and_gradient():
    a, x, y = rng().standard_normal((2, 3, 1, 1)), rng(1).standard_normal((2, 3, 4, 5)), \
        rng(2).standard_normal((2, 3, 4, 5))
    _, top = forward(layer_from('type: "Axpy"'), a, x, y)
    expected = np.empty_like(x)
    for n in range(2):
        for c in range(3):
            expected[n, c] = a[n, c, 0, 0] * x[n, c] + y[n, c]
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-14)
    check_gradient(layer_from('type: "Axpy"'), make_blobs(a, x, y), [Blob(dtype=np.float64)])
    check_gradient(layer_from('type: "Axpy"'), make_blobs(a[:, :, 0, 0], x, y), [Blob(dtype=np.float64)])


def test_axpy_bad_shapes():
    with pytest.raises(LayerError, match=r"\(Axpy\).*size 1 after the channel axis"):
        forward(layer_from('type: "Axpy"'), np.zeros((1, 2, 2, 1)), np.zeros((1, 2, 2, 2)),
                np.zeros((1, 2, 2, 2)))
    with pytest.raises(LayerError, match=r"\(Axpy\).*one shape"):
        forward(layer_from('type: "Axpy"'), np.zeros((1, 2, 1, 1)), np.zeros((1, 2, 2, 2)),
                np.zeros((1, 2, 3, 2)))


# -- Interp ------------------------------------------------------------------------------
def reference_interp(x, height2, width2, pad_beg=0, pad_end=0):
    """DeepLab's caffe_cpu_interp2, element by element (float32 positions)."""
    n_, c_, h_in, w_in = x.shape
    height1, width1 = h_in + pad_beg + pad_end, w_in + pad_beg + pad_end
    x1 = y1 = -pad_beg
    out = np.zeros((n_, c_, height2, width2))
    if (height1, width1) == (height2, width2):
        return x[:, :, y1: y1 + height1, x1: x1 + width1].copy()
    rh = np.float32(height1 - 1) / np.float32(height2 - 1) if height2 > 1 else np.float32(0)
    rw = np.float32(width1 - 1) / np.float32(width2 - 1) if width2 > 1 else np.float32(0)
    for h2 in range(height2):
        h1r = np.float32(rh * np.float32(h2))
        h1 = int(h1r)
        h1p = 1 if h1 < height1 - 1 else 0
        h1l = float(h1r - np.float32(h1))
        for w2 in range(width2):
            w1r = np.float32(rw * np.float32(w2))
            w1 = int(w1r)
            w1p = 1 if w1 < width1 - 1 else 0
            w1l = float(w1r - np.float32(w1))
            p = x[:, :, y1 + h1:, x1 + w1:]
            out[:, :, h2, w2] = ((1 - h1l) * ((1 - w1l) * p[:, :, 0, 0] + w1l * p[:, :, 0, w1p])
                                 + h1l * ((1 - w1l) * p[:, :, h1p, 0] + w1l * p[:, :, h1p, w1p]))
    return out


@pytest.mark.parametrize("params,shape,out_hw", [
    ("zoom_factor: 3", (1, 2, 4, 5), (10, 13)),
    ("shrink_factor: 2", (2, 1, 9, 6), (5, 3)),
    ("height: 7 width: 3", (1, 2, 5, 5), (7, 3)),
    ("zoom_factor: 2 shrink_factor: 2", (1, 1, 9, 7), (9, 7)),
    ("zoom_factor: 2 pad_beg: -1 pad_end: -1", (1, 2, 6, 6), (7, 7)),
    ("height: 1 width: 4", (1, 1, 3, 3), (1, 4)),
])
def test_interp_matches_deeplab_loops(params, shape, out_hw):
    x = rng().standard_normal(shape)
    layer = layer_from(f'type: "Interp" interp_param {{ {params} }}')
    _, top = forward(layer, x)
    assert top[0].shape[2:] == out_hw
    p = layer.layer_param.interp_param
    np.testing.assert_allclose(top[0].data, reference_interp(x, *out_hw, p.pad_beg, p.pad_end),
                               rtol=1e-6, atol=1e-6)
    check_gradient(layer_from(f'type: "Interp" interp_param {{ {params} }}'), make_blobs(x),
                   [Blob(dtype=np.float64)])


def test_interp_takes_the_size_of_a_second_bottom():
    layer = layer_from('type: "Interp"')
    _, top = forward(layer, rng().standard_normal((1, 3, 4, 4)), np.zeros((1, 1, 8, 6)))
    assert top[0].shape == (1, 3, 8, 6)


@pytest.mark.parametrize("params,message", [
    ("", "must give zoom_factor"),
    ("height: 5", "both height and width"),
    ("zoom_factor: 2 height: 3 width: 3", "not both"),
    ("zoom_factor: 0", "zoom_factor must be at least 1"),
    ("shrink_factor: 2 pad_beg: 1", "must be <= 0"),
])
def test_interp_bad_params(params, message):
    with pytest.raises(LayerError, match=rf"\(Interp\).*{message}"):
        forward(layer_from(f'type: "Interp" interp_param {{ {params} }}'), np.zeros((1, 1, 4, 4)))


# -- Upsample ------------------------------------------------------------------------------
def pooled_with_mask(x):
    layer = layer_from('type: "Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 2 }')
    _, tops = forward(layer, x, num_tops=2)
    return tops[0].data.copy(), tops[1].data.copy()


@pytest.mark.parametrize("params,shape,out", [
    ("scale: 2", (1, 2, 6, 4), (6, 4)),
    ("upsample_h: 7 upsample_w: 5", (1, 2, 7, 5), (7, 5)),
    ("scale: 2 pad_out_h: true", (2, 1, 7, 4), (7, 4)),
])
def test_upsample_puts_values_back_at_the_mask(params, shape, out):
    x = rng().standard_normal(shape)
    values, mask = pooled_with_mask(x)
    layer = layer_from(f'type: "Upsample" upsample_param {{ {params} }}')
    bottom, top = forward(layer, values, mask)
    assert top[0].shape[2:] == out
    expected = np.zeros(top[0].shape)
    for n in range(shape[0]):
        for c in range(shape[1]):
            for i, index in enumerate(mask[n, c].ravel()):
                expected[n, c].flat[int(index)] = values[n, c].flat[i]
    np.testing.assert_array_equal(top[0].data, expected)
    check_gradient(layer_from(f'type: "Upsample" upsample_param {{ {params} }}'),
                   make_blobs(values, mask), [Blob(dtype=np.float64)], check_bottom=[0])


def test_upsample_one_bottom_repeats_values():
    x = rng().standard_normal((1, 2, 2, 3))
    _, top = forward(layer_from('type: "Upsample" upsample_param { scale: 2 }'), x)
    np.testing.assert_array_equal(top[0].data, x.repeat(2, axis=2).repeat(2, axis=3))
    check_gradient(layer_from('type: "Upsample" upsample_param { scale: 3 }'), make_blobs(x),
                   [Blob(dtype=np.float64)])


def test_upsample_bad_mask_and_params():
    values, mask = pooled_with_mask(rng().standard_normal((1, 1, 6, 6)))
    with pytest.raises(LayerError, match=r"\(Upsample\).*outside the 4 x 4 output"):
        forward(layer_from('type: "Upsample" upsample_param { upsample_h: 4 upsample_w: 4 }'),
                values, mask)
    with pytest.raises(LayerError, match=r"\(Upsample\).*both upsample_h and upsample_w"):
        forward(layer_from('type: "Upsample" upsample_param { upsample_h: 4 }'), values, mask)
    with pytest.raises(LayerError, match=r"pad_out_h needs scale_h == 2"):
        forward(layer_from('type: "Upsample" upsample_param { scale: 3 pad_out_h: true }'),
                values, mask)


# -- BN ----------------------------------------------------------------------------------------
def bn_blobs(c, seed=0):
    r = rng(seed)
    # float32 values, as a .caffemodel stores them
    return [a.astype(np.float32).astype(np.float64) for a in (
        r.uniform(0.5, 1.5, (1, c, 1, 1)), r.standard_normal((1, c, 1, 1)),
        r.standard_normal((1, c, 1, 1)), r.uniform(0.5, 2, (1, c, 1, 1)))]


def reference_bn(x, slope, bias, mean, var, eps):
    out = np.empty_like(x)
    for c in range(x.shape[1]):
        out[:, c] = slope.flat[c] * (x[:, c] - mean.flat[c]) / math.sqrt(var.flat[c] + eps) + bias.flat[c]
    return out


@pytest.mark.parametrize("phase,frozen", [(TEST, False), (TRAIN, True)])
def test_pspnet_bn_uses_moving_statistics(phase, frozen):
    x = rng(1).standard_normal((2, 3, 4, 4))
    blobs = bn_blobs(3)
    layer = layer_from(f'type: "BN" bn_param {{ frozen: {str(frozen).lower()} eps: 1e-4 }}', phase,
                       blobs)
    _, top = forward(layer, x)
    np.testing.assert_allclose(top[0].data, reference_bn(x, *blobs, 1e-4), rtol=1e-6)
    # frozen: every param's learning rate forced to 0; otherwise only the statistics'
    lr = [p.lr_mult for p in layer.layer_param.param]
    assert lr[2:] == [0, 0] and (lr[:2] == [0, 0]) == frozen
    # Blobs 2 and 3 are statistics, not parameters: the bottom is checked numerically,
    # slope and bias against their closed form.
    layer = layer_from(f'type: "BN" bn_param {{ frozen: {str(frozen).lower()} }}', phase, blobs)
    check_gradient(layer, make_blobs(x), [Blob(dtype=np.float64)], check_params=False)
    bottom, top = forward(layer, x)
    dy = rng(7).standard_normal(x.shape)
    top[0].diff[...] = dy
    for b in layer.blobs:
        b.diff[...] = 0
    layer.backward(top, [True], bottom)
    x_hat = (x - blobs[2]) / np.sqrt(blobs[3] + 1e-5)
    expected = [0, 0] if frozen else [(dy * x_hat).sum(axis=(0, 2, 3)), dy.sum(axis=(0, 2, 3))]
    for blob, want in zip(layer.blobs[:2], expected):
        np.testing.assert_allclose(blob.diff.ravel(), np.broadcast_to(want, (3,)), rtol=1e-10)


def test_pspnet_bn_train_normalizes_with_batch_statistics_and_updates_moving_ones():
    x = rng(2).standard_normal((3, 2, 3, 3)) * 2 + 1
    blobs = bn_blobs(2)
    layer = layer_from('type: "BN" bn_param { momentum: 0.8 }', TRAIN, blobs)
    _, top = forward(layer, x)
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    np.testing.assert_allclose(top[0].data, reference_bn(x, blobs[0], blobs[1], mean, var, 1e-5),
                               rtol=1e-6)
    np.testing.assert_allclose(layer.blobs[2].data.ravel(), 0.8 * blobs[2].ravel() + 0.2 * mean, rtol=1e-6)
    np.testing.assert_allclose(layer.blobs[3].data.ravel(), 0.8 * blobs[3].ravel() + 0.2 * var, rtol=1e-6)
    grad_layer = layer_from('type: "BN" bn_param { momentum: 1 }', TRAIN, blobs)
    check_gradient(grad_layer, make_blobs(x), [Blob(dtype=np.float64)])


def test_segnet_bn_learn_and_inference():
    x = rng(3).standard_normal((2, 2, 3, 3))
    scale, shift = bn_blobs(2, seed=4)[:2]
    _, top = forward(layer_from('type: "BN" bn_param { bn_mode: INFERENCE }', TEST, [scale, shift]), x)
    np.testing.assert_allclose(top[0].data, scale * x + shift, rtol=1e-14)
    _, top = forward(layer_from('type: "BN" bn_param { bn_mode: LEARN }', TRAIN, [scale, shift]), x)
    np.testing.assert_allclose(top[0].data, reference_bn(x, scale, shift, x.mean(axis=(0, 2, 3)),
                                                         x.var(axis=(0, 2, 3)), 1e-9), rtol=1e-6)
    for mode in ("LEARN", "INFERENCE"):
        check_gradient(layer_from(f'type: "BN" bn_param {{ bn_mode: {mode} }}', TRAIN, [scale, shift]),
                       make_blobs(x), [Blob(dtype=np.float64)])


def test_fresh_bn_layouts():
    layer = layer_from('type: "BN" bn_param { slope_filler { type: "constant" value: 2 } frozen: true }',
                       TEST)
    forward(layer, np.ones((1, 3, 2, 2)))
    assert [b.shape for b in layer.blobs] == [(1, 3, 1, 1)] * 4
    assert layer.blobs[0].data.ravel().tolist() == [2] * 3 and layer.blobs[3].data.ravel().tolist() == [1] * 3
    layer = layer_from('type: "BN" bn_param { scale_filler { type: "constant" value: 1 } }', TEST)
    forward(layer, np.ones((1, 3, 2, 2)))
    assert len(layer.blobs) == 2


def test_bn_bad_blobs():
    with pytest.raises(LayerError, match=r"\(BN\).*4 blobs .* or 2"):
        forward(layer_from('type: "BN"', TEST, bn_blobs(3)[:3]), np.ones((1, 3, 2, 2)))
    with pytest.raises(LayerError, match=r"\(BN\).*blob 0 has shape"):
        forward(layer_from('type: "BN"', TEST, bn_blobs(4)), np.ones((1, 3, 2, 2)))


# -- ROIPooling -------------------------------------------------------------------------------
def c_round(v):
    return int(math.floor(abs(v) + 0.5)) * (1 if v >= 0 else -1)


def reference_roi_pool(x, rois, ph_, pw_, scale):
    """caffe-fast-rcnn's ROIPoolingLayer::Forward_cpu, loop for loop."""
    n_, c_, h_, w_ = x.shape
    out = np.zeros((len(rois), c_, ph_, pw_))
    arg = np.full(out.shape, -1)
    f = np.float32
    for r, roi in enumerate(rois):
        b = int(roi[0])
        sw, sh = c_round(f(roi[1]) * f(scale)), c_round(f(roi[2]) * f(scale))
        ew, eh = c_round(f(roi[3]) * f(scale)), c_round(f(roi[4]) * f(scale))
        rh, rw = max(eh - sh + 1, 1), max(ew - sw + 1, 1)
        bh, bw = f(rh) / f(ph_), f(rw) / f(pw_)
        for c in range(c_):
            for ph in range(ph_):
                for pw in range(pw_):
                    hs = min(max(int(math.floor(f(ph) * bh)) + sh, 0), h_)
                    he = min(max(int(math.ceil(f(ph + 1) * bh)) + sh, 0), h_)
                    ws = min(max(int(math.floor(f(pw) * bw)) + sw, 0), w_)
                    we = min(max(int(math.ceil(f(pw + 1) * bw)) + sw, 0), w_)
                    if he <= hs or we <= ws:
                        continue
                    best = -np.inf
                    for h in range(hs, he):
                        for w in range(ws, we):
                            if x[b, c, h, w] > best:
                                best, arg[r, c, ph, pw] = x[b, c, h, w], h * w_ + w
                    out[r, c, ph, pw] = best
    return out, arg


ROIS = np.array([[0, 0, 0, 15, 11], [1, 2.5, 3.5, 9, 7], [0, 5, 5, 5, 5], [1, -8, -8, 40, 3],
                 [0, 14, 14, 30, 30], [1, 1, 0.5, 6.49, 13.5]], dtype=np.float32)


@pytest.mark.parametrize("pooled,scale", [((3, 2), 0.5), ((2, 2), 1.0), ((4, 3), 0.25)])
def test_roi_pooling_matches_loops(pooled, scale):
    x = rng().standard_normal((2, 3, 8, 9)).astype(np.float32)
    x[0, 0, :4, :4] = 0       # ties: the first in row-major order wins
    text = (f'type: "ROIPooling" roi_pooling_param {{ pooled_h: {pooled[0]} pooled_w: {pooled[1]} '
            f'spatial_scale: {scale} }}')
    layer = layer_from(text)
    _, top = forward(layer, x, ROIS, dtype=np.float32)
    expected, arg = reference_roi_pool(x, ROIS, *pooled, scale)
    np.testing.assert_array_equal(top[0].data, expected)
    np.testing.assert_array_equal(layer._argmax, arg)


def test_roi_pooling_gradient_and_chunks(monkeypatch):
    rcnn = importlib.import_module("minicaffe.layers.rcnn")
    x = rng(1).standard_normal((2, 2, 6, 7))
    text = 'type: "ROIPooling" roi_pooling_param { pooled_h: 2 pooled_w: 3 spatial_scale: 1 }'
    _, whole = forward(layer_from(text), x, ROIS)
    monkeypatch.setattr(rcnn, "GATHER_BYTES", 1)
    layer = layer_from(text)
    _, chunked = forward(layer, x, ROIS)
    np.testing.assert_array_equal(chunked[0].data, whole[0].data)
    check_gradient(layer_from(text), make_blobs(x, ROIS), [Blob(dtype=np.float64)], check_bottom=[0])


def test_roi_pooling_bad_input():
    text = 'type: "ROIPooling" roi_pooling_param { pooled_h: 2 pooled_w: 2 }'
    with pytest.raises(LayerError, match=r"\(ROIPooling\).*batch index 3"):
        forward(layer_from(text), np.zeros((2, 1, 4, 4)), np.array([[3, 0, 0, 1, 1]]))
    with pytest.raises(LayerError, match=r"\(ROIPooling\).*\(R, 5\)"):
        forward(layer_from(text), np.zeros((2, 1, 4, 4)), np.zeros((2, 4)))
    with pytest.raises(LayerError, match=r"\(ROIPooling\).*pooled_h and pooled_w must be > 0"):
        forward(layer_from('type: "ROIPooling"'), np.zeros((2, 1, 4, 4)), np.zeros((1, 5)))


# -- SmoothL1Loss --------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma,weights", [(1.0, False), (3.0, True)])
def test_smooth_l1_loss(sigma, weights):
    r = rng(2)
    a, b = r.standard_normal((3, 8)), r.standard_normal((3, 8))
    arrays = [a, b]
    if weights:
        arrays += [r.integers(0, 2, (3, 8)).astype(float), r.uniform(0, 2, (3, 8))]
    text = f'type: "SmoothL1Loss" smooth_l1_loss_param {{ sigma: {sigma} }}'
    _, top = forward(layer_from(text), *arrays)
    total = 0.0
    for i in range(a.size):
        d = (a.flat[i] - b.flat[i]) * (arrays[2].flat[i] if weights else 1)
        f = 0.5 * (sigma * d) ** 2 if abs(d) < 1 / sigma ** 2 else abs(d) - 0.5 / sigma ** 2
        total += f * (arrays[3].flat[i] if weights else 1)
    assert top[0].data == pytest.approx(total / 3, rel=1e-12)
    check_gradient(layer_from(text), make_blobs(*arrays), [Blob(dtype=np.float64)],
                   check_bottom=[0, 1], kink=0, kink_range=0.02)


def test_smooth_l1_loss_three_bottoms_is_an_error():
    with pytest.raises(LayerError, match=r"\(SmoothL1Loss\).*both inside and outside"):
        forward(layer_from('type: "SmoothL1Loss"'), np.zeros((1, 4)), np.zeros((1, 4)), np.ones((1, 4)))


# -- Pooling ceil_mode -----------------------------------------------------------------------------
@pytest.mark.parametrize("ceil,expected", [("true", 4), ("false", 3)])
def test_pooling_ceil_mode(ceil, expected):
    layer = layer_from(f'type: "Pooling" pooling_param {{ pool: MAX kernel_size: 3 stride: 2 '
                       f'ceil_mode: {ceil} }}')
    _, top = forward(layer, rng().standard_normal((1, 1, 8, 8)))
    assert top[0].shape == (1, 1, expected, expected)


def test_pooling_ceil_mode_disagreeing_with_round_mode():
    layer = layer_from('type: "Pooling" pooling_param { kernel_size: 3 ceil_mode: false round_mode: CEIL }')
    with pytest.raises(LayerError, match=r"\(Pooling\).*ceil_mode: false and round_mode: CEIL"):
        forward(layer, np.zeros((1, 1, 8, 8)))


# -- Reorg ------------------------------------------------------------------------------------------
def reference_reorg(x, stride, forward_flag, out_shape):
    """The YOLO v2 Caffe ports' reorg_cpu(bottom, W, H, C, N, stride, forward, top), as written."""
    b_n, b_c, b_h, b_w = x.shape
    t_c, t_w, t_h = b_c // stride ** 2, b_w * stride, b_h * stride
    src, dst = x.ravel(), np.zeros(x.size)
    for n in range(b_n):
        for c in range(b_c):
            for h in range(b_h):
                for w in range(b_w):
                    bottom_index = w + b_w * (h + b_h * (c + b_c * n))
                    c2, offset = c % t_c, c // t_c
                    w2, h2 = w * stride + offset % stride, h * stride + offset // stride
                    top_index = w2 + t_w * (h2 + t_h * (c2 + t_c * n))
                    if forward_flag:
                        dst[top_index] = src[bottom_index]
                    else:
                        dst[bottom_index] = src[top_index]
    return dst.reshape(out_shape)


@pytest.mark.parametrize("reverse,shape,out", [(False, (2, 8, 4, 6), (2, 32, 2, 3)),
                                               (True, (1, 8, 3, 2), (1, 2, 6, 4))])
def test_reorg_matches_the_ports_loop(reverse, shape, out):
    x = rng().standard_normal(shape)
    text = f'type: "Reorg" reorg_param {{ stride: 2 reverse: {str(reverse).lower()} }}'
    _, top = forward(layer_from(text), x)
    assert top[0].shape == out
    np.testing.assert_array_equal(top[0].data, reference_reorg(x, 2, reverse, out))
    check_gradient(layer_from(text), make_blobs(x), [Blob(dtype=np.float64)])


def test_reorg_bad_params():
    with pytest.raises(LayerError, match=r"\(Reorg\).*positive stride"):
        forward(layer_from('type: "Reorg"'), np.zeros((1, 4, 2, 2)))
    with pytest.raises(LayerError, match=r"\(Reorg\).*divisible"):
        forward(layer_from('type: "Reorg" reorg_param { stride: 2 }'), np.zeros((1, 4, 3, 2)))
