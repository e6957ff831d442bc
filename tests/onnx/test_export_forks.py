"""The forks' layers that ONNX expresses export, and onnxruntime agrees with minicaffe (1e-4)."""
import os

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the ONNX export needs the onnx package (minicaffe[onnx])")
pytest.importorskip("onnxruntime", reason="the ONNX check needs onnxruntime (minicaffe[onnx])")

import minicaffe  # noqa: E402
from minicaffe.onnx.errors import OnnxError  # noqa: E402

from .helpers import export_and_check, net_from_text, randomize  # noqa: E402

FORKS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "models", "forks")
# Every shared fork net but MobileNet-SSD (DetectionOutput) and PSPNet (the forks' BN).
NETS = ["mobilenet_depthwise_deploy.prototxt", "shufflenet_1x_g3_deploy.prototxt",
        "shufflenet_v2_1x_deploy.prototxt", "densenet121_deploy.prototxt",
        "resnext50_32x4d_deploy.prototxt", "se_resnet50_deploy.prototxt"]


def _batch_one(path):
    if not os.path.exists(path):
        pytest.skip(f"{path} is not in ../shared/models/forks")
    net = minicaffe.Net(path, minicaffe.TEST)
    for name in net.inputs:
        net.blobs[name].reshape((1,) + tuple(net.blobs[name].shape[1:]))
    net.reshape()
    return randomize(net)


@pytest.mark.parametrize("name", NETS)
def test_fork_net_exports_and_matches(name, tmp_path):
    net = _batch_one(os.path.join(FORKS, name))
    logits = [net.bottom_ids[i][0] for i, layer in enumerate(net.layers) if layer.type == "Softmax"]
    result = export_and_check(net, tmp_path, extra_outputs=logits)
    assert result.ok and result.worst <= 1e-4, str(result)


SMALL = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 6 dim: 5 dim: 7 } } }
layer { name: "img" type: "Input" top: "img" input_param { shape { dim: 2 dim: 3 dim: 40 dim: 56 } } }
layer { name: "norm" type: "Normalize" bottom: "data" top: "norm" %s }
layer { name: "perm" type: "Permute" bottom: "norm" top: "perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "shuffle" type: "ShuffleChannel" bottom: "data" top: "shuffle" shuffle_channel_param { group: 3 } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "a" pooling_param { pool: AVE global_pooling: true } }
layer { name: "axpy" type: "Axpy" bottom: "a" bottom: "shuffle" bottom: "data" top: "axpy" }
layer { name: "interp" type: "Interp" bottom: "axpy" top: "interp" interp_param { %s } }
layer { name: "prior" type: "PriorBox" bottom: "data" bottom: "img" top: "prior"
        prior_box_param { min_size: 10 max_size: 20 aspect_ratio: 2 flip: true clip: true
                          variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 } }
"""


@pytest.mark.parametrize("normalize, interp", [
    ("", "zoom_factor: 2"),
    ("norm_param { across_spatial: true channel_shared: true eps: 0.001 }", "height: 9 width: 4"),
    ("norm_param { across_spatial: false }", "zoom_factor: 3 pad_beg: -1 pad_end: -1"),
])
def test_fork_layers_match(normalize, interp, tmp_path):
    net = randomize(net_from_text(SMALL % (normalize, interp)))
    result = export_and_check(net, tmp_path, batch=2, extra_outputs=["perm", "interp", "prior"])
    assert result.ok and result.worst <= 1e-4, str(result)


def test_inexpressible_fork_layer_is_named(tmp_path):
    from minicaffe import onnx as mo
    net = net_from_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 4 dim: 4 dim: 4 } } }\n'
                        'layer { name: "reorg" type: "Reorg" bottom: "data" top: "r" reorg_param { stride: 2 } }')
    with pytest.raises(OnnxError, match="'reorg' \\(Reorg\\)"):
        mo.export(net, tmp_path / "m.onnx")
    np.testing.assert_equal(os.path.exists(tmp_path / "m.onnx"), False)


def test_mobilenet_ssd_without_detection_output(tmp_path):
    """Everything before SSD's DetectionOutput (PriorBox, Permute, Flatten, Concat) exports."""
    from minicaffe.proto import caffe_pb2
    from minicaffe.proto_io import read_net_param

    path = os.path.join(FORKS, "mobilenet_ssd_deploy.prototxt")
    if not os.path.exists(path):
        pytest.skip(f"{path} is not in ../shared/models/forks")
    param = read_net_param(path)
    kept = [layer for layer in param.layer if layer.type != "DetectionOutput"]
    assert len(kept) == len(param.layer) - 1
    del param.layer[:]
    param.layer.extend(kept)
    for layer in param.layer:
        if layer.type == "Input":
            layer.input_param.shape[0].dim[0] = 1
    net = randomize(minicaffe.Net(param, caffe_pb2.TEST))
    result = export_and_check(net, tmp_path, batch=1)
    assert result.ok and result.worst <= 1e-4, str(result)
