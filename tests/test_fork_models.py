"""Models from the Caffe forks run in minicaffe, with weights made here; where OpenCV dnn
(the reference for fork layers) runs the same prototxt and .caffemodel, the outputs agree.

The nets in ../shared/models/forks/ are used as published (MobileNet-SSD is tested with the
SSD layers). Small PSPNet-, DeepLab-v2-, SegNet-, SE-ResNeXt-, YOLO-v2- and Fast-R-CNN-test-like
nets with the same layer sets are written below.
"""
import functools
import pathlib

import numpy as np
import pytest
from google.protobuf import text_format

import minicaffe as caffe
from minicaffe.proto import caffe_pb2

FORKS = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "forks"

FORK_NETS = {
    # file: expected output shapes
    "densenet121_deploy.prototxt": {"fc6": (1, 1000, 1, 1)},
    "mobilenet_depthwise_deploy.prototxt": {"fc7": (1, 1000, 1, 1)},
    "resnext50_32x4d_deploy.prototxt": {"prob": (1, 1000)},
    "se_resnet50_deploy.prototxt": {"prob": (1, 1000)},
    "shufflenet_1x_g3_deploy.prototxt": {"fc1000": (1, 1000, 1, 1)},
    "shufflenet_v2_1x_deploy.prototxt": {"fc1000": (1, 1000, 1, 1)},
    "pspnet50_ade20k_473.prototxt": {"conv6_interp": (1, 150, 473, 473)},
}
# OpenCV has no DepthwiseConvolution type; it gets the same net with type Convolution
# (the fork's layer is a Convolution with its own CUDA kernel). It has no PSPNet BN.
OPENCV_NETS = [n for n in FORK_NETS if not n.startswith("pspnet")]


def randomize(net, seed=0):
    """Weights that keep activations O(1): He-scaled filters, BN statistics near identity."""
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        blobs = layer.blobs
        if layer.type == "BatchNorm":
            c = blobs[0].count()
            blobs[0].data[...] = rng.normal(0, 0.1, c)
            blobs[1].data[...] = rng.uniform(0.5, 1.5, c)
            blobs[2].data[...] = 1
        elif layer.type == "BN":
            for i, b in enumerate(blobs):
                b.data[...] = rng.uniform(0.5, 1.5, b.shape) if i in (0, 3) else rng.normal(0, 0.1, b.shape)
        elif layer.type == "Scale":
            for i, b in enumerate(blobs):
                b.data[...] = rng.uniform(0.5, 1.5, b.shape) if i == 0 else rng.normal(0, 0.1, b.shape)
        elif blobs and layer.type in ("Convolution", "DepthwiseConvolution", "ConvolutionDepthwise",
                                      "InnerProduct", "Deconvolution"):
            fan_in = blobs[0].count() // blobs[0].shape[0]
            blobs[0].data[...] = rng.normal(0, np.sqrt(2 / fan_in), blobs[0].shape)
            for b in blobs[1:]:
                b.data[...] = rng.normal(0, 0.1, b.shape)


def calibrate(net):
    """Set each BatchNorm's statistics to those of its input on this batch (a data-dependent
    init), so activations stay O(1) through deep residual stacks as in a trained net.
    Otherwise they grow block by block and float32 sums (SE's global pooling) cancel."""
    for i, layer in enumerate(net.layers):
        if layer.type == "BatchNorm":
            x = net._bottom_vecs[i][0].data
            layer.blobs[0].data[...] = x.mean(axis=(0, 2, 3))
            layer.blobs[1].data[...] = x.var(axis=(0, 2, 3))
            layer.blobs[2].data[...] = 1
        net.forward_from_to(i, i)


def run(model, seed=0):
    net = caffe.Net(str(model), caffe.TEST)
    randomize(net, seed)
    rng = np.random.default_rng(seed + 1)
    inputs = {name: FIXED_INPUTS[name] if name in FIXED_INPUTS else
              rng.standard_normal(net.blobs[name].shape).astype(np.float32) for name in net.inputs}
    for name, value in inputs.items():
        net.blobs[name].data[...] = value
    calibrate(net)    # runs every layer once: the outputs are ready
    out = {name: net.blobs[name].data for name in net.outputs}
    return net, inputs, {k: v.copy() for k, v in out.items()}


@functools.lru_cache(maxsize=None)
def fork_run(name):
    return run(FORKS / name)


@pytest.mark.parametrize("name", list(FORK_NETS))
def test_fork_net_runs(name):
    if not FORKS.is_dir():
        pytest.skip("../shared/models/forks is not available")
    net, _, out = fork_run(name)
    assert {k: v.shape for k, v in out.items()} == FORK_NETS[name]
    for v in out.values():
        assert v.dtype == np.float32 and np.isfinite(v).all() and np.abs(v).max() > 0


def compared_blobs(net):
    """The net's outputs; for a final Softmax its input instead (with random weights the
    probabilities saturate to 0/1, so two near-equal top logits could swap the one-hot)."""
    names = list(net.outputs)
    if net.layers[-1].type == "Softmax":
        last = net.layer_names[-1]
        names = [n for n in names if n not in net.top_names[last]] + list(net.bottom_names[last])
    return names


def opencv_forward(prototxt_text, weights, inputs, names, tmp_path):
    cv2 = pytest.importorskip("cv2", reason="OpenCV dnn (extra 'reference') is the fork reference")
    path = tmp_path / "net.prototxt"
    path.write_text(prototxt_text)
    cv_net = cv2.dnn.readNetFromCaffe(str(path), str(weights))
    for name, value in inputs.items():
        cv_net.setInput(value, name)
    return dict(zip(names, cv_net.forward(names)))


def assert_matches_opencv(net, prototxt_text, inputs, tmp_path):
    weights = tmp_path / "net.caffemodel"
    net.save(str(weights))
    names = compared_blobs(net)
    theirs = opencv_forward(prototxt_text, weights, inputs, names, tmp_path)
    for name in names:
        ours = net.blobs[name].data
        scale = np.abs(ours).max()
        assert scale > 0
        np.testing.assert_allclose(theirs[name].reshape(ours.shape), ours, rtol=0, atol=1e-4 * scale,
                                   err_msg=name)


@pytest.mark.parametrize("name", OPENCV_NETS)
def test_fork_net_matches_opencv(name, tmp_path):
    pytest.importorskip("cv2", reason="OpenCV dnn (extra 'reference') is the fork reference")
    if not FORKS.is_dir():
        pytest.skip("../shared/models/forks is not available")
    net, inputs, _ = fork_run(name)
    text = (FORKS / name).read_text().replace('"DepthwiseConvolution"', '"Convolution"')
    assert_matches_opencv(net, for_opencv(text), inputs, tmp_path)


def for_opencv(text):
    """The prototxt as OpenCV 4.x must be given it to compute what the forks compute.

    SENet's Axpy is top = bottom[0] * bottom[1] + bottom[2] (hujie-frank/SENet's
    axpy_layer.cpp); OpenCV's Caffe importer builds bottom[0] * bottom[2] + bottom[1]
    instead, so its Axpy layers get bottoms 1 and 2 swapped here.
    """
    param = text_format.Parse(text, caffe_pb2.NetParameter())
    if not any(layer.type == "Axpy" for layer in param.layer):
        return text
    for layer in param.layer:
        if layer.type == "Axpy":
            layer.bottom[1], layer.bottom[2] = layer.bottom[2], layer.bottom[1]
    return text_format.MessageToString(param)


# -- small nets with the forks' layer sets ------------------------------------------------------
def conv(name, bottom, out, k=3, pad=1, stride=1, dilation=1, group=1, bias="true"):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
            f'convolution_param {{ num_output: {out} kernel_size: {k} pad: {pad} stride: {stride} '
            f'dilation: {dilation} group: {group} bias_term: {bias} }} }}\n')


def layer(name, type_, bottoms, params="", top=None):
    b = " ".join(f'bottom: "{x}"' for x in bottoms)
    return f'layer {{ name: "{name}" type: "{type_}" {b} top: "{top or name}" {params} }}\n'


def relu(name):
    return layer(f"{name}/relu", "ReLU", [name], top=name)


def bn(name, params="bn_param { frozen: true }"):
    return layer(f"{name}/bn", "BN", [name], params, top=name)


def input_layer(c, h, w):
    return f'input: "data" input_shape {{ dim: 1 dim: {c} dim: {h} dim: {w} }}\n'


PSPNET_LIKE = (input_layer(3, 65, 65) + conv("conv1", "data", 8, stride=2, bias="false")
               + bn("conv1") + relu("conv1")
               + conv("conv2", "conv1", 16, dilation=2, pad=2, bias="false") + bn("conv2") + relu("conv2")
               + "".join(
                   layer(f"pool{b}", "Pooling", ["conv2"],
                         f"pooling_param {{ pool: AVE kernel_size: {33 // b} stride: {33 // b} }}")
                   + conv(f"pool{b}_conv", f"pool{b}", 4, k=1, pad=0, bias="false") + bn(f"pool{b}_conv")
                   + relu(f"pool{b}_conv")
                   + layer(f"pool{b}_interp", "Interp", [f"pool{b}_conv"],
                           "interp_param { height: 33 width: 33 }")
                   for b in (1, 2, 3, 6))
               + layer("concat", "Concat", ["conv2"] + [f"pool{b}_interp" for b in (1, 2, 3, 6)])
               + conv("cls", "concat", 5, k=1, pad=0)
               + layer("cls_interp", "Interp", ["cls"], "interp_param { zoom_factor: 2 }"))

DEEPLAB_V2_LIKE = (input_layer(3, 41, 41) + conv("conv1", "data", 8) + relu("conv1")
                   + layer("pool1", "Pooling", ["conv1"],
                           "pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }")
                   + "".join(conv(f"fc8_{r}", "pool1", 4, pad=r, dilation=r) for r in (1, 2, 3, 4))
                   + layer("fuse", "Eltwise", [f"fc8_{r}" for r in (1, 2, 3, 4)],
                           "eltwise_param { operation: SUM }")
                   + layer("shrunk", "Interp", ["data"], "interp_param { shrink_factor: 2 }")
                   + layer("zoom", "Interp", ["fuse"], "interp_param { zoom_factor: 2 }")
                   + layer("both", "Interp", ["fuse"], "interp_param { zoom_factor: 3 shrink_factor: 2 }"))

SEGNET_LIKE = (input_layer(3, 24, 20) + conv("conv1", "data", 6) + bn("conv1", "bn_param { bn_mode: INFERENCE }")
               + relu("conv1")
               + 'layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" top: "pool1_mask" '
                 'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
               + conv("conv2", "pool1", 6) + bn("conv2", "bn_param { bn_mode: INFERENCE }") + relu("conv2")
               + 'layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" top: "pool2_mask" '
                 'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
               + layer("up2", "Upsample", ["pool2", "pool2_mask"], "upsample_param { scale: 2 }")
               + conv("conv2_D", "up2", 6)
               + layer("up1", "Upsample", ["conv2_D", "pool1_mask"],
                       "upsample_param { upsample_h: 24 upsample_w: 20 }")
               + conv("conv1_D", "up1", 4, k=1, pad=0))

SE_RESNEXT_LIKE = (input_layer(3, 16, 16) + conv("conv1", "data", 16, bias="false")
                   + layer("conv1/bn", "BatchNorm", ["conv1"], top="conv1")
                   + layer("conv1/scale", "Scale", ["conv1"], "scale_param { bias_term: true }", top="conv1")
                   + relu("conv1")
                   + conv("red", "conv1", 16, k=1, pad=0, bias="false") + relu("red")
                   + conv("grouped", "red", 16, group=4, bias="false") + relu("grouped")
                   + conv("inc", "grouped", 16, k=1, pad=0, bias="false")
                   + layer("squeeze", "Pooling", ["inc"], "pooling_param { pool: AVE global_pooling: true }")
                   + conv("down", "squeeze", 4, k=1, pad=0) + relu("down")
                   + conv("up", "down", 16, k=1, pad=0)
                   + layer("gate", "Sigmoid", ["up"])
                   + layer("fuse", "Axpy", ["gate", "inc", "conv1"]) + relu("fuse")
                   + conv("dw", "fuse", 16, group=16, stride=2)
                   + layer("shuffle", "ShuffleChannel", ["dw"], "shuffle_channel_param { group: 4 }")
                   + layer("pool", "Pooling", ["shuffle"],
                           "pooling_param { pool: MAX kernel_size: 3 stride: 2 ceil_mode: false }")
                   + layer("fc", "InnerProduct", ["pool"], "inner_product_param { num_output: 10 }")
                   + layer("prob", "Softmax", ["fc"]))

# Fast R-CNN test nets take ROIs as an input: (batch index, x1, y1, x2, y2) in image pixels.
FIXED_INPUTS = {"rois": np.array([[0, 0, 0, 47, 39], [0, 2.5, 3.5, 19, 17], [0, 5, 5, 5, 5],
                                  [0, -8, -8, 60, 3], [0, 14, 14, 40, 30]], dtype=np.float32)}

FAST_RCNN_LIKE = (input_layer(3, 40, 48) + 'input: "rois" input_shape { dim: 5 dim: 5 }\n'
                  + conv("conv1", "data", 8, stride=2) + relu("conv1")
                  + layer("pool1", "Pooling", ["conv1"],
                          "pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }")
                  + conv("conv2", "pool1", 8) + relu("conv2")
                  + layer("roi_pool", "ROIPooling", ["conv2", "rois"],
                          "roi_pooling_param { pooled_w: 3 pooled_h: 3 spatial_scale: 0.25 }")
                  + layer("fc6", "InnerProduct", ["roi_pool"], "inner_product_param { num_output: 16 }")
                  + relu("fc6")
                  + layer("bbox_pred", "InnerProduct", ["fc6"], "inner_product_param { num_output: 8 }")
                  + layer("cls_score", "InnerProduct", ["fc6"], "inner_product_param { num_output: 2 }")
                  + layer("cls_prob", "Softmax", ["cls_score"]))

YOLO_V2_LIKE = (input_layer(3, 32, 32) + conv("conv1", "data", 8) + relu("conv1")
                + layer("pool1", "Pooling", ["conv1"], "pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
                + conv("conv2", "pool1", 16) + relu("conv2")
                + layer("pool2", "Pooling", ["conv2"], "pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
                + conv("conv3", "pool2", 16)
                + layer("reorg", "Reorg", ["conv2"], "reorg_param { stride: 2 }")
                + layer("concat", "Concat", ["reorg", "conv3"])
                + conv("det", "concat", 25, k=1, pad=0))

SMALL_NETS = {
    "fast_rcnn_like": (FAST_RCNN_LIKE, {"bbox_pred": (5, 8), "cls_prob": (5, 2)}),
    "yolo_v2_like": (YOLO_V2_LIKE, {"det": (1, 25, 8, 8)}),
    "pspnet_like": (PSPNET_LIKE, {"cls_interp": (1, 5, 65, 65)}),
    "deeplab_v2_like": (DEEPLAB_V2_LIKE, {"shrunk": (1, 3, 21, 21), "zoom": (1, 4, 41, 41),
                                          "both": (1, 4, 31, 31)}),
    "segnet_like": (SEGNET_LIKE, {"conv1_D": (1, 4, 24, 20)}),
    "se_resnext_like": (SE_RESNEXT_LIKE, {"prob": (1, 10)}),
}


@pytest.mark.parametrize("name", list(SMALL_NETS))
def test_small_fork_net_runs_and_learns_a_step(name, tmp_path):
    text, shapes = SMALL_NETS[name]
    path = tmp_path / f"{name}.prototxt"
    path.write_text("force_backward: true\n" + text)
    net, _, out = run(path)
    assert {k: v.shape for k, v in out.items()} == shapes
    for v in out.values():
        assert np.isfinite(v).all() and np.abs(v).max() > 0
    # Random top diffs: a constant diff on a Softmax output backpropagates to exactly zero.
    rng = np.random.default_rng(0)
    for v in net.outputs:
        net.blobs[v].diff[...] = rng.standard_normal(net.blobs[v].shape)
    net.backward()
    assert np.isfinite(net.blobs["data"].diff).all() and np.abs(net.blobs["data"].diff).max() > 0


# OpenCV's Interp ignores shrink_factor, so its DeepLab-like net leaves those layers out.
OPENCV_SMALL_NETS = {
    "deeplab_v2_like": "".join(line + "\n" for line in DEEPLAB_V2_LIKE.splitlines()
                               if '"shrunk"' not in line and '"both"' not in line),
    "se_resnext_like": SE_RESNEXT_LIKE,
    "yolo_v2_like": YOLO_V2_LIKE,
    "fast_rcnn_like": FAST_RCNN_LIKE,
}


@pytest.mark.parametrize("name", list(OPENCV_SMALL_NETS))
def test_small_fork_net_matches_opencv(name, tmp_path):
    pytest.importorskip("cv2", reason="OpenCV dnn (extra 'reference') is the fork reference")
    text = OPENCV_SMALL_NETS[name]
    path = tmp_path / f"{name}.prototxt"
    path.write_text(text)
    net, inputs, _ = run(path)
    assert_matches_opencv(net, for_opencv(text), inputs, tmp_path)
