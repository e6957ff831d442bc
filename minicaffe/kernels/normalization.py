"""Compiled passes of BatchNorm and of a fused BatchNorm -> Scale (-> ReLU) chain (numba).

The chain's numpy forward normalizes, scales, shifts and rectifies each block of rows in five
numpy passes (the block stays in cache, but each pass still reads and writes it); the last step
of its backward, and of the BatchNorm layer's own, takes four (layers/normalization.py). These
loops do each in one pass, with the same float32 operations in the same order, so the results are
bit for bit the numpy path's, and need no blob-sized scratch. The statistics and the backward's
sums stay in numpy (a compiled float32 sum would not vectorize without reordering it).
"""
from . import jit

__all__ = ["normalize_scale_relu", "batch_norm_input_grad", "batch_norm_layer_grad"]


@jit.kernel
def normalize_scale_relu(x, x_norm, mean, std, gamma, beta, has_beta, relu, slope, lo, hi):
    """For rows lo:hi: x_norm = (x - mean) / std; x = x_norm * gamma (+ beta), then if relu
    Caffe's max(v, 0) + slope*min(v, 0); mean, std, gamma, beta hold one value per row."""
    zero = slope - slope
    for r in range(lo, hi):
        m, s, g = mean[r], std[r], gamma[r]
        b = beta[r] if has_beta else zero
        src, norm = x[r], x_norm[r]
        for q in range(src.shape[0]):
            v = (src[q] - m) / s
            norm[q] = v
            v = v * g
            if has_beta:
                v = v + b
            if relu:
                v = v if v > zero else zero + slope * v
            src[q] = v


@jit.kernel
def batch_norm_input_grad(dx, x_norm, gain, shift, slope, lo, hi):
    """For rows lo:hi, in place: dx = dx * gain - (x_norm * slope + shift), one value per row of
    gain, shift and slope (BatchNorm's input gradient with its batch statistics)."""
    for r in range(lo, hi):
        g, t, k = gain[r], shift[r], slope[r]
        d, xn = dx[r], x_norm[r]
        for q in range(d.shape[0]):
            d[q] = d[q] * g - (xn[q] * k + t)


@jit.kernel
def batch_norm_layer_grad(dy, dx, x_norm, mean_dy_xn, mean_dy, std, lo, hi):
    """For rows lo:hi: dx = (dy - (x_norm * mean_dy_xn + mean_dy)) / std, one value per row of
    the last three (the BatchNorm layer's own backward; dx may be dy)."""
    for r in range(lo, hi):
        k, t, s = mean_dy_xn[r], mean_dy[r], std[r]
        d, out, xn = dy[r], dx[r], x_norm[r]
        for q in range(d.shape[0]):
            out[q] = (d[q] - (xn[q] * k + t)) / s
