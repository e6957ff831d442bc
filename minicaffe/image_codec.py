"""Image files <-> (C, H, W) uint8 arrays in Caffe's BGR order, with Pillow.

Decoding needs Pillow, an optional dependency (`pip install minicaffe[image]`);
resizing is bilinear with OpenCV's pixel-centre convention, done in numpy
(results can differ from OpenCV's fixed-point arithmetic by one grey level).
Both the database layer (encoded Datums) and the dataset tools use this module,
which depends on neither.
"""
import io
import os

import numpy as np

from .errors import MinicaffeError

__all__ = ["ImageError", "load_image", "decode_image", "encode_image", "resize_bilinear",
           "require_pillow"]


class ImageError(MinicaffeError, ValueError):
    """An image list or image file that cannot be used."""


def require_pillow():
    try:
        from PIL import Image
    except ImportError:
        raise ImageError("reading images needs Pillow: pip install minicaffe[image] "
                         "(or pip install Pillow)") from None
    return Image


def _to_caffe_array(img, is_color):
    """A PIL image as a (C, H, W) uint8 BGR (or 1-channel) array."""
    if is_color:
        hwc = np.asarray(img.convert("RGB"))[:, :, ::-1]
    else:
        hwc = np.asarray(img.convert("L"))[:, :, None]
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def load_image(path, new_height=0, new_width=0, is_color=True):
    """Read an image file as (C, H, W) uint8 BGR, resized when both sizes are given."""
    Image = require_pillow()
    try:
        with Image.open(path) as img:
            array = _to_caffe_array(img, is_color)
    except (OSError, ValueError) as exc:
        raise ImageError(f"could not load image {os.fspath(path)!r}: {exc}") from None
    if new_height > 0 and new_width > 0:
        array = resize_bilinear(array, new_height, new_width)
    return array


def decode_image(data, force_color=False, force_gray=False):
    """Decode an encoded Datum's bytes to (C, H, W): native channel count unless forced."""
    Image = require_pillow()
    try:
        with Image.open(io.BytesIO(data)) as img:
            if force_color or force_gray:
                is_color = force_color
            else:
                is_color = img.mode not in ("1", "L", "LA", "I", "I;16", "F")
            return _to_caffe_array(img, is_color)
    except (OSError, ValueError) as exc:
        raise ImageError(f"could not decode an encoded Datum: {exc}") from None


def encode_image(array, fmt):
    """Encode a (C, H, W) uint8 BGR/gray array as image file bytes ('png', 'jpg', ...)."""
    Image = require_pillow()
    hwc = array.transpose(1, 2, 0)
    img = Image.fromarray(hwc[:, :, 0]) if hwc.shape[2] == 1 else Image.fromarray(
        np.ascontiguousarray(hwc[:, :, ::-1]))
    name = Image.registered_extensions().get("." + fmt.lower())
    if name is None:
        raise ImageError(f"unknown image encoding {fmt!r}")
    buf = io.BytesIO()
    img.save(buf, format=name)
    return buf.getvalue()


def _axis_weights(size_in, size_out):
    """Source indices (i0, i1) and weight of i1 for each output position (OpenCV's INTER_LINEAR)."""
    pos = (np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5
    i0 = np.floor(pos).astype(np.int64)
    frac = pos - i0
    frac[i0 < 0] = 0.0
    i0 = np.clip(i0, 0, size_in - 1)
    frac[i0 >= size_in - 1] = 0.0
    i1 = np.minimum(i0 + 1, size_in - 1)
    return i0, i1, frac.astype(np.float32)


def resize_bilinear(array, height, width):
    """Resize a (C, H, W) uint8 array to (C, height, width) bilinearly, rounding to uint8."""
    c, h, w = array.shape
    if (h, w) == (height, width):
        return array.copy()
    y0, y1, fy = _axis_weights(h, height)
    x0, x1, fx = _axis_weights(w, width)
    src = array.astype(np.float32)
    rows = src[:, y0, :] * (1 - fy)[:, None] + src[:, y1, :] * fy[:, None]
    out = rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
