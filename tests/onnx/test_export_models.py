"""The bench nets and the deploy-able BVLC example nets export, and onnxruntime agrees (1e-4)."""
import os

import pytest

pytest.importorskip("onnx", reason="the ONNX export needs the onnx package (minicaffe[onnx])")
pytest.importorskip("onnxruntime", reason="the ONNX check needs onnxruntime (minicaffe[onnx])")

import minicaffe  # noqa: E402

from .helpers import export_and_check, randomize  # noqa: E402

MODELS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "models")
NETS = ["bench/caffenet_deploy.prototxt", "bench/googlenet_deploy.prototxt",
        "bench/mobilenet_v1_deploy.prototxt", "bench/resnet50_deploy.prototxt",
        "bench/squeezenet_v1.1_deploy.prototxt", "bench/vgg16_deploy.prototxt",
        "bvlc/bvlc_alexnet__deploy.prototxt", "bvlc/mnist__lenet.prototxt"]
# bvlc_googlenet and bvlc_reference_caffenet deploy nets are the bench nets' prototxts.


def _net(rel):
    path = os.path.join(MODELS, rel)
    if not os.path.exists(path):
        pytest.skip(f"{rel} is not in ../shared/models")
    net = minicaffe.Net(path, minicaffe.TEST)
    for name in net.inputs:   # batch 1 keeps the big nets affordable
        blob = net.blobs[name]
        blob.reshape((1,) + tuple(blob.shape[1:]))
    net.reshape()
    return randomize(net)


@pytest.mark.parametrize("rel", NETS)
def test_model_exports_and_matches(rel, tmp_path):
    net = _net(rel)
    # A softmax over 1000 classes is nearly flat for random weights: compare its input too.
    logits = [net.bottom_ids[i][0] for i, layer in enumerate(net.layers) if layer.type == "Softmax"]
    result = export_and_check(net, tmp_path, extra_outputs=logits)
    assert result.ok and result.worst <= 1e-4, str(result)
    assert set(logits) <= set(result.errors)
