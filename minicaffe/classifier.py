"""pycaffe's Classifier: a TEST-phase Net that takes (H, W, K) images and returns class scores."""
import numpy as np

from . import io
from .net import Net
from .proto import caffe_pb2

__all__ = ["Classifier"]


def input_transformer(net, who, model_file, mean, input_scale, raw_scale, channel_swap):
    """pycaffe's preprocessing for (H, W, K) images fed to the net's first input."""
    if not net.inputs:
        raise ValueError(f"{who}: the net in {model_file} has no Input layer to feed")
    name = net.inputs[0]
    transformer = io.Transformer({name: net.blobs[name].data.shape})
    transformer.set_transpose(name, (2, 0, 1))
    if mean is not None:
        transformer.set_mean(name, mean)
    if input_scale is not None:
        transformer.set_input_scale(name, input_scale)
    if raw_scale is not None:
        transformer.set_raw_scale(name, raw_scale)
    if channel_swap is not None:
        transformer.set_channel_swap(name, channel_swap)
    return transformer


class Classifier(Net):
    """`Classifier(model, weights, image_dims=None, mean=None, input_scale=None, raw_scale=None,
    channel_swap=None)`; `predict(images, oversample=True)` -> (N, classes).

    Images are resized to image_dims (default: the net's input size), then either cut into ten
    crops (corners, centre and their mirrors, scores averaged) or centre-cropped to the net's input.
    mean is per channel (K,) or (K, H, W) in the net's channel order, as pycaffe expects.
    """

    def __init__(self, model_file, pretrained_file, image_dims=None, mean=None, input_scale=None,
                 raw_scale=None, channel_swap=None):
        super().__init__(model_file, caffe_pb2.TEST, weights=pretrained_file)
        self.transformer = input_transformer(self, "Classifier", model_file, mean, input_scale,
                                             raw_scale, channel_swap)
        self.crop_dims = np.array(self.blobs[self.inputs[0]].data.shape[2:])
        self.image_dims = self.crop_dims if image_dims is None else np.array(image_dims)

    def predict(self, inputs, oversample=True):
        """Scores of the net's first output for each (H, W, K) image in `inputs`."""
        images = np.stack([io.resize_image(im, self.image_dims) for im in inputs]).astype(np.float32)
        if oversample:
            images = io.oversample(images, self.crop_dims)
        else:
            top, left = ((self.image_dims - self.crop_dims) // 2).astype(int)
            images = images[:, top:top + self.crop_dims[0], left:left + self.crop_dims[1], :]
        name = self.inputs[0]
        batch = np.stack([self.transformer.preprocess(name, im) for im in images])
        scores = self.forward_all(**{name: batch})[self.outputs[0]]
        if oversample:
            scores = scores.reshape(len(scores) // 10, 10, -1).mean(axis=1)
        return scores
