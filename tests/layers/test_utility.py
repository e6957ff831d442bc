"""Eltwise, Reduction, ArgMax, Parameter, Embed."""
import itertools

import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe import Blob, LayerError, create_layer
from minicaffe.proto import caffe_pb2
from tests.gradient_check import check_gradient, make_blobs

R = np.random.default_rng(2)


def make_layer(text):
    return create_layer(text_format.Parse(text, caffe_pb2.LayerParameter()))


def tops(n=1, dtype=np.float64):
    return [Blob((), dtype=dtype) for _ in range(n)]


def run(layer, bottom, num_top=1, dtype=None):
    top = tops(num_top, dtype or (bottom[0].dtype if bottom else np.float64))
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return top


def distinct(shape, count):
    """`count` arrays whose entries all differ by at least 0.1 (no ties for MAX)."""
    values = R.permutation(count * int(np.prod(shape))) * 0.1 - 1.0
    return [v.reshape(shape) for v in np.split(values, count)]


# -- Eltwise -------------------------------------------------------------------------
def ref_eltwise(arrays, op, coeffs=None):
    out = np.zeros(arrays[0].shape)
    mask = np.zeros(arrays[0].shape, dtype=int)
    for idx in itertools.product(*map(range, out.shape)):
        vals = [a[idx] for a in arrays]
        if op == "PROD":
            out[idx] = np.prod(vals)
        elif op == "SUM":
            out[idx] = sum(c * v for c, v in zip(coeffs or [1] * len(vals), vals))
        else:
            best = 1 if not vals[0] > vals[1] else 0
            for k in range(2, len(vals)):
                if vals[k] > vals[best]:
                    best = k
            out[idx], mask[idx] = vals[best], best
    return out, mask


@pytest.mark.parametrize("params,op,coeffs", [
    ("operation: PROD", "PROD", None),
    ("operation: PROD stable_prod_grad: false", "PROD", None),
    ("", "SUM", None),
    ("operation: SUM coeff: 1 coeff: -0.5 coeff: 2", "SUM", [1, -0.5, 2]),
    ("operation: MAX", "MAX", None)])
def test_eltwise_forward_and_gradient(params, op, coeffs):
    arrays = distinct((2, 3, 2), 3)
    layer = make_layer(f'type: "Eltwise" eltwise_param {{ {params} }}')
    top = run(layer, make_blobs(*arrays))
    ref, mask = ref_eltwise(arrays, op, coeffs)
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-12)
    if op == "MAX":
        np.testing.assert_array_equal(layer.mask, mask)
    small = [a[:1] for a in arrays]
    if op == "PROD":
        small = [np.where(np.abs(a) < 0.3, 0.5, a) for a in small]  # top / x_i stays tame
    check_gradient(make_layer(f'type: "Eltwise" eltwise_param {{ {params} }}'),
                   make_blobs(*small), tops())


def test_eltwise_max_ties_and_two_bottoms():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 4.0])
    layer = make_layer('type: "Eltwise" eltwise_param { operation: MAX }')
    bottom = make_blobs(a, b)
    top = run(layer, bottom)
    np.testing.assert_array_equal(top[0].data, [1, 2, 4])
    np.testing.assert_array_equal(layer.mask, [1, 0, 1])  # a tie goes to the second bottom
    top[0].diff[...] = [5, 6, 7]
    layer.backward(top, [True, True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, [0, 6, 0])
    np.testing.assert_array_equal(bottom[1].diff, [5, 0, 7])


@pytest.mark.parametrize("params", ["operation: PROD", "operation: SUM coeff: 2 coeff: 3",
                                    "operation: MAX"])
def test_eltwise_float32(params):
    layer = make_layer(f'type: "Eltwise" eltwise_param {{ {params} }}')
    bottom = make_blobs(*distinct((2, 3), 2), dtype=np.float32)
    top = run(layer, bottom)
    top[0].diff[...] = 1
    layer.backward(top, [True, True], bottom)
    assert top[0].dtype == bottom[0].diff.dtype == bottom[1].diff.dtype == np.float32


def test_eltwise_rejections():
    with pytest.raises(LayerError, match="one coeff per bottom"):
        run(make_layer('type: "Eltwise" eltwise_param { coeff: 1 coeff: 2 coeff: 3 }'),
            make_blobs(np.ones(3), np.ones(3)))
    with pytest.raises(LayerError, match="only for operation SUM"):
        run(make_layer('type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 2 }'),
            make_blobs(np.ones(3), np.ones(3)))
    with pytest.raises(LayerError, match="same shape"):
        run(make_layer('type: "Eltwise"'), make_blobs(np.ones(3), np.ones(4)))
    with pytest.raises(LayerError, match="at least 2"):
        run(make_layer('type: "Eltwise"'), make_blobs(np.ones(3)))


# -- Reduction -----------------------------------------------------------------------
def ref_reduction(x, op, axis, coeff):
    lead = x.shape[:axis]
    out = np.zeros(lead)
    for idx in itertools.product(*map(range, lead)):
        values = x[idx].reshape(-1)
        total = {"SUM": sum(values), "ASUM": sum(abs(v) for v in values),
                 "SUMSQ": sum(v * v for v in values), "MEAN": sum(values) / len(values)}[op]
        out[idx] = coeff * total
    return out


@pytest.mark.parametrize("op", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis,coeff", [(0, 1.0), (1, 2.5), (-1, -0.5), (2, 1.0)])
def test_reduction_forward_and_gradient(op, axis, coeff):
    x = R.normal(size=(2, 3, 4))
    x[np.abs(x) < 0.05] = 0.3  # keep ASUM's kink at 0 out of the gradient check
    text = f'type: "Reduction" reduction_param {{ operation: {op} axis: {axis} coeff: {coeff} }}'
    top = run(make_layer(text), make_blobs(x))
    a = axis % 3
    assert top[0].shape == x.shape[:a]
    np.testing.assert_allclose(top[0].data, ref_reduction(x, op, a, coeff), rtol=1e-12)
    check_gradient(make_layer(text), make_blobs(x[:, :2, :2]), tops())


def test_reduction_defaults_float32_and_rejections():
    layer = make_layer('type: "Reduction"')
    bottom = make_blobs(R.normal(size=(2, 3)), dtype=np.float32)
    top = run(layer, bottom)
    assert top[0].shape == () and top[0].dtype == np.float32
    assert top[0].data == pytest.approx(float(bottom[0].data.sum()), rel=1e-6)
    top[0].diff[...] = 2
    layer.backward(top, [True], bottom)
    assert bottom[0].diff.dtype == np.float32 and np.all(bottom[0].diff == 2)
    for text in ['type: "Reduction" reduction_param { operation: MEAN }',
                 'type: "Reduction" reduction_param { operation: SUMSQ coeff: 0.1 }']:
        top = run(make_layer(text), bottom)
        assert top[0].dtype == np.float32
    with pytest.raises(LayerError, match="axis"):
        run(make_layer('type: "Reduction" reduction_param { axis: 3 }'),
            make_blobs(np.ones((2, 3))))


# -- ArgMax --------------------------------------------------------------------------
def ref_top_k(values, k):
    """Indices of the k largest, ties broken by larger index first."""
    return sorted(range(len(values)), key=lambda j: (values[j], j), reverse=True)[:k]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("out_max_val", [False, True])
def test_argmax_without_axis(k, out_max_val):
    x = R.integers(0, 5, size=(3, 2, 4)).astype(float)  # many ties
    text = f'type: "ArgMax" argmax_param {{ top_k: {k} out_max_val: {str(out_max_val).lower()} }}'
    top = run(make_layer(text), make_blobs(x))
    assert top[0].shape == (3, 2 if out_max_val else 1, k)
    for n in range(3):
        flat = x[n].reshape(-1)
        best = ref_top_k(flat, k)
        np.testing.assert_array_equal(top[0].data[n, 0], best)
        if out_max_val:
            np.testing.assert_array_equal(top[0].data[n, 1], flat[best])


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("out_max_val", [False, True])
def test_argmax_along_axis(axis, out_max_val):
    x = R.integers(0, 4, size=(3, 4, 5)).astype(float)
    k = 2
    text = (f'type: "ArgMax" argmax_param {{ top_k: {k} axis: {axis} '
            f'out_max_val: {str(out_max_val).lower()} }}')
    top = run(make_layer(text), make_blobs(x))
    a = axis % 3
    shape = list(x.shape)
    shape[a] = k
    assert top[0].shape == tuple(shape)
    others = [range(d) for i, d in enumerate(x.shape) if i != a]
    for idx in itertools.product(*others):
        line_idx = list(idx)
        line_idx.insert(a, slice(None))
        line = x[tuple(line_idx)]
        best = ref_top_k(line, k)
        expected = line[best] if out_max_val else best
        np.testing.assert_array_equal(top[0].data[tuple(line_idx)], expected)


def test_argmax_small_bottom_float32_and_rejections():
    top = run(make_layer('type: "ArgMax"'), make_blobs(np.array([[1, 5, 2], [7, 0, 7]]),
                                                        dtype=np.float32))
    assert top[0].shape == (2, 1, 1) and top[0].dtype == np.float32
    np.testing.assert_array_equal(top[0].data.reshape(-1), [1, 2])
    layer = make_layer('type: "ArgMax"')
    bottom = make_blobs(np.ones((2, 3)))
    top = run(layer, bottom)
    assert not layer.allow_force_backward(0)
    with pytest.raises(LayerError, match="no gradient"):
        layer.backward(top, [True], bottom)
    with pytest.raises(LayerError, match="top_k"):
        run(make_layer('type: "ArgMax" argmax_param { top_k: 4 }'), make_blobs(np.ones((2, 3))))
    with pytest.raises(LayerError, match="top_k"):
        run(make_layer('type: "ArgMax" argmax_param { top_k: 3 axis: 0 }'),
            make_blobs(np.ones((2, 3))))
    with pytest.raises(LayerError, match="top_k"):
        run(make_layer('type: "ArgMax" argmax_param { top_k: 0 }'), make_blobs(np.ones((2, 3))))
    with pytest.raises(LayerError, match="axis"):
        run(make_layer('type: "ArgMax" argmax_param { axis: 2 }'), make_blobs(np.ones((2, 3))))


# -- Parameter -----------------------------------------------------------------------
def test_parameter_exposes_its_blob():
    layer = make_layer('type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }')
    top = run(layer, [], dtype=np.float32)
    assert len(layer.blobs) == 1 and layer.blobs[0].shape == (2, 3)
    assert top[0].shape == (2, 3) and top[0].dtype == layer.blobs[0].dtype == np.float32
    assert np.all(top[0].data == 0)
    layer.blobs[0].data[...] = 4
    assert np.all(top[0].data == 4)
    top[0].diff[...] = 1.5
    assert np.all(layer.blobs[0].diff == 1.5)
    with pytest.raises(LayerError, match="exactly 0 bottom"):
        run(make_layer('type: "Parameter" parameter_param { shape { dim: 3 } }'),
            make_blobs(np.ones(3)))


def test_parameter_trains_in_a_net():
    # The layer-level checker zeroes param diffs after setting top diffs, which for this
    # layer are the same memory, so the gradient is checked through a Net instead.
    from minicaffe.net import Net
    from tests.gradient_check import check_gradient_net

    text = '''
    layer { name: "in" type: "Input" top: "target" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "p" type: "Parameter" top: "p" parameter_param { shape { dim: 2 dim: 3 } } }
    layer { name: "loss" type: "EuclideanLoss" bottom: "p" bottom: "target" top: "loss" }
    '''
    net = Net(text_format.Parse(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN, dtype=np.float64)
    assert net.layer_dict["p"].blobs[0].dtype == np.float64
    net.blobs["target"].data[...] = R.normal(size=(2, 3))
    net.layer_dict["p"].blobs[0].data[...] = R.normal(size=(2, 3))
    check_gradient_net(net)


def test_parameter_keeps_loaded_blob():
    param = text_format.Parse('type: "Parameter" parameter_param { shape { dim: 2 } }',
                              caffe_pb2.LayerParameter())
    param.blobs.add().CopyFrom(make_blobs(np.array([3.0, 4.0]))[0].to_proto())
    layer = create_layer(param)
    top = run(layer, [], dtype=np.float32)
    np.testing.assert_array_equal(top[0].data, [3, 4])
    param.parameter_param.shape.dim[0] = 5
    with pytest.raises(LayerError, match="does not match"):
        run(create_layer(param), [], dtype=np.float32)


# -- Embed ---------------------------------------------------------------------------
EMBED = ('type: "Embed" embed_param {{ num_output: 3 input_dim: 5 bias_term: {bias} '
         'weight_filler {{ type: "uniform" min: -1 max: 1 }} '
         'bias_filler {{ type: "uniform" min: -1 max: 1 }} }}')


@pytest.mark.parametrize("bias", [True, False])
def test_embed_forward_and_gradient(bias):
    index = np.array([[0, 4, 2], [2, 2, 1]], dtype=float)
    layer = make_layer(EMBED.format(bias=str(bias).lower()))
    top = run(layer, make_blobs(index))
    assert top[0].shape == (2, 3, 3)
    assert len(layer.blobs) == (2 if bias else 1) and layer.blobs[0].shape == (5, 3)
    w = layer.blobs[0].data
    for i, j in itertools.product(range(2), range(3)):
        expected = w[int(index[i, j])] + (layer.blobs[1].data if bias else 0)
        np.testing.assert_allclose(top[0].data[i, j], expected)
    check_gradient(make_layer(EMBED.format(bias=str(bias).lower())), make_blobs(index), tops(),
                   check_bottom=[])


def test_embed_param_diffs_accumulate_and_float32():
    layer = make_layer(EMBED.format(bias="true"))
    bottom = make_blobs(np.array([1, 1, 3]), dtype=np.float32)
    top = run(layer, bottom)
    assert top[0].dtype == layer.blobs[0].dtype == np.float32
    top[0].diff[...] = 1
    layer.backward(top, [False], bottom)
    layer.backward(top, [False], bottom)
    np.testing.assert_array_equal(layer.blobs[0].diff[:, 0], [0, 4, 0, 2, 0])
    np.testing.assert_array_equal(layer.blobs[1].diff, [6, 6, 6])
    assert layer.blobs[0].diff.dtype == np.float32
    assert not layer.allow_force_backward(0)
    with pytest.raises(LayerError, match="indices"):
        layer.backward(top, [True], bottom)


@pytest.mark.parametrize("text,index,match", [
    ('type: "Embed" embed_param { input_dim: 5 }', [0], "num_output"),
    ('type: "Embed" embed_param { num_output: 3 }', [0], "input_dim"),
    (EMBED.format(bias="true"), [5], "integer index"),
    (EMBED.format(bias="true"), [-1], "integer index"),
    (EMBED.format(bias="true"), [1.5], "integer index")])
def test_embed_rejections(text, index, match):
    with pytest.raises(LayerError, match=match):
        run(make_layer(text), make_blobs(np.array(index, dtype=float)))


@pytest.mark.parametrize("text,num_bottom", [
    ('type: "Eltwise"', 2), ('type: "Reduction"', 1), ('type: "ArgMax"', 1),
    ('type: "Embed" embed_param { num_output: 2 input_dim: 3 }', 1)])
def test_in_place_is_refused(text, num_bottom):
    bottom = make_blobs(*[np.ones((2, 3)) for _ in range(num_bottom)])
    with pytest.raises(LayerError, match="in-place"):
        make_layer(text).setup(bottom, bottom[:1])
