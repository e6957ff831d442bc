"""A custom layer as a minicaffe plugin: Swish with a learnable slope per channel.

    y = x * sigmoid(beta[c] * x)          beta has one value per channel (axis 1)

Caffe's Swish layer has a fixed beta (swish_param.beta); here beta is a
parameter the solver learns, starting from swish_param.beta (default 1). Load
the module with `--plugin models/custom_layer/my_layers.py` (or put its folder
on PYTHONPATH and use `--plugin my_layers`), then write `type: "LearnableSwish"`.

Gradients, with s = sigmoid(beta * x):
    dy/dx    = s + beta * x * s * (1 - s)
    dy/dbeta = x^2 * s * (1 - s)
"""
import numpy as np

import minicaffe
from minicaffe import Blob


@minicaffe.register_layer("LearnableSwish")
class LearnableSwishLayer(minicaffe.Layer):
    """top = bottom * sigmoid(beta[c] * bottom), beta learnable, shape (channels,)."""

    exact_num_bottom = 1
    exact_num_top = 1
    allows_in_place = True

    def layer_setup(self, bottom, top):
        if bottom[0].data.ndim < 2:
            raise self.error(f"needs a bottom with a channel axis (N, C, ...), got shape "
                             f"{bottom[0].shape}")
        if self.blobs_loaded:  # weights came with the net definition: keep them
            return
        beta = Blob((bottom[0].shape[1],), dtype=self.dtype)
        beta.data[...] = self.layer_param.swish_param.beta
        self.blobs = [beta]

    def reshape(self, bottom, top):
        channels = bottom[0].shape[1] if bottom[0].data.ndim >= 2 else None
        if channels != self.blobs[0].shape[0]:
            raise self.error(f"bottom has {channels} channels but beta was made for "
                             f"{self.blobs[0].shape[0]}")
        top[0].reshape(bottom[0].shape)
        # Kept for backward; x is copied because in place the top overwrites it.
        self.x = np.empty(bottom[0].shape, dtype=self.dtype)
        self.s = np.empty(bottom[0].shape, dtype=self.dtype)

    def _beta(self, ndim):
        # beta[c] broadcast against (N, C, H, W, ...)
        return self.blobs[0].data.reshape((1, -1) + (1,) * (ndim - 2))

    def forward(self, bottom, top):
        x, s = self.x, self.s
        x[...] = bottom[0].data
        np.multiply(self._beta(x.ndim), x, out=s)
        # sigmoid written as 1 / (1 + exp(-z)); exp may overflow to inf for very
        # negative z, which still gives the right limit 0.
        with np.errstate(over="ignore"):
            np.exp(-s, out=s)
        s += 1
        np.reciprocal(s, out=s)
        np.multiply(x, s, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        x, s = self.x, self.s
        g = top[0].diff
        ds = s * (1 - s)                                    # sigmoid'(beta x)
        if self.param_propagate_down[0]:
            per_channel = (g * x * x * ds).reshape(x.shape[0], x.shape[1], -1)
            self.blobs[0].diff[...] += per_channel.sum(axis=(0, 2))
        if propagate_down[0]:
            bottom[0].diff[...] = g * (s + self._beta(x.ndim) * x * ds)
