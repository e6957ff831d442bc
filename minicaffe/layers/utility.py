"""Utility layers: Eltwise, Reduction, ArgMax, Parameter, Embed."""
import numpy as np

from ..blob import Blob
from ..fillers import fill
from ..layer import Layer, register_layer
from ..proto import caffe_pb2
from ..threads import map_flat
from .neuron import relu, relu_piece

__all__ = ["EltwiseLayer", "ReductionLayer", "ArgMaxLayer", "ParameterLayer", "EmbedLayer"]

_ELT = caffe_pb2.EltwiseParameter
_RED = caffe_pb2.ReductionParameter


def _canonical_axis(layer, blob, axis):
    try:
        return blob.canonical_axis(axis)
    except IndexError as e:
        raise layer.error(str(e)) from None


def _refuse_in_place(layer, bottom, top):
    """Raise unless every top is a blob of its own (none of these layers can work in place)."""
    if any(t is b for t in top for b in bottom):
        raise layer.error(f"{layer.type} does not allow in-place computation; give the top "
                          f"its own name")


@register_layer("Eltwise")
class EltwiseLayer(Layer):
    """Element-wise over same-shaped bottoms: PROD (x1*x2*...), SUM (c1*x1 + c2*x2 + ...), MAX.

    SUM takes one `coeff` per bottom (default all 1). PROD's gradient is the product of the
    other bottoms (stable_prod_grad, default) or top / x_i; MAX routes it to the bottom that won
    (on a tie the second bottom beats the first; later bottoms win only when strictly larger).
    Forward and backward split into flat blocks over the shared thread pool.
    """

    min_num_bottom = 2
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.eltwise_param
        if len(p.coeff) and len(p.coeff) != len(bottom):
            raise self.error(f"eltwise_param takes one coeff per bottom blob: {len(bottom)} "
                             f"bottoms but {len(p.coeff)} coeffs")
        if p.operation == _ELT.PROD and len(p.coeff):
            raise self.error("eltwise_param.coeff is only for operation SUM, not PROD")
        if p.operation not in (_ELT.PROD, _ELT.SUM, _ELT.MAX):
            raise self.error(f"unknown eltwise_param.operation {p.operation}")
        self.op = p.operation
        self.coeffs = [np.dtype(self.dtype).type(c) for c in p.coeff] if len(p.coeff) \
            else [None] * len(bottom)  # None: plain addition, no multiply
        self.stable_prod_grad = p.stable_prod_grad

    def reshape(self, bottom, top):
        _refuse_in_place(self, bottom, top)
        for i, b in enumerate(bottom[1:], 1):
            if b.shape != bottom[0].shape:
                raise self.error(f"all bottoms must have the same shape: bottom[0] is "
                                 f"{bottom[0].shape}, bottom[{i}] is {b.shape}")
        top[0].reshape_like(bottom[0])
        if self.op == _ELT.MAX:
            self.mask = np.empty(bottom[0].shape, dtype=np.int32)
            self.wins = np.empty(bottom[0].shape, dtype=bool)

    # An inference net's copy of the layer with an in-place ReLU after it fused in (fold.py)
    # sets the slope: each piece of the output is rectified while it is in cache.
    fused_relu_slope = None

    def forward(self, bottom, top):
        xs = [b.data for b in bottom]
        slope = self.fused_relu_slope
        if self.op == _ELT.MAX:
            map_flat(self._max, top[0].data, self.mask, self.wins, *xs)
            if slope is not None:
                relu(top[0].data, top[0].data, slope)
            return
        combine = self._prod if self.op == _ELT.PROD else self._sum
        if slope is None:
            map_flat(combine, top[0].data, *xs)
            return

        def rectified(out, *pieces):   # each piece rectified while it is in cache
            combine(out, *pieces)
            relu_piece(out, out, slope)

        map_flat(rectified, top[0].data, *xs)

    @staticmethod
    def _prod(out, *xs):
        np.multiply(xs[0], xs[1], out=out)
        for x in xs[2:]:
            out *= x

    def _sum(self, out, *xs):
        c = self.coeffs[0]
        rest = zip(xs[1:], self.coeffs[1:])
        if (c is None or c == 1) and (self.coeffs[1] is None or self.coeffs[1] == 1):
            np.add(xs[0], xs[1], out=out)   # one pass for the usual a + b
            rest = zip(xs[2:], self.coeffs[2:])
        elif c is None or c == 1:
            out[...] = xs[0]
        else:
            np.multiply(xs[0], c, out=out)
        for x, c in rest:
            out += x if c is None or c == 1 else c * x

    @staticmethod
    def _max(out, mask, wins, a, b, *rest):
        # Arithmetic on the masks rather than masked copies: much faster on random data.
        np.greater(a, b, out=wins)  # the first bottom wins only when strictly larger
        np.subtract(1, wins, out=mask)
        np.maximum(a, b, out=out)
        for k, x in enumerate(rest, 2):
            np.greater(x, out, out=wins)
            mask += wins * (k - mask)
            np.maximum(out, x, out=out)

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff
        for i, (b, down) in enumerate(zip(bottom, propagate_down)):
            if not down:
                continue
            if self.op == _ELT.PROD:
                if self.stable_prod_grad:
                    others = [o.data for j, o in enumerate(bottom) if j != i]
                    map_flat(self._prod_grad, b.diff, dy, *others)
                else:
                    map_flat(self._quotient_grad, b.diff, dy, top[0].data, b.data)
            elif self.op == _ELT.SUM:
                c = self.coeffs[i]
                if c is None or c == 1:
                    map_flat(np.copyto, b.diff, dy)
                else:
                    map_flat(lambda diff, dy, c=c: np.multiply(dy, c, out=diff), b.diff, dy)
            else:
                map_flat(lambda diff, dy, mask, wins, i=i: self._max_grad(diff, dy, mask, wins, i),
                         b.diff, dy, self.mask, self.wins)

    @staticmethod
    def _prod_grad(diff, dy, *others):
        diff[...] = others[0]
        for o in others[1:]:
            diff *= o
        diff *= dy

    @staticmethod
    def _quotient_grad(diff, dy, y, x):
        np.divide(y, x, out=diff)
        diff *= dy

    @staticmethod
    def _max_grad(diff, dy, mask, wins, i):
        np.equal(mask, i, out=wins)
        np.multiply(dy, wins, out=diff)


@register_layer("Reduction")
class ReductionLayer(Layer):
    """Reduce the axes from `axis` on: top[n] = coeff * op(x[n, :]); top shape bottom.shape[:axis].

    op: SUM, ASUM (sum |x|), SUMSQ (sum x^2) or MEAN. The default axis 0 gives a scalar.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        self.op = self.layer_param.reduction_param.operation
        if self.op not in (_RED.SUM, _RED.ASUM, _RED.SUMSQ, _RED.MEAN):
            raise self.error(f"unknown reduction_param.operation {self.op}")

    def reshape(self, bottom, top):
        _refuse_in_place(self, bottom, top)
        p = self.layer_param.reduction_param
        axis = _canonical_axis(self, bottom[0], p.axis)
        top[0].reshape(bottom[0].shape[:axis])
        self.num = bottom[0].count(0, axis)
        self.dim = bottom[0].count(axis)
        coeff = np.dtype(self.dtype).type(p.coeff)
        self.coeff = coeff / self.dim if self.op == _RED.MEAN else coeff

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.num, self.dim)
        out = top[0].data.reshape(self.num)
        if self.op in (_RED.SUM, _RED.MEAN):
            np.sum(x, axis=1, out=out)
        elif self.op == _RED.ASUM:
            np.sum(np.abs(x), axis=1, out=out)
        else:
            np.einsum("ij,ij->i", x, x, out=out)
        if self.coeff != 1:
            out *= self.coeff

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        scale = top[0].diff.reshape(self.num, 1) * self.coeff
        diff = bottom[0].diff.reshape(self.num, self.dim)
        x = bottom[0].data.reshape(self.num, self.dim)
        if self.op in (_RED.SUM, _RED.MEAN):
            diff[...] = scale
        elif self.op == _RED.ASUM:
            np.multiply(np.sign(x), scale, out=diff)
        else:
            np.multiply(x, 2 * scale, out=diff)


def _top_k(x, k):
    """(values, indices) of the k largest entries of each row of x, largest first.

    Equal values are ordered by larger index first, which is how Caffe's sort of
    (value, index) pairs breaks ties.
    """
    # Searching the reversed rows makes the first hit among equals the largest index.
    if k == 1:
        reversed_order = np.argmax(x[:, ::-1], axis=1)[:, None]
    else:
        reversed_order = np.argsort(-x[:, ::-1], axis=1, kind="stable")[:, :k]
    indices = x.shape[1] - 1 - reversed_order
    return np.take_along_axis(x, indices, axis=1), indices


@register_layer("ArgMax")
class ArgMaxLayer(Layer):
    """Indices (and with out_max_val the values) of the top_k largest entries.

    Without `axis`: per item over all of its values; top (N, 1, top_k), or (N, 2, top_k)
    holding indices then values with out_max_val. With `axis`: along that axis; top has
    top_k there and holds values if out_max_val, else indices. Not differentiable.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.argmax_param
        self.out_max_val = p.out_max_val
        self.top_k = p.top_k
        if self.top_k < 1:
            raise self.error("argmax_param.top_k must not be less than 1")
        self.axis = _canonical_axis(self, bottom[0], p.axis) if p.HasField("axis") else None
        if self.axis is not None and self.top_k > bottom[0].shape[self.axis]:
            raise self.error(f"argmax_param.top_k ({self.top_k}) must be less than or equal to "
                             f"the size of axis {self.axis} ({bottom[0].shape[self.axis]})")
        if self.axis is None and self.top_k > bottom[0].count(1):
            raise self.error(f"argmax_param.top_k ({self.top_k}) must be less than or equal to "
                             f"the number of values per item ({bottom[0].count(1)})")

    def allow_force_backward(self, bottom_index):
        # Caffe allows it and then aborts in Backward; refusing keeps force_backward nets usable.
        return False

    def reshape(self, bottom, top):
        _refuse_in_place(self, bottom, top)
        if self.axis is not None:
            shape = list(bottom[0].shape)
            shape[self.axis] = self.top_k
        else:
            # At least 3 axes, as in Caffe: (N, 1 or 2, top_k, 1, ...).
            shape = [1] * max(bottom[0].num_axes, 3)
            shape[0] = bottom[0].shape[0]
            shape[1] = 2 if self.out_max_val else 1
            shape[2] = self.top_k
        top[0].reshape(shape)

    def forward(self, bottom, top):
        x = bottom[0].data
        if self.axis is None:
            values, indices = _top_k(x.reshape(x.shape[0], -1), self.top_k)
            out = top[0].data.reshape(x.shape[0], -1, self.top_k)
            if self.out_max_val:
                out[:, 0] = indices
                out[:, 1] = values
            else:
                out[:, 0] = indices
        else:
            moved = np.moveaxis(x, self.axis, -1)
            values, indices = _top_k(moved.reshape(-1, moved.shape[-1]), self.top_k)
            result = values if self.out_max_val else indices
            out = np.moveaxis(top[0].data, self.axis, -1)
            out[...] = result.reshape(out.shape)

    def backward(self, top, propagate_down, bottom):
        if any(propagate_down):
            raise self.error("ArgMax has no gradient; it cannot be backpropagated")


@register_layer("Parameter")
class ParameterLayer(Layer):
    """Exposes one learnable blob of parameter_param.shape as its top (no bottoms).

    The top shares data and diff with the blob, so gradients reaching the top train it.
    The blob starts at zero, as in Caffe.
    """

    exact_num_bottom = 0
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        # No bottom to take the dtype from: use the top's (the Net's) dtype.
        self.dtype = top[0].dtype
        self.shape = tuple(self.layer_param.parameter_param.shape.dim)
        if any(d < 0 for d in self.shape):
            raise self.error(f"parameter_param.shape {list(self.shape)} has a negative dimension")
        if not self.blobs_loaded:
            self.blobs = [Blob(self.shape, dtype=self.dtype)]
        elif self.blobs[0].count() != int(np.prod(self.shape, dtype=np.int64)):
            raise self.error(f"the loaded blob {self.blobs[0].shape} does not match "
                             f"parameter_param.shape {list(self.shape)}")

    def reshape(self, bottom, top):
        top[0].reshape(self.shape)
        top[0].share_data(self.blobs[0])
        top[0].share_diff(self.blobs[0])

    def forward(self, bottom, top):
        pass  # the top is the blob

    def backward(self, top, propagate_down, bottom):
        pass  # the top's diff is the blob's diff


@register_layer("Embed")
class EmbedLayer(Layer):
    """Look-up table: top[..., :] = W[x[...], :] (+ b), W (input_dim, num_output).

    bottom: integer indices in [0, input_dim) of any shape; top: bottom.shape + (num_output,).
    The indices get no gradient.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.embed_param
        if p.num_output <= 0:
            raise self.error("embed_param.num_output must be positive")
        if p.input_dim <= 0:
            raise self.error("embed_param.input_dim (the number of distinct indices) must be "
                             "positive")
        self.num_output = p.num_output
        self.input_dim = p.input_dim
        self.bias_term = p.bias_term
        if self.blobs_loaded:
            return
        self.blobs = [fill(Blob((self.input_dim, self.num_output), dtype=self.dtype),
                           p.weight_filler, f"layer {self.name!r} weights")]
        if self.bias_term:
            self.blobs.append(fill(Blob((self.num_output,), dtype=self.dtype), p.bias_filler,
                                   f"layer {self.name!r} bias"))

    def allow_force_backward(self, bottom_index):
        # Indices take no gradient (Caffe would abort in Backward).
        return False

    def reshape(self, bottom, top):
        _refuse_in_place(self, bottom, top)
        top[0].reshape(bottom[0].shape + (self.num_output,))

    def _indices(self, bottom):
        values = bottom[0].data.reshape(-1)
        index = values.astype(np.int64)
        bad = (index < 0) | (index >= self.input_dim) | (index != values)
        if bad.any():
            raise self.error(f"input {values[bad][0]:g} is not an integer index in "
                             f"[0, {self.input_dim - 1}] (embed_param.input_dim is "
                             f"{self.input_dim})")
        return index

    def forward(self, bottom, top):
        self.index = self._indices(bottom)
        out = top[0].data.reshape(-1, self.num_output)
        np.take(self.blobs[0].data, self.index, axis=0, out=out)
        if self.bias_term:
            out += self.blobs[1].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            raise self.error("cannot backpropagate to the Embed input (it holds indices)")
        top_diff = top[0].diff.reshape(-1, self.num_output)
        if self.param_propagate_down[0]:
            # Rows used several times collect every use's gradient.
            np.add.at(self.blobs[0].diff, self.index, top_diff)
        if self.bias_term and self.param_propagate_down[1]:
            self.blobs[1].diff[...] += top_diff.sum(axis=0)
