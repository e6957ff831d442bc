"""LRN, BatchNorm, MVN, Scale and Bias: loop references, gradients, in-place runs, dtypes, bad params."""
import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe import Blob, LayerError, create_layer, set_random_seed
from minicaffe.proto import caffe_pb2
from tests.gradient_check import check_gradient, make_blobs

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST
F64 = np.float64


def layer_from(text, phase=TRAIN):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    param.name = param.name or "norm"
    return create_layer(param, phase)


def top64():
    return Blob(dtype=F64)


def run(layer, arrays, in_place=False, dtype=F64, top_diff_seed=1, propagate=None):
    """setup + forward + backward with a random top diff; returns (bottoms, top, top data).

    The shared RNG is reseeded first, so random fillers give every run the same parameters.
    """
    set_random_seed(0)
    bottoms = make_blobs(*arrays, dtype=dtype)
    top = bottoms[0] if in_place else Blob(dtype=dtype)
    layer.setup(bottoms, [top])
    layer.forward(bottoms, [top])
    y = top.data.copy()
    top.diff[...] = np.random.default_rng(top_diff_seed).uniform(-1, 1, top.shape)
    for b in layer.blobs:
        b.diff[...] = 0
    layer.backward([top], propagate or [True] * len(bottoms), bottoms)
    return bottoms, top, y


def rand(*shape, seed=0, low=-1.0, high=1.0):
    return np.random.default_rng(seed).uniform(low, high, shape)


# -- LRN --------------------------------------------------------------------------------------
def reference_lrn(x, size, alpha, beta, k, within=False):
    n_, c_, h_, w_ = x.shape
    pre = (size - 1) // 2
    y = np.empty_like(x)
    for n, c, h, w in np.ndindex(x.shape):
        if within:
            total = sum(x[n, c, hh, ww] ** 2 for hh in range(max(0, h - pre), min(h_, h + pre + 1))
                        for ww in range(max(0, w - pre), min(w_, w + pre + 1)))
            scale = 1 + alpha / size ** 2 * total
        else:
            total = sum(x[n, cc, h, w] ** 2 for cc in range(max(0, c - pre), min(c_, c + pre + 1)))
            scale = k + alpha / size * total
        y[n, c, h, w] = x[n, c, h, w] * scale ** -beta
    return y


LRN_CASES = [
    ("", 5, 1.0, 0.75, 1.0, False),
    ("local_size: 3 alpha: 0.5 beta: 0.6 k: 2", 3, 0.5, 0.6, 2.0, False),
    ("norm_region: WITHIN_CHANNEL", 5, 1.0, 0.75, 1.0, True),
    ("norm_region: WITHIN_CHANNEL local_size: 3 alpha: 2 beta: 0.5 k: 7", 3, 2.0, 0.5, 7.0, True),
]


@pytest.mark.parametrize("case", LRN_CASES, ids=[c[0] or "defaults" for c in LRN_CASES])
def test_lrn_forward_and_gradient(case):
    text, size, alpha, beta, k, within = case
    x = rand(2, 7, 3, 4, seed=2) * 2
    _, top, y = run(layer_from(f'type: "LRN" lrn_param {{ {text} }}'), [x])
    np.testing.assert_allclose(y, reference_lrn(x, size, alpha, beta, k, within), rtol=1e-6)
    check_gradient(layer_from(f'type: "LRN" lrn_param {{ {text} }}'), make_blobs(rand(1, 6, 3, 3)),
                   [top64()])


def test_lrn_float32_and_bad_params():
    for region in ("ACROSS_CHANNELS", "WITHIN_CHANNEL"):
        layer = layer_from(f'type: "LRN" lrn_param {{ norm_region: {region} }}')
        bottoms, top, _ = run(layer, [rand(2, 5, 3, 3)], dtype=np.float32)
        assert top.data.dtype == np.float32 and bottoms[0].diff.dtype == np.float32
    with pytest.raises(LayerError, match="odd"):
        run(layer_from('type: "LRN" lrn_param { local_size: 4 }'), [rand(1, 5, 3, 3)])
    with pytest.raises(LayerError, match="4 axes"):
        run(layer_from('type: "LRN"'), [rand(5, 3, 3)])
    with pytest.raises(LayerError, match="in place"):
        run(layer_from('type: "LRN"'), [rand(1, 5, 3, 3)], in_place=True)


# -- BatchNorm ---------------------------------------------------------------------------------
def batch_stats(x):
    axes = (0,) + tuple(range(2, x.ndim))
    return x.mean(axis=axes), x.var(axis=axes)


def test_batchnorm_train_normalizes_and_updates_running_sums():
    x = rand(4, 3, 2, 5, seed=3) * 3 + 1
    layer = layer_from('type: "BatchNorm" batch_norm_param { moving_average_fraction: 0.9 }')
    _, top, y = run(layer, [x])
    mean, var = batch_stats(x)
    shape = (1, 3, 1, 1)
    np.testing.assert_allclose(y, (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + 1e-5), rtol=1e-10)
    m = x.size // 3
    np.testing.assert_allclose(layer.blobs[0].data, mean)
    np.testing.assert_allclose(layer.blobs[1].data, var * m / (m - 1))
    np.testing.assert_allclose(layer.blobs[2].data, [1.0])
    x2 = rand(4, 3, 2, 5, seed=4)
    bottom = make_blobs(x2)[0]
    layer.reshape([bottom], [top])
    layer.forward([bottom], [top])
    mean2, var2 = batch_stats(x2)
    maf = np.float32(0.9).item()
    np.testing.assert_allclose(layer.blobs[0].data, maf * mean + mean2)
    np.testing.assert_allclose(layer.blobs[1].data, (maf * var + var2) * m / (m - 1))
    np.testing.assert_allclose(layer.blobs[2].data, [maf + 1])


def test_batchnorm_test_phase_uses_stored_statistics():
    x = rand(2, 3, 4, seed=5)
    layer = layer_from('type: "BatchNorm"', TEST)
    param = layer.layer_param
    assert not layer.layer_param.batch_norm_param.HasField("use_global_stats")
    bottoms = make_blobs(x)
    top = top64()
    layer.setup(bottoms, [top])
    assert layer.use_global_stats and param is layer.layer_param
    # Stored sums with normalizer 2: mean = sums / 2.
    layer.blobs[0].data[...] = [2.0, -4.0, 0.0]
    layer.blobs[1].data[...] = [8.0, 2.0, 0.5]
    layer.blobs[2].data[...] = 2.0
    layer.forward(bottoms, [top])
    mean = np.array([1.0, -2.0, 0.0])[None, :, None]
    var = np.array([4.0, 1.0, 0.25])[None, :, None]
    np.testing.assert_allclose(top.data, (x - mean) / np.sqrt(var + 1e-5))
    before = [b.data.copy() for b in layer.blobs]
    top.diff[...] = 1
    layer.backward([top], [True], bottoms)
    np.testing.assert_allclose(bottoms[0].diff, np.broadcast_to(1 / np.sqrt(var + 1e-5), x.shape))
    for b, old in zip(layer.blobs, before):
        np.testing.assert_array_equal(b.data, old)
    # A zero normalizer means "no statistics yet": mean and variance 0.
    layer.blobs[2].data[...] = 0
    layer.forward(bottoms, [top])
    np.testing.assert_allclose(top.data, x / np.sqrt(1e-5))


@pytest.mark.parametrize("text, phase, expected", [
    ("", TRAIN, False), ("", TEST, True),
    ("batch_norm_param { use_global_stats: true }", TRAIN, True),
    ("batch_norm_param { use_global_stats: false }", TEST, False),
])
def test_batchnorm_use_global_stats_default(text, phase, expected):
    layer = layer_from(f'type: "BatchNorm" {text}', phase)
    layer.setup(make_blobs(rand(2, 3)), [top64()])
    assert layer.use_global_stats is expected


def test_batchnorm_forces_zero_learning_rate():
    layer = layer_from('type: "BatchNorm" param { lr_mult: 0 }')
    layer.setup(make_blobs(rand(2, 3, 2)), [top64()])
    assert [p.lr_mult for p in layer.layer_param.param] == [0, 0, 0]
    assert [b.shape for b in layer.blobs] == [(3,), (3,), (1,)]
    assert all(np.all(b.data == 0) for b in layer.blobs)
    with pytest.raises(LayerError, match="lr_mult"):
        layer_from('type: "BatchNorm" param { lr_mult: 0 } param { lr_mult: 1 }').setup(
            make_blobs(rand(2, 3)), [top64()])


@pytest.mark.parametrize("shape", [(3, 2, 2, 3), (5, 3), (6,)])
def test_batchnorm_gradient(shape):
    check_gradient(layer_from('type: "BatchNorm"'), make_blobs(rand(*shape, seed=6)), [top64()])


def test_batchnorm_global_stats_gradient():
    layer = layer_from('type: "BatchNorm" batch_norm_param { use_global_stats: true }')
    bottoms = make_blobs(rand(2, 3, 2, 2))
    top = top64()
    layer.setup(bottoms, [top])
    layer.blobs[0].data[...] = [0.1, 0.2, -0.3]
    layer.blobs[1].data[...] = [1.0, 2.0, 0.5]
    layer.blobs[2].data[...] = 1.0
    check_gradient(layer, bottoms, [top], check_params=False, setup=False)


@pytest.mark.parametrize("phase", [TRAIN, TEST])
def test_batchnorm_in_place_and_float32(phase):
    x = rand(3, 2, 4, seed=7)
    _, _, y = run(layer_from('type: "BatchNorm"', phase), [x])
    b, _, y_in = run(layer_from('type: "BatchNorm"', phase), [x], in_place=True)
    b2, _, _ = run(layer_from('type: "BatchNorm"', phase), [x])
    np.testing.assert_allclose(y_in, y)
    np.testing.assert_allclose(b[0].diff, b2[0].diff)
    layer = layer_from('type: "BatchNorm"', phase)
    bottoms, top, _ = run(layer, [x], dtype=np.float32)
    assert top.data.dtype == np.float32 and bottoms[0].diff.dtype == np.float32
    assert all(blob.dtype == np.float32 for blob in layer.blobs)


def test_batchnorm_bad_shapes():
    layer = layer_from('type: "BatchNorm"')
    bottoms, top = make_blobs(rand(2, 3)), top64()
    layer.setup(bottoms, [top])
    bottoms[0].reshape(2, 4)
    with pytest.raises(LayerError, match="channels"):
        layer.reshape(bottoms, [top])
    param = text_format.Parse('name: "bn" type: "BatchNorm"', caffe_pb2.LayerParameter())
    for shape in [(4,), (4,), (1,)]:
        param.blobs.add().CopyFrom(Blob(shape).to_proto())
    with pytest.raises(LayerError, match="loaded statistics"):
        create_layer(param).setup(make_blobs(rand(2, 3)), [top64()])


# -- MVN -----------------------------------------------------------------------------------------
def reference_mvn(x, normalize_variance=True, across_channels=False, eps=1e-9):
    x4 = x.reshape(x.shape + (1,) * (4 - x.ndim))
    y = np.empty_like(x4)
    groups = [(n, slice(None)) for n in range(x4.shape[0])] if across_channels else \
        [(n, c) for n in range(x4.shape[0]) for c in range(x4.shape[1])]
    for n, c in groups:
        values = x4[n, c]
        centered = values - values.mean()
        if normalize_variance:
            centered = centered / (np.sqrt((centered ** 2).mean()) + eps)
        y[n, c] = centered
    return y


MVN_CASES = [("", True, False), ("normalize_variance: false", False, False),
             ("across_channels: true", True, True),
             ("across_channels: true normalize_variance: false", False, True)]


@pytest.mark.parametrize("case", MVN_CASES, ids=[c[0] or "defaults" for c in MVN_CASES])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 4)])
def test_mvn_forward_gradient_in_place(case, shape):
    text, normalize, across = case
    make = lambda: layer_from(f'type: "MVN" mvn_param {{ {text} }}')  # noqa: E731
    x = rand(*shape, seed=8) * 2 + 0.5
    b, top, y = run(make(), [x])
    assert top.shape == shape + (1,) * (4 - len(shape))
    np.testing.assert_allclose(y, reference_mvn(x, normalize, across), rtol=1e-10, atol=1e-12)
    b_in, _, y_in = run(make(), [x], in_place=True)
    np.testing.assert_allclose(y_in, y)
    np.testing.assert_allclose(b_in[0].diff, b[0].diff.reshape(b_in[0].shape))
    small = rand(*((2, 2, 3, 2) if len(shape) == 4 else (2, 5)), seed=9)
    check_gradient(make(), make_blobs(small), [top64()])


def test_mvn_float32_and_bad_shape():
    bottoms, top, _ = run(layer_from('type: "MVN"'), [rand(2, 3, 4)], dtype=np.float32)
    assert top.data.dtype == np.float32 and bottoms[0].diff.dtype == np.float32
    with pytest.raises(LayerError, match="up to 4 axes"):
        run(layer_from('type: "MVN"'), [rand(1, 2, 2, 2, 2)])


# -- Scale and Bias ------------------------------------------------------------------------------
def broadcast_like(x, operand, axis):
    """operand shaped to broadcast against x from `axis` (a slow but obvious reference)."""
    if operand.ndim == 0:
        return operand
    axis = axis % x.ndim
    return operand.reshape((1,) * axis + operand.shape + (1,) * (x.ndim - axis - operand.ndim))


AFFINE_CASES = [
    # (params text, x shape, operand shape, axis used for broadcasting)
    ("", (2, 3, 4, 5), (3,), 1),
    ("axis: 0 num_axes: -1", (2, 3, 4), (2, 3, 4), 0),
    ("axis: 1 num_axes: 2", (2, 3, 4, 5), (3, 4), 1),
    ("num_axes: 0", (2, 3, 4), (), 0),
    ("axis: -1", (2, 3, 4), (4,), -1),
    ("axis: 0", (3, 2, 2), (3,), 0),
]


@pytest.mark.parametrize("kind", ["Scale", "Bias"])
@pytest.mark.parametrize("case", AFFINE_CASES, ids=[c[0] or "defaults" for c in AFFINE_CASES])
def test_affine_learned_operand(kind, case):
    text, xshape, oshape, axis = case
    field = kind.lower() + "_param"
    full = f'type: "{kind}" {field} {{ {text} filler {{ type: "uniform" min: -1 max: 1 }} }}'
    x = rand(*xshape, seed=10)
    layer = layer_from(full)
    _, top, y = run(layer, [x])
    operand = layer.blobs[0].data
    assert operand.shape == oshape
    op = broadcast_like(x, operand, axis)
    np.testing.assert_allclose(y, x * op if kind == "Scale" else x + op)
    # The parameter gradient accumulates.
    first = layer.blobs[0].diff.copy()
    layer.backward([top], [True], make_blobs(x))
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * first)
    small = rand(*[min(d, 3) for d in xshape], seed=11)
    if oshape and small.shape[axis % len(xshape): axis % len(xshape) + len(oshape)] != oshape:
        small = x
    check_gradient(layer_from(full), make_blobs(small), [top64()])


@pytest.mark.parametrize("kind", ["Scale", "Bias"])
@pytest.mark.parametrize("case", AFFINE_CASES, ids=[c[0] or "defaults" for c in AFFINE_CASES])
def test_affine_second_bottom(kind, case):
    text, xshape, oshape, axis = case
    field = kind.lower() + "_param"
    x, operand = rand(*xshape, seed=12), rand(*oshape, seed=13)
    layer = layer_from(f'type: "{kind}" {field} {{ {text} }}')
    bottoms, top, y = run(layer, [x, operand])
    assert layer.blobs == []
    op = broadcast_like(x, operand, axis)
    np.testing.assert_allclose(y, x * op if kind == "Scale" else x + op)
    check_gradient(layer_from(f'type: "{kind}" {field} {{ {text} }}'), make_blobs(x, operand), [top64()])


def test_scale_defaults_and_bias_term():
    x = rand(2, 3, 2, seed=14)
    layer = layer_from('type: "Scale" scale_param { bias_term: true }')
    _, _, y = run(layer, [x])
    assert [b.shape for b in layer.blobs] == [(3,), (3,)]
    np.testing.assert_array_equal(layer.blobs[0].data, 1)
    np.testing.assert_array_equal(layer.blobs[1].data, 0)
    np.testing.assert_allclose(y, x)
    text = ('type: "Scale" scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 2 } '
            'bias_filler { type: "uniform" min: -1 max: 1 } }')
    layer = layer_from(text)
    _, _, y = run(layer, [x])
    s, b = layer.blobs[0].data[None, :, None], layer.blobs[1].data[None, :, None]
    np.testing.assert_allclose(y, x * s + b)
    check_gradient(layer_from(text), make_blobs(x), [top64()])
    # With the scale as bottom[1], the bias is the only blob and spans bottom[1]'s axes.
    layer = layer_from('type: "Scale" scale_param { axis: 0 bias_term: true bias_filler { value: 0.5 } }')
    _, _, y = run(layer, [x, rand(2, 3, seed=15)])
    assert [b.shape for b in layer.blobs] == [(2, 3)]
    np.testing.assert_allclose(y, x * rand(2, 3, seed=15)[:, :, None] + 0.5)
    check_gradient(layer_from('type: "Scale" scale_param { axis: 0 bias_term: true }'),
                   make_blobs(x, rand(2, 3, seed=15)), [top64()])


@pytest.mark.parametrize("text", [
    'type: "Scale" scale_param { bias_term: true filler { type: "uniform" } bias_filler { type: "uniform" } }',
    'type: "Bias" bias_param { filler { type: "uniform" } }',
    'type: "Scale" scale_param { axis: 0 num_axes: -1 filler { type: "uniform" } }',
])
def test_affine_in_place_matches(text):
    x = rand(2, 3, 4, seed=16)
    b, _, y = run(layer_from(text), [x])
    layer = layer_from(text)
    b_in, _, y_in = run(layer, [x], in_place=True)
    ref_layer = layer_from(text)
    run(ref_layer, [x])
    np.testing.assert_allclose(y_in, y)
    np.testing.assert_allclose(b_in[0].diff, b[0].diff)
    for p_in, p in zip(layer.blobs, ref_layer.blobs):
        np.testing.assert_allclose(p_in.diff, p.diff)


@pytest.mark.parametrize("kind", ["Scale", "Bias"])
def test_affine_float32_and_propagate_down(kind):
    field = kind.lower() + "_param"
    layer = layer_from(f'type: "{kind}" {field} {{ bias_term: true }}' if kind == "Scale"
                       else f'type: "{kind}"')
    bottoms, top, _ = run(layer, [rand(2, 3, 4)], dtype=np.float32)
    assert top.data.dtype == np.float32 and bottoms[0].diff.dtype == np.float32
    assert all(b.dtype == np.float32 and b.diff.dtype == np.float32 for b in layer.blobs)
    # Only the asked-for gradients are written.
    layer.param_propagate_down = [False] * len(layer.blobs)
    for b in layer.blobs:
        b.diff[...] = 0
    bottoms[0].diff[...] = 5
    layer.backward([top], [False], bottoms)
    assert np.all(bottoms[0].diff == 5) and all(np.all(b.diff == 0) for b in layer.blobs)


@pytest.mark.parametrize("kind", ["Scale", "Bias"])
@pytest.mark.parametrize("text, arrays, message", [
    ("num_axes: -2", [(2, 3)], "num_axes"),
    ("axis: 1 num_axes: 3", [(2, 3, 4)], "extends past"),
    ("axis: 3", [(2, 3, 4)], "out of range"),
    ("", [(2, 3, 4), (4,)], "dimension mismatch"),
    ("axis: 1", [(2, 3), (3, 2)], "extends past"),
])
def test_affine_bad_params(kind, text, arrays, message):
    field = kind.lower() + "_param"
    with pytest.raises(LayerError, match=message):
        run(layer_from(f'type: "{kind}" {field} {{ {text} }}'), [rand(*s) for s in arrays])


def test_affine_blob_counts():
    with pytest.raises(LayerError):
        run(layer_from('type: "Scale"'), [rand(2, 3), rand(3), rand(3)])


# -- in a Net --------------------------------------------------------------------------------------
NET = '''
force_backward: true
layer { name: "in" type: "Input" top: "data" top: "target"
        input_param { shape { dim: 2 dim: 3 dim: 5 dim: 5 } shape { dim: 2 dim: 3 dim: 3 dim: 3 } } }
layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" }
layer { name: "sc" type: "Scale" bottom: "bn" top: "bn"
        scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 1.5 }
                      bias_filler { type: "uniform" min: -0.2 max: 0.2 } } }
layer { name: "prelu" type: "PReLU" bottom: "bn" top: "bn" }
layer { name: "lrn" type: "LRN" bottom: "bn" top: "norm" lrn_param { local_size: 3 } }
layer { name: "pool" type: "Pooling" bottom: "norm" top: "pool"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "elu" type: "ELU" bottom: "pool" top: "pool" }
layer { name: "mvn" type: "MVN" bottom: "pool" top: "mvn" }
layer { name: "loss" type: "EuclideanLoss" bottom: "mvn" bottom: "target" top: "loss" }
'''


def test_in_place_chain_in_a_net():
    """BatchNorm, then Scale/PReLU in place, pooling and friends: the whole net's gradient checks,
    and BatchNorm's statistics are registered with lr_mult 0 (not learned)."""
    from minicaffe.net import Net
    from minicaffe.testing import check_gradient_net
    set_random_seed(1)
    net = Net(text_format.Parse(NET, caffe_pb2.NetParameter()), TRAIN, dtype=F64)
    assert net.params_lr[:3] == [0, 0, 0] and net.params_lr[3:] == [1, 1, 1]
    rng = np.random.default_rng(0)
    net.blobs["data"].data[...] = rng.normal(size=(2, 3, 5, 5))
    net.blobs["target"].data[...] = rng.normal(size=(2, 3, 3, 3))
    # A small step keeps max pooling's argmax and PReLU's sign fixed while nudging.
    check_gradient_net(net, blob_names=["data"], stepsize=1e-5, threshold=1e-3)
