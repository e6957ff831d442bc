"""Neuron layers: forward against scalar formulas, numeric gradients, in-place runs, dtypes, bad params."""
import math

import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe import Blob, LayerError, create_layer, set_random_seed
from minicaffe.proto import caffe_pb2
from tests.gradient_check import check_gradient, make_blobs

SHAPES = [(2, 3, 4, 5), (3, 7), (1, 2, 3)]


def layer_from(text, phase=caffe_pb2.TRAIN):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    param.name = param.name or "neuron"
    return create_layer(param, phase)


def away_from(x, kinks, margin=0.05):
    """Nudge values off non-differentiable points so finite differences stay on one side."""
    x = x.copy()
    for k in kinks:
        close = np.abs(x - k) < margin
        x[close] = k + np.where(x[close] >= k, margin, -margin) * 2
    return x


def random_input(shape, low=-2.0, high=2.0, kinks=(), seed=0):
    x = np.random.default_rng(seed).uniform(low, high, shape)
    return away_from(x, kinks)


def run(text, x, in_place=False, phase=caffe_pb2.TRAIN, dtype=np.float64, seed=5):
    """Forward then backward with a fixed random top diff; returns (y, dx, param diffs, layer)."""
    set_random_seed(seed)
    layer = layer_from(text, phase)
    bottom = Blob(x.shape, dtype=dtype)
    bottom.data[...] = x
    top = bottom if in_place else Blob((), dtype=dtype)
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    y = top.data.copy()
    top.diff[...] = np.random.default_rng(1).uniform(-1, 1, x.shape)
    for b in layer.blobs:
        b.diff[...] = 0
    layer.backward([top], [True], [bottom])
    return y, bottom.diff.copy(), [b.diff.copy() for b in layer.blobs], layer


# (prototxt, scalar reference f(x), input range, kinks)
CASES = {
    "relu": ('type: "ReLU"', lambda x: max(x, 0.0), (-2, 2), [0.0]),
    "leaky_relu": ('type: "ReLU" relu_param { negative_slope: 0.1 }',
                   lambda x: x if x > 0 else 0.1 * x, (-2, 2), [0.0]),
    "relu_negative_slope": ('type: "ReLU" relu_param { negative_slope: -0.5 }',
                            lambda x: x if x > 0 else -0.5 * x, (-2, 2), [0.0]),
    "sigmoid": ('type: "Sigmoid"', lambda x: 1 / (1 + math.exp(-x)), (-4, 4), []),
    "tanh": ('type: "TanH"', math.tanh, (-3, 3), []),
    "elu": ('type: "ELU" elu_param { alpha: 0.5 }',
            lambda x: x if x > 0 else 0.5 * (math.exp(x) - 1), (-2, 2), [0.0]),
    "elu_negative_alpha": ('type: "ELU" elu_param { alpha: -0.7 }',
                           lambda x: x if x > 0 else -0.7 * (math.exp(x) - 1), (-2, 2), [0.0]),
    "absval": ('type: "AbsVal"', abs, (-2, 2), [0.0]),
    "power": ('type: "Power" power_param { power: 0.37 scale: 0.83 shift: 2.4 }',
              lambda x: (2.4 + 0.83 * x) ** 0.37, (-2, 2), []),
    "power_square": ('type: "Power" power_param { power: 2 scale: 0.5 shift: -1 }',
                     lambda x: (-1 + 0.5 * x) ** 2, (-2, 2), []),
    "power_no_shift": ('type: "Power" power_param { power: 3 scale: 1.5 }',
                       lambda x: (1.5 * x) ** 3, (-1, 1), []),
    "power_linear": ('type: "Power" power_param { scale: 0.83 shift: -2.4 }',
                     lambda x: 0.83 * x - 2.4, (-2, 2), []),
    "power_zero": ('type: "Power" power_param { power: 0 scale: 0.83 shift: 2.4 }',
                   lambda x: 1.0, (-2, 2), []),
    "power_zero_scale": ('type: "Power" power_param { power: 2 scale: 0 shift: 3 }',
                         lambda x: 9.0, (-2, 2), []),
    "exp": ('type: "Exp"', math.exp, (-2, 2), []),
    "exp_base2": ('type: "Exp" exp_param { base: 2 scale: 0.5 shift: 1 }',
                  lambda x: 2 ** (1 + 0.5 * x), (-2, 2), []),
    "log": ('type: "Log"', math.log, (0.2, 3), []),
    "log_base2": ('type: "Log" log_param { base: 2 scale: 0.5 shift: 1.5 }',
                  lambda x: math.log(1.5 + 0.5 * x, 2), (-2, 3), []),
    "bnll": ('type: "BNLL"', lambda x: math.log1p(math.exp(x)), (-4, 4), []),
    "clip": ('type: "Clip" clip_param { min: -0.5 max: 0.8 }',
             lambda x: max(-0.5, min(x, 0.8)), (-2, 2), [-0.5, 0.8]),
    "swish": ('type: "Swish"', lambda x: x / (1 + math.exp(-x)), (-3, 3), []),
    "swish_beta": ('type: "Swish" swish_param { beta: 1.7 }',
                   lambda x: x / (1 + math.exp(-1.7 * x)), (-3, 3), []),
    "prelu": ('type: "PReLU"', lambda x: x if x > 0 else 0.25 * x, (-2, 2), [0.0]),
    "prelu_shared": ('type: "PReLU" prelu_param { channel_shared: true }',
                     lambda x: x if x > 0 else 0.25 * x, (-2, 2), [0.0]),
    "dropout_test": ('type: "Dropout"', lambda x: x, (-2, 2), []),
}
ALLOWS_IN_PLACE = set(CASES) - {"absval"}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_formula(name, shape):
    text, f, (low, high), kinks = CASES[name]
    x = random_input(shape, low, high, kinks)
    y, _, _, _ = run(text, x, phase=caffe_pb2.TEST)
    expected = np.vectorize(f, otypes=[float])(x)
    # Layer parameters are float32 in caffe.proto, so 0.8 arrives as 0.800000011920929.
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradient(name):
    text, _, (low, high), kinks = CASES[name]
    x = random_input((2, 3, 2, 2), low, high, kinks, seed=3)
    layer = layer_from(text, caffe_pb2.TEST if name == "dropout_test" else caffe_pb2.TRAIN)
    bottom = make_blobs(x)
    check_gradient(layer, bottom, [Blob(dtype=np.float64)])


@pytest.mark.parametrize("name", sorted(ALLOWS_IN_PLACE))
def test_in_place_matches_separate_top(name):
    text, _, (low, high), kinks = CASES[name]
    x = random_input((2, 3, 3, 2), low, high, kinks, seed=4)
    y, dx, dparams, layer = run(text, x)
    assert layer.allows_in_place
    y_in, dx_in, dparams_in, _ = run(text, x, in_place=True)
    np.testing.assert_allclose(y_in, y, rtol=1e-12, atol=0)
    np.testing.assert_allclose(dx_in, dx, rtol=1e-12, atol=0)
    for a, b in zip(dparams_in, dparams):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", sorted(CASES) + ["dropout_train", "threshold"])
def test_float32_stays_float32(name):
    if name == "dropout_train":
        text, low, high, kinks = 'type: "Dropout"', -1, 1, []
    elif name == "threshold":
        text, low, high, kinks = 'type: "Threshold" threshold_param { threshold: 0.3 }', -1, 1, []
    else:
        text, _, (low, high), kinks = CASES[name]
    x = random_input((2, 3, 4), low, high, kinks).astype(np.float32)
    set_random_seed(5)
    layer = layer_from(text)
    bottom, top = Blob(x.shape), Blob()
    bottom.data[...] = x
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    assert top.dtype == np.float32 and top.data.dtype == np.float32
    assert all(b.dtype == np.float32 for b in layer.blobs)
    if name != "threshold":
        top.diff[...] = 1
        layer.backward([top], [True], [bottom])
        assert bottom.diff.dtype == np.float32
        y64, dx64, _, _ = run(text, x.astype(np.float64))
        np.testing.assert_allclose(top.data, y64, rtol=1e-5, atol=1e-5)


def test_relu_default_slope_zero_and_kink_gradient():
    x = np.array([[-1.0, 0.0, 2.0]])
    y, dx, _, _ = run('type: "ReLU" relu_param { negative_slope: 0.2 }', x)
    np.testing.assert_allclose(y, [[-0.2, 0.0, 2.0]])
    top_diff = np.random.default_rng(1).uniform(-1, 1, x.shape)
    # Caffe: x = 0 takes the negative side.
    np.testing.assert_allclose(dx, top_diff * [[0.2, 0.2, 1.0]])


def test_backward_respects_propagate_down():
    layer = layer_from('type: "Sigmoid"')
    bottom, top = make_blobs(np.ones((2, 3)))[0], Blob()
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    bottom.diff[...] = 7
    layer.backward([top], [False], [bottom])
    assert np.all(bottom.diff == 7)


# -- PReLU -----------------------------------------------------------------------
def test_prelu_per_channel_slopes_and_param_gradient():
    text = 'type: "PReLU" prelu_param { filler { type: "uniform" min: 0.1 max: 0.9 } }'
    x = random_input((2, 3, 2, 2), kinks=[0.0], seed=8)
    y, dx, (dslope,), layer = run(text, x)
    a = layer.blobs[0].data
    assert a.shape == (3,) and np.all((a >= 0.1) & (a <= 0.9))
    expected = np.where(x > 0, x, a[None, :, None, None] * x)
    np.testing.assert_allclose(y, expected)
    top_diff = np.random.default_rng(1).uniform(-1, 1, x.shape)
    np.testing.assert_allclose(dslope, (top_diff * x * (x <= 0)).sum(axis=(0, 2, 3)))
    check_gradient(layer_from(text), make_blobs(x), [Blob(dtype=np.float64)])


def test_prelu_shared_slope_is_scalar_and_accumulates():
    text = 'type: "PReLU" prelu_param { channel_shared: true }'
    x = random_input((2, 3, 2), kinks=[0.0], seed=9)
    layer = layer_from(text)
    bottom, top = make_blobs(x)[0], Blob()
    layer.setup([bottom], [top])
    assert layer.blobs[0].shape == () and layer.blobs[0].data == 0.25
    layer.forward([bottom], [top])
    top.diff[...] = 1
    layer.blobs[0].diff[...] = 1.5
    layer.backward([top], [True], [bottom])
    np.testing.assert_allclose(layer.blobs[0].diff, 1.5 + x[x <= 0].sum())


def test_prelu_skips_param_gradient_when_told():
    layer = layer_from('type: "PReLU"')
    bottom, top = make_blobs(-np.ones((2, 3)))[0], Blob()
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    top.diff[...] = 1
    layer.param_propagate_down = [False]
    layer.backward([top], [True], [bottom])
    assert np.all(layer.blobs[0].diff == 0)


def test_prelu_bad_inputs():
    with pytest.raises(LayerError, match="at least 2 axes"):
        layer_from('type: "PReLU"').setup(make_blobs(np.ones(4)), [Blob(dtype=np.float64)])
    param = text_format.Parse('name: "p" type: "PReLU"', caffe_pb2.LayerParameter())
    param.blobs.add().CopyFrom(Blob((2,)).to_proto())
    with pytest.raises(LayerError, match="slope blob holds 2 values"):
        create_layer(param).setup(make_blobs(np.ones((2, 3))), [Blob(dtype=np.float64)])


# -- Dropout ---------------------------------------------------------------------
def test_dropout_train_mask_and_scale():
    x = np.random.default_rng(0).uniform(0.5, 1.5, (40, 50))
    y, dx, _, _ = run('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', x, seed=11)
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / 0.7)
    assert abs(kept.mean() - 0.7) < 0.03
    top_diff = np.random.default_rng(1).uniform(-1, 1, x.shape)
    np.testing.assert_allclose(dx, top_diff * kept / 0.7)
    # The mask comes from minicaffe.rng: the same seed gives the same mask.
    y2, _, _, _ = run('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', x, seed=11)
    np.testing.assert_array_equal(y, y2)
    y3, _, _, _ = run('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', x, seed=12)
    assert np.any(y3 != y)


def test_dropout_train_gradient_and_in_place():
    text = 'type: "Dropout" dropout_param { dropout_ratio: 0.4 }'
    check_gradient(layer_from(text), make_blobs(random_input((3, 4))), [Blob(dtype=np.float64)])
    x = random_input((3, 4, 5))
    y, dx, _, _ = run(text, x)
    y_in, dx_in, _, _ = run(text, x, in_place=True)
    np.testing.assert_array_equal(y_in, y)
    np.testing.assert_array_equal(dx_in, dx)


def test_dropout_test_phase_is_identity():
    x = random_input((3, 4))
    y, dx, _, _ = run('type: "Dropout" dropout_param { dropout_ratio: 0.9 }', x, phase=caffe_pb2.TEST)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(dx, np.random.default_rng(1).uniform(-1, 1, x.shape))


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_dropout_bad_ratio(ratio):
    with pytest.raises(LayerError, match="dropout_ratio"):
        layer_from(f'type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}').setup(
            make_blobs(np.ones(3)), [Blob(dtype=np.float64)])


# -- Threshold -------------------------------------------------------------------
def test_threshold_forward_and_no_backward():
    x = np.array([[-1.0, 0.3, 0.30001, 2.0]])
    for in_place in (False, True):
        layer = layer_from('type: "Threshold" threshold_param { threshold: 0.3 }')
        bottom = make_blobs(x)[0]
        top = bottom if in_place else Blob()
        layer.setup([bottom], [top])
        layer.forward([bottom], [top])
        np.testing.assert_array_equal(top.data, [[0, 0, 1, 1]])
        layer.backward([top], [False], [bottom])
        with pytest.raises(NotImplementedError):
            layer.backward([top], [True], [bottom])


# -- bad parameters ---------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ('type: "Exp" exp_param { base: -2 }', "strictly positive"),
    ('type: "Exp" exp_param { base: 0 }', "strictly positive"),
    ('type: "Log" log_param { base: -3 }', "strictly positive"),
    ('type: "Log" log_param { base: 1 }', "infinite"),
    ('type: "Clip"', "clip_param"),
    ('type: "Clip" clip_param { min: 0 }', "clip_param"),
])
def test_bad_params_are_refused(text, message):
    with pytest.raises(LayerError, match=message):
        layer_from(text).setup(make_blobs(np.ones((2, 2))), [Blob(dtype=np.float64)])


def test_absval_refuses_in_place():
    layer = layer_from('type: "AbsVal"')
    assert not layer.allows_in_place
    blob = make_blobs(np.ones((2, 2)))[0]
    with pytest.raises(LayerError, match="in-place"):
        layer.setup([blob], [blob])


def test_wrong_blob_counts_are_refused():
    with pytest.raises(LayerError):
        layer_from('type: "ReLU"').setup(make_blobs(np.ones(2), np.ones(2)), [Blob(dtype=np.float64)])


def test_exp_log_round_trip_and_base_e():
    x = random_input((4, 5), 0.1, 2)
    y, _, _, _ = run('type: "Log" log_param { base: 3 scale: 2 shift: 0.5 }', x)
    z, _, _, _ = run('type: "Exp" exp_param { base: 3 }', y)
    np.testing.assert_allclose(z, 2 * x + 0.5)
