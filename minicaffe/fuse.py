"""Fusing in-place BatchNorm -> Scale (-> ReLU) chains of a training net into one step each.

ResNet-style nets follow almost every convolution with three in-place layers on its output. Run
one by one they walk the blob about nine times per iteration; as one step
(layers.normalization.BatchNormScaleReLU) four times, with the same forward bit for bit and the
same gradients to float32 rounding. The inference path goes further (fold.py folds TEST chains
into the convolution's weights); this is for nets that train, where the statistics change every
batch.

A chain is fused only where running it as one step cannot be told apart from running its layers:
every layer is in place on the same single blob, none has a loss weight, and either all of them
run backward with every bottom diff wanted, or none of them does (a TEST net). The Net falls back
to the layers themselves whenever something looks inside the chain: debug_info, callbacks, or a
forward/backward over part of the net.
"""
from .layers.normalization import BatchNormScaleReLU

__all__ = ["fuse_normalization_chains"]


def _in_place_on(blob, bottom_ids, top_ids, j):
    return bottom_ids[j] == [blob] and top_ids[j] == [blob]


def _is_channel_scale(layer):
    """A Scale with its own (C,) gamma on axis 1: the per-channel affine of batch norm."""
    p = layer.layer_param.scale_param
    return (layer.type == "Scale" and len(layer.layer_param.bottom) == 1 and p.axis == 1
            and p.num_axes == 1)


def fuse_normalization_chains(layers, bottom_ids, top_ids, layer_need_backward, bottom_need_backward):
    """{index of the BatchNorm: (the fused step, indices of the layers it runs)} for every
    fusable chain of `layers` (the Net's per-layer lists)."""
    fused = {}
    n = len(layers)
    for i, layer in enumerate(layers):
        if layer.type != "BatchNorm" or len(bottom_ids[i]) != 1 or bottom_ids[i] != top_ids[i]:
            continue
        blob = top_ids[i][0]
        if not (i + 1 < n and _in_place_on(blob, bottom_ids, top_ids, i + 1) and _is_channel_scale(layers[i + 1])):
            continue
        chain = [i, i + 1]
        relu = None
        k = i + 2
        if (k < n and layers[k].type == "ReLU" and _in_place_on(blob, bottom_ids, top_ids, k)
                and layers[k].negative_slope >= 0):   # y > 0 exactly when x > 0: no input copy needed
            relu = layers[k]
            chain.append(k)
        if any(any(layers[j].loss_weights) for j in chain):
            continue
        needs = [layer_need_backward[j] and all(bottom_need_backward[j]) for j in chain]
        if any(needs) and not all(needs):
            continue
        fused[i] = (BatchNormScaleReLU(layers[i], layers[i + 1], relu), chain)
    return fused
