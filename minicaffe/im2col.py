"""im2col / col2im over a whole batch, with pad, stride and dilation per spatial axis.

A convolution becomes one matrix product once every receptive field has been
copied into a column: `im2col` turns an image of shape

    lead + (S_1, ..., S_D) + trail            (spatial axes start at `axis`)

into columns of shape

    lead + (k_1, ..., k_D) + (O_1, ..., O_D) + trail

where cols[..., i_1..i_D, o_1..o_D, ...] = image[..., o_d*stride_d - pad_d + i_d*dilation_d, ...]
(zero where that index falls into the padding) and, per axis,
O_d = (S_d + 2*pad_d - (dilation_d*(k_d - 1) + 1)) // stride_d + 1.

With lead = (N, C) and no trail this is Caffe's column buffer of one image,
(C*k_1*..*k_D, O_1*..*O_D), stacked over the batch. The `lead`/`trail` axes just
ride along, so a batch may also sit last, lead = (C,), trail = (N,), which makes
every copy move long contiguous runs when images are small (see layers/conv.py).

`col2im` is the adjoint (transpose) of `im2col`: it scatters the columns back
and SUMS the values that overlapping windows bring to the same pixel.

Both have a 2-D path (a single strided copy / a double loop over kernel
offsets) and an N-D path (a loop over all kernel offsets). Neither loops over
pixels or samples: each step moves a whole slab of the batch at once.
"""
import itertools

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .kernels import jit

__all__ = ["conv_output_shape", "deconv_output_shape", "im2col", "col2im"]


def _per_axis(value, ndim, name):
    """An int or a sequence of ints -> a tuple of `ndim` ints."""
    # (isinstance first: np.ndim converts a tuple to an array, a few microseconds per call of
    # im2col, which the layers call at every forward)
    if isinstance(value, (int, np.integer)) or (not isinstance(value, (tuple, list)) and np.ndim(value) == 0):
        return (int(value),) * ndim
    value = tuple(int(v) for v in value)
    if len(value) != ndim:
        raise ValueError(f"{name} has {len(value)} entries but there are {ndim} spatial axes")
    return value


def _geometry(kernel, pad, stride, dilation):
    kernel = tuple(int(k) for k in kernel)
    ndim = len(kernel)
    return (kernel, _per_axis(pad, ndim, "pad"), _per_axis(stride, ndim, "stride"),
            _per_axis(dilation, ndim, "dilation"))


def conv_output_shape(input_shape, kernel, pad=0, stride=1, dilation=1):
    """Spatial output shape of a convolution (Caffe's ConvolutionLayer::compute_output_shape)."""
    return _conv_output(input_shape, *_geometry(kernel, pad, stride, dilation))


def _conv_output(input_shape, kernel, pad, stride, dilation):
    out = []
    for size, k, p, s, d in zip(input_shape, kernel, pad, stride, dilation):
        extent = d * (k - 1) + 1
        if size + 2 * p < extent:
            raise ValueError(f"kernel extent {extent} (kernel {k}, dilation {d}) is larger than "
                             f"the padded input {size} + 2*{p}")
        out.append((size + 2 * p - extent) // s + 1)
    return tuple(out)


def deconv_output_shape(input_shape, kernel, pad=0, stride=1, dilation=1):
    """Spatial output shape of a deconvolution: the input size that convolution maps to `input_shape`."""
    kernel, pad, stride, dilation = _geometry(kernel, pad, stride, dilation)
    out = []
    for size, k, p, s, d in zip(input_shape, kernel, pad, stride, dilation):
        size_out = s * (size - 1) + d * (k - 1) + 1 - 2 * p
        if size_out < 1:
            raise ValueError(f"deconvolution output size {size_out} < 1 for input {size}, "
                             f"kernel {k}, stride {s}, pad {p}, dilation {d}")
        out.append(size_out)
    return tuple(out)


def _valid_range(in_size, out_size, offset, stride):
    """Output positions o with 0 <= o*stride + offset < in_size, as (first, stop)."""
    first = max(0, -(offset // stride))          # ceil(-offset / stride)
    stop = min(out_size, (in_size - 1 - offset) // stride + 1)
    return first, max(first, stop)


def _offset_slices(kernel_index, in_spatial, out_spatial, pad, stride, dilation):
    """For one kernel offset: (image slices, column slices) of the in-bounds window positions."""
    im_slices, col_slices = [], []
    for i, size, o_size, p, s, d in zip(kernel_index, in_spatial, out_spatial, pad, stride, dilation):
        offset = i * d - p
        first, stop = _valid_range(size, o_size, offset, s)
        start = first * s + offset
        im_slices.append(slice(start, start + (stop - first - 1) * s + 1, s) if stop > first
                         else slice(0, 0))
        col_slices.append(slice(first, stop))
    return tuple(im_slices), tuple(col_slices)


def _check_image(x, axis, ndim):
    if not 0 <= axis <= x.ndim - ndim:
        raise ValueError(f"spatial axes {axis}..{axis + ndim - 1} do not fit an array of shape {x.shape}")


def im2col(x, kernel, pad=0, stride=1, dilation=1, *, axis=2, out=None, workspace=None,
           force_nd=False):
    """Columns of every kernel window of `x` (see the module docstring for the layout).

    x: image array; its spatial axes are x.shape[axis:axis+len(kernel)].
    out: optional preallocated result (any layout numpy can assign to).
    workspace: optional zero-bordered scratch of the padded image's shape (2-D path).
    force_nd: use the general N-D path even for two spatial axes.
    """
    kernel, pad, stride, dilation = _geometry(kernel, pad, stride, dilation)
    ndim = len(kernel)
    _check_image(x, axis, ndim)
    lead, spatial, trail = x.shape[:axis], x.shape[axis:axis + ndim], x.shape[axis + ndim:]
    out_spatial = _conv_output(spatial, kernel, pad, stride, dilation)
    col_shape = lead + kernel + out_spatial + trail
    if out is None:
        out = np.empty(col_shape, dtype=x.dtype)
    elif out.shape != col_shape:
        raise ValueError(f"im2col: out has shape {out.shape}, expected {col_shape}")
    if ndim == 2 and not force_nd:
        _im2col_2d(x, out, lead, spatial, trail, kernel, pad, stride, dilation, out_spatial, workspace)
    else:
        _im2col_nd(x, out, lead, spatial, kernel, pad, stride, dilation, out_spatial)
    return out


def _im2col_2d(x, out, lead, spatial, trail, kernel, pad, stride, dilation, out_spatial, workspace):
    # Copy into a zero-bordered image once; then every window is a strided view of
    # it and the whole im2col is one copy (numpy moves the runs, not Python).
    axis = len(lead)
    if any(pad):
        padded_shape = lead + tuple(s + 2 * p for s, p in zip(spatial, pad)) + trail
        if workspace is None:
            workspace = np.zeros(padded_shape, dtype=x.dtype)
        elif workspace.shape != padded_shape:
            raise ValueError(f"im2col: workspace has shape {workspace.shape}, expected {padded_shape}")
        else:
            _zero_border(workspace, axis, spatial, pad)
        interior = (slice(None),) * axis + tuple(slice(p, p + s) for s, p in zip(spatial, pad))
        workspace[interior] = x
        source = workspace
    else:
        source = x
    strides = source.strides
    lead_strides, (sh, sw), trail_strides = strides[:axis], strides[axis:axis + 2], strides[axis + 2:]
    (dh, dw), (th, tw) = dilation, stride
    windows = as_strided(source, shape=out.shape,
                         strides=lead_strides + (sh * dh, sw * dw, sh * th, sw * tw) + trail_strides,
                         writeable=False)
    np.copyto(out, windows)


def _zero_border(buf, axis, spatial, pad):
    """Zero the padding slabs of a padded image (something else may have written there)."""
    for d, (s, p) in enumerate(zip(spatial, pad)):
        if p:
            before = (slice(None),) * (axis + d)
            buf[before + (slice(0, p),)] = 0
            buf[before + (slice(p + s, None),)] = 0


def _im2col_nd(x, out, lead, spatial, kernel, pad, stride, dilation, out_spatial):
    lead_cut = (slice(None),) * len(lead)
    for kernel_index in itertools.product(*(range(k) for k in kernel)):
        im_slices, col_slices = _offset_slices(kernel_index, spatial, out_spatial, pad, stride, dilation)
        at = lead_cut + kernel_index
        out[at + col_slices] = x[lead_cut + im_slices]
        # Window positions that hang over the border read zero padding.
        for d, (valid, o_size) in enumerate(zip(col_slices, out_spatial)):
            before = at + (slice(None),) * d
            if valid.start > 0:
                out[before + (slice(0, valid.start),)] = 0
            if valid.stop < o_size:
                out[before + (slice(valid.stop, None),)] = 0
    return out


def col2im(cols, image_shape, kernel, pad=0, stride=1, dilation=1, *, axis=2, out=None,
           force_nd=False):
    """Sum the columns back into an image of `image_shape` (the adjoint of im2col).

    Overlapping windows add up; pixels no window covers get 0. `out` is overwritten.
    """
    kernel, pad, stride, dilation = _geometry(kernel, pad, stride, dilation)
    ndim = len(kernel)
    image_shape = tuple(int(s) for s in image_shape)
    lead, spatial, trail = image_shape[:axis], image_shape[axis:axis + ndim], image_shape[axis + ndim:]
    out_spatial = _conv_output(spatial, kernel, pad, stride, dilation)
    col_shape = lead + kernel + out_spatial + trail
    if cols.shape != col_shape:
        raise ValueError(f"col2im: columns have shape {cols.shape}, expected {col_shape} "
                         f"for an image of shape {image_shape}")
    if out is None:
        out = np.zeros(image_shape, dtype=cols.dtype)
    elif out.shape != image_shape:
        raise ValueError(f"col2im: out has shape {out.shape}, expected {image_shape}")
    else:
        out[...] = 0
    lead_cut = (slice(None),) * len(lead)
    if ndim == 2 and not force_nd:
        kernel_h, kernel_w = kernel
        for i in range(kernel_h):
            for j in range(kernel_w):
                im_slices, col_slices = _offset_slices((i, j), spatial, out_spatial, pad, stride, dilation)
                out[lead_cut + im_slices] += cols[lead_cut + (i, j) + col_slices]
    else:
        for kernel_index in itertools.product(*(range(k) for k in kernel)):
            im_slices, col_slices = _offset_slices(kernel_index, spatial, out_spatial, pad, stride,
                                                   dilation)
            out[lead_cut + im_slices] += cols[lead_cut + kernel_index + col_slices]
    return out


@jit.kernel
def col2im_rows(cols, image, trail, c0, c1, stride_h, pad_h, pad_w, dilation_h, dilation_w):
    """col2im of channels c0:c1 for a 2-D kernel with stride_w 1, as one compiled loop.

    cols (C, k_h, k_w, L, H_out, W_out*trail) and image (C, L, H, W*trail), overwritten: any
    `lead` axis L (the images, or 1) between the channels and the rows, and `trail` values per
    pixel (the images when they sit last, or 1). With stride_w 1 the columns of one kernel offset
    and output row land in one contiguous run of an image row, so each (channel, offset, row) is
    one vectorized add. Channel by channel, the image being summed stays in cache, where numpy's
    col2im makes k_h*k_w passes over every channel (LeNet's conv2 backward: 1.2 -> 0.15 ms)."""
    _, kernel_h, kernel_w, lead, out_h, out_row = cols.shape
    height = image.shape[2]
    out_w, width = out_row // trail, image.shape[3] // trail
    for c in range(c0, c1):
        for m in range(lead):
            image[c, m] = 0
            for i in range(kernel_h):
                for j in range(kernel_w):
                    shift = j * dilation_w - pad_w          # image column = output column + shift
                    first, stop = max(0, -shift), min(out_w, width - shift)
                    if stop <= first:
                        continue
                    length = (stop - first) * trail
                    for r in range(out_h):
                        y = r * stride_h - pad_h + i * dilation_h
                        if y < 0 or y >= height:
                            continue
                        dst = image[c, m, y, (first + shift) * trail: (first + shift) * trail + length]
                        src = cols[c, i, j, m, r, first * trail: first * trail + length]
                        for k in range(length):
                            dst[k] += src[k]
