"""Loss layers (SoftmaxWithLoss, EuclideanLoss, ...) and Accuracy.

A loss layer writes one scalar to top[0]. The Net stores the layer's loss weight
in top[0].diff, so every backward scales its gradient by `top[0].diff.flat[0]`,
exactly as Caffe does. Labels arrive as floats and are truncated to ints, as
Caffe's static_cast<int> does; backpropagating into labels is an error.
"""
import numpy as np
from google.protobuf.message import DecodeError

from ..blob import Blob
from ..layer import Layer, register_layer
from ..proto import caffe_pb2
from ..threads import map_flat
from .common import softmax

__all__ = [
    "LossLayer", "SoftmaxWithLossLayer", "AccuracyLayer", "EuclideanLossLayer",
    "SigmoidCrossEntropyLossLayer", "HingeLossLayer", "ContrastiveLossLayer",
    "InfogainLossLayer", "MultinomialLogisticLossLayer",
]

_LP = caffe_pb2.LossParameter
# Caffe clamps probabilities before log: SoftmaxWithLoss at FLT_MIN (also in
# double precision), Infogain and MultinomialLogistic at kLOG_THRESHOLD.
FLT_MIN = float(np.finfo(np.float32).tiny)
LOG_THRESHOLD = 1e-20


def _sigmoid(x, out):
    """1 / (1 + exp(-x)) without overflow for large |x|."""
    e = np.exp(-np.abs(x))
    np.divide(1.0, 1.0 + e, out=out)
    np.copyto(out, e * out, where=x < 0)
    return out


def _legacy_shape(blob):
    """(num, channels, height, width) as Caffe's legacy accessors see a <= 4-d blob."""
    shape = tuple(blob.shape) + (1,) * (4 - blob.num_axes)
    return shape[:4] if blob.num_axes <= 4 else None


def _normalization(loss_param, default):
    """The normalization mode, honouring the deprecated `normalize` bool."""
    if loss_param.HasField("normalization"):
        return loss_param.normalization
    if loss_param.HasField("normalize"):
        return _LP.VALID if loss_param.normalize else _LP.BATCH_SIZE
    return default


def _normalizer(mode, outer_num, inner_num, valid_count):
    """What the summed loss is divided by; never less than 1, as in Caffe."""
    if mode == _LP.FULL:
        n = outer_num * inner_num
    elif mode == _LP.VALID:
        n = outer_num * inner_num if valid_count == -1 else valid_count
    elif mode == _LP.BATCH_SIZE:
        n = outer_num
    elif mode == _LP.NONE:
        n = 1
    else:
        raise ValueError(f"unknown normalization mode {mode}")
    return float(max(1.0, n))


def read_labels(layer, label_data, shape, num_classes, ignore_label):
    """(labels, valid): int labels of `shape` (ignored ones set to 0) and the not-ignored mask.

    Raises the layer's error for a label outside [0, num_classes).
    """
    labels = label_data.reshape(shape).astype(np.int64)
    if ignore_label is None:
        valid = np.ones(shape, dtype=bool)
    else:
        valid = labels != ignore_label
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        also = "" if ignore_label is None else f" or the ignore_label {ignore_label}"
        raise layer.error(f"label {labels[bad][0]} is out of range: labels must be integers "
                          f"in [0, {num_classes - 1}] (the size of the class axis){also}")
    labels[~valid] = 0
    return labels, valid


class LossLayer(Layer):
    """Base of the loss layers: bottom[0] predictions, bottom[1] targets, scalar top[0]."""

    exact_num_bottom = 2
    exact_num_top = 1
    auto_top_blobs = True
    is_loss = True
    # Bottoms that take no gradient (labels); backward refuses them.
    label_bottoms = (1,)

    def allow_force_backward(self, bottom_index):
        return bottom_index not in self.label_bottoms

    def reshape(self, bottom, top):
        if bottom[0].shape[:1] != bottom[1].shape[:1]:
            raise self.error(f"the data and label should have the same first dimension, got "
                             f"{bottom[0].shape} and {bottom[1].shape}")
        top[0].reshape(())

    # -- helpers shared by the subclasses ------------------------------------
    def check_no_label_backward(self, propagate_down):
        for i in self.label_bottoms:
            if i < len(propagate_down) and propagate_down[i]:
                raise self.error(f"cannot backpropagate to label input bottom[{i}]; "
                                 f"labels get no gradient (set propagate_down: false for it)")


def _canonical_axis(layer, blob, axis):
    try:
        return blob.canonical_axis(axis)
    except IndexError as e:
        raise layer.error(str(e)) from None


def _label_count_message(bottom, expected):
    return (f"number of labels ({bottom[1].count()}) must match number of predictions "
            f"({expected}); e.g. for axis 1 and scores (N, C, H, W) the labels hold N*H*W "
            f"integers in [0, C-1]")


def _ignore_label(param):
    return param.ignore_label if param.HasField("ignore_label") else None


class _SoftmaxLoss(LossLayer):
    """Shared by SoftmaxWithLoss and InfogainLoss: softmax over `axis` into self.prob, labels
    (count outer * inner) read once per forward, optional second top sharing the probabilities."""

    exact_num_top = None
    min_num_top = 1
    max_num_top = 2

    def softmax_axis(self):
        raise NotImplementedError

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        self.axis = _canonical_axis(self, bottom[0], self.softmax_axis())
        self.outer_num = bottom[0].count(0, self.axis)
        self.inner_num = bottom[0].count(self.axis + 1)
        self.channels = bottom[0].shape[self.axis]
        if self.outer_num * self.inner_num != bottom[1].count():
            raise self.error(_label_count_message(bottom, self.outer_num * self.inner_num))
        self.prob.reshape_like(bottom[0])
        if len(top) >= 2:
            top[1].reshape_like(bottom[0])
            top[1].share_data(self.prob)

    def _views(self, array):
        """(outer, channels, inner) view of an array shaped like bottom[0]."""
        return array.reshape(self.outer_num, self.channels, self.inner_num)

    def _softmax_and_labels(self, bottom):
        """prob = softmax(bottom[0]); sets self.labels, self.valid, self.valid_count."""
        prob = self._views(self.prob.data)
        softmax(self._views(bottom[0].data), 1, prob)
        self.labels, self.valid = read_labels(
            self, bottom[1].data, (self.outer_num, self.inner_num), self.channels,
            self.ignore_label)
        self.valid_count = int(self.valid.sum())
        return prob

    def _normalizer(self):
        return _normalizer(self.normalization, self.outer_num, self.inner_num, self.valid_count)

    def _finish_backward(self, diff, top):
        """Zero ignored positions, then scale by loss_weight / normalizer."""
        if self.ignore_label is not None:
            diff *= self.valid[:, None, :]
        scale = top[0].diff.flat[0] / self._normalizer()
        map_flat(lambda d: np.multiply(d, scale, out=d), diff)


@register_layer("SoftmaxWithLoss")
class SoftmaxWithLossLayer(_SoftmaxLoss):
    """p = softmax(x) over `axis`; L = -sum over non-ignored positions of log p[label] / normalizer.

    bottom[0]: scores (N, C, ...), bottom[1]: labels (count N * ...); top[0]: loss,
    optional top[1]: the probabilities p (shape of bottom[0]).
    """

    def layer_setup(self, bottom, top):
        lp = self.layer_param.loss_param
        self.ignore_label = _ignore_label(lp)
        self.normalization = _normalization(lp, lp.normalization)
        self.prob = Blob(bottom[0].shape, dtype=self.dtype)

    def softmax_axis(self):
        return self.layer_param.softmax_param.axis

    def forward(self, bottom, top):
        prob = self._softmax_and_labels(bottom)
        picked = np.take_along_axis(prob, self.labels[:, None, :], axis=1)[:, 0, :]
        log_p = np.log(np.maximum(picked, picked.dtype.type(FLT_MIN)))
        loss = -np.sum(log_p, where=self.valid)
        top[0].data[...] = loss / self._normalizer()

    def backward(self, top, propagate_down, bottom):
        self.check_no_label_backward(propagate_down)
        if not propagate_down[0]:
            return
        diff = self._views(bottom[0].diff)
        map_flat(np.copyto, diff, self._views(self.prob.data))
        # d(-log p_label)/dx_c = p_c - [c == label]
        o, i = np.nonzero(self.valid)
        diff[o, self.labels[o, i], i] -= 1
        self._finish_backward(diff, top)


@register_layer("Accuracy")
class AccuracyLayer(Layer):
    """Fraction of positions whose label scores among the top_k of `axis` (ties count against).

    bottom[0]: scores (N, C, ...), bottom[1]: labels; top[0]: scalar accuracy,
    optional top[1]: per-class accuracy (C,). Not differentiable.
    """

    exact_num_bottom = 2
    min_num_top = 1
    max_num_top = 2

    def layer_setup(self, bottom, top):
        ap = self.layer_param.accuracy_param
        self.top_k = ap.top_k
        self.ignore_label = _ignore_label(ap)

    def reshape(self, bottom, top):
        if bottom[1].count() == 0 or self.top_k > bottom[0].count() // bottom[1].count():
            raise self.error(f"top_k ({self.top_k}) must be less than or equal to the number of "
                             f"classes")
        self.axis = _canonical_axis(self, bottom[0], self.layer_param.accuracy_param.axis)
        self.outer_num = bottom[0].count(0, self.axis)
        self.inner_num = bottom[0].count(self.axis + 1)
        self.channels = bottom[0].shape[self.axis]
        if self.outer_num * self.inner_num != bottom[1].count():
            raise self.error(_label_count_message(bottom, self.outer_num * self.inner_num))
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape((self.channels,))

    def forward(self, bottom, top):
        scores = bottom[0].data.reshape(self.outer_num, self.channels, self.inner_num)
        labels, valid = read_labels(self, bottom[1].data, (self.outer_num, self.inner_num),
                                    self.channels, self.ignore_label)
        true_score = np.take_along_axis(scores, labels[:, None, :], axis=1)
        # Classes scoring at least as high as the true one, not counting the true one itself.
        better = np.count_nonzero(scores >= true_score, axis=1) - 1
        correct = valid & (better < self.top_k)
        count = int(valid.sum())
        top[0].data[...] = correct.sum() / count if count else 0
        if len(top) > 1:
            seen = np.bincount(labels[valid], minlength=self.channels)
            hits = np.bincount(labels[correct], minlength=self.channels)
            per_class = top[1].data
            per_class[...] = 0
            np.divide(hits, seen, out=per_class, where=seen > 0, casting="unsafe")

    def allow_force_backward(self, bottom_index):
        # Caffe allows it and then aborts in Backward; refusing keeps force_backward nets usable.
        return False

    def backward(self, top, propagate_down, bottom):
        if any(propagate_down):
            raise self.error("Accuracy has no gradient; it cannot be backpropagated")


@register_layer("EuclideanLoss")
class EuclideanLossLayer(LossLayer):
    """L = sum((a - b)^2) / (2N) for bottoms a, b of equal per-item size; both get gradients."""

    label_bottoms = ()

    def allow_force_backward(self, bottom_index):
        return True

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[0].count(1) != bottom[1].count(1):
            raise self.error(f"inputs must have the same dimension, got shapes {bottom[0].shape} "
                             f"and {bottom[1].shape}")
        # Net reshapes before every forward: keep the buffer while the shape holds.
        diff = getattr(self, "diff", None)
        if diff is None or diff.shape != bottom[0].shape or diff.dtype != self.dtype:
            self.diff = np.empty(bottom[0].shape, dtype=self.dtype)

    def forward(self, bottom, top):
        a = bottom[0].data
        np.subtract(a, bottom[1].data.reshape(a.shape), out=self.diff)
        flat = self.diff.reshape(-1)
        top[0].data[...] = np.dot(flat, flat) / bottom[0].shape[0] / 2

    def backward(self, top, propagate_down, bottom):
        for i, sign in ((0, 1), (1, -1)):
            if propagate_down[i]:
                alpha = sign * top[0].diff.flat[0] / bottom[i].shape[0]
                np.multiply(self.diff.reshape(bottom[i].shape), alpha, out=bottom[i].diff)


@register_layer("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLossLayer(LossLayer):
    """L = -sum(t log s(x) + (1 - t) log(1 - s(x))) / normalizer, s = sigmoid, over non-ignored t.

    bottom[0]: scores x, bottom[1]: targets t in [0, 1] (same count). Normalization
    defaults to BATCH_SIZE here (Caffe's choice when neither normalization nor normalize is set).
    """

    def layer_setup(self, bottom, top):
        lp = self.layer_param.loss_param
        self.ignore_label = _ignore_label(lp)
        self.normalization = _normalization(lp, _LP.BATCH_SIZE)

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[0].count() != bottom[1].count():
            raise self.error(f"inputs must have the same count, got shapes {bottom[0].shape} and "
                             f"{bottom[1].shape}")
        self.outer_num = bottom[0].shape[0]
        self.inner_num = bottom[0].count(1)
        self.sigmoid = np.empty(bottom[0].shape, dtype=self.dtype)

    def _valid(self, target):
        if self.ignore_label is None:
            return None
        return target.astype(np.int64) != self.ignore_label

    def forward(self, bottom, top):
        x = bottom[0].data
        t = bottom[1].data.reshape(x.shape)
        _sigmoid(x, self.sigmoid)
        # Written so exp never overflows: log(1 + exp(-|x|)) plus the linear part.
        positive = x >= 0
        terms = x * (t - positive) - np.log1p(np.exp(x - 2 * x * positive))
        valid = self._valid(t)
        if valid is None:
            loss, count = -terms.sum(), terms.size
        else:
            loss, count = -np.sum(terms, where=valid), int(valid.sum())
        self.norm = _normalizer(self.normalization, self.outer_num, self.inner_num, count)
        top[0].data[...] = loss / self.norm

    def backward(self, top, propagate_down, bottom):
        self.check_no_label_backward(propagate_down)
        if not propagate_down[0]:
            return
        diff = bottom[0].diff
        t = bottom[1].data.reshape(diff.shape)
        np.subtract(self.sigmoid, t, out=diff)
        valid = self._valid(t)
        if valid is not None:
            diff *= valid
        diff *= top[0].diff.flat[0] / self.norm


@register_layer("HingeLoss")
class HingeLossLayer(LossLayer):
    """One-vs-all hinge: L = sum_n,k max(0, 1 - d_nk x_nk)^p / N, d = +1 for the label, -1 else.

    bottom[0]: scores (N, K, ...), bottom[1]: labels (N); p = 1 (L1, default) or 2 (L2).
    """

    def layer_setup(self, bottom, top):
        self.norm = self.layer_param.hinge_loss_param.norm
        if self.norm not in (caffe_pb2.HingeLossParameter.L1, caffe_pb2.HingeLossParameter.L2):
            raise self.error(f"unknown hinge_loss_param.norm {self.norm}; use L1 or L2")

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        self.num = bottom[0].shape[0]
        self.dim = bottom[0].count() // max(self.num, 1)
        if bottom[1].count() < self.num:
            raise self.error(f"need one label per item: {self.num} items but "
                             f"{bottom[1].count()} labels")
        self.margin = np.empty((self.num, self.dim), dtype=self.dtype)

    def forward(self, bottom, top):
        rows = np.arange(self.num)
        # Like Caffe, read the first N values whatever the label blob's shape.
        self.labels, _ = read_labels(self, bottom[1].data.reshape(-1)[:self.num], (self.num,),
                                     self.dim, None)
        m = self.margin
        m[...] = bottom[0].data.reshape(self.num, self.dim)
        m[rows, self.labels] *= -1
        np.maximum(1 + m, 0, out=m)
        flat = m.reshape(-1)
        if self.norm == caffe_pb2.HingeLossParameter.L1:
            top[0].data[...] = flat.sum() / self.num
        else:
            top[0].data[...] = np.dot(flat, flat) / self.num

    def backward(self, top, propagate_down, bottom):
        self.check_no_label_backward(propagate_down)
        if not propagate_down[0]:
            return
        diff = bottom[0].diff.reshape(self.num, self.dim)
        diff[...] = self.margin
        diff[np.arange(self.num), self.labels] *= -1
        weight = top[0].diff.flat[0]
        if self.norm == caffe_pb2.HingeLossParameter.L1:
            np.sign(diff, out=diff)
            diff *= weight / self.num
        else:
            diff *= weight * 2 / self.num


@register_layer("ContrastiveLoss")
class ContrastiveLossLayer(LossLayer):
    """L = sum_n [y_n d_n^2 + (1 - y_n) max(margin - d_n, 0)^2] / 2N, d_n = ||a_n - b_n||.

    bottom[0], bottom[1]: features a, b (N, C[, 1, 1]); bottom[2]: similarity y (N) of 1/0.
    legacy_version uses max(margin - d_n^2, 0) for dissimilar pairs instead.
    """

    exact_num_bottom = 3
    label_bottoms = (2,)

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        a, b, y = (_legacy_shape(blob) for blob in bottom)
        if a is None or b is None or y is None:
            raise self.error("ContrastiveLoss takes blobs of at most 4 axes")
        if a[1] != b[1]:
            raise self.error(f"both feature blobs need the same channels, got {bottom[0].shape} "
                             f"and {bottom[1].shape}")
        if a[2:] != (1, 1) or b[2:] != (1, 1) or y[1:] != (1, 1, 1):
            raise self.error(f"features must be (N, C, 1, 1) and the similarity (N, 1, 1, 1), got "
                             f"{bottom[0].shape}, {bottom[1].shape}, {bottom[2].shape}")
        if bottom[1].shape[0] != bottom[0].shape[0] or bottom[2].shape[0] != bottom[0].shape[0]:
            raise self.error("all three bottoms need the same first dimension")
        self.num, self.channels = a[0], a[1]
        self.diff = np.empty((self.num, self.channels), dtype=self.dtype)

    def forward(self, bottom, top):
        p = self.layer_param.contrastive_loss_param
        margin = np.dtype(self.dtype).type(p.margin)
        shape = self.diff.shape
        np.subtract(bottom[0].data.reshape(shape), bottom[1].data.reshape(shape), out=self.diff)
        self.dist_sq = np.einsum("ij,ij->i", self.diff, self.diff)
        self.similar = bottom[2].data.reshape(-1).astype(np.int64) != 0
        if p.legacy_version:
            dissimilar = np.maximum(margin - self.dist_sq, 0)
        else:
            dissimilar = np.maximum(margin - np.sqrt(self.dist_sq), 0) ** 2
        per_pair = np.where(self.similar, self.dist_sq, dissimilar)
        top[0].data[...] = per_pair.sum() / self.num / 2

    def backward(self, top, propagate_down, bottom):
        self.check_no_label_backward(propagate_down)
        p = self.layer_param.contrastive_loss_param
        margin = np.dtype(self.dtype).type(p.margin)
        if p.legacy_version:
            mdist = margin - self.dist_sq
            factor = -np.ones_like(mdist)
        else:
            dist = np.sqrt(self.dist_sq)
            mdist = margin - dist
            # The small constant keeps the factor finite when the two features coincide.
            factor = -mdist / (dist + np.dtype(self.dtype).type(1e-4))
        factor = np.where(self.similar, 1, np.where(mdist > 0, factor, 0)).astype(self.dtype)
        for i, sign in ((0, 1), (1, -1)):
            if propagate_down[i]:
                alpha = sign * top[0].diff.flat[0] / self.num
                np.multiply(self.diff, (alpha * factor)[:, None],
                            out=bottom[i].diff.reshape(self.diff.shape))


@register_layer("InfogainLoss")
class InfogainLossLayer(_SoftmaxLoss):
    """p = softmax(x) over `axis`; L = -sum_positions sum_l H[label, l] log p_l / normalizer.

    bottom[0]: scores (N, C, ...), bottom[1]: labels, optional bottom[2]: H (C x C);
    otherwise H is read from infogain_loss_param.source (a BlobProto binaryproto).
    top[0]: loss, optional top[1]: the probabilities p.
    """

    exact_num_bottom = None
    min_num_bottom = 2
    max_num_bottom = 3
    label_bottoms = (1, 2)

    def layer_setup(self, bottom, top):
        lp = self.layer_param.loss_param
        self.ignore_label = _ignore_label(lp)
        if lp.HasField("normalize"):
            raise self.error('loss_param.normalize is deprecated for InfogainLoss; '
                             'use "normalization"')
        self.normalization = lp.normalization
        self.prob = Blob(bottom[0].shape, dtype=self.dtype)
        self.infogain = None
        if len(bottom) < 3:
            ip = self.layer_param.infogain_loss_param
            if not ip.HasField("source"):
                raise self.error("infogain_loss_param.source (the H matrix file) must be given "
                                 "when there is no third bottom")
            proto = caffe_pb2.BlobProto()
            try:
                with open(ip.source, "rb") as f:
                    proto.ParseFromString(f.read())
            except (OSError, DecodeError) as e:
                raise self.error(f"cannot read the infogain matrix {ip.source!r} (a binary "
                                 f"BlobProto): {e}") from None
            self.infogain = Blob(Blob.proto_shape(proto), dtype=self.dtype).from_proto(proto)

    def softmax_axis(self):
        return self.layer_param.infogain_loss_param.axis

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        h = self._h_blob(bottom)
        if h.count() != self.channels * self.channels:
            raise self.error(f"the infogain matrix H must be {self.channels}x{self.channels}, "
                             f"got {h.count()} values (shape {h.shape})")

    def _h_blob(self, bottom):
        return bottom[2] if len(bottom) >= 3 else self.infogain

    def _h(self, bottom):
        return self._h_blob(bottom).data.reshape(self.channels, self.channels).astype(
            self.dtype, copy=False)

    def forward(self, bottom, top):
        prob = self._softmax_and_labels(bottom)
        log_p = np.log(np.maximum(prob, prob.dtype.type(LOG_THRESHOLD)))
        # rows[o, l, i] = H[label(o, i), l]
        rows = self._h(bottom)[self.labels].transpose(0, 2, 1)
        per_position = np.einsum("oli,oli->oi", rows, log_p)
        loss = -np.sum(per_position, where=self.valid)
        top[0].data[...] = loss / self._normalizer()

    def backward(self, top, propagate_down, bottom):
        self.check_no_label_backward(propagate_down)
        if not propagate_down[0]:
            return
        h = self._h(bottom)
        row_sums = h.sum(axis=1)
        diff = self._views(bottom[0].diff)
        # dL/dx_l = p_l * sum_k H[label, k] - H[label, l]
        np.multiply(self._views(self.prob.data), row_sums[self.labels][:, None, :], out=diff)
        diff -= h[self.labels].transpose(0, 2, 1)
        self._finish_backward(diff, top)


@register_layer("MultinomialLogisticLoss")
class MultinomialLogisticLossLayer(LossLayer):
    """L = -sum_n log p[n, label_n] / N for probabilities p (N, C[, 1, 1]) and labels (N)."""

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        legacy = _legacy_shape(bottom[1])
        if legacy is None or legacy[1:] != (1, 1, 1):
            raise self.error(f"labels must be (N,) or (N, 1, 1, 1), got {bottom[1].shape}")
        self.num = bottom[0].shape[0]
        self.dim = bottom[0].count() // max(self.num, 1)

    def forward(self, bottom, top):
        p = bottom[0].data.reshape(self.num, self.dim)
        self.labels, _ = read_labels(self, bottom[1].data, (self.num,), self.dim, None)
        picked = np.maximum(p[np.arange(self.num), self.labels], p.dtype.type(LOG_THRESHOLD))
        self.picked = picked
        top[0].data[...] = -np.log(picked).sum() / self.num

    def backward(self, top, propagate_down, bottom):
        self.check_no_label_backward(propagate_down)
        if not propagate_down[0]:
            return
        diff = bottom[0].diff.reshape(self.num, self.dim)
        diff[...] = 0
        scale = -top[0].diff.flat[0] / self.num
        diff[np.arange(self.num), self.labels] = scale / self.picked


@register_layer("SmoothL1Loss")
class SmoothL1LossLayer(LossLayer):
    """Faster R-CNN's box regression loss: L = sum(w_out * f(w_in * (a - b))) / N, N = a.shape[0].

    f(d) = 0.5 (sigma d)^2 if |d| < 1 / sigma^2, else |d| - 0.5 / sigma^2 (sigma from
    smooth_l1_loss_param, default 1). Bottoms: predictions a, targets b, and optionally
    both inside and outside weights w_in, w_out (4 bottoms; 3 is an error, as in
    py-faster-rcnn), all of a's shape. a and b get gradients; the weights do not.
    """

    exact_num_bottom = None
    min_num_bottom = 2
    max_num_bottom = 4
    label_bottoms = (2, 3)

    def allow_force_backward(self, bottom_index):
        return bottom_index < 2

    def layer_setup(self, bottom, top):
        sigma = self.layer_param.smooth_l1_loss_param.sigma
        if sigma <= 0:
            raise self.error(f"smooth_l1_loss_param.sigma must be positive, got {sigma}")
        self.sigma2 = np.dtype(self.dtype).type(sigma * sigma)
        if len(bottom) == 3:
            raise self.error("give both inside and outside weights (4 bottoms), or neither "
                             "(2 bottoms); got 3 bottoms")

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        for i, b in enumerate(bottom[1:], 1):
            if b.count() != bottom[0].count():
                raise self.error(f"bottom[{i}] has shape {b.shape} but must match the "
                                 f"predictions bottom[0] {bottom[0].shape}")
        self.diff = np.empty(bottom[0].shape, dtype=self.dtype)
        self.errors = np.empty(bottom[0].shape, dtype=self.dtype)

    def forward(self, bottom, top):
        d = self.diff
        np.subtract(bottom[0].data, bottom[1].data.reshape(d.shape), out=d)
        if len(bottom) == 4:
            d *= bottom[2].data.reshape(d.shape)
        small = np.abs(d) < 1 / self.sigma2
        self._small = small
        e = self.errors
        np.abs(d, out=e)
        e -= 0.5 / self.sigma2
        np.copyto(e, 0.5 * self.sigma2 * d * d, where=small)
        if len(bottom) == 4:
            e *= bottom[3].data.reshape(d.shape)
        top[0].data[...] = e.sum(dtype=np.float64) / bottom[0].shape[0]

    def backward(self, top, propagate_down, bottom):
        self.check_no_label_backward(propagate_down)
        grad = np.sign(self.diff)
        np.copyto(grad, self.sigma2 * self.diff, where=self._small)
        if len(bottom) == 4:
            grad *= bottom[2].data.reshape(grad.shape)
            grad *= bottom[3].data.reshape(grad.shape)
        for i, sign in ((0, 1), (1, -1)):
            if propagate_down[i]:
                alpha = sign * top[0].diff.flat[0] / bottom[0].shape[0]
                np.multiply(grad.reshape(bottom[i].shape), alpha, out=bottom[i].diff)
