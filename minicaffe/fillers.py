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


def _constant(blob, p):
    blob.data[...] = p.value


def _uniform(blob, p):
    blob.data[...] = get_rng().uniform(p.min, p.max, blob.shape)


def _gaussian(blob, p):
    blob.data[...] = get_rng().normal(p.mean, p.std, blob.shape)
    if p.sparse >= 0:
        # Each output keeps on average `sparse` non-zero incoming weights.
        if blob.num_axes < 1:
            raise ValueError("gaussian filler with sparse needs a blob with at least one axis")
        keep = p.sparse / blob.shape[0]
        blob.data[...] *= get_rng().random(blob.shape) < keep


def _positive_unitball(blob, p):
    values = get_rng().random(blob.shape)
    rows = values.reshape(blob.shape[0], -1)
    rows /= rows.sum(axis=1, keepdims=True)
    blob.data[...] = values


def _xavier(blob, p):
    scale = math.sqrt(3.0 / _fan(blob, p))
    blob.data[...] = get_rng().uniform(-scale, scale, blob.shape)


def _msra(blob, p):
    std = math.sqrt(2.0 / _fan(blob, p))
    blob.data[...] = get_rng().normal(0.0, std, blob.shape)


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
