"""Compiled passes of BatchNorm, of a fused BatchNorm -> Scale (-> ReLU) chain, and of LRN (numba).

The chain's numpy forward normalizes, scales, shifts and rectifies each block of rows in five
numpy passes (the block stays in cache, but each pass still reads and writes it); the last step
of its backward, and of the BatchNorm layer's own, takes four (layers/normalization.py). These
loops do each in one pass, with the same float32 operations in the same order, so the results are
bit for bit the numpy path's, and need no blob-sized scratch. The statistics and the backward's
sums stay in numpy (a compiled float32 sum would not vectorize without reordering it).
"""
import numpy as np

from . import jit

__all__ = ["normalize_scale_relu", "batch_norm_input_grad", "batch_norm_layer_grad",
           "lrn_across_channels", "lrn_across_channels_backward", "LRN_BETAS", "LRN_BLOCK"]


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


# The betas lrn_across_channels computes scale^-beta for with sqrt and a reciprocal, as the numpy
# path's _negative_power does (np.power on float32 is a scalar loop); others stay on numpy.
LRN_BETAS = (0.75, 0.5, 1.0)
# Pixels per block: a block's window of channel rows stays in L1 while it is summed.
LRN_BLOCK = 512


@jit.kernel
def lrn_across_channels(x, y, scale, power, keep, size, coef, k, beta_kind, q0, q1):
    """LRN across channels of (N, C, P) x for pixels q0:q1: scale = k + coef * (sum of x^2 over
    channels c - (size-1)/2 .. c + (size-1)/2 inside 0..C-1), power = scale^-beta with beta
    LRN_BETAS[beta_kind], y = x * power. The same float32 operations in the same order as the
    numpy path (a left-to-right window sum, then *coef, +k, sqrt and reciprocal), one pass.
    scale and power (what backward reads) are written only if keep, else held a block at a time."""
    num, channels = x.shape[0], x.shape[1]
    pre = (size - 1) // 2
    one = k - k + x.dtype.type(1)
    block_scale, block_power = np.empty(LRN_BLOCK, x.dtype), np.empty(LRN_BLOCK, x.dtype)
    # Each loop runs over a block sliced out first, from 0: a loop from b0 keeps numba's
    # negative-index wraparound test, which stops it vectorizing.
    for b0 in range(q0, q1, LRN_BLOCK):
        b1 = min(q1, b0 + LRN_BLOCK)
        width = b1 - b0
        for n in range(num):
            for c in range(channels):
                first, last = max(0, c - pre), min(channels, c + pre + 1)
                row = scale[n, c, b0:b1] if keep else block_scale[:width]
                src = x[n, first, b0:b1]
                for q in range(width):
                    row[q] = src[q] * src[q]
                for cc in range(first + 1, last):
                    src = x[n, cc, b0:b1]
                    for q in range(width):
                        row[q] += src[q] * src[q]
                pw = power[n, c, b0:b1] if keep else block_power[:width]
                xc, yc = x[n, c, b0:b1], y[n, c, b0:b1]
                for q in range(width):
                    v = row[q] * coef
                    row[q] = v + k
                # One loop per beta: a test inside the loop would stop it vectorizing, as would
                # `/`, whose ZeroDivisionError check np.divide does not make.
                if beta_kind == 0:
                    for q in range(width):
                        r = np.sqrt(row[q])
                        pw[q] = np.divide(one, r * np.sqrt(r))
                elif beta_kind == 1:
                    for q in range(width):
                        pw[q] = np.divide(one, np.sqrt(row[q]))
                else:
                    for q in range(width):
                        pw[q] = np.divide(one, row[q])
                for q in range(width):
                    yc[q] = xc[q] * pw[q]


@jit.kernel
def lrn_across_channels_backward(x, y, dy, scale, power, dx, size, factor, q0, q1):
    """LRN across channels' input gradient of (N, C, P) arrays for pixels q0:q1:
    dx = dy * power - (window sum over channels of dy * y / scale) * x * factor, factor being
    2 * alpha * beta / size; the numpy path's float operations in its order, one pass (its window
    sums skip the zero channels padding the edges, so a -0.0 there stays -0.0 where numpy's
    +0.0 + -0.0 gives +0.0; every other value is bit for bit the same)."""
    num, channels = x.shape[0], x.shape[1]
    pre = (size - 1) // 2
    ratio = np.empty((channels, LRN_BLOCK), x.dtype)
    acc = np.empty(LRN_BLOCK, x.dtype)
    for b0 in range(q0, q1, LRN_BLOCK):
        b1 = min(q1, b0 + LRN_BLOCK)
        width = b1 - b0
        for n in range(num):
            for c in range(channels):
                r, d, o, s = ratio[c, :width], dy[n, c, b0:b1], y[n, c, b0:b1], scale[n, c, b0:b1]
                for q in range(width):
                    r[q] = np.divide(d[q] * o[q], s[q])
            for c in range(channels):
                first, last = max(0, c - pre), min(channels, c + pre + 1)
                a, r = acc[:width], ratio[first, :width]
                for q in range(width):
                    a[q] = r[q]
                for cc in range(first + 1, last):
                    r = ratio[cc, :width]
                    for q in range(width):
                        a[q] += r[q]
                xc, d, pw, out = x[n, c, b0:b1], dy[n, c, b0:b1], power[n, c, b0:b1], dx[n, c, b0:b1]
                for q in range(width):
                    v = a[q] * xc[q]
                    v = v * factor
                    out[q] = d[q] * pw[q] - v
