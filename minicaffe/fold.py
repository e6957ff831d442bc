"""Folding per-channel affine layers into the Convolution / InnerProduct before them (inference).

At TEST a BatchNorm with global statistics is y = (x - mean) / sqrt(var + eps), and a one-bottom
Scale or Bias is y = gamma * x + beta: both are y = a * x + c per channel. Applied in place to the
output of W * x + b, the chain is one product with W' = a * W (row by output channel) and
b' = a * b + c, so the folded layers' passes over memory disappear. The net's own parameters are
not touched: the product runs from a copy of the layer that holds W' and b'. Where W has more
values than the product's output (1x1 layers on small maps at batch 1), the copy keeps the net's
own W and scales its output by a instead (`output_scale`), so the net holds no second W.

An in-place ReLU straight after the product (or after its folded chain) is fused as well: the
copy gets `fused_relu_slope` and applies max(y, 0) + slope * min(y, 0) to its own output, so
the ReLU layer is not run (nor its pass over a blob that has left the cache). An in-place ReLU
after an Eltwise is fused into it the same way.
"""
import copy

import numpy as np

from .blob import Blob
from .layer import BlobVec

__all__ = ["fold_affine_chains", "freeze_weights"]

_PRODUCTS = ("Convolution", "InnerProduct")


def _affine(layer):
    """(a, c) of a foldable per-channel layer, or None when it cannot be folded."""
    if layer.type == "BatchNorm":
        if not layer.use_global_stats:
            return None
        mean, var, normalizer = (b.data for b in layer.blobs)
        factor = 0.0 if normalizer[0] == 0 else 1.0 / float(normalizer[0])
        inv_std = 1.0 / np.sqrt(var * factor + layer.eps)
        return inv_std, -mean * factor * inv_std
    if layer.type in ("Scale", "Bias") and len(layer.layer_param.bottom) == 1:
        param = layer.layer_param.scale_param if layer.type == "Scale" else layer.layer_param.bias_param
        if param.axis != 1 or param.num_axes != 1:
            return None
        if layer.type == "Bias":
            beta = layer.blobs[0].data
            return np.ones_like(beta), beta
        gamma = layer.blobs[0].data
        beta = layer.blobs[layer.bias_index].data if layer.bias_index is not None else np.zeros_like(gamma)
        return gamma, beta
    return None


def _product_weight(layer):
    """The product's weight as (out_channels, rest) rows, and whether it may be folded at all."""
    if layer.type == "Convolution":
        return layer.blobs[0].data.reshape(layer.num_output, -1), layer.channel_axis == 1
    w = layer.blobs[0].data
    # InnerProduct's channel axis is its output axis; BatchNorm's is axis 1.
    return (w.T if layer.transpose else w), layer.axis == 1


def fold_affine_chains(layers, bottom_ids, top_ids, top_counts):
    """Plan the folding of every in-place affine chain (and ReLU) straight after a product.

    top_counts[i]: the element count of layer i's (first) top, at the net's current shapes.

    Returns {product index: (a copy of the layer with folded params, the indices of the layers
    that copy now computes)}.
    """
    folds = {}
    for i, layer in enumerate(layers):
        if layer.type == "Eltwise":   # a residual sum and the ReLU after it (ResNets)
            relu = _fusable_relu(layers, bottom_ids, top_ids, i + 1, top_ids[i][0])
            if relu is not None:
                rectified = copy.copy(layer)
                rectified.fused_relu_slope = relu
                folds[i] = (rectified, [i + 1])
            continue
        if layer.type not in _PRODUCTS or len(top_ids[i]) != 1 or len(bottom_ids[i]) != 1:
            continue
        rows, foldable = _product_weight(layer)
        if not foldable:
            continue
        out = top_ids[i][0]
        scale = np.ones(rows.shape[0], dtype=np.float64)
        shift = np.zeros(rows.shape[0], dtype=np.float64)
        chain = []
        for j in range(i + 1, len(layers)):
            if bottom_ids[j] != [out] or top_ids[j] != [out]:
                break
            affine = _affine(layers[j])
            if affine is None or np.shape(affine[0]) != scale.shape:
                break
            a, c = (np.asarray(v, dtype=np.float64) for v in affine)
            scale, shift = a * scale, a * shift + c
            chain.append(j)
        relu = _fusable_relu(layers, bottom_ids, top_ids, i + len(chain) + 1, out)
        if relu is not None:
            chain.append(i + len(chain) + 1)
        if not chain:
            continue
        if relu is not None and len(chain) == 1:     # a ReLU alone: the product's own params
            product = _copy_product(layer)
            product.fused_relu_slope = relu
            folds[i] = (product, chain)
            continue
        bias = layer.blobs[1].data if layer.bias_term else 0.0
        dtype = layer.blobs[0].dtype
        product = _copy_product(layer)
        if rows.size > top_counts[i]:
            # More weights than outputs: scaling the output costs a pass over fewer values than
            # a copy of the weights holds (MobileNet's 14x14 and 7x7 1x1 layers: 12 of its 16 MB).
            weight = layer.blobs[0]
            product.output_scale = scale.astype(dtype)
        else:
            folded_rows = (rows * scale[:, None]).astype(rows.dtype)
            weight = Blob(layer.blobs[0].shape, dtype=dtype)
            if layer.type == "InnerProduct" and layer.transpose:
                weight.data[...] = folded_rows.T
            else:
                weight.data[...] = folded_rows.reshape(weight.shape)
        folded_bias = Blob((rows.shape[0],), dtype=dtype)   # a * (W x + b) + c = a W x + (a b + c)
        folded_bias.data[...] = scale * bias + shift
        product.blobs = BlobVec([weight, folded_bias], dtype=dtype)
        product.bias_term = True
        product.fused_relu_slope = relu
        folds[i] = (product, chain)
    return folds


def _copy_product(layer):
    """A shallow copy of the layer, minus the caches derived from its weights (Winograd's), which
    the copy, with its own weights, must not share with the original."""
    product = copy.copy(layer)
    product.__dict__.pop("_winograd_kernels", None)
    product.__dict__.pop("_winograd", None)
    return product


def _fusable_relu(layers, bottom_ids, top_ids, j, blob):
    """The negative_slope of layer j when it is a ReLU in place on `blob`, else None."""
    if j >= len(layers) or layers[j].type != "ReLU" or bottom_ids[j] != [blob] or top_ids[j] != [blob]:
        return None
    return float(layers[j].negative_slope)


def freeze_weights(layers):
    """Tell the layers of an inference plan that their weights change only when the net refolds
    (copy_from, fold_params), so caches derived from them (Winograd's) skip their checks."""
    for layer in layers:
        freeze = getattr(layer, "freeze_weights", None)
        if freeze is not None:
            freeze()
