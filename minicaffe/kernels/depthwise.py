"""Depthwise 2-D convolution (group == input channels) without im2col or GEMMs.

A grouped convolution with one input channel per group is, through ConvGemm, one
tiny (m, k*k) x (k*k, n*P) product per channel: hundreds of GEMM calls on
matrices a few rows tall, plus an im2col buffer k*k times the input. Here the
work is instead a loop over the k_h*k_w kernel offsets. For offset (i, j) the
inputs that every output pixel sees form one strided view of the padded input,

    view_ij = x_padded[:, :, i*dil_h :: stride_h, j*dil_w :: stride_w]   (N, C, H_out, W_out)

so the convolution is out[n, c*m + q] = sum_ij w[c*m + q, 0, i, j] * view_ij[n, c]
(m = channel multiplier, num_output / channels), a few whole-array operations per
offset. Backward runs the same loop: the input gradient adds w * dout into the
same views of a padded buffer, the weight gradient is the dot product of dout
with each view.

Forward with one output per channel (multiplier 1, MobileNet's case) runs on a phase-split copy
of the input instead, as max pooling does (kernels/pooling.py): phase (a, b) holds padded rows
a, a + s_h, ... and columns b, b + s_w, ... on a grid of Hq x Wq cells, so kernel offset (i, j)
of every output pixel is ONE contiguous run of its phase's flattened grid, shifted by
(i*dil_h // s_h) * Wq + j*dil_w // s_w:

    out[n, c, r, col] = sum_ij w[c, 0, i, j] * phase_ij[n, c, r*Wq + col + shift_ij]

(phase_ij: the flattened grid of phase ((i*dil_h) % s_h, (j*dil_w) % s_w)). Each of the k*k
multiply-adds then runs numpy's contiguous loops over whole channel planes instead of crawling
along (strided) rows of W_out values; the Wq - W_out extra cells per row are computed and
dropped. Each grid has one spare row, so every run is H_out*Wq cells long and the accumulator of
a channel block is one contiguous array: numpy then adds it in one flat loop instead of one short
loop per channel (MobileNet v1 at batch 1, one thread: 1.2-1.3x on its 28x28 and smaller layers).
The grids and accumulators are scratch shared by every depthwise layer of a thread: each channel
block is cleared (a memset) and refilled just before its passes, so a net holds one set of them,
sized for its largest layer (MobileNet v1: 14 MB of per-layer grids before; as fast).

With numba (kernels/jit.py), the forward of a 3x3 depthwise convolution with stride 1 or 2
(multiplier 1, undilated: MobileNet's, ShuffleNet's) is instead one compiled loop per channel,
`_depthwise_3x3`, that sums the nine taps of each output pixel in registers: one pass over the
input instead of seventeen numpy passes over the grids (MobileNet v1's thirteen layers at batch 1:
about 3.5x faster together). Other geometries keep the numpy paths.

`DepthwiseConv` has ConvGemm's interface (reshape / conv / conv_transpose), so the
convolution layer swaps it in at one place.
"""
import threading

import numpy as np

from ..blob import flat_view, zeros
from .workers import parallel_kernel
from . import jit
from .pooling import _phase_slices

__all__ = ["DepthwiseConv", "is_depthwise", "WORKING_SET_BYTES"]

class _Scratch(threading.local):
    """Scratch arrays of one thread, one per role, grown to the largest request (conv.py's
    workspace, for the depthwise layers)."""

    def __init__(self):
        self.buffers = {}

    def get(self, role, size, dtype):
        buf = self.buffers.get((role, dtype))
        if buf is None or buf.size < size:
            buf = self.buffers[(role, dtype)] = np.empty(size, dtype=dtype)
        return buf


_SCRATCH = _Scratch()

# Channels are processed in blocks whose padded input and outputs stay within about
# this many bytes (the L2 cache), so the k*k passes over a block hit the cache.
WORKING_SET_BYTES = 512 << 10


def is_depthwise(in_channels, out_channels, group, num_spatial):
    """Can DepthwiseConv run this convolution? One input channel per group, 2-D."""
    return (num_spatial == 2 and group == in_channels and group > 1
            and out_channels % in_channels == 0)


@jit.kernel
def _depthwise_3x3(x, w, bias, out, c0, c1, stride, pad_h, pad_w, relu, slope):
    """out[n, c] = sum_ij w[c, 0, i, j] * x_padded[n, c, stride*r + i, stride*q + j] + bias[c] for
    channels c0:c1; a 3x3 kernel, stride 1 or 2; then, if relu, Caffe's max(v, 0) + slope*min(v, 0)
    (slope in out's dtype, so no float64 enters the loops).

    Each channel is first copied into zero-bordered flat planes, so every tap reads in bounds and
    all nine taps of every output pixel are one loop over the flattened output (the cells past each
    row's end computed and dropped): a loop per row of a 14-pixel map is too short to vectorize
    (MobileNet v1's 14x14 and 7x7 layers: 3.5-5x). The offsets are literals once each plane is
    sliced at its shift (numba cannot prove a runtime offset non-negative, and its negative-index
    check stops vectorization).
      stride 1: one plane of pitch W + 2*pad_w; output (r, q) is cell r*pitch + q and tap (i, j) is
        cell i*pitch + j further.
      stride 2: four planes, the padded rows and columns split by parity (as max pooling's phases,
        kernels/pooling.py), of pitch W_out + 1: tap (i, j) of output (r, q) is cell
        (r + i // 2)*pitch + q + j // 2 of plane (i % 2, j % 2), so the loads are contiguous too.
        (Computing each input row at full resolution and keeping every second value took twice
        the multiply-adds: MobileNet v1's stride-2 layers ran 1.5-1.7x slower, timed alone.)
    The ReLU is max(v, 0) + slope * min(v, 0) without a branch: a test on the value stops a loop
    vectorizing (as a separate short loop per row it took three quarters of the time on 14x14 and
    7x7 maps). max and min keep NaN and -0.0 as Caffe's std::max / std::min do."""
    n, _, height, width = x.shape
    out_h, out_w = out.shape[2], out.shape[3]
    zero = slope - slope
    if stride == 1:
        pitch = width + 2 * pad_w
        cells = out_h * pitch
        # The zero-bordered plane, flattened, with two spare cells for the last row's taps.
        planes = np.zeros((1, (height + 2 * pad_h) * pitch + 2), x.dtype)
    else:
        pitch = out_w + 1
        cells = out_h * pitch
        # rows 0..out_h of each parity plane, and one spare cell for the last tap's column shift
        planes = np.zeros((4, (out_h + 1) * pitch + 1), x.dtype)
    rows = np.empty(cells, x.dtype)
    for image in range(n):
        for ch in range(c0, c1):
            if stride == 1:
                for y in range(height):
                    dst, src = planes[0, (pad_h + y) * pitch + pad_w:], x[image, ch, y]
                    for q in range(width):
                        dst[q] = src[q]
            else:
                for y in range(height):
                    # image column m is padded column m + pad_w: plane (m + pad_w) % 2, cell
                    # (m + pad_w) // 2 of the row; one loop fills both column parities, which
                    # the compiler vectorizes as one interleaved load (a loop per parity does not)
                    row = y + pad_h
                    base, parity = (row // 2) * pitch, (row % 2) * 2
                    src = x[image, ch, y]
                    even = planes[parity + pad_w % 2, base + pad_w // 2:]
                    odd = planes[parity + 1 - pad_w % 2, base + (pad_w + 1) // 2:]
                    for u in range(width // 2):
                        even[u] = src[2 * u]
                        odd[u] = src[2 * u + 1]
                    if width % 2:
                        even[width // 2] = src[width - 1]
            w0, w1, w2 = w[ch, 0, 0, 0], w[ch, 0, 0, 1], w[ch, 0, 0, 2]
            w3, w4, w5 = w[ch, 0, 1, 0], w[ch, 0, 1, 1], w[ch, 0, 1, 2]
            w6, w7, w8 = w[ch, 0, 2, 0], w[ch, 0, 2, 1], w[ch, 0, 2, 2]
            beta = bias[ch]
            if stride == 1:
                a, b, d = planes[0], planes[0, pitch:], planes[0, 2 * pitch:]
                for t in range(cells):
                    v = (w0 * a[t] + w1 * a[t + 1] + w2 * a[t + 2] + w3 * b[t] + w4 * b[t + 1]
                         + w5 * b[t + 2] + w6 * d[t] + w7 * d[t + 1] + w8 * d[t + 2] + beta)
                    rows[t] = max(v, zero) + slope * min(v, zero) if relu else v
            else:
                ee, eo, oe, oo = planes[0], planes[1], planes[2], planes[3]
                below, below_odd = planes[0, pitch:], planes[1, pitch:]
                for t in range(cells):
                    v = (w0 * ee[t] + w1 * eo[t] + w2 * ee[t + 1] + w3 * oe[t] + w4 * oo[t]
                         + w5 * oe[t + 1] + w6 * below[t] + w7 * below_odd[t] + w8 * below[t + 1]
                         + beta)
                    rows[t] = max(v, zero) + slope * min(v, zero) if relu else v
            for r in range(out_h):
                o, src = out[image, ch, r], rows[r * pitch:]
                for q in range(out_w):
                    o[q] = src[q]


def compiled_3x3_applies(multiplier, kernel, stride, dilation):
    """Whether _depthwise_3x3 computes this forward (and numba is on)."""
    return (jit.enabled() and multiplier == 1 and tuple(kernel) == (3, 3)
            and tuple(stride) in ((1, 1), (2, 2)) and tuple(dilation) == (1, 1))


class DepthwiseConv:
    """Convolution of (n, C, H, W) images with (C*m, 1, k_h, k_w) weights, group = C."""

    layout = "depthwise"   # ConvGemm's attribute, for code that inspects it

    def __init__(self, in_channels, out_channels, kernel, pad, stride, dilation):
        self.in_channels, self.out_channels = in_channels, out_channels
        self.multiplier = out_channels // in_channels
        self.kernel, self.pad, self.stride, self.dilation = kernel, pad, stride, dilation
        self._key = None

    def reshape(self, num, im_spatial, dtype):
        key = (num, tuple(im_spatial), np.dtype(dtype), jit.enabled())
        if key == self._key:
            return
        self._key = key
        (kh, kw), (ph, pw), (sh, sw), (dh, dw) = self.kernel, self.pad, self.stride, self.dilation
        h, w = im_spatial
        self.out_spatial = ((h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1,
                            (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1)
        c, m = self.in_channels, self.multiplier
        ho, wo = self.out_spatial
        itemsize = np.dtype(dtype).itemsize
        per_channel = num * ((h + 2 * ph) * (w + 2 * pw) + 2 * m * ho * wo) * itemsize
        self.block = max(1, min(c, WORKING_SET_BYTES // max(1, per_channel)))
        # The strided-view path's buffers, made on first use (a multiplier-1 inference forward
        # never uses them). Zero borders: written once, only the interior is overwritten later.
        padded = (num, c, h + 2 * ph, w + 2 * pw)
        self._lazy = dict(
            _padded=(lambda: zeros(padded, dtype)) if ph or pw else (lambda: None),
            _padded_diff=lambda: zeros(padded, dtype),
            _product=lambda: np.empty((num, self.block, m, ho, wo), dtype),
            _summed=(lambda: np.empty((num, self.block, ho, wo), dtype)) if m > 1 else (lambda: None))
        for name in self._lazy:
            self.__dict__.pop(name, None)
        self._phase_blocks = None   # the views of the phase grids, on the first forward
        self.compiled = compiled_3x3_applies(m, self.kernel, self.stride, self.dilation)
        if self.compiled:
            self._no_bias = np.zeros(c, dtype)
        elif m == 1:
            self._plan_phases(num, (h, w), np.dtype(dtype))

    def __getattr__(self, name):
        # Only reached for attributes not set yet: the lazy scratch buffers above.
        lazy = self.__dict__.get("_lazy", {})
        if name not in lazy:
            raise AttributeError(name)
        value = self.__dict__[name] = lazy[name]()
        return value

    def _plan_phases(self, num, im_spatial, dtype):
        """Geometry of the phase grids (see the module docstring) and their channel blocks."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        (ho, wo), (h, w), (ph, pw) = self.out_spatial, im_spatial, self.pad
        self.grid = (ho + (kh - 1) * dh // sh, wo + (kw - 1) * dw // sw)      # Hq, Wq
        hq, wq = self.grid
        phases = sorted({((i * dh) % sh, (j * dw) % sw) for i in range(kh) for j in range(kw)})
        # (phase number, flat shift) of every kernel offset, in _offsets' order
        self.phase_offsets = [(phases.index(((i * dh) % sh, (j * dw) % sw)),
                               (i * dh // sh) * wq + j * dw // sw) for i in range(kh) for j in range(kw)]
        # grid cells holding image pixels, and those pixels, per phase
        self.phase_copies = []
        for a, b in phases:
            (grid_h, image_h), (grid_w, image_w) = (_phase_slices(a, ph, sh, h, hq),
                                                    _phase_slices(b, pw, sw, w, wq))
            self.phase_copies.append(((grid_h, grid_w), (image_h, image_w)))
        self.run_length = ho * wq
        per_channel = num * (len(phases) * (hq + 1) * wq + 2 * ho * wq) * dtype.itemsize
        self.phase_block = max(1, min(self.in_channels, WORKING_SET_BYTES // max(1, per_channel)))
        self._phase_dtype = dtype

    def _padded_input(self, im, buffer):
        if buffer is None:
            return im
        ph, pw = self.pad
        buffer[:, :, ph: ph + im.shape[2], pw: pw + im.shape[3]] = im
        return buffer

    def _blocks(self):
        """Channel ranges whose inputs and outputs fit in the cache together."""
        for start in range(0, self.in_channels, self.block):
            yield start, min(self.in_channels, start + self.block)

    def _offsets(self):
        (kh, kw), (dh, dw) = self.kernel, self.dilation
        for i in range(kh):
            for j in range(kw):
                yield i, j, i * dh, j * dw

    def _view(self, padded, top, left):
        (sh, sw), (ho, wo) = self.stride, self.out_spatial
        return padded[:, :, top: top + sh * (ho - 1) + 1: sh, left: left + sw * (wo - 1) + 1: sw]

    def _split(self, array5, a, b):
        """Channels a:b of an (n, C, m, H_out, W_out) array; the m axis dropped when m == 1."""
        part = array5[:, a:b]
        return part[:, :, 0] if self.multiplier == 1 else part

    def _weights(self, w, a, b, i, j):
        """w[a*m:b*m, 0, i, j] shaped to broadcast against _split's arrays."""
        tail = (1, 1) if self.multiplier == 1 else (self.multiplier, 1, 1)
        return w[a * self.multiplier: b * self.multiplier, 0, i, j].reshape((b - a,) + tail)

    def _spread(self, view):
        return view if self.multiplier == 1 else view[:, :, None]

    # Whether conv() takes relu_slope (the compiled forward applies the ReLU as it writes).
    fuses_relu = property(lambda self: self.compiled)

    def conv(self, im, w, out=None, dout=None, dw=None, bias=None, relu_slope=None):
        """out = w * im + bias (if out given), then a ReLU with relu_slope if given (only where
        fuses_relu); dw += dout (x) im (if dw given)."""
        if relu_slope is not None and not self.fuses_relu:
            raise ValueError("relu_slope is only taken by the compiled forward (see fuses_relu)")
        n, c, m = im.shape[0], self.in_channels, self.multiplier
        if out is not None and self.compiled:
            bias = self._no_bias if bias is None else bias
            pad_h, pad_w = self.pad
            relu, slope = relu_slope is not None, out.dtype.type(relu_slope or 0)
            parallel_kernel(_depthwise_3x3, (im, w, bias, out, self.stride[0], pad_h, pad_w, relu, slope),
                            c, at=4, cost=n * (im[0, 0].size + out[0, 0].size))
            out = None
        elif out is not None and m == 1:
            self._conv_phases(im, w, out, bias)
            out = None
        if out is None and dw is None:
            return
        xp = self._padded_input(im, self._padded)
        if out is not None:
            out5 = out.reshape(n, c, m, *self.out_spatial)
            for a, b in self._blocks():
                target = self._split(out5, a, b)
                product = self._split(self._product, 0, b - a)
                image = xp[:, a:b]
                for k, (i, j, top, left) in enumerate(self._offsets()):
                    view = self._spread(self._view(image, top, left))
                    if k == 0:
                        np.multiply(view, self._weights(w, a, b, i, j), out=target)
                    else:
                        np.multiply(view, self._weights(w, a, b, i, j), out=product)
                        target += product
            if bias is not None:
                out5 += bias.reshape(c, m, 1, 1)
        if dw is not None:
            self._weight_grad(xp, dout, dw)

    def _conv_phases(self, im, w, out, bias):
        """out = w * im (+ bias) for multiplier 1, on the phase grids."""
        n, c = im.shape[:2]
        buffers = self._phase_buffers()
        if self._phase_blocks is None or any(a is not b for a, b in zip(buffers, self._planned_on)):
            self._plan_phase_blocks(n, c, buffers)
        np.copyto(self._weight_columns, w.reshape(c, -1))
        for a, b, grids, acc, term, rows, terms in self._phase_blocks:
            # The grids are shared with every depthwise layer: clear this block's (the padding
            # must read zero), then fill in its pixels, while the block is in cache anyway.
            for grid, ((grid_h, grid_w), (image_h, image_w)) in zip(grids, self.phase_copies):
                grid.fill(0)
                grid.reshape(n, b - a, self.grid[0] + 1, self.grid[1])[:, :, grid_h, grid_w] = (
                    im[:, a:b, image_h, image_w])
            (run, weight), *rest = terms
            np.multiply(run, weight, out=acc)
            for run, weight in rest:
                np.multiply(run, weight, out=term)
                np.add(acc, term, out=acc)
            if bias is not None:
                np.add(rows, bias[a:b].reshape(-1, 1, 1), out=out[:, a:b])
            else:
                out[:, a:b] = rows

    def _phase_buffers(self):
        """This forward's scratch (grids, accumulator, product): shared by every depthwise layer
        of the thread, so a net holds one set, sized for its largest layer."""
        (hq, wq), length = self.grid, self.run_length
        num, dtype = self._key[0], self._phase_dtype
        return (_SCRATCH.get("grids", len(self.phase_copies) * num * self.in_channels * (hq + 1) * wq, dtype),
                _SCRATCH.get("acc", num * self.phase_block * length, dtype),
                _SCRATCH.get("term", num * self.phase_block * length, dtype))

    def _plan_phase_blocks(self, n, c, buffers):
        """Per channel block, the views every forward computes on (slicing them once saves a
        few microseconds per block and forward: MobileNet v1 at batch 1, 1.02-1.1x)."""
        (hq, wq), (ho, wo), length = self.grid, self.out_spatial, self.run_length
        grid_buffer, acc_buffer, term_buffer = self._planned_on = buffers
        # The spare row (hq + 1) lets the last offsets' runs overrun the last output row.
        phases = flat_view(grid_buffer, (len(self.phase_copies), n, c, (hq + 1) * wq))
        self._weight_columns = np.empty((c, len(self.phase_offsets)), self._phase_dtype)
        self._phase_blocks = []
        for a, b in self._blocks_of(self.phase_block):
            shape = (n, b - a, length)
            acc, term = flat_view(acc_buffer, shape), flat_view(term_buffer, shape)
            grids = [phase[:, a:b] for phase in phases]
            terms = [(phases[q, :, a:b, shift: shift + length], self._weight_columns[a:b, k: k + 1])
                     for k, (q, shift) in enumerate(self.phase_offsets)]
            rows = acc.reshape(n, b - a, ho, wq)[:, :, :, :wo]
            self._phase_blocks.append((a, b, grids, acc, term, rows, terms))

    def _blocks_of(self, size):
        for start in range(0, self.in_channels, size):
            yield start, min(self.in_channels, start + size)

    def conv_transpose(self, dout, w, im=None, im_data=None, dw=None, bias=None):
        """im = w^T * dout (+ bias) (if im given, overwritten); dw += dout (x) im_data (if dw given)."""
        n, c, m = dout.shape[0], self.in_channels, self.multiplier
        if dw is not None:
            self._weight_grad(self._padded_input(im_data, self._padded), dout, dw)
        if im is None:
            return
        dout5 = dout.reshape(n, c, m, *self.out_spatial)
        dxp = self._padded_diff
        dxp[...] = 0
        for a, b in self._blocks():
            grad = self._split(dout5, a, b)
            product = self._split(self._product, 0, b - a)
            image = dxp[:, a:b]
            for i, j, top, left in self._offsets():
                target = self._view(image, top, left)
                np.multiply(grad, self._weights(w, a, b, i, j), out=product)
                if m == 1:
                    target += product
                else:
                    summed = self._summed[:, : b - a]
                    np.sum(product, axis=2, out=summed)
                    target += summed
        ph, pw = self.pad
        im[...] = dxp[:, :, ph: ph + im.shape[2], pw: pw + im.shape[3]]
        if bias is not None:
            im += bias.reshape(1, c, 1, 1)

    def _weight_grad(self, xp, dout, dw):
        n, c, m = dout.shape[0], self.in_channels, self.multiplier
        dout5 = dout.reshape(n, c, m, *self.out_spatial)
        grad = dw.reshape(c, m, *self.kernel)
        for i, j, top, left in self._offsets():
            view = self._view(xp, top, left)
            grad[:, :, i, j] += np.einsum("nchw,ncqhw->cq", view, dout5)
