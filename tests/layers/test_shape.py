"""Flatten, Reshape, Concat, Slice, Tile, Crop, BatchReindex, Filter."""
import itertools

import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe import Blob, LayerError, create_layer
from minicaffe.proto import caffe_pb2
from tests.gradient_check import check_gradient, make_blobs

R = np.random.default_rng(1)


def make_layer(text):
    return create_layer(text_format.Parse(text, caffe_pb2.LayerParameter()))


def tops(n, dtype=np.float64):
    return [Blob((), dtype=dtype) for _ in range(n)]


def run(layer, bottom, num_top=1):
    top = tops(num_top, bottom[0].dtype)
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return top


def backward_all(layer, top, bottom, down=None):
    for t in top:
        t.diff[...] = R.normal(size=t.shape)
    layer.backward(top, [True] * len(bottom) if down is None else down, bottom)


# -- Flatten ---------------------------------------------------------------------
@pytest.mark.parametrize("params,expected", [
    ("", (2, 60)), ("flatten_param { axis: 2 }", (2, 3, 20)),
    ("flatten_param { axis: 1 end_axis: 2 }", (2, 12, 5)),
    ("flatten_param { axis: 0 end_axis: -2 }", (24, 5)),
    ("flatten_param { axis: -1 }", (2, 3, 4, 5))])
def test_flatten_shapes_and_shared_memory(params, expected):
    x = R.normal(size=(2, 3, 4, 5))
    bottom = make_blobs(x)
    layer = make_layer(f'type: "Flatten" {params}')
    top = run(layer, bottom)
    assert top[0].shape == expected
    for idx in itertools.product(*map(range, x.shape)):  # C-order element by element
        assert top[0].data.reshape(-1)[np.ravel_multi_index(idx, x.shape)] == x[idx]
    bottom[0].data[1, 2, 3, 4] = 7.0
    assert top[0].data.reshape(-1)[-1] == 7.0
    top[0].diff[...] = 3.0
    assert np.all(bottom[0].diff == 3.0)


def test_flatten_gradient_float32_and_rejections():
    check_gradient(make_layer('type: "Flatten"'), make_blobs(R.normal(size=(2, 2, 3))), tops(1))
    top = run(make_layer('type: "Flatten"'), make_blobs(R.normal(size=(2, 3, 2)), dtype=np.float32))
    assert top[0].dtype == np.float32
    layer = make_layer('type: "Flatten"')
    bottom = make_blobs(R.normal(size=(2, 3)))
    with pytest.raises(LayerError, match="in-place"):
        layer.setup(bottom, bottom)
    with pytest.raises(LayerError, match="end_axis"):
        run(make_layer('type: "Flatten" flatten_param { axis: 2 end_axis: 1 }'),
            make_blobs(R.normal(size=(2, 3, 4))))
    with pytest.raises(LayerError, match="axis"):
        run(make_layer('type: "Flatten" flatten_param { axis: 5 }'),
            make_blobs(R.normal(size=(2, 3, 4))))


# -- Reshape -------------------------------------------------------------------------
@pytest.mark.parametrize("params,expected", [
    ("shape { dim: 6 dim: 2 dim: 3 dim: 5 }", (6, 2, 3, 5)),
    ("shape { dim: 0 dim: -1 }", (2, 90)),
    ("shape { dim: 0 dim: 0 dim: 0 dim: 0 }", (2, 3, 6, 5)),
    ("shape { dim: 0 dim: 2 dim: 3 dim: 0 dim: -1 }", (2, 2, 3, 5, 3)),
    ("shape { dim: -1 }", (180,)),
    ("axis: 1 num_axes: 1 shape { dim: 3 dim: 1 }", (2, 3, 1, 6, 5)),
    ("axis: -1 num_axes: 0 shape { dim: 1 }", (2, 3, 6, 5, 1)),
    ("axis: 0 num_axes: 0 shape { dim: 1 }", (1, 2, 3, 6, 5)),
    ("axis: 1 num_axes: 2 shape { dim: -1 }", (2, 18, 5)),
    ("axis: -3 shape { dim: 0 dim: -1 }", (2, 3, 6, 5))])
def test_reshape_shapes(params, expected):
    x = R.normal(size=(2, 3, 6, 5))
    bottom = make_blobs(x)
    top = run(make_layer(f'type: "Reshape" reshape_param {{ {params} }}'), bottom)
    assert top[0].shape == expected
    np.testing.assert_array_equal(top[0].data.reshape(-1), x.reshape(-1))
    assert top[0].shares_data_with(bottom[0])
    top[0].diff[...] = 2.0
    assert np.all(bottom[0].diff == 2.0)


def test_reshape_follows_bottom_and_gradient():
    layer = make_layer('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }')
    top = tops(1)
    layer.setup(make_blobs(R.normal(size=(2, 3, 4))), top)
    bottom = make_blobs(R.normal(size=(5, 2, 2)))
    layer.reshape(bottom, top)
    assert top[0].shape == (5, 4)
    check_gradient(make_layer('type: "Reshape" reshape_param { shape { dim: -1 dim: 2 } }'),
                   make_blobs(R.normal(size=(2, 3, 2))), tops(1))
    top = run(make_layer('type: "Reshape" reshape_param { shape { dim: -1 } }'),
              make_blobs(R.normal(size=(2, 3)), dtype=np.float32))
    assert top[0].dtype == np.float32


@pytest.mark.parametrize("params,match", [
    ("shape { dim: -1 dim: -1 }", "more than one -1"),
    ("shape { dim: -2 }", "positive"),
    ("shape { dim: 7 }", "count"),
    ("shape { dim: 7 dim: -1 }", "divisible"),
    ("shape { dim: 0 dim: 0 dim: 0 dim: 0 dim: 0 }", "no axis"),
    ("axis: 5 shape { dim: 1 }", "out of range"),
    ("axis: 2 num_axes: 3 shape { dim: 1 }", "out of range")])
def test_reshape_rejections(params, match):
    with pytest.raises(LayerError, match=match):
        run(make_layer(f'type: "Reshape" reshape_param {{ {params} }}'),
            make_blobs(R.normal(size=(2, 3, 6, 5))))


def test_reshape_refuses_in_place():
    bottom = make_blobs(R.normal(size=(2, 3)))
    with pytest.raises(LayerError, match="in-place"):
        make_layer('type: "Reshape" reshape_param { shape { dim: -1 } }').setup(bottom, bottom)


# -- Concat --------------------------------------------------------------------------
def ref_concat(arrays, axis):
    shape = list(arrays[0].shape)
    shape[axis] = sum(a.shape[axis] for a in arrays)
    out = np.zeros(shape)
    offset = 0
    for a in arrays:
        for idx in itertools.product(*map(range, a.shape)):
            moved = list(idx)
            moved[axis] += offset
            out[tuple(moved)] = a[idx]
        offset += a.shape[axis]
    return out


@pytest.mark.parametrize("params,axis", [("", 1), ("concat_param { axis: 0 }", 0),
                                         ("concat_param { axis: -1 }", 2),
                                         ("concat_param { concat_dim: 2 }", 2)])
def test_concat_forward_and_gradient(params, axis):
    shapes = [(2, 3, 2), (2, 3, 2), (2, 3, 2)]
    shapes[1] = tuple(4 if i == axis else d for i, d in enumerate(shapes[1]))
    arrays = [R.normal(size=s) for s in shapes]
    top = run(make_layer(f'type: "Concat" {params}'), make_blobs(*arrays))
    np.testing.assert_array_equal(top[0].data, ref_concat(arrays, axis))
    check_gradient(make_layer(f'type: "Concat" {params}'),
                   make_blobs(*[a[:, :2, :1] if axis == 0 else a[:1] for a in arrays]), tops(1))


def test_concat_single_bottom_shares_and_float32():
    bottom = make_blobs(R.normal(size=(2, 3)), dtype=np.float32)
    top = run(make_layer('type: "Concat"'), bottom)
    assert top[0].shares_data_with(bottom[0]) and top[0].dtype == np.float32
    layer = make_layer('type: "Concat"')
    bottom = make_blobs(R.normal(size=(2, 3)), R.normal(size=(2, 1)), dtype=np.float32)
    top = run(layer, bottom)
    backward_all(layer, top, bottom, [False, True])
    np.testing.assert_array_equal(bottom[1].diff, top[0].diff[:, 3:])
    assert top[0].dtype == bottom[1].diff.dtype == np.float32


def test_concat_rejections():
    with pytest.raises(LayerError, match="not both"):
        run(make_layer('type: "Concat" concat_param { axis: 1 concat_dim: 1 }'),
            make_blobs(np.ones((2, 3)), np.ones((2, 3))))
    with pytest.raises(LayerError, match="same shape"):
        run(make_layer('type: "Concat"'), make_blobs(np.ones((2, 3)), np.ones((3, 3))))
    with pytest.raises(LayerError, match="number of axes"):
        run(make_layer('type: "Concat"'), make_blobs(np.ones((2, 3)), np.ones((2, 3, 1))))
    with pytest.raises(LayerError, match="concat_dim"):
        run(make_layer('type: "Concat" concat_param { concat_dim: 2 }'),
            make_blobs(np.ones((2, 3)), np.ones((2, 3))))


# -- Slice ---------------------------------------------------------------------------
def ref_slice(x, axis, bounds):
    outs = []
    for start, stop in zip(bounds, bounds[1:]):
        shape = list(x.shape)
        shape[axis] = stop - start
        out = np.zeros(shape)
        for idx in itertools.product(*map(range, shape)):
            src = list(idx)
            src[axis] += start
            out[idx] = x[tuple(src)]
        outs.append(out)
    return outs


@pytest.mark.parametrize("params,axis,bounds", [
    ("", 1, [0, 2, 4, 6]),
    ("slice_param { slice_point: 1 slice_point: 4 }", 1, [0, 1, 4, 6]),
    ("slice_param { axis: 0 slice_point: 1 }", 0, [0, 1, 3]),
    ("slice_param { slice_dim: 2 slice_point: 3 }", 2, [0, 3, 4]),
    ("slice_param { axis: -1 }", 2, [0, 2, 4])])
def test_slice_forward_and_gradient(params, axis, bounds):
    x = R.normal(size=(3, 6, 4))
    top = run(make_layer(f'type: "Slice" {params}'), make_blobs(x), len(bounds) - 1)
    for t, ref in zip(top, ref_slice(x, axis, bounds)):
        np.testing.assert_array_equal(t.data, ref)
    small = x[:, :, :] if axis == 2 else x[:, :, :1]
    check_gradient(make_layer(f'type: "Slice" {params}'), make_blobs(small), tops(len(bounds) - 1))


def test_slice_single_top_shares_and_float32():
    bottom = make_blobs(R.normal(size=(2, 4)), dtype=np.float32)
    top = run(make_layer('type: "Slice"'), bottom)
    assert top[0].shares_data_with(bottom[0])
    layer = make_layer('type: "Slice"')
    top = run(layer, bottom, 2)
    backward_all(layer, top, bottom)
    np.testing.assert_array_equal(bottom[0].diff[:, 2:], top[1].diff)
    assert top[1].dtype == bottom[0].diff.dtype == np.float32


@pytest.mark.parametrize("params,num_top,match", [
    ("slice_param { slice_point: 3 slice_point: 2 }", 3, "increasing"),
    ("slice_param { slice_point: 2 slice_point: 2 }", 3, "increasing"),
    ("slice_param { slice_point: 0 }", 2, "increasing"),
    ("slice_param { slice_point: 2 }", 3, "need 2 tops"),
    ("slice_param { slice_point: 6 }", 2, "do not fit"),
    ("", 4, "evenly divide"),
    ("slice_param { axis: 1 slice_dim: 1 }", 2, "not both"),
    ("slice_param { slice_dim: 3 }", 2, "slice_dim")])
def test_slice_rejections(params, num_top, match):
    with pytest.raises(LayerError, match=match):
        run(make_layer(f'type: "Slice" {params}'), make_blobs(np.ones((2, 6, 3))), num_top)


# -- Tile ------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_tile_forward_and_gradient(axis):
    x = R.normal(size=(2, 3, 2))
    top = run(make_layer(f'type: "Tile" tile_param {{ axis: {axis} tiles: 3 }}'), make_blobs(x))
    a = axis % 3
    shape = list(x.shape)
    shape[a] *= 3
    assert top[0].shape == tuple(shape)
    for idx in itertools.product(*map(range, shape)):
        src = list(idx)
        src[a] %= x.shape[a]
        assert top[0].data[idx] == x[tuple(src)]
    check_gradient(make_layer(f'type: "Tile" tile_param {{ axis: {axis} tiles: 3 }}'),
                   make_blobs(x[:, :2]), tops(1))


def test_tile_float32_and_rejections():
    layer = make_layer('type: "Tile" tile_param { tiles: 2 }')
    bottom = make_blobs(R.normal(size=(2, 3)), dtype=np.float32)
    top = run(layer, bottom)
    backward_all(layer, top, bottom)
    np.testing.assert_allclose(bottom[0].diff, top[0].diff[:, :3] + top[0].diff[:, 3:], rtol=1e-6)
    assert top[0].dtype == bottom[0].diff.dtype == np.float32
    with pytest.raises(LayerError, match="tiles"):
        run(make_layer('type: "Tile"'), make_blobs(np.ones((2, 3))))
    with pytest.raises(LayerError, match="positive"):
        run(make_layer('type: "Tile" tile_param { tiles: 0 }'), make_blobs(np.ones((2, 3))))


# -- Crop ------------------------------------------------------------------------------
@pytest.mark.parametrize("params,shape,offsets", [
    ("", (3, 4, 3, 4), [0, 0, 0, 0]),
    ("crop_param { offset: 1 }", (3, 4, 3, 4), [0, 0, 1, 1]),
    ("crop_param { axis: 1 offset: 1 offset: 2 offset: 0 }", (3, 2, 3, 4), [0, 1, 2, 0]),
    ("crop_param { axis: -1 offset: 2 }", (3, 4, 5, 4), [0, 0, 0, 2]),
    ("crop_param { axis: 0 offset: 1 }", (2, 2, 3, 4), [1, 1, 1, 1])])
def test_crop_forward_and_gradient(params, shape, offsets):
    x = R.normal(size=(3, 4, 5, 6))
    top = run(make_layer(f'type: "Crop" {params}'), make_blobs(x, np.zeros((2, 2, 3, 4))))
    assert top[0].shape == shape
    for idx in itertools.product(*map(range, shape)):
        assert top[0].data[idx] == x[tuple(i + o for i, o in zip(idx, offsets))]
    check_gradient(make_layer(f'type: "Crop" {params}'),
                   make_blobs(R.normal(size=(2, 3, 4, 3)), np.zeros((1, 2, 1, 1))), tops(1),
                   check_bottom=[0])


def test_crop_backward_zero_fills_and_float32():
    layer = make_layer('type: "Crop" crop_param { axis: 1 offset: 1 }')
    bottom = make_blobs(R.normal(size=(2, 4)), np.zeros((2, 2)), dtype=np.float32)
    top = run(layer, bottom)
    bottom[0].diff[...] = 9
    backward_all(layer, top, bottom, [True, True])
    np.testing.assert_array_equal(bottom[0].diff[:, 1:3], top[0].diff)
    assert np.all(bottom[0].diff[:, [0, 3]] == 0) and np.all(bottom[1].diff == 0)
    assert top[0].dtype == np.float32


def test_crop_rejections():
    with pytest.raises(LayerError, match="offset"):
        run(make_layer('type: "Crop" crop_param { offset: 1 offset: 1 offset: 1 }'),
            make_blobs(np.ones((2, 3, 4, 4)), np.ones((2, 3, 2, 2))))
    with pytest.raises(LayerError, match="out of bounds"):
        run(make_layer('type: "Crop" crop_param { offset: 3 }'),
            make_blobs(np.ones((2, 3, 4, 4)), np.ones((2, 3, 2, 2))))
    with pytest.raises(LayerError, match="out of bounds"):
        run(make_layer('type: "Crop"'), make_blobs(np.ones((2, 3, 4, 4)), np.ones((2, 3, 5, 2))))


# -- BatchReindex --------------------------------------------------------------------
def test_batch_reindex_forward_gradient_and_float32():
    x = R.normal(size=(4, 2, 3))
    index = np.array([3, 0, 3, 1, 1, 3])
    top = run(make_layer('type: "BatchReindex"'), make_blobs(x, index))
    assert top[0].shape == (6, 2, 3)
    for i, k in enumerate(index):
        np.testing.assert_array_equal(top[0].data[i], x[k])
    layer = make_layer('type: "BatchReindex"')
    check_gradient(layer, make_blobs(x[:, :1, :2], index), tops(1), check_bottom=[0])
    assert not layer.allow_force_backward(1) and layer.allow_force_backward(0)
    bottom = make_blobs(x, index, dtype=np.float32)
    top = run(layer, bottom)
    backward_all(layer, top, bottom, [True, False])
    expected = np.zeros_like(x)
    for i, k in enumerate(index):
        expected[k] += top[0].diff[i]
    np.testing.assert_allclose(bottom[0].diff, expected, rtol=1e-6)
    assert bottom[0].diff[2].sum() == 0  # never picked
    assert top[0].dtype == bottom[0].diff.dtype == np.float32
    with pytest.raises(LayerError, match="index"):
        layer.backward(top, [True, True], bottom)


def test_batch_reindex_rejections():
    with pytest.raises(LayerError, match="1-d"):
        run(make_layer('type: "BatchReindex"'), make_blobs(np.ones((3, 2)), np.zeros((2, 1))))
    with pytest.raises(LayerError, match="out of range"):
        run(make_layer('type: "BatchReindex"'), make_blobs(np.ones((3, 2)), [0, 3]))
    with pytest.raises(LayerError, match="out of range"):
        run(make_layer('type: "BatchReindex"'), make_blobs(np.ones((3, 2)), [-1]))


# -- Filter --------------------------------------------------------------------------
def test_filter_forward_reshape_and_gradient():
    a, b = R.normal(size=(5, 2, 2)), R.normal(size=(5, 3))
    selector = np.array([0, 1, 1, 0, 1], dtype=float).reshape(5, 1)
    layer = make_layer('type: "Filter"')
    bottom = make_blobs(a, b, selector)
    top = tops(2)
    layer.setup(bottom, top)
    assert top[0].shape == (5, 2, 2) and top[1].shape == (5, 3)  # full batch at setup
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    kept = [i for i in range(5) if selector[i, 0] != 0]
    assert top[0].shape == (3, 2, 2) and top[1].shape == (3, 3)
    for j, i in enumerate(kept):
        np.testing.assert_array_equal(top[0].data[j], a[i])
        np.testing.assert_array_equal(top[1].data[j], b[i])
    backward_all(layer, top, bottom, [True, True, False])
    for i in range(5):
        expected = top[0].diff[kept.index(i)] if i in kept else 0
        np.testing.assert_array_equal(bottom[0].diff[i], expected)
    assert not layer.allow_force_backward(2) and layer.allow_force_backward(1)
    with pytest.raises(LayerError, match="selector"):
        layer.backward(top, [True, True, True], bottom)
    check_gradient(make_layer('type: "Filter"'), make_blobs(a[:, :1], selector), tops(1),
                   check_bottom=[0])


def test_filter_float32_and_rejections():
    bottom = make_blobs(R.normal(size=(3, 2)), [1, 0, 1], dtype=np.float32)
    top = run(make_layer('type: "Filter"'), bottom)
    assert top[0].dtype == np.float32
    with pytest.raises(LayerError, match="one top per"):
        run(make_layer('type: "Filter"'), make_blobs(np.ones((3, 2)), [1, 0, 1]), 2)
    with pytest.raises(LayerError, match="singletons"):
        run(make_layer('type: "Filter"'), make_blobs(np.ones((3, 2)), np.ones((3, 2))))
    with pytest.raises(LayerError, match="first dimension"):
        run(make_layer('type: "Filter"'), make_blobs(np.ones((2, 2)), [1, 0, 1]))


# -- none of these layers can run in place ---------------------------------------------
@pytest.mark.parametrize("text,shapes", [
    ('type: "Concat"', [(2, 3), (2, 3)]), ('type: "Slice"', [(2, 4)]),
    ('type: "Tile" tile_param { tiles: 2 }', [(2, 3)]),
    ('type: "Crop"', [(2, 3, 4, 4), (2, 3, 2, 2)]), ('type: "Filter"', [(2, 3), (2,)])])
def test_in_place_is_refused(text, shapes):
    bottom = make_blobs(*[np.ones(s) for s in shapes])
    with pytest.raises(LayerError, match="in-place"):
        make_layer(text).setup(bottom, bottom[:1] if "Slice" not in text else [bottom[0], Blob()])
