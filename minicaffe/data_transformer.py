"""DataTransformer: Caffe's `transform_param`, applied to a whole batch at once.

For every item, with (C, H, W) input and crop size k (0 = no crop):

    out[c, y, x] = (in[c, y0 + y, x0 + x'] - mean) * scale,   x' = x or k-1-x if mirrored

where `mean` is the mean image at that input pixel (`mean_file`), one value per
channel (`mean_value`), or 0. The crop offset (y0, x0) is random in TRAIN and
centred in TEST; with `mirror: true` each item is flipped left-right with
probability 1/2 (in both phases, as Caffe does). Random draws come from the
transformer's own generator, seeded from `minicaffe.rng.get_rng()` when it is
built, so a solver's `random_seed` fixes them.
"""
import os

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .blob import Blob
from .errors import MinicaffeError
from .proto import caffe_pb2
from . import rng as _rng

__all__ = ["DataTransformer", "TransformError", "load_mean_file"]


class TransformError(MinicaffeError, ValueError):
    """Bad transform_param, or an input the transform cannot handle."""


def load_mean_file(path):
    """The (C, H, W) float32 mean image stored in a BlobProto `.binaryproto` file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TransformError(f"mean_file {path!r} not found (make one with "
                             f"`minicaffe compute-image-mean DB {os.path.basename(path) or 'mean.binaryproto'}`)")
    proto = caffe_pb2.BlobProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
        mean = Blob(Blob.proto_shape(proto)).from_proto(proto).data.copy()
    except Exception as exc:
        raise TransformError(f"mean_file {path!r} is not a BlobProto file: {exc}") from None
    if mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim != 3:
        raise TransformError(f"mean_file {path!r} holds a blob of shape {mean.shape}; "
                             f"expected (1, channels, height, width)")
    return mean


class DataTransformer:
    """Scale, mean subtraction, crop and mirror of (N, C, H, W) batches."""

    def __init__(self, transform_param=None, phase=caffe_pb2.TRAIN, dtype=np.float32, rng=None):
        param = transform_param if transform_param is not None else caffe_pb2.TransformationParameter()
        self.param = param
        self.phase = phase
        self.dtype = np.dtype(dtype)
        self.scale = self.dtype.type(param.scale)
        self.crop_size = int(param.crop_size)
        self.mirror = bool(param.mirror)
        if param.force_color and param.force_gray:
            raise TransformError("cannot set both force_color and force_gray")
        self.mean = None          # (C, H, W) mean image, or
        self.mean_values = None   # one value per channel (or a single one)
        if param.HasField("mean_file"):
            if len(param.mean_value):
                raise TransformError("cannot specify mean_file and mean_value at the same time")
            self.mean = load_mean_file(param.mean_file).astype(self.dtype)
        elif len(param.mean_value):
            self.mean_values = np.asarray(param.mean_value, dtype=self.dtype)
        if rng is None:
            # A private stream: the prefetch thread may draw at any time without
            # disturbing (or being disturbed by) the main thread's generator.
            rng = np.random.default_rng(int(_rng.get_rng().integers(2 ** 63 - 1)))
        self.rng = rng

    def output_shape(self, shape):
        """(C, h, w) that a (C, H, W) input becomes; checks the input against the params."""
        if len(shape) != 3:
            raise TransformError(f"expected a (channels, height, width) input, got shape {tuple(shape)}")
        c, h, w = (int(d) for d in shape)
        if c <= 0:
            raise TransformError(f"input has {c} channels; at least one is needed")
        k = self.crop_size
        if k > h or k > w:
            raise TransformError(f"crop_size {k} is larger than the {h}x{w} input image")
        if self.mean is not None and self.mean.shape != (c, h, w):
            raise TransformError(f"mean_file {self.param.mean_file!r} is {_fmt(self.mean.shape)} but the "
                                 f"input images are {_fmt((c, h, w))}; they must match (before cropping)")
        if self.mean_values is not None and len(self.mean_values) not in (1, c):
            raise TransformError(f"give either 1 mean_value or one per channel ({c}), "
                                 f"got {len(self.mean_values)}")
        return (c, k, k) if k else (c, h, w)

    def transform(self, batch, out=None):
        """Transform an (N, C, H, W) uint8/float batch into `out` (N, C, h, w) of self.dtype."""
        batch = np.asarray(batch)
        if batch.ndim != 4:
            raise TransformError(f"expected an (N, C, H, W) batch, got shape {batch.shape}")
        n = batch.shape[0]
        c, h, w = self.output_shape(batch.shape[1:])
        if out is None:
            out = np.empty((n, c, h, w), dtype=self.dtype)
        elif out.shape != (n, c, h, w):
            raise TransformError(f"output buffer has shape {out.shape}, expected {(n, c, h, w)}")

        in_h, in_w = batch.shape[2:]
        # Draw in Caffe's order: mirror coin first, then the crop offsets.
        flip = self.rng.integers(0, 2, size=n).astype(bool) if self.mirror else None
        if self.crop_size and self.phase == caffe_pb2.TRAIN:
            y0 = self.rng.integers(0, in_h - h + 1, size=n)
            x0 = self.rng.integers(0, in_w - w + 1, size=n)
        else:
            y0 = np.full(n, (in_h - h) // 2)
            x0 = np.full(n, (in_w - w) // 2)

        mean = self.mean
        if flip is None and (not self.crop_size or self.phase != caffe_pb2.TRAIN):
            # Same window for every item: plain slicing.
            top, left = (in_h - h) // 2, (in_w - w) // 2
            ys, xs = slice(top, top + h), slice(left, left + w)
            pixels = batch[:, :, ys, xs]
            if mean is not None:
                mean = mean[:, ys, xs]
        else:
            # Per-item windows: view every h x w window of the batch, then pick
            # item i's window at (y0[i], x0[i]) with one fancy-index gather.
            windows = sliding_window_view(batch, (h, w), axis=(2, 3))
            pixels = windows[np.arange(n), :, y0, x0]
            if mean is not None:
                mean = sliding_window_view(mean, (h, w), axis=(1, 2))[:, y0, x0].transpose(1, 0, 2, 3)
            if flip is not None and flip.any():
                pixels[flip] = pixels[flip, :, :, ::-1]
                if mean is not None:
                    mean = mean.copy()
                    mean[flip] = mean[flip, :, :, ::-1]

        if mean is None and self.mean_values is not None:
            mean = self.mean_values.reshape(1, -1, 1, 1)
        if mean is not None:
            np.subtract(pixels, mean, out=out, dtype=self.dtype, casting="unsafe")
        else:
            out[...] = pixels
        if self.scale != 1:
            np.multiply(out, self.scale, out=out)
        return out


def _fmt(shape):
    return "x".join(str(d) for d in shape)
