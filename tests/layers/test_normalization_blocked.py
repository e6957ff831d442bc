"""BatchNorm and Scale run their passes block by block over rows (image x channel), on the
worker threads: these check the blocked paths against plain numpy formulas and Scale's
broadcast path, with blocks small enough that every pass spans many of them, on two threads.
"""
import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe import Blob, create_layer, threads
from minicaffe.layers import normalization
from minicaffe.proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def small_blocks(request, monkeypatch):
    monkeypatch.setattr(normalization, "_BLOCK", 300)           # rows of 100 -> 3 per block
    monkeypatch.setattr(threads, "MIN_PARALLEL_ELEMENTS", 1)
    before = threads.get_num_threads()
    threads.set_num_threads(request.param)
    yield
    threads.set_num_threads(before)


def layer_from(text, phase=TRAIN):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    param.name = "norm"
    return create_layer(param, phase)


def blob(array, dtype=np.float32):
    b = Blob(array.shape, dtype=dtype)
    b.data[...] = array
    return b


def run(layer, x, dy, in_place, extra=()):
    bottoms = [blob(x)] + [blob(a) for a in extra]
    top = bottoms[0] if in_place else Blob(dtype=np.float32)
    layer.setup(bottoms, [top])
    layer.reshape(bottoms, [top])
    layer.forward(bottoms, [top])
    y = top.data.copy()
    top.diff[...] = dy
    for b in layer.blobs:
        b.diff[...] = 0
    layer.backward([top], [True] * len(bottoms), bottoms)
    return y, bottoms


@pytest.mark.parametrize("row_dots", ["vecdot", "einsum"])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 10, 10), (2, 7, 100)])
def test_batchnorm_blocked_train_matches_formula(small_blocks, monkeypatch, row_dots, in_place, shape):
    if row_dots == "vecdot" and not hasattr(np, "vecdot"):
        pytest.skip("np.vecdot needs numpy >= 2.0; the einsum path runs instead")
    monkeypatch.setattr(normalization, "_VECDOT_MIN_ROW", 1 if row_dots == "vecdot" else 10 ** 9)
    rng = np.random.default_rng(0)
    x = (rng.normal(size=shape) * 2 + 0.5).astype(np.float32)
    dy = rng.uniform(-1, 1, size=shape).astype(np.float32)
    layer = layer_from('type: "BatchNorm" batch_norm_param { use_global_stats: false }')
    y, bottoms = run(layer, x, dy, in_place)
    axes = (0,) + tuple(range(2, x.ndim))
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    mean = x64.mean(axis=axes, keepdims=True)
    var = x64.var(axis=axes, keepdims=True)
    std = np.sqrt(var + 1e-5)
    xn = (x64 - mean) / std
    np.testing.assert_allclose(y, xn, rtol=1e-4, atol=1e-5)
    dx = (dy64 - dy64.mean(axis=axes, keepdims=True)
          - xn * (dy64 * xn).mean(axis=axes, keepdims=True)) / std
    np.testing.assert_allclose(bottoms[0].diff, dx, rtol=1e-4, atol=1e-5)
    m = x.size // shape[1]
    np.testing.assert_allclose(layer.blobs[0].data, mean.ravel(), rtol=1e-5)
    np.testing.assert_allclose(layer.blobs[1].data, var.ravel() * m / (m - 1), rtol=1e-4)


@pytest.mark.parametrize("in_place", [False, True])
def test_batchnorm_blocked_global_stats(small_blocks, in_place):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 4, 10, 10)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    fresh = layer_from('type: "BatchNorm"', TEST)
    # Stored sums with normalizer 2: mean = sums / 2, variance = sums / 2.
    fresh.blobs = [blob(np.array(a)) for a in ([0.2, -0.4, 1.0, 0.0], [2.0, 1.0, 0.5, 4.0], [2.0])]
    fresh.blobs_loaded = True
    y, bottoms = run(fresh, x, dy, in_place)
    mean = np.array([0.1, -0.2, 0.5, 0.0])[None, :, None, None]
    std = np.sqrt(np.array([1.0, 0.5, 0.25, 2.0]) + 1e-5)[None, :, None, None]
    np.testing.assert_allclose(y, (x - mean) / std, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bottoms[0].diff, dy / std, rtol=1e-5, atol=1e-6)


SCALE_CASES = [
    'type: "Scale" scale_param { bias_term: true }',
    'type: "Scale"',
    'type: "Scale" scale_param { axis: 1 num_axes: 1 bias_term: true '
    'filler { type: "uniform" min: -1 max: 1 } bias_filler { type: "uniform" min: -1 max: 1 } }',
]


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("text", SCALE_CASES)
def test_scale_row_path_matches_broadcast_path(small_blocks, in_place, text):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 5, 10, 10)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    results = []
    for min_inner in (64, 10 ** 9):   # the row path, then the broadcast path
        from minicaffe import set_random_seed
        set_random_seed(5)
        layer = layer_from(text)
        layer.ROW_PATH_MIN_INNER = min_inner
        y, bottoms = run(layer, x, dy, in_place)
        assert layer._rows == (min_inner == 64)
        results.append((y, bottoms[0].diff.copy(), [b.diff.copy() for b in layer.blobs]))
    (y1, dx1, p1), (y2, dx2, p2) = results
    np.testing.assert_allclose(y1, y2, rtol=1e-6)
    np.testing.assert_allclose(dx1, dx2, rtol=1e-6)
    for a, b in zip(p1, p2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_scale_row_path_with_second_bottom(small_blocks):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 6, 100)).astype(np.float32)
    s = rng.normal(size=(6,)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    layer = layer_from('type: "Scale" scale_param { axis: 1 }')
    y, bottoms = run(layer, x, dy, False, extra=[s])
    assert layer._rows
    np.testing.assert_allclose(y, x * s[None, :, None], rtol=1e-6)
    np.testing.assert_allclose(bottoms[0].diff, dy * s[None, :, None], rtol=1e-6)
    np.testing.assert_allclose(bottoms[1].diff, (dy.astype(np.float64) * x).sum(axis=(0, 2)),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("beta", [0.75, 0.5, 1.0, 0.6])
def test_lrn_negative_power_matches_np_power(beta):
    base = np.random.default_rng(4).uniform(1, 50, size=(4, 1000)).astype(np.float32)
    out, scratch = np.empty_like(base), np.empty_like(base)
    normalization._negative_power(base, beta, out, scratch)
    np.testing.assert_allclose(out, np.power(base.astype(np.float64), -beta), rtol=1e-6)
    assert out.dtype == np.float32


@pytest.mark.parametrize("in_place", [False, True])
def test_scale_reshape_is_redone_when_shapes_change(in_place):
    """Scale.reshape skips its work when the shapes it saw last are unchanged; a new batch
    size or spatial size must still give the right dims and buffers."""
    layer = layer_from('type: "Scale" scale_param { bias_term: true '
                       'filler { type: "uniform" min: -1 max: 1 } }')
    rng = np.random.default_rng(6)
    first = rng.normal(size=(2, 3, 10, 10)).astype(np.float32)
    y, _ = run(layer, first, np.ones_like(first), in_place)
    for shape in [(2, 3, 10, 10), (5, 3, 4, 20), (1, 3, 2, 2)]:
        x = rng.normal(size=shape).astype(np.float32)
        bottom = blob(x)
        top = bottom if in_place else Blob(dtype=np.float32)
        layer.reshape([bottom], [top])
        layer.forward([bottom], [top])
        assert top.shape == shape and layer.dims == (shape[0], 3, shape[2] * shape[3])
        s, b = (blob_.data.reshape(1, 3, 1, 1) for blob_ in layer.blobs)
        np.testing.assert_allclose(top.data, x * s + b, rtol=1e-6)


def test_batchnorm_variance_is_stable_for_large_means(small_blocks):
    """The per-row statistics are combined about each row's own mean, so a mean far from
    zero does not cancel the variance away (as E[x^2] - E[x]^2 would in float32)."""
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(4, 3, 10, 10)) * 0.5 + 300 + rng.normal(size=(4, 1, 1, 1))).astype(np.float32)
    layer = layer_from('type: "BatchNorm" batch_norm_param { use_global_stats: false }')
    y, _ = run(layer, x, np.zeros_like(x), False)
    x64 = x.astype(np.float64)
    var = x64.var(axis=(0, 2, 3))
    m = x.size // 3
    np.testing.assert_allclose(layer.blobs[1].data, var * m / (m - 1), rtol=1e-4)
    mean = x64.mean(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(y, (x64 - mean) / np.sqrt(var.reshape(1, 3, 1, 1) + 1e-5), atol=1e-4)


@pytest.mark.parametrize("text", ['type: "LRN" lrn_param { local_size: 5 alpha: 0.1 beta: 0.75 }',
                                  'type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.6 k: 2 }'])
def test_lrn_image_blocks_match_one_block(small_blocks, monkeypatch, text):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(5, 7, 6, 6)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    y_blocks, b_blocks = run(layer_from(text), x, dy, False)       # one image per block
    monkeypatch.setattr(normalization, "_BLOCK", 10 ** 9)
    y_one, b_one = run(layer_from(text), x, dy, False)
    np.testing.assert_array_equal(y_blocks, y_one)
    np.testing.assert_array_equal(b_blocks[0].diff, b_one[0].diff)
    x64 = x.astype(np.float64)
    p = layer_from(text).layer_param.lrn_param
    pad = (p.local_size - 1) // 2
    sq = np.pad(x64 ** 2, ((0, 0), (pad, pad), (0, 0), (0, 0)))
    window = sum(sq[:, o: o + x.shape[1]] for o in range(p.local_size))
    np.testing.assert_allclose(y_one, x64 * (p.k + p.alpha / p.local_size * window) ** -p.beta,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length", [3, 127, 128, 3136])
def test_row_dots_equals_plain_sum(length):
    rng = np.random.default_rng(5)
    a, b = (rng.normal(size=(7, length)).astype(np.float32) for _ in range(2))
    out = np.empty(7, np.float32)
    normalization._row_dots(a, b, out=out)
    np.testing.assert_allclose(out, (a.astype(np.float64) * b).sum(axis=1), rtol=1e-5, atol=1e-5)
