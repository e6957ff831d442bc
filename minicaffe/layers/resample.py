"""Resampling layers from the segmentation forks: Interp (DeepLab / PSPNet) and Upsample (SegNet).

Interp's bilinear resize is separable, so it is written as two small matrix products,
Y = A_h X A_w^T, with one interpolation matrix per axis (built with DeepLab's own
float32 sampling positions). The matrices hold the crop (pad_beg / pad_end) too, and
the backward pass is the exact adjoint, dX = A_h^T dY A_w.

Upsample puts every value back where SegNet's max pooling took it from (the pooling's
argmax mask is its second bottom); its gradient gathers from the same places.
"""
import numpy as np

from ..layer import Layer, register_layer

__all__ = ["InterpLayer", "UpsampleLayer", "interp_matrix"]


def interp_matrix(size_in, size_out, offset, size_eff, nearest=False, dtype=np.float32):
    """(size_out, size_in) matrix sampling `size_eff` inputs from `offset` at `size_out` points.

    DeepLab's caffe_cpu_interp2 (align corners): output o reads input position
    r * o with r = (size_eff - 1) / (size_out - 1) in float32 (0 if size_out == 1),
    bilinearly between floor and floor + 1 (the last input repeats); nearest rounds
    the position (floor(p + 0.5)). Equal sizes copy.
    """
    matrix = np.zeros((size_out, size_in), dtype=dtype)
    rows = np.arange(size_out)
    if size_eff == size_out:
        matrix[rows, offset + rows] = 1
        return matrix
    ratio = np.float32(size_eff - 1) / np.float32(size_out - 1) if size_out > 1 else np.float32(0)
    position = (ratio * rows.astype(np.float32)).astype(np.float32)
    if nearest:
        matrix[rows, offset + np.floor(position + np.float32(0.5)).astype(np.int64)] = 1
        return matrix
    low = position.astype(np.int64)                     # C's (int) cast: truncation
    step = (low < size_eff - 1).astype(np.int64)
    weight_high = (position - low).astype(dtype)
    np.add.at(matrix, (rows, offset + low), 1 - weight_high)
    np.add.at(matrix, (rows, offset + low + step), weight_high)
    return matrix


@register_layer("Interp")
class InterpLayer(Layer):
    """Bilinear resize (N, C, H, W) -> (N, C, H_out, W_out) with aligned corners (DeepLab v2).

    The input is first cropped by -pad_beg / -pad_end on each side (pads must be <= 0),
    giving H_eff = H + pad_beg + pad_end. The output size is, in DeepLab's order: the
    second bottom's H and W; shrink_factor s: (H_eff - 1) / s + 1; zoom_factor z:
    H_eff + (H_eff - 1)(z - 1); height and width; both factors: shrink, then zoom.
    """

    min_num_bottom = 1
    max_num_bottom = 2
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.interp_param
        has = p.HasField
        self.nearest = False
        if "interp_type" in p.DESCRIPTOR.fields_by_name and has("interp_type"):
            if p.interp_type not in ("bilinear", "nearest_neighbor"):
                raise self.error(f"interp_param.interp_type must be bilinear or nearest_neighbor, "
                                 f"got {p.interp_type!r}")
            self.nearest = p.interp_type == "nearest_neighbor"
        factors = has("zoom_factor") or has("shrink_factor")
        explicit = has("height") or has("width")
        if explicit and not (has("height") and has("width")):
            raise self.error("interp_param needs both height and width, or neither")
        if len(bottom) == 2 and (factors or explicit):
            raise self.error("the output size comes from the second bottom; interp_param cannot "
                             "also give zoom_factor, shrink_factor, height or width")
        if factors and explicit:
            raise self.error("give the output size as zoom_factor/shrink_factor or as height and "
                             "width, not both")
        if len(bottom) == 1 and not (factors or explicit):
            raise self.error("interp_param must give zoom_factor, shrink_factor, or height and "
                             "width (or add a second bottom whose size to match)")
        if has("zoom_factor") and p.zoom_factor < 1:
            raise self.error(f"interp_param.zoom_factor must be at least 1, got {p.zoom_factor}")
        if has("shrink_factor") and p.shrink_factor < 1:
            raise self.error(f"interp_param.shrink_factor must be at least 1, got {p.shrink_factor}")
        if explicit and (p.height <= 0 or p.width <= 0):
            raise self.error(f"interp_param height and width must be positive, got "
                             f"{p.height} x {p.width}")
        if p.pad_beg > 0 or p.pad_end > 0:
            raise self.error(f"interp_param pad_beg/pad_end must be <= 0 (they crop; padding is "
                             f"not supported by DeepLab's Interp), got {p.pad_beg}, {p.pad_end}")
        self.pad_beg, self.pad_end = p.pad_beg, p.pad_end
        self._key = None

    def _output_size(self, bottom, size_eff, axis):
        p = self.layer_param.interp_param
        if len(bottom) == 2:
            return bottom[1].shape[axis]
        if p.HasField("height"):
            return p.height if axis == 2 else p.width
        size = size_eff
        if p.HasField("shrink_factor"):
            size = (size - 1) // p.shrink_factor + 1
        if p.HasField("zoom_factor"):
            size = size + (size - 1) * (p.zoom_factor - 1)
        return size

    def reshape(self, bottom, top):
        if bottom[0].num_axes != 4 or (len(bottom) == 2 and bottom[1].num_axes != 4):
            raise self.error(f"bottoms must have 4 axes (num, channels, height, width), got "
                             f"{[b.shape for b in bottom]}")
        if top[0] is bottom[0]:
            raise self.error("Interp does not allow in-place computation")
        num, channels, height, width = bottom[0].shape
        height_eff = height + self.pad_beg + self.pad_end
        width_eff = width + self.pad_beg + self.pad_end
        if height_eff <= 0 or width_eff <= 0:
            raise self.error(f"cropping by pad_beg {self.pad_beg} and pad_end {self.pad_end} "
                             f"leaves nothing of the {height} x {width} input")
        height_out = self._output_size(bottom, height_eff, 2)
        width_out = self._output_size(bottom, width_eff, 3)
        if height_out <= 0 or width_out <= 0:
            raise self.error(f"output size {height_out} x {width_out} must be positive")
        top[0].reshape(num, channels, height_out, width_out)
        key = (height, width, height_out, width_out, np.dtype(bottom[0].dtype))
        if key != self._key:
            self._key = key
            offset = -self.pad_beg     # DeepLab offsets both axes by pad_beg
            self._rows = interp_matrix(height, height_out, offset, height_eff, self.nearest,
                                       bottom[0].dtype)
            self._cols_t = np.ascontiguousarray(
                interp_matrix(width, width_out, offset, width_eff, self.nearest, bottom[0].dtype).T)
            self._mid = np.empty((num, channels, height_out, width), dtype=bottom[0].dtype)
        elif self._mid.shape[:2] != (num, channels):
            self._mid = np.empty((num, channels, height_out, width), dtype=bottom[0].dtype)

    def forward(self, bottom, top):
        np.matmul(self._rows, bottom[0].data, out=self._mid)
        np.matmul(self._mid, self._cols_t, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        np.matmul(top[0].diff, self._cols_t.T, out=self._mid)
        np.matmul(self._rows.T, self._mid, out=bottom[0].diff)


@register_layer("Upsample")
class UpsampleLayer(Layer):
    """Max-unpooling (SegNet): (N, C, H, W) values + (N, C, H, W) mask -> (N, C, H_out, W_out).

    top[n, c].flat[mask[n, c, i]] = bottom[n, c].flat[i]; every other element is 0. The
    mask is a MAX Pooling layer's second top (index h * W_out + w in the unpooled plane).
    Size: upsample_h x upsample_w, else H * scale_h - pad_out_h by W * scale_w - pad_out_w
    (scale_h = scale_w = scale unless given). With only one bottom (YOLOv3 forks' Upsample)
    every value is repeated scale x scale times (nearest neighbour).
    """

    min_num_bottom = 1
    max_num_bottom = 2
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.upsample_param
        has = p.HasField
        self.size = None
        if has("upsample_h") or has("upsample_w"):
            if not (has("upsample_h") and has("upsample_w")):
                raise self.error("upsample_param needs both upsample_h and upsample_w")
            self.size = (p.upsample_h, p.upsample_w)
            if min(self.size) <= 1:
                raise self.error(f"upsample_h and upsample_w must be greater than 1, got {self.size}")
            self.scale = None
        else:
            if has("scale_h") != has("scale_w") or (has("scale_h") and has("scale")):
                raise self.error("give upsample_param scale, or both scale_h and scale_w")
            self.scale = (p.scale_h, p.scale_w) if has("scale_h") else (p.scale, p.scale)
            if min(self.scale) <= 1 and len(bottom) == 2:
                raise self.error(f"upsample_param scales must be greater than 1, got {self.scale}")
            if min(self.scale) < 1:
                raise self.error(f"upsample_param scales must be positive, got {self.scale}")
            self.pad_out = (int(p.pad_out_h), int(p.pad_out_w))
            for axis, (pad, scale) in enumerate(zip(self.pad_out, self.scale)):
                if pad and scale != 2:
                    raise self.error(f"pad_out_{'hw'[axis]} needs scale_{'hw'[axis]} == 2 (else "
                                     f"the output size is ill-defined), got scale {scale}")
        if len(bottom) == 1 and self.size is not None:
            raise self.error("with one bottom (nearest-neighbour upsampling) give scale, not "
                             "upsample_h/upsample_w")
        if len(bottom) == 1 and any(self.pad_out):
            raise self.error("pad_out_h/pad_out_w need the pooling mask as a second bottom")

    def reshape(self, bottom, top):
        x = bottom[0]
        if x.num_axes != 4:
            raise self.error(f"input must have 4 axes (num, channels, height, width), got {x.shape}")
        if len(bottom) == 2 and bottom[1].shape != x.shape:
            raise self.error(f"the mask bottom[1] must have the input's shape {x.shape}, got "
                             f"{bottom[1].shape}")
        if any(top[0] is b for b in bottom):
            raise self.error("Upsample does not allow in-place computation")
        num, channels, height, width = x.shape
        if self.size is not None:
            out = self.size
        else:
            out = (height * self.scale[0] - self.pad_out[0], width * self.scale[1] - self.pad_out[1])
        top[0].reshape(num, channels, *out)

    def _flat_index(self, mask, top):
        """Indices of the mask into top viewed flat; checked to fall inside each plane."""
        num, channels = mask.shape[:2]
        plane = top.shape[2] * top.shape[3]
        index = mask.reshape(num * channels, -1).astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= plane):
            raise self.error(f"mask index {int(index.max() if index.max() >= plane else index.min())} "
                             f"is outside the {top.shape[2]} x {top.shape[3]} output; the "
                             f"upsample size must match the input of the pooling that made the mask")
        index += (np.arange(num * channels) * plane)[:, None]
        return index.ravel()

    def forward(self, bottom, top):
        y = top[0].data
        if len(bottom) == 1:
            sh, sw = self.scale
            y.reshape(y.shape[0], y.shape[1], -1, sh, y.shape[3] // sw, sw)[...] = \
                bottom[0].data[:, :, :, None, :, None]
            return
        self._index = self._flat_index(bottom[1].data, y)
        y[...] = 0
        y.reshape(-1)[self._index] = bottom[0].data.reshape(-1)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy, dx = top[0].diff, bottom[0].diff
        if len(bottom) == 1:
            sh, sw = self.scale
            n, c, h, w = dx.shape
            dx[...] = dy.reshape(n, c, h, sh, w, sw).sum(axis=(3, 5))
            return
        dx.reshape(-1)[...] = dy.reshape(-1)[self._flat_index(bottom[1].data, dy)]
        if len(propagate_down) > 1 and propagate_down[1]:
            bottom[1].diff[...] = 0

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0
