"""pycaffe's Detector: R-CNN-style windowed detection with a TEST-phase Net.

Each window (ymin, xmin, ymax, xmax) of an image is cut out, optionally with a
border of surrounding context (`context_pad` pixels of the net's input are
context, as R-CNN's feature extraction does), warped to the net's input size,
and classified; the result is one {"window", "prediction", "filename"} per window.
"""
import os

import numpy as np

from . import io
from .classifier import input_transformer
from .net import Net
from .proto import caffe_pb2

__all__ = ["Detector"]


class Detector(Net):
    """`Detector(model, weights, mean=None, input_scale=None, raw_scale=None,
    channel_swap=None, context_pad=None)`, pycaffe's signature."""

    def __init__(self, model_file, pretrained_file, mean=None, input_scale=None, raw_scale=None,
                 channel_swap=None, context_pad=None):
        super().__init__(model_file, caffe_pb2.TEST, weights=pretrained_file)
        self.transformer = input_transformer(self, "Detector", model_file, mean, input_scale,
                                             raw_scale, channel_swap)
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows):
        """Classify every window of every image: `images_windows` is an iterable of
        (image filename, windows), a window being (ymin, xmin, ymax, xmax) in pixels."""
        images_windows = [(fname, [np.asarray(w) for w in windows])
                          for fname, windows in images_windows]
        crops = []
        for fname, windows in images_windows:
            image = io.load_image(fname).astype(np.float32)
            crops.extend(self.crop(image, window) for window in windows)
        if not crops:
            return []
        name = self.inputs[0]
        batch = np.stack([self.transformer.preprocess(name, c) for c in crops])
        predictions = self.forward_all(**{name: batch})[self.outputs[0]]
        pairs = [(fname, w) for fname, windows in images_windows for w in windows]
        return [{"window": w, "prediction": p, "filename": fname}
                for (fname, w), p in zip(pairs, predictions)]

    def detect_selective_search(self, image_fnames):
        """detect_windows over Selective Search proposals, as pycaffe: needs the
        selective_search_ijcv_with_python package (and MATLAB) that pycaffe uses."""
        try:
            import selective_search_ijcv_with_python as selective_search
        except ImportError:
            raise ImportError("detect_selective_search needs the selective_search_ijcv_with_python "
                              "package (github.com/sergeyk/selective_search_ijcv_with_python, with "
                              "MATLAB), as pycaffe's does; or pass your own windows to "
                              "detect_windows") from None
        image_fnames = [os.path.abspath(f) for f in image_fnames]
        windows = selective_search.get_windows(image_fnames, cmd="selective_search_rcnn")
        return self.detect_windows(zip(image_fnames, windows))

    def crop(self, im, window):
        """The (H, W, K) window of `im`, with context around it when context_pad is set
        (the part of the context box outside the image filled with the mean)."""
        window = np.asarray(window)
        if not self.context_pad:
            return im[window[0]:window[2], window[1]:window[3]]
        size = self.crop_dims[0]   # the net's input is square here, as in R-CNN
        scale = size / (size - 2.0 * self.context_pad)
        half = np.array([(window[2] - window[0] + 1) / 2.0, (window[3] - window[1] + 1) / 2.0])
        centre = window[:2] + half
        box = np.round(np.concatenate([centre - scale * half, centre + scale * half]))
        scale_h = size / (box[2] - box[0] + 1)
        scale_w = size / (box[3] - box[1] + 1)
        pad_y = int(round(max(0, -box[0]) * scale_h))   # context rows above the image
        pad_x = int(round(max(0, -box[1]) * scale_w))
        im_h, im_w = im.shape[:2]
        box = np.clip(box, 0, [im_h, im_w, im_h, im_w]).astype(int)
        clip_h, clip_w = box[2] - box[0] + 1, box[3] - box[1] + 1
        if clip_h <= 0 or clip_w <= 0:
            raise ValueError(f"window {window.tolist()} lies outside the {im_h}x{im_w} image")
        crop_h = min(int(round(clip_h * scale_h)), size - pad_y)
        crop_w = min(int(round(clip_w * scale_w)), size - pad_x)
        context = io.resize_image(im[box[0]:box[2], box[1]:box[3]], (crop_h, crop_w))
        out = np.array(np.broadcast_to(self.crop_mean, tuple(self.crop_dims)), dtype=np.float32)
        out[pad_y:pad_y + crop_h, pad_x:pad_x + crop_w] = context
        return out

    def configure_crop(self, context_pad):
        """Set the crop size (the net's input, as H, W, K) and the context border; with context,
        the border outside an image is the mean, taken back to raw image space."""
        name = self.inputs[0]
        order = self.transformer.transpose[name]
        self.crop_dims = np.array(self.blobs[name].data.shape[1:])[np.argsort(order)]
        self.context_pad = context_pad
        if not context_pad:
            return
        if 2 * context_pad >= min(self.crop_dims[:2]):
            raise ValueError(f"context_pad {context_pad} leaves no room for the window in the "
                             f"net's {self.crop_dims[0]}x{self.crop_dims[1]} input; it must be "
                             f"under half the input size")
        mean = self.transformer.mean.get(name)
        if mean is None:
            self.crop_mean = np.zeros(tuple(self.crop_dims), dtype=np.float32)
            return
        mean = np.broadcast_to(mean, self.blobs[name].data.shape[1:]).transpose(np.argsort(order))
        swap = self.transformer.channel_swap.get(name)
        if swap is not None:
            mean = mean[:, :, np.argsort(swap)]
        raw_scale = self.transformer.raw_scale.get(name)
        self.crop_mean = np.array(mean / raw_scale if raw_scale is not None else mean,
                                  dtype=np.float32)
