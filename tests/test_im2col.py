"""im2col / col2im against plain loops, the 2-D path against the N-D path, layouts and errors."""
import itertools

import numpy as np
import pytest

from minicaffe.im2col import col2im, conv_output_shape, deconv_output_shape, im2col

# (image shape N, C, *spatial; kernel, pad, stride, dilation)
GEOMETRIES = [
    ((2, 3, 6, 5), (3, 3), (0, 0), (1, 1), (1, 1)),
    ((2, 3, 6, 5), (3, 2), (1, 0), (2, 1), (1, 2)),         # rectangular, mixed pad/stride/dilation
    ((1, 2, 7, 7), (3, 3), (2, 2), (3, 3), (2, 2)),
    ((2, 1, 5, 4), (1, 1), (1, 2), (2, 1), (1, 1)),
    ((3, 2, 9), (4,), (1,), (2,), (2,)),                    # 1-D
    ((2, 2, 4, 5, 6), (2, 3, 2), (1, 0, 2), (1, 2, 3), (2, 1, 1)),   # 3-D
]


def loop_im2col(x, kernel, pad, stride, dilation):
    """The obvious definition: one element at a time."""
    n_img, channels, spatial = x.shape[0], x.shape[1], x.shape[2:]
    out_spatial = [(s + 2 * p - (d * (k - 1) + 1)) // st + 1
                   for s, k, p, st, d in zip(spatial, kernel, pad, stride, dilation)]
    cols = np.zeros((n_img, channels) + tuple(kernel) + tuple(out_spatial), dtype=x.dtype)
    for n, c in itertools.product(range(n_img), range(channels)):
        for k_idx in itertools.product(*map(range, kernel)):
            for o_idx in itertools.product(*map(range, out_spatial)):
                pos = [o * st - p + k * d for o, st, p, k, d in zip(o_idx, stride, pad, k_idx, dilation)]
                if all(0 <= q < s for q, s in zip(pos, spatial)):
                    cols[(n, c) + k_idx + o_idx] = x[(n, c) + tuple(pos)]
    return cols


def loop_col2im(cols, image_shape, kernel, pad, stride, dilation):
    spatial = image_shape[2:]
    out_spatial = cols.shape[2 + len(kernel):]
    image = np.zeros(image_shape, dtype=cols.dtype)
    for n, c in itertools.product(range(image_shape[0]), range(image_shape[1])):
        for k_idx in itertools.product(*map(range, kernel)):
            for o_idx in itertools.product(*map(range, out_spatial)):
                pos = [o * st - p + k * d for o, st, p, k, d in zip(o_idx, stride, pad, k_idx, dilation)]
                if all(0 <= q < s for q, s in zip(pos, spatial)):
                    image[(n, c) + tuple(pos)] += cols[(n, c) + k_idx + o_idx]
    return image


@pytest.mark.parametrize("shape,kernel,pad,stride,dilation", GEOMETRIES)
def test_im2col_matches_loops_on_both_paths(shape, kernel, pad, stride, dilation):
    x = np.random.default_rng(0).standard_normal(shape)
    want = loop_im2col(x, kernel, pad, stride, dilation)
    got = im2col(x, kernel, pad, stride, dilation)
    got_nd = im2col(x, kernel, pad, stride, dilation, force_nd=True)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_nd, want)


@pytest.mark.parametrize("shape,kernel,pad,stride,dilation", GEOMETRIES)
def test_col2im_accumulates_like_loops_on_both_paths(shape, kernel, pad, stride, dilation):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    cols = rng.standard_normal(loop_im2col(x, kernel, pad, stride, dilation).shape)
    want = loop_col2im(cols, shape, kernel, pad, stride, dilation)
    got = col2im(cols, shape, kernel, pad, stride, dilation)
    got_nd = col2im(cols, shape, kernel, pad, stride, dilation, force_nd=True)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # Same order of additions on both paths, so the results are bit-identical.
    np.testing.assert_array_equal(got, got_nd)
    # col2im is the transpose of im2col: <im2col(x), c> == <x, col2im(c)>.
    lhs = np.vdot(im2col(x, kernel, pad, stride, dilation), cols)
    np.testing.assert_allclose(lhs, np.vdot(x, got), rtol=1e-10)


def test_col2im_sums_overlapping_windows():
    # 3x3 windows with stride 1 on a 4x4 image: pixel (1, 1) is covered by 4 windows.
    cols = np.ones((1, 1, 3, 3, 2, 2))
    image = col2im(cols, (1, 1, 4, 4), (3, 3))
    np.testing.assert_array_equal(image[0, 0], [[1, 2, 2, 1], [2, 4, 4, 2], [2, 4, 4, 2], [1, 2, 2, 1]])


def test_col2im_overwrites_out():
    cols = np.ones((1, 1, 2, 2, 2, 2))
    out = np.full((1, 1, 3, 3), 7.0)
    col2im(cols, (1, 1, 3, 3), (2, 2), out=out)
    np.testing.assert_array_equal(out[0, 0], [[1, 2, 1], [2, 4, 2], [1, 2, 1]])


@pytest.mark.parametrize("shape,kernel,pad,stride,dilation", GEOMETRIES)
def test_batch_last_layout(shape, kernel, pad, stride, dilation):
    # Batch as a trailing axis: (C, *S, N) -> (C, *K, *O, N).
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape)
    want = np.moveaxis(loop_im2col(x, kernel, pad, stride, dilation), 0, -1)
    for force_nd in (False, True):
        got = im2col(np.moveaxis(x, 0, -1), kernel, pad, stride, dilation, axis=1, force_nd=force_nd)
        np.testing.assert_array_equal(got, want)
    cols = rng.standard_normal(want.shape)
    image_t = col2im(cols, np.moveaxis(x, 0, -1).shape, kernel, pad, stride, dilation, axis=1)
    np.testing.assert_allclose(np.moveaxis(image_t, -1, 0),
                               loop_col2im(np.moveaxis(cols, -1, 0), shape, kernel, pad, stride, dilation),
                               rtol=1e-12, atol=1e-12)


def test_dirty_workspace_border_is_cleared():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    workspace = np.full((2, 3, 9, 6), np.nan, dtype=np.float32)   # padded by (2, 1)
    got = im2col(x, (3, 3), (2, 1), (1, 2), 1, workspace=workspace)
    np.testing.assert_array_equal(got, loop_im2col(x, (3, 3), (2, 1), (1, 2), (1, 1)))


def test_out_buffer_and_dtype_are_kept():
    x = np.random.default_rng(4).standard_normal((2, 2, 5, 5)).astype(np.float32)
    out = np.empty((2, 2, 3, 3, 3, 3), dtype=np.float32)
    assert im2col(x, (3, 3), out=out) is out
    assert out.dtype == np.float32
    image = col2im(out, x.shape, (3, 3))
    assert image.dtype == np.float32
    assert im2col(x, (3, 3), force_nd=True).dtype == np.float32


def test_output_shape_formulas():
    assert conv_output_shape((6, 4), (3, 3), 0, 2) == (2, 1)          # Caffe's TestSetup
    assert conv_output_shape((227, 227), (11, 11), 0, 4) == (55, 55)
    assert conv_output_shape((8, 7), (3, 3), 0, 1, 2) == (4, 3)        # dilated extent 5
    assert conv_output_shape((10, 11), (3, 3), 0, 2, 3) == (2, 3)
    assert conv_output_shape((5, 6, 7), (3, 2, 1), (1, 0, 0), (2, 1, 3)) == (3, 5, 3)
    assert deconv_output_shape((6, 4), (3, 3), 0, 2) == (13, 9)       # Caffe's deconv TestSetup
    assert deconv_output_shape((4, 4), (4, 4), 1, 2) == (8, 8)         # FCN 2x upsampling
    for shape, k, p, s, d in [((6, 5), (3, 2), (1, 0), (2, 1), (1, 2)), ((7,), (4,), (2,), (3,), (2,))]:
        assert conv_output_shape(deconv_output_shape(shape, k, p, s, d), k, p, s, d) == shape


def test_errors():
    x = np.zeros((1, 1, 4, 4))
    with pytest.raises(ValueError, match="larger than the padded input"):
        im2col(x, (5, 5))
    with pytest.raises(ValueError, match="pad has 3 entries"):
        im2col(x, (3, 3), pad=(1, 1, 1))
    with pytest.raises(ValueError, match="out has shape"):
        im2col(x, (3, 3), out=np.zeros((1, 1, 3, 3, 3, 3)))
    with pytest.raises(ValueError, match="columns have shape"):
        col2im(np.zeros((1, 1, 3, 3, 3, 3)), (1, 1, 4, 4), (3, 3))
    with pytest.raises(ValueError, match="do not fit"):
        im2col(np.zeros((4, 4)), (3, 3), axis=1)
    with pytest.raises(ValueError, match="output size"):
        deconv_output_shape((1,), (1,), pad=1)
