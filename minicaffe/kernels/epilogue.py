"""What a convolution's product gets as it is stored: its bias, an inference net's ReLU, and the
move from column order to blob order.

numpy adds the bias in one pass over the output and the fused ReLU (fold.py) takes another; the
compiled `store` does both in one (SqueezeNet v1.1's convolutions at batch 1: one of two passes
over 26 outputs saved). When the product comes out with the batch innermost, (C, P, N) for small
images (conv.py's batch_inner layout), numpy's copy into the (N, C, P) blob crawls along that
view; `store` walks it a channel at a time, so each channel's (P, N) block stays in cache while
it is read N times (ResNet-50's 14x14 layers at batch 8 and CaffeNet's 13x13 at batch 32: 2-4x).
Needs numba (kernels/jit.py); callers check `jit.enabled()`.
"""
import numpy as np

from .workers import parallel_kernel
from . import jit

__all__ = ["store"]


@jit.kernel
def _store(values, dest, bias, has_bias, relu, slope, c0, c1):
    """dest[n, c] = values[n, c] (+ bias[c]), then if relu Caffe's max(v, 0) + slope*min(v, 0),
    for channels c0:c1 (slope in dest's dtype; NaN and -0.0 pass the ReLU unchanged)."""
    num = dest.shape[0]
    zero = slope - slope
    for c in range(c0, c1):
        beta = bias[c] if has_bias else zero
        for n in range(num):
            src, dst = values[n, c], dest[n, c]
            if relu:
                for q in range(dst.shape[0]):
                    v = src[q] + beta
                    dst[q] = zero + slope * v if v < zero else v   # zero + (-0.0) is +0.0, as in Caffe
            elif has_bias:
                for q in range(dst.shape[0]):
                    dst[q] = src[q] + beta
            else:
                for q in range(dst.shape[0]):
                    dst[q] = src[q]


def store(dest, values, bias, relu_slope=None):
    """dest (N, C, P) = values (N, C, P) + bias ((C,) or (C, 1), or None), then Caffe's ReLU with
    negative slope relu_slope if given; values may be dest itself, or a view in another order."""
    c, p = dest.shape[1], dest.shape[2]
    has_bias, relu = bias is not None, relu_slope is not None
    bias = bias.reshape(-1) if has_bias else np.zeros(1, dest.dtype)
    slope = dest.dtype.type(relu_slope if relu else 0)
    parallel_kernel(_store, (values, dest, bias, has_bias, relu, slope), c, at=6, cost=dest.shape[0] * p)
