"""Fast/Faster R-CNN's ROIPooling (rbgirshick/caffe-fast-rcnn).

Every region of interest is max-pooled into a fixed pooled_h x pooled_w grid. The
bins of one ROI differ in size from those of the next, so instead of looping over
ROIs the layer gathers, for a chunk of ROIs at once, a (K_h, K_w) window per bin
(K = the chunk's largest bin), masks the cells outside each bin with -inf and takes
the max; argmax over the flattened window picks the first maximum in row-major
order, as Caffe's loop does. Backward scatters each bin's gradient to its argmax.
"""
import numpy as np

from ..layer import Layer, register_layer

__all__ = ["ROIPoolingLayer", "roi_bins"]

# Upper bound for one chunk's gathered windows.
GATHER_BYTES = 16 << 20


def _c_round(values):
    """C's round(): halves away from zero (numpy rounds them to even)."""
    wide = values.astype(np.float64)
    return (np.sign(wide) * np.floor(np.abs(wide) + 0.5)).astype(np.int64)


def roi_bins(rois, spatial_scale, pooled, size, dtype):
    """Bin edges along one axis: (start, end), each (R, pooled), clipped to [0, size).

    rois: (R, 2) ROI start and end coordinates on that axis, in image pixels.
    """
    scaled = rois.astype(dtype) * dtype(spatial_scale)
    start, end = _c_round(scaled[:, 0]), _c_round(scaled[:, 1])
    length = np.maximum(end - start + 1, 1)
    bin_size = length.astype(dtype) / dtype(pooled)
    steps = np.arange(pooled, dtype=dtype)
    lo = np.floor(steps[None, :] * bin_size[:, None]).astype(np.int64)
    hi = np.ceil((steps[None, :] + 1) * bin_size[:, None]).astype(np.int64)
    lo = np.clip(lo + start[:, None], 0, size)
    hi = np.clip(hi + start[:, None], 0, size)
    return lo, hi


@register_layer("ROIPooling")
class ROIPoolingLayer(Layer):
    """Max pooling of ROIs: features (N, C, H, W) + rois (R, 5) -> (R, C, pooled_h, pooled_w).

    Each ROI row is (batch index, x1, y1, x2, y2) in image pixels; scaled by spatial_scale
    and rounded, it spans rows y1..y2 and columns x1..x2 (inclusive, at least 1). Bin
    (ph, pw) covers rows y1 + [floor(ph * h / pooled_h), ceil((ph + 1) * h / pooled_h)),
    clipped to the map; an empty bin gives 0. Gradients flow to features only.
    """

    exact_num_bottom = 2
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.roi_pooling_param
        if p.pooled_h <= 0 or p.pooled_w <= 0:
            raise self.error(f"roi_pooling_param pooled_h and pooled_w must be > 0, got "
                             f"{p.pooled_h} x {p.pooled_w}")
        self.pooled_h, self.pooled_w, self.spatial_scale = p.pooled_h, p.pooled_w, p.spatial_scale

    def reshape(self, bottom, top):
        if bottom[0].num_axes != 4:
            raise self.error(f"features bottom[0] must be (N, C, H, W), got {bottom[0].shape}")
        rois = bottom[1]
        if rois.count() and rois.count(1) != 5:
            raise self.error(f"rois bottom[1] must be (R, 5) rows of (batch index, x1, y1, x2, y2), "
                             f"got shape {rois.shape}")
        if top[0] is bottom[0]:
            raise self.error("ROIPooling does not allow in-place computation")
        num_rois = rois.shape[0] if rois.num_axes else 0
        top[0].reshape(num_rois, bottom[0].shape[1], self.pooled_h, self.pooled_w)

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0

    def forward(self, bottom, top):
        x = bottom[0].data
        num, channels, height, width = x.shape
        rois = bottom[1].data.reshape(-1, 5)
        batch = rois[:, 0].astype(np.int64)
        if batch.size and (batch.min() < 0 or batch.max() >= num):
            bad = batch[(batch < 0) | (batch >= num)][0]
            raise self.error(f"ROI batch index {bad} is outside the {num} images of bottom[0]")
        dtype = x.dtype.type
        hs, he = roi_bins(rois[:, [2, 4]], self.spatial_scale, self.pooled_h, height, dtype)
        ws, we = roi_bins(rois[:, [1, 3]], self.spatial_scale, self.pooled_w, width, dtype)
        y = top[0].data
        self._argmax = np.full(y.shape, -1, dtype=np.int64)
        self._batch = batch
        ph, pw = self.pooled_h, self.pooled_w
        start = 0
        while start < len(rois):
            # Grow the chunk while its gathered windows stay within GATHER_BYTES.
            stop = start + 1
            kh, kw = max(1, int((he[start] - hs[start]).max())), max(1, int((we[start] - ws[start]).max()))
            while stop < len(rois):
                nh = max(kh, int((he[stop] - hs[stop]).max()))
                nw = max(kw, int((we[stop] - ws[stop]).max()))
                if (stop + 1 - start) * ph * pw * nh * nw * channels * x.itemsize > GATHER_BYTES:
                    break
                kh, kw, stop = nh, nw, stop + 1
            self._pool_chunk(x, slice(start, stop), batch, hs, he, ws, we, kh, kw, y)
            start = stop

    def _pool_chunk(self, x, chunk, batch, hs, he, ws, we, kh, kw, y):
        height, width = x.shape[2:]
        rows = hs[chunk][:, :, None] + np.arange(kh)                 # (r, PH, kh)
        cols = ws[chunk][:, :, None] + np.arange(kw)                 # (r, PW, kw)
        valid = ((rows < he[chunk][:, :, None])[:, :, None, :, None]
                 & (cols < we[chunk][:, :, None])[:, None, :, None, :])   # (r, PH, PW, kh, kw)
        rows, cols = np.minimum(rows, height - 1), np.minimum(cols, width - 1)
        b = batch[chunk][:, None, None, None, None]
        # Advanced indices around a slice put their axes first: (r, PH, PW, kh, kw, C).
        windows = x[b, :, rows[:, :, None, :, None], cols[:, None, :, None, :]]
        windows[~valid] = -np.inf
        r = windows.shape[0]
        flat = windows.reshape(r, self.pooled_h, self.pooled_w, kh * kw, -1)
        best = np.argmax(flat, axis=3)                                # first max, row-major
        value = np.take_along_axis(flat, best[:, :, :, None], axis=3)[:, :, :, 0]
        empty = ~valid.any(axis=(3, 4))
        best_row = np.take_along_axis(np.broadcast_to(rows[:, :, None, :, None],
                                                      valid.shape).reshape(flat.shape[:4]),
                                      best, axis=3)
        best_col = np.take_along_axis(np.broadcast_to(cols[:, None, :, None, :],
                                                      valid.shape).reshape(flat.shape[:4]),
                                      best, axis=3)
        index = best_row * width + best_col
        value[empty] = 0
        index[empty] = -1
        y[chunk] = value.transpose(0, 3, 1, 2)
        self._argmax[chunk] = index.transpose(0, 3, 1, 2)

    def backward(self, top, propagate_down, bottom):
        if len(propagate_down) > 1 and propagate_down[1]:
            raise self.error("ROIPooling cannot backpropagate to the rois (bottom[1])")
        if not propagate_down[0]:
            return
        dx = bottom[0].diff
        num, channels, height, width = dx.shape
        plane = height * width
        index = self._argmax
        offset = (self._batch[:, None] * channels + np.arange(channels)[None, :]) * plane
        flat = index + offset[:, :, None, None]
        keep = index >= 0
        total = np.bincount(flat[keep], weights=top[0].diff[keep], minlength=dx.size)
        dx.reshape(-1)[...] = total
