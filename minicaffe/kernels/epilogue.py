"""What a convolution's product gets before it is stored: its bias, then an inference net's ReLU.

numpy adds the bias in one pass over the output and the fused ReLU (fold.py) takes another; the
compiled `bias_relu` does both in one (SqueezeNet v1.1's convolutions at batch 1: one of two
passes over 26 outputs saved). Needs numba (kernels/jit.py); callers check `jit.enabled()`.
"""
import numpy as np

from ..threads import parallel_for
from . import jit

__all__ = ["bias_relu"]


@jit.kernel
def _bias_relu(values, dest, bias, has_bias, slope, r0, r1):
    """dest[n, c] = relu(values[n, c] + bias[c]) for rows r0:r1 of the (n*C) rows, with Caffe's
    ReLU max(v, 0) + slope*min(v, 0) (slope in dest's dtype; NaN and -0.0 pass unchanged)."""
    channels = dest.shape[1]
    zero = slope - slope
    for row in range(r0, r1):
        n, c = row // channels, row % channels
        src, dst = values[n, c], dest[n, c]
        beta = bias[c] if has_bias else zero
        for q in range(dst.shape[0]):
            v = src[q] + beta
            dst[q] = zero + slope * v if v < zero else v   # zero + (-0.0) is +0.0, as in Caffe


def bias_relu(dest, values, bias, slope):
    """dest (N, C, P) = Caffe's ReLU (negative slope `slope`) of values (N, C, P) + bias (C,) or
    None; dest and values may be the same array, or views of it in another order."""
    n, c, p = dest.shape
    has_bias = bias is not None
    bias = bias.reshape(-1) if has_bias else np.zeros(1, dest.dtype)
    slope = dest.dtype.type(slope)
    parallel_for(n * c, lambda r0, r1: _bias_relu(values, dest, bias, has_bias, slope, r0, r1), p)
