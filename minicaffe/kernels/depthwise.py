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

`DepthwiseConv` has ConvGemm's interface (reshape / conv / conv_transpose), so the
convolution layer swaps it in at one place.
"""
import threading

import numpy as np

from ..blob import zeros

__all__ = ["DepthwiseConv", "is_depthwise", "WORKING_SET_BYTES"]

# Channels are processed in blocks whose padded input and outputs stay within about
# this many bytes (the L2 cache), so the k*k passes over a block hit the cache.
WORKING_SET_BYTES = 512 << 10


def is_depthwise(in_channels, out_channels, group, num_spatial):
    """Can DepthwiseConv run this convolution? One input channel per group, 2-D."""
    return (num_spatial == 2 and group == in_channels and group > 1
            and out_channels % in_channels == 0)


class _Padded(threading.local):
    """The padded input and padded input gradient, one buffer each per thread for every
    DepthwiseConv (grown to the largest): they are dead once a conv or conv_transpose call
    returns, so a net needs one of each, not one per layer."""

    def __init__(self):
        self.buffers = {}

    def get(self, role, shape, dtype):
        size = int(np.prod(shape, dtype=np.int64))
        buf = self.buffers.get((role, dtype))
        if buf is None or buf.size < size:
            buf = self.buffers[(role, dtype)] = zeros(size, dtype)
        return buf[:size].reshape(shape)


_PADDED = _Padded()


class DepthwiseConv:
    """Convolution of (n, C, H, W) images with (C*m, 1, k_h, k_w) weights, group = C."""

    layout = "depthwise"   # ConvGemm's attribute, for code that inspects it

    def __init__(self, in_channels, out_channels, kernel, pad, stride, dilation):
        self.in_channels, self.out_channels = in_channels, out_channels
        self.multiplier = out_channels // in_channels
        self.kernel, self.pad, self.stride, self.dilation = kernel, pad, stride, dilation
        self._key = None

    def reshape(self, num, im_spatial, dtype):
        key = (num, tuple(im_spatial), np.dtype(dtype))
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
        # Zero borders: written once here, only the interior is overwritten later.
        self._padded_shape = (num, c, h + 2 * ph, w + 2 * pw) if ph or pw else None
        self._product = zeros((num, self.block, m, ho, wo), dtype)
        self._summed = zeros((num, self.block, ho, wo), dtype) if m > 1 else None

    def _padded_input(self, im):
        """im inside a zero border of pad rows and columns, in the shared padded buffer."""
        if self._padded_shape is None:
            return im
        buffer = _PADDED.get("input", self._padded_shape, im.dtype)
        (ph, pw), (h, w) = self.pad, im.shape[2:]
        # Another layer's values may be in the border: zero it at every call.
        buffer[:, :, :ph].fill(0)
        buffer[:, :, ph + h:].fill(0)
        buffer[:, :, ph: ph + h, :pw].fill(0)
        buffer[:, :, ph: ph + h, pw + w:].fill(0)
        buffer[:, :, ph: ph + h, pw: pw + w] = im
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

    def conv(self, im, w, out=None, dout=None, dw=None, bias=None):
        """out = w * im + bias (if out given); dw += dout (x) im (if dw given)."""
        xp = self._padded_input(im)
        n, c, m = im.shape[0], self.in_channels, self.multiplier
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

    def conv_transpose(self, dout, w, im=None, im_data=None, dw=None, bias=None):
        """im = w^T * dout (+ bias) (if im given, overwritten); dw += dout (x) im_data (if dw given)."""
        n, c, m = dout.shape[0], self.in_channels, self.multiplier
        if dw is not None:
            self._weight_grad(self._padded_input(im_data), dout, dw)
        if im is None:
            return
        dout5 = dout.reshape(n, c, m, *self.out_spatial)
        ph, pw = self.pad
        dxp = _PADDED.get("diff", (n, c, im.shape[2] + 2 * ph, im.shape[3] + 2 * pw), dout.dtype)
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
