"""Caffe net -> ONNX graph, one converter per layer type, exact to Caffe's semantics.

A converter is `fn(ctx)` (or a layer's own `to_onnx(self, ctx)` method) that adds the
ONNX nodes computing the layer's tops from its bottoms. `ExportContext`, the `ctx`:

    ctx.layer, ctx.param          the Layer object and its LayerParameter
    ctx.input(i)                  ONNX name of bottom i
    ctx.output(i)                 ONNX name top i must be written to
    ctx.bottom_shape(i), ctx.top_shape(i)   static shapes (as minicaffe computed them)
    ctx.weight(i)                 float32 array of the layer's param blob i
    ctx.add_initializer(array, name=None) -> name    a constant tensor
    ctx.const(values, dtype=np.int64) -> name        a small constant (shapes, axes, ...)
    ctx.add_node(op_type, inputs, outputs=None, **attrs) -> list of output names
    ctx.tmp(hint) -> name          a fresh intermediate name
    ctx.constant_tops()           the layer's tops computed now, for shape-only layers
    ctx.opset                      the target opset
    ctx.fail(reason)               raise the one-line error naming this layer

A layer that has no converter is never dropped: export fails naming it.
"""
import numpy as np

from ..proto import caffe_pb2
from ..proto_io import atomic_write
from . import fork_layers  # noqa: F401  (registers the forks' converters)
from .converters import CONVERTERS, converter
from .deps import require
from .errors import OnnxError

__all__ = ["export", "to_model", "ExportContext", "CONVERTERS", "MIN_OPSET", "MAX_OPSET"]

MIN_OPSET = 13
MAX_OPSET = 21

_P = caffe_pb2.PoolingParameter
_LRN = caffe_pb2.LRNParameter
_ELT = caffe_pb2.EltwiseParameter
_RED = caffe_pb2.ReductionParameter

_DATA_TYPES = {"Data", "ImageData", "HDF5Data", "MemoryData", "DummyData", "WindowData"}


class ExportContext:
    """What a converter sees of the graph being built (see the module docstring)."""

    def __init__(self, builder, index):
        self._b = builder
        net = builder.net
        self.layer = net.layers[index]
        self.param = self.layer.layer_param
        self.opset = builder.opset
        self.dynamic_batch = builder.dynamic
        self._inputs = [builder.current[b] for b in net.bottom_ids[index]]
        self._outputs = [builder.new_name(t) for t in net.top_ids[index]]
        self._bottom_shapes = [tuple(b.shape) for b in net._bottom_vecs[index]]
        self._top_shapes = [tuple(t.shape) for t in net._top_vecs[index]]
        self._blobs = (net._bottom_vecs[index], net._top_vecs[index])
        self.num_bottom, self.num_top = len(self._inputs), len(self._outputs)

    def fail(self, reason):
        raise OnnxError(f"layer {self.layer.name!r} ({self.layer.type}): cannot export to ONNX: "
                        f"{reason}")

    def input(self, i=0):
        return self._inputs[i]

    def output(self, i=0):
        return self._outputs[i]

    def bottom_shape(self, i=0):
        return self._bottom_shapes[i]

    def top_shape(self, i=0):
        return self._top_shapes[i]

    def weight(self, i):
        if i >= len(self.layer.blobs):
            self.fail(f"it has no parameter blob {i}")
        return np.asarray(self.layer.blobs[i].data, dtype=np.float32)

    def constant_tops(self):
        """Run the layer on the net's blobs and return copies of its tops, for layers whose
        output depends only on shapes and parameters (SSD's PriorBox)."""
        bottom, top = self._blobs
        self.layer.reshape(bottom, top)
        self.layer.forward(bottom, top)
        return [np.array(t.data, dtype=np.float32) for t in top]

    def tmp(self, hint="t"):
        return self._b.fresh(f"{self.layer.name}/{hint}")

    def add_initializer(self, array, name=None):
        return self._b.initializer(np.asarray(array), name or self.tmp("const"))

    def const(self, values, dtype=np.int64):
        return self.add_initializer(np.asarray(values, dtype=dtype))

    def scalar(self, value):
        return self.add_initializer(np.asarray(value, dtype=np.float32))

    def add_node(self, op_type, inputs, outputs=None, **attrs):
        if outputs is None:
            outputs = [self.tmp(op_type.lower())]
        elif isinstance(outputs, str):
            outputs = [outputs]
        self._b.node(op_type, list(inputs), list(outputs), self.layer.name, attrs)
        return list(outputs)

    # -- helpers shared by the converters ----------------------------------------
    def one(self, op_type, inputs, output=None, **attrs):
        return self.add_node(op_type, inputs, None if output is None else [output], **attrs)[0]

    def reshape(self, x, shape, output=None):
        """Reshape to a static shape; with a dynamic batch, dim 0 is inferred (-1)."""
        shape = list(shape)
        if self.dynamic_batch and shape:
            if -1 in shape[1:]:
                self.fail("a reshape with a dynamic batch needs the other dims known")
            shape[0] = -1
        return self.one("Reshape", [x, self.const(shape)], output)

    def reduce(self, op_type, x, axes, keepdims, output=None):
        # ReduceSum took its axes as an input from opset 13, the others from opset 18.
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.one(op_type, [x, self.const(list(axes))], output, keepdims=int(keepdims))
        return self.one(op_type, [x], output, axes=list(axes), keepdims=int(keepdims))

    def slice(self, x, starts, ends, axes, output=None):
        return self.one("Slice", [x, self.const(starts), self.const(ends), self.const(axes)],
                        output)

    def affine(self, x, a=1.0, b=0.0):
        """a * x + b with the no-op steps left out."""
        if a != 1.0:
            x = self.one("Mul", [x, self.scalar(a)])
        if b != 0.0:
            x = self.one("Add", [x, self.scalar(b)])
        return x

    def identity(self):
        for i in range(self.num_top):
            self.one("Identity", [self.input(i if self.num_bottom == self.num_top else 0)],
                     self.output(i))

    def canonical_axis(self, axis, ndim=None):
        ndim = len(self.bottom_shape(0)) if ndim is None else ndim
        return axis + ndim if axis < 0 else axis


class _Builder:
    def __init__(self, net, opset, dynamic):
        self.onnx = require("onnx")
        self.net, self.opset, self.dynamic = net, opset, dynamic
        self.nodes, self.inits, self.used = [], [], set()
        self.current = {}
        # The last write of each blob carries the blob's own name; earlier (in-place)
        # writes are versioned, so outputs keep Caffe's names.
        self.writes_left = {}
        for tops in net.top_ids:
            for t in tops:
                self.writes_left[t] = self.writes_left.get(t, 0) + 1
        self.versions = {}

    def fresh(self, hint):
        name, k = hint, 1
        while name in self.used:
            name, k = f"{hint}_{k}", k + 1
        self.used.add(name)
        return name

    def new_name(self, blob):
        self.writes_left[blob] -= 1
        if self.writes_left[blob] == 0 and blob not in self.used:
            name = blob
            self.used.add(name)
        else:
            self.versions[blob] = self.versions.get(blob, 0) + 1
            name = self.fresh(f"{blob}#{self.versions[blob]}")
        self.current[blob] = name
        return name

    def initializer(self, array, name):
        name = self.fresh(name) if name in self.used else name
        self.used.add(name)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        self.inits.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def node(self, op_type, inputs, outputs, layer_name, attrs):
        self.nodes.append(self.onnx.helper.make_node(
            op_type, inputs, outputs, name=self.fresh(f"{layer_name}/{op_type}"), **attrs))


def _value_info(onnx, name, shape, dtype, dynamic, axis=0):
    dims = list(shape)
    if dynamic and len(dims) > axis:
        dims[axis] = "N"
        if axis == 1:
            dims[0] = "T"
    return onnx.helper.make_tensor_value_info(name, dtype, dims)


def _batch_axes(net):
    """Blob name -> its batch axis: 1 for the time-major inputs of RNN/LSTM, else 0."""
    axes = {}
    for layer, bottoms, tops in zip(net.layers, net.bottom_ids, net.top_ids):
        if layer.type in ("RNN", "LSTM"):
            for b in bottoms[:2]:
                axes[b] = 1
            axes[tops[0]] = 1
    return axes


def to_model(net, opset=17, batch=None, extra_outputs=()):
    """The onnx.ModelProto for `net` (a minicaffe Net at TEST phase).

    batch: None keeps the net's batch size, an int sets it (the net is reshaped),
    "dynamic" gives the inputs a symbolic batch dimension N. extra_outputs: names of
    intermediate blobs to expose as graph outputs too (after the net's outputs).
    """
    onnx = require("onnx")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OnnxError(f"opset {opset} is not supported: use {MIN_OPSET} to {MAX_OPSET}")
    dynamic = batch == "dynamic"
    if isinstance(batch, int) and not isinstance(batch, bool):
        if batch < 1:
            raise OnnxError(f"--batch must be a positive number or 'dynamic', got {batch}")
        axes = _batch_axes(net)
        for name in net.inputs:
            blob = net.blobs[name]
            shape = list(blob.shape)
            if shape:
                shape[axes.get(name, 0)] = batch
            blob.reshape(tuple(shape))
        net.reshape()
    elif batch is not None and not dynamic:
        raise OnnxError(f"--batch must be a positive number or 'dynamic', got {batch!r}")
    b = _Builder(net, opset, dynamic)
    batch_axis = _batch_axes(net)
    graph_inputs = []
    for i, layer in enumerate(net.layers):
        ctx = ExportContext(b, i)
        if layer.type == "Input":
            for t, name in enumerate(net.top_ids[i]):
                # The graph input carries the blob's name; an in-place layer's writes get versions.
                b.current[name] = name
                b.used.add(name)
                graph_inputs.append(_value_info(onnx, name, ctx.top_shape(t),
                                                onnx.TensorProto.FLOAT, dynamic,
                                                batch_axis.get(name, 0)))
            continue
        own = getattr(layer, "to_onnx", None)
        impl = getattr(layer, "impl", None)
        if own is None and impl is not None:
            own = getattr(impl, "to_onnx", None)
        if own is not None:
            own(ctx)
        elif layer.type in CONVERTERS:
            CONVERTERS[layer.type](ctx)
        elif layer.type == "Python" or impl is not None:
            cls = type(impl).__name__ if impl is not None else "?"
            ctx.fail(f"its class {cls} has no to_onnx(self, ctx) method (see "
                     f"minicaffe.onnx.exporter for the ctx helper API)")
        elif layer.type in _DATA_TYPES:
            ctx.fail("a data layer reads its own input; export a deploy net whose inputs are "
                     "Input layers")
        elif layer.is_loss or layer.type == "Accuracy":
            ctx.fail("loss and accuracy layers are training/scoring only; export a deploy net")
        else:
            ctx.fail("no ONNX converter for this layer type")
    outputs = []
    for name in list(net.outputs) + [n for n in extra_outputs if n not in net.outputs]:
        if name not in b.current:
            raise OnnxError(f"extra output {name!r} is not a blob the exported graph computes")
        blob = net.blobs[name]
        outputs.append(_value_info(onnx, b.current[name], blob.shape, onnx.TensorProto.FLOAT,
                                   dynamic, batch_axis.get(name, 0)))
    graph = onnx.helper.make_graph(b.nodes, net.name or "net", graph_inputs, outputs,
                                   initializer=b.inits)
    model = onnx.helper.make_model(graph, producer_name="minicaffe",
                                   opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 8 if opset <= 18 else 9)
    return model


def export(net, path, opset=17, batch=None, extra_outputs=()):
    """Write `net` as an ONNX model to `path` (checked by onnx.checker); return the model."""
    onnx = require("onnx")
    model = to_model(net, opset=opset, batch=batch, extra_outputs=extra_outputs)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise OnnxError(f"the exported model fails onnx.checker: {str(exc).splitlines()[0]}")
    atomic_write(path, model.SerializeToString())   # never half a model at `path`
    return model


# ---------------------------------------------------------------------------------------------
# Vision layers

def _conv_geometry(ctx):
    layer = ctx.layer
    if getattr(layer, "channel_axis", 1) != 1:
        ctx.fail("only channel axis 1 (convolution_param.axis) is expressible")
    return dict(kernel_shape=[int(k) for k in layer.kernel],
                strides=[int(s) for s in layer.stride],
                pads=[int(p) for p in layer.pad] * 2,
                dilations=[int(d) for d in layer.dilation],
                group=int(layer.group))


@converter("Convolution", "Deconvolution")
def _conv(ctx):
    attrs = _conv_geometry(ctx)
    inputs = [ctx.input(), ctx.add_initializer(ctx.weight(0))]
    if ctx.layer.bias_term:
        inputs.append(ctx.add_initializer(ctx.weight(1).reshape(-1)))
    op = "ConvTranspose" if ctx.layer.type == "Deconvolution" else "Conv"
    ctx.one(op, inputs, ctx.output(), **attrs)


@converter("Pooling")
def _pooling(ctx):
    layer = ctx.layer
    x, shape = ctx.input(), ctx.bottom_shape()
    if len(shape) != 4:
        ctx.fail(f"Pooling needs a 4-D bottom, got {shape}")
    if layer.pool == _P.STOCHASTIC:
        ctx.fail("STOCHASTIC pooling has no ONNX equivalent")
    if layer.global_pooling:
        ctx.one("GlobalMaxPool" if layer.pool == _P.MAX else "GlobalAveragePool", [x], ctx.output())
        return
    (H, W), (oh, ow) = shape[2:], ctx.top_shape()[2:]
    k, s, p = (layer.kernel_h, layer.kernel_w), (layer.stride_h, layer.stride_w), \
        (layer.pad_h, layer.pad_w)
    size = (H, W)
    if layer.pool == _P.AVE:
        # Caffe counts the zero padding in the divisor but not the part of a ceil-rounded
        # window beyond it: pad explicitly (counted), let the pool pad the rest (not counted).
        if any(p):
            x = ctx.one("Pad", [x, ctx.const([0, 0, p[0], p[1], 0, 0, p[0], p[1]])])
            size = (H + 2 * p[0], W + 2 * p[1])
        begin = [0, 0]
    else:
        begin = list(p)
    end = [max(0, (o - 1) * st + kk - n - b0) for o, st, kk, n, b0 in zip((oh, ow), s, k, size, begin)]
    got = [(n + b0 + e - kk) // st + 1 for n, b0, e, kk, st in zip(size, begin, end, k, s)]
    attrs = dict(kernel_shape=list(k), strides=list(s), pads=begin + end)
    if layer.pool == _P.AVE:
        attrs["count_include_pad"] = 0
    out = ctx.output() if got == [oh, ow] else None
    y = ctx.one("MaxPool" if layer.pool == _P.MAX else "AveragePool", [x], out, **attrs)
    if out is None:   # Caffe drops a last window that would start in the padding
        ctx.slice(y, [0, 0], [oh, ow], [2, 3], ctx.output())


@converter("InnerProduct")
def _inner_product(ctx):
    p = ctx.param.inner_product_param
    axis = ctx.canonical_axis(p.axis)
    shape = ctx.bottom_shape()
    x = ctx.input()
    if len(shape) != 2 or axis != 1:
        x = ctx.one("Flatten", [x], axis=axis)
    inputs = [x, ctx.add_initializer(ctx.weight(0))]
    if p.bias_term:
        inputs.append(ctx.add_initializer(ctx.weight(1).reshape(-1)))
    top = ctx.top_shape()
    direct = len(top) == 2 and (axis == 1 or shape[0] == 1 and axis == 0)
    y = ctx.one("Gemm", inputs, ctx.output() if direct and axis == 1 else None,
                transB=0 if p.transpose else 1)
    if not (direct and axis == 1):
        if ctx.dynamic_batch and axis == 0:
            ctx.fail("InnerProduct over axis 0 mixes the batch in: export with a fixed --batch")
        ctx.reshape(y, top, ctx.output())


# ---------------------------------------------------------------------------------------------
# Neuron layers

@converter("ReLU")
def _relu(ctx):
    slope = ctx.param.relu_param.negative_slope
    if slope:
        ctx.one("LeakyRelu", [ctx.input()], ctx.output(), alpha=float(slope))
    else:
        ctx.one("Relu", [ctx.input()], ctx.output())


def _simple(op_type):
    def fn(ctx):
        ctx.one(op_type, [ctx.input()], ctx.output())
    return fn


for _t, _op in [("Sigmoid", "Sigmoid"), ("TanH", "Tanh"), ("AbsVal", "Abs"), ("BNLL", "Softplus")]:
    CONVERTERS[_t] = _simple(_op)


@converter("Dropout", "Split")
def _identity(ctx):
    ctx.identity()


@converter("Silence")
def _silence(ctx):
    pass  # consumes its bottoms, computes nothing


@converter("ELU")
def _elu(ctx):
    ctx.one("Elu", [ctx.input()], ctx.output(), alpha=float(ctx.param.elu_param.alpha))


@converter("Power")
def _power(ctx):
    p = ctx.param.power_param
    x = ctx.affine(ctx.input(), p.scale, p.shift)
    if p.power == 1.0:
        ctx.one("Identity", [x], ctx.output())
    else:
        ctx.one("Pow", [x, ctx.scalar(p.power)], ctx.output())


@converter("Exp")
def _exp(ctx):
    p = ctx.param.exp_param
    log_base = 1.0 if p.base == -1 else float(np.log(p.base))
    ctx.one("Exp", [ctx.affine(ctx.input(), log_base * p.scale, log_base * p.shift)], ctx.output())


@converter("Log")
def _log(ctx):
    p = ctx.param.log_param
    y = ctx.one("Log", [ctx.affine(ctx.input(), p.scale, p.shift)])
    if p.base == -1:
        ctx.one("Identity", [y], ctx.output())
    else:
        ctx.one("Mul", [y, ctx.scalar(1.0 / np.log(p.base))], ctx.output())


@converter("Threshold")
def _threshold(ctx):
    y = ctx.one("Greater", [ctx.input(), ctx.scalar(ctx.param.threshold_param.threshold)])
    ctx.one("Cast", [y], ctx.output(), to=1)


@converter("PReLU")
def _prelu(ctx):
    ndim = len(ctx.bottom_shape())
    slope = ctx.weight(0).reshape(-1)
    if not ctx.param.prelu_param.channel_shared:
        slope = slope.reshape((-1,) + (1,) * max(ndim - 2, 0))
    ctx.one("PRelu", [ctx.input(), ctx.add_initializer(slope)], ctx.output())


@converter("Clip")
def _clip(ctx):
    p = ctx.param.clip_param
    ctx.one("Clip", [ctx.input(), ctx.scalar(p.min), ctx.scalar(p.max)], ctx.output())


@converter("Swish")
def _swish(ctx):
    beta = ctx.param.swish_param.beta
    s = ctx.one("Sigmoid", [ctx.affine(ctx.input(), beta)])
    ctx.one("Mul", [ctx.input(), s], ctx.output())


# ---------------------------------------------------------------------------------------------
# Normalization

def _broadcast(ctx, array, axis, ndim):
    """`array` (shape = bottom dims axis..) shaped to broadcast against an ndim tensor."""
    return array.reshape(array.shape + (1,) * (ndim - axis - array.ndim))


@converter("BatchNorm")
def _batch_norm(ctx):
    layer = ctx.layer
    if not layer.use_global_stats:
        ctx.fail("only use_global_stats (TEST) batch normalization is expressible; it uses the "
                 "batch's own statistics")
    mean, var, factor = ctx.weight(0), ctx.weight(1), float(ctx.weight(2).reshape(-1)[0])
    factor = 0.0 if factor == 0 else 1.0 / factor
    c = ctx.bottom_shape()[1]
    ctx.one("BatchNormalization",
            [ctx.input(), ctx.add_initializer(np.ones(c, np.float32)),
             ctx.add_initializer(np.zeros(c, np.float32)),
             ctx.add_initializer((mean * factor).astype(np.float32)),
             ctx.add_initializer((var * factor).astype(np.float32))],
            ctx.output(), epsilon=float(layer.eps))


def _affine_operand(ctx, p_axis, num_axes, blob_index):
    ndim = len(ctx.bottom_shape())
    axis = ctx.canonical_axis(p_axis)
    if ctx.num_bottom > 1:
        shape = ctx.bottom_shape(1)
        full = tuple(shape) + (1,) * (ndim - axis - len(shape))
        return ctx.reshape(ctx.input(1), full) if full != tuple(shape) else ctx.input(1), \
            blob_index
    w = ctx.weight(blob_index)
    n = w.ndim if num_axes == -1 else num_axes
    w = w.reshape(ctx.bottom_shape()[axis:axis + n])
    return ctx.add_initializer(_broadcast(ctx, w, axis, ndim)), blob_index + 1


@converter("Scale")
def _scale(ctx):
    p = ctx.param.scale_param
    if ctx.num_bottom > 1 and ctx.dynamic_batch and ctx.canonical_axis(p.axis) == 0:
        ctx.fail("a scale blob over the batch axis needs a fixed --batch")
    s, nxt = _affine_operand(ctx, p.axis, p.num_axes, 0)
    if p.bias_term:
        y = ctx.one("Mul", [ctx.input(), s])
        ndim, axis = len(ctx.bottom_shape()), ctx.canonical_axis(p.axis)
        bias = ctx.weight(ctx.layer.bias_index)
        n = ctx.bottom_shape(1) if ctx.num_bottom > 1 else None
        dims = ctx.bottom_shape()[axis:axis + (len(n) if n else (bias.ndim if p.num_axes == -1
                                                                   else p.num_axes))]
        bias = _broadcast(ctx, bias.reshape(dims), axis, ndim)
        ctx.one("Add", [y, ctx.add_initializer(bias)], ctx.output())
    else:
        ctx.one("Mul", [ctx.input(), s], ctx.output())


@converter("Bias")
def _bias(ctx):
    p = ctx.param.bias_param
    b, _ = _affine_operand(ctx, p.axis, p.num_axes, 0)
    ctx.one("Add", [ctx.input(), b], ctx.output())


@converter("LRN")
def _lrn(ctx):
    p = ctx.param.lrn_param
    if p.norm_region == _LRN.ACROSS_CHANNELS:
        ctx.one("LRN", [ctx.input()], ctx.output(), size=int(p.local_size), alpha=float(p.alpha),
                beta=float(p.beta), bias=float(p.k))
        return
    # WITHIN_CHANNEL: x * (1 + alpha * mean of x^2 over the size x size window)^-beta, the
    # window zero padded by (size-1)/2 and always divided by size^2, as Caffe's pooling does.
    n, pad = int(p.local_size), (int(p.local_size) - 1) // 2
    x = ctx.input()
    sq = ctx.one("Mul", [x, x])
    avg = ctx.one("AveragePool", [sq], kernel_shape=[n, n], strides=[1, 1], pads=[pad] * 4,
                  count_include_pad=1)
    scale = ctx.one("Pow", [ctx.affine(avg, p.alpha, 1.0), ctx.scalar(-p.beta)])
    ctx.one("Mul", [x, scale], ctx.output())


@converter("MVN")
def _mvn(ctx):
    p = ctx.param.mvn_param
    ndim = len(ctx.bottom_shape())
    axes = list(range(1 if p.across_channels else 2, ndim))
    x = ctx.input()
    mean = ctx.reduce("ReduceMean", x, axes, True)
    centered = ctx.one("Sub", [x, mean], None if p.normalize_variance else ctx.output())
    if p.normalize_variance:
        var = ctx.reduce("ReduceMean", ctx.one("Mul", [centered, centered]), axes, True)
        std = ctx.one("Add", [ctx.one("Sqrt", [var]), ctx.scalar(p.eps)])
        ctx.one("Div", [centered, std], ctx.output())


@converter("Softmax")
def _softmax(ctx):
    axis = ctx.canonical_axis(ctx.param.softmax_param.axis)
    ctx.one("Softmax", [ctx.input()], ctx.output(), axis=axis)


# ---------------------------------------------------------------------------------------------
# Shape layers

@converter("Concat")
def _concat(ctx):
    p = ctx.param.concat_param
    axis = p.concat_dim if p.HasField("concat_dim") else p.axis
    ctx.one("Concat", [ctx.input(i) for i in range(ctx.num_bottom)], ctx.output(),
            axis=ctx.canonical_axis(axis))


@converter("Slice")
def _slice(ctx):
    layer = ctx.layer
    for i, (start, stop) in enumerate(zip(layer.bounds, layer.bounds[1:])):
        ctx.slice(ctx.input(), [start], [stop], [layer.axis], ctx.output(i))


@converter("Flatten", "Reshape")
def _reshape(ctx):
    ctx.reshape(ctx.input(), ctx.top_shape(), ctx.output())


@converter("Crop")
def _crop(ctx):
    index = ctx.layer.index
    axes = [i for i, s in enumerate(index) if s != slice(0, ctx.bottom_shape()[i])]
    if not axes:
        ctx.one("Identity", [ctx.input()], ctx.output())
        return
    if ctx.dynamic_batch and 0 in axes:
        ctx.fail("a crop of the batch axis needs a fixed --batch")
    ctx.slice(ctx.input(), [index[a].start for a in axes], [index[a].stop for a in axes], axes,
              ctx.output())


@converter("Tile")
def _tile(ctx):
    p = ctx.param.tile_param
    ndim = len(ctx.bottom_shape())
    repeats = [1] * ndim
    repeats[ctx.canonical_axis(p.axis)] = p.tiles
    ctx.one("Tile", [ctx.input(), ctx.const(repeats)], ctx.output())


@converter("Eltwise")
def _eltwise(ctx):
    layer = ctx.layer
    xs = [ctx.input(i) for i in range(ctx.num_bottom)]
    if layer.op == _ELT.PROD:
        op = "Mul"
    elif layer.op == _ELT.MAX:
        op = "Max"
    else:
        op = "Sum"
        coeffs = [1.0 if c is None else float(c) for c in layer.coeffs]
        xs = [ctx.affine(x, c) for x, c in zip(xs, coeffs)]
    if len(xs) == 1:
        ctx.one("Identity", xs, ctx.output())
    elif op in ("Sum", "Max"):
        ctx.one(op, xs, ctx.output())
    else:
        y = xs[0]
        for i, x in enumerate(xs[1:]):
            y = ctx.one("Mul", [y, x], ctx.output() if i == len(xs) - 2 else None)


@converter("Reduction")
def _reduction(ctx):
    p = ctx.param.reduction_param
    ndim = len(ctx.bottom_shape())
    axis = ctx.canonical_axis(p.axis)
    if axis == 0 and ctx.dynamic_batch:
        ctx.fail("a reduction over all axes mixes the batch in: export with a fixed --batch")
    op = {_RED.SUM: "ReduceSum", _RED.ASUM: "ReduceL1", _RED.SUMSQ: "ReduceSumSquare",
          _RED.MEAN: "ReduceMean"}[p.operation]
    axes = list(range(axis, ndim))
    if not axes:
        y = ctx.input()
        if p.operation == _RED.ASUM:
            y = ctx.one("Abs", [y])
        elif p.operation == _RED.SUMSQ:
            y = ctx.one("Mul", [y, y])
    else:
        y = ctx.reduce(op, ctx.input(), axes, False)
    ctx.one("Mul", [y, ctx.scalar(p.coeff)], ctx.output())


@converter("ArgMax")
def _argmax(ctx):
    layer = ctx.layer
    shape = ctx.bottom_shape()
    k = int(layer.top_k)
    x, axis = ctx.input(), layer.axis
    if axis is None:   # per sample over the flattened rest: top (N, 1 or 2, top_k)
        x = ctx.reshape(x, [shape[0], int(np.prod(shape[1:]))])
        axis = 1
    values, indices = ctx.add_node("TopK", [x, ctx.const([k])], [ctx.tmp("values"),
                                                                   ctx.tmp("indices")],
                                   axis=int(axis), largest=1, sorted=1)
    if layer.axis is not None:
        src = values if layer.out_max_val else indices
        if layer.out_max_val:
            ctx.one("Identity", [src], ctx.output())
        else:
            ctx.one("Cast", [src], ctx.output(), to=1)
        return
    index = ctx.one("Cast", [indices], to=1)
    if layer.out_max_val:
        both = ctx.one("Concat", [ctx.reshape(index, [shape[0], 1, k]),
                                  ctx.reshape(values, [shape[0], 1, k])], axis=1)
        ctx.one("Identity", [both], ctx.output())
    else:
        ctx.reshape(index, ctx.top_shape(), ctx.output())


@converter("Embed")
def _embed(ctx):
    layer = ctx.layer
    idx = ctx.one("Cast", [ctx.input()], to=7)
    y = ctx.one("Gather", [ctx.add_initializer(ctx.weight(0)), idx], None if layer.bias_term
                else ctx.output(), axis=0)
    if layer.bias_term:
        ctx.one("Add", [y, ctx.add_initializer(ctx.weight(1).reshape(-1))], ctx.output())


# ---------------------------------------------------------------------------------------------
# Recurrent layers: an ONNX Scan over time, one step per timestep, with Caffe's cont_t applied
# to the carried state exactly as Caffe does (so sequence restarts anywhere in the batch are
# kept; ONNX's own RNN/LSTM ops cannot reset mid-sequence). Without expose_hidden the model
# starts from zero state on every run (minicaffe carries state between forward calls).

def _recurrent(ctx, lstm):
    onnx = require("onnx")
    helper, layer = onnx.helper, ctx.layer
    D = int(layer.num_output)
    x, cont = ctx.input(0), ctx.input(1)
    x3 = ctx.one("Reshape", [x, ctx.const([0, 0, -1])])
    w_in = ctx.add_initializer(layer.param(layer.input_weight).data.T.astype(np.float32))
    b_in = ctx.add_initializer(layer.param(layer.input_bias).data.astype(np.float32))
    pre = ctx.one("Add", [ctx.one("MatMul", [x3, w_in]), b_in])
    if layer.static_input:
        xs = ctx.one("Flatten", [ctx.input(2)], axis=1)
        w_s = ctx.add_initializer(layer.param(layer.static_weight).data.T.astype(np.float32))
        pre = ctx.one("Add", [pre, ctx.one("MatMul", [xs, w_s])])
    n_states = len(layer.state_names)
    if layer.expose_hidden:
        first = 2 + int(layer.static_input)
        init = [ctx.one("Squeeze", [ctx.input(first + k), ctx.const([0])]) for k in range(n_states)]
    else:
        n = ctx.slice(ctx.one("Shape", [cont]), [1], [2], [0])
        shape = ctx.one("Concat", [n, ctx.const([D])], axis=0)
        zero = helper.make_tensor("zero", onnx.TensorProto.FLOAT, [1], [0.0])
        init = [ctx.one("ConstantOfShape", [shape], value=zero) for _ in range(n_states)]
    w_h = ctx.add_initializer(layer.param("W_hc" if lstm else "W_hh").data.T.astype(np.float32))
    axis1 = ctx.const([1])

    nodes = []
    name = ctx.tmp("step")

    def node(op, inputs, out, **attrs):
        nodes.append(helper.make_node(op, inputs, [out], name=f"{name}/{out}", **attrs))
        return out

    s = name + "/"
    node("Unsqueeze", [s + "cont", axis1], s + "cu")
    node("Mul", [s + "h_prev", s + "cu"], s + "hc")
    node("Add", [s + "pre", node("MatMul", [s + "hc", w_h], s + "rec")], s + "g")
    body_in = [s + "h_prev"] + ([s + "c_prev"] if lstm else []) + [s + "pre", s + "cont"]
    if lstm:
        part = []
        for k, act in enumerate(["Sigmoid", "Sigmoid", "Sigmoid", "Tanh"]):
            sl = node("Slice", [s + "g", ctx.const([k * D]), ctx.const([(k + 1) * D]), axis1],
                      s + f"gate{k}")
            part.append(node(act, [sl], s + f"act{k}"))
        i, f, o, g = part
        f = node("Mul", [f, s + "cu"], s + "f_cont")
        c = node("Add", [node("Mul", [f, s + "c_prev"], s + "fc"),
                         node("Mul", [i, g], s + "ig")], s + "c")
        h = node("Mul", [o, node("Tanh", [c], s + "tanh_c")], s + "h")
        body_out = [h, c, node("Identity", [h], s + "h_t")]
    else:
        h = node("Tanh", [s + "g"], s + "h")
        body_out = [h, node("Identity", [h], s + "h_t")]
    f32 = onnx.TensorProto.FLOAT
    body = helper.make_graph(nodes, name, [helper.make_tensor_value_info(v, f32, None)
                                           for v in body_in],
                             [helper.make_tensor_value_info(v, f32, None) for v in body_out])
    finals = [ctx.tmp(f"final_{st}") for st in layer.state_names]
    seq = ctx.output(0) if lstm else ctx.tmp("h_seq")
    ctx.add_node("Scan", init + [pre, cont], finals + [seq], body=body, num_scan_inputs=2)
    if not lstm:
        w_o = ctx.add_initializer(layer.param("W_ho").data.T.astype(np.float32))
        b_o = ctx.add_initializer(layer.param("b_o").data.astype(np.float32))
        ctx.one("Tanh", [ctx.one("Add", [ctx.one("MatMul", [seq, w_o]), b_o])], ctx.output(0))
    if layer.expose_hidden:
        for k, fin in enumerate(finals):
            ctx.one("Unsqueeze", [fin, ctx.const([0])], ctx.output(1 + k))


@converter("LSTM")
def _lstm(ctx):
    _recurrent(ctx, True)


@converter("RNN")
def _rnn(ctx):
    _recurrent(ctx, False)

