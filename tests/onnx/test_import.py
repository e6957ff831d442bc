"""ONNX -> Caffe: the common ops import, a Caffe -> ONNX -> Caffe round trip gives the same outputs,
and unsupported ops are named."""
import os
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the ONNX import needs the onnx package (minicaffe[onnx])")
ort = pytest.importorskip("onnxruntime", reason="comparing needs onnxruntime (minicaffe[onnx])")

import minicaffe  # noqa: E402
from minicaffe.onnx import OnnxError, export, import_model  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from .helpers import net_from_text, randomize  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = os.path.join(REPO, "..", "shared", "models")


def _forward(net, feeds):
    for k, v in feeds.items():
        net.blobs[k].data[...] = v
    net.forward()
    return {k: net.blobs[k].data.copy() for k in net.outputs}


def _import_and_run(model_path, tmp_path, feeds):
    proto, weights = tmp_path / "back.prototxt", tmp_path / "back.caffemodel"
    import_model(model_path, proto, weights)
    return minicaffe.Net(str(proto), minicaffe.TEST, weights=str(weights))


ROUND_TRIP = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 12 dim: 12 } } }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 6 kernel_size: 3 pad: 1 group: 3 } }
layer { name: "bn" type: "BatchNorm" bottom: "c1" top: "c1" }
layer { name: "sc" type: "Scale" bottom: "c1" top: "c1" scale_param { bias_term: true } }
layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" relu_param { negative_slope: 0.1 } }
layer { name: "p1" type: "Pooling" bottom: "c1" top: "p1" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "sl" type: "Slice" bottom: "p1" top: "a" top: "b" slice_param { axis: 1 slice_point: 2 } }
layer { name: "ta" type: "TanH" bottom: "a" top: "a2" }
layer { name: "sb" type: "Sigmoid" bottom: "b" top: "b2" }
layer { name: "cat" type: "Concat" bottom: "a2" bottom: "b2" top: "cat" }
layer { name: "d1" type: "Deconvolution" bottom: "cat" top: "d1" convolution_param { num_output: 4 kernel_size: 2 stride: 2 } }
layer { name: "c2" type: "Convolution" bottom: "d1" top: "c2" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "d1" bottom: "c2" top: "sum" }
layer { name: "clip" type: "Clip" bottom: "sum" top: "sum" clip_param { min: -1 max: 1.5 } }
layer { name: "p2" type: "Pooling" bottom: "sum" top: "p2" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "drop" type: "Dropout" bottom: "p2" top: "p2" }
layer { name: "flat" type: "Flatten" bottom: "p2" top: "flat" }
layer { name: "ip" type: "InnerProduct" bottom: "flat" top: "ip" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
layer { name: "gp" type: "Pooling" bottom: "sum" top: "gp" pooling_param { pool: AVE global_pooling: true } }
"""


def test_round_trip_caffe_onnx_caffe(tmp_path):
    net = randomize(net_from_text(ROUND_TRIP))
    export(net, tmp_path / "m.onnx")
    back = _import_and_run(tmp_path / "m.onnx", tmp_path, {})
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
    want, got = _forward(net, {"data": x}), _forward(back, {"data": x})
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_round_trip_squeezenet_bench(tmp_path):
    path = os.path.join(MODELS, "bench", "squeezenet_v1.1_deploy.prototxt")
    if not os.path.exists(path):
        pytest.skip("../shared/models is missing")
    net = minicaffe.Net(path, minicaffe.TEST)
    net.blobs["data"].reshape((1, 3, 227, 227))
    net.reshape()
    randomize(net)
    export(net, tmp_path / "m.onnx")
    back = _import_and_run(tmp_path / "m.onnx", tmp_path, {})
    x = np.random.default_rng(0).standard_normal((1, 3, 227, 227)).astype(np.float32)
    want, got = _forward(net, {"data": x}), _forward(back, {"data": x})
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _compare(model, tmp_path, shape):
    path = tmp_path / "in.onnx"
    onnx.save(model, str(path))
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    back = _import_and_run(path, tmp_path, {})
    got = _forward(back, {"x": x})
    names = [o.name for o in model.graph.output]
    for name, w in zip(names, want):
        np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-6)


def test_import_gemm_matmul_add_mul_constants(tmp_path):
    rng = np.random.default_rng(0)
    inits = [("B", rng.standard_normal((5, 4)).astype(np.float32)),
             ("C", rng.standard_normal(4).astype(np.float32)),
             ("M", rng.standard_normal((4, 3)).astype(np.float32)),
             ("s", np.array(0.5, np.float32)), ("v", rng.standard_normal(3).astype(np.float32))]
    nodes = [helper.make_node("Gemm", ["x", "B", "C"], ["g"], alpha=0.5, beta=2.0),
             helper.make_node("LeakyRelu", ["g"], ["l"], alpha=0.2),
             helper.make_node("MatMul", ["l", "M"], ["m"]),
             helper.make_node("Mul", ["m", "s"], ["ms"]),
             helper.make_node("Add", ["ms", "v"], ["y"])]
    _compare(_model(nodes, [_vi("x", [2, 5])], [_vi("y", [2, 3])], inits), tmp_path, (2, 5))


def test_import_resize_split_slice_sum_reshape(tmp_path):
    inits = [("scales", np.array([1, 1, 2, 3], np.float32)), ("roi", np.zeros(0, np.float32)),
             ("split", np.array([1, 2], np.int64)), ("st", np.array([1, 0], np.int64)),
             ("en", np.array([5, -1], np.int64)), ("ax", np.array([2, 3], np.int64)),
             ("shape", np.array([2, -1], np.int64)),
             ("cs", np.array([1.0, 2.0, -1.0], np.float32).reshape(3, 1, 1))]
    nodes = [helper.make_node("Resize", ["x", "roi", "scales"], ["r"], mode="nearest"),
             helper.make_node("Split", ["r", "split"], ["a", "b"], axis=1),
             helper.make_node("Slice", ["b", "st", "en", "ax"], ["bs"]),
             helper.make_node("Slice", ["a", "st", "en", "ax"], ["as"]),
             helper.make_node("Concat", ["as", "bs"], ["cat"], axis=1),
             helper.make_node("Mul", ["cat", "cs"], ["sc"]),
             helper.make_node("Clip", ["sc", "", ""], ["cl"]),
             helper.make_node("Reshape", ["cl", "shape"], ["y"]),
             helper.make_node("Softmax", ["y"], ["z"], axis=1),
             helper.make_node("Sum", ["z", "y", "z"], ["w"])]
    _compare(_model(nodes, [_vi("x", [2, 3, 3, 4])], [_vi("w", [2, None])], inits), tmp_path,
             (2, 3, 3, 4))


def test_import_pooling_and_bn_onnx_built(tmp_path):
    rng = np.random.default_rng(0)
    inits = [("sc", rng.uniform(0.5, 1.5, 3).astype(np.float32)),
             ("bi", rng.standard_normal(3).astype(np.float32)),
             ("mu", rng.standard_normal(3).astype(np.float32)),
             ("va", rng.uniform(0.5, 1.5, 3).astype(np.float32))]
    nodes = [helper.make_node("BatchNormalization", ["x", "sc", "bi", "mu", "va"], ["bn"], epsilon=1e-3),
             helper.make_node("AveragePool", ["bn"], ["ap"], kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1], count_include_pad=1),
             helper.make_node("MaxPool", ["ap"], ["mp"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
             helper.make_node("Add", ["mp", "mp"], ["y"]),
             helper.make_node("GlobalAveragePool", ["y"], ["g"])]
    _compare(_model(nodes, [_vi("x", [2, 3, 9, 9])], [_vi("g", None)], inits),
             tmp_path, (2, 3, 9, 9))


def test_unsupported_op_is_named(tmp_path):
    model = _model([helper.make_node("Erf", ["x"], ["y"], name="erf1")], [_vi("x", [1, 2])],
                   [_vi("y", [1, 2])])
    onnx.save(model, str(tmp_path / "e.onnx"))
    with pytest.raises(OnnxError, match=r"node 'erf1' \(Erf\): cannot import to Caffe: this op is "
                                        r"not supported"):
        import_model(tmp_path / "e.onnx", tmp_path / "o.prototxt", tmp_path / "o.caffemodel")
    assert not (tmp_path / "o.prototxt").exists() and not (tmp_path / "o.caffemodel").exists()
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-m", "minicaffe", "import-onnx", str(tmp_path / "e.onnx"),
                        str(tmp_path / "o.prototxt"), str(tmp_path / "o.caffemodel")],
                       capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 1 and "node 'erf1' (Erf)" in r.stderr and r.stderr.count("\n") == 1


def test_average_pool_excluding_padding_is_refused(tmp_path):
    node = helper.make_node("AveragePool", ["x"], ["y"], name="ap", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    onnx.save(_model([node], [_vi("x", [1, 1, 5, 5])], [_vi("y", None)]), str(tmp_path / "a.onnx"))
    with pytest.raises(OnnxError, match="count_include_pad=0"):
        import_model(tmp_path / "a.onnx", tmp_path / "o.prototxt", tmp_path / "o.caffemodel")


def test_import_flatten_axis2_and_opset9_slice(tmp_path):
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=2),
             helper.make_node("Slice", ["f"], ["y"], starts=[1], ends=[3], axes=[1])]
    _compare(_model(nodes, [_vi("x", [2, 3, 2, 2])], [_vi("y", None)], opset=9), tmp_path, (2, 3, 2, 2))
