"""ONNX model -> Caffe prototxt + caffemodel, for the common ops (see IMPORTERS).

Each ONNX node becomes one or a few Caffe layers; ONNX tensor names become blob names.
Ops outside IMPORTERS, or attributes Caffe cannot express (asymmetric pads, auto_pad,
AveragePool excluding the padding, non-integer or non-nearest Resize, ...), fail in one
line naming the node.
"""
import numpy as np

from ..blob import Blob
from ..proto import caffe_pb2
from ..proto_io import atomic_write
from .deps import require
from .errors import OnnxError

__all__ = ["import_model", "to_net_param", "IMPORTERS"]

IMPORTERS = {}


def importer(*ops):
    def deco(fn):
        for op in ops:
            IMPORTERS[op] = fn
        return fn
    return deco


class _Node:
    """One ONNX node as the importers see it."""

    def __init__(self, g, node):
        self.g, self.node = g, node
        self.op = node.op_type
        self.name = node.name or f"{node.op_type}_{g.count}"
        onnx = g.onnx
        self.attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        self.inputs = list(node.input)
        self.outputs = list(node.output)

    def fail(self, reason):
        raise OnnxError(f"node {self.name!r} ({self.op}): cannot import to Caffe: {reason}")

    def attr(self, name, default=None):
        value = self.attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    def const(self, i, required=True):
        """Input i as a numpy array if it is an initializer or Constant, else None (or fail)."""
        if i >= len(self.inputs) or not self.inputs[i]:
            return None
        value = self.g.consts.get(self.inputs[i])
        if value is None and required:
            self.fail(f"input {i} ({self.inputs[i]!r}) must be a constant")
        return value

    def shape(self, i=0):
        shape = self.g.shapes.get(self.inputs[i])
        if shape is None:
            self.fail(f"the shape of {self.inputs[i]!r} is unknown")
        return shape

    def out_shape(self, i=0):
        shape = self.g.shapes.get(self.outputs[i])
        if shape is None:
            self.fail(f"the shape of {self.outputs[i]!r} is unknown")
        return shape

    def layer(self, type_, bottoms=None, tops=None, name=None, blobs=()):
        layer = self.g.net.layer.add(name=name or self.name, type=type_)
        layer.bottom.extend(self.inputs[:1] if bottoms is None else bottoms)
        layer.top.extend(self.outputs[:1] if tops is None else tops)
        for array in blobs:
            blob = Blob(np.shape(array))
            blob.data[...] = array
            layer.blobs.add().CopyFrom(blob.to_proto())
        return layer


class _Graph:
    def __init__(self, model):
        self.onnx = onnx = require("onnx")
        try:
            model = onnx.shape_inference.infer_shapes(model)
        except Exception as exc:   # onnx raises its own exception types
            raise OnnxError(f"onnx shape inference failed: {str(exc).splitlines()[0]}") from None
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        graph = model.graph
        self.consts = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
        self.shapes = {}
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else 1
                                        for d in t.shape.dim]
        for name, value in self.consts.items():
            self.shapes[name] = list(value.shape)
        self.net = caffe_pb2.NetParameter(name=graph.name or "imported")
        self.count = 0
        self.pads = {}   # Pad outputs awaiting the pooling that takes them in: name -> (x, pads)
        for vi in graph.input:
            if vi.name in self.consts:
                continue
            layer = self.net.layer.add(name=vi.name, type="Input")
            layer.top.append(vi.name)
            layer.input_param.shape.add().dim.extend(self.shapes.get(vi.name, []))
        for node in graph.node:
            self.count += 1
            n = _Node(self, node)
            if n.op == "Constant":
                value = n.attrs.get("value")
                if value is None:
                    n.fail("only tensor-valued Constant nodes are supported")
                self.consts[n.outputs[0]] = onnx.numpy_helper.to_array(value)
                continue
            padded = [i for i in n.inputs if i in self.pads]
            if padded and n.op not in ("AveragePool", "MaxPool"):
                n.fail(f"its input {padded[0]!r} comes from a Pad; Caffe pads only inside "
                       f"convolution and pooling, so Pad is supported only before a pooling")
            fn = IMPORTERS.get(n.op)
            if fn is None:
                n.fail("this op is not supported (supported: " + ", ".join(sorted(IMPORTERS)) + ")")
            fn(n)


def to_net_param(model):
    """A NetParameter (layers with their weight blobs) for an onnx.ModelProto."""
    return _Graph(model).net


def import_model(onnx_path, prototxt_path, caffemodel_path):
    """Convert the ONNX model file to a Caffe prototxt and caffemodel; return the NetParameter."""
    import os
    onnx = require("onnx")
    from google.protobuf import text_format
    try:
        model = onnx.load(os.fspath(onnx_path))
    except Exception as exc:
        raise OnnxError(f"{os.fspath(onnx_path)}: cannot read the ONNX model: "
                        f"{str(exc).splitlines()[0]}") from None
    try:
        net = to_net_param(model)
    except OnnxError as exc:
        raise OnnxError(f"{os.fspath(onnx_path)}: {exc}") from None
    definition = caffe_pb2.NetParameter()
    definition.CopyFrom(net)
    for layer in definition.layer:
        del layer.blobs[:]
    atomic_write(caffemodel_path, net.SerializeToString())
    atomic_write(prototxt_path, text_format.MessageToString(definition).encode())
    return net


# ---------------------------------------------------------------------------------------------

def _symmetric_pads(n, pads, ndim):
    pads = list(pads or [0] * (2 * ndim))
    if pads[:ndim] != pads[ndim:]:
        n.fail(f"asymmetric pads {pads} (Caffe pads both sides equally)")
    return pads[:ndim]


def _no_auto_pad(n):
    if n.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        n.fail(f"auto_pad {n.attr('auto_pad')} is not supported; export with explicit pads")


@importer("Conv", "ConvTranspose")
def _conv(n):
    _no_auto_pad(n)
    w = n.const(1)
    b = n.const(2, required=False)
    k = list(w.shape[2:])
    nd = len(k)
    group = int(n.attr("group", 1))
    if n.op == "ConvTranspose":
        if any(n.attr("output_padding", [0] * nd)) or n.attr("output_shape"):
            n.fail("output_padding/output_shape are not expressible in Caffe's Deconvolution")
        num_output = w.shape[1] * group
    else:
        num_output = w.shape[0]
    layer = n.layer("Convolution" if n.op == "Conv" else "Deconvolution",
                    blobs=[w] + ([b] if b is not None else []))
    p = layer.convolution_param
    p.num_output = int(num_output)
    p.kernel_size.extend(int(x) for x in k)
    p.stride.extend(int(x) for x in n.attr("strides", [1] * nd))
    p.pad.extend(int(x) for x in _symmetric_pads(n, n.attr("pads"), nd))
    p.dilation.extend(int(x) for x in n.attr("dilations", [1] * nd))
    p.group = group
    p.bias_term = b is not None


@importer("Gemm")
def _gemm(n):
    if n.attr("transA", 0):
        n.fail("transA is not supported")
    w = n.const(1).astype(np.float32) * np.float32(n.attr("alpha", 1.0))
    if not n.attr("transB", 0):
        w = w.T
    c = n.const(2, required=False)
    blobs = [np.ascontiguousarray(w)]
    if c is not None:
        c = np.broadcast_to(np.asarray(c, np.float32).reshape(-1) if c.size == 1 else
                            c.reshape(-1), (w.shape[0],)) * np.float32(n.attr("beta", 1.0))
        blobs.append(c)
    layer = n.layer("InnerProduct", blobs=blobs)
    layer.inner_product_param.num_output = w.shape[0]
    layer.inner_product_param.bias_term = c is not None


@importer("MatMul")
def _matmul(n):
    w = n.const(1)
    if w.ndim != 2:
        n.fail("only a 2-D constant right operand is supported")
    layer = n.layer("InnerProduct", blobs=[w])
    p = layer.inner_product_param
    p.num_output, p.bias_term, p.transpose = w.shape[1], False, True
    p.axis = len(n.shape(0)) - 1


@importer("Relu", "LeakyRelu")
def _relu(n):
    layer = n.layer("ReLU")
    if n.op == "LeakyRelu":
        layer.relu_param.negative_slope = n.attr("alpha", 0.01)


@importer("Sigmoid", "Tanh")
def _neuron(n):
    n.layer({"Sigmoid": "Sigmoid", "Tanh": "TanH"}[n.op])


@importer("MaxPool", "AveragePool")
def _pool(n):
    _no_auto_pad(n)
    k = list(n.attr("kernel_shape"))
    if len(k) != 2:
        n.fail("only 2-D pooling is supported")
    if any(d != 1 for d in n.attr("dilations", [1, 1])):
        n.fail("dilated pooling is not expressible")
    pads = list(n.attr("pads") or [0] * 4)
    begin, end = pads[:2], pads[2:]
    explicit = n.g.pads.get(n.inputs[0])
    if explicit is not None:
        # Pad then pool (minicaffe's own export of Caffe's padded pooling): the explicit
        # zeros count in an average, the pool's own end padding does not, as in Caffe.
        n.inputs[0], p_explicit = explicit
        if any(begin) or (n.op == "AveragePool" and end and any(end) and
                          n.attr("count_include_pad", 0)):
            n.fail("a Pad followed by a pooling that pads its start is not expressible")
        begin = list(p_explicit)
        pads = begin + [b + e for b, e in zip(begin, end)]
        end = pads[2:]
    elif n.op == "AveragePool":
        begin = _symmetric_pads(n, pads, 2)
        if any(begin) and not n.attr("count_include_pad", 0):
            n.fail("averaging that excludes the padding (count_include_pad=0) is not Caffe's "
                   "(Caffe counts the padding)")
    elif any(e < b for b, e in zip(begin, end)):
        n.fail(f"pads {pads} end below their beginning; Caffe pads both sides equally")
    s = list(n.attr("strides", [1, 1]))
    layer = n.layer("Pooling")
    p = layer.pooling_param
    p.pool = p.MAX if n.op == "MaxPool" else p.AVE
    p.kernel_h, p.kernel_w = k
    p.stride_h, p.stride_w = s
    p.pad_h, p.pad_w = begin
    from ..layers.pooling import pooled_size
    want = list(n.out_shape()[2:])
    sizes = {mode: [pooled_size(h, kk, pd, ss, mode) for h, kk, pd, ss in
                    zip(n.shape()[2:], k, begin, s)] for mode in (True, False)}
    # A max pool's extra end padding only adds windows, so Caffe's ceil rounding can stand in
    # for it; an average's divisor would differ where a window runs past the padded edge.
    if (n.op == "MaxPool" or explicit is not None) and sizes[True] == want or \
            sizes[True] == sizes[False] == want:
        return
    if sizes[False] == want and pads[:2] == pads[2:]:
        p.round_mode = p.FLOOR
        return
    n.fail(f"Caffe's pooling gives {sizes[True]} (ceil) or {sizes[False]} (floor), the ONNX "
           f"model {want}")


@importer("Pad")
def _pad(n):
    pads = n.const(1, required=False)
    pads = list(n.attr("pads", [])) if pads is None else [int(x) for x in pads]
    value = n.const(2, required=False)
    mode = n.attr("mode", "constant")
    nd = len(pads) // 2
    if (mode != "constant" or (value is not None and float(value) != 0.0) or nd != 4
            or any(pads[:2]) or any(pads[nd:nd + 2]) or pads[2:4] != pads[nd + 2:]):
        n.fail("only symmetric zero padding of H and W, feeding a pooling, is supported")
    n.g.pads[n.outputs[0]] = (n.inputs[0], pads[2:4])


@importer("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(n):
    p = n.layer("Pooling").pooling_param
    p.pool = p.AVE if n.op == "GlobalAveragePool" else p.MAX
    p.global_pooling = True


@importer("BatchNormalization")
def _batch_norm(n):
    if len([o for o in n.outputs if o]) > 1:
        n.fail("training-mode BatchNormalization (running statistics outputs) is not supported")
    scale, bias, mean, var = (n.const(i).astype(np.float32) for i in (1, 2, 3, 4))
    mid = n.outputs[0] + "/bn"
    bn = n.layer("BatchNorm", tops=[mid], name=n.name + "/bn",
                 blobs=[mean, var, np.ones(1, np.float32)])
    bn.batch_norm_param.use_global_stats = True
    bn.batch_norm_param.eps = n.attr("epsilon", 1e-5)
    sc = n.layer("Scale", bottoms=[mid], name=n.name + "/scale", blobs=[scale, bias])
    sc.scale_param.bias_term = True


def _broadcast_axis(n, const, x_shape):
    """(axis, blob) for a constant broadcast against x: Caffe's Scale/Bias axis form."""
    shape = [1] * (len(x_shape) - const.ndim) + list(const.shape)
    if len(shape) > len(x_shape):
        n.fail(f"constant of shape {list(const.shape)} does not broadcast to {x_shape}")
    real = [i for i, d in enumerate(shape) if d != 1]
    first, last = real[0], real[-1]
    if shape[first:last + 1] != list(x_shape[first:last + 1]):
        n.fail(f"constant of shape {list(const.shape)} broadcasts in a way Caffe's Scale/Bias "
               f"cannot (against {x_shape})")
    return first, const.reshape(shape[first:last + 1]).astype(np.float32)


@importer("Add", "Mul", "Sum")
def _eltwise(n):
    consts = [n.const(i, required=False) for i in range(len(n.inputs))]
    tensors = [i for i, c in enumerate(consts) if c is None]
    if len(tensors) == len(n.inputs):
        shapes = [n.shape(i) for i in tensors]
        if any(s != shapes[0] for s in shapes):
            n.fail(f"inputs of different shapes {shapes} (Caffe's Eltwise needs equal shapes)")
        layer = n.layer("Eltwise", bottoms=n.inputs)
        layer.eltwise_param.operation = (caffe_pb2.EltwiseParameter.PROD if n.op == "Mul"
                                         else caffe_pb2.EltwiseParameter.SUM)
        return
    if len(tensors) != 1 or len(n.inputs) != 2:
        n.fail("only tensor (op) tensor or tensor (op) constant is supported")
    x, c = n.inputs[tensors[0]], consts[1 - tensors[0]]
    if c.size == 1:
        layer = n.layer("Power", bottoms=[x])
        if n.op == "Mul":
            layer.power_param.scale = float(c.reshape(-1)[0])
        else:
            layer.power_param.shift = float(c.reshape(-1)[0])
        return
    axis, blob = _broadcast_axis(n, c, n.shape(tensors[0]))
    layer = n.layer("Scale" if n.op == "Mul" else "Bias", bottoms=[x], blobs=[blob])
    p = layer.scale_param if n.op == "Mul" else layer.bias_param
    p.axis, p.num_axes = axis, blob.ndim


@importer("Concat")
def _concat(n):
    n.layer("Concat", bottoms=n.inputs).concat_param.axis = n.attr("axis")


@importer("Softmax")
def _softmax(n):
    ndim = len(n.shape())
    axis = n.attr("axis", -1 if n.g.opset >= 13 else 1)
    axis = axis + ndim if axis < 0 else axis
    if n.g.opset < 13 and axis != ndim - 1:
        n.fail("opset < 13 Softmax over a flattened 2-D view is only supported on the last axis")
    n.layer("Softmax").softmax_param.axis = axis


@importer("Reshape", "Flatten")
def _reshape(n):
    shape = n.out_shape()
    if n.op == "Flatten" and n.attr("axis", 1) == 1:
        n.layer("Flatten")
        return
    layer = n.layer("Reshape", bottoms=n.inputs[:1])
    # The inferred output shape; a kept batch dim is copied so other batch sizes still reshape.
    dims = [int(d) for d in shape]
    if dims and dims[0] == n.shape()[0]:
        dims[0] = 0
    layer.reshape_param.shape.dim.extend(dims)


@importer("Identity", "Dropout")
def _identity(n):
    if len([o for o in n.outputs if o]) > 1:
        n.fail("the mask output is not supported")
    n.layer("Dropout" if n.op == "Dropout" else "Split")


@importer("Clip")
def _clip(n):
    lo, hi = n.const(1, required=False), n.const(2, required=False)
    lo = n.attr("min", -3.4028234663852886e38) if lo is None else float(lo)
    hi = n.attr("max", 3.4028234663852886e38) if hi is None else float(hi)
    p = n.layer("Clip").clip_param
    p.min, p.max = lo, hi


@importer("Split")
def _split(n):
    shape = n.shape()
    axis = n.attr("axis", 0)
    axis = axis + len(shape) if axis < 0 else axis
    sizes = n.const(1, required=False)
    sizes = list(n.attr("split", [])) if sizes is None else [int(s) for s in sizes]
    if not sizes:
        sizes = [d[axis] for d in (n.g.shapes.get(o) for o in n.outputs)] \
            if all(o in n.g.shapes for o in n.outputs) else []
    layer = n.layer("Slice", tops=n.outputs)
    layer.slice_param.axis = axis
    if sizes:
        layer.slice_param.slice_point.extend(int(x) for x in np.cumsum(sizes)[:-1])


@importer("Slice")
def _slice(n):
    shape = n.shape()
    if n.g.opset < 10:   # starts/ends/axes were attributes before opset 10
        starts, ends = n.attr("starts"), n.attr("ends")
        axes, steps = n.attr("axes"), None
    else:
        starts, ends = n.const(1), n.const(2)
        axes = n.const(3, required=False)
        steps = n.const(4, required=False)
    axes = list(range(len(starts))) if axes is None else list(axes)
    if steps is not None and any(int(s) != 1 for s in steps):
        n.fail("steps other than 1 are not expressible")
    x = n.inputs[0]
    for j, (axis, start, end) in enumerate(zip(axes, starts, ends)):
        axis = int(axis) + len(shape) if axis < 0 else int(axis)
        dim = shape[axis]
        start = int(np.clip(start + dim if start < 0 else start, 0, dim))
        end = int(np.clip(end + dim if end < 0 else end, 0, dim))
        if start >= end:
            n.fail("an empty slice is not expressible")
        out = n.outputs[0] if j == len(axes) - 1 else f"{n.outputs[0]}/axis{axis}"
        points = [p for p in (start, end) if 0 < p < dim]
        if not points:
            n.layer("Split", bottoms=[x], tops=[out], name=f"{n.name}/{j}")
        else:
            tops, waste = [], []
            if start > 0:
                waste.append(f"{out}/before")
                tops.append(waste[-1])
            tops.append(out)
            if end < dim:
                waste.append(f"{out}/after")
                tops.append(waste[-1])
            layer = n.layer("Slice", bottoms=[x], tops=tops, name=f"{n.name}/{j}")
            layer.slice_param.axis = axis
            layer.slice_param.slice_point.extend(points)
            n.layer("Silence", bottoms=waste, tops=[], name=f"{n.name}/{j}/silence")
        shape = list(shape)
        shape[axis] = end - start
        x = out


@importer("Resize", "Upsample")
def _resize(n):
    mode = n.attr("mode", "nearest")
    if mode != "nearest":
        n.fail(f"mode {mode!r} is not supported (only nearest)")
    in_shape, out_shape = n.shape(), n.out_shape()
    if len(in_shape) != 4 or in_shape[:2] != out_shape[:2]:
        n.fail(f"only spatial resizing of NCHW tensors is supported ({in_shape} -> {out_shape})")
    factors = [o // i for o, i in zip(out_shape[2:], in_shape[2:])]
    if any(f * i != o for f, i, o in zip(factors, in_shape[2:], out_shape[2:])):
        n.fail(f"non-integer scale {in_shape[2:]} -> {out_shape[2:]}")
    ctm = n.attr("coordinate_transformation_mode", "half_pixel")
    nearest = n.attr("nearest_mode", "round_prefer_floor")
    repeats = (ctm in ("half_pixel", "pytorch_half_pixel") and nearest.startswith("round")
               or ctm == "asymmetric" and nearest == "floor" or n.op == "Upsample")
    if not repeats:
        n.fail(f"coordinate_transformation_mode {ctm!r} with nearest_mode {nearest!r} does not "
               f"repeat pixels; only pixel-repeating nearest resizing is supported")
    c = in_shape[1]
    # Nearest upsampling by integer factors = a depthwise deconvolution with all-ones kernels.
    weight = np.ones((c, 1, factors[0], factors[1]), np.float32)
    layer = n.layer("Deconvolution", bottoms=n.inputs[:1], blobs=[weight])
    p = layer.convolution_param
    p.num_output, p.group, p.bias_term = c, c, False
    p.kernel_h, p.kernel_w = factors
    p.stride_h, p.stride_w = factors
    spec = layer.param.add()
    spec.lr_mult = spec.decay_mult = 0
