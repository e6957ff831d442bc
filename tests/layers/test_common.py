import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe import Blob, set_random_seed
from minicaffe.layer import LayerError
from minicaffe.layer_factory import create_layer
from minicaffe.proto import caffe_pb2
from minicaffe.testing import check_gradient, make_blobs


def layer(text, phase=caffe_pb2.TRAIN):
    return create_layer(text_format.Parse(text, caffe_pb2.LayerParameter()), phase)


def run(l, *arrays, ntop=1, dtype=np.float32):
    bottom = make_blobs(*arrays, dtype=dtype)
    top = [Blob(dtype=dtype) for _ in range(ntop)]
    l.setup(bottom, top)
    l.forward(bottom, top)
    return bottom, top


# -- InnerProduct ---------------------------------------------------------------
IP = 'name: "ip" type: "InnerProduct" inner_product_param { num_output: 4 %s ' \
     'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }'


@pytest.mark.parametrize("extra,shape", [("", (2, 3, 2, 2)), ("axis: 2", (2, 3, 2, 2)),
                                         ("transpose: true", (3, 5)), ("bias_term: false", (2, 6))])
def test_inner_product_forward_matches_loops(extra, shape):
    set_random_seed(0)
    l = layer(IP % extra)
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    _, (top,) = run(l, x)
    axis = 2 if "axis" in extra else 1
    m = int(np.prod(shape[:axis]))
    xm = x.reshape(m, -1)
    w = l.blobs[0].data
    ref = np.zeros((m, 4))
    for i in range(m):
        for n in range(4):
            for k in range(xm.shape[1]):
                ref[i, n] += xm[i, k] * (w[k, n] if "transpose" in extra else w[n, k])
            if "bias_term" not in extra:
                ref[i, n] += l.blobs[1].data[n]
    assert top.shape == shape[:axis] + (4,) and top.data.dtype == np.float32
    np.testing.assert_allclose(top.data.reshape(m, 4), ref, rtol=1e-4, atol=1e-5)
    assert len(l.blobs) == (1 if "bias_term" in extra else 2)


@pytest.mark.parametrize("extra", ["", "transpose: true", "bias_term: false", "axis: 2"])
def test_inner_product_gradient(extra):
    set_random_seed(0)
    bottom = make_blobs(np.random.default_rng(2).normal(size=(2, 3, 2)))
    check_gradient(layer(IP % extra), bottom, [Blob(dtype=np.float64)])


def test_inner_product_param_diffs_accumulate():
    set_random_seed(0)
    l = layer(IP % "")
    bottom, top = run(l, np.ones((2, 3)))
    top[0].diff[...] = 1
    l.backward(top, [True], bottom)
    l.backward(top, [True], bottom)
    np.testing.assert_allclose(l.blobs[0].diff, 4.0)  # two calls, two samples of ones
    np.testing.assert_allclose(l.blobs[1].diff, 4.0)


@pytest.mark.parametrize("extra", ["", "transpose: true"])
def test_inner_product_blocked_weight_gradient_equals_one_product(extra):
    # blocks of 3 weight rows (the last one short) must add up to dW += dy^T x in one GEMM
    set_random_seed(0)
    rng = np.random.default_rng(3)
    l = layer((IP % extra).replace("num_output: 4", "num_output: 7"))
    bottom, top = run(l, rng.normal(size=(5, 8)))
    top[0].diff[...] = rng.normal(size=top[0].shape)
    previous = rng.normal(size=l.blobs[0].shape).astype(np.float32)
    l.blobs[0].diff[...] = previous
    l._grad_rows, l._w_grad = 3, None
    l.backward(top, [True], bottom)
    dy, x = top[0].diff.astype(np.float64), bottom[0].data.astype(np.float64)
    product = x.T @ dy if "transpose" in extra else dy.T @ x
    np.testing.assert_allclose(l.blobs[0].diff, previous + product, rtol=1e-5, atol=1e-5)


def test_inner_product_refuses_bad_params():
    with pytest.raises(LayerError, match="num_output"):
        run(layer('name: "ip" type: "InnerProduct"'), np.ones((2, 3)))
    l = layer(IP % "")
    bottom, top = run(l, np.ones((2, 3)))
    bottom[0].reshape(2, 5)
    with pytest.raises(LayerError, match="weights expect 3"):
        l.reshape(bottom, top)


# -- Softmax --------------------------------------------------------------------
@pytest.mark.parametrize("axis", [1, 2, -1, 0])
def test_softmax_forward_matches_reference(axis):
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32) * 5
    _, (top,) = run(layer(f'name: "s" type: "Softmax" softmax_param {{ axis: {axis} }}'), x)
    e = np.exp(x.astype(np.float64))
    ref = e / e.sum(axis=axis, keepdims=True)
    np.testing.assert_allclose(top.data, ref, rtol=1e-5)
    assert top.data.dtype == np.float32


def test_softmax_is_stable_for_large_inputs():
    _, (top,) = run(layer('name: "s" type: "Softmax"'), np.array([[1000.0, 0.0]]))
    np.testing.assert_allclose(top.data, [[1, 0]])


@pytest.mark.parametrize("axis", [1, 2])
def test_softmax_gradient(axis):
    bottom = make_blobs(np.random.default_rng(3).normal(size=(2, 3, 2)))
    check_gradient(layer(f'name: "s" type: "Softmax" softmax_param {{ axis: {axis} }}'),
                   bottom, [Blob(dtype=np.float64)])


def test_softmax_in_place():
    x = np.random.default_rng(0).normal(size=(2, 3))
    (b,) = make_blobs(x)
    l = layer('name: "s" type: "Softmax"')
    l.setup([b], [b])
    l.forward([b], [b])
    y = b.data.copy()
    np.testing.assert_allclose(y.sum(1), 1)
    b.diff[...] = 1.0
    l.backward([b], [True], [b])
    np.testing.assert_allclose(b.diff, 0, atol=1e-12)  # d(sum softmax)/dx = 0


# -- Split / Silence --------------------------------------------------------------
def test_split_shares_data_and_sums_diffs():
    l = layer('name: "sp" type: "Split"')
    x = np.arange(6.0).reshape(2, 3)
    bottom, top = run(l, x, ntop=3, dtype=np.float64)
    for t in top:
        np.testing.assert_array_equal(t.data, x)
        assert t.shares_data_with(bottom[0])
    for k, t in enumerate(top):
        t.diff[...] = k + 1
    l.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, 6.0)
    check_gradient(layer('name: "sp" type: "Split"'), make_blobs(x),
                   [Blob(dtype=np.float64), Blob(dtype=np.float64)])


def test_silence_zeroes_bottom_diffs():
    l = layer('name: "s" type: "Silence"')
    bottom, top = run(l, np.ones((2, 2)), ntop=0)
    bottom[0].diff[...] = 5
    l.backward([], [True], bottom)
    assert not bottom[0].diff.any()


# -- Input / DummyData --------------------------------------------------------------
def test_input_shapes_tops():
    l = layer('name: "in" type: "Input" input_param { shape { dim: 2 dim: 3 } shape { dim: 2 } }')
    top = [Blob(), Blob()]
    l.setup([], top)
    assert [t.shape for t in top] == [(2, 3), (2,)]
    with pytest.raises(LayerError, match="one shape for all tops or one per top"):
        layer('name: "in" type: "Input" input_param { shape { dim: 2 } shape { dim: 2 } }').setup(
            [], [Blob(), Blob(), Blob()])


def test_dummy_data_constant_legacy_and_random_refill():
    l = layer('name: "d" type: "DummyData" dummy_data_param { num: 2 channels: 3 height: 1 width: 1 '
              'data_filler { type: "constant" value: 7 } }')
    top = [Blob()]
    l.setup([], top)
    assert top[0].shape == (2, 3, 1, 1) and np.all(top[0].data == 7)
    set_random_seed(4)
    g = layer('name: "d" type: "DummyData" dummy_data_param { shape { dim: 5 } '
              'data_filler { type: "gaussian" } }')
    top = [Blob()]
    g.setup([], top)
    first = top[0].data.copy()
    g.forward([], top)
    assert not np.array_equal(first, top[0].data)
    with pytest.raises(LayerError, match="not both"):
        layer('name: "d" type: "DummyData" dummy_data_param { shape { dim: 1 } num: 1 }').setup([], [Blob()])
