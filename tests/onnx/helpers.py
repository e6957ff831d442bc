"""Build small nets from prototxt text, fill their params with well-scaled random values,
export them and compare onnxruntime with minicaffe."""
import numpy as np
from google.protobuf import text_format

import minicaffe
from minicaffe.proto import caffe_pb2


def net_from_text(text, phase=minicaffe.TEST):
    param = text_format.Parse(text, caffe_pb2.NetParameter())
    return minicaffe.Net(param, phase)


def randomize(net, seed=0):
    """Random params: weights ~ N(0, 1/fan_in); BatchNorm stats valid (var > 0)."""
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        if layer.type == "BatchNorm":
            c = layer.blobs[0].shape[0]
            layer.blobs[0].data[...] = rng.standard_normal(c) * 0.1 * 2.0
            layer.blobs[1].data[...] = rng.uniform(0.5, 1.5, c) * 2.0
            layer.blobs[2].data[...] = 2.0
            continue
        for blob in layer.blobs:
            shape = blob.shape
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            if layer.type == "InnerProduct" and layer.layer_param.inner_product_param.transpose:
                fan_in = shape[0]
            blob.data[...] = rng.standard_normal(shape, dtype=np.float32)
            blob.data *= np.float32(1 / np.sqrt(max(fan_in, 1)))
    return net


def export_and_check(net, tmp_path, name="model.onnx", **kwargs):
    from minicaffe import onnx as mo
    path = tmp_path / name
    opts = {k: kwargs.pop(k) for k in ("opset", "batch", "extra_outputs") if k in kwargs}
    mo.export(net, path, **opts)
    return mo.check(net, path, **kwargs)
