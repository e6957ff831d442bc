"""Core layers: InnerProduct, Softmax, Split, Silence.

Softmax (forward and backward) and Split's backward split their passes over the shared
thread pool (minicaffe.threads); each block computes what the whole-array code would.
"""
import numpy as np

from ..blob import Blob
from ..fillers import fill
from ..kernels import gemm
from ..layer import Layer, register_layer
from ..threads import map_flat, map_positions
from .neuron import relu, scale_and_shift

# A max, a subtraction, an exp, a sum and a division per element, relative to a plain copy.
_SOFTMAX_COST = 6


def _positions_view(array, axis):
    """array (..., C, ...) as (outer, C, inner), softmax's axis in the middle."""
    shape = array.shape
    return array.reshape(int(np.prod(shape[:axis], dtype=np.int64)), shape[axis],
                         int(np.prod(shape[axis + 1:], dtype=np.int64)))


def softmax(x, axis, out):
    """Numerically stable softmax of `x` along `axis`, written into `out` (may be `x`)."""
    if x.flags.c_contiguous and out.flags.c_contiguous:
        map_positions(_softmax_block, _positions_view(x, axis), _positions_view(out, axis),
                      cost=_SOFTMAX_COST)
    else:
        _softmax_block(x, out, axis)
    return out


def _softmax_block(x, out, axis=1):
    np.subtract(x, x.max(axis=axis, keepdims=True), out=out)
    np.exp(out, out=out)
    out /= out.sum(axis=axis, keepdims=True)


@register_layer("InnerProduct")
class InnerProductLayer(Layer):
    """top (M, N) = bottom (M, K) @ W.T + b, with M = bottom.count(0, axis), K = bottom.count(axis).

    W is (N, K), or (K, N) with `transpose: true`; the top keeps bottom's leading axes.
    """

    exact_num_bottom = 1
    exact_num_top = 1
    fused_relu_slope = None   # set on an inference net's copy with a ReLU fused in (fold.py)
    output_scale = None       # ... and a folded chain's scale, when it scales the output

    def layer_setup(self, bottom, top):
        p = self.layer_param.inner_product_param
        if p.num_output <= 0:
            raise self.error("inner_product_param.num_output must be positive")
        self.num_output = p.num_output
        self.bias_term = p.bias_term
        self.transpose = p.transpose
        self.axis = bottom[0].canonical_axis(p.axis)
        self.K = bottom[0].count(self.axis)
        self._w_grad = None
        # up to 16 MB of gradient rows per block of the weight-gradient GEMM: with a small
        # batch each GEMM is short, so fewer, larger blocks beat cache-sized ones (fc6 of
        # CaffeNet at batch 32: 7-row blocks 2-3x slower than 455-row ones)
        w_rows, w_cols = (self.K, self.num_output) if self.transpose else (self.num_output, self.K)
        self._grad_rows = min(w_rows, max(1, (1 << 22) // w_cols))
        if self.blobs_loaded:
            return
        w_shape = (self.K, self.num_output) if self.transpose else (self.num_output, self.K)
        self.blobs = [fill(Blob(w_shape, self.dtype), p.weight_filler, f"layer {self.name!r} weights")]
        if self.bias_term:
            self.blobs.append(fill(Blob((self.num_output,), self.dtype), p.bias_filler,
                                   f"layer {self.name!r} bias"))

    def reshape(self, bottom, top):
        k = bottom[0].count(self.axis)
        if k != self.K:
            raise self.error(f"input size {bottom[0].shape} gives {k} features from axis "
                             f"{self.axis} but the weights expect {self.K}")
        top[0].reshape(bottom[0].shape[: self.axis] + (self.num_output,))

    def _weight(self):
        w = self.blobs[0].data
        return w if self.transpose else w.T  # (K, N)

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(-1, self.K)
        y = top[0].data.reshape(-1, self.num_output)
        gemm.matmul(x, self._weight(), y)
        if self.output_scale is not None:
            scale_and_shift(y, self.output_scale, self.blobs[1].data, 1)
        elif self.bias_term:
            y += self.blobs[1].data
        if self.fused_relu_slope is not None:
            relu(y, y, self.fused_relu_slope)

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff.reshape(-1, self.num_output)
        x = bottom[0].data.reshape(-1, self.K)
        if self.param_propagate_down[0]:
            # dW += dy^T x (or x^T dy), a block of weight rows at a time, so that the
            # accumulation never allocates a weight-sized temporary.
            w_diff = self.blobs[0].diff
            a, b = (x.T, dy) if self.transpose else (dy.T, x)
            rows = self._grad_rows
            if self._w_grad is None or self._w_grad.dtype != w_diff.dtype:
                self._w_grad = np.empty((rows, w_diff.shape[1]), dtype=w_diff.dtype)
            for start in range(0, w_diff.shape[0], rows):
                stop = min(start + rows, w_diff.shape[0])
                block = self._w_grad[: stop - start]
                gemm.matmul(a[start:stop], b, block)
                w_diff[start:stop] += block
        if self.bias_term and self.param_propagate_down[1]:
            self.blobs[1].diff[...] += dy.sum(axis=0)
        if propagate_down[0]:
            gemm.matmul(dy, self._weight().T, bottom[0].diff.reshape(-1, self.K))


@register_layer("Softmax")
class SoftmaxLayer(Layer):
    """top = exp(x) / sum(exp(x)) along `softmax_param.axis` (default 1)."""

    exact_num_bottom = 1
    exact_num_top = 1
    allows_in_place = True

    def layer_setup(self, bottom, top):
        self.axis = bottom[0].canonical_axis(self.layer_param.softmax_param.axis)

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        softmax(bottom[0].data, self.axis, top[0].data)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        arrays = [top[0].data, top[0].diff, bottom[0].diff]
        map_positions(self._softmax_grad, *[_positions_view(a, self.axis) for a in arrays],
                      cost=_SOFTMAX_COST)

    @staticmethod
    def _softmax_grad(y, dy, dx):
        # dx = (dy - sum_c dy * y) * y; dx may be dy (in place)
        dot = (dy * y).sum(axis=1, keepdims=True)
        np.subtract(dy, dot, out=dx)
        dx *= y


@register_layer("Split")
class SplitLayer(Layer):
    """Every top shares bottom's data; bottom diff = sum of the top diffs (fan-out)."""

    exact_num_bottom = 1
    min_num_top = 1

    def reshape(self, bottom, top):
        for t in top:
            if t is bottom[0]:
                raise self.error("Split does not work in place")
            t.reshape(bottom[0].shape)
            t.share_data(bottom[0])

    def forward(self, bottom, top):
        pass  # tops already see bottom's data

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        map_flat(self._sum, bottom[0].diff, *[t.diff for t in top])

    @staticmethod
    def _sum(diff, *top_diffs):
        diff[...] = top_diffs[0]
        for d in top_diffs[1:]:
            diff += d


@register_layer("Silence")
class SilenceLayer(Layer):
    """Consumes its bottoms and produces nothing (so they are not net outputs)."""

    min_num_bottom = 1
    exact_num_top = 0

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        for b, down in zip(bottom, propagate_down):
            if down:
                b.diff[...] = 0
