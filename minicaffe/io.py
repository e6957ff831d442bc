"""pycaffe's caffe.io: BlobProto/Datum conversions, image loading and the input Transformer."""
import numpy as np

from . import db as _db
from .proto import caffe_pb2

__all__ = ["blobproto_to_array", "array_to_blobproto", "arraylist_to_blobprotovector_str",
           "blobprotovector_str_to_arraylist", "array_to_datum", "datum_to_array",
           "load_image", "resize_image", "oversample", "Transformer"]


def blobproto_to_array(blob, return_diff=False):
    """The data (or diff) of a BlobProto as an array in the blob's shape."""
    values = blob.diff if return_diff else blob.data
    if return_diff and len(blob.double_diff):
        values = blob.double_diff
    elif not return_diff and len(blob.double_data):
        values = blob.double_data
    arr = np.array(values, dtype=np.float64 if values is blob.double_data or values is
                   blob.double_diff else np.float32)
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return arr.reshape(blob.num, blob.channels, blob.height, blob.width)
    return arr.reshape(tuple(blob.shape.dim))


def array_to_blobproto(arr, diff=None):
    """A BlobProto holding `arr` (and `diff`, same shape) as float data."""
    arr = np.asarray(arr)
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(arr.shape)
    blob.data.extend(arr.astype(np.float32).ravel().tolist())
    if diff is not None:
        diff = np.asarray(diff)
        if diff.shape != arr.shape:
            raise ValueError(f"array_to_blobproto: diff shape {diff.shape} differs from data shape {arr.shape}")
        blob.diff.extend(diff.astype(np.float32).ravel().tolist())
    return blob


def arraylist_to_blobprotovector_str(arraylist):
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend(array_to_blobproto(a) for a in arraylist)
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(serialized):
    vec = caffe_pb2.BlobProtoVector.FromString(serialized)
    return [blobproto_to_array(b) for b in vec.blobs]


def array_to_datum(arr, label=None):
    """A Datum from a (C, H, W) array: uint8 arrays as bytes, others as float_data."""
    return _db.array_to_datum(arr, label)


def datum_to_array(datum):
    """The (C, H, W) array in a Datum (uint8 for byte data, float32 for float_data)."""
    return _db.datum_to_array(datum)


def load_image(filename, color=True):
    """An image file as float32 (H, W, 3) in [0, 1] (or (H, W, 1) with color=False). Needs Pillow."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("load_image needs Pillow: pip install 'minicaffe[image]'") from None
    with Image.open(filename) as im:
        im = im.convert("RGB" if color else "L")
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return arr if color else arr[:, :, None]


def resize_image(im, new_dims, interp_order=1):
    """Resize an (H, W, K) image to new_dims (h, w): bilinear (order 1) or nearest (order 0)."""
    im = np.asarray(im, dtype=np.float32)
    h, w = im.shape[:2]
    nh, nw = int(new_dims[0]), int(new_dims[1])
    if (h, w) == (nh, nw):
        return im.copy()
    # Pixel centres map as in skimage/pycaffe: x_src = (x_dst + 0.5) * w / nw - 0.5.
    ys = np.clip((np.arange(nh) + 0.5) * h / nh - 0.5, 0, h - 1)
    xs = np.clip((np.arange(nw) + 0.5) * w / nw - 0.5, 0, w - 1)
    if interp_order == 0:
        return im[np.rint(ys).astype(int)][:, np.rint(xs).astype(int)]
    y0 = np.floor(ys).astype(int)
    x0 = np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy = (ys - y0).astype(np.float32)[:, None, None]
    wx = (xs - x0).astype(np.float32)[None, :, None]
    im3 = im if im.ndim == 3 else im[:, :, None]
    top = im3[y0][:, x0] * (1 - wx) + im3[y0][:, x1] * wx
    bottom = im3[y1][:, x0] * (1 - wx) + im3[y1][:, x1] * wx
    out = top * (1 - wy) + bottom * wy
    return out if im.ndim == 3 else out[:, :, 0]


def oversample(images, crop_dims):
    """Ten crops per image: four corners and centre, plus their mirrors. images: list of (H, W, K)."""
    crop_h, crop_w = crop_dims
    out = []
    for im in images:
        h, w = im.shape[:2]
        starts = [(0, 0), (0, w - crop_w), (h - crop_h, 0), (h - crop_h, w - crop_w),
                  ((h - crop_h) // 2, (w - crop_w) // 2)]
        crops = [im[y:y + crop_h, x:x + crop_w] for y, x in starts]
        out.extend(crops + [c[:, ::-1] for c in crops])
    return np.asarray(out, dtype=np.float32)


class Transformer:
    """Turns (H, W, K) images into (K, H, W) net inputs: resize, transpose, channel swap,
    raw scale, mean subtraction and input scale, in that order (pycaffe's Transformer).

    inputs: {blob name: input shape}, e.g. {"data": net.blobs["data"].data.shape}.
    """

    def __init__(self, inputs):
        self.inputs = {k: tuple(v) for k, v in inputs.items()}
        self.transpose, self.channel_swap = {}, {}
        self.raw_scale, self.mean, self.input_scale = {}, {}, {}

    def _check(self, name):
        if name not in self.inputs:
            raise KeyError(f"{name!r} is not one of the transformer's inputs: {list(self.inputs)}")

    def preprocess(self, name, data):
        self._check(name)
        x = np.asarray(data, dtype=np.float32)
        dims = self.inputs[name][2:]
        if x.shape[:2] != dims:
            x = resize_image(x, dims)
        if name in self.transpose:
            x = x.transpose(self.transpose[name])
        if name in self.channel_swap:
            x = x[list(self.channel_swap[name]), :, :]
        x = np.array(x, dtype=np.float32)
        if name in self.raw_scale:
            x *= self.raw_scale[name]
        if name in self.mean:
            x -= self.mean[name]
        if name in self.input_scale:
            x *= self.input_scale[name]
        return x

    def deprocess(self, name, data):
        self._check(name)
        x = np.array(data, dtype=np.float32).squeeze()
        if name in self.input_scale:
            x /= self.input_scale[name]
        if name in self.mean:
            x += self.mean[name]
        if name in self.raw_scale:
            x /= self.raw_scale[name]
        if name in self.channel_swap:
            x = x[np.argsort(self.channel_swap[name]), :, :]
        if name in self.transpose:
            x = x.transpose(np.argsort(self.transpose[name]))
        return x

    def set_transpose(self, name, order):
        self._check(name)
        if len(order) != len(self.inputs[name]) - 1:
            raise ValueError(f"transpose order {order} needs {len(self.inputs[name]) - 1} axes")
        self.transpose[name] = tuple(order)

    def set_channel_swap(self, name, order):
        self._check(name)
        if len(order) != self.inputs[name][1]:
            raise ValueError(f"channel swap {order} needs {self.inputs[name][1]} channels")
        self.channel_swap[name] = tuple(order)

    def set_raw_scale(self, name, scale):
        self._check(name)
        self.raw_scale[name] = np.float32(scale)

    def set_input_scale(self, name, scale):
        self._check(name)
        self.input_scale[name] = np.float32(scale)

    def set_mean(self, name, mean):
        """mean: one value per channel (K,) or a whole (K, H, W) image."""
        self._check(name)
        mean = np.asarray(mean, dtype=np.float32)
        k, h, w = self.inputs[name][1:]
        if mean.ndim == 1:
            if mean.shape[0] != k:
                raise ValueError(f"mean has {mean.shape[0]} channels but input {name!r} has {k}")
            mean = mean[:, None, None]
        elif mean.shape != (k, h, w):
            raise ValueError(f"mean shape {mean.shape} must be ({k},) or {(k, h, w)}")
        self.mean[name] = mean
