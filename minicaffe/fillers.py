"""Weight fillers, as Caffe's FillerParameter types; all draw from minicaffe.rng."""
import math

import numpy as np

from .proto import caffe_pb2
from .rng import get_rng

__all__ = ["fill", "FILLERS"]

_VN = caffe_pb2.FillerParameter


def _fans(blob):
    shape = blob.shape
    count = blob.count()
    fan_in = count // shape[0]
    fan_out = count // shape[1] if len(shape) > 1 else count
    return fan_in, fan_out


def _fan(blob, param):
    fan_in, fan_out = _fans(blob)
    if param.variance_norm == _VN.AVERAGE:
        return (fan_in + fan_out) / 2.0
    if param.variance_norm == _VN.FAN_OUT:
        return float(fan_out)
    return float(fan_in)


# Draws come in float64; drawing a big blob (VGG16's fc6: 103M weights) at once would hold a
# float64 copy of it, so values are drawn this many at a time: the same stream, in pieces.
_DRAW_CHUNK = 1 << 20


def _draw(blob, draw, *args):
    """blob.data = draw(*args, size=blob.count) from the shared generator, in chunks."""
    flat = blob.data.reshape(-1)
    for lo in range(0, flat.size, _DRAW_CHUNK):
        hi = min(flat.size, lo + _DRAW_CHUNK)
        flat[lo:hi] = draw(*args, hi - lo)


def _constant(blob, p):
    blob.data[...] = p.value


def _uniform(blob, p):
    _draw(blob, get_rng().uniform, p.min, p.max)


def _gaussian(blob, p):
    if p.sparse >= 0 and blob.num_axes < 1:
        raise ValueError("gaussian filler with sparse needs a blob with at least one axis")
    _draw(blob, get_rng().normal, p.mean, p.std)
    if p.sparse >= 0:
        # Each output keeps on average `sparse` non-zero incoming weights.
        keep = p.sparse / blob.shape[0]
        flat = blob.data.reshape(-1)
        for lo in range(0, flat.size, _DRAW_CHUNK):
            hi = min(flat.size, lo + _DRAW_CHUNK)
            flat[lo:hi] *= get_rng().random(hi - lo) < keep


def _positive_unitball(blob, p):
    values = get_rng().random(blob.shape)
    rows = values.reshape(blob.shape[0], -1)
    rows /= rows.sum(axis=1, keepdims=True)
    blob.data[...] = values


def _xavier(blob, p):
    scale = math.sqrt(3.0 / _fan(blob, p))
    _draw(blob, get_rng().uniform, -scale, scale)


def _msra(blob, p):
    std = math.sqrt(2.0 / _fan(blob, p))
    _draw(blob, get_rng().normal, 0.0, std)


def _bilinear(blob, p):
    """Kernel of bilinear interpolation, for upsampling with a Deconvolution layer."""
    if blob.num_axes != 4 or blob.shape[2] != blob.shape[3]:
        raise ValueError(f"bilinear filler needs a 4-d blob with square kernels, got {blob.shape}")
    k = blob.shape[3]
    f = math.ceil(k / 2.0)
    c = (k - 1) / (2.0 * f)
    ramp = 1.0 - np.abs(np.arange(k) / f - c)
    blob.data[...] = np.outer(ramp, ramp)


FILLERS = {
    "constant": _constant,
    "uniform": _uniform,
    "gaussian": _gaussian,
    "positive_unitball": _positive_unitball,
    "xavier": _xavier,
    "msra": _msra,
    "bilinear": _bilinear,
}


def fill(blob, filler_param, what="blob"):
    """Fill `blob.data` as `filler_param` (a FillerParameter) says."""
    fn = FILLERS.get(filler_param.type)
    if fn is None:
        raise ValueError(f"{what}: unknown filler type {filler_param.type!r}; "
                         f"known: {', '.join(sorted(FILLERS))}")
    if filler_param.sparse >= 0 and filler_param.type != "gaussian":
        raise ValueError(f"{what}: filler {filler_param.type!r} does not support sparse")
    if blob.count() == 0:
        return blob
    fn(blob, filler_param)
    return blob
