"""Neuron layers: elementwise functions y = f(x), one bottom and one top of the same shape.

All of them may run in place (top is bottom) except AbsVal, which Caffe refuses.
When a layer's backward needs the input x but the forward overwrote it (in place),
the layer keeps a copy of x, as Caffe's PReLU does; that way every neuron layer
here gives the right gradient in place, not only the ones whose derivative can be
read off the output y.

ReLU, Sigmoid, TanH, ELU, Clip, Swish and Dropout split their passes over the shared
thread pool (minicaffe.threads.map_flat): each block computes exactly what the whole-array
code would for its elements, so the results do not depend on the thread count.
"""
import math

import numpy as np

from ..blob import Blob
from ..layer import Layer, register_layer
from ..proto import caffe_pb2
from ..fillers import fill
from ..rng import get_rng
from ..kernels.clamp import clamp_below
from ..threads import map_flat

__all__ = ["relu", "relu_piece", "NeuronLayer", "ReLULayer", "SigmoidLayer", "TanHLayer", "PReLULayer", "ELULayer",
           "AbsValLayer", "PowerLayer", "ExpLayer", "LogLayer", "BNLLLayer", "ThresholdLayer",
           "DropoutLayer", "ClipLayer", "SwishLayer"]


# tanh's work per element relative to a streaming copy: smaller arrays are worth splitting.
_TRANSCENDENTAL_COST = 4


def _in_place(bottom, top):
    return top[0] is bottom[0] or top[0].shares_data_with(bottom[0])


class NeuronLayer(Layer):
    """Base class: top[0] gets bottom[0]'s shape; subclasses fill forward/backward."""

    exact_num_bottom = 1
    exact_num_top = 1
    allows_in_place = True

    _saved_input = None

    def backward_needs_input(self):
        """True when backward reads x itself, so an in-place forward must keep a copy of it."""
        return False

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)
        if _in_place(bottom, top) and self.backward_needs_input():
            saved = self._saved_input
            if saved is None or saved.shape != bottom[0].shape or saved.dtype != bottom[0].dtype:
                self._saved_input = np.empty(bottom[0].shape, dtype=bottom[0].dtype)
        else:
            self._saved_input = None

    def save_input(self, bottom):
        """Call first thing in forward: copies x if the forward is about to overwrite it."""
        if self._saved_input is not None:
            map_flat(np.copyto, self._saved_input, bottom[0].data)

    def input_data(self, bottom):
        """x as it was during forward (bottom's data, or the copy kept for in-place runs)."""
        return bottom[0].data if self._saved_input is None else self._saved_input


def relu(x, y, negative_slope=0.0):
    """y = max(x, 0) + negative_slope * min(x, 0), over the thread pool; y may be x. Also run by
    inference nets' Convolution / InnerProduct on their own output when a ReLU is fused (fold.py)."""
    if negative_slope == 0:
        clamp_below(x, 0, out=y)   # numpy's maximum against a scalar 0 is several times slower
    else:
        map_flat(lambda xs, ys: _leaky_relu(xs, ys, negative_slope), x, y)


def scale_and_shift(y, scale, shift, channel_axis):
    """y = scale * y + shift in place, per channel along channel_axis (scale, shift: (C,) arrays).
    Inference nets' Convolution / InnerProduct run it on their output when a BatchNorm or Scale
    is folded into it by scaling the output rather than a copy of the weights (fold.py)."""
    tail = (1,) * (y.ndim - channel_axis - 1)
    np.multiply(y, scale.reshape(scale.shape + tail), out=y)
    np.add(y, shift.reshape(shift.shape + tail), out=y)


def relu_piece(x, y, negative_slope=0.0):
    """relu() inline, for callers that already run one piece of a pass over the thread pool
    (the fused BatchNorm chain, Eltwise with a fused ReLU)."""
    if negative_slope == 0:
        clamp_below(x, 0, out=y, split=False)
    else:
        _leaky_relu(x, y, negative_slope)


def _leaky_relu(x, y, negative_slope):
    negative = np.minimum(x, 0)   # before y overwrites x in place
    np.maximum(x, 0, out=y)
    negative *= negative_slope
    y += negative


@register_layer("ReLU")
class ReLULayer(NeuronLayer):
    """y = max(x, 0) + negative_slope * min(x, 0) (a leaky ReLU when negative_slope != 0)."""

    def layer_setup(self, bottom, top):
        self.negative_slope = self.layer_param.relu_param.negative_slope

    def backward_needs_input(self):
        # With slope >= 0, y > 0 exactly when x > 0, so the top can stand in for x.
        return self.negative_slope < 0

    def forward(self, bottom, top):
        self.save_input(bottom)
        relu(bottom[0].data, top[0].data, self.negative_slope)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x = self.input_data(bottom)
        mask = getattr(self, "_mask", None)   # x > 0, in a buffer kept across iterations
        if mask is None or mask.size != x.size:
            mask = self._mask = np.empty(x.size, dtype=bool)
        map_flat(self._relu_grad if self.negative_slope == 0 else self._leaky_grad,
                 x, top[0].diff, bottom[0].diff, mask.reshape(x.shape))

    @staticmethod
    def _relu_grad(x, dy, dx, mask):
        np.greater(x, 0, out=mask)
        np.multiply(dy, mask, out=dx)

    def _leaky_grad(self, x, dy, dx, mask):
        # dx = dy where x > 0, negative_slope * dy elsewhere (x = 0 counts as negative).
        np.greater(x, 0, out=mask)
        np.multiply(dy, np.where(mask, dx.dtype.type(1), dx.dtype.type(self.negative_slope)), out=dx)


@register_layer("Sigmoid")
class SigmoidLayer(NeuronLayer):
    """y = 1 / (1 + exp(-x)), computed as 0.5 * tanh(0.5 x) + 0.5 so large |x| cannot overflow."""

    def forward(self, bottom, top):
        map_flat(self._sigmoid, bottom[0].data, top[0].data, cost=_TRANSCENDENTAL_COST)

    @staticmethod
    def _sigmoid(x, y):
        np.multiply(x, 0.5, out=y)
        np.tanh(y, out=y)
        y *= 0.5
        y += 0.5

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            map_flat(self._sigmoid_grad, top[0].data, top[0].diff, bottom[0].diff)

    @staticmethod
    def _sigmoid_grad(y, dy, dx):
        # dy/dx = y (1 - y)
        np.multiply(dy, y * (1 - y), out=dx)


@register_layer("TanH")
class TanHLayer(NeuronLayer):
    """y = tanh(x)."""

    def forward(self, bottom, top):
        map_flat(self._tanh, bottom[0].data, top[0].data, cost=_TRANSCENDENTAL_COST)

    @staticmethod
    def _tanh(x, y):
        np.tanh(x, out=y)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            map_flat(self._tanh_grad, top[0].data, top[0].diff, bottom[0].diff)

    @staticmethod
    def _tanh_grad(y, dy, dx):
        np.multiply(dy, 1 - y * y, out=dx)


@register_layer("PReLU")
class PReLULayer(NeuronLayer):
    """y = max(x, 0) + a_c * min(x, 0) with a learned slope a per channel (axis 1), or one shared.

    blobs[0]: shape (C,), or () with channel_shared; filled with the filler (default constant 0.25).
    """

    def layer_setup(self, bottom, top):
        if bottom[0].num_axes < 2:
            raise self.error(f"the bottom needs at least 2 axes (num, channels, ...), "
                             f"got shape {bottom[0].shape}")
        param = self.layer_param.prelu_param
        self.channel_shared = param.channel_shared
        channels = bottom[0].shape[1]
        if not self.blobs_loaded:
            shape = () if self.channel_shared else (channels,)
            self.blobs = [Blob(shape, dtype=self.dtype)]
            if param.HasField("filler"):
                filler = param.filler
            else:
                filler = caffe_pb2.FillerParameter(type="constant", value=0.25)
            fill(self.blobs[0], filler, what=f"layer {self.name!r} slope")
        expected = 1 if self.channel_shared else channels
        if self.blobs[0].count() != expected:
            raise self.error(f"the slope blob holds {self.blobs[0].count()} values but "
                             f"{expected} are needed (channel_shared: {self.channel_shared}, "
                             f"{channels} channels)")

    def backward_needs_input(self):
        return True

    def reshape(self, bottom, top):
        if bottom[0].num_axes < 2:
            raise self.error(f"the bottom needs at least 2 axes (num, channels, ...), "
                             f"got shape {bottom[0].shape}")
        super().reshape(bottom, top)

    def _slope(self, ndim):
        """The slopes shaped to broadcast against the bottom (channels on axis 1)."""
        a = self.blobs[0].data
        if self.channel_shared:
            return a.reshape(())
        return a.reshape((1, -1) + (1,) * (ndim - 2))

    def forward(self, bottom, top):
        self.save_input(bottom)
        x, y = bottom[0].data, top[0].data
        negative = np.minimum(x, 0)
        negative *= self._slope(x.ndim)
        np.maximum(x, 0, out=y)
        y += negative

    def backward(self, top, propagate_down, bottom):
        x = self.input_data(bottom)
        dy = top[0].diff
        not_positive = x <= 0
        # The slope gradient comes first: in place, writing dx would overwrite dy.
        if self.param_propagate_down[0]:
            contrib = dy * x
            contrib *= not_positive
            if self.channel_shared:
                self.blobs[0].diff[...] += contrib.sum()
            else:
                axes = (0,) + tuple(range(2, x.ndim))
                self.blobs[0].diff[...] += contrib.sum(axis=axes)
        if propagate_down[0]:
            factor = np.where(not_positive, self._slope(x.ndim), x.dtype.type(1))
            np.multiply(dy, factor, out=bottom[0].diff)


@register_layer("ELU")
class ELULayer(NeuronLayer):
    """y = x if x > 0 else alpha * (exp(x) - 1)."""

    def layer_setup(self, bottom, top):
        self.alpha = self.layer_param.elu_param.alpha

    def backward_needs_input(self):
        # For alpha >= 0 the sign of y is the sign of x, so y can stand in for x.
        return self.alpha < 0

    def forward(self, bottom, top):
        self.save_input(bottom)
        map_flat(self._elu, bottom[0].data, top[0].data, cost=_TRANSCENDENTAL_COST)

    def _elu(self, x, y):
        negative = np.minimum(x, 0)
        np.exp(negative, out=negative)
        negative -= 1
        negative *= self.alpha
        np.maximum(x, 0, out=y)
        y += negative

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            map_flat(self._elu_grad, self.input_data(bottom), top[0].data, top[0].diff,
                     bottom[0].diff)

    def _elu_grad(self, x, y, dy, dx):
        # For x <= 0, dy/dx = alpha * exp(x) = y + alpha.
        factor = np.where(x > 0, x.dtype.type(1), y + x.dtype.type(self.alpha))
        np.multiply(dy, factor, out=dx)


@register_layer("AbsVal")
class AbsValLayer(NeuronLayer):
    """y = |x|; dy/dx = sign(x) (0 at x = 0). Caffe does not allow it in place."""

    allows_in_place = False

    def layer_setup(self, bottom, top):
        if _in_place(bottom, top):
            raise self.error("AbsVal does not allow in-place computation; give the top its own name")

    def forward(self, bottom, top):
        np.abs(bottom[0].data, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            np.multiply(np.sign(bottom[0].data), top[0].diff, out=bottom[0].diff)


@register_layer("Power")
class PowerLayer(NeuronLayer):
    """y = (shift + scale * x) ^ power."""

    def layer_setup(self, bottom, top):
        p = self.layer_param.power_param
        self.power, self.scale, self.shift = p.power, p.scale, p.shift
        self.diff_scale = self.power * self.scale

    def backward_needs_input(self):
        return not (self.diff_scale == 0 or self.power == 1)

    def forward(self, bottom, top):
        self.save_input(bottom)
        y = top[0].data
        if self.diff_scale == 0:
            # The input does not matter: scale or power is 0.
            t = y.dtype.type
            y[...] = 1 if self.power == 0 else np.power(t(self.shift), t(self.power))
            return
        np.multiply(bottom[0].data, self.scale, out=y)
        if self.shift != 0:
            y += self.shift
        if self.power != 1:
            np.power(y, y.dtype.type(self.power), out=y)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy, dx = top[0].diff, bottom[0].diff
        if self.diff_scale == 0:
            dx[...] = 0
            return
        if self.power == 1:
            np.multiply(dy, self.diff_scale, out=dx)
            return
        # dy/dx = power * scale * (shift + scale * x) ^ (power - 1)
        base = self.input_data(bottom) * dx.dtype.type(self.scale)
        base += self.shift
        np.power(base, base.dtype.type(self.power - 1), out=base)
        base *= self.diff_scale
        np.multiply(dy, base, out=dx)


def _log_base(layer, base):
    """log(base), with Caffe's base = -1 meaning e; refuses bases whose log is unusable."""
    if base == -1:
        return 1.0
    if not base > 0:
        raise layer.error(f"base must be strictly positive (or -1 for e), got {base}")
    value = math.log(base)
    if math.isinf(value) or math.isnan(value):
        raise layer.error(f"log(base) = log({base}) is not finite")
    return value


@register_layer("Exp")
class ExpLayer(NeuronLayer):
    """y = base ^ (shift + scale * x), with base = -1 meaning e."""

    def layer_setup(self, bottom, top):
        p = self.layer_param.exp_param
        log_base = _log_base(self, p.base)
        # base^(shift + scale x) = base^shift * exp(log(base) * scale * x)
        self.inner_scale = log_base * p.scale
        self.outer_scale = 1.0 if p.shift == 0 else math.exp(log_base * p.shift)

    def forward(self, bottom, top):
        y = top[0].data
        np.multiply(bottom[0].data, self.inner_scale, out=y)
        np.exp(y, out=y)
        if self.outer_scale != 1:
            y *= self.outer_scale

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            dx = bottom[0].diff
            # dy/dx = inner_scale * y, so the top suffices even in place.
            np.multiply(top[0].data, top[0].diff, out=dx)
            if self.inner_scale != 1:
                dx *= self.inner_scale


@register_layer("Log")
class LogLayer(NeuronLayer):
    """y = log_base(shift + scale * x), with base = -1 meaning e."""

    def layer_setup(self, bottom, top):
        p = self.layer_param.log_param
        log_base = _log_base(self, p.base)
        if log_base == 0:
            raise self.error(f"base {p.base} has log(base) = 0, so 1/log(base) is infinite")
        self.base_scale = 1.0 / log_base
        self.input_scale, self.input_shift = p.scale, p.shift
        self.backward_num_scale = self.input_scale / log_base

    def backward_needs_input(self):
        return True

    def _shifted(self, x, out):
        np.multiply(x, self.input_scale, out=out)
        if self.input_shift != 0:
            out += self.input_shift
        return out

    def forward(self, bottom, top):
        self.save_input(bottom)
        y = self._shifted(bottom[0].data, top[0].data)
        np.log(y, out=y)
        if self.base_scale != 1:
            y *= self.base_scale

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        # dy/dx = scale / (log(base) * (shift + scale * x))
        denom = self._shifted(self.input_data(bottom), np.empty_like(top[0].diff))
        np.divide(top[0].diff, denom, out=bottom[0].diff)
        if self.backward_num_scale != 1:
            bottom[0].diff[...] *= self.backward_num_scale


@register_layer("BNLL")
class BNLLLayer(NeuronLayer):
    """Binomial normal log likelihood: y = log(1 + exp(x)) (softplus), overflow-safe."""

    # Caffe clamps x at 50 before exp in the gradient (the sigmoid is 1 there anyway).
    THRESHOLD = 50.0

    def backward_needs_input(self):
        return True

    def forward(self, bottom, top):
        self.save_input(bottom)
        x, y = bottom[0].data, top[0].data
        # log(1 + exp(x)) = max(x, 0) + log(1 + exp(-|x|))
        tail = np.abs(x)
        np.negative(tail, out=tail)
        np.exp(tail, out=tail)
        np.log1p(tail, out=tail)
        np.maximum(x, 0, out=y)
        y += tail

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        # dy/dx = sigmoid(x) = e / (e + 1) with e = exp(min(x, 50))
        e = np.minimum(self.input_data(bottom), self.THRESHOLD)
        np.exp(e, out=e)
        np.divide(e, e + 1, out=e)
        np.multiply(top[0].diff, e, out=bottom[0].diff)


@register_layer("Threshold")
class ThresholdLayer(NeuronLayer):
    """y = 1 if x > threshold else 0. Not differentiable: backward is refused."""

    def layer_setup(self, bottom, top):
        self.threshold = self.layer_param.threshold_param.threshold

    def forward(self, bottom, top):
        np.greater(bottom[0].data, self.threshold, out=top[0].data, casting="unsafe")

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            raise NotImplementedError(f"layer {self.name!r} (Threshold) has no backward; "
                                      f"it cannot be trained through")


@register_layer("Dropout")
class DropoutLayer(NeuronLayer):
    """TRAIN: y = x * m / (1 - p), m ~ Bernoulli(1 - p) per element; TEST: y = x."""

    def layer_setup(self, bottom, top):
        self.ratio = self.layer_param.dropout_param.dropout_ratio
        if not 0 <= self.ratio < 1:
            raise self.error(f"dropout_ratio must be in [0, 1), got {self.ratio}")
        self.scale = 1.0 / (1.0 - self.ratio)

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        shape = bottom[0].shape
        if getattr(self, "_mask", None) is None or self._mask.shape != shape:
            self._uniform = np.empty(shape, dtype=np.float32)
            self._mask = np.empty(shape, dtype=bool)

    def forward(self, bottom, top):
        x, y = bottom[0].data, top[0].data
        if self.phase == caffe_pb2.TRAIN:
            # One draw on the calling thread, so the mask is the same for any thread count.
            get_rng().random(dtype=np.float32, out=self._uniform)
            map_flat(self._drop, self._uniform, x, y, self._mask)
        elif y is not x:
            map_flat(np.copyto, y, x)

    def _drop(self, uniform, x, y, mask):
        # Keep an element with probability 1 - ratio.
        np.greater_equal(uniform, self.ratio, out=mask)
        np.multiply(x, mask, out=y)
        y *= self.scale

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy, dx = top[0].diff, bottom[0].diff
        if self.phase == caffe_pb2.TRAIN:
            map_flat(self._drop_grad, dy, self._mask, dx)
        elif dx is not dy:
            map_flat(np.copyto, dx, dy)

    def _drop_grad(self, dy, mask, dx):
        np.multiply(dy, mask, out=dx)
        dx *= self.scale


@register_layer("Clip")
class ClipLayer(NeuronLayer):
    """y = max(min, min(x, max)); the gradient passes where min <= x <= max."""

    def layer_setup(self, bottom, top):
        p = self.layer_param.clip_param
        # Both fields are `required` in caffe.proto, so Caffe's parser rejects a Clip without them.
        if not (self.layer_param.HasField("clip_param") and p.HasField("min") and p.HasField("max")):
            raise self.error("Clip needs clip_param { min: ... max: ... } (both are required)")
        self.min, self.max = p.min, p.max

    def backward_needs_input(self):
        return True

    def forward(self, bottom, top):
        self.save_input(bottom)
        map_flat(self._clip, bottom[0].data, top[0].data)

    def _clip(self, x, y):
        np.minimum(x, self.max, out=y)
        np.maximum(y, self.min, out=y)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            map_flat(self._clip_grad, self.input_data(bottom), top[0].diff, bottom[0].diff)

    def _clip_grad(self, x, dy, dx):
        inside = (x >= self.min) & (x <= self.max)
        np.multiply(dy, inside, out=dx)


@register_layer("Swish")
class SwishLayer(NeuronLayer):
    """y = x * sigmoid(beta * x)."""

    def layer_setup(self, bottom, top):
        self.beta = self.layer_param.swish_param.beta

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        s = getattr(self, "_sigmoid", None)
        if s is None or s.shape != bottom[0].shape or s.dtype != bottom[0].dtype:
            self._sigmoid = np.empty(bottom[0].shape, dtype=bottom[0].dtype)

    def forward(self, bottom, top):
        map_flat(self._swish, bottom[0].data, self._sigmoid, top[0].data,
                 cost=_TRANSCENDENTAL_COST)

    def _swish(self, x, s, y):
        np.multiply(x, 0.5 * self.beta, out=s)
        np.tanh(s, out=s)
        s *= 0.5
        s += 0.5
        np.multiply(x, s, out=y)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            map_flat(self._swish_grad, top[0].data, self._sigmoid, top[0].diff, bottom[0].diff)

    def _swish_grad(self, y, s, dy, dx):
        # dy/dx = beta * y + s * (1 - beta * y), with s = sigmoid(beta x) kept from forward
        by = y * y.dtype.type(self.beta)
        grad = 1 - by
        grad *= s
        grad += by
        np.multiply(dy, grad, out=dx)
