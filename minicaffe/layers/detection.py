"""SSD's layers (weiliu89/caffe, branch ssd): PriorBox, DetectionOutput, Normalize, Permute.

An SSD head predicts, at every cell of several feature maps, box offsets (`mbox_loc`) and
class scores (`mbox_conf`) for a fixed set of prior boxes (`mbox_priorbox`, from PriorBox).
Permute brings the predictions into (N, H, W, C) order so that Flatten + Concat line them up
prior by prior; DetectionOutput decodes the offsets against the priors and runs per-class
non-maximum suppression. Normalize is the learned-scale L2 normalization of conv4_3.
"""
import math

import numpy as np

from ..fillers import fill
from ..blob import Blob
from ..layer import Layer, register_layer
from ..proto import caffe_pb2

__all__ = ["PriorBoxLayer", "DetectionOutputLayer", "NormalizeLayer", "PermuteLayer",
           "decode_boxes", "nms"]

_CODE = caffe_pb2.PriorBoxParameter


@register_layer("Permute")
class PermuteLayer(Layer):
    """top = transpose(bottom, order); axes missing from `order` follow in their old order.

    order: permute_param.order, a permutation of (a prefix of) 0..num_axes-1.
    Backward transposes the top diff back with the inverse permutation.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        order = list(self.layer_param.permute_param.order)
        axes = bottom[0].num_axes
        if len(order) > axes:
            raise self.error(f"permute_param.order has {len(order)} axes but the bottom "
                             f"{bottom[0].shape} has {axes}")
        for axis in order:
            if axis >= axes:
                raise self.error(f"permute_param.order: axis {axis} out of range for "
                                 f"{axes} axes")
        if len(set(order)) != len(order):
            raise self.error(f"permute_param.order {order} has a duplicate axis")
        self.order = tuple(order + [a for a in range(axes) if a not in order])
        self.inverse = tuple(np.argsort(self.order))

    def reshape(self, bottom, top):
        if bottom[0].num_axes != len(self.order):
            raise self.error(f"bottom {bottom[0].shape} changed its number of axes from "
                             f"{len(self.order)}")
        top[0].reshape(tuple(bottom[0].shape[a] for a in self.order))

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data.transpose(self.order)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff.transpose(self.inverse)


@register_layer("Normalize")
class NormalizeLayer(Layer):
    """L2 normalization with a learned scale (SSD's conv4_3_norm), bottom (N, C, H, W).

    across_spatial: norm_n = sqrt(sum_{c,h,w} x^2 + eps), one per sample; otherwise
    norm_{n,h,w} = sqrt(sum_c x^2 + eps), one per pixel. y = s * x / norm, with s = blobs[0]:
    one value if channel_shared, else one per channel (scale_filler, default constant 1).
    Backward: with z = x / norm and g = s * dy, dx = (g - z * sum(g * z)) / norm over each
    norm's group; ds = sum(dy * z) (accumulated).
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.norm_param
        if bottom[0].num_axes < 2:
            raise self.error(f"bottom must have a channel axis, got shape {bottom[0].shape}")
        self.across_spatial = p.across_spatial
        self.channel_shared = p.channel_shared
        self.eps = p.eps
        if not self.eps >= 0:
            raise self.error(f"norm_param.eps must be >= 0, got {self.eps}")
        if not self.blobs:
            channels = bottom[0].shape[1]
            self.blobs = [Blob((1,) if self.channel_shared else (channels,), dtype=self.dtype)]
            filler = p.scale_filler if p.HasField("scale_filler") else \
                caffe_pb2.FillerParameter(type="constant", value=1.0)
            fill(self.blobs[0], filler, what=f"layer {self.name!r} scale")
        expected = (1,) if self.channel_shared else (bottom[0].shape[1],)
        if self.blobs[0].count() != expected[0]:
            raise self.error(f"scale blob has {self.blobs[0].count()} values, expected "
                             f"{expected[0]} ({'channel_shared' if self.channel_shared else 'one per channel'})")

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)
        n = bottom[0].shape[0]
        # Normalized input, kept for backward; norms shaped to broadcast over their group.
        z = getattr(self, "_z", None)
        if z is None or z.shape != bottom[0].shape or z.dtype != bottom[0].dtype:
            self._z = np.empty(bottom[0].shape, dtype=bottom[0].dtype)
        rest = bottom[0].shape[2:]
        self._norm_shape = (n, 1) + (1,) * len(rest) if self.across_spatial else (n, 1) + rest
        self._sum_axes = tuple(range(1, bottom[0].num_axes)) if self.across_spatial else (1,)

    def _scale(self, ndim):
        s = self.blobs[0].data
        return s.reshape((1,) * ndim) if self.channel_shared else s.reshape((1, -1) + (1,) * (ndim - 2))

    def forward(self, bottom, top):
        x = bottom[0].data
        self._norm = np.sqrt(np.square(x).sum(axis=self._sum_axes, keepdims=True) + x.dtype.type(self.eps))
        np.divide(x, self._norm, out=self._z)
        np.multiply(self._z, self._scale(x.ndim), out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        dy, z = top[0].diff, self._z
        if self.param_propagate_down[0]:
            if self.channel_shared:
                self.blobs[0].diff[0] += np.vdot(dy, z)
            else:
                axes = (0,) + tuple(range(2, dy.ndim))
                self.blobs[0].diff += (dy * z).sum(axis=axes)
        if propagate_down[0]:
            g = dy * self._scale(dy.ndim)
            dot = (g * z).sum(axis=self._sum_axes, keepdims=True)
            bx = bottom[0].diff
            np.multiply(z, dot, out=bx)
            np.subtract(g, bx, out=bx)
            bx /= self._norm


@register_layer("PriorBox")
class PriorBoxLayer(Layer):
    """SSD's default boxes for one feature map. bottoms: feature map (N, C, H, W), image.

    For every cell (h, w), centre ((w + offset) * step_w, (h + offset) * step_h), and every
    min_size m (truncated to an integer, as in SSD): a box m x m; if max_size M is given, a
    box sqrt(m*M) x sqrt(m*M); then for each aspect ratio r != 1 (flip adds 1/r) a box
    m*sqrt(r) x m/sqrt(r). Corners are divided by the image size (img_size/img_h/img_w, else
    bottom[1]'s), and clipped to [0, 1] when clip is set. step defaults to image / feature
    size. top (1, 2, H*W*num_priors*4): channel 0 the boxes (xmin, ymin, xmax, ymax),
    channel 1 the variances (one value for all four, or four). No backward.
    """

    exact_num_bottom = 2
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.prior_box_param
        if not p.min_size:
            raise self.error("prior_box_param: must provide min_size")
        self.min_sizes = list(p.min_size)
        for m in self.min_sizes:
            if not m > 0:
                raise self.error(f"prior_box_param: min_size must be positive, got {m}")
        ratios = [1.0]
        for ar in p.aspect_ratio:
            if not ar > 0:
                raise self.error(f"prior_box_param: aspect_ratio must be positive, got {ar}")
            if any(abs(ar - r) < 1e-6 for r in ratios):
                continue
            ratios.append(ar)
            if p.flip:
                ratios.append(1.0 / ar)
        self.aspect_ratios = ratios
        self.max_sizes = list(p.max_size)
        if self.max_sizes:
            if len(self.max_sizes) != len(self.min_sizes):
                raise self.error(f"prior_box_param: {len(self.max_sizes)} max_size for "
                                 f"{len(self.min_sizes)} min_size; give one per min_size")
            for m, big in zip(self.min_sizes, self.max_sizes):
                if not big > m:
                    raise self.error(f"prior_box_param: max_size {big} must be greater than "
                                     f"min_size {m}")
        self.num_priors = len(ratios) * len(self.min_sizes) + len(self.max_sizes)
        self.clip = p.clip
        variance = list(p.variance)
        if len(variance) > 1 and len(variance) != 4:
            raise self.error(f"prior_box_param: give 1 or 4 variance values, got {len(variance)}")
        if any(not v > 0 for v in variance):
            raise self.error(f"prior_box_param: variance must be positive, got {variance}")
        self.variance = variance or [0.1]
        self.img_h, self.img_w = self._pair(p, "img_size", "img_h", "img_w")
        self.step_h, self.step_w = self._pair(p, "step", "step_h", "step_w")
        self.offset = p.offset

    def _pair(self, p, both, h, w):
        """(h, w) from either `both` or the h/w pair; 0, 0 when neither is given."""
        if p.HasField(h) or p.HasField(w):
            if p.HasField(both):
                raise self.error(f"prior_box_param: either {both} or {h}/{w} should be "
                                 f"specified; not both")
            vh, vw = getattr(p, h), getattr(p, w)
            if not (vh > 0 and vw > 0):
                raise self.error(f"prior_box_param: {h} and {w} must both be larger than 0, "
                                 f"got {vh} and {vw}")
            return vh, vw
        if p.HasField(both):
            v = getattr(p, both)
            if not v > 0:
                raise self.error(f"prior_box_param: {both} should be larger than 0, got {v}")
            return v, v
        return 0, 0

    def _box_sizes(self):
        """(num_priors, 2) widths and heights, in SSD's order for one cell."""
        sizes = []
        for s, m in enumerate(self.min_sizes):
            m = int(m)
            sizes.append((m, m))
            if self.max_sizes:
                side = math.sqrt(m * int(self.max_sizes[s]))
                sizes.append((side, side))
            for ar in self.aspect_ratios:
                if abs(ar - 1.0) < 1e-6:
                    continue
                sizes.append((m * math.sqrt(ar), m / math.sqrt(ar)))
        return np.array(sizes, dtype=np.float64)

    def reshape(self, bottom, top):
        for i, b in enumerate(bottom):
            if b.num_axes != 4:
                raise self.error(f"bottom[{i}] must be (N, C, H, W), got shape {b.shape}")
        h, w = bottom[0].shape[2:]
        top[0].reshape((1, 2, h * w * self.num_priors * 4))

    def forward(self, bottom, top):
        layer_h, layer_w = bottom[0].shape[2:]
        if self.img_h == 0 or self.img_w == 0:
            img_h, img_w = bottom[1].shape[2:]
        else:
            img_h, img_w = self.img_h, self.img_w
        if self.step_h == 0 or self.step_w == 0:
            step_h, step_w = img_h / layer_h, img_w / layer_w
        else:
            step_h, step_w = self.step_h, self.step_w
        cy = ((np.arange(layer_h) + self.offset) * step_h)[:, None, None]
        cx = ((np.arange(layer_w) + self.offset) * step_w)[None, :, None]
        sizes = self._box_sizes()
        half_w, half_h = sizes[:, 0] / 2.0, sizes[:, 1] / 2.0
        boxes = np.empty((layer_h, layer_w, self.num_priors, 4))
        boxes[..., 0] = (cx - half_w) / img_w
        boxes[..., 1] = (cy - half_h) / img_h
        boxes[..., 2] = (cx + half_w) / img_w
        boxes[..., 3] = (cy + half_h) / img_h
        if self.clip:
            np.clip(boxes, 0.0, 1.0, out=boxes)
        out = top[0].data
        out[0, 0] = boxes.reshape(-1)
        out[0, 1].reshape(-1, len(self.variance))[...] = self.variance

    def backward(self, top, propagate_down, bottom):
        pass  # priors depend only on shapes


def decode_boxes(loc, priors, variances, code_type, variance_encoded_in_target):
    """Decode SSD offsets `loc` (..., P, 4) against priors and variances (P, 4), float math.

    CORNER adds (variance *) offsets to the corners; CENTER_SIZE moves the centre by
    offset * size and scales the size by exp(offset); CORNER_SIZE adds offset * prior size
    to the corners. With variance_encoded_in_target the variances are already in `loc`.
    """
    dt = loc.dtype
    v = np.ones_like(variances) if variance_encoded_in_target else variances
    v = v.astype(dt, copy=False)
    priors = priors.astype(dt, copy=False)
    out = np.empty(loc.shape, dtype=dt)
    if code_type == _CODE.CORNER:
        np.add(priors, v * loc, out=out)
        return out
    pw = priors[:, 2] - priors[:, 0]
    ph = priors[:, 3] - priors[:, 1]
    if code_type == _CODE.CENTER_SIZE:
        pcx = (priors[:, 0] + priors[:, 2]) / dt.type(2)
        pcy = (priors[:, 1] + priors[:, 3]) / dt.type(2)
        cx = v[:, 0] * loc[..., 0] * pw + pcx
        cy = v[:, 1] * loc[..., 1] * ph + pcy
        w = np.exp(v[:, 2] * loc[..., 2]) * pw
        h = np.exp(v[:, 3] * loc[..., 3]) * ph
        out[..., 0] = cx - w / 2
        out[..., 1] = cy - h / 2
        out[..., 2] = cx + w / 2
        out[..., 3] = cy + h / 2
        return out
    if code_type == _CODE.CORNER_SIZE:
        size = np.stack([pw, ph, pw, ph], axis=1)
        np.add(priors, v * loc * size, out=out)
        return out
    raise ValueError(f"unknown code_type {code_type}")


def _areas(boxes):
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return np.where((w < 0) | (h < 0), 0, w * h)


def nms(boxes, scores, score_threshold, nms_threshold, eta=1.0, top_k=-1):
    """SSD's ApplyNMSFast: indices kept by greedy NMS, highest score first.

    Candidates score > score_threshold, at most top_k of them (stable sort by score); a
    candidate is kept when its Jaccard overlap with every kept box is <= the threshold,
    which shrinks by eta after each kept box while above 0.5.
    """
    candidates = np.flatnonzero(scores > score_threshold)
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    if 0 <= top_k < len(order):
        order = order[:top_k]
    areas = _areas(boxes)
    kept = []
    threshold = nms_threshold
    for idx in order:
        if kept:
            k = np.asarray(kept)
            b = boxes[idx]
            ix0 = np.maximum(boxes[k, 0], b[0])
            iy0 = np.maximum(boxes[k, 1], b[1])
            ix1 = np.minimum(boxes[k, 2], b[2])
            iy1 = np.minimum(boxes[k, 3], b[3])
            iw, ih = ix1 - ix0, iy1 - iy0
            inter = np.where((iw > 0) & (ih > 0), iw * ih, 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                overlap = np.where(inter > 0, inter / (areas[k] + areas[idx] - inter), 0)
            if np.any(overlap > threshold):
                continue
        kept.append(idx)
        if eta < 1 and threshold > 0.5:
            threshold *= eta
    return kept


@register_layer("DetectionOutput")
class DetectionOutputLayer(Layer):
    """SSD's detections. bottoms: loc (N, P*L*4), conf (N, P*num_classes), priors (1, 2, P*4).

    L is 1 with share_location, else num_classes. Boxes are decoded (decode_boxes), then for
    each class but background_label_id NMS keeps boxes scoring above confidence_threshold
    (nms_param: nms_threshold, top_k, eta); keep_top_k then keeps the best over all classes.
    top (1, 1, D, 7): rows [image_id, label, score, xmin, ymin, xmax, ymax], per image by
    label then score; with no detection at all, one row per image of -1 (image_id set).
    Forward only, as in SSD; saving results to files (save_output_param) is not supported.
    """

    exact_num_bottom = 3
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.detection_output_param
        if not p.HasField("num_classes"):
            raise self.error("detection_output_param: must specify num_classes")
        self.num_classes = p.num_classes
        self.share_location = p.share_location
        self.num_loc_classes = 1 if self.share_location else self.num_classes
        self.background = p.background_label_id
        self.code_type = p.code_type
        if self.code_type not in (_CODE.CORNER, _CODE.CENTER_SIZE, _CODE.CORNER_SIZE):
            raise self.error(f"detection_output_param: unknown code_type {self.code_type}")
        self.variance_encoded_in_target = p.variance_encoded_in_target
        self.keep_top_k = p.keep_top_k
        self.confidence_threshold = p.confidence_threshold if p.HasField(
            "confidence_threshold") else -np.finfo(np.float32).max
        self.nms_threshold = p.nms_param.nms_threshold
        if not self.nms_threshold >= 0:
            raise self.error(f"nms_param: nms_threshold must be non negative, "
                             f"got {self.nms_threshold}")
        self.eta = p.nms_param.eta
        if not 0 < self.eta <= 1:
            raise self.error(f"nms_param: eta must be in (0, 1], got {self.eta}")
        self.top_k = p.nms_param.top_k if p.nms_param.HasField("top_k") else -1
        if p.save_output_param.output_directory or p.visualize:
            raise self.error("detection_output_param: saving or visualizing detections "
                             "(save_output_param, visualize) is not supported; read the "
                             "detections from the top blob")

    def reshape(self, bottom, top):
        loc, conf, prior = bottom
        if loc.shape[0] != conf.shape[0]:
            raise self.error(f"loc has {loc.shape[0]} images but conf has {conf.shape[0]}")
        if (prior.num_axes < 3 or prior.shape[1] != 2 or prior.shape[2] % 4
                or prior.count() != 2 * prior.shape[2] * prior.shape[0]):
            raise self.error(f"priors (bottom[2]) must be (1, 2, num_priors*4), got {prior.shape}")
        self.num_priors = prior.shape[2] // 4
        if loc.count() // loc.shape[0] != self.num_priors * self.num_loc_classes * 4:
            raise self.error(f"number of priors ({self.num_priors}) must match number of "
                             f"location predictions: loc {loc.shape} needs "
                             f"{self.num_priors * self.num_loc_classes * 4} per image")
        if conf.count() // conf.shape[0] != self.num_priors * self.num_classes:
            raise self.error(f"number of priors ({self.num_priors}) must match number of "
                             f"confidence predictions: conf {conf.shape} needs "
                             f"{self.num_priors * self.num_classes} per image")
        top[0].reshape((1, 1, 1, 7))

    def forward(self, bottom, top):
        num = bottom[0].shape[0]
        loc = bottom[0].data.reshape(num, self.num_priors, self.num_loc_classes, 4)
        conf = bottom[1].data.reshape(num, self.num_priors, self.num_classes)
        prior = bottom[2].data.reshape(-1, 2, self.num_priors, 4)[0]
        # decoded: (num, num_loc_classes, P, 4)
        decoded = decode_boxes(loc.transpose(0, 2, 1, 3), prior[0], prior[1],
                               self.code_type, self.variance_encoded_in_target)
        rows = []
        for i in range(num):
            picks = []  # (label, indices) in label order
            for c in range(self.num_classes):
                if c == self.background:
                    continue
                boxes = decoded[i, 0 if self.share_location else c]
                keep = nms(boxes, conf[i, :, c], self.confidence_threshold,
                           self.nms_threshold, self.eta, self.top_k)
                picks.append((c, keep))
            total = sum(len(k) for _, k in picks)
            if -1 < self.keep_top_k < total:
                flat = [(c, j) for c, keep in picks for j in keep]
                scores = np.array([conf[i, j, c] for c, j in flat])
                best = sorted(np.argsort(-scores, kind="stable")[:self.keep_top_k],
                              key=lambda t: (flat[t][0], -scores[t], t))
                flat = [flat[t] for t in best]
            else:
                flat = [(c, j) for c, keep in picks for j in keep]
            for c, j in flat:
                box = decoded[i, 0 if self.share_location else c, j]
                rows.append((i, c, conf[i, j, c], box[0], box[1], box[2], box[3]))
        out_dtype = bottom[0].dtype
        if rows:
            top[0].reshape((1, 1, len(rows), 7))
            top[0].data[0, 0] = np.array(rows, dtype=out_dtype)
        else:
            top[0].reshape((1, 1, num, 7))
            top[0].data[...] = -1
            top[0].data[0, 0, :, 0] = np.arange(num)

    def backward(self, top, propagate_down, bottom):
        if any(propagate_down):
            raise self.error("DetectionOutput has no backward (as in SSD)")
