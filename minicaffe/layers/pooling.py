"""Pooling layers: Pooling (MAX, AVE, STOCHASTIC) and SPP (spatial pyramid pooling).

Everything is vectorized over images, channels and output positions; the only
Python loop runs over the kh * kw offsets inside a pooling window. For each
offset (i, j), the inputs seen by all windows at that offset form one strided
view of the (padded) input, so a window reduction becomes kh * kw whole-array
operations, visited in the same row-major order as Caffe's loops (which fixes
ties: MAX keeps the first maximum, STOCHASTIC walks the window in that order).

That strided-view code is the plain path. MAX without a mask top and AVE normally run
minicaffe/kernels/pooling.py instead (`PhasePool`: the same offsets as contiguous runs of a
phase-split copy, cache-blocked and threaded), and an AVE window covering the whole input
(global pooling, ResNet's pool5) is one reduction per plane. `PoolingLayer._pick_kernel`
is the one place that chooses.
"""
import math

import numpy as np

from ..blob import Blob
from ..kernels import jit
from ..kernels.pooling import CompiledMaxPool, PhasePool
from ..layer import Layer, register_layer
from ..proto import caffe_pb2
from ..rng import get_rng

__all__ = ["PoolWindows", "PoolingLayer", "SPPLayer", "average_pool", "average_pool_backward"]

_PP = caffe_pb2.PoolingParameter
# Caffe starts every max at -FLT_MAX (for double nets too), so windows of -inf keep it and index -1.
_MAX_START = -np.finfo(np.float32).max


def pooled_size(size, kernel, pad, stride, ceil_mode=True):
    """Caffe's output length along one axis: rounds up (CEIL) or down (FLOOR), and with padding
    drops a last window that would start in the padding rather than inside the image."""
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


class PoolWindows:
    """Geometry of 2-D pooling windows over an (N, C, H, W) input.

    `padded` buffers are (N, C, Hp, Wp) with the image at rows pad_h.. and columns pad_w..;
    they are big enough for every window, including ones that run past the bottom/right edge.
    """

    def __init__(self, height, width, kernel_h, kernel_w, stride_h=1, stride_w=1, pad_h=0, pad_w=0,
                 ceil_mode=True):
        self.height, self.width = height, width
        self.kernel_h, self.kernel_w = kernel_h, kernel_w
        self.stride_h, self.stride_w = stride_h, stride_w
        self.pad_h, self.pad_w = pad_h, pad_w
        self.pooled_h = pooled_size(height, kernel_h, pad_h, stride_h, ceil_mode)
        self.pooled_w = pooled_size(width, kernel_w, pad_w, stride_w, ceil_mode)
        self.padded_h = max((self.pooled_h - 1) * stride_h + kernel_h, pad_h + height)
        self.padded_w = max((self.pooled_w - 1) * stride_w + kernel_w, pad_w + width)
        # Top-left corner of each window in image coordinates (may be negative, i.e. in the padding).
        self.h_start = np.arange(self.pooled_h) * stride_h - pad_h
        self.w_start = np.arange(self.pooled_w) * stride_w - pad_w

    @property
    def needs_padding(self):
        return (self.padded_h, self.padded_w, self.pad_h, self.pad_w) != (self.height, self.width, 0, 0)

    def padded_shape(self, num, channels):
        return (num, channels, self.padded_h, self.padded_w)

    def offsets(self):
        """The (i, j) offsets inside a window, row-major as Caffe visits them."""
        for i in range(self.kernel_h):
            for j in range(self.kernel_w):
                yield i, j

    def window(self, padded, i, j):
        """View (N, C, PH, PW): the element at offset (i, j) of every window."""
        return padded[:, :, i: i + self.stride_h * (self.pooled_h - 1) + 1: self.stride_h,
                      j: j + self.stride_w * (self.pooled_w - 1) + 1: self.stride_w]

    def image(self, padded):
        """The view of a padded buffer that holds the image itself."""
        return padded[:, :, self.pad_h: self.pad_h + self.height, self.pad_w: self.pad_w + self.width]

    def index(self, i, j):
        """(PH, PW) flat index h * W + w, in the image plane, of offset (i, j) of each window."""
        return (self.h_start[:, None] + i) * self.width + (self.w_start[None, :] + j)

    def inside(self, i, j):
        """(PH, PW) bool: does offset (i, j) of each window fall inside the image?"""
        h = self.h_start[:, None] + i
        w = self.w_start[None, :] + j
        return (h >= 0) & (h < self.height) & (w >= 0) & (w < self.width)

    def ave_divisor(self, dtype):
        """Caffe's AVE pool size: the window clipped to the image plus padding (padding counts)."""
        h_end = np.minimum(self.h_start + self.kernel_h, self.height + self.pad_h)
        w_end = np.minimum(self.w_start + self.kernel_w, self.width + self.pad_w)
        return np.outer(h_end - self.h_start, w_end - self.w_start).astype(dtype)


def _padded_input(windows, x, buffer):
    """x itself when no padding is needed, else x copied into the image part of buffer."""
    if buffer is None:
        return x
    windows.image(buffer)[...] = x
    return buffer


def average_pool(windows, x, out, buffer=None):
    """out = Caffe's AVE pooling of x. buffer: a zero-bordered padded scratch array (or None)."""
    xp = _padded_input(windows, x, buffer)
    out[...] = 0
    for i, j in windows.offsets():
        out += windows.window(xp, i, j)
    out /= windows.ave_divisor(out.dtype)


def average_pool_backward(windows, dy, dx, buffer=None):
    """dx = gradient of AVE pooling given dy. buffer: padded scratch array (or None)."""
    grad = dy / windows.ave_divisor(dy.dtype)
    dxp = dx if buffer is None else buffer
    dxp[...] = 0
    for i, j in windows.offsets():
        windows.window(dxp, i, j)[...] += grad
    if buffer is not None:
        dx[...] = windows.image(buffer)


def _scatter_to_plane(index, dy, dx):
    """dx[n, c] = 0 except dx[n, c].flat[index[n, c, p]] += dy[n, c, p]; index < 0 is skipped."""
    num, channels = dx.shape[:2]
    plane = dx.shape[2] * dx.shape[3]
    flat = index.reshape(num * channels, -1).astype(np.int64)
    flat += (np.arange(num * channels) * plane)[:, None]
    weights = dy.reshape(num * channels, -1)
    if index.size and index.min() < 0:
        keep = index.reshape(num * channels, -1) >= 0
        flat, weights = flat[keep], weights[keep]
    total = np.bincount(flat.ravel(), weights=weights.ravel(), minlength=num * channels * plane)
    dx[...] = total.reshape(dx.shape)


@register_layer("Pooling")
class PoolingLayer(Layer):
    """(N, C, H, W) -> (N, C, PH, PW): max, average or stochastic pooling over kernel windows.

    PH = ceil((H + 2 pad_h - kernel_h) / stride_h) + 1 (FLOOR rounding if round_mode says so).
    MAX may have a second top: the argmax of each window as a float index h * W + w.
    """

    exact_num_bottom = 1
    min_num_top = 1
    max_num_top = 2

    def layer_setup(self, bottom, top):
        p = self.layer_param.pooling_param
        self.pool = p.pool
        if self.pool not in (_PP.MAX, _PP.AVE, _PP.STOCHASTIC):
            raise self.error(f"unknown pooling method {self.pool}")
        if len(top) > 1 and self.pool != _PP.MAX:
            raise self.error("only MAX pooling can have a second top (the argmax mask)")
        has = p.HasField
        self.global_pooling = p.global_pooling
        if self.global_pooling:
            if has("kernel_size") or has("kernel_h") or has("kernel_w"):
                raise self.error("with global_pooling: true the kernel size cannot be given "
                                 "(it is the input's height and width)")
        elif has("kernel_size") and has("kernel_h") and has("kernel_w"):
            raise self.error("give the filter size as kernel_size OR as kernel_h and kernel_w, not both")
        elif not has("kernel_size") and not (has("kernel_h") and has("kernel_w")):
            raise self.error("give the filter size as kernel_size, or both kernel_h and kernel_w "
                             "for a non-square filter")
        if not ((not has("pad") and has("pad_h") and has("pad_w")) or
                (not has("pad_h") and not has("pad_w"))):
            raise self.error("give padding as pad OR as both pad_h and pad_w")
        if not ((not has("stride") and has("stride_h") and has("stride_w")) or
                (not has("stride_h") and not has("stride_w"))):
            raise self.error("give the stride as stride OR as both stride_h and stride_w")
        if self.global_pooling:
            self.kernel_h, self.kernel_w = bottom[0].shape[-2:] if bottom[0].num_axes >= 2 else (1, 1)
        elif has("kernel_size"):
            self.kernel_h = self.kernel_w = p.kernel_size
        else:
            self.kernel_h, self.kernel_w = p.kernel_h, p.kernel_w
        if self.kernel_h <= 0 or self.kernel_w <= 0:
            raise self.error(f"filter dimensions cannot be zero, got {self.kernel_h} x {self.kernel_w}")
        self.pad_h, self.pad_w = (p.pad_h, p.pad_w) if has("pad_h") else (p.pad, p.pad)
        self.stride_h, self.stride_w = (p.stride_h, p.stride_w) if has("stride_h") else (p.stride, p.stride)
        if self.stride_h <= 0 or self.stride_w <= 0:
            raise self.error(f"stride must be positive, got {self.stride_h} x {self.stride_w}")
        if self.global_pooling and (self.pad_h, self.pad_w, self.stride_h, self.stride_w) != (0, 0, 1, 1):
            raise self.error("with global_pooling: true only pad = 0 and stride = 1 are allowed")
        if self.pad_h or self.pad_w:
            if self.pool == _PP.STOCHASTIC:
                raise self.error("padding is implemented only for AVE and MAX pooling")
            if self.pad_h >= self.kernel_h or self.pad_w >= self.kernel_w:
                raise self.error(f"pad ({self.pad_h}, {self.pad_w}) must be smaller than the kernel "
                                 f"({self.kernel_h}, {self.kernel_w})")
        self.ceil_mode = self._ceil_mode(p)
        self.windows = None

    def _ceil_mode(self, p):
        """Round the output size up (Caffe) or down: BVLC's round_mode or the forks' ceil_mode."""
        ceil = p.round_mode == _PP.CEIL
        if "ceil_mode" in _PP.DESCRIPTOR.fields_by_name and p.HasField("ceil_mode"):
            if p.HasField("round_mode") and p.ceil_mode != ceil:
                raise self.error(f"pooling_param has ceil_mode: {str(p.ceil_mode).lower()} and "
                                 f"round_mode: {_PP.RoundMode.Name(p.round_mode)}, which disagree; "
                                 f"give one of them")
            ceil = p.ceil_mode
        return ceil

    def reshape(self, bottom, top):
        if bottom[0].num_axes != 4:
            raise self.error(f"input must have 4 axes (num, channels, height, width), "
                             f"got shape {bottom[0].shape}")
        num, channels, height, width = bottom[0].shape
        if self.global_pooling:
            self.kernel_h, self.kernel_w = height, width
        w = self.windows
        if w is None or (w.height, w.width, w.kernel_h, w.kernel_w) != (height, width, self.kernel_h,
                                                                       self.kernel_w):
            w = self.windows = PoolWindows(height, width, self.kernel_h, self.kernel_w, self.stride_h,
                                           self.stride_w, self.pad_h, self.pad_w, self.ceil_mode)
            self._scratch_key = None
        if w.pooled_h < 1 or w.pooled_w < 1:
            raise self.error(f"kernel ({self.kernel_h}, {self.kernel_w}) does not fit the {height} x "
                             f"{width} input with pad ({self.pad_h}, {self.pad_w})")
        out_shape = (num, channels, w.pooled_h, w.pooled_w)
        top[0].reshape(out_shape)
        if len(top) > 1:
            top[1].reshape(out_shape)
        key = (bottom[0].shape, bottom[0].dtype, len(top), jit.enabled())
        self._num_tops = len(top)
        if key != getattr(self, "_scratch_key", None):
            self._allocate_scratch(w, num, channels, bottom[0].dtype, out_shape)
            self._scratch_key = key

    def _allocate_scratch(self, w, num, channels, dtype, out_shape):
        """Padded copies of the input and of its gradient, and the chosen element per window
        (for the plain path; a fast kernel holds its own buffers)."""
        self._pick_kernel(w, num * channels, dtype, has_mask_top=self._num_tops > 1)
        if self._phase_geometry is not None or self._whole_plane:
            self._padded = self._padded_diff = self._chosen = None
            return
        is_max = self.pool == _PP.MAX
        if w.needs_padding:
            # MAX pads with -inf so padding never wins (nor equals a max); sums pad with zeros.
            self._padded = np.full(w.padded_shape(num, channels), -np.inf if is_max else 0, dtype=dtype)
            need_diff = is_max or self.pool == _PP.AVE or (
                self.pool == _PP.STOCHASTIC and self.phase != caffe_pb2.TRAIN)
            self._padded_diff = np.zeros(w.padded_shape(num, channels), dtype=dtype) if need_diff else None
        else:
            self._padded = self._padded_diff = None
        self._chosen = np.empty(out_shape, dtype=np.int64) if self.pool != _PP.AVE else None
        self._better = np.empty(out_shape, dtype=bool)
        if is_max:
            # Contiguous copies of every window offset: numpy's elementwise loops run several
            # times faster on them than on the strided window views.
            count = w.kernel_h * w.kernel_w
            self._stack = np.empty((count,) + out_shape, dtype=dtype)
            self._peak = np.empty(out_shape, dtype=dtype)
            offset_type = np.int16 if count < 2 ** 15 else np.int64
            self._best_offset = np.empty(out_shape, dtype=offset_type)
            self._offset_step = np.empty(out_shape, dtype=offset_type)
            self._masked = np.empty(out_shape, dtype=dtype)
            # i * W + j per offset, and a last entry (taken for best = -1) far below zero
            self._offset_delta = np.array([i * w.width + j for i, j in w.offsets()] + [-(1 << 40)],
                                          dtype=np.int64)
            self._corner_index = w.h_start[:, None] * w.width + w.w_start[None, :]
        # Windows that cover the input exactly once (no padding, kernel == stride, no remainder).
        self._exact_tiles = (w.pad_h == w.pad_w == 0 and w.kernel_h == w.stride_h
                             and w.kernel_w == w.stride_w and w.pooled_h * w.kernel_h == w.height
                             and w.pooled_w * w.kernel_w == w.width)

    # Tests and benchmarks set this False on a layer (before setup) to force the plain path.
    use_fast_kernel = True

    def _pick_kernel(self, w, planes, dtype, has_mask_top):
        """The one place that picks the pooling kernel (see the module docstring)."""
        self._phase_geometry = None   # the PhasePool's arguments: it is made at its first use
        self._phase_pool = None
        self._phase_state_stale = False
        self._compiled_max = None     # a forward_only layer's kernel (it keeps no backward state)
        self._whole_plane = False
        if not self.use_fast_kernel or self.pool not in (_PP.MAX, _PP.AVE):
            return
        if self.pool == _PP.AVE and (w.pooled_h, w.pooled_w, w.pad_h, w.pad_w) == (1, 1, 0, 0) \
                and w.kernel_h >= w.height and w.kernel_w >= w.width:
            self._whole_plane = True   # one window holds the whole image
        elif not has_mask_top and PhasePool.applies(w):
            self._phase_geometry = (w, self.pool == _PP.MAX, planes, dtype, jit.enabled())
            if self.pool == _PP.MAX and jit.enabled():
                self._compiled_max = CompiledMaxPool(w, planes)

    def _phase(self):
        if self._phase_pool is None:
            self._phase_pool = PhasePool(*self._phase_geometry)
        return self._phase_pool

    # -- forward -----------------------------------------------------------------
    def forward(self, bottom, top):
        x, y = bottom[0].data, top[0].data
        if self._phase_geometry is not None:
            if self.forward_only and self._compiled_max is not None:
                self._compiled_max.forward(x, y)
                self._phase_state_stale = True
            else:
                self._phase().forward(x, y)
                self._phase_state_stale = False
        elif self._whole_plane:
            planes = y.reshape(-1, 1)
            np.sum(x.reshape(planes.shape[0], -1), axis=1, keepdims=True, out=planes)
            planes /= self.windows.ave_divisor(y.dtype).item()
        elif self.pool == _PP.MAX:
            self._forward_max(x, y, top[1].data if len(top) > 1 else None)
        elif self.pool == _PP.AVE:
            average_pool(self.windows, x, y, self._padded)
        elif self.phase == caffe_pb2.TRAIN:
            self._forward_stochastic_train(x, y)
        else:
            self._forward_stochastic_test(x, y)

    def _forward_max(self, x, y, argmax):
        w = self.windows
        xp = _padded_input(w, x, self._padded)
        stack, peak = self._stack, self._peak
        for k, (i, j) in enumerate(w.offsets()):
            np.copyto(stack[k], w.window(xp, i, j))
        # fmax skips NaNs, as Caffe's `value > max` test does. The max is built in the input's
        # dtype so that the equality test below is exact even if the top has another dtype.
        peak[...] = _MAX_START
        for k in range(len(stack)):
            np.fmax(peak, stack[k], out=peak)
        y[...] = peak
        # The chosen element is the first offset, in row-major order, holding the maximum (Caffe
        # keeps the first of equal values): walk the offsets backwards so earlier matches win.
        # best += (k - best) * equal is a masked assignment in arithmetic, which numpy does
        # much faster than copyto(where=).
        best, step, equal = self._best_offset, self._offset_step, self._better
        best[...] = -1
        for k in reversed(range(len(stack))):
            np.equal(stack[k], peak, out=equal)
            np.subtract(best.dtype.type(k), best, out=step)
            step *= equal
            best += step
        if argmax is None and not self._exact_tiles:
            argmax = self._chosen   # overlapping windows: backward scatters by plane index
        if argmax is not None:
            # plane index h * W + w = window corner + offset's (i * W + j); -1 where no element won
            chosen = self._chosen
            np.take(self._offset_delta, best, out=chosen)
            chosen += self._corner_index
            np.maximum(chosen, -1, out=chosen)
            if argmax is not chosen:
                argmax[...] = chosen

    def _backward_max(self, dy, dx):
        """dx = dy at the chosen element of each window, 0 elsewhere."""
        if not self._exact_tiles:
            _scatter_to_plane(self._chosen, dy, dx)
            return
        # Windows tile the input exactly, so each input element belongs to one window at one
        # offset: assign offset by offset, no zero fill or accumulation needed.
        w = self.windows
        best, equal, masked = self._best_offset, self._better, self._masked
        for k, (i, j) in enumerate(w.offsets()):
            np.equal(best, k, out=equal)
            np.multiply(dy, equal, out=masked)
            w.window(dx, i, j)[...] = masked

    def _forward_stochastic_train(self, x, y):
        """Pick one element per window with probability value / window sum (values >= 0)."""
        w = self.windows
        xp = _padded_input(w, x, self._padded)
        total = np.zeros_like(y)
        for i, j in w.offsets():
            total += w.window(xp, i, j)
        threshold = get_rng().random(y.shape).astype(y.dtype)
        threshold *= total
        # Walk each window in order; the first element where the running sum reaches the
        # threshold is sampled.
        cumsum = np.zeros_like(y)
        chosen = self._chosen
        chosen[...] = -1
        y[...] = 0
        for i, j in w.offsets():
            value = w.window(xp, i, j)
            cumsum += value
            hit = (cumsum >= threshold) & (chosen < 0) & w.inside(i, j)
            np.copyto(y, value, where=hit)
            np.copyto(chosen, np.broadcast_to(w.index(i, j), chosen.shape), where=hit)
        # Round-off (or negative inputs) can leave a window unsampled: take its last element.
        missed = chosen < 0
        if missed.any():
            for i, j in reversed(list(w.offsets())):
                pick = missed & w.inside(i, j)
                np.copyto(y, w.window(xp, i, j), where=pick)
                np.copyto(chosen, np.broadcast_to(w.index(i, j), chosen.shape), where=pick)
                missed &= ~pick

    def _forward_stochastic_test(self, x, y):
        """Probability-weighted average: sum(x^2) / sum(x) over the window (0 if the sum <= 0)."""
        w = self.windows
        xp = _padded_input(w, x, self._padded)
        total = np.zeros_like(y)
        squares = np.zeros_like(y)
        for i, j in w.offsets():
            value = w.window(xp, i, j)
            total += value
            squares += value * value
        mean = np.zeros_like(y)
        np.divide(squares, total, out=mean, where=total > 0)
        y[...] = mean
        # Kept for backward (a later in-place layer may change the top).
        self._window_sum, self._window_mean = total, mean

    # -- backward ----------------------------------------------------------------
    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy, dx = top[0].diff, bottom[0].diff
        if self._phase_geometry is not None:
            phase = self._phase()
            if self._phase_state_stale:
                # The last forward ran the compiled kernel, which keeps no state for backward
                # (a forward_only layer, run backward by hand): recompute it from the input.
                phase.forward(bottom[0].data, np.empty(top[0].shape, top[0].dtype))
                self._phase_state_stale = False
            phase.backward(dy, dx)
        elif self._whole_plane:
            np.divide(dy.reshape(-1, 1), self.windows.ave_divisor(dy.dtype).item(),
                      out=dx.reshape(dy.size, -1))
        elif self.pool == _PP.MAX:
            if len(top) > 1:   # Caffe reads the chosen elements back from the mask top
                _scatter_to_plane(top[1].data, dy, dx)
            else:
                self._backward_max(dy, dx)
        elif self.pool == _PP.AVE:
            average_pool_backward(self.windows, dy, dx, self._padded_diff)
        elif self.phase == caffe_pb2.TRAIN:
            _scatter_to_plane(self._chosen, dy, dx)
        else:
            self._backward_stochastic_test(dy, bottom[0].data, dx)

    def _backward_stochastic_test(self, dy, x, dx):
        # d/dx_k [sum(x^2) / sum(x)] = (2 x_k - y) / sum(x). Caffe has no CPU version of this;
        # this is the exact gradient of the TEST-phase output.
        w = self.windows
        xp = _padded_input(w, x, self._padded)
        total, y = self._window_sum, self._window_mean
        scale = np.zeros_like(dy)
        np.divide(dy, total, out=scale, where=total > 0)
        dxp = dx if self._padded_diff is None else self._padded_diff
        dxp[...] = 0
        for i, j in w.offsets():
            value = w.window(xp, i, j)
            w.window(dxp, i, j)[...] += scale * (2 * value - y)
        if self._padded_diff is not None:
            dx[...] = w.image(dxp)


@register_layer("SPP")
class SPPLayer(Layer):
    """Spatial pyramid pooling: (N, C, H, W) -> (N, C * sum_l 4^l) for levels l < pyramid_height.

    Level l pools the whole image into 2^l x 2^l bins; the flattened levels are concatenated.
    With pyramid_height 1 the single level is returned unflattened, (N, C, 1, 1), as in Caffe.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.spp_param
        self.pyramid_height = p.pyramid_height
        if self.pyramid_height < 1:
            raise self.error("spp_param { pyramid_height } must be at least 1")
        self.pool = {caffe_pb2.SPPParameter.MAX: _PP.MAX, caffe_pb2.SPPParameter.AVE: _PP.AVE,
                     caffe_pb2.SPPParameter.STOCHASTIC: _PP.STOCHASTIC}.get(p.pool)
        if self.pool is None:
            raise self.error(f"unknown pooling method {p.pool}")
        self._input_shape = None

    def level_param(self, level, height, width):
        """The Pooling parameters of one level: kernel, stride and pad that cover the whole image."""
        bins = 2 ** level
        kernel_h, kernel_w = math.ceil(height / bins), math.ceil(width / bins)
        # Pad (about evenly on both sides) so that `bins` windows of the kernel span the image.
        pad_h = (kernel_h * bins - height + 1) // 2
        pad_w = (kernel_w * bins - width + 1) // 2
        param = caffe_pb2.LayerParameter(name=f"{self.name}/level{level}", type="Pooling")
        param.pooling_param.pool = self.pool
        param.pooling_param.kernel_h, param.pooling_param.kernel_w = kernel_h, kernel_w
        param.pooling_param.stride_h, param.pooling_param.stride_w = kernel_h, kernel_w
        param.pooling_param.pad_h, param.pooling_param.pad_w = pad_h, pad_w
        return param

    def reshape(self, bottom, top):
        if bottom[0].num_axes != 4:
            raise self.error(f"input must have 4 axes (num, channels, height, width), "
                             f"got shape {bottom[0].shape}")
        num, channels, height, width = bottom[0].shape
        if height <= 0 or width <= 0:
            raise self.error(f"input dimensions cannot be zero, got {height} x {width}")
        dtype = bottom[0].dtype
        if self._input_shape != bottom[0].shape:
            self._input_shape = bottom[0].shape
            self.levels, self.level_tops = [], []
            for level in range(self.pyramid_height):
                layer = PoolingLayer(self.level_param(level, height, width), self.phase)
                out = Blob((), dtype=dtype)
                layer.setup(bottom, [out])
                self.levels.append(layer)
                self.level_tops.append(out)
            # A private bottom for backward: same data, its own diff, so levels can be summed.
            self._level_bottom = Blob(bottom[0].shape, dtype=dtype)
        for layer, out in zip(self.levels, self.level_tops):
            layer.reshape(bottom, [out])
        self._level_bottom.reshape(bottom[0].shape)
        self._level_bottom.share_data(bottom[0])
        if self.pyramid_height == 1:
            top[0].reshape(self.level_tops[0].shape)
        else:
            top[0].reshape(num, sum(out.count(1) for out in self.level_tops))

    def forward(self, bottom, top):
        y = top[0].data.reshape(top[0].shape[0], -1)
        start = 0
        for layer, out in zip(self.levels, self.level_tops):
            layer.forward(bottom, [out])
            size = out.count(1)
            y[:, start: start + size] = out.data.reshape(out.shape[0], -1)
            start += size

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].diff.reshape(top[0].shape[0], -1)
        dx = bottom[0].diff
        start = 0
        for k, (layer, out) in enumerate(zip(self.levels, self.level_tops)):
            size = out.count(1)
            out.diff[...] = dy[:, start: start + size].reshape(out.shape)
            start += size
            layer.backward([out], [True], [self._level_bottom])
            if k == 0:
                dx[...] = self._level_bottom.diff
            else:
                dx += self._level_bottom.diff
