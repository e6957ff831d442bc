"""Loss layers and Accuracy: forward vs plain-loop references, gradients, dtypes, bad params."""
import math

import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe import Blob, LayerError, create_layer
from minicaffe.proto import caffe_pb2
from tests.gradient_check import check_gradient, make_blobs

R = np.random.default_rng(0)


def make_layer(text):
    return create_layer(text_format.Parse(text, caffe_pb2.LayerParameter()))


def run(layer, bottom, num_top=1, loss_weight=None):
    """Set up and run forward; returns the tops."""
    top = [Blob((), dtype=bottom[0].dtype) for _ in range(num_top)]
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    if loss_weight is not None:
        top[0].diff[...] = loss_weight
    return top


def labels_for(shape, num_classes, ignore=None, frac_ignored=0.3):
    lab = R.integers(0, num_classes, size=shape).astype(float)
    if ignore is not None:
        lab[R.random(shape) < frac_ignored] = ignore
    return lab


NORMS = {"FULL": caffe_pb2.LossParameter.FULL, "VALID": caffe_pb2.LossParameter.VALID,
         "BATCH_SIZE": caffe_pb2.LossParameter.BATCH_SIZE, "NONE": caffe_pb2.LossParameter.NONE}


def ref_normalizer(mode, outer, inner, valid):
    n = {"FULL": outer * inner, "VALID": valid, "BATCH_SIZE": outer, "NONE": 1}[mode]
    return max(1.0, n)


# -- SoftmaxWithLoss -------------------------------------------------------------
def ref_softmax_loss(x, lab, axis, ignore, mode):
    x = np.moveaxis(x, axis, -1)
    outer = int(np.prod(x.shape[:axis]))
    inner = int(np.prod(x.shape[axis:-1]))
    flat = x.reshape(-1, x.shape[-1])
    labels = lab.reshape(-1)
    loss, count = 0.0, 0
    for row, l in zip(flat, labels):
        if ignore is not None and int(l) == ignore:
            continue
        p = np.exp(row - row.max())
        p /= p.sum()
        loss -= math.log(max(p[int(l)], np.finfo(np.float32).tiny))
        count += 1
    return loss / ref_normalizer(mode, outer, inner, count)


@pytest.mark.parametrize("mode", list(NORMS))
@pytest.mark.parametrize("ignore", [None, 1])
def test_softmax_loss_forward_matches_reference(mode, ignore):
    x = R.normal(size=(3, 4, 2, 3)) * 3
    lab = labels_for((3, 1, 2, 3), 4, ignore)
    ign = "" if ignore is None else f"ignore_label: {ignore}"
    layer = make_layer(f'type: "SoftmaxWithLoss" loss_param {{ normalization: {mode} {ign} }}')
    top = run(layer, make_blobs(x, lab))
    assert top[0].shape == ()
    assert top[0].data == pytest.approx(ref_softmax_loss(x, lab, 1, ignore, mode), rel=1e-10)


def test_softmax_loss_other_axis_and_deprecated_normalize():
    x = R.normal(size=(2, 3, 5))
    lab = labels_for((2, 3), 5)
    layer = make_layer('type: "SoftmaxWithLoss" softmax_param { axis: -1 } '
                       'loss_param { normalize: false }')
    top = run(layer, make_blobs(x, lab))
    assert top[0].data == pytest.approx(ref_softmax_loss(x, lab, 2, None, "BATCH_SIZE"))
    layer = make_layer('type: "SoftmaxWithLoss" softmax_param { axis: 2 } '
                       'loss_param { normalize: true }')
    top = run(layer, make_blobs(x, lab))
    assert top[0].data == pytest.approx(ref_softmax_loss(x, lab, 2, None, "VALID"))


def test_softmax_loss_second_top_is_probabilities():
    x = R.normal(size=(2, 3, 2))
    layer = make_layer('type: "SoftmaxWithLoss"')
    top = run(layer, make_blobs(x, labels_for((2, 2), 3)), num_top=2)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(top[1].data, e / e.sum(axis=1, keepdims=True))
    assert layer.loss_weights == [1.0, 0.0]


@pytest.mark.parametrize("mode", list(NORMS))
def test_softmax_loss_gradient(mode):
    x = R.normal(size=(2, 3, 2, 1))
    lab = labels_for((2, 2, 1), 3, ignore=2, frac_ignored=0.4)
    layer = make_layer(f'type: "SoftmaxWithLoss" '
                       f'loss_param {{ normalization: {mode} ignore_label: 2 }}')
    bottom = make_blobs(x, lab)
    check_gradient(layer, bottom, [Blob(dtype=np.float64)], check_bottom=[0])


def test_softmax_loss_backward_scales_by_loss_weight_and_zeroes_ignored():
    x = R.normal(size=(2, 3))
    lab = np.array([1.0, 5.0])
    layer = make_layer('type: "SoftmaxWithLoss" loss_param { ignore_label: 5 }')
    bottom = make_blobs(x, lab)
    top = run(layer, bottom, loss_weight=3.0)
    layer.backward(top, [True, False], bottom)
    p = np.exp(x[0] - x[0].max())
    p /= p.sum()
    p[1] -= 1
    np.testing.assert_allclose(bottom[0].diff[0], 3.0 * p)
    np.testing.assert_array_equal(bottom[0].diff[1], 0)


def test_softmax_loss_float32_stays_float32():
    bottom = make_blobs(R.normal(size=(4, 5)), labels_for((4,), 5), dtype=np.float32)
    layer = make_layer('type: "SoftmaxWithLoss"')
    top = run(layer, bottom, num_top=2)
    layer.backward(top, [True, False], bottom)
    assert top[0].data.dtype == top[1].data.dtype == bottom[0].diff.dtype == np.float32


def test_softmax_loss_rejects_bad_labels_and_label_backprop():
    layer = make_layer('name: "loss" type: "SoftmaxWithLoss"')
    with pytest.raises(LayerError, match="out of range"):
        run(layer, make_blobs(R.normal(size=(2, 3)), [0, 3]))
    with pytest.raises(LayerError, match="out of range"):
        run(make_layer('type: "SoftmaxWithLoss"'), make_blobs(R.normal(size=(2, 3)), [0, -1]))
    with pytest.raises(LayerError, match="number of labels"):
        run(make_layer('type: "SoftmaxWithLoss"'), make_blobs(R.normal(size=(2, 3, 2)), [0, 1]))
    with pytest.raises(LayerError, match="same first dimension"):
        run(make_layer('type: "SoftmaxWithLoss"'), make_blobs(R.normal(size=(2, 3)), [0, 1, 2]))
    bottom = make_blobs(R.normal(size=(2, 3)), [0, 2])
    top = run(layer, bottom)
    assert not layer.allow_force_backward(1) and layer.allow_force_backward(0)
    with pytest.raises(LayerError, match="label"):
        layer.backward(top, [True, True], bottom)


# -- Accuracy --------------------------------------------------------------------
def ref_accuracy(x, lab, k, ignore, axis=1):
    x = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
    num_classes = x.shape[1]
    hits, seen = np.zeros(num_classes), np.zeros(num_classes)
    for row, l in zip(x, lab.reshape(-1)):
        l = int(l)
        if ignore is not None and l == ignore:
            continue
        seen[l] += 1
        rank = sum(1 for c in range(num_classes) if c != l and row[c] >= row[l])
        hits[l] += rank < k
    total = hits.sum() / seen.sum() if seen.sum() else 0.0
    per_class = np.divide(hits, seen, out=np.zeros(num_classes), where=seen > 0)
    return total, per_class


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("ignore", [None, 0])
def test_accuracy_forward(k, ignore):
    x = R.integers(0, 4, size=(10, 5, 3)).astype(float)  # small ints: plenty of ties
    lab = labels_for((10, 3), 5, ignore)
    ign = "" if ignore is None else f"ignore_label: {ignore}"
    layer = make_layer(f'type: "Accuracy" accuracy_param {{ top_k: {k} {ign} }}')
    top = run(layer, make_blobs(x, lab), num_top=2)
    total, per_class = ref_accuracy(x, lab, k, ignore)
    assert top[0].data == pytest.approx(total)
    np.testing.assert_allclose(top[1].data, per_class)
    assert layer.loss_weights == [0.0, 0.0]


def test_accuracy_axis_ties_and_float32():
    x = R.normal(size=(3, 2, 4)).astype(np.float32)
    lab = labels_for((3, 2), 4)
    layer = make_layer('type: "Accuracy" accuracy_param { axis: -1 }')
    top = run(layer, make_blobs(x, lab, dtype=np.float32))
    assert top[0].data.dtype == np.float32
    assert top[0].data == pytest.approx(ref_accuracy(x, lab, 1, None, axis=2)[0])
    # A tie with the true class counts as a better prediction.
    top = run(make_layer('type: "Accuracy"'), make_blobs([[1.0, 1.0], [2.0, 0.0]], [1, 0]))
    assert top[0].data == pytest.approx(0.5)


def test_accuracy_all_ignored_is_zero_and_rejects_bad_params():
    top = run(make_layer('type: "Accuracy" accuracy_param { ignore_label: 1 }'),
              make_blobs(R.normal(size=(2, 3)), [1, 1]))
    assert top[0].data == 0
    with pytest.raises(LayerError, match="top_k"):
        run(make_layer('type: "Accuracy" accuracy_param { top_k: 4 }'),
            make_blobs(R.normal(size=(2, 3)), [0, 1]))
    with pytest.raises(LayerError, match="out of range"):
        run(make_layer('type: "Accuracy"'), make_blobs(R.normal(size=(2, 3)), [0, 7]))
    layer = make_layer('type: "Accuracy"')
    bottom = make_blobs(R.normal(size=(2, 3)), [0, 1])
    top = run(layer, bottom)
    assert not layer.allow_force_backward(0)
    with pytest.raises(LayerError, match="no gradient"):
        layer.backward(top, [True, False], bottom)


# -- EuclideanLoss -------------------------------------------------------------
def test_euclidean_forward_gradient_and_dtype():
    a, b = R.normal(size=(3, 2, 2)), R.normal(size=(3, 4))
    layer = make_layer('type: "EuclideanLoss"')
    top = run(layer, make_blobs(a, b))
    ref = sum((a.reshape(3, 4)[i, j] - b[i, j]) ** 2 for i in range(3) for j in range(4)) / 3 / 2
    assert top[0].data == pytest.approx(ref)
    assert layer.allow_force_backward(1)
    check_gradient(make_layer('type: "EuclideanLoss"'), make_blobs(a, b), [Blob(dtype=np.float64)])
    bottom = make_blobs(a, b, dtype=np.float32)
    top = run(layer, bottom, loss_weight=1.0)
    layer.backward(top, [True, True], bottom)
    assert top[0].data.dtype == bottom[1].diff.dtype == np.float32
    with pytest.raises(LayerError, match="same dimension"):
        run(make_layer('type: "EuclideanLoss"'), make_blobs(a, R.normal(size=(3, 5))))


# -- SigmoidCrossEntropyLoss ---------------------------------------------------
def ref_sigmoid_ce(x, t, ignore, mode):
    loss, count = 0.0, 0
    for xi, ti in zip(x.reshape(-1), t.reshape(-1)):
        if ignore is not None and int(ti) == ignore:
            continue
        s = 1 / (1 + math.exp(-xi))
        loss -= ti * math.log(s) + (1 - ti) * math.log(1 - s)
        count += 1
    return loss / ref_normalizer(mode, x.shape[0], x[0].size, count)


@pytest.mark.parametrize("norm,mode", [
    ("", "BATCH_SIZE"), ("normalization: VALID", "VALID"), ("normalization: FULL", "FULL"),
    ("normalize: true", "VALID"), ("normalize: false", "BATCH_SIZE")])
def test_sigmoid_cross_entropy_forward(norm, mode):
    x = R.normal(size=(3, 2, 2)) * 4
    t = R.random((3, 2, 2))
    layer = make_layer(f'type: "SigmoidCrossEntropyLoss" loss_param {{ {norm} }}')
    top = run(layer, make_blobs(x, t))
    assert top[0].data == pytest.approx(ref_sigmoid_ce(x, t, None, mode), rel=1e-9)
    t[0, 0, 0] = t[2, 1, 0] = -1
    layer = make_layer(f'type: "SigmoidCrossEntropyLoss" loss_param {{ {norm} ignore_label: -1 }}')
    top = run(layer, make_blobs(x, t))
    assert top[0].data == pytest.approx(ref_sigmoid_ce(x, t, -1, mode), rel=1e-9)


def test_sigmoid_cross_entropy_large_inputs_are_finite():
    layer = make_layer('type: "SigmoidCrossEntropyLoss"')
    top = run(layer, make_blobs([[800.0, -800.0]], [[0.0, 1.0]], dtype=np.float32))
    assert top[0].data == pytest.approx(1600.0)


def test_sigmoid_cross_entropy_gradient_and_float32():
    x, t = R.normal(size=(2, 3)), R.random((2, 3))
    t[1, 2] = 9
    layer = make_layer('type: "SigmoidCrossEntropyLoss" '
                       'loss_param { ignore_label: 9 normalization: VALID }')
    check_gradient(layer, make_blobs(x, t), [Blob(dtype=np.float64)], check_bottom=[0])
    bottom = make_blobs(x, t, dtype=np.float32)
    top = run(layer, bottom, loss_weight=1.0)
    layer.backward(top, [True, False], bottom)
    assert top[0].data.dtype == bottom[0].diff.dtype == np.float32
    assert bottom[0].diff[1, 2] == 0
    with pytest.raises(LayerError, match="label"):
        layer.backward(top, [True, True], bottom)
    with pytest.raises(LayerError, match="same count"):
        run(make_layer('type: "SigmoidCrossEntropyLoss"'), make_blobs(x, R.random((2, 4))))


# -- HingeLoss ---------------------------------------------------------------------
def ref_hinge(x, lab, p):
    x = x.reshape(x.shape[0], -1)
    loss = 0.0
    for n in range(x.shape[0]):
        for k in range(x.shape[1]):
            d = 1 if k == int(lab[n]) else -1
            loss += max(0.0, 1 - d * x[n, k]) ** p
    return loss / x.shape[0]


def away_from_kinks(shape):
    """Scores with |1 +/- x| >= 0.1, so the hinge's kink at margin 1 stays out of the check."""
    x = R.uniform(-2, 2, size=shape)
    near = np.abs(np.abs(x) - 1) < 0.1
    x[near] += 0.3
    return x


@pytest.mark.parametrize("norm,p", [("L1", 1), ("L2", 2)])
def test_hinge_forward_and_gradient(norm, p):
    x = away_from_kinks((4, 3, 1, 1))
    lab = labels_for((4,), 3)
    layer = make_layer(f'type: "HingeLoss" hinge_loss_param {{ norm: {norm} }}')
    top = run(layer, make_blobs(x, lab))
    assert top[0].data == pytest.approx(ref_hinge(x, lab, p))
    check_gradient(make_layer(f'type: "HingeLoss" hinge_loss_param {{ norm: {norm} }}'),
                   make_blobs(x, lab), [Blob(dtype=np.float64)], check_bottom=[0])


def test_hinge_float32_and_rejections():
    layer = make_layer('type: "HingeLoss"')
    bottom = make_blobs(R.normal(size=(3, 4)), [0, 1, 3], dtype=np.float32)
    top = run(layer, bottom, loss_weight=1.0)
    layer.backward(top, [True, False], bottom)
    assert top[0].data.dtype == bottom[0].diff.dtype == np.float32
    with pytest.raises(LayerError, match="label"):
        layer.backward(top, [True, True], bottom)
    with pytest.raises(LayerError, match="out of range"):
        run(make_layer('type: "HingeLoss"'), make_blobs(R.normal(size=(2, 4)), [0, 4]))


# -- ContrastiveLoss -------------------------------------------------------------
def ref_contrastive(a, b, y, margin, legacy):
    loss = 0.0
    for ai, bi, yi in zip(a.reshape(len(a), -1), b.reshape(len(b), -1), y.reshape(-1)):
        d2 = float(((ai - bi) ** 2).sum())
        if int(yi):
            loss += d2
        elif legacy:
            loss += max(margin - d2, 0.0)
        else:
            loss += max(margin - math.sqrt(d2), 0.0) ** 2
    return loss / len(a) / 2


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_forward_and_gradient(legacy):
    a, b = R.uniform(-1, 1, size=(5, 2, 1, 1)), R.uniform(-1, 1, size=(5, 2, 1, 1))
    y = np.array([1, 0, 0, 1, 0], dtype=float).reshape(5, 1, 1, 1)
    text = (f'type: "ContrastiveLoss" contrastive_loss_param '
            f'{{ margin: 1.5 legacy_version: {str(legacy).lower()} }}')
    top = run(make_layer(text), make_blobs(a, b, y))
    assert top[0].data == pytest.approx(ref_contrastive(a, b, y, 1.5, legacy))
    check_gradient(make_layer(text), make_blobs(a, b, y), [Blob(dtype=np.float64)], check_bottom=[0, 1],
                   threshold=1e-2)


def test_contrastive_accepts_2d_float32_and_rejects_bad_shapes():
    layer = make_layer('type: "ContrastiveLoss"')
    bottom = make_blobs(R.normal(size=(3, 4)), R.normal(size=(3, 4)), [1, 0, 1], dtype=np.float32)
    top = run(layer, bottom, loss_weight=1.0)
    layer.backward(top, [True, True, False], bottom)
    assert top[0].data.dtype == bottom[1].diff.dtype == np.float32
    assert not layer.allow_force_backward(2) and layer.allow_force_backward(1)
    with pytest.raises(LayerError, match="label"):
        layer.backward(top, [True, True, True], bottom)
    with pytest.raises(LayerError, match="channels"):
        run(make_layer('type: "ContrastiveLoss"'),
            make_blobs(R.normal(size=(3, 4)), R.normal(size=(3, 5)), [1, 0, 1]))
    with pytest.raises(LayerError, match="1, 1"):
        run(make_layer('type: "ContrastiveLoss"'),
            make_blobs(R.normal(size=(3, 4, 2)), R.normal(size=(3, 4, 2)), [1, 0, 1]))


# -- InfogainLoss ------------------------------------------------------------------
def ref_infogain(x, lab, h, ignore, mode, axis=1):
    xm = np.moveaxis(x, axis, -1)
    outer = int(np.prod(x.shape[:axis]))
    inner = int(np.prod(x.shape[axis + 1:]))
    loss, count = 0.0, 0
    for row, l in zip(xm.reshape(-1, x.shape[axis]), lab.reshape(-1)):
        if ignore is not None and int(l) == ignore:
            continue
        p = np.exp(row - row.max())
        p /= p.sum()
        loss -= sum(h[int(l), k] * math.log(max(p[k], 1e-20)) for k in range(len(p)))
        count += 1
    return loss / ref_normalizer(mode, outer, inner, count)


def write_binaryproto(path, array):
    blob = Blob(array.shape, dtype=np.float32)
    blob.data[...] = array
    path.write_bytes(blob.to_proto().SerializeToString())
    return str(path)


@pytest.mark.parametrize("mode", ["VALID", "FULL", "BATCH_SIZE", "NONE"])
def test_infogain_forward_with_h_bottom_and_file(mode, tmp_path):
    x = R.uniform(-0.5, 2, size=(4, 3, 2))
    lab = labels_for((4, 2), 3, ignore=1)
    h = R.uniform(0.1, 2, size=(3, 3))
    text = f'type: "InfogainLoss" loss_param {{ normalization: {mode} ignore_label: 1 }}'
    top = run(make_layer(text), make_blobs(x, lab, h), num_top=2)
    ref = ref_infogain(x, lab, h, 1, mode)
    assert top[0].data == pytest.approx(ref)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(top[1].data, e / e.sum(axis=1, keepdims=True))
    h32 = h.astype(np.float32)
    source = write_binaryproto(tmp_path / "h.binaryproto", h32)
    layer = make_layer(text + f' infogain_loss_param {{ source: "{source}" }}')
    top = run(layer, make_blobs(x, lab))
    assert top[0].data == pytest.approx(ref_infogain(x, lab, h32.astype(float), 1, mode))


def test_infogain_axis_and_gradient():
    x = R.uniform(-0.5, 2, size=(2, 2, 3))
    lab = labels_for((2, 2), 3)
    h = R.uniform(0.1, 2, size=(3, 3))
    text = 'type: "InfogainLoss" infogain_loss_param { axis: 2 }'
    top = run(make_layer(text), make_blobs(x, lab, h))
    assert top[0].data == pytest.approx(ref_infogain(x, lab, h, None, "VALID", axis=2))
    layer = make_layer('type: "InfogainLoss" loss_param { ignore_label: 0 }')
    lab = np.array([[0.0, 2.0], [1.0, 2.0]])
    check_gradient(layer, make_blobs(R.uniform(-0.5, 2, size=(2, 3, 2)), lab, h), [Blob(dtype=np.float64)],
                   check_bottom=[0], stepsize=1e-4, threshold=2e-2)


def test_infogain_float32_and_rejections(tmp_path):
    h = np.eye(3)
    layer = make_layer('type: "InfogainLoss"')
    bottom = make_blobs(R.normal(size=(2, 3)), [0, 2], h, dtype=np.float32)
    top = run(layer, bottom, loss_weight=1.0)
    layer.backward(top, [True, False, False], bottom)
    assert top[0].data.dtype == bottom[0].diff.dtype == np.float32
    assert not layer.allow_force_backward(1) and not layer.allow_force_backward(2)
    with pytest.raises(LayerError, match="bottom\\[2\\]"):
        layer.backward(top, [True, False, True], bottom)
    with pytest.raises(LayerError, match="source"):
        run(make_layer('type: "InfogainLoss"'), make_blobs(R.normal(size=(2, 3)), [0, 2]))
    with pytest.raises(LayerError, match="cannot read"):
        run(make_layer('type: "InfogainLoss" infogain_loss_param { source: "/nonexistent/h" }'),
            make_blobs(R.normal(size=(2, 3)), [0, 2]))
    with pytest.raises(LayerError, match="deprecated"):
        run(make_layer('type: "InfogainLoss" loss_param { normalize: true }'),
            make_blobs(R.normal(size=(2, 3)), [0, 2], h))
    with pytest.raises(LayerError, match="3x3"):
        run(make_layer('type: "InfogainLoss"'),
            make_blobs(R.normal(size=(2, 3)), [0, 2], np.eye(2)))


# -- MultinomialLogisticLoss -----------------------------------------------------
def test_multinomial_logistic_forward_gradient_and_rejections():
    p = R.uniform(0.1, 1, size=(4, 5, 1, 1))
    p[0, 0] = 0  # clamped at 1e-20 rather than log(0)
    lab = np.array([0.0, 1.0, 4.0, 2.0])
    top = run(make_layer('type: "MultinomialLogisticLoss"'), make_blobs(p, lab))
    ref = -sum(math.log(max(p.reshape(4, 5)[n, int(lab[n])], 1e-20)) for n in range(4)) / 4
    assert top[0].data == pytest.approx(ref)
    p[0, 0] = 0.5
    layer = make_layer('type: "MultinomialLogisticLoss"')
    check_gradient(layer, make_blobs(p, lab), [Blob(dtype=np.float64)], check_bottom=[0], stepsize=1e-3,
                   threshold=2e-2)
    bottom = make_blobs(p, lab, dtype=np.float32)
    top = run(layer, bottom, loss_weight=1.0)
    layer.backward(top, [True, False], bottom)
    assert top[0].data.dtype == bottom[0].diff.dtype == np.float32
    with pytest.raises(LayerError, match="label"):
        layer.backward(top, [True, True], bottom)
    with pytest.raises(LayerError, match="labels must be"):
        run(make_layer('type: "MultinomialLogisticLoss"'), make_blobs(p, np.zeros((4, 2))))


# -- in a Net ------------------------------------------------------------------------
def test_softmax_loss_and_accuracy_in_a_force_backward_net():
    from minicaffe.net import Net
    from tests.gradient_check import check_gradient_net

    text = '''
    force_backward: true
    layer { name: "in" type: "Input" top: "data" top: "label"
            input_param { shape { dim: 4 dim: 5 } shape { dim: 4 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
            inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss"
            loss_weight: 2 }
    layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" }
    '''
    net = Net(text_format.Parse(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN, dtype=np.float64)
    net.blobs["data"].data[...] = R.normal(size=(4, 5))
    net.blobs["label"].data[...] = [0, 1, 2, 1]
    out = net.forward()
    assert set(out) == {"loss", "acc"}
    check_gradient_net(net, ["data"])
