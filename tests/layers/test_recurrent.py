"""Recurrent layers (LSTMUnit, RNN, LSTM): loop references, numeric gradients, state carry, nets."""
import logging
import math

import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe import Blob, LayerError, create_layer, set_random_seed
from minicaffe.net import Net
from minicaffe.proto import caffe_pb2
from minicaffe.testing import check_gradient_net
from tests.gradient_check import check_gradient, make_blobs

T, N, D = 3, 2, 3


def layer_from(text, name="rec"):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    param.name = name
    return create_layer(param)


def recurrent_text(kind, num_output=D, expose=False, debug=False):
    return (f'type: "{kind}" recurrent_param {{ num_output: {num_output} '
            f'weight_filler {{ type: "gaussian" std: 0.5 }} '
            f'bias_filler {{ type: "gaussian" std: 0.5 }} '
            f'expose_hidden: {str(expose).lower()} debug_info: {str(debug).lower()} }}')


def sig(v):
    return 1.0 / (1.0 + math.exp(-v))


# -- slow references: one stream, one timestep, one unit at a time -------------------
def ref_lstm_unit(c_prev, x, cont):
    """c, h for LSTMUnit inputs (1, N, D), (1, N, 4D), (1, N) with scalar loops."""
    _, n_streams, dim = c_prev.shape
    c = np.zeros(c_prev.shape)
    h = np.zeros(c_prev.shape)
    for n in range(n_streams):
        for d in range(dim):
            i = sig(x[0, n, d])
            f = 0.0 if cont[0, n] == 0 else cont[0, n] * sig(x[0, n, dim + d])
            o = sig(x[0, n, 2 * dim + d])
            g = math.tanh(x[0, n, 3 * dim + d])
            c[0, n, d] = f * c_prev[0, n, d] + i * g
            h[0, n, d] = o * math.tanh(c[0, n, d])
    return c, h


def ref_lstm(x, cont, W_xc, b_c, W_hc, xs=None, W_s=None, h0=None, c0=None):
    steps, streams = cont.shape
    dim = W_hc.shape[1]
    out = np.zeros((steps, streams, dim))
    hT, cT = np.zeros((streams, dim)), np.zeros((streams, dim))
    for n in range(streams):
        h = np.zeros(dim) if h0 is None else h0.reshape(streams, dim)[n].copy()
        c = np.zeros(dim) if c0 is None else c0.reshape(streams, dim)[n].copy()
        for t in range(steps):
            gates = W_xc @ x[t, n].ravel() + b_c + W_hc @ (cont[t, n] * h)
            if xs is not None:
                gates = gates + W_s @ xs[n].ravel()
            c_new, h_new = ref_lstm_unit(c.reshape(1, 1, dim), gates.reshape(1, 1, 4 * dim),
                                         np.array([[cont[t, n]]]))
            c, h = c_new.ravel(), h_new.ravel()
            out[t, n] = h
        hT[n], cT[n] = h, c
    return out, hT, cT


def ref_rnn(x, cont, W_xh, b_h, W_hh, W_ho, b_o, xs=None, W_s=None, h0=None):
    steps, streams = cont.shape
    dim = W_hh.shape[0]
    out = np.zeros((steps, streams, dim))
    hT = np.zeros((streams, dim))
    for n in range(streams):
        h = np.zeros(dim) if h0 is None else h0.reshape(streams, dim)[n].copy()
        for t in range(steps):
            a = W_xh @ x[t, n].ravel() + b_h + W_hh @ (cont[t, n] * h)
            if xs is not None:
                a = a + W_s @ xs[n].ravel()
            h = np.tanh(a)
            out[t, n] = np.tanh(W_ho @ h + b_o)
        hT[n] = h
    return out, hT


def ref_forward(kind, layer, x, cont, xs=None, h0=None, c0=None):
    w = {name: b.data for name, b in zip(layer.param_names, layer.blobs)}
    if kind == "LSTM":
        return ref_lstm(x, cont, w["W_xc"], w["b_c"], w["W_hc"], xs, w.get("W_xc_static"), h0, c0)
    return ref_rnn(x, cont, w["W_xh"], w["b_h"], w["W_hh"], w["W_ho"], w["b_o"], xs,
                   w.get("W_xh_static"), h0)


def sequence_inputs(steps=T, streams=N, feature_shape=(2,), static_shape=None, seed=0,
                    cont=None):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (steps, streams) + feature_shape)
    if cont is None:
        # Every stream starts a sequence at t = 0, and stream 0 restarts at t = 2.
        cont = np.ones((steps, streams))
        cont[0] = 0
        if steps > 2:
            cont[2, 0] = 0
    arrays = [x, cont]
    if static_shape is not None:
        arrays.append(rng.uniform(-1, 1, (streams,) + static_shape))
    return arrays


def build(kind, arrays, expose=False, dtype=np.float64, num_output=D, seed=3, debug=False,
          states=None):
    """Set up a layer on blobs made from arrays (+ initial states when exposed)."""
    set_random_seed(seed)
    layer = layer_from(recurrent_text(kind, num_output, expose, debug))
    streams = arrays[0].shape[1]
    arrays = list(arrays)
    n_states = 2 if kind == "LSTM" else 1
    if expose:
        if states is None:
            rng = np.random.default_rng(seed + 10)
            states = [rng.uniform(-1, 1, (1, streams, num_output)) for _ in range(n_states)]
        arrays += list(states)
    bottom = make_blobs(*arrays, dtype=dtype)
    top = [Blob((), dtype=dtype) for _ in range(1 + (n_states if expose else 0))]
    layer.setup(bottom, top)
    return layer, bottom, top


# -- LSTMUnit --------------------------------------------------------------------------
def unit_inputs(streams, dim, cont, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, (1, streams, dim)), rng.uniform(-2, 2, (1, streams, 4 * dim)),
            np.asarray(cont, dtype=float).reshape(1, streams)]


@pytest.mark.parametrize("streams,dim,cont", [(1, 1, [1]), (3, 2, [1, 0, 1]), (4, 5, [0, 0, 1, 2])])
def test_lstm_unit_forward_matches_reference(streams, dim, cont):
    layer = layer_from('type: "LSTMUnit"')
    arrays = unit_inputs(streams, dim, cont)
    bottom = make_blobs(*arrays)
    top = [Blob((), np.float64), Blob((), np.float64)]
    layer.setup(bottom, top)
    layer.forward(bottom, top)
    c, h = ref_lstm_unit(*arrays)
    np.testing.assert_allclose(top[0].data, c, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(top[1].data, h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cont", [[0, 0, 0], [1, 0, 1]])
def test_lstm_unit_gradient(cont):
    layer = layer_from('type: "LSTMUnit"')
    bottom = make_blobs(*unit_inputs(3, 2, cont, seed=1))
    check_gradient(layer, bottom, [Blob((), np.float64), Blob((), np.float64)], check_bottom=[0, 1])


def test_lstm_unit_backward_single_bottom_and_float32():
    arrays = unit_inputs(3, 2, [1, 0, 1], seed=2)
    layer = layer_from('type: "LSTMUnit"')
    bottom = make_blobs(*arrays)
    top = [Blob((), np.float64), Blob((), np.float64)]
    layer.setup(bottom, top)
    layer.forward(bottom, top)
    rng = np.random.default_rng(0)
    top[0].diff[...] = rng.uniform(-1, 1, top[0].shape)
    top[1].diff[...] = rng.uniform(-1, 1, top[1].shape)
    layer.backward(top, [True, True, False], bottom)
    both = [bottom[0].diff.copy(), bottom[1].diff.copy()]
    for b in bottom:
        b.diff[...] = 7.0
    layer.backward(top, [False, True, False], bottom)
    np.testing.assert_array_equal(bottom[1].diff, both[1])
    assert np.all(bottom[0].diff == 7.0)
    layer.backward(top, [True, False, False], bottom)
    np.testing.assert_array_equal(bottom[0].diff, both[0])

    layer32 = layer_from('type: "LSTMUnit"')
    bottom32 = make_blobs(*arrays, dtype=np.float32)
    top32 = [Blob(), Blob()]
    layer32.setup(bottom32, top32)
    layer32.forward(bottom32, top32)
    top32[0].diff[...] = top[0].diff
    top32[1].diff[...] = top[1].diff
    layer32.backward(top32, [True, True, False], bottom32)
    for blob in top32 + bottom32:
        assert blob.data.dtype == np.float32 and blob.diff.dtype == np.float32
    np.testing.assert_allclose(top32[1].data, top[1].data, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bottom32[1].diff, both[1], rtol=1e-4, atol=1e-6)


def test_lstm_unit_rejects_bad_inputs():
    def setup(shapes, tops=2):
        layer = layer_from('type: "LSTMUnit"')
        layer.setup([Blob(s, np.float64) for s in shapes], [Blob() for _ in range(tops)])
        return layer

    setup([(1, 2, 3), (1, 2, 12), (1, 2)])
    with pytest.raises(LayerError, match="4 \\* 3"):
        setup([(1, 2, 3), (1, 2, 10), (1, 2)])
    with pytest.raises(LayerError, match="single timestep"):
        setup([(2, 2, 3), (2, 2, 12), (2, 2)])
    with pytest.raises(LayerError, match="streams"):
        setup([(1, 2, 3), (1, 3, 12), (1, 2)])
    with pytest.raises(LayerError, match="2 axes"):
        setup([(1, 2, 3), (1, 2, 12), (1, 2, 1)])
    with pytest.raises(LayerError, match="exactly 2 top"):
        setup([(1, 2, 3), (1, 2, 12), (1, 2)], tops=1)
    layer = setup([(1, 2, 3), (1, 2, 12), (1, 2)])
    assert not layer.allow_force_backward(2) and layer.allow_force_backward(1)
    with pytest.raises(LayerError, match="sequence indicators"):
        layer.backward([Blob((1, 2, 3)), Blob((1, 2, 3))], [True, True, True],
                       [Blob((1, 2, 3)), Blob((1, 2, 12)), Blob((1, 2))])


# -- RNN and LSTM forward ----------------------------------------------------------------
CONFIGS = {
    "plain": dict(),
    "image_features": dict(feature_shape=(2, 2)),
    "static": dict(static_shape=(2,)),
    "exposed": dict(expose=True),
    "exposed_static": dict(expose=True, static_shape=(3, 1)),
}


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_forward_matches_reference(kind, config):
    cfg = dict(CONFIGS[config])
    expose = cfg.pop("expose", False)
    arrays = sequence_inputs(steps=4, streams=3, **cfg)
    if expose:
        arrays[1][0] = [1, 0, 1]  # exposed state is used where cont[0] == 1
    layer, bottom, top = build(kind, arrays, expose=expose)
    layer.forward(bottom, top)
    xs = arrays[2] if "static_shape" in cfg else None
    states = [b.data for b in bottom[len(arrays):]]
    expected = ref_forward(kind, layer, arrays[0], arrays[1], xs, *states)
    np.testing.assert_allclose(top[0].data, expected[0], rtol=1e-10, atol=1e-12)
    if expose:
        for t, ref in zip(top[1:], expected[1:]):
            assert t.shape == (1, 3, D)
            np.testing.assert_allclose(t.data[0], ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind,expected", [
    ("LSTM", [("W_xc", (4 * D, 4)), ("b_c", (4 * D,)), ("W_hc", (4 * D, D))]),
    ("RNN", [("W_xh", (D, 4)), ("b_h", (D,)), ("W_hh", (D, D)), ("W_ho", (D, D)), ("b_o", (D,))]),
])
def test_param_order_and_shapes_follow_caffe(kind, expected):
    layer, _, _ = build(kind, sequence_inputs(feature_shape=(2, 2)))
    assert list(zip(layer.param_names, [b.shape for b in layer.blobs])) == expected
    static_name = "W_xc_static" if kind == "LSTM" else "W_xh_static"
    layer, _, _ = build(kind, sequence_inputs(static_shape=(5,)))
    assert layer.param_names[2] == static_name
    assert layer.blobs[2].shape == ((4 * D if kind == "LSTM" else D), 5)


def test_fillers_follow_recurrent_param():
    text = ('type: "LSTM" recurrent_param { num_output: 2 weight_filler { type: "constant" value: 0.25 } '
            'bias_filler { type: "constant" value: -1 } }')
    layer = layer_from(text)
    layer.setup(make_blobs(*sequence_inputs()), [Blob((), np.float64)])
    w_xc, b_c, w_hc = (b.data for b in layer.blobs)
    assert np.all(w_xc == 0.25) and np.all(w_hc == 0.25) and np.all(b_c == -1)
    # Unset fillers are Caffe's default constant 0.
    layer = layer_from('type: "RNN" recurrent_param { num_output: 2 }')
    layer.setup(make_blobs(*sequence_inputs()), [Blob((), np.float64)])
    assert all(np.all(b.data == 0) for b in layer.blobs)


# -- gradients ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
@pytest.mark.parametrize("config", ["plain", "static"])
def test_gradient(kind, config):
    cfg = dict(CONFIGS[config])
    layer, bottom, top = build(kind, sequence_inputs(seed=4, **cfg))
    check = [0, 2] if "static_shape" in cfg else [0]
    check_gradient(layer, bottom, top, check_bottom=check, setup=False)


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_gradient_with_exposed_hidden_state(kind):
    arrays = sequence_inputs(seed=5, static_shape=(2,))
    arrays[1][0] = [1, 0]
    layer, bottom, top = build(kind, arrays, expose=True)
    # Caffe passes no gradient through the exposed states, so the objective uses the
    # sequence output only and the inputs checked are x and x_static.
    check_gradient(layer, bottom, top, check_bottom=[0, 2], top_ids=[0], setup=False)


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_exposed_state_gradients_are_not_propagated(kind):
    arrays = sequence_inputs(seed=6)
    arrays[1][0] = 1
    layer, bottom, top = build(kind, arrays, expose=True)
    layer.forward(bottom, top)
    rng = np.random.default_rng(0)
    top[0].diff[...] = rng.uniform(-1, 1, top[0].shape)
    for t in top[1:]:
        t.diff[...] = 0
    for b in bottom:
        b.diff[...] = 5.0
    layer.backward(top, [True, False] + [True] * (len(bottom) - 2), bottom)
    dx = bottom[0].diff.copy()
    for b in bottom[2:]:
        assert np.all(b.diff == 0)
    for t in top[1:]:
        t.diff[...] = rng.uniform(-1, 1, t.shape)
    layer.backward(top, [True, False] + [True] * (len(bottom) - 2), bottom)
    np.testing.assert_array_equal(bottom[0].diff, dx)


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_reset_cuts_gradient_flow(kind):
    """With cont[t] == 0 for all streams, outputs from t on do not depend on x before t."""
    arrays = sequence_inputs(steps=4, seed=7)
    arrays[1][2] = 0
    layer, bottom, top = build(kind, arrays)
    layer.forward(bottom, top)
    top[0].diff[...] = 0
    top[0].diff[2:] = 1
    layer.backward(top, [True, False], bottom)
    assert np.all(bottom[0].diff[:2] == 0)
    assert np.all(bottom[0].diff[2:] != 0)


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_backward_honours_propagate_down(kind):
    layer, bottom, top = build(kind, sequence_inputs(seed=8))
    layer.forward(bottom, top)
    top[0].diff[...] = 1
    bottom[0].diff[...] = 3.0
    layer.param_propagate_down = [True] * len(layer.blobs)
    layer.param_propagate_down[0] = False
    for b in layer.blobs:
        b.diff[...] = 0
    layer.backward(top, [False, False], bottom)
    assert np.all(bottom[0].diff == 3.0)
    assert np.all(layer.blobs[0].diff == 0)
    assert all(np.any(b.diff != 0) for b in layer.blobs[1:])
    # Param diffs accumulate.
    before = [b.diff.copy() for b in layer.blobs]
    layer.backward(top, [False, False], bottom)
    for b, old in zip(layer.blobs[1:], before[1:]):
        np.testing.assert_allclose(b.diff, 2 * old)
    with pytest.raises(LayerError, match="sequence indicators"):
        layer.backward(top, [True, True], bottom)


# -- carried state ------------------------------------------------------------------------
def share_weights(dst, src):
    for a, b in zip(dst.blobs, src.blobs):
        a.data[...] = b.data


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_state_carries_over_between_batches(kind):
    """One pass over 6 steps equals two passes over 3 steps (cont = 1 at the seam)."""
    x, cont, xs = sequence_inputs(steps=6, streams=2, static_shape=(2,), seed=9)
    cont[3] = 1
    full, fb, ft = build(kind, [x, cont, xs])
    full.forward(fb, ft)
    chunk, cb, ct = build(kind, [x[:3], cont[:3], xs])
    share_weights(chunk, full)
    outputs = []
    for part in (slice(0, 3), slice(3, 6)):
        cb[0].data[...] = x[part]
        cb[1].data[...] = cont[part]
        chunk.forward(cb, ct)
        outputs.append(ct[0].data.copy())
    np.testing.assert_allclose(np.concatenate(outputs), ft[0].data, rtol=1e-12, atol=1e-12)
    # Exposed states do the same job explicitly.
    exp, eb, et = build(kind, [x[:3], cont[:3], xs], expose=True)
    share_weights(exp, full)
    exp.forward(eb, et)
    np.testing.assert_allclose(et[0].data, outputs[0], rtol=1e-12, atol=1e-12)
    eb[0].data[...] = x[3:]
    eb[1].data[...] = cont[3:]
    for b, t in zip(eb[3:], et[1:]):
        b.data[...] = t.data
    exp.forward(eb, et)
    np.testing.assert_allclose(et[0].data, outputs[1], rtol=1e-12, atol=1e-12)
    # reset() forgets the carried state: the next chunk starts from zeros.
    chunk.reset()
    chunk.forward(cb, ct)
    expected = ref_forward(kind, chunk, x[3:], cont[3:], xs)[0]
    np.testing.assert_allclose(ct[0].data, expected, rtol=1e-10, atol=1e-12)


def test_batch_size_change_keeps_leading_streams_or_restarts():
    x, cont = sequence_inputs(steps=3, streams=3, seed=10)
    layer, bottom, top = build("LSTM", [x, cont])
    layer.forward(bottom, top)
    h_prev, c_prev = (s.copy() for s in layer._state)
    cont2 = np.ones((3, 2))
    bottom[0].reshape((3, 2, 2))
    bottom[0].data[...] = x[:, :2]
    bottom[1].reshape((3, 2))
    bottom[1].data[...] = cont2
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    expected = ref_forward("LSTM", layer, x[:, :2], cont2, None, h_prev[:2], c_prev[:2])[0]
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-10, atol=1e-12)
    bottom[0].reshape((3, 4, 2))
    bottom[0].data[...] = np.concatenate([x, x[:, :1]], axis=1)
    bottom[1].reshape((3, 4))
    bottom[1].data[...] = 1
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    expected = ref_forward("LSTM", layer, bottom[0].data, bottom[1].data)[0]
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-10, atol=1e-12)


# -- dtype, params, errors, logging -------------------------------------------------------
@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_float32_in_float32_out(kind):
    arrays = sequence_inputs(static_shape=(2,), seed=11)
    arrays[1][0] = [1, 1]
    layer, bottom, top = build(kind, arrays, expose=True, dtype=np.float32)
    ref_layer, rb, rt = build(kind, arrays, expose=True, dtype=np.float64)
    layer.forward(bottom, top)
    ref_layer.forward(rb, rt)
    assert all(b.dtype == np.float32 for b in layer.blobs)
    for t, r in zip(top, rt):
        assert t.data.dtype == np.float32
        np.testing.assert_allclose(t.data, r.data, rtol=1e-4, atol=1e-5)
    top[0].diff[...] = 1
    rt[0].diff[...] = 1
    layer.backward(top, [True, False, True] + [True] * (len(bottom) - 3), bottom)
    ref_layer.backward(rt, [True, False, True] + [True] * (len(bottom) - 3), rb)
    for b, r in zip(bottom, rb):
        assert b.diff.dtype == np.float32
    np.testing.assert_allclose(bottom[0].diff, rb[0].diff, rtol=1e-4, atol=1e-5)
    for p, r in zip(layer.blobs, ref_layer.blobs):
        assert p.diff.dtype == np.float32
        np.testing.assert_allclose(p.diff, r.diff, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_rejects_bad_params_and_shapes(kind):
    x, cont = sequence_inputs()

    def setup(text, arrays, tops=1):
        layer = layer_from(text)
        layer.setup(make_blobs(*arrays), [Blob((), np.float64) for _ in range(tops)])
        return layer

    with pytest.raises(LayerError, match="num_output must be positive"):
        setup(f'type: "{kind}"', [x, cont])
    good = recurrent_text(kind)
    with pytest.raises(LayerError, match="at least 2 axes"):
        setup(good, [np.zeros(3), np.zeros((3, 1))])
    with pytest.raises(LayerError, match="cont"):
        setup(good, [x, cont[:2]])
    with pytest.raises(LayerError, match="cont"):
        setup(good, [x, cont.reshape(T, N, 1)])
    with pytest.raises(LayerError, match="static input"):
        setup(good, [x, cont, np.zeros((N + 1, 2))])
    with pytest.raises(LayerError, match="at most 3 bottom"):
        setup(good, [x, cont, np.zeros((N, 2)), np.zeros((1, N, D))])
    with pytest.raises(LayerError, match="exactly 1 top"):
        setup(good, [x, cont], tops=2)
    n_states = 2 if kind == "LSTM" else 1
    exposed = recurrent_text(kind, expose=True)
    with pytest.raises(LayerError, match="at least"):
        setup(exposed, [x, cont], tops=1 + n_states)
    with pytest.raises(LayerError, match="initial state"):
        setup(exposed, [x, cont] + [np.zeros((1, N, D + 1))] * n_states, tops=1 + n_states)
    layer = setup(good, [x, cont])
    assert not layer.allow_force_backward(1) and layer.allow_force_backward(0)
    with pytest.raises(LayerError, match="timesteps changed"):
        layer.reshape(make_blobs(np.zeros((T + 1, N, 2)), np.zeros((T + 1, N))), [Blob()])
    with pytest.raises(LayerError, match="features per step"):
        layer.reshape(make_blobs(np.zeros((T, N, 3)), np.zeros((T, N))), [Blob()])


def test_debug_info_logs_every_step(caplog):
    layer, bottom, top = build("LSTM", sequence_inputs(), debug=True)
    with caplog.at_level(logging.INFO, logger="minicaffe.layers.recurrent"):
        layer.forward(bottom, top)
        top[0].diff[...] = 1
        layer.backward(top, [True, False], bottom)
    text = caplog.text
    assert "[Forward] Layer rec_unit_3, top blob h_3 data:" in text
    assert "[Backward] Layer rec_unit_1, bottom blob gate_input_1 diff:" in text


# -- inside a Net -----------------------------------------------------------------------------
NET = """
name: "lstm_toy"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 6 dim: 4 dim: 1 } } }
layer { name: "cont" type: "Input" top: "cont" input_param { shape { dim: 6 dim: 4 } } }
layer { name: "target" type: "Input" top: "target" input_param { shape { dim: 6 dim: 4 dim: 1 } } }
layer { name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" top: "h"
        recurrent_param { num_output: 8 weight_filler { type: "uniform" min: -0.3 max: 0.3 }
                          bias_filler { type: "constant" value: 0 } } }
layer { name: "readout" type: "InnerProduct" bottom: "h" top: "y"
        inner_product_param { num_output: 1 axis: 2 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "target" top: "loss" }
"""


def toy_net():
    set_random_seed(0)
    return Net(text_format.Parse(NET, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)


def test_lstm_net_learns_running_sum():
    """Hand-rolled SGD on y_t = 0.5 * (x_1 + ... + x_t), which needs memory."""
    net = toy_net()
    assert [p.shape for p in net.params["lstm"]] == [(32, 1), (32,), (32, 8)]
    assert not net.bottom_need_backward[net.layer_names.index("lstm")][1]
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (6, 4, 1))
    net.blobs["x"].data[...] = x
    net.blobs["cont"].data[...] = 1
    net.blobs["cont"].data[0] = 0
    net.blobs["target"].data[...] = 0.5 * np.cumsum(x, axis=0)
    losses = []
    for _ in range(150):
        net.clear_param_diffs()
        losses.append(net.forward_backward())
        for p in net.learnable_params:
            p.data[...] -= 0.1 * p.diff
    assert losses[-1] < 0.05 * losses[0]


def test_lstm_net_gradient():
    tiny = (NET.replace("dim: 6 dim: 4", "dim: 3 dim: 2").replace("num_output: 8", "num_output: 2")
            .replace("min: -0.3 max: 0.3", "min: -1 max: 1"))
    set_random_seed(0)
    net = Net(text_format.Parse(tiny, caffe_pb2.NetParameter()), caffe_pb2.TRAIN, dtype=np.float64)
    rng = np.random.default_rng(2)
    net.blobs["x"].data[...] = rng.uniform(-1, 1, (3, 2, 1))
    net.blobs["target"].data[...] = rng.uniform(-1, 1, (3, 2, 1))
    net.blobs["cont"].data[...] = [[0, 0], [1, 0], [1, 1]]
    check_gradient_net(net)


def test_lstm_weights_round_trip_through_caffemodel(tmp_path):
    net = toy_net()
    net.blobs["x"].data[...] = np.random.default_rng(1).uniform(-1, 1, (6, 4, 1))
    net.blobs["cont"].data[...] = 1
    net.blobs["cont"].data[0] = 0
    net.forward_loss()
    y = net.blobs["y"].data.copy()
    path = tmp_path / "toy.caffemodel"
    net.save(path)
    other = Net(text_format.Parse(NET, caffe_pb2.NetParameter()), caffe_pb2.TEST, weights=str(path))
    for a, b in zip(net.params["lstm"], other.params["lstm"]):
        np.testing.assert_array_equal(a.data, b.data)
    other.blobs["x"].data[...] = net.blobs["x"].data
    other.blobs["cont"].data[...] = net.blobs["cont"].data
    other.forward_loss()
    np.testing.assert_allclose(other.blobs["y"].data, y, rtol=1e-6)
    # Weights stored inside the layer parameter (as in a net spec with blobs) are used too.
    param = text_format.Parse(recurrent_text("LSTM", num_output=8), caffe_pb2.LayerParameter())
    param.name = "lstm"
    for b in net.params["lstm"]:
        b.to_proto(proto=param.blobs.add())
    layer = create_layer(param)
    bottom = make_blobs(net.blobs["x"].data, net.blobs["cont"].data)
    top = [Blob((), np.float64)]
    layer.setup(bottom, top)
    assert all(b.dtype == np.float64 for b in layer.blobs)
    layer.forward(bottom, top)
    np.testing.assert_allclose(top[0].data, net.blobs["h"].data, rtol=1e-5, atol=1e-6)
    del param.blobs[-1]
    with pytest.raises(LayerError, match="3 parameter blobs|has 3"):
        create_layer(param).setup(bottom, [Blob((), np.float64)])
