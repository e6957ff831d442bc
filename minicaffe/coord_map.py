"""pycaffe's caffe.coord_map: how spatial coordinates move between NetSpec tops.

A map is (axis, scale, shift): output coordinate = scale * input coordinate + shift,
along the spatial axes from `axis` on (axis None: the map does not care, as for
pointwise layers). `crop(top_from, top_to)` builds the Crop layer that aligns
`top_from` with `top_to`, as FCN-style nets need.
"""
import numpy as np

from .net_spec import layers as L

__all__ = ["PASS_THROUGH_LAYERS", "UndefinedMapException", "AxisMismatchException",
           "conv_params", "crop_params", "coord_map", "compose", "inverse",
           "coord_map_from_to", "crop"]

# Layers that keep every coordinate where it is.
PASS_THROUGH_LAYERS = ["AbsVal", "BatchNorm", "Bias", "BNLL", "Dropout", "Eltwise", "ELU", "Log",
                       "LRN", "Exp", "MVN", "Power", "ReLU", "PReLU", "Scale", "Sigmoid", "Split",
                       "TanH", "Threshold"]

_LEGACY_HW = {"pad_h", "pad_w", "kernel_h", "kernel_w", "stride_h", "stride_w"}


class UndefinedMapException(Exception):
    """The layer has no coordinate map (it mixes or drops spatial positions)."""


class AxisMismatchException(Exception):
    """Two maps act on different axes and cannot be composed."""


def conv_params(fn):
    """(axis, stride, effective kernel extent, pad) of a Convolution/Deconvolution/Im2col/Pooling
    NetSpec function, each per spatial axis (numpy arrays)."""
    params = fn.params.get("convolution_param", fn.params)
    if _LEGACY_HW & set(params):
        raise ValueError(f"{fn.type_name}: coordinate maps do not support the legacy _h/_w "
                         f"parameters; give kernel_size/stride/pad per axis")
    kernel = np.array(params["kernel_size"], ndmin=1)
    dilation = np.array(params.get("dilation", 1), ndmin=1)
    return (params.get("axis", 1), np.array(params.get("stride", 1), ndmin=1),
            (kernel - 1) * dilation + 1, np.array(params.get("pad", 0), ndmin=1))


def crop_params(fn):
    """(axis, offset) of a Crop function, with Caffe's defaults (axis 2, offset 0)."""
    params = fn.params.get("crop_param", fn.params)
    return params.get("axis", 2), np.array(params.get("offset", 0), ndmin=1)


def coord_map(fn):
    """The (axis, scale, shift) map from a function's bottom to its top."""
    kind = fn.type_name
    if kind in ("Convolution", "Pooling", "Im2col"):
        axis, stride, extent, pad = conv_params(fn)
        # top i covers bottom [i*stride - pad, i*stride - pad + extent): its centre is the map
        return axis, 1 / stride, (pad - (extent - 1) / 2) / stride
    if kind == "Deconvolution":
        axis, stride, extent, pad = conv_params(fn)
        return axis, stride, (extent - 1) / 2 - pad
    if kind in PASS_THROUGH_LAYERS:
        return None, 1, 0
    if kind == "Crop":
        axis, offset = crop_params(fn)
        return axis - 1, 1, -offset   # the map's axis is the last one before the cropped ones
    raise UndefinedMapException(f"no coordinate map for a {kind} layer")


def compose(base_map, next_map):
    """Apply `base_map` after `next_map`: scales multiply, next's shift is scaled by base's."""
    ax1, a1, b1 = base_map
    ax2, a2, b2 = next_map
    if ax1 is not None and ax2 is not None and ax1 != ax2:
        raise AxisMismatchException(f"maps on axis {ax1} and axis {ax2} do not compose")
    return (ax2 if ax1 is None else ax1), a1 * a2, a1 * b2 + b1


def inverse(coord_map):
    """The map that undoes `coord_map`."""
    ax, a, b = coord_map
    return ax, 1 / a, -b / a


def _mapped_bottoms(top):
    # A Crop's second bottom only gives the size to crop to; coordinates flow through the first.
    inputs = top.fn.inputs
    return inputs[:1] if top.fn.type_name == "Crop" else inputs


def _maps_back_from(top):
    """Every ancestor reachable through mappable layers -> its map to `top`, in walk order."""
    maps = {top: (None, 1, 0)}
    order = [top]
    for current in order:
        try:
            step = coord_map(current.fn)
        except UndefinedMapException:
            continue
        for bottom in _mapped_bottoms(current):
            if bottom not in maps:
                maps[bottom] = compose(maps[current], step)
                order.append(bottom)
    return maps, order


def coord_map_from_to(top_from, top_to):
    """The map taking `top_from`'s coordinates to `top_to`'s, through their nearest common
    ancestor."""
    from_maps, _ = _maps_back_from(top_from)
    to_maps, order = _maps_back_from(top_to)
    for top in order:
        if top in from_maps:
            return compose(to_maps[top], inverse(from_maps[top]))
    raise RuntimeError("Could not compute map between tops; are they connected by spatial layers?")


def crop(top_from, top_to):
    """A Crop layer (NetSpec Top) cutting `top_from` down to align with `top_to`."""
    ax, a, b = coord_map_from_to(top_from, top_to)
    # AssertionError, as pycaffe raises (raised explicitly so python -O keeps the checks)
    if not np.all(a == 1):
        raise AssertionError(f"scale mismatch on crop (a = {a})")
    if not np.all(b <= 0):
        raise AssertionError(f"cannot crop negative offset (b = {b})")
    if not np.all(np.round(b) == b):
        raise AssertionError(f"cannot crop noninteger offset (b = {b})")
    return L.Crop(top_from, top_to,
                  crop_param=dict(axis=ax + 1, offset=list(-np.round(b).astype(int))))
