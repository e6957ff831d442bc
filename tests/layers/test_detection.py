"""SSD's PriorBox, DetectionOutput, Normalize, Permute: loop references, gradients, bad params."""
import itertools
import math

import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe import Blob, LayerError, create_layer
from minicaffe.proto import caffe_pb2
from tests.gradient_check import check_gradient, make_blobs

TEST = caffe_pb2.TEST
F64 = np.float64


def layer_from(text, name="det"):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    param.name = name
    return create_layer(param, TEST)


def rand(*shape, seed=0, low=-1.0, high=1.0):
    return np.random.default_rng(seed).uniform(low, high, shape)


def forward(layer, arrays, dtype=np.float32):
    bottoms = make_blobs(*arrays, dtype=dtype)
    top = Blob(dtype=dtype)
    layer.setup(bottoms, [top])
    layer.forward(bottoms, [top])
    return top.data.copy()


# -- Permute ----------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [[0, 2, 3, 1], [0, 3], [1, 0, 2, 3], [3, 2, 1, 0], []])
def test_permute_matches_loop(order):
    x = rand(2, 3, 4, 5)
    y = forward(layer_from(f'type: "Permute" permute_param {{ {" ".join(f"order: {o}" for o in order)} }}'), [x])
    full = order + [a for a in range(4) if a not in order]
    ref = np.empty([x.shape[a] for a in full])
    for idx in np.ndindex(ref.shape):
        src = [0] * 4
        for k, a in enumerate(full):
            src[a] = idx[k]
        ref[idx] = x[tuple(src)]
    np.testing.assert_array_equal(y, ref.astype(np.float32))


def test_permute_gradient():
    check_gradient(layer_from('type: "Permute" permute_param { order: 0 order: 2 order: 3 order: 1 }'),
                   make_blobs(rand(2, 3, 2, 4)), [Blob(dtype=F64)])


@pytest.mark.parametrize("order,message", [("order: 0 order: 0", "duplicate"),
                                           ("order: 5", "out of range"),
                                           ("order: 0 order: 1 order: 2 order: 3 order: 4", "axes")])
def test_permute_bad_order(order, message):
    with pytest.raises(LayerError, match=rf"layer 'det' \(Permute\).*{message}"):
        forward(layer_from(f'type: "Permute" permute_param {{ {order} }}'), [rand(1, 2, 3, 4)])


# -- Normalize --------------------------------------------------------------------------------
def reference_normalize(x, scale, across_spatial, channel_shared, eps):
    n_, c_, h_, w_ = x.shape
    y = np.empty_like(x)
    for n in range(n_):
        if across_spatial:
            norm = math.sqrt(sum(v * v for v in x[n].ravel()) + eps)
        for h, w in itertools.product(range(h_), range(w_)):
            if not across_spatial:
                norm = math.sqrt(sum(x[n, c, h, w] ** 2 for c in range(c_)) + eps)
            for c in range(c_):
                s = scale[0] if channel_shared else scale[c]
                y[n, c, h, w] = s * x[n, c, h, w] / norm
    return y


NORM_CASES = list(itertools.product([True, False], [True, False]))


@pytest.mark.parametrize("across,shared", NORM_CASES)
def test_normalize_matches_loop(across, shared):
    x = rand(2, 3, 3, 4, seed=2)
    text = (f'type: "Normalize" norm_param {{ across_spatial: {str(across).lower()} '
            f'channel_shared: {str(shared).lower()} eps: 0.01 '
            f'scale_filler {{ type: "uniform" min: 0.5 max: 2 }} }}')
    layer = layer_from(text)
    y = forward(layer, [x], dtype=F64)
    scale = layer.blobs[0].data
    assert scale.shape == ((1,) if shared else (3,))
    np.testing.assert_allclose(y, reference_normalize(x, scale, across, shared, layer.eps), rtol=1e-12)


def test_normalize_default_scale_is_one_and_float32():
    x = rand(1, 4, 2, 2, seed=3).astype(np.float32)
    layer = layer_from('type: "Normalize" norm_param { across_spatial: false }')
    y = forward(layer, [x])
    assert y.dtype == np.float32 and layer.blobs[0].data.tolist() == [1.0]
    np.testing.assert_allclose((y.astype(F64) ** 2).sum(axis=1), 1, rtol=1e-5)


@pytest.mark.parametrize("across,shared", NORM_CASES)
def test_normalize_gradient(across, shared):
    text = (f'type: "Normalize" norm_param {{ across_spatial: {str(across).lower()} '
            f'channel_shared: {str(shared).lower()} eps: 0.001 '
            f'scale_filler {{ type: "uniform" min: 0.5 max: 2 }} }}')
    check_gradient(layer_from(text), make_blobs(rand(2, 3, 2, 3, seed=4)), [Blob(dtype=F64)])


def test_normalize_bad_params():
    with pytest.raises(LayerError, match=r"layer 'det' \(Normalize\).*eps"):
        forward(layer_from('type: "Normalize" norm_param { eps: -1 }'), [rand(1, 2, 2, 2)])


# -- PriorBox ---------------------------------------------------------------------------------
def reference_priorbox(fh, fw, ih, iw, min_sizes, max_sizes, ratios, flip, clip, variance,
                       img=None, step=None, offset=0.5):
    ars = [1.0]
    for r in ratios:
        if all(abs(r - a) >= 1e-6 for a in ars):
            ars.append(r)
            if flip:
                ars.append(1 / r)
    img_h, img_w = img if img else (ih, iw)
    step_h, step_w = step if step else (img_h / fh, img_w / fw)
    boxes = []
    for h in range(fh):
        for w in range(fw):
            cx, cy = (w + offset) * step_w, (h + offset) * step_h
            for s, m in enumerate(min_sizes):
                m = int(m)
                sizes = [(m, m)]
                if max_sizes:
                    sizes.append((math.sqrt(m * int(max_sizes[s])),) * 2)
                sizes += [(m * math.sqrt(a), m / math.sqrt(a)) for a in ars if abs(a - 1) >= 1e-6]
                for bw, bh in sizes:
                    boxes += [(cx - bw / 2) / img_w, (cy - bh / 2) / img_h,
                              (cx + bw / 2) / img_w, (cy + bh / 2) / img_h]
    boxes = np.array(boxes)
    if clip:
        boxes = np.clip(boxes, 0, 1)
    var = np.tile(variance or [0.1], len(boxes) // (len(variance) if variance else 1))
    return np.stack([boxes, var])[None]


PRIOR_CASES = [
    dict(min_sizes=[30.0], max_sizes=[60.0], ratios=[2.0], flip=True, clip=False, variance=[0.1, 0.1, 0.2, 0.2]),
    dict(min_sizes=[20.5, 40.0], max_sizes=[], ratios=[2.0, 3.0, 2.0], flip=False, clip=True, variance=[0.2]),
    dict(min_sizes=[60.0], max_sizes=[], ratios=[], flip=True, clip=False, variance=[],
         img=(300, 300), step=(8, 8), offset=0.25),
    dict(min_sizes=[50.0], max_sizes=[100.0], ratios=[1.0, 0.5], flip=True, clip=True,
         variance=[0.1, 0.1, 0.2, 0.2], img=(240, 320), step=(16.0, 12.0)),
]


def _prior_text(c):
    parts = [f"min_size: {m}" for m in c["min_sizes"]] + [f"max_size: {m}" for m in c["max_sizes"]]
    parts += [f"aspect_ratio: {r}" for r in c["ratios"]] + [f"variance: {v}" for v in c["variance"]]
    parts += [f"flip: {str(c['flip']).lower()}", f"clip: {str(c['clip']).lower()}"]
    if "img" in c:
        parts += ([f"img_size: {c['img'][0]}"] if c["img"][0] == c["img"][1]
                  else [f"img_h: {c['img'][0]}", f"img_w: {c['img'][1]}"])
    if "step" in c:
        parts += ([f"step: {c['step'][0]}"] if c["step"][0] == c["step"][1]
                  else [f"step_h: {c['step'][0]}", f"step_w: {c['step'][1]}"])
    if "offset" in c:
        parts.append(f"offset: {c['offset']}")
    return 'type: "PriorBox" prior_box_param { ' + " ".join(parts) + " }"


@pytest.mark.parametrize("case", PRIOR_CASES)
def test_priorbox_matches_loop(case):
    feat, image = np.zeros((1, 2, 3, 5)), np.zeros((1, 3, 60, 90))
    y = forward(layer_from(_prior_text(case)), [feat, image])
    ref = reference_priorbox(3, 5, 60, 90, **case)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("params,message", [
    ("", "must provide min_size"),
    ("min_size: -1", "min_size must be positive"),
    ("min_size: 30 max_size: 20", "greater than"),
    ("min_size: 30 max_size: 40 max_size: 50", "one per min_size"),
    ("min_size: 30 variance: 0.1 variance: 0.2", "1 or 4 variance"),
    ("min_size: 30 variance: 0", "variance must be positive"),
    ("min_size: 30 img_size: 300 img_h: 300 img_w: 300", "not both"),
    ("min_size: 30 step_h: 8", "step_h and step_w"),
])
def test_priorbox_bad_params(params, message):
    with pytest.raises(LayerError, match=rf"layer 'det' \(PriorBox\).*{message}"):
        forward(layer_from(f'type: "PriorBox" prior_box_param {{ {params} }}'),
                [np.zeros((1, 1, 2, 2)), np.zeros((1, 3, 8, 8))])


# -- DetectionOutput --------------------------------------------------------------------------
def _decode_one(p, v, l, code, encoded):
    if encoded:
        v = [1, 1, 1, 1]
    if code == 1:      # CORNER
        return [p[k] + v[k] * l[k] for k in range(4)]
    pw, ph = p[2] - p[0], p[3] - p[1]
    if code == 2:      # CENTER_SIZE
        cx = v[0] * l[0] * pw + (p[0] + p[2]) / 2
        cy = v[1] * l[1] * ph + (p[1] + p[3]) / 2
        w, h = math.exp(v[2] * l[2]) * pw, math.exp(v[3] * l[3]) * ph
        return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    size = [pw, ph, pw, ph]
    return [p[k] + v[k] * l[k] * size[k] for k in range(4)]


def _iou(a, b):
    def area(r):
        return 0 if r[2] < r[0] or r[3] < r[1] else (r[2] - r[0]) * (r[3] - r[1])
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return 0.0
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (area(a) + area(b) - inter)


def reference_detection_output(loc, conf, prior, num_classes, share, background, code, encoded,
                               threshold, nms_threshold, top_k, keep_top_k, eta=1.0):
    num, num_priors = loc.shape[0], prior.shape[2] // 4
    nl = 1 if share else num_classes
    rows = []
    for i in range(num):
        decoded = {}
        for c in range(nl):
            decoded[c] = [_decode_one(prior[0, 0, 4 * p:4 * p + 4], prior[0, 1, 4 * p:4 * p + 4],
                                      loc[i, (p * nl + c) * 4:(p * nl + c) * 4 + 4], code, encoded)
                          for p in range(num_priors)]
        picks = []
        for c in range(num_classes):
            if c == background:
                continue
            scores = [conf[i, p * num_classes + c] for p in range(num_priors)]
            cand = sorted([p for p in range(num_priors) if scores[p] > threshold],
                          key=lambda p: -scores[p])
            if top_k > -1:
                cand = cand[:top_k]
            boxes = decoded[0 if share else c]
            kept, thr = [], nms_threshold
            for p in cand:
                if all(_iou(boxes[p], boxes[k]) <= thr for k in kept):
                    kept.append(p)
                    if eta < 1 and thr > 0.5:
                        thr *= eta
            picks += [(c, p, scores[p]) for p in kept]
        if -1 < keep_top_k < len(picks):
            picks = sorted(picks, key=lambda t: -t[2])[:keep_top_k]
            picks.sort(key=lambda t: t[0])
        for c, p, s in picks:
            rows.append([i, c, s] + decoded[0 if share else c][p])
    if not rows:
        return np.array([[j] + [-1] * 6 for j in range(num)])
    return np.array(rows)


def _detection_inputs(num, num_priors, num_classes, share, seed):
    rng = np.random.default_rng(seed)
    centers = rng.uniform(0.2, 0.8, (num_priors, 2))
    sizes = rng.uniform(0.1, 0.4, (num_priors, 2))
    boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1)
    variances = np.tile([0.1, 0.1, 0.2, 0.2], (num_priors, 1))
    prior = np.stack([boxes.ravel(), variances.ravel()])[None]
    nl = 1 if share else num_classes
    loc = rng.normal(0, 0.5, (num, num_priors * nl * 4))
    logits = rng.normal(0, 2, (num, num_priors, num_classes))
    conf = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    return [a.astype(np.float32) for a in (loc, conf.reshape(num, -1), prior)]


DET_CASES = [
    dict(code="CENTER_SIZE", share=True, background=0, encoded=False, threshold=0.2, nms=0.45, top_k=30, keep=20),
    dict(code="CORNER", share=False, background=0, encoded=False, threshold=0.1, nms=0.3, top_k=-1, keep=-1),
    dict(code="CORNER_SIZE", share=True, background=-1, encoded=True, threshold=0.05, nms=0.5, top_k=10, keep=7),
    dict(code="CENTER_SIZE", share=False, background=2, encoded=True, threshold=None, nms=0.6, top_k=5, keep=50),
    dict(code="CENTER_SIZE", share=True, background=0, encoded=False, threshold=0.99, nms=0.45, top_k=-1, keep=10),
]


def _det_text(c, num_classes):
    parts = [f"num_classes: {num_classes}", f"share_location: {str(c['share']).lower()}",
             f"background_label_id: {c['background']}", f"code_type: {c['code']}",
             f"variance_encoded_in_target: {str(c['encoded']).lower()}", f"keep_top_k: {c['keep']}",
             f"nms_param {{ nms_threshold: {c['nms']} {'' if c['top_k'] < 0 else 'top_k: %d' % c['top_k']} "
             f"{'eta: %s' % c['eta'] if 'eta' in c else ''} }}"]
    if c["threshold"] is not None:
        parts.append(f"confidence_threshold: {c['threshold']}")
    return 'type: "DetectionOutput" detection_output_param { ' + " ".join(parts) + " }"


@pytest.mark.parametrize("case", DET_CASES + [dict(DET_CASES[0], eta=0.8, nms=0.9, top_k=-1, keep=-1)])
def test_detection_output_matches_loop(case):
    num_classes, num_priors = 4, 40
    loc, conf, prior = _detection_inputs(2, num_priors, num_classes, case["share"], seed=7)
    y = forward(layer_from(_det_text(case, num_classes)), [loc, conf, prior])
    code = caffe_pb2.PriorBoxParameter.CodeType.Value(case["code"])
    threshold = -np.finfo(np.float32).max if case["threshold"] is None else case["threshold"]
    ref = reference_detection_output(loc.astype(F64), conf.astype(F64), prior.astype(F64),
                                     num_classes, case["share"], case["background"], code,
                                     case["encoded"], threshold, case["nms"], case["top_k"],
                                     case["keep"], case.get("eta", 1.0))
    assert y.shape == (1, 1) + ref.shape
    np.testing.assert_allclose(y[0, 0], ref, rtol=1e-5, atol=1e-6)


def test_nms_suppresses_overlaps_and_keeps_order():
    from minicaffe.layers.detection import nms
    boxes = np.array([[0, 0, 1, 1], [0, 0, 1, 0.9], [2, 2, 3, 3], [0.5, 0, 1.5, 1]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.95], np.float32)
    assert nms(boxes, scores, 0.0, 0.5) == [3, 0, 2]
    assert nms(boxes, scores, 0.75, 0.5) == [3, 0]
    assert nms(boxes, scores, 0.0, 0.5, top_k=1) == [3]


@pytest.mark.parametrize("params,message", [
    ("", "must specify num_classes"),
    ("num_classes: 3 nms_param { nms_threshold: -0.1 }", "nms_threshold must be non negative"),
    ("num_classes: 3 nms_param { eta: 0 }", "eta must be in"),
    ("num_classes: 3 save_output_param { output_directory: '/tmp/x' }", "not supported"),
    ("num_classes: 5", "must match number of confidence"),
    ("num_classes: 3 share_location: false", "must match number of location"),
])
def test_detection_output_bad_params(params, message):
    loc, conf, prior = _detection_inputs(1, 6, 3, True, seed=1)
    with pytest.raises(LayerError, match=rf"layer 'det' \(DetectionOutput\).*{message}"):
        forward(layer_from(f'type: "DetectionOutput" detection_output_param {{ {params} }}'),
                [loc, conf, prior])
