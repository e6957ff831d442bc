"""Normalization layers: LRN, BatchNorm, MVN, and the affine pair Scale and Bias.

Caffe's BatchNorm only normalizes: y = (x - mean) / sqrt(var + eps). The learned
per-channel gamma and beta of the batch-norm paper come from a following Scale
layer with bias_term: true.
"""
import numpy as np

from ..blob import Blob, zeros
from ..fillers import fill
from ..kernels import jit
from ..kernels.normalization import (LRN_BETAS, LRN_BLOCK, batch_norm_input_grad, batch_norm_layer_grad,
                                     lrn_across_channels, lrn_across_channels_backward,
                                     normalize_scale_relu)
from ..layer import Layer, register_layer
from ..proto import caffe_pb2
from ..threads import parallel_for
from .neuron import relu_piece
from .pooling import PoolWindows, average_pool, average_pool_backward

__all__ = ["LRNLayer", "BatchNormLayer", "MVNLayer", "ScaleLayer", "BiasLayer", "BNLayer"]

_LRN = caffe_pb2.LRNParameter


def _in_place(bottom, top):
    return top[0] is bottom[0] or top[0].shares_data_with(bottom[0])


def _buffer(current, shape, dtype, fill_value=None):
    """Reuse a scratch array when shape and dtype still match, else make a new one.

    New ones are untouched zero pages (blob.zeros): the training-only buffers of a layer that
    an inference net folds away or never runs backward through cost no memory."""
    if current is not None and current.shape == tuple(shape) and current.dtype == dtype:
        return current
    if fill_value is None:
        return zeros(shape, dtype)
    return np.full(shape, fill_value, dtype=dtype)


# Rows per block in _over_rows hold about this many elements: the few arrays a block pass
# touches (512 KiB each in float32) stay in the 1-2 MiB L2 between its steps, and there are few
# enough blocks that numpy's per-call cost stays small. A fused BatchNorm+Scale+ReLU on ResNet-50
# shapes at batch 8 (256x56x56, 64x56x56, 1024x14x14, alone in a net) ran forward+backward
# 1.3-1.6x faster with 131072 than with 32768, and 262144 was no faster; inside ResNet-50
# (`train_bench.py --nets resnet50 --layers`) the BatchNorm rows went from 288 to 246 ms.
_BLOCK = 131072


# Rows at least this long get their dot products from np.vecdot (BLAS's sdot per row), which ran
# 2x faster than einsum("ij,ij->i") on 128 KiB blocks of 196-3136-value rows and was as exact;
# on shorter rows (7x7 maps: 49) its per-row call costs more than einsum's one loop.
_VECDOT_MIN_ROW = 128
_HAS_VECDOT = hasattr(np, "vecdot")   # numpy >= 2.0


def _row_dots(a, b, out):
    """out[i] = a[i] . b[i] for (rows, S) arrays."""
    if _HAS_VECDOT and a.shape[1] >= _VECDOT_MIN_ROW:
        np.vecdot(a, b, out=out)
    else:
        np.einsum("ij,ij->i", a, b, out=out)


def _over_rows(rows, row_len, fn):
    """fn(lo, hi) for consecutive row blocks of about _BLOCK elements covering range(rows),
    spread over the worker threads. fn must touch only its own rows of its outputs."""
    per = max(1, _BLOCK // max(row_len, 1))
    n_blocks = -(-rows // per)

    def run(first, last):
        for b in range(first, last):
            fn(b * per, min(rows, (b + 1) * per))

    parallel_for(n_blocks, run, per * row_len)


def _ones(current, length, dtype):
    """A cached vector of ones (the gemv multiplier that sums rows, as Caffe's sum_multiplier)."""
    if current is None or current.size < length or current.dtype != dtype:
        current = np.ones(length, dtype=dtype)
    return current[:length]


def _per_row(buf, values, outer):
    """buf (outer * len(values),) filled with `values` repeated outer times: one value per row
    of a (outer, len(values), inner) array viewed as rows of length inner."""
    buf.reshape(outer, -1)[...] = values.reshape(1, -1)
    return buf


@register_layer("LRN")
class LRNLayer(Layer):
    """Local response normalization of (N, C, H, W): y = x * (k + alpha/n * sum_window x^2) ^ -beta.

    ACROSS_CHANNELS sums over n = local_size neighbouring channels; WITHIN_CHANNEL uses
    y = x * (1 + alpha * mean_window x^2) ^ -beta over a local_size x local_size square (k unused).
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.lrn_param
        self.size = p.local_size
        if self.size % 2 != 1:
            raise self.error(f"LRN only supports odd values for local_size, got {self.size}")
        self.pre_pad = (self.size - 1) // 2
        self.alpha, self.beta, self.k = p.alpha, p.beta, p.k
        self.region = p.norm_region
        if self.region not in (_LRN.ACROSS_CHANNELS, _LRN.WITHIN_CHANNEL):
            raise self.error(f"unknown norm_region {self.region}")
        if _in_place(bottom, top):
            raise self.error("LRN cannot run in place: its backward needs both its input and output")
        self._padded = self._padded_diff = None
        self._scale = self._windows = self._power = self._scratch = None
        self._compiled = self._compiled_backward = self._state_stale = False

    def reshape(self, bottom, top):
        if bottom[0].num_axes != 4:
            raise self.error(f"input must have 4 axes (num, channels, height, width), "
                             f"got shape {bottom[0].shape}")
        num, channels, height, width = shape = bottom[0].shape
        dtype = bottom[0].dtype
        top[0].reshape(shape)
        # scale: the denominator base (k + alpha/n sum x^2), or (1 + alpha * mean x^2) within
        # channel; power: scale^-beta, kept for backward; scratch: backward's window sums.
        self._scale = _buffer(self._scale, shape, dtype)
        self._power = _buffer(self._power, shape, dtype)
        self._scratch = _buffer(self._scratch, shape, dtype)
        # With numba, ACROSS_CHANNELS' backward, and its forward for LRN_BETAS, are one compiled
        # pass each (kernels/normalization.py)
        self._compiled_backward = jit.enabled() and self.region == _LRN.ACROSS_CHANNELS
        self._compiled = self._compiled_backward and self.beta in LRN_BETAS
        if self.region == _LRN.ACROSS_CHANNELS:
            # Channels zero-padded by pre_pad on both sides, so every window is a plain slice.
            padded = (num, channels + self.size - 1, height, width)
            self._padded = _buffer(self._padded, padded, dtype, 0)
        else:
            w = self._windows
            if w is None or (w.height, w.width) != (height, width):
                w = self._windows = PoolWindows(height, width, self.size, self.size,
                                                pad_h=self.pre_pad, pad_w=self.pre_pad)
            padded = w.padded_shape(num, channels)
            self._padded = _buffer(self._padded, padded, dtype, 0)
            self._padded_diff = _buffer(self._padded_diff, padded, dtype, 0)

    def _window_sum(self, padded, out):
        """out[:, c] = sum of padded[:, c + o] over o < size (the channel window around c)."""
        channels = out.shape[1]
        if self.size == 1:
            np.copyto(out, padded[:, :channels])
            return
        np.add(padded[:, :channels], padded[:, 1: 1 + channels], out=out)
        for offset in range(2, self.size):
            out += padded[:, offset: offset + channels]

    def forward(self, bottom, top):
        x, y, scale = bottom[0].data, top[0].data, self._scale
        power, scratch = self._power, self._scratch
        self._state_stale = False
        if self._compiled:
            # A forward_only layer keeps no scale and power for backward (2 of the 3 writes)
            self._forward_compiled(x, y, scale, power, keep=not self.forward_only)
            self._state_stale = self.forward_only
            return
        if self.region == _LRN.ACROSS_CHANNELS:
            channels = x.shape[1]
            squares = self._padded

            def run(lo, hi):   # images lo..hi-1: each image's windows stay inside it
                np.square(x[lo:hi], out=squares[lo:hi, self.pre_pad: self.pre_pad + channels])
                self._window_sum(squares[lo:hi], scale[lo:hi])
                scale[lo:hi] *= self.alpha / self.size
                scale[lo:hi] += self.k
                _negative_power(scale[lo:hi], self.beta, power[lo:hi], scratch[lo:hi])
                np.multiply(x[lo:hi], power[lo:hi], out=y[lo:hi])

            _over_rows(x.shape[0], x[0].size, run)
            return
        np.square(x, out=scratch)
        average_pool(self._windows, scratch, scale, self._padded)
        scale *= self.alpha
        scale += 1
        _negative_power(scale, self.beta, power, scratch)
        np.multiply(x, power, out=y)

    def _forward_compiled(self, x, y, scale, power, keep):
        """The ACROSS_CHANNELS forward in one pass (lrn_across_channels: the same values as the
        numpy passes)."""
        f = x.dtype.type
        coef, k, kind = f(self.alpha / self.size), f(self.k), LRN_BETAS.index(self.beta)
        _over_pixel_blocks(lrn_across_channels, (x, y, scale, power), keep, self.size, coef, k, kind)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x, y, dy, scale = bottom[0].data, top[0].data, top[0].diff, self._scale
        dx, power, accum = bottom[0].diff, self._power, self._scratch
        if self._state_stale:
            # The last forward kept no scale and power (a forward_only layer, run backward by
            # hand): recompute them from the input, the top into scratch that is free until later.
            self._forward_compiled(x, accum, scale, power, keep=True)
            self._state_stale = False
        # Each y_j depends on x_i through scale_j: dy_j/dx_i = -2 beta (alpha/n) x_i y_j / scale_j
        # for every window j holding i. So dx_i = dy_i scale_i^-beta - 2 beta (alpha/n) x_i *
        # sum_{j: i in window j} dy_j y_j / scale_j.
        if self._compiled_backward:   # one compiled pass, the same values as the numpy passes below
            factor = x.dtype.type(2 * self.alpha * self.beta / self.size)
            _over_pixel_blocks(lrn_across_channels_backward, (x, y, dy, scale, power, dx), self.size, factor)
            return
        if self.region == _LRN.ACROSS_CHANNELS:
            channels = x.shape[1]
            # Reuse the forward's channel-padded buffer; its zero border is never written.
            padded = self._padded
            factor = 2 * self.alpha * self.beta / self.size

            def run(lo, hi):
                ratio = padded[lo:hi, self.pre_pad: self.pre_pad + channels]
                np.multiply(dy[lo:hi], y[lo:hi], out=ratio)
                ratio /= scale[lo:hi]
                self._window_sum(padded[lo:hi], accum[lo:hi])
                accum[lo:hi] *= x[lo:hi]
                accum[lo:hi] *= factor
                np.multiply(dy[lo:hi], power[lo:hi], out=dx[lo:hi])
                dx[lo:hi] -= accum[lo:hi]

            _over_rows(x.shape[0], x[0].size, run)
            return
        # Here scale = 1 + alpha * avg_pool(x^2), so the window sum goes through the pooling's
        # backward (which divides by the window size) and d(x^2)/dx = 2x.
        ratio = dx    # free until dx is written below
        np.multiply(dy, y, out=ratio)
        ratio /= scale
        average_pool_backward(self._windows, ratio, accum, self._padded_diff)
        accum *= x
        accum *= 2 * self.alpha * self.beta
        np.multiply(dy, power, out=dx)
        dx -= accum


def _over_pixel_blocks(kernel, arrays, *args):
    """kernel(*arrays viewed as (N, C, pixels), *args, q0, q1) over blocks of LRN_BLOCK pixels,
    split over the threads (the channel windows stay whole, and a single image splits too)."""
    num, channels = arrays[0].shape[:2]
    pixels = arrays[0][0, 0].size
    flat = [a.reshape(num, channels, pixels) for a in arrays]
    parallel_for(-(-pixels // LRN_BLOCK), lambda lo, hi: kernel(
        *flat, *args, lo * LRN_BLOCK, min(pixels, hi * LRN_BLOCK)), 4 * num * channels * LRN_BLOCK)


def _negative_power(base, beta, out, scratch):
    """out = base ** -beta. np.power on float32 runs a scalar loop; the common betas are
    written with sqrt and reciprocal, which run vectorized (~6x faster, within 3e-7 relative)."""
    if beta == 0.75:
        np.sqrt(base, out=out)
        np.sqrt(out, out=scratch)
        out *= scratch
        np.reciprocal(out, out=out)
    elif beta == 0.5:
        np.sqrt(base, out=out)
        np.reciprocal(out, out=out)
    elif beta == 1:
        np.reciprocal(base, out=out)
    else:
        np.power(base, -beta, out=out)


@register_layer("BatchNorm")
class BatchNormLayer(Layer):
    """y = (x - mean_c) / sqrt(var_c + eps) per channel c (axis 1), over the batch and spatial axes.

    blobs: [sum of means (C,), sum of variances (C,), normalizer (1,)], running averages that are
    statistics, not learned: the global mean is blobs[0] / blobs[2]. In TEST (or with
    use_global_stats) those are used instead of the batch's own statistics.
    """

    exact_num_bottom = 1
    exact_num_top = 1
    allows_in_place = True

    def layer_setup(self, bottom, top):
        p = self.layer_param.batch_norm_param
        self.moving_average_fraction = p.moving_average_fraction
        self.use_global_stats = self.phase == caffe_pb2.TEST
        if p.HasField("use_global_stats"):
            self.use_global_stats = p.use_global_stats
        self.channels = 1 if bottom[0].num_axes == 1 else bottom[0].shape[1]
        self.eps = p.eps
        shapes = [(self.channels,), (self.channels,), (1,)]
        if not self.blobs_loaded:
            self.blobs = [Blob(shape, dtype=self.dtype) for shape in shapes]
        elif [b.count() for b in self.blobs] != [s[0] for s in shapes]:
            raise self.error(f"loaded statistics have shapes {[b.shape for b in self.blobs]}, "
                             f"expected {shapes} for {self.channels} channels")
        # The three blobs are running statistics, not parameters: like Caffe, force their
        # learning rate to 0 (adding param specs if missing) so no solver ever updates them.
        for i in range(len(self.blobs)):
            if len(self.layer_param.param) == i:
                self.layer_param.param.add().lr_mult = 0
            elif self.layer_param.param[i].lr_mult != 0:
                raise self.error("cannot configure batch normalization statistics as layer "
                                 "parameters: every param { lr_mult } must be 0")
        self.param_propagate_down = [False] * len(self.blobs)
        self._x_norm = self._std = self._scratch = self._ones = self._row_sums = None
        self._row_stats = None

    def reshape(self, bottom, top):
        if bottom[0].num_axes > 1 and bottom[0].shape[1] != self.channels:
            raise self.error(f"bottom has {bottom[0].shape[1]} channels, the layer was set up "
                             f"for {self.channels}")
        top[0].reshape(bottom[0].shape)
        shape = self._grouped_shape(bottom[0])
        dtype = bottom[0].dtype
        self._x_norm = _buffer(self._x_norm, shape, dtype)
        rows = shape[0] * shape[1]
        # Per-row partial sums (rows = image x channel), reduced to channels after each pass.
        self._row_sums = _buffer(self._row_sums, (2, rows), dtype)
        self._row_stats = _buffer(self._row_stats, (4, rows), dtype)   # per-row values
        self._ones = _ones(self._ones, shape[2], dtype)

    def _grouped_shape(self, blob):
        """(N, C, S): batch, channels, and everything after the channels flattened."""
        num = blob.shape[0] if blob.num_axes else 1
        return (num, self.channels, blob.count() // max(num * self.channels, 1))

    def _channel_means(self, sums):
        """Per-channel means of the row sums (N*C,) over the batch: (C,)."""
        num, channels, spatial = self._x_norm.shape
        total = sums.reshape(num, channels).sum(axis=0)
        total *= total.dtype.type(1.0 / max(num * spatial, 1))
        return total

    def forward(self, bottom, top):
        x2 = self._rows_of(bottom[0].data)
        y2 = self._rows_of(top[0].data)
        row_mean, row_std = self.statistics(x2)
        xn2 = self._x_norm.reshape(x2.shape)

        def normalize(lo, hi):
            np.subtract(x2[lo:hi], row_mean[lo:hi, None], out=y2[lo:hi])
            y2[lo:hi] /= row_std[lo:hi, None]
            # Kept for backward, since a later in-place layer may overwrite the top.
            np.copyto(xn2[lo:hi], y2[lo:hi])

        _over_rows(x2.shape[0], x2.shape[1], normalize)

    def _rows_of(self, array):
        """array viewed as (N*C, S) rows, one per image and channel."""
        num, channels, spatial = self._x_norm.shape
        return array.reshape(num * channels, spatial)

    def statistics(self, x2):
        """The mean and std this forward normalizes with, as per-row (N*C,) values of the
        (N*C, S) rows x2: the batch's own (updating the running sums), or with use_global_stats
        the running ones. Sets self._std (C,) for backward; uses x_norm as scratch."""
        dtype = x2.dtype.type
        mean_sum, var_sum, normalizer = (b.data for b in self.blobs)
        num, channels, spatial = self._x_norm.shape
        rows = num * channels
        if self.use_global_stats:
            factor = 0 if normalizer[0] == 0 else 1 / normalizer[0]
            mean = mean_sum * dtype(factor)
            var = var_sum * dtype(factor)
        else:
            # One read of x for both statistics: per row (image x channel), its sum (gemv) and
            # the sum of squares about its own mean (through x_norm, free until pass 2, while
            # the block is in cache); rows then combine exactly as in Chan et al.'s parallel
            # variance: M2_c = sum_n M2_nc + S * sum_n (mean_nc - mean_c)^2.
            xn2 = self._x_norm.reshape(rows, spatial)
            sums, squares = self._row_sums
            own_mean = self._row_stats[3]
            inv_spatial = dtype(1.0 / max(spatial, 1))

            def statistics(lo, hi):
                np.dot(x2[lo:hi], self._ones, out=sums[lo:hi])
                np.multiply(sums[lo:hi], inv_spatial, out=own_mean[lo:hi])
                np.subtract(x2[lo:hi], own_mean[lo:hi, None], out=xn2[lo:hi])
                _row_dots(xn2[lo:hi], xn2[lo:hi], out=squares[lo:hi])

            _over_rows(rows, spatial, statistics)
            mean = self._channel_means(sums)
            spread = own_mean.reshape(num, channels) - mean
            np.square(spread, out=spread)
            spread *= dtype(spatial)
            spread += squares.reshape(num, channels)
            var = self._channel_means(spread.reshape(-1))
            # Running sums, decayed by moving_average_fraction; the normalizer tracks their weight.
            # The variance gets Bessel's correction m / (m - 1), m = values per channel.
            maf = self.moving_average_fraction
            normalizer *= maf
            normalizer += 1
            mean_sum *= maf
            mean_sum += mean
            m = num * spatial
            correction = m / (m - 1) if m > 1 else 1.0
            var_sum *= maf
            var_sum += var * dtype(correction)
        self._std = np.sqrt(var + dtype(self.eps))
        return _per_row(self._row_stats[0], mean, num), _per_row(self._row_stats[1], self._std, num)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy2, dx2 = self._rows_of(top[0].diff), self._rows_of(bottom[0].diff)
        rows, spatial = dy2.shape
        if self.use_global_stats:
            row_std = _per_row(self._row_stats[1], self._std, rows // self.channels)
            _over_rows(rows, spatial, lambda lo, hi: np.divide(dy2[lo:hi], row_std[lo:hi, None],
                                                               out=dx2[lo:hi]))
            return
        xn2 = self._x_norm.reshape(rows, spatial)
        sums, products = self._row_sums

        def reduce(lo, hi):
            np.dot(dy2[lo:hi], self._ones, out=sums[lo:hi])
            _row_dots(dy2[lo:hi], xn2[lo:hi], out=products[lo:hi])

        _over_rows(rows, spatial, reduce)
        self.input_gradient(dy2, dx2)

    def input_gradient(self, dy2, dx2):
        """dx = (dy - mean(dy) - y * mean(dy * y)) / std, means over all but the channel axis, on
        (N*C, S) rows, from the per-row sums of dy and dy * y that self._row_sums holds. dx may
        be dy itself (in place)."""
        rows, spatial = dy2.shape
        num = rows // self.channels
        xn2 = self._x_norm.reshape(rows, spatial)
        sums, products = self._row_sums
        row_std = _per_row(self._row_stats[1], self._std, num)
        row_mean_dy = _per_row(self._row_stats[0], self._channel_means(sums), num)
        row_mean_dy_xn = _per_row(self._row_stats[2], self._channel_means(products), num)
        if jit.enabled():
            _over_rows(rows, spatial, lambda lo, hi: batch_norm_layer_grad(
                dy2, dx2, xn2, row_mean_dy_xn, row_mean_dy, row_std, lo, hi))
            return
        # The correction goes through the x_norm-sized scratch, since dx may be dy.
        self._scratch = _buffer(self._scratch, xn2.shape, xn2.dtype)
        scratch = self._scratch

        def gradient(lo, hi):
            grad = scratch[lo:hi]
            np.multiply(xn2[lo:hi], row_mean_dy_xn[lo:hi, None], out=grad)
            grad += row_mean_dy[lo:hi, None]
            np.subtract(dy2[lo:hi], grad, out=dx2[lo:hi])
            dx2[lo:hi] /= row_std[lo:hi, None]

        _over_rows(rows, spatial, gradient)


@register_layer("MVN")
class MVNLayer(Layer):
    """Mean-variance normalization per image and channel (or per image with across_channels):
    y = (x - mean) / (std + eps), or y = x - mean without normalize_variance.

    Like Caffe it views the bottom as (N, C, H, W) (missing axes are 1) and shapes the top so.
    """

    exact_num_bottom = 1
    exact_num_top = 1
    allows_in_place = True

    def layer_setup(self, bottom, top):
        p = self.layer_param.mvn_param
        self.normalize_variance = p.normalize_variance
        self.across_channels = p.across_channels
        self.eps = p.eps

    def reshape(self, bottom, top):
        if bottom[0].num_axes > 4:
            raise self.error(f"MVN works on blobs of up to 4 axes (num, channels, height, width), "
                             f"got shape {bottom[0].shape}")
        shape = tuple(bottom[0].shape) + (1,) * (4 - bottom[0].num_axes)
        top[0].reshape(shape)
        num = shape[0] if self.across_channels else shape[0] * shape[1]
        self._groups = (num, bottom[0].count() // max(num, 1))

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self._groups)
        y = top[0].data.reshape(self._groups)
        mean = x.mean(axis=1, keepdims=True)
        np.subtract(x, mean, out=y)
        if self.normalize_variance:
            # Caffe adds eps to the standard deviation, not to the variance.
            self._std = np.sqrt(np.square(y).mean(axis=1, keepdims=True))
            self._std += self.eps
            y /= self._std

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].diff.reshape(self._groups)
        dx = bottom[0].diff.reshape(self._groups)
        grad = dy.mean(axis=1, keepdims=True)
        if self.normalize_variance:
            # dx = (dy - mean(dy) - y * mean(dy * y)) / (std + eps), Caffe's formula.
            y = top[0].data.reshape(self._groups)
            grad = grad + y * (dy * y).mean(axis=1, keepdims=True)
            np.subtract(dy, grad, out=dx)
            dx /= self._std
        else:
            np.subtract(dy, grad, out=dx)


def _affine_blob_shape(layer, bottom, axis, num_axes, what):
    """Shape of a learned scale/bias: bottom's axes axis .. axis + num_axes (-1: to the end)."""
    axis = layer.canonical_axis(bottom, axis)
    if num_axes < -1:
        raise layer.error(f"num_axes must be non-negative, or -1 to extend to the end of bottom[0]; "
                          f"got {num_axes}")
    if num_axes >= 0 and bottom.num_axes < axis + num_axes:
        raise layer.error(f"{what} blob's shape extends past bottom[0]'s shape {bottom.shape} when "
                          f"applied starting with bottom[0] axis {axis}")
    end = None if num_axes == -1 else axis + num_axes
    return bottom.shape[axis:end]


def _affine_dims(layer, bottom, operand, axis, what):
    """(outer, dim, inner) so that bottom reshaped to them lines up with operand as (1, dim, 1)."""
    # A scalar operand is applied the same way along any axis; axis 0 keeps outer = 1.
    axis = 0 if operand.num_axes == 0 else layer.canonical_axis(bottom, axis)
    if bottom.num_axes < axis + operand.num_axes:
        raise layer.error(f"{what} blob's shape {operand.shape} extends past bottom[0]'s shape "
                          f"{bottom.shape} when applied starting with bottom[0] axis {axis}")
    if bottom.shape[axis: axis + operand.num_axes] != operand.shape:
        raise layer.error(f"dimension mismatch between bottom[0] shape {bottom.shape} (from axis "
                          f"{axis}) and {what} shape {operand.shape}")
    return bottom.count(0, axis), operand.count(), bottom.count(axis + operand.num_axes)


class _AffineLayer(Layer):
    """Shared parts of Scale and Bias: one or two bottoms, a broadcast operand along some axes."""

    min_num_bottom = 1
    max_num_bottom = 2
    exact_num_top = 1
    allows_in_place = True

    def canonical_axis(self, blob, axis):
        try:
            return blob.canonical_axis(axis)
        except IndexError as e:
            raise self.error(str(e)) from None


@register_layer("Bias")
class BiasLayer(_AffineLayer):
    """y = x + b, b broadcast along bottom[0]'s axes axis .. axis + num_axes.

    b is bottom[1] if given, else a learned blob (filled by `filler`, default constant 0).
    """

    def layer_setup(self, bottom, top):
        p = self.layer_param.bias_param
        if len(bottom) == 1 and not self.blobs_loaded:
            shape = _affine_blob_shape(self, bottom[0], p.axis, p.num_axes, "bias")
            self.blobs = [Blob(shape, dtype=self.dtype)]
            fill(self.blobs[0], p.filler, what=f"layer {self.name!r} bias")

    def reshape(self, bottom, top):
        bias = bottom[1] if len(bottom) > 1 else self.blobs[0]
        self.dims = _affine_dims(self, bottom[0], bias, self.layer_param.bias_param.axis, "bias")
        if not _in_place(bottom, top):
            top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        bias = bottom[1] if len(bottom) > 1 else self.blobs[0]
        outer, dim, inner = self.dims
        np.add(bottom[0].data.reshape(self.dims), bias.data.reshape(1, dim, 1),
               out=top[0].data.reshape(self.dims))

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff
        if propagate_down[0] and not _in_place(bottom, top):
            np.copyto(bottom[0].diff, dy)
        learned = len(bottom) == 1
        if (learned and self.param_propagate_down[0]) or (not learned and propagate_down[1]):
            total = dy.reshape(self.dims).sum(axis=(0, 2))
            if learned:
                self.blobs[0].diff[...] += total.reshape(self.blobs[0].shape)
            else:
                bottom[1].diff[...] = total.reshape(bottom[1].shape)


@register_layer("Scale")
class ScaleLayer(_AffineLayer):
    """y = x * s (+ b with bias_term), s broadcast along bottom[0]'s axes axis .. axis + num_axes.

    s is bottom[1] if given, else learned blobs[0] (filler default constant 1). The bias, when
    bias_term is set, is the last blob (bias_filler, default constant 0) and has s's shape.
    """

    def layer_setup(self, bottom, top):
        p = self.layer_param.scale_param
        if len(bottom) == 1 and not self.blobs_loaded:
            shape = _affine_blob_shape(self, bottom[0], p.axis, p.num_axes, "scale")
            self.blobs = [Blob(shape, dtype=self.dtype)]
            filler = p.filler if p.HasField("filler") else caffe_pb2.FillerParameter(type="constant",
                                                                                      value=1)
            fill(self.blobs[0], filler, what=f"layer {self.name!r} scale")
        self.bias_index = None
        if p.bias_term:
            # With two bottoms the bias spans bottom[1]'s axes; else num_axes, like the scale.
            num_axes = bottom[1].num_axes if len(bottom) > 1 else p.num_axes
            if len(self.blobs) + len(bottom) < 3:
                shape = _affine_blob_shape(self, bottom[0], p.axis, num_axes, "bias")
                bias = Blob(shape, dtype=self.dtype)
                fill(bias, p.bias_filler, what=f"layer {self.name!r} bias")
                self.blobs.append(bias)
            self.bias_index = len(self.blobs) - 1
        self._saved_input = None
        self._row_values = self._row_sums = self._ones = None
        self._reshaped_for = None

    # Rows (one per outer x dim position) at least this long go through the blocked row path;
    # shorter ones broadcast over the whole (outer, dim, inner) view at once.
    ROW_PATH_MIN_INNER = 64

    def reshape(self, bottom, top):
        scale = bottom[1] if len(bottom) > 1 else self.blobs[0]
        # Everything below follows from these shapes and the buffers' identity; Net calls
        # reshape before every forward, and the shapes almost never change between calls.
        key = (bottom[0].shape, top[0].shape, scale.shape, _in_place(bottom, top),
               self.blobs[self.bias_index].shape if self.bias_index is not None else None)
        if key == self._reshaped_for:
            return
        self._reshape(bottom, top, scale)
        self._reshaped_for = (bottom[0].shape, top[0].shape) + key[2:]

    def _reshape(self, bottom, top, scale):
        p = self.layer_param.scale_param
        self.dims = _affine_dims(self, bottom[0], scale, p.axis, "scale")
        if self.bias_index is not None:
            self.bias_dims = _affine_dims(self, bottom[0], self.blobs[self.bias_index], p.axis, "bias")
        if _in_place(bottom, top):
            # Backward needs x for the scale's gradient; forward is about to overwrite it.
            self._saved_input = _buffer(self._saved_input, bottom[0].shape, bottom[0].dtype)
        else:
            self._saved_input = None
            top[0].reshape(bottom[0].shape)
        outer, dim, inner = self.dims
        dtype = bottom[0].dtype
        self._rows = (inner >= self.ROW_PATH_MIN_INNER and
                      (self.bias_index is None or self.bias_dims == self.dims))
        if self._rows:
            # Per-row scale and bias values, and per-row sums for the two gradients.
            self._row_values = _buffer(self._row_values, (2, outer * dim), dtype)
            self._row_sums = _buffer(self._row_sums, (2, outer * dim), dtype)
            self._ones = _ones(self._ones, inner, dtype)

    def forward(self, bottom, top):
        if self._rows:
            return self._forward_rows(bottom, top)
        if self._saved_input is not None:
            np.copyto(self._saved_input, bottom[0].data)
        scale = bottom[1] if len(bottom) > 1 else self.blobs[0]
        dim = self.dims[1]
        y = top[0].data.reshape(self.dims)
        np.multiply(bottom[0].data.reshape(self.dims), scale.data.reshape(1, dim, 1), out=y)
        if self.bias_index is not None:
            bias = self.blobs[self.bias_index]
            top[0].data.reshape(self.bias_dims)[...] += bias.data.reshape(1, self.bias_dims[1], 1)

    def _forward_rows(self, bottom, top):
        """forward block by block over rows of length inner: (copy x,) y = x * s (+ b)."""
        outer, dim, inner = self.dims
        rows = outer * dim
        x2, y2 = bottom[0].data.reshape(rows, inner), top[0].data.reshape(rows, inner)
        saved = None if self._saved_input is None else self._saved_input.reshape(rows, inner)
        scale = bottom[1] if len(bottom) > 1 else self.blobs[0]
        row_scale = _per_row(self._row_values[0], scale.data, outer)
        row_bias = (None if self.bias_index is None else
                    _per_row(self._row_values[1], self.blobs[self.bias_index].data, outer))

        def run(lo, hi):
            if saved is not None:
                np.copyto(saved[lo:hi], x2[lo:hi])
            np.multiply(x2[lo:hi], row_scale[lo:hi, None], out=y2[lo:hi])
            if row_bias is not None:
                y2[lo:hi] += row_bias[lo:hi, None]

        _over_rows(rows, inner, run)

    def backward(self, top, propagate_down, bottom):
        if self._rows:
            return self._backward_rows(top, propagate_down, bottom)
        dy = top[0].diff
        # In place, dx will overwrite dy: take the parameter gradients first.
        if self.bias_index is not None and self.param_propagate_down[self.bias_index]:
            bias = self.blobs[self.bias_index]
            bias.diff[...] += dy.reshape(self.bias_dims).sum(axis=(0, 2)).reshape(bias.shape)
        learned = len(bottom) == 1
        scale = self.blobs[0] if learned else bottom[1]
        if (learned and self.param_propagate_down[0]) or (not learned and propagate_down[1]):
            x = bottom[0].data if self._saved_input is None else self._saved_input
            total = (dy * x).reshape(self.dims).sum(axis=(0, 2)).reshape(scale.shape)
            if learned:
                scale.diff[...] += total
            else:
                scale.diff[...] = total
        if propagate_down[0]:
            dim = self.dims[1]
            np.multiply(dy.reshape(self.dims), scale.data.reshape(1, dim, 1),
                        out=bottom[0].diff.reshape(self.dims))

    def _backward_rows(self, top, propagate_down, bottom):
        """backward block by block: the rows' sums of dy and of dy * x (reduced to the bias and
        scale gradients afterwards), then dx = dy * s, which may overwrite dy (in place)."""
        outer, dim, inner = self.dims
        rows = outer * dim
        dy2 = top[0].diff.reshape(rows, inner)
        x = bottom[0].data if self._saved_input is None else self._saved_input
        x2 = x.reshape(rows, inner)
        dx2 = bottom[0].diff.reshape(rows, inner)
        learned = len(bottom) == 1
        scale = self.blobs[0] if learned else bottom[1]
        want_bias = self.bias_index is not None and self.param_propagate_down[self.bias_index]
        want_scale = (learned and self.param_propagate_down[0]) or (not learned and propagate_down[1])
        want_dx = propagate_down[0]
        bias_sums, scale_sums = self._row_sums
        row_scale = _per_row(self._row_values[0], scale.data, outer)

        def run(lo, hi):
            if want_bias:
                np.dot(dy2[lo:hi], self._ones, out=bias_sums[lo:hi])
            if want_scale:
                _row_dots(dy2[lo:hi], x2[lo:hi], out=scale_sums[lo:hi])
            if want_dx:
                np.multiply(dy2[lo:hi], row_scale[lo:hi, None], out=dx2[lo:hi])

        _over_rows(rows, inner, run)
        if want_bias:
            bias = self.blobs[self.bias_index]
            bias.diff[...] += bias_sums.reshape(outer, dim).sum(axis=0).reshape(bias.shape)
        if want_scale:
            total = scale_sums.reshape(outer, dim).sum(axis=0).reshape(scale.shape)
            if learned:
                scale.diff[...] += total
            else:
                scale.diff[...] = total


class BatchNormScaleReLU:
    """An in-place BatchNorm -> Scale (-> ReLU) chain of a net run as one step (fuse.py plans it):
    y = relu(gamma * (x - mean) / std + beta) per channel.

    Forward runs the layers' own arithmetic in the same order, so the blob and the running
    statistics come out bit for bit as the three layers leave them, in two passes over the blob
    (the statistics, then normalize, scale and rectify each block while it is in cache) where the
    layers take four. Backward shares one reduction between Scale and BatchNorm (see run_backward):
    two passes and about 30% fewer numpy operations than the layers' five passes, equal to
    float32 rounding. The Scale layer's copy of its input is not made: BatchNorm's x_norm is it.
    """

    def __init__(self, batch_norm, scale, relu=None):
        self.batch_norm, self.scale, self.relu = batch_norm, scale, relu
        self.layers = [layer for layer in (batch_norm, scale, relu) if layer is not None]
        self.name, self.type = batch_norm.name, "BatchNorm+Scale" + ("+ReLU" if relu else "")
        self._row_values = self._row_sums = self._mask = None

    def reshape(self, bottom, top):
        # Each layer keeps its own buffers sized, so the net can run them one by one at any time.
        for layer in self.layers:
            layer.reshape(bottom, top)
        rows = self.batch_norm._x_norm.shape[0] * self.batch_norm.channels
        dtype = bottom[0].dtype
        self._row_values = _buffer(self._row_values, (2, rows), dtype)   # gamma, beta per row
        self._row_sums = _buffer(self._row_sums, (2, rows), dtype)       # sum dz, sum dz * y_bn
        if self.relu is not None:   # y > 0, the ReLU's mask, made in backward
            self._mask = _buffer(self._mask, self.batch_norm._rows_of(bottom[0].data).shape, np.bool_)

    def _gamma_beta(self, num):
        scale = self.scale
        gamma = _per_row(self._row_values[0], scale.blobs[0].data, num)
        if scale.bias_index is None:
            return gamma, None
        return gamma, _per_row(self._row_values[1], scale.blobs[scale.bias_index].data, num)

    def run_forward(self, bottom, top):
        bn = self.batch_norm
        x2 = bn._rows_of(bottom[0].data)    # y overwrites x: the chain is in place
        row_mean, row_std = bn.statistics(x2)
        xn2 = bn._x_norm.reshape(x2.shape)
        gamma, beta = self._gamma_beta(bn._x_norm.shape[0])
        slope = None if self.relu is None else self.relu.negative_slope
        if jit.enabled():
            has_beta, relu = beta is not None, slope is not None
            beta = gamma if beta is None else beta
            slope = x2.dtype.type(slope or 0)
            _over_rows(x2.shape[0], x2.shape[1], lambda lo, hi: normalize_scale_relu(
                x2, xn2, row_mean, row_std, gamma, beta, has_beta, relu, slope, lo, hi))
            return 0.0

        def run(lo, hi):
            x, xn = x2[lo:hi], xn2[lo:hi]
            np.subtract(x, row_mean[lo:hi, None], out=xn)
            xn /= row_std[lo:hi, None]
            np.multiply(xn, gamma[lo:hi, None], out=x)
            if beta is not None:
                x += beta[lo:hi, None]
            if slope is not None:
                relu_piece(x, x, slope)

        _over_rows(x2.shape[0], x2.shape[1], run)
        return 0.0

    def run_backward(self, top, propagate_down, bottom):
        # With dz the diff after the ReLU's mask and y_bn = x_norm, Scale's gradients are
        # sum(dz) and sum(dz * y_bn) per channel, and BatchNorm's sums of its own dy = gamma * dz
        # are gamma times those: so one reduction pass serves both layers, and
        #   dx = gamma / std * (dz - sum(dz) / m - y_bn * sum(dz * y_bn) / m)
        # is one more pass (global statistics: dx = gamma / std * dz).
        bn, scale = self.batch_norm, self.scale
        dy2, y2 = bn._rows_of(top[0].diff), bn._rows_of(top[0].data)
        xn2 = bn._x_norm.reshape(dy2.shape)
        rows, spatial = dy2.shape
        num, channels = rows // bn.channels, bn.channels
        slope = None if self.relu is None else self.relu.negative_slope
        want_bias = scale.bias_index is not None and scale.param_propagate_down[scale.bias_index]
        want_scale = scale.param_propagate_down[0]
        global_stats = bn.use_global_stats
        sums, products = self._row_sums

        def reduce(lo, hi):
            dz = dy2[lo:hi]
            if slope is not None:
                mask = np.greater(y2[lo:hi], 0, out=self._mask[lo:hi])
                if slope == 0:
                    np.multiply(dz, mask, out=dz)
                else:
                    dz *= np.where(mask, dz.dtype.type(1), dz.dtype.type(slope))
            if want_bias or not global_stats:
                np.dot(dz, bn._ones, out=sums[lo:hi])
            if want_scale or not global_stats:
                _row_dots(dz, xn2[lo:hi], out=products[lo:hi])

        _over_rows(rows, spatial, reduce)
        channel_sums = sums.reshape(num, channels).sum(axis=0)
        channel_products = products.reshape(num, channels).sum(axis=0)
        if want_bias:
            bias = scale.blobs[scale.bias_index]
            bias.diff[...] += channel_sums.reshape(bias.shape)
        if want_scale:
            scale.blobs[0].diff[...] += channel_products.reshape(scale.blobs[0].shape)
        gain = scale.blobs[0].data.reshape(-1) / bn._std            # gamma / std, (C,)
        row_gain = _per_row(self._row_values[0], gain, num)
        if global_stats:
            _over_rows(rows, spatial, lambda lo, hi: np.multiply(dy2[lo:hi], row_gain[lo:hi, None],
                                                                 out=dy2[lo:hi]))
            return
        inv_m = gain.dtype.type(1.0 / max(num * spatial, 1))
        row_shift = _per_row(self._row_values[1], gain * channel_sums * inv_m, num)
        row_slope = _per_row(bn._row_stats[2], gain * channel_products * inv_m, num)
        if jit.enabled():
            _over_rows(rows, spatial, lambda lo, hi: batch_norm_input_grad(
                dy2, xn2, row_gain, row_shift, row_slope, lo, hi))
            return
        bn._scratch = scratch = _buffer(bn._scratch, xn2.shape, xn2.dtype)

        def gradient(lo, hi):
            correction = scratch[lo:hi]
            np.multiply(xn2[lo:hi], row_slope[lo:hi, None], out=correction)
            correction += row_shift[lo:hi, None]
            dx = dy2[lo:hi]
            dx *= row_gain[lo:hi, None]
            dx -= correction

        _over_rows(rows, spatial, gradient)

    def restore_layer_state(self):
        """Leave what the layers' own backward needs after a fused forward: Scale's copy of its
        input (BatchNorm's output). The net calls this before running the chain layer by layer."""
        saved = self.scale._saved_input
        if saved is not None:
            np.copyto(saved, self.batch_norm._x_norm.reshape(saved.shape))


@register_layer("BN")
class BNLayer(Layer):
    """The segmentation forks' BN: y = slope_c * (x - mean_c) / sqrt(var_c + eps) + bias_c.

    Two blob layouts exist, told apart by how many blobs the weights carry:

    * PSPNet / DeepLab (4 blobs, each (1, C, 1, 1)): slope, bias, moving mean, moving
      variance. With frozen: true or in TEST the moving statistics are used (no
      normalizer, unlike BatchNorm); otherwise the batch's own (biased variance), and in
      TRAIN the moving ones become (1 - momentum) * batch + momentum * moving. Frozen
      forces every param's lr_mult to 0 and gives no param gradients, as the fork does;
      the statistics' lr_mult is always forced to 0.
    * SegNet (2 blobs, scale and shift): bn_mode LEARN normalizes with the batch's
      statistics (eps 1e-9); INFERENCE computes y = scale * x + shift, the statistics
      having been folded into scale and shift (SegNet's compute_bn_statistics.py).

    A fresh layer (no weights) gets SegNet's 2 blobs when bn_param sets bn_mode or
    scale_filler/shift_filler, else PSPNet's 4.
    """

    exact_num_bottom = 1
    exact_num_top = 1
    allows_in_place = True

    _SEGNET_FIELDS = ("bn_mode", "scale_filler", "shift_filler")

    def _param(self, name, default=None):
        p = self.layer_param.bn_param
        if name not in p.DESCRIPTOR.fields_by_name:
            return default
        return getattr(p, name)

    def _has(self, name):
        p = self.layer_param.bn_param
        return name in p.DESCRIPTOR.fields_by_name and p.HasField(name)

    def layer_setup(self, bottom, top):
        if bottom[0].num_axes != 4:
            raise self.error(f"input must have 4 axes (num, channels, height, width), got "
                             f"{bottom[0].shape}")
        self.channels = bottom[0].shape[1]
        shape = (1, self.channels, 1, 1)
        if self.blobs_loaded:
            count = len(self.blobs)
            if count not in (2, 4):
                raise self.error(f"BN weights must have 4 blobs (PSPNet: slope, bias, mean, "
                                 f"variance) or 2 (SegNet: scale, shift), got {count}")
            self.segnet = count == 2
            for i, b in enumerate(self.blobs):
                if b.count() != self.channels:
                    raise self.error(f"loaded blob {i} has shape {b.shape}, expected {shape} for "
                                     f"{self.channels} channels")
                if b.dtype != self.dtype or b.shape != shape:
                    converted = Blob(shape, dtype=self.dtype, name=b.name)
                    converted.data[...] = b.data.reshape(shape)
                    self.blobs[i] = converted
        else:
            self.segnet = any(self._has(f) for f in self._SEGNET_FIELDS)
            names = ("scale_filler", "shift_filler") if self.segnet else ("slope_filler", "bias_filler")
            self.blobs = []
            for name in names:
                blob = Blob(shape, dtype=self.dtype)
                filler = self._param(name)
                if filler is not None and self._has(name):
                    fill(blob, filler, what=f"layer {self.name!r} bn_param.{name}")
                else:   # Caffe's default filler is constant 0; a BN is useless with slope 0
                    blob.data[...] = 1.0 if name in ("scale_filler", "slope_filler") else 0.0
                self.blobs.append(blob)
            if not self.segnet:
                self.blobs.append(Blob(shape, dtype=self.dtype))       # moving mean: 0
                variance = Blob(shape, dtype=self.dtype)
                variance.data[...] = 1.0 if self._param("frozen", False) else 0.0
                self.blobs.append(variance)
        if self.segnet:
            self.frozen = False
            self.inference = self._param("bn_mode", 0) == 1
            self.eps = 1e-9
            self.momentum = None
            self.use_global_stats = self.inference
        else:
            self.frozen = bool(self._param("frozen", False))
            self.eps = float(self._param("eps", 1e-5)) if self._has("eps") else 1e-5
            self.momentum = float(self._param("momentum", 0.9)) if self._has("momentum") else 0.9
            self.use_global_stats = self.frozen or self.phase == caffe_pb2.TEST
            while len(self.layer_param.param) < 4:
                self.layer_param.param.add()
            for i in (2, 3) + ((0, 1) if self.frozen else ()):
                self.layer_param.param[i].lr_mult = 0
                self.layer_param.param[i].decay_mult = 0
        self.param_propagate_down = [not self.frozen] * 2 + [False] * (len(self.blobs) - 2)
        self._x_norm = None

    def reshape(self, bottom, top):
        if bottom[0].num_axes != 4 or bottom[0].shape[1] != self.channels:
            raise self.error(f"bottom must be (N, {self.channels}, H, W), got {bottom[0].shape}")
        top[0].reshape(bottom[0].shape)
        self._x_norm = _buffer(self._x_norm, bottom[0].shape, bottom[0].dtype)

    def _channel(self, i):
        return self.blobs[i].data.reshape(1, self.channels, 1, 1)

    def forward(self, bottom, top):
        x, y = bottom[0].data, top[0].data
        dtype = x.dtype.type
        scale, shift = self._channel(0), self._channel(1)
        if self.segnet and self.inference:
            self._x_norm[...] = x
            np.multiply(x, scale, out=y)
            y += shift
            return
        if self.use_global_stats:
            mean, var = self._channel(2), self._channel(3)
        else:
            mean = x.mean(axis=(0, 2, 3), keepdims=True)
            var = np.square(x - mean).mean(axis=(0, 2, 3), keepdims=True)
            if not self.segnet and self.phase == caffe_pb2.TRAIN:
                for blob, batch in ((self.blobs[2], mean), (self.blobs[3], var)):
                    blob.data *= dtype(self.momentum)
                    blob.data += dtype(1 - self.momentum) * batch.reshape(blob.shape)
        self._inv_std = 1 / np.sqrt(var + dtype(self.eps))
        np.subtract(x, mean, out=self._x_norm)
        self._x_norm *= self._inv_std
        np.multiply(self._x_norm, scale, out=y)
        y += shift

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff
        xn = self._x_norm   # x itself for SegNet INFERENCE, whose "normalization" is the identity
        if self.param_propagate_down[0]:
            self.blobs[0].diff.reshape(-1)[...] += np.einsum("nchw,nchw->c", dy, xn)
        if self.param_propagate_down[1]:
            self.blobs[1].diff.reshape(-1)[...] += dy.sum(axis=(0, 2, 3))
        if not propagate_down[0]:
            return
        dx = bottom[0].diff
        scale = self._channel(0)
        if self.segnet and self.inference:
            np.multiply(dy, scale, out=dx)
            return
        if self.use_global_stats:
            np.multiply(dy, scale * self._inv_std, out=dx)
            return
        # dx = scale / std * (dy - mean(dy) - xn * mean(dy * xn)), means over N, H, W.
        mean_dy = dy.mean(axis=(0, 2, 3), keepdims=True)
        mean_dy_xn = (dy * xn).mean(axis=(0, 2, 3), keepdims=True)
        grad = xn * mean_dy_xn
        grad += mean_dy
        np.subtract(dy, grad, out=dx)
        dx *= scale * self._inv_std
