"""SSD detectors end to end: MobileNet-SSD (../shared), small VGG-SSD300- and res10_300x300-like
nets written here, with random weights; against OpenCV dnn when it is installed."""
import pathlib

import numpy as np
import pytest

import minicaffe

FORKS = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "forks"
MOBILENET_SSD = FORKS / "mobilenet_ssd_deploy.prototxt"


def _conv(name, bottom, num, k=3, pad=1, stride=1, dilation=1, bias=True):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
            f'convolution_param {{ num_output: {num} kernel_size: {k} pad: {pad} stride: {stride} '
            f'dilation: {dilation} bias_term: {str(bias).lower()} }} }}\n')


def _relu(name):
    return f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" top: "{name}" }}\n'


def _bn_scale(name):
    return (f'layer {{ name: "{name}_bn" type: "BatchNorm" bottom: "{name}" top: "{name}" }}\n'
            f'layer {{ name: "{name}_scale" type: "Scale" bottom: "{name}" top: "{name}" '
            f'scale_param {{ bias_term: true }} }}\n')


def _head(source, num_priors, num_classes, prior_box):
    """loc/conf convolutions, Permute to NHWC, Flatten, and the PriorBox of one source map."""
    text = ""
    for kind, channels in (("loc", num_priors * 4), ("conf", num_priors * num_classes)):
        name = f"{source}_mbox_{kind}"
        text += _conv(name, source, channels)
        text += (f'layer {{ name: "{name}_perm" type: "Permute" bottom: "{name}" top: "{name}_perm" '
                 f'permute_param {{ order: 0 order: 2 order: 3 order: 1 }} }}\n'
                 f'layer {{ name: "{name}_flat" type: "Flatten" bottom: "{name}_perm" '
                 f'top: "{name}_flat" flatten_param {{ axis: 1 }} }}\n')
    text += (f'layer {{ name: "{source}_mbox_priorbox" type: "PriorBox" bottom: "{source}" '
             f'bottom: "data" top: "{source}_mbox_priorbox" prior_box_param {{ {prior_box} }} }}\n')
    return text


def _ssd_tail(sources, num_classes, detection):
    cat = ""
    for kind, axis in (("loc", 1), ("conf", 1), ("priorbox", 2)):
        bottoms = " ".join(f'bottom: "{s}_mbox_{kind}{"" if kind == "priorbox" else "_flat"}"'
                           for s in sources)
        cat += (f'layer {{ name: "mbox_{kind}" type: "Concat" {bottoms} top: "mbox_{kind}" '
                f'concat_param {{ axis: {axis} }} }}\n')
    return cat + (
        f'layer {{ name: "mbox_conf_reshape" type: "Reshape" bottom: "mbox_conf" '
        f'top: "mbox_conf_reshape" reshape_param {{ shape {{ dim: 0 dim: -1 dim: {num_classes} }} }} }}\n'
        'layer { name: "mbox_conf_softmax" type: "Softmax" bottom: "mbox_conf_reshape" '
        'top: "mbox_conf_softmax" softmax_param { axis: 2 } }\n'
        'layer { name: "mbox_conf_flatten" type: "Flatten" bottom: "mbox_conf_softmax" '
        'top: "mbox_conf_flatten" flatten_param { axis: 1 } }\n'
        'layer { name: "detection_out" type: "DetectionOutput" bottom: "mbox_loc" '
        'bottom: "mbox_conf_flatten" bottom: "mbox_priorbox" top: "detection_out" '
        f'detection_output_param {{ {detection} }} }}\n')


def vgg_ssd_like(size=96, num_classes=5):
    """VGG-SSD300's layer set, small: conv4_3 with Normalize, dilated fc6, extra layers."""
    text = f'name: "vgg_ssd_small" input: "data" input_shape {{ dim: 1 dim: 3 dim: {size} dim: {size} }}\n'
    text += _conv("conv1", "data", 8) + _relu("conv1")
    text += ('layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" '
             'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n')
    text += _conv("conv4_3", "pool1", 16) + _relu("conv4_3")
    text += ('layer { name: "conv4_3_norm" type: "Normalize" bottom: "conv4_3" top: "conv4_3_norm" '
             'norm_param { across_spatial: false channel_shared: false '
             'scale_filler { type: "constant" value: 20 } } }\n')
    text += ('layer { name: "pool5" type: "Pooling" bottom: "conv4_3" top: "pool5" '
             'pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }\n')
    text += _conv("fc7", "pool5", 16, pad=2, dilation=2) + _relu("fc7")
    text += _conv("conv6_2", "fc7", 16, stride=2) + _relu("conv6_2")
    text += _conv("conv7_2", "conv6_2", 16, k=3, pad=0) + _relu("conv7_2")
    common = "aspect_ratio: 2 flip: true clip: false variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 offset: 0.5"
    text += _head("conv4_3_norm", 4, num_classes, f"min_size: 10 max_size: 20 {common} step: 2")
    text += _head("fc7", 6, num_classes, f"min_size: 20 max_size: 40 aspect_ratio: 3 {common} step: 4")
    text += _head("conv6_2", 6, num_classes, f"min_size: 40 max_size: 60 aspect_ratio: 3 {common}")
    text += _head("conv7_2", 4, num_classes, f"min_size: 60 max_size: 90 {common} img_size: {size}")
    return text + _ssd_tail(["conv4_3_norm", "fc7", "conv6_2", "conv7_2"], num_classes,
                            f"num_classes: {num_classes} share_location: true background_label_id: 0 "
                            "nms_param { nms_threshold: 0.45 top_k: 60 } code_type: CENTER_SIZE "
                            "keep_top_k: 30 confidence_threshold: 0.05")


def res10_ssd_like(size=80):
    """OpenCV's res10_300x300 face detector's layer set, small: BN/Scale residual blocks,
    Normalize with a shared scale, clipped priors, two classes (background, face)."""
    text = f'name: "res10_small" input: "data" input_shape {{ dim: 1 dim: 3 dim: {size} dim: {size} }}\n'
    text += _conv("conv1", "data", 8, k=7, pad=3, stride=2, bias=True) + _bn_scale("conv1") + _relu("conv1")
    text += ('layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" '
             'pooling_param { pool: MAX kernel_size: 3 stride: 2 } }\n')
    text += _conv("b1_a", "pool1", 8, bias=False) + _bn_scale("b1_a") + _relu("b1_a")
    text += _conv("b1_b", "b1_a", 8, bias=False) + _bn_scale("b1_b")
    text += ('layer { name: "b1" type: "Eltwise" bottom: "pool1" bottom: "b1_b" top: "b1" }\n'
             + _relu("b1"))
    text += ('layer { name: "b1_norm" type: "Normalize" bottom: "b1" top: "b1_norm" '
             'norm_param { across_spatial: false channel_shared: true '
             'scale_filler { type: "constant" value: 10 } } }\n')
    text += _conv("b2", "b1", 16, stride=2) + _bn_scale("b2") + _relu("b2")
    common = "clip: true flip: true variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2"
    # two min sizes x ratio 1, plus two max sizes: 4 priors per cell
    text += _head("b1_norm", 4, 2, "min_size: 12 min_size: 24 max_size: 30 max_size: 40 "
                  f"aspect_ratio: 1 {common}")
    text += _head("b2", 2, 2, f"min_size: 32 max_size: 64 {common}")
    return text + _ssd_tail(["b1_norm", "b2"], 2,
                            "num_classes: 2 share_location: true background_label_id: 0 "
                            "nms_param { nms_threshold: 0.3 top_k: 40 } code_type: CENTER_SIZE "
                            "keep_top_k: 20 confidence_threshold: 0.01")


def randomize(net, seed=0):
    """Weights with sane scales: He-normal convolutions, BatchNorm stats with variance ~1."""
    rng = np.random.default_rng(seed)
    types = {layer.name: layer.type for layer in net.layers}
    for name, blobs in net.params.items():
        if types[name] == "BatchNorm":
            blobs[0].data[...] = rng.uniform(-0.1, 0.1, blobs[0].shape)
            blobs[1].data[...] = rng.uniform(0.5, 1.5, blobs[1].shape)
            blobs[2].data[...] = 1
        elif types[name] in ("Scale", "Normalize"):
            for b in blobs:
                b.data[...] = rng.uniform(0.8, 1.2, b.shape)
        else:
            w = blobs[0]
            # Small heads keep scores off 1.0 (no ties) and decoded boxes near the image.
            gain = 0.05 if "_mbox_" in name else 1.0
            w.data[...] = rng.normal(0, gain * np.sqrt(2.0 / np.prod(w.shape[1:])), w.shape)
            for b in blobs[1:]:
                b.data[...] = rng.uniform(-0.1, 0.1, b.shape)


def _net(tmp_path, text_or_path):
    path = text_or_path if isinstance(text_or_path, pathlib.Path) else tmp_path / "net.prototxt"
    if not isinstance(text_or_path, pathlib.Path):
        path.write_text(text_or_path)
    net = minicaffe.Net(str(path), minicaffe.TEST)
    randomize(net)
    x = np.random.default_rng(1).uniform(-1, 1, net.blobs["data"].shape).astype(np.float32)
    net.blobs["data"].data[...] = x
    return path, net, x


NETS = {"mobilenet_ssd": MOBILENET_SSD, "vgg_ssd_like": vgg_ssd_like(), "res10_ssd_like": res10_ssd_like()}


@pytest.mark.parametrize("which", sorted(NETS))
def test_ssd_net_runs_forward(tmp_path, which):
    _, net, _ = _net(tmp_path, NETS[which])
    det = net.forward()["detection_out"]
    assert det.dtype == np.float32 and det.shape[:2] == (1, 1) and det.shape[3] == 7
    rows = det[0, 0]
    assert len(rows) > 0 and np.all(rows[:, 0] == 0)
    assert np.all(rows[:, 1] >= 1)             # background never reported
    assert np.all(np.diff(rows[:, 1]) >= 0)   # SSD's order: by label, then score
    assert np.isfinite(net.blobs["mbox_loc"].data).all()


@pytest.mark.parametrize("which", sorted(NETS))
def test_ssd_net_equals_opencv(tmp_path, which):
    cv2 = pytest.importorskip("cv2", reason="OpenCV dnn (extra `reference`) is the fork-layer reference")
    path, net, x = _net(tmp_path, NETS[which])
    net.forward()
    weights = tmp_path / "net.caffemodel"
    net.save(str(weights))
    ref = cv2.dnn.readNetFromCaffe(str(path), str(weights))
    ref.setInput(x)
    names = ["mbox_loc", "mbox_conf_flatten", "mbox_priorbox", "detection_out"]
    outs = dict(zip(names, ref.forward(names)))
    for name in names[:3]:
        mine = net.blobs[name].data
        theirs = outs[name].reshape(mine.shape)
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max(),
                                   err_msg=name)
    # OpenCV lists the kept detections by score, SSD by label, and OpenCV pads its top with
    # zero rows (label 0, the background): compare the detections as sets.
    mine = net.blobs["detection_out"].data[0, 0]
    theirs = outs["detection_out"][0, 0]
    theirs = theirs[(theirs[:, 1] != 0) | (theirs[:, 2] != 0)]
    key = np.lexsort((mine[:, 3], -mine[:, 2], mine[:, 1]))
    key_ref = np.lexsort((theirs[:, 3], -theirs[:, 2], theirs[:, 1]))
    assert len(mine) == len(theirs)
    np.testing.assert_array_equal(mine[key, :2], theirs[key_ref, :2])
    np.testing.assert_allclose(mine[key, 2:], theirs[key_ref, 2:], rtol=1e-4, atol=1e-5)


def _opencv_single_layer(tmp_path, layer_text, inputs):
    """Run one layer fed by Input blobs in minicaffe and in OpenCV dnn; (mine, theirs)."""
    cv2 = pytest.importorskip("cv2", reason="OpenCV dnn (extra `reference`) is the fork-layer reference")
    names = list(inputs)
    head = "".join(f'input: "{n}" input_shape {{ {" ".join(f"dim: {d}" for d in a.shape)} }}\n'
                   for n, a in inputs.items())
    path = tmp_path / "layer.prototxt"
    path.write_text(f'name: "one"\n{head}layer {{ name: "out" top: "out" '
                    + " ".join(f'bottom: "{n}"' for n in names) + f" {layer_text} }}\n")
    net = minicaffe.Net(str(path), minicaffe.TEST)
    randomize(net)
    for n, a in inputs.items():
        net.blobs[n].data[...] = a
    mine = net.forward()["out"].copy()
    weights = tmp_path / "layer.caffemodel"
    net.save(str(weights))
    ref = cv2.dnn.readNetFromCaffe(str(path), str(weights))
    for n, a in inputs.items():
        ref.setInput(a, n)
    return mine, ref.forward("out")


@pytest.mark.parametrize("params", [
    "min_size: 30 max_size: 60 aspect_ratio: 2 aspect_ratio: 3 flip: true clip: false "
    "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2",
    "min_size: 16 min_size: 32 aspect_ratio: 2 flip: false clip: true variance: 0.2",
    # OpenCV 4.10 clips unless told not to and takes the image size from bottom[1] (SSD's
    # img_size/img_h/img_w are covered by the loop reference in tests/layers/test_detection.py).
    "min_size: 40 max_size: 80 aspect_ratio: 2 step: 20 offset: 0.3 clip: false "
    "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2",
])
def test_priorbox_equals_opencv(tmp_path, params):
    feat = np.zeros((1, 4, 4, 6), np.float32)
    image = np.zeros((1, 3, 96, 128), np.float32)
    mine, theirs = _opencv_single_layer(tmp_path, f'type: "PriorBox" prior_box_param {{ {params} }}',
                                        {"feat": feat, "image": image})
    np.testing.assert_allclose(mine, theirs.reshape(mine.shape), rtol=1e-5, atol=1e-6)


# OpenCV 4.10 refuses across_spatial with a per-channel scale; the loop reference covers it.
@pytest.mark.parametrize("across,shared", [(True, True), (False, True), (False, False)])
def test_normalize_equals_opencv(tmp_path, across, shared):
    x = np.random.default_rng(3).uniform(-1, 1, (2, 5, 3, 4)).astype(np.float32)
    mine, theirs = _opencv_single_layer(
        tmp_path, f'type: "Normalize" norm_param {{ across_spatial: {str(across).lower()} '
                  f'channel_shared: {str(shared).lower()} eps: 1e-6 }}', {"x": x})
    np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-6)


# (background_label_id -1 trips OpenCV 4.10 up; the loop reference covers it.)
@pytest.mark.parametrize("code,share,background", [("CENTER_SIZE", True, 0), ("CORNER", True, 0),
                                                   ("CENTER_SIZE", False, 0), ("CORNER", True, 2)])
def test_detection_output_equals_opencv(tmp_path, code, share, background):
    from tests.layers.test_detection import _detection_inputs
    num_classes = 4
    loc, conf, prior = _detection_inputs(2, 50, num_classes, share, seed=11)
    # cv2 reads a numpy array of 3 axes or fewer as an image with channels: pass 4 axes.
    loc, conf, prior = loc[..., None, None], conf[..., None, None], prior[..., None]
    mine, theirs = _opencv_single_layer(
        tmp_path, f'type: "DetectionOutput" detection_output_param {{ num_classes: {num_classes} '
                  f'share_location: {str(share).lower()} background_label_id: {background} '
                  f'code_type: {code} nms_param {{ nms_threshold: 0.4 top_k: 20 }} keep_top_k: 25 '
                  'confidence_threshold: 0.15 }', {"loc": loc, "conf": conf, "prior": prior})
    mine, theirs = mine[0, 0], theirs[0, 0]
    theirs = theirs[np.any(theirs != 0, axis=1)]   # OpenCV's zero padding rows
    key = np.lexsort((mine[:, 3], -mine[:, 2], mine[:, 1], mine[:, 0]))
    key_ref = np.lexsort((theirs[:, 3], -theirs[:, 2], theirs[:, 1], theirs[:, 0]))
    assert len(mine) == len(theirs) > 0
    np.testing.assert_array_equal(mine[key, :2], theirs[key_ref, :2])
    np.testing.assert_allclose(mine[key, 2:], theirs[key_ref, 2:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("which", sorted(NETS))
def test_ssd_net_inference_mode_equals_plain(tmp_path, which):
    path, net, x = _net(tmp_path, NETS[which])
    plain = net.forward()["detection_out"].copy()
    net.save(str(tmp_path / "w.caffemodel"))
    inference = minicaffe.Net(str(path), minicaffe.TEST, weights=str(tmp_path / "w.caffemodel"),
                              inference=True)
    inference.blobs["data"].data[...] = x
    folded = inference.forward()["detection_out"]
    assert folded.shape == plain.shape
    np.testing.assert_allclose(folded, plain, rtol=1e-4, atol=1e-5)
