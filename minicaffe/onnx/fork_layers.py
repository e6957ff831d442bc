"""ONNX converters for the Caffe forks' layers (minicaffe/layers/{channels,detection,resample}.py).

Only layers ONNX expresses exactly are here; DetectionOutput (SSD's NMS with its keep_top_k over
classes), ROIPooling (Caffe's ROI rounding), Upsample with a pooling mask, the forks' BN and
Reorg have no converter, so exporting a net with them names the layer.
"""
import numpy as np

from .converters import CONVERTERS, converter

__all__ = []


@converter("DepthwiseConvolution", "ConvolutionDepthwise")
def _depthwise_conv(ctx):
    """A Convolution with the forks' own kernel: the same ONNX Conv."""
    CONVERTERS["Convolution"](ctx)


@converter("ShuffleChannel")
def _shuffle_channel(ctx):
    """(N, g*k, ...) viewed (N, g, k, rest), transposed to (N, k, g, rest), flattened back."""
    shape = ctx.bottom_shape()
    g = ctx.layer.group
    rest = int(np.prod(shape[2:], dtype=np.int64))
    x = ctx.reshape(ctx.input(), [shape[0], g, shape[1] // g, rest])
    x = ctx.one("Transpose", [x], perm=[0, 2, 1, 3])
    ctx.reshape(x, shape, ctx.output())


@converter("Permute")
def _permute(ctx):
    if ctx.dynamic_batch and ctx.layer.order[0] != 0:
        ctx.fail("a permutation that moves the batch axis needs a fixed --batch")
    ctx.one("Transpose", [ctx.input()], ctx.output(), perm=[int(a) for a in ctx.layer.order])


@converter("Axpy")
def _axpy(ctx):
    """top = a * x + y, a (N, C) or (N, C, 1, 1) broadcast over x's spatial axes."""
    a_shape, x_shape = ctx.bottom_shape(0), ctx.bottom_shape(1)
    a = ctx.input(0)
    full = tuple(x_shape[:2]) + (1,) * (len(x_shape) - 2)
    if tuple(a_shape) != full:
        a = ctx.reshape(a, full)
    ctx.one("Add", [ctx.one("Mul", [a, ctx.input(1)]), ctx.input(2)], ctx.output())


@converter("Normalize")
def _normalize(ctx):
    """top = scale * x / sqrt(sum of x^2 over the normalized axes + eps)."""
    layer = ctx.layer
    ndim = len(ctx.bottom_shape())
    squares = ctx.one("Mul", [ctx.input(), ctx.input()])
    total = ctx.reduce("ReduceSum", squares, list(layer._sum_axes), keepdims=True)
    norm = ctx.one("Sqrt", [ctx.one("Add", [total, ctx.scalar(layer.eps)])])
    scale = ctx.weight(0)
    scale = scale.reshape((1,) * ndim) if layer.channel_shared else scale.reshape((1, -1) + (1,) * (ndim - 2))
    z = ctx.one("Div", [ctx.input(), norm])
    ctx.one("Mul", [z, ctx.add_initializer(scale.astype(np.float32))], ctx.output())


@converter("Interp")
def _interp(ctx):
    """DeepLab's bilinear resize with corners aligned, after cropping -pad_beg/-pad_end."""
    layer = ctx.layer
    if ctx.opset < 11:
        ctx.fail("needs opset 11 or later (Resize with align_corners)")
    x = ctx.input()
    shape = ctx.bottom_shape()
    if layer.pad_beg or layer.pad_end:
        x = ctx.slice(x, [-layer.pad_beg] * 2, [shape[2] + layer.pad_end, shape[3] + layer.pad_end], [2, 3])
    top = list(ctx.top_shape())
    if ctx.dynamic_batch:
        ctx.fail("Interp's output size is fixed here; export with a fixed --batch")
    ctx.one("Resize", [x, "", "", ctx.const(top)], ctx.output(), mode="linear",
            coordinate_transformation_mode="align_corners")


@converter("PriorBox")
def _prior_box(ctx):
    """The boxes depend only on the bottoms' shapes and the layer's parameters: a constant."""
    if ctx.dynamic_batch:
        ctx.fail("its boxes depend on the input size; export with a fixed --batch")
    boxes = ctx.constant_tops()[0]
    ctx.one("Identity", [ctx.add_initializer(boxes)], ctx.output())
