"""Convolution, Deconvolution and Im2col: im2col + matrix products, as Caffe does them.

Caffe convolves one image at a time: im2col the image into a (C*k_h*k_w, H_out*W_out)
matrix, multiply it by the (num_output, C*k_h*k_w) weight matrix, repeat for the next
image. Backward multiplies by the transposes and scatters back with col2im.
Deconvolution runs the same machinery the other way round: its forward is
convolution's backward-to-data and its backward-to-data is convolution's forward.

Here the machinery (`ConvGemm`) works on many images at once, so numpy makes a few
big calls instead of many small ones: the columns of n images form one
(C*K, n*P) matrix (K = kernel size, P = output pixels) and every product is a
single GEMM per group. Two orders of the n*P columns are used:

* batch_outer, image by image: im2col reads the images in place, and outputs are
  copied back in runs of P. Used for large images, where rows are long.
* batch_inner, pixel by pixel with the images innermost: the images are first
  transposed to (C, H, W, n), so every im2col/col2im copy moves runs of W_out*n
  values instead of W_out. Used for small images (LeNet's conv2), where numpy
  would otherwise crawl along 8-value rows.

A 1x1 convolution with stride 1 and no pad skips im2col, as in Caffe. Batches are
processed in chunks so the column buffer stays near COL_BUFFER_BYTES.

Training: a TRAIN convolution whose batch fits one chunk keeps its forward's columns in a
buffer of its own and the backward's weight gradient reuses them instead of running im2col
again (KEPT_COLUMNS_BYTES bounds all kept buffers together). im2col, col2im and the
batch_inner transposes are split over channel (or image) blocks on minicaffe.threads' pool;
the GEMMs use BLAS's own threads.
"""
import threading
import weakref

import numpy as np

from ..blob import Blob, flat_view
from ..fillers import fill
from ..im2col import col2im, col2im_rows, conv_output_shape, deconv_output_shape, im2col
from ..kernels import epilogue, gemm, jit, winograd
from ..kernels.depthwise import DepthwiseConv, is_depthwise
from ..layer import Layer, register_layer
from ..proto import caffe_pb2
from ..threads import get_num_threads, parallel_for
from .neuron import relu, scale_and_shift

__all__ = ["ConvolutionLayer", "DeconvolutionLayer", "Im2colLayer", "ConvGemm",
           "COL_BUFFER_BYTES", "parse_conv_geometry"]

# Upper bound for one chunk's column buffer; a batch whose columns are larger is
# processed a few images at a time (Caffe holds only one image's columns).
COL_BUFFER_BYTES = 32 << 20

# batch_outer im2col walks every image of its chunk once per kernel offset. Keeping
# those images (one channel at a time) within the L2 cache keeps a big strided
# im2col (CaffeNet conv1) as fast as Caffe's one image at a time.
IM2COL_WORKING_SET_BYTES = 256 << 10

# Output rows up to this long use the "batch_inner" column layout (see ConvGemm);
# chosen with benchmarks/conv_bench.py.
BATCH_INNER_MAX_ROW = 16

# A 1x1 weight gradient over images of fewer pixels than this is one GEMM over (C, n*P)
# copies of both operands; per-image GEMMs with K = P that short run at half of BLAS's
# speed (ResNet-50's 7x7 stage: 25 ms -> 16 ms at batch 8, one thread).
ONE_GEMM_1X1_MAX_PIXELS = 128

# A weight gradient over at most this many kernel values per output channel (K) is summed
# from one GEMM per image, each reading dout in place: for small K the product is memory
# bound and copying dout to column order costs more than it (LeNet's conv1, 20 x 25 over
# 64 images of 576 pixels: 1.0 -> 0.28 ms; ResNet-50's conv1, K = 147: 13.3 -> 12.2 ms).
# CaffeNet's conv1 (K = 363) gained nothing, ResNet-50's res3 (K = 1152) lost 15%.
PER_IMAGE_WEIGHT_GRAD_MAX_K = 160

# Weight gradients over at least this many pixels may be computed transposed (see
# flipped_weight_grad). Measured on LeNet, CaffeNet and ResNet-50 shapes: 0.62-0.97x the time
# with OpenBLAS's SkylakeX kernels, mixed (0.88-1.24x) with its Haswell ones.
FLIPPED_WEIGHT_GRAD_MIN_DEPTH = 4096

# In TRAIN, a convolution keeps the columns its forward built for the backward's weight
# gradient instead of building them again, when the whole batch's columns fit in one chunk.
# Kept columns cost memory per layer (the shared workspace holds one buffer for the whole
# net), so all live kept buffers together stay within this budget; layers set up first win.
KEPT_COLUMNS_BYTES = 64 << 20
_KEEPERS = weakref.WeakSet()   # ConvGemms holding kept columns


# -- parameters -----------------------------------------------------------------
def _spatial_values(layer, field, hw, num_spatial, default, minimum):
    """One value per spatial axis from Caffe's `field_h`/`field_w` pair or repeated `field`.

    `hw` is the prefix of the _h/_w pair (None if there is none); the repeated field
    may hold one value for all axes or one per axis; default=None means required.
    """
    param = layer.layer_param.convolution_param
    values = list(getattr(param, field))
    if hw and (param.HasField(f"{hw}_h") or param.HasField(f"{hw}_w")):
        if num_spatial != 2:
            raise layer.error(f"{hw}_h & {hw}_w can only be used for 2D convolution "
                              f"(this input has {num_spatial} spatial axes)")
        if values:
            raise layer.error(f"either {field} or {hw}_h/{hw}_w should be specified, not both")
        result = [getattr(param, f"{hw}_h"), getattr(param, f"{hw}_w")]
    else:
        allowed = (1, num_spatial) if default is None else (0, 1, num_spatial)
        if len(values) not in allowed:
            raise layer.error(f"{field} must be specified once, or once per spatial dimension "
                              f"({field} specified {len(values)} times; {num_spatial} spatial dims)")
        if not values:
            result = [default] * num_spatial
        else:
            result = [values[0 if len(values) == 1 else i] for i in range(num_spatial)]
    if any(v < minimum for v in result):
        raise layer.error(f"{field} must be at least {minimum} in every spatial dimension, got {result}")
    return tuple(int(v) for v in result)


def parse_conv_geometry(layer, bottom, min_spatial=0):
    """Read convolution_param: channel axis, kernel/stride/pad/dilation per spatial axis."""
    param = layer.layer_param.convolution_param
    try:
        channel_axis = bottom[0].canonical_axis(param.axis)
    except IndexError as e:
        raise layer.error(f"convolution_param.axis: {e}") from None
    num_spatial = bottom[0].num_axes - channel_axis - 1
    if num_spatial < min_spatial:
        raise layer.error(f"needs at least {min_spatial} spatial axis after the channel axis "
                          f"{channel_axis}; bottom shape is {bottom[0].shape}")
    return dict(
        channel_axis=channel_axis,
        kernel=_spatial_values(layer, "kernel_size", "kernel", num_spatial, None, 1),
        stride=_spatial_values(layer, "stride", "stride", num_spatial, 1, 1),
        pad=_spatial_values(layer, "pad", "pad", num_spatial, 0, 0),
        dilation=_spatial_values(layer, "dilation", None, num_spatial, 1, 1),
        force_nd=bool(param.force_nd_im2col),
    )


# -- the machinery ----------------------------------------------------------------
class _Workspace(threading.local):
    """Scratch buffers shared by every ConvGemm of a thread, one per role, grown to the largest
    request. Columns here are dead once a layer's own forward or backward call returns (backward
    recomputes them, or uses the layer's own kept copy), so a net needs one column buffer, not
    one per convolution."""

    def __init__(self):
        self.buffers = {}

    def get(self, role, size, dtype):
        size = int(size)
        buf = self.buffers.get((role, dtype))
        if buf is None or buf.size < size:
            buf = self.buffers[(role, dtype)] = np.zeros(size, dtype=dtype)
        return buf[:size]


_WORKSPACE = _Workspace()


class ConvGemm:
    """Convolution as im2col + GEMM over whole chunks of a batch, for one geometry.

    "Image" side: (num, in_channels, *im_spatial); "column" side: (num, out_channels,
    *out_spatial) where out_spatial is the convolution's output size. Weights are
    (out_channels, in_channels/group, *kernel), Caffe's layout. Three products:

      conv(im, w, out)                out = w * im (+ bias)       (conv forward)
      conv_transpose(dout, w, im)     im  = w^T * dout (+ bias)   (conv backward to data)
      dw += dout (x) im               weight gradient, fused into either call

    A deconvolution is the same object with the roles of its blobs swapped.

    The columns of n images form one (C*K, n*P) matrix, so each product is one GEMM
    per group. Its n*P columns are ordered image by image ("batch_outer", the image
    is read in place) or pixel by pixel with the images innermost ("batch_inner",
    the image is transposed to (C, *S, n) first). A 1x1 convolution with stride 1
    and no pad needs no columns at all: the images are multiplied in place.
    """

    LAYOUTS = ("auto", "batch_outer", "batch_inner")

    def __init__(self, in_channels, out_channels, group, kernel, pad, stride, dilation,
                 force_nd=False):
        self.in_channels, self.out_channels, self.group = in_channels, out_channels, group
        self.kernel, self.pad, self.stride, self.dilation = kernel, pad, stride, dilation
        self.force_nd = force_nd
        # Caffe skips im2col when it is the identity.
        self.is_1x1 = all(k == 1 and s == 1 and p == 0 for k, s, p in zip(kernel, stride, pad))
        self.kernel_count = int(np.prod(kernel, dtype=np.int64))
        self.kernel_dim = in_channels // group * self.kernel_count   # K per group
        self.layout = "auto"   # or force one of LAYOUTS[1:] (tests, benchmarks)
        # Keep the forward's columns for the backward (the layer sets this in TRAIN).
        self.keep_columns = False
        self._kept = self._kept_source = None
        self._key = None

    def reshape(self, num, im_spatial, dtype):
        """Size the scratch buffers for `num` images; a no-op when nothing changed."""
        if self.layout not in self.LAYOUTS:
            raise ValueError(f"unknown column layout {self.layout!r}; use one of {self.LAYOUTS}")
        key = (num, tuple(im_spatial), np.dtype(dtype), self.layout, self.keep_columns, jit.enabled())
        self._kept_source = None   # the kept columns are stale after any reshape
        if key == self._key:
            return
        self._key = key
        self.num, self.im_spatial, self.dtype = num, tuple(im_spatial), np.dtype(dtype)
        self.out_spatial = conv_output_shape(self.im_spatial, self.kernel, self.pad, self.stride,
                                             self.dilation)
        self.out_dim = int(np.prod(self.out_spatial, dtype=np.int64))                  # P
        if self.layout == "auto":
            # Short output rows make batch_outer's copies crawl; batch_inner copies runs
            # of W_out*n values instead, paying for transposing images and outputs. With one
            # image both copy runs of W_out, so batch_outer's in-place reads win outright.
            self.batch_inner = (not self.is_1x1 and self.stride[-1] == 1 and num > 1
                                and self.out_spatial[-1] <= BATCH_INNER_MAX_ROW)
        else:
            self.batch_inner = self.layout == "batch_inner" and not self.is_1x1
        c_in, c_out = self.in_channels, self.out_channels
        # col2im as one compiled loop (kernels/jit.py): 2-D, stride_w 1
        self._compiled_col2im = (jit.enabled() and not self.is_1x1 and len(self.kernel) == 2
                                 and not self.force_nd and self.stride[-1] == 1)
        # Summing per-image products (no copy of dout) needs n * C_out * K scratch values: at
        # most the copy of dout it replaces.
        self._per_image_weight_grad = (not self.is_1x1 and not self.batch_inner
                                       and self.kernel_dim <= PER_IMAGE_WEIGHT_GRAD_MAX_K
                                       and self.kernel_dim <= self.out_dim)
        padded_spatial = [s + 2 * p for s, p in zip(self.im_spatial, self.pad)]
        col_per_image = c_in * self.kernel_count * self.out_dim
        # The 1x1 path's only scratch is the per-image weight gradients it sums up.
        per_image = c_out * self.kernel_dim if self.is_1x1 else col_per_image
        per_image_bytes = max(1, per_image * self.dtype.itemsize)
        chunk = max(1, min(num, COL_BUFFER_BYTES // per_image_bytes))
        self.chunk = chunk                     # conv_transpose: GEMM then col2im
        self.conv_chunk = chunk                # conv: im2col then GEMM
        if not self.batch_inner and not self.is_1x1:
            channel_bytes = int(np.prod(padded_spatial)) * self.dtype.itemsize
            self.conv_chunk = max(1, min(chunk, IM2COL_WORKING_SET_BYTES // channel_bytes))
        self._keep(num * col_per_image, chunk == num)
        if self._kept is not None:
            self.conv_chunk = num   # the columns are built for the whole batch at once
        padded = np.prod(padded_spatial)
        sums_images = self.is_1x1 or self._per_image_weight_grad   # _sum_image_products' scratch
        self._scratch_sizes = dict(
            cols=0 if self.is_1x1 else chunk * col_per_image,
            padded=chunk * c_in * padded if any(self.pad) and not self.is_1x1 else 0,
            image_t=chunk * c_in * np.prod(self.im_spatial) if self.batch_inner or self.is_1x1 else 0,
            out_t=chunk * c_out * self.out_dim,
            dw=c_out * self.kernel_dim * (chunk if sums_images else 1),
            dw_sum=c_out * self.kernel_dim if sums_images else 0)

    def _keep(self, size, one_chunk):
        """Own a buffer for the whole batch's columns if keep_columns and the budget allow."""
        _KEEPERS.discard(self)
        self._kept = None
        nbytes = size * self.dtype.itemsize
        others = sum(k._kept.nbytes for k in _KEEPERS if k._kept is not None)
        if self.keep_columns and not self.is_1x1 and one_chunk and others + nbytes <= KEPT_COLUMNS_BYTES:
            self._kept = np.empty(size, dtype=self.dtype)
            _KEEPERS.add(self)

    # Scratch arrays, fetched at each use from the thread's shared workspace.
    _cols = property(lambda self: _WORKSPACE.get("cols", self._scratch_sizes["cols"], self.dtype))
    _padded = property(lambda self: _WORKSPACE.get("padded", self._scratch_sizes["padded"], self.dtype))
    _image_t = property(lambda self: _WORKSPACE.get("image_t", self._scratch_sizes["image_t"], self.dtype))
    _out_t = property(lambda self: _WORKSPACE.get("out_t", self._scratch_sizes["out_t"], self.dtype))
    _dw = property(lambda self: _WORKSPACE.get("dw", self._scratch_sizes["dw"], self.dtype))
    _dw_sum = property(lambda self: _WORKSPACE.get("dw_sum", self._scratch_sizes["dw_sum"], self.dtype))

    def _chunks(self, size):
        for start in range(0, self.num, size):
            yield start, min(self.num, start + size)

    # -- public products ---------------------------------------------------------
    # Whether conv() takes relu_slope (the compiled epilogue applies it with the bias).
    fuses_relu = property(lambda self: jit.enabled())

    def conv(self, im, w, out=None, dout=None, dw=None, bias=None, relu_slope=None):
        """out = w * im + bias (if out given), then a ReLU with relu_slope if given (only where
        fuses_relu); dw += dout (x) im (if dw given). Shares the im2col.

        With keep_columns, a forward (no dw) leaves im's columns for conv_transpose's dw."""
        if relu_slope is not None and not self.fuses_relu:
            raise ValueError("relu_slope needs compiled kernels (see fuses_relu)")
        if self.is_1x1:
            for a, b in self._chunks(self.conv_chunk):
                self._conv_1x1(im[a:b], w, None if out is None else out[a:b],
                               None if dw is None else dout[a:b], dw,
                               self._channel_bias(bias, self.out_channels), relu_slope)
            return
        keep = self._kept is not None and dw is None
        for a, b in self._chunks(self.conv_chunk):
            self._conv(im[a:b], w, None if out is None else out[a:b], None if dw is None else dout[a:b],
                       dw, self._channel_bias(bias, self.out_channels), self._kept if keep else None,
                       relu_slope)
        self._kept_source = _identity(im) if keep else None

    def conv_transpose(self, dout, w, im=None, im_data=None, dw=None, bias=None):
        """im = w^T * dout + bias (if im given, overwritten); dw += dout (x) im_data (if dw given).

        dw reuses the columns the last forward kept when im_data is the array it read (Caffe's
        backward reads the bottom again; both see the same values unless something wrote into
        the bottom in between)."""
        step = self._transpose_1x1 if self.is_1x1 else self._transpose
        kept = dw is not None and self._kept_source is not None and self._kept_source == _identity(im_data)
        for a, b in self._chunks(self.chunk):
            extra = {"kept": self._kept} if kept else {}
            step(dout[a:b], w, None if im is None else im[a:b], None if dw is None else im_data[a:b], dw,
                 self._channel_bias(bias, self.in_channels), **extra)

    def _channel_bias(self, bias, channels):
        """Bias as a (channels, 1) column to broadcast over pixels; added while a chunk is in cache."""
        if bias is None:
            return None
        if bias.shape != (channels,):
            raise ValueError(f"bias has shape {bias.shape}, expected ({channels},)")
        return bias.reshape(channels, 1)

    # -- columns, and the (C_out, n*P) matrix on the output side ---------------------
    def _columns(self, im, buffer=None):
        """im2col of (n, C, *S) images into the column matrix, viewed (group, C/group*K, n*P).

        buffer: where the columns go (default: the shared workspace)."""
        n, c, ndim = im.shape[0], self.in_channels, len(self.kernel)
        padded = tuple(s + 2 * p for s, p in zip(self.im_spatial, self.pad))
        buffer = self._cols if buffer is None else buffer
        if self.batch_inner:
            image = flat_view(self._image_t, (c,) + self.im_spatial + (n,))
            parallel_for(c, lambda lo, hi: np.copyto(image[lo:hi], np.moveaxis(im[:, lo:hi], 0, -1)),
                         image[0].size)
            cols = flat_view(buffer, (c,) + self.kernel + self.out_spatial + (n,))
            target, axis, workspace_shape = cols, 1, (c,) + padded + (n,)
        else:
            image = im.swapaxes(0, 1)                       # (C, n, *S): a view, no copy
            cols = flat_view(buffer, (c,) + self.kernel + (n,) + self.out_spatial)
            # (C, n, *K, *O): the columns' image axis moved next to the channels (transpose,
            # not np.moveaxis, whose argument checks cost more than the move)
            order = (0, 1 + ndim) + tuple(range(1, 1 + ndim)) + tuple(range(2 + ndim, 2 + 2 * ndim))
            target, axis, workspace_shape = cols.transpose(order), 2, (c, n) + padded
        workspace = flat_view(self._padded, workspace_shape) if any(self.pad) else None
        self._split(lambda image, target, workspace: im2col(
            image, self.kernel, self.pad, self.stride, self.dilation, axis=axis, out=target,
            workspace=workspace, force_nd=self.force_nd), image, target, workspace)
        return cols.reshape(self.group, self.kernel_dim, -1)

    def _split(self, copy, image, cols, workspace=None):
        """Run copy(image, cols, workspace) over blocks of channels (or, batch_outer with few
        channels but more images, of images) on the thread pool: im2col and col2im are
        independent there. A batch-1 first layer (3 channels) splits by channel: GoogLeNet's
        7x7 conv1 1.3 -> 1.1 ms."""
        axis = 1 if (not self.batch_inner and image.shape[0] < 2 * get_num_threads()
                     and image.shape[1] > image.shape[0]) else 0
        cut = lambda a, lo, hi: None if a is None else a[(slice(None),) * axis + (slice(lo, hi),)]  # noqa: E731
        size = image.shape[axis]
        parallel_for(size, lambda lo, hi: copy(cut(image, lo, hi), cut(cols, lo, hi), cut(workspace, lo, hi)),
                     cols.size // size)

    def _col2im(self, cols, im, bias):
        """Sum the (C*K, n*P) columns back into the images im (n, C, *S), overwriting them."""
        n, c, ndim = im.shape[0], self.in_channels, len(self.kernel)
        geometry = (self.kernel, self.pad, self.stride, self.dilation)
        flat_im = im.reshape(n, c, -1)
        if self.batch_inner:
            image = flat_view(self._image_t, (c,) + self.im_spatial + (n,))
            cols, axis = cols.reshape((c,) + self.kernel + self.out_spatial + (n,)), 1
        else:
            order = (0, 1 + ndim) + tuple(range(1, 1 + ndim)) + tuple(range(2 + ndim, 2 + 2 * ndim))
            cols = cols.reshape((c,) + self.kernel + (n,) + self.out_spatial).transpose(order)
            image, axis = im.swapaxes(0, 1), 2
        if self._compiled_col2im:
            self._col2im_compiled(cols, image)
        else:
            self._split(lambda image, cols, _: col2im(cols, image.shape, *geometry, axis=axis, out=image,
                                                       force_nd=self.force_nd), image, cols)
        if self.batch_inner:
            by_image = image.reshape(c, -1, n).transpose(2, 0, 1)
            parallel_for(n, lambda lo, hi: _store(flat_im[lo:hi], by_image[lo:hi], bias), flat_im[0].size)
        else:
            _store(flat_im, flat_im, bias)

    def _col2im_compiled(self, cols, image):
        """_col2im's sum by the compiled kernel (im2col.col2im_rows), over channel blocks."""
        if self.batch_inner:   # cols (C, k_h, k_w, H_out, W_out, n), image (C, H, W, n)
            lead, trail = 1, image.shape[-1]
            cols, image = cols[:, :, :, None], image[:, None]
        else:                  # cols (C, n, k_h, k_w, H_out, W_out) -> (C, k_h, k_w, n, ...), image (C, n, H, W)
            lead, trail = image.shape[1], 1
            cols = cols.transpose(0, 2, 3, 1, 4, 5)
        c = self.in_channels
        rows = cols.reshape(cols.shape[:5] + (-1,))
        image = image.reshape(image.shape[:3] + (-1,))
        # the kernel checks no bounds: the shapes must agree
        assert rows.shape[:4] == (c,) + self.kernel + (lead,) and image.shape[:2] == (c, lead)
        parallel_for(c, lambda lo, hi: col2im_rows(rows, image, trail, lo, hi, self.stride[0], self.pad[0],
                                                   self.pad[1], self.dilation[0], self.dilation[1]),
                     cols[0].size)

    def _output_matrix(self, n):
        """Scratch (C_out, n*P) matrix, ordered like the columns."""
        return flat_view(self._out_t, (self.out_channels, n * self.out_dim))

    def _as_blob_order(self, matrix, n):
        """View of the (C_out, n*P) matrix with axes (n, C_out, P)."""
        if self.batch_inner:
            return matrix.reshape(self.out_channels, self.out_dim, n).transpose(2, 0, 1)
        return matrix.reshape(self.out_channels, n, self.out_dim).transpose(1, 0, 2)

    def _weight_grad_of(self, dout, cols, dw, dout_matrix=None):
        """dw += dout (x) cols, for dout (n, C_out, *O) and cols (group, K, n*P) in column order;
        dout_matrix: dout already in column order, if the caller has it."""
        n = dout.shape[0]
        if dout_matrix is None and self._per_image_weight_grad and n > 1:
            by_image = cols.reshape(self.group, self.kernel_dim, n, self.out_dim).transpose(2, 0, 1, 3)
            self._sum_image_products(dout, by_image, dw)
            return
        self._weight_grad(self._load_dout(dout) if dout_matrix is None else dout_matrix, cols, dw)

    def _weight_grad(self, dout_matrix, cols, dw):
        g, pixels = self.group, cols.shape[-1]
        dout_matrix = dout_matrix.reshape(g, -1, pixels)
        flat_dw = dw.reshape(g, -1, self.kernel_dim)
        if flipped_weight_grad(flat_dw.shape[1], self.kernel_dim, pixels):
            product = flat_view(self._dw, (g, self.kernel_dim, flat_dw.shape[1]))
            gemm.matmul(cols, dout_matrix.swapaxes(-1, -2), product)
            product = product.swapaxes(-1, -2)
        else:
            product = flat_view(self._dw, flat_dw.shape)
            gemm.matmul(dout_matrix, cols.swapaxes(-1, -2), product)
        np.add(flat_dw, product, out=flat_dw)

    def _load_dout(self, dout):
        n = dout.shape[0]
        if n == 1 and not self.batch_inner:
            return dout.reshape(self.out_channels, self.out_dim)   # already in column order
        matrix = self._output_matrix(n)
        self._as_blob_order(matrix, n)[...] = dout.reshape(n, self.out_channels, self.out_dim)
        return matrix

    def _conv(self, im, w, out, dout, dw, bias, buffer=None, relu_slope=None):
        n, g = im.shape[0], self.group
        cols = self._columns(im, buffer)
        if dw is not None:
            self._weight_grad_of(dout, cols, dw)
        if out is not None:
            flat_out = out.reshape(n, self.out_channels, self.out_dim)
            # One batch_outer image is already in blob order: multiply straight into it.
            direct = n == 1 and not self.batch_inner
            result = flat_out[0] if direct else self._output_matrix(n)
            gemm.matmul(w.reshape(g, -1, self.kernel_dim), cols, result.reshape(g, -1, cols.shape[-1]))
            _store(flat_out, flat_out if direct else self._as_blob_order(result, n), bias, relu_slope)

    def _transpose(self, dout, w, im, im_data, dw, bias, kept=None):
        g, columns = self.group, dout.shape[0] * self.out_dim
        # dout in column order feeds the product to data; a weight gradient alone may read
        # dout in place (_weight_grad_of).
        dout_matrix = None if im is None else self._load_dout(dout).reshape(g, -1, columns)
        if dw is not None:
            cols = (self._columns(im_data) if kept is None
                    else flat_view(kept, (g, self.kernel_dim, columns)))
            self._weight_grad_of(dout, cols, dw, dout_matrix)
        if im is not None:
            cols = flat_view(self._cols, (g, self.kernel_dim, columns))
            gemm.matmul(w.reshape(g, -1, self.kernel_dim).swapaxes(-1, -2), dout_matrix, cols)
            self._col2im(cols, im, bias)

    # -- 1x1: the images are the columns (n, C, P), one matmul per image ---------------
    def _weight_grad_1x1(self, dout, im, dw):
        # dw = sum over images of dout_n @ im_n^T: the images' (n, P) axes cannot be merged
        # into one GEMM axis without a copy, so multiply per image and add up -- or, for small
        # images, copy both to (C, n*P) and make it one GEMM.
        n, g = im.shape[0], self.group
        if n > 1 and self.out_dim < ONE_GEMM_1X1_MAX_PIXELS:
            dout_t = flat_view(self._out_t, (self.out_channels, n, self.out_dim))
            im_t = flat_view(self._image_t, (self.in_channels, n, self.out_dim))
            dout_t[...] = dout.reshape(n, self.out_channels, -1).transpose(1, 0, 2)
            im_t[...] = im.reshape(n, self.in_channels, -1).transpose(1, 0, 2)
            self._weight_grad(dout_t, im_t.reshape(g, -1, n * self.out_dim), dw)
            return
        self._sum_image_products(dout, im.reshape(n, g, -1, self.out_dim), dw)

    def _sum_image_products(self, dout, cols, dw):
        """dw += the sum over images of dout_n (C_out, P) @ cols_n^T, cols (n, group, K, P):
        one GEMM per image, each reading its operands in place (cols may be strided)."""
        n, g = dout.shape[0], self.group
        per_image = flat_view(self._dw, (n, g, self.out_channels // g, self.kernel_dim))
        gemm.matmul(dout.reshape(n, g, -1, self.out_dim), cols.swapaxes(-1, -2), per_image)
        total = self._dw_sum.reshape(per_image.shape[1:])
        np.sum(per_image, axis=0, out=total)
        flat_dw = dw.reshape(total.shape)
        np.add(flat_dw, total, out=flat_dw)

    def _conv_1x1(self, im, w, out, dout, dw, bias, relu_slope=None):
        n, g = im.shape[0], self.group
        if dw is not None:
            self._weight_grad_1x1(dout, im, dw)
        if out is not None:
            gemm.matmul(w.reshape(1, g, -1, self.kernel_dim), im.reshape(n, g, -1, self.out_dim),
                        out.reshape(n, g, -1, self.out_dim))
            flat_out = out.reshape(n, self.out_channels, -1)
            _store(flat_out, flat_out, bias, relu_slope)

    def _transpose_1x1(self, dout, w, im, im_data, dw, bias):
        n, g = dout.shape[0], self.group
        if dw is not None:
            self._weight_grad_1x1(dout, im_data, dw)
        if im is not None:
            gemm.matmul(w.reshape(1, g, -1, self.kernel_dim).swapaxes(-1, -2),
                        dout.reshape(n, g, -1, self.out_dim), im.reshape(n, g, -1, self.out_dim))
            flat_im = im.reshape(n, self.in_channels, -1)
            _store(flat_im, flat_im, bias)


def flipped_weight_grad(rows, cols, depth):
    """Whether the (rows, cols) weight gradient, a product over `depth` pixels, is better
    computed as its (cols, rows) transpose and added back transposed.

    OpenBLAS runs these skinny products (both operands read along the long pixel axis)
    faster with the larger output dimension first: LeNet's conv2 (50 x 500 over 4096
    pixels) takes 0.76 ms instead of 1.09 with its SkylakeX kernels, ResNet-50's res2
    3x3 (64 x 576 over 25088) 6.6 instead of 8.6. The transposed add costs rows*cols
    strided reads, which long pixel axes hide and short ones do not (256 x 2304 over
    1568 loses 13%)."""
    return cols > rows and depth >= FLIPPED_WEIGHT_GRAD_MIN_DEPTH


def _identity(array):
    """What an array is (memory, shape, strides, dtype) -- not what it holds."""
    return (array.__array_interface__["data"][0], array.shape, array.strides, array.dtype)


def _store(dest, values, bias, relu_slope=None):
    """dest = values (+ bias per channel), in one pass; dest and values may be the same array.
    With compiled kernels the pass is epilogue.store, which also applies relu_slope's ReLU
    (ConvGemm.fuses_relu)."""
    if jit.enabled() and (relu_slope is not None or bias is not None or values is not dest):
        epilogue.store(dest, values, bias, relu_slope)
    elif relu_slope is not None:
        raise ValueError("relu_slope needs compiled kernels (see ConvGemm.fuses_relu)")
    elif bias is not None:
        np.add(values, bias, out=dest)
    elif values is not dest:
        dest[...] = values


# -- layers ---------------------------------------------------------------------
class _BaseConvolution(Layer):
    """Shared setup of Convolution and Deconvolution (Caffe's BaseConvolutionLayer)."""

    min_num_bottom = 1
    min_num_top = 1
    equal_num_bottom_top = True
    reverse_dimensions = False   # True for Deconvolution

    def layer_setup(self, bottom, top):
        param = self.layer_param.convolution_param
        geo = parse_conv_geometry(self, bottom)
        self.channel_axis = geo["channel_axis"]
        self.kernel, self.stride, self.pad = geo["kernel"], geo["stride"], geo["pad"]
        self.dilation, self.force_nd = geo["dilation"], geo["force_nd"]
        self.num_spatial = len(self.kernel)
        self.channels = bottom[0].shape[self.channel_axis]
        if self.channels <= 0:
            # A weight matrix with no input columns: refuse it here rather than in the GEMM.
            raise self.error(f"bottom {self.layer_param.bottom[0]!r} has shape {bottom[0].shape}: "
                             f"no input channels to convolve")
        self.num_output, self.group = self._output_and_group(param)
        if self.num_output <= 0:
            raise self.error("convolution_param.num_output must be set to a positive number")
        if self.group <= 0:
            raise self.error("convolution_param.group must be positive")
        if self.channels % self.group:
            raise self.error(f"the {self.channels} input channels are not divisible by group {self.group}")
        if self.num_output % self.group:
            raise self.error(f"num_output {self.num_output} must be a multiple of group {self.group}")
        if self.reverse_dimensions:
            conv_out, conv_in = self.channels, self.num_output
        else:
            conv_out, conv_in = self.num_output, self.channels
        weight_shape = (conv_out, conv_in // self.group) + self.kernel
        self.bias_term = param.bias_term
        bias_shape = (self.num_output,)
        if self.blobs_loaded:
            if len(self.blobs) != 1 + self.bias_term:
                raise self.error(f"incorrect number of weight blobs: expected {1 + self.bias_term}, "
                                 f"got {len(self.blobs)}")
            if self.blobs[0].shape != weight_shape:
                raise self.error(f"incorrect weight shape: expected {weight_shape}, "
                                 f"got {self.blobs[0].shape}")
            if self.bias_term and self.blobs[1].shape != bias_shape:
                raise self.error(f"incorrect bias shape: expected {bias_shape}, got {self.blobs[1].shape}")
            # Weights read from a file are float32; a float64 layer (gradient checks) needs float64.
            for i, b in enumerate(self.blobs):
                if b.dtype != self.dtype:
                    converted = Blob(b.shape, dtype=self.dtype, name=b.name)
                    converted.data[...] = b.data
                    self.blobs[i] = converted
        else:
            weight = Blob(weight_shape, dtype=self.dtype)
            fill(weight, param.weight_filler, what=f"layer {self.name!r} weight_filler")
            self.blobs = [weight]
            if self.bias_term:
                bias = Blob(bias_shape, dtype=self.dtype)
                fill(bias, param.bias_filler, what=f"layer {self.name!r} bias_filler")
                self.blobs.append(bias)
        self.gemm = self._make_kernel(conv_in, conv_out)

    # Tests and benchmarks set this False on a layer (before setup) to force ConvGemm.
    use_depthwise_kernel = True

    def _make_kernel(self, conv_in, conv_out):
        """The one place that picks the convolution machinery: a depthwise convolution
        (group == channels, 2-D) gets DepthwiseConv, everything else ConvGemm. (A Convolution's
        forward may instead run Winograd, picked per input shape in ConvolutionLayer.reshape.)"""
        if (self.use_depthwise_kernel and not self.reverse_dimensions
                and is_depthwise(conv_in, conv_out, self.group, self.num_spatial)):
            return DepthwiseConv(conv_in, conv_out, self.kernel, self.pad, self.stride, self.dilation)
        return ConvGemm(conv_in, conv_out, self.group, self.kernel, self.pad, self.stride,
                        self.dilation, self.force_nd)

    def _output_and_group(self, param):
        return param.num_output, param.group

    def reshape(self, bottom, top):
        axis = self.channel_axis
        shape = bottom[0].shape
        if len(shape) != axis + 1 + self.num_spatial:
            raise self.error(f"bottom num_axes may not change: set up with {axis + 1 + self.num_spatial} "
                             f"axes, got shape {shape}")
        if shape[axis] != self.channels:
            raise self.error(f"input has {shape[axis]} channels but the layer was set up for "
                             f"{self.channels}")
        for i, b in enumerate(bottom[1:], 1):
            if b.shape != shape:
                raise self.error(f"shape mismatch - bottom[0]: {shape} vs. bottom[{i}]: {b.shape}")
        for i, (b, t) in enumerate(zip(bottom, top)):
            if b is t:
                raise self.error(f"cannot run in place (top[{i}] is bottom[{i}])")
        self.num = int(np.prod(shape[:axis], dtype=np.int64))
        self.bottom_spatial = shape[axis + 1:]
        try:
            self.top_spatial = self.compute_output_shape(self.bottom_spatial)
        except ValueError as e:
            raise self.error(str(e)) from None
        top_shape = shape[:axis] + (self.num_output,) + self.top_spatial
        for t in top:
            t.reshape(top_shape)
        im_spatial = self.top_spatial if self.reverse_dimensions else self.bottom_spatial
        self.gemm.reshape(self.num, im_spatial, self.dtype)

    def _bottom(self, array):
        return array.reshape((self.num, self.channels) + self.bottom_spatial)

    def _top(self, array):
        return array.reshape((self.num, self.num_output) + self.top_spatial)

    def _bias(self):
        return self.blobs[1].data if self.bias_term else None

    def _bias_grad(self, top_diff):
        """db += sum over images and pixels of top_diff: per image a GEMV with ones, as Caffe
        does (BLAS streams the rows; numpy's sum over axes (0, 2) is about twice as slow)."""
        if self.bias_term and self.param_propagate_down[1]:
            flat = top_diff.reshape(self.num, self.num_output, -1)
            ones = getattr(self, "_ones", None)
            if ones is None or ones.shape != flat.shape[-1:] or ones.dtype != flat.dtype:
                ones = self._ones = np.ones(flat.shape[-1], dtype=flat.dtype)
            self.blobs[1].diff[...] += np.matmul(flat, ones).sum(axis=0)


@register_layer("Convolution")
class ConvolutionLayer(_BaseConvolution):
    """top = W * bottom + b: (N, C, *S) -> (N, num_output, *O), W (num_output, C/group, *kernel),
    O_d = (S_d + 2*pad_d - (dilation_d*(kernel_d - 1) + 1)) // stride_d + 1."""

    # Winograd forward for 3x3 stride-1 convolutions (minicaffe/kernels/winograd.py): "auto"
    # uses winograd.choose_tile on float32 TEST-phase layers; False never, 2 or 4 forces that
    # tile size wherever the geometry allows (tests, benchmarks). Backward always uses im2col.
    winograd = "auto"
    _winograd = None
    # In TRAIN, keep the forward's columns for the weight gradient (ConvGemm.keep_columns,
    # within KEPT_COLUMNS_BYTES); tests and benchmarks set this False to rebuild them.
    keep_columns = True

    def compute_output_shape(self, spatial):
        return conv_output_shape(spatial, self.kernel, self.pad, self.stride, self.dilation)

    def _reshape_key(self, bottom, top):
        """Everything reshape's result depends on: a net calls reshape before every forward, and
        recomputing the geometry costs ~35 us a layer (a millisecond per batch-1 SqueezeNet)."""
        return (tuple(b.shape for b in bottom), tuple(map(id, bottom)), tuple(map(id, top)),
                self.dtype, self.phase, self.winograd, self.keep_columns, self.frozen_weights,
                getattr(self.gemm, "layout", None), jit.enabled())

    _last_reshape = None   # (key, top shape) of the last full reshape

    def reshape(self, bottom, top):
        key = self._reshape_key(bottom, top)
        last = self._last_reshape
        if last is not None and last[0] == key:
            for t in top:
                t.reshape(last[1])
            if isinstance(self.gemm, ConvGemm):
                self.gemm._kept_source = None   # as ConvGemm.reshape does: kept columns are stale
            return
        self._last_reshape = None   # not valid until this reshape has succeeded
        self._full_reshape(bottom, top)
        self._last_reshape = (key, top[0].shape)

    def _full_reshape(self, bottom, top):
        if isinstance(self.gemm, ConvGemm):
            self.gemm.keep_columns = self.keep_columns and self.phase == caffe_pb2.TRAIN
        super().reshape(bottom, top)
        tile = None
        if (self.kernel == (3, 3) and self.stride == (1, 1) and self.dilation == (1, 1)
                and self.group == 1 and self.winograd is not False):
            if self.winograd == "auto":
                if self.phase == caffe_pb2.TEST and self.dtype == np.float32:
                    tile = winograd.choose_tile(self.channels, self.num_output, self.top_spatial,
                                                self.num)
            else:
                tile = self.winograd
        self._winograd = None
        if tile is not None:
            # Kept per tile size: each holds its transformed weights.
            kernels = self.__dict__.setdefault("_winograd_kernels", {})
            if tile not in kernels:
                kernels[tile] = winograd.WinogradConv(self.channels, self.num_output, self.pad,
                                                      tile, scratch=_WORKSPACE.get)
            self._winograd = kernels[tile]
            self._winograd.frozen = self.frozen_weights
            self._winograd.reshape(self.num, self.bottom_spatial, self.dtype)

    # Inference nets set this (fold.freeze_weights): their weights change only by copy_from or
    # fold_params, so Winograd's transformed weights are not re-checked at every forward.
    frozen_weights = False

    def freeze_weights(self):
        self.frozen_weights = True
        for kernel in self.__dict__.get("_winograd_kernels", {}).values():
            kernel.frozen = True
            kernel.forget_weights()

    # An inference net's copy of the layer with a ReLU fused into it (fold.py) sets the slope.
    fused_relu_slope = None

    # ... and this, the folded chain's per-channel scale, when it scales the output instead of
    # a copy of the weights (then blobs[1] holds the folded bias, added after the scale).
    output_scale = None

    def forward(self, bottom, top):
        weight = self.blobs[0].data
        scale = self.output_scale
        bias = self._bias() if scale is None else None
        kernel = self.gemm if self._winograd is None else self._winograd
        # A kernel that can apply the fused ReLU as it writes saves a pass over the output.
        relu_in_kernel = (self.fused_relu_slope is not None and scale is None
                          and getattr(kernel, "fuses_relu", False))
        for b, t in zip(bottom, top):
            out = self._top(t.data)
            if relu_in_kernel:
                kernel.conv(self._bottom(b.data), weight, out=out, bias=bias, relu_slope=self.fused_relu_slope)
            else:
                kernel.conv(self._bottom(b.data), weight, out=out, bias=bias)
            if scale is not None:
                scale_and_shift(out, scale, self._bias(), self.channel_axis)
            if self.fused_relu_slope is not None and not relu_in_kernel:
                relu(t.data, t.data, self.fused_relu_slope)

    def backward(self, top, propagate_down, bottom):
        weight = self.blobs[0]
        for i, (t, b) in enumerate(zip(top, bottom)):
            top_diff = self._top(t.diff)
            self._bias_grad(top_diff)
            want_w = self.param_propagate_down[0]
            if want_w or propagate_down[i]:
                self.gemm.conv_transpose(
                    top_diff, weight.data,
                    im=self._bottom(b.diff) if propagate_down[i] else None,
                    im_data=self._bottom(b.data), dw=weight.diff if want_w else None)


@register_layer("DepthwiseConvolution")
class DepthwiseConvolutionLayer(ConvolutionLayer):
    """The depthwise-conv forks' type (yonghenglh6/DepthwiseConvolution): a Convolution with
    its own CUDA kernel, same parameters and blobs; group is read from the prototxt.

    Caffe semantics are exactly Convolution's; with group == channels it runs the
    depthwise kernel (minicaffe/kernels/depthwise.py), like a plain Convolution would.
    """


@register_layer("ConvolutionDepthwise")
class ConvolutionDepthwiseLayer(ConvolutionLayer):
    """ShuffleNet/MobileNet forks' ConvolutionDepthwise: (N, C, H, W) -> (N, C, H_out, W_out),
    one k_h x k_w filter per channel, W (C, 1, k_h, k_w); group is implied (= C).

    The fork ignores num_output and group; here they must be absent or equal C, since
    any other value would describe a different convolution than the one that runs.
    """

    def _output_and_group(self, param):
        channels = self.channels
        for field in ("num_output", "group"):
            if param.HasField(field) and getattr(param, field) != channels:
                raise self.error(f"convolution_param.{field} is {getattr(param, field)} but "
                                 f"ConvolutionDepthwise has one output per input channel "
                                 f"({channels}); drop it or set it to {channels}")
        return channels, channels


@register_layer("Deconvolution")
class DeconvolutionLayer(_BaseConvolution):
    """Convolution run backwards: (N, C, *S) -> (N, num_output, *O), W (C, num_output/group, *kernel),
    O_d = stride_d*(S_d - 1) + dilation_d*(kernel_d - 1) + 1 - 2*pad_d."""

    reverse_dimensions = True

    def compute_output_shape(self, spatial):
        return deconv_output_shape(spatial, self.kernel, self.pad, self.stride, self.dilation)

    def forward(self, bottom, top):
        weight = self.blobs[0].data
        for b, t in zip(bottom, top):
            self.gemm.conv_transpose(self._bottom(b.data), weight, im=self._top(t.data), bias=self._bias())

    def backward(self, top, propagate_down, bottom):
        weight = self.blobs[0]
        for i, (t, b) in enumerate(zip(top, bottom)):
            top_diff = self._top(t.diff)
            self._bias_grad(top_diff)
            want_w = self.param_propagate_down[0]
            if want_w or propagate_down[i]:
                # The top's gradient is the "image" here; one im2col serves both products.
                self.gemm.conv(top_diff, weight.data,
                               out=self._bottom(b.diff) if propagate_down[i] else None,
                               dout=self._bottom(b.data), dw=weight.diff if want_w else None)


@register_layer("Im2col")
class Im2colLayer(Layer):
    """Every kernel window as a column: (N, C, *S) -> (N, C*prod(kernel), *O), O as in Convolution."""

    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        geo = parse_conv_geometry(self, bottom, min_spatial=1)
        self.channel_axis = geo["channel_axis"]
        self.kernel, self.stride, self.pad = geo["kernel"], geo["stride"], geo["pad"]
        self.dilation, self.force_nd = geo["dilation"], geo["force_nd"]
        self.num_spatial = len(self.kernel)
        self._workspace_key = None

    def reshape(self, bottom, top):
        axis, shape = self.channel_axis, bottom[0].shape
        if len(shape) != axis + 1 + self.num_spatial:
            raise self.error(f"bottom num_axes may not change: set up with {axis + 1 + self.num_spatial} "
                             f"axes, got shape {shape}")
        if top[0] is bottom[0]:
            raise self.error("cannot run in place")
        self.num = int(np.prod(shape[:axis], dtype=np.int64))
        self.channels = shape[axis]
        self.spatial = shape[axis + 1:]
        try:
            self.out_spatial = conv_output_shape(self.spatial, self.kernel, self.pad, self.stride,
                                                 self.dilation)
        except ValueError as e:
            raise self.error(str(e)) from None
        kernel_count = int(np.prod(self.kernel, dtype=np.int64))
        top[0].reshape(shape[:axis] + (self.channels * kernel_count,) + self.out_spatial)
        padded = (self.num, self.channels) + tuple(s + 2 * p for s, p in zip(self.spatial, self.pad))
        if any(self.pad) and self._workspace_key != (padded, self.dtype):
            self._workspace = np.zeros(padded, dtype=self.dtype)
            self._workspace_key = (padded, self.dtype)

    def _views(self, bottom_array, top_array):
        image = bottom_array.reshape((self.num, self.channels) + self.spatial)
        cols = top_array.reshape((self.num, self.channels) + self.kernel + self.out_spatial)
        return image, cols

    def forward(self, bottom, top):
        image, cols = self._views(bottom[0].data, top[0].data)
        im2col(image, self.kernel, self.pad, self.stride, self.dilation, axis=2, out=cols,
               workspace=self._workspace if any(self.pad) else None, force_nd=self.force_nd)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        image, cols = self._views(bottom[0].diff, top[0].diff)
        col2im(cols, image.shape, self.kernel, self.pad, self.stride, self.dilation, axis=2,
               out=image, force_nd=self.force_nd)
