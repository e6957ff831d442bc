"""MAX and AVE pooling on a phase-split copy of the input: every window offset is one contiguous run.

Window (ph, pw) at offset (i, j) reads the padded input at row ph*s_h + i, column pw*s_w + j.
Split the padded input by row and column phase (m = image * C + channel):

    phase[a, b][m, r, c] = x_padded[m, a + r*s_h, b + c*s_w]     a < min(s_h, k_h), b < min(s_w, k_w)

on a grid of Hq = PH + (k_h-1)//s_h rows by Wq = PW + (k_w-1)//s_w columns. Offset (i, j) of every
window is then phase (i % s_h, j % s_w) at grid position (ph + i//s_h, pw + j//s_w): with the grid
flattened, ONE contiguous slice of that phase, shifted by (i//s_h)*Wq + j//s_w. So a window
reduction is k_h*k_w passes of numpy's fast contiguous loops, where strided views of the windows
make it crawl along rows of PW values. Grid positions outside PH x PW are computed and dropped;
they cost Hq*Wq / (PH*PW) - 1 extra work, so `PhasePool.applies` refuses geometries where that is
large (global pooling: there layers/pooling.py reduces whole planes).

Positions of the grid outside the image hold the padding value (-inf for MAX, 0 for AVE), so
Caffe's window clipping comes for free; AVE still divides by Caffe's pool size.

MAX backward routes each window's gradient to the FIRST maximum in row-major order, as Caffe's
`value > max` scan does: offsets are visited in that order and an offset only takes the windows
whose maximum no earlier offset matched. Gradients are summed into zeroed phase buffers and then
copied back to the image (phases partition the image, so that copy is a plain assignment).

With numba (kernels/jit.py), MAX keeps more state and makes fewer passes: forward's one compiled
pass over the k_h*k_w shifted runs (`_peak_and_offset`, branch-free selects, which vectorize)
takes each window's peak and the number of the first offset holding it, and backward
(`_max_pool_backward`) adds each window's gradient straight into the image at that offset, in
Caffe's window order: one scattered add per output where the numpy backward makes five passes
per offset (benchmarks/pool_bench.py, the nets' pools at TRAIN: backward 2.6-5.9x faster,
forward 0.74-1.09x, as the phase copy dominates it).

Work is cut into blocks of whole planes (sized for the L2 cache) and spread over the thread pool
(minicaffe.threads). A block computes flat positions up to its last plane's last real output,
whose shifted reads and writes end exactly at that plane's end, so blocks never touch each other.

With numba (kernels/jit.py), a MAX pooling whose backward never runs (an inference net, or a
layer no loss depends on) keeps no state for backward and runs `_max_pool` instead: per output
row, the peak over its k_h input rows (one contiguous pass per row), then the peak over each
window's k_w columns of that row, with literal offsets for the common windows (3x3 stride 1 or 2,
2x2 stride 2). That reads the input once, where the phase grid copies it and makes k_h*k_w
passes (one thread: 2.5-3.3x on 3x3 s2 layers, 2.7-8x on VGG's 2x2 s2, 1.05-1.5x on GoogLeNet's
3x3 s1 ones).
"""
import numpy as np

from ..im2col import _valid_range
from ..threads import parallel_for
from .workers import parallel_kernel
from . import jit
from .clamp import clamp_below

__all__ = ["PhasePool", "CompiledMaxPool", "MAX_WASTE", "BLOCK_BYTES"]

# Largest Hq*Wq / (PH*PW) the phase grid is used for (3x3 s2 on 27x27 outputs: 1.08). GoogLeNet's
# 3x3 s1 pad 1 MAX pools on 7x7 maps (1.65) run 0.44 ms on the grid against 2.1 ms on the plain
# path (832 channels, one thread); global pooling (49x for 7x7) stays refused.
MAX_WASTE = 2.0

# Grid bytes per phase in one block: the block's phases, peak, gradient and masks then stay
# within a core's L2 (1 MiB on this Zen 5). Against 128 KiB, MAX forward+backward at TRAIN went
# 15.4 -> 12.5 ms on ResNet-50's pool1 (8x64x112x112, 3x3 s2) and 6.8 -> 5.2 ms on CaffeNet's
# (10x96x55x55), LeNet's pool1 the same; 384 KiB gained little more (a net of one Pooling layer).
BLOCK_BYTES = 256 << 10

# Caffe starts every max at -FLT_MAX (for double nets too): windows of only NaN or -inf give it.
_MAX_START = -np.finfo(np.float32).max


class PhasePool:
    """MAX (is_max=True) or AVE pooling of `planes` planes with the geometry of a PoolWindows."""

    @staticmethod
    def applies(windows):
        rows = windows.pooled_h + (windows.kernel_h - 1) // windows.stride_h
        cols = windows.pooled_w + (windows.kernel_w - 1) // windows.stride_w
        return rows * cols <= MAX_WASTE * windows.pooled_h * windows.pooled_w

    def __init__(self, windows, is_max, planes, dtype, compiled=False):
        if not self.applies(windows):
            raise ValueError("the phase grid would be mostly padding for this pooling geometry")
        w = self.windows = windows
        self.is_max, self.planes, self.dtype = is_max, planes, np.dtype(dtype)
        # MAX with numba: forward keeps each window's first-maximum offset, backward scatters by it
        self.compiled = bool(compiled and is_max)
        self.rows = w.pooled_h + (w.kernel_h - 1) // w.stride_h
        self.cols = w.pooled_w + (w.kernel_w - 1) // w.stride_w
        self.plane = self.rows * self.cols
        # The last real output of a plane; its farthest shifted read is the plane's last cell.
        self.plane_end = (w.pooled_h - 1) * self.cols + w.pooled_w
        phases = [(a, b) for a in range(min(w.stride_h, w.kernel_h))
                  for b in range(min(w.stride_w, w.kernel_w))]
        # (phase number, shift) of each window offset, in Caffe's row-major visiting order.
        self.offsets = [(phases.index((i % w.stride_h, j % w.stride_w)),
                         (i // w.stride_h) * self.cols + j // w.stride_w) for i, j in w.offsets()]
        # Per phase: the grid cells that hold image pixels, and those pixels.
        self.copies = []
        covered_h, covered_w = np.zeros(w.height, bool), np.zeros(w.width, bool)
        for a, b in phases:
            (grid_h, image_h), (grid_w, image_w) = (
                _phase_slices(a, w.pad_h, w.stride_h, w.height, self.rows),
                _phase_slices(b, w.pad_w, w.stride_w, w.width, self.cols))
            self.copies.append(((slice(None), grid_h, grid_w), (slice(None), image_h, image_w)))
            covered_h[image_h], covered_w[image_w] = True, True
        # Pixels in no phase (stride > kernel, or rows past the last window) get no gradient.
        self.covers_image = bool(covered_h.all() and covered_w.all())
        # Windows that do not overlap (kernel == stride): offset k reads phase k, unshifted.
        self.disjoint = (w.kernel_h, w.kernel_w) == (w.stride_h, w.stride_w)
        # Stride-1 MAX windows (GoogLeNet's and SSD's 3x3 s1 pad 1) take their peak in two
        # passes, over each row's k_w columns and then over k_h of those row peaks: k_h + k_w - 2
        # fmax passes instead of k_h * k_w - 1 (the max of a rectangle is the max of its rows').
        self.separable = (is_max and not self.compiled and (w.stride_h, w.stride_w) == (1, 1)
                          and w.kernel_h > 1 and w.kernel_w > 1)
        size = planes * self.plane
        fill = -np.inf if is_max else 0
        self._x = np.full((len(phases), size), fill, dtype=self.dtype)
        self._acc = np.empty(size, dtype=self.dtype)      # MAX: the peak, kept for backward
        self._row_peak = np.empty(size, dtype=self.dtype) if self.separable else None
        self._dx = None                                   # backward's buffers, on first use
        if not is_max:
            self._divisor = windows.ave_divisor(self.dtype)
        if self.compiled:
            self._best = np.full(size, -1, dtype=np.int32)   # offset number per grid cell
            self._phase_of = np.array([q for q, _ in self.offsets], dtype=np.int64)
            self._shift_of = np.array([t for _, t in self.offsets], dtype=np.int64)
            self._offset_rows = np.array([i for i, _ in w.offsets()], dtype=np.int64)
            self._offset_cols = np.array([j for _, j in w.offsets()], dtype=np.int64)
        self.block = max_planes = max(1, BLOCK_BYTES // (self.plane * self.dtype.itemsize))
        self.blocks = -(-planes // max_planes)

    def _grid(self, flat):
        return flat.reshape(-1, self.rows, self.cols)

    def _outputs(self, flat):
        """The (planes, PH, PW) real outputs within a grid."""
        return self._grid(flat)[:, :self.windows.pooled_h, :self.windows.pooled_w]

    def _run(self, block_fn):
        def run(lo, hi):
            for k in range(lo, hi):
                p0 = k * self.block
                p1 = min(self.planes, p0 + self.block)
                block_fn(p0, p1, p0 * self.plane, (p1 - 1) * self.plane + self.plane_end)
        parallel_for(self.blocks, run, self.block * self.plane * len(self.offsets))

    # -- forward -----------------------------------------------------------------------
    def forward(self, x, y):
        """y = the pooling of x, both (N, C, ...) with N*C == planes."""
        x = x.reshape(self.planes, self.windows.height, self.windows.width)
        y = y.reshape(self.planes, self.windows.pooled_h, self.windows.pooled_w)
        self._run(lambda p0, p1, f0, f1: self._forward_block(x, y, p0, p1, f0, f1))

    def _forward_block(self, x, y, p0, p1, f0, f1):
        for phase, (grid_part, image_part) in zip(self._x, self.copies):
            self._grid(phase[p0 * self.plane: p1 * self.plane])[grid_part] = x[p0:p1][image_part]
        acc = self._acc[f0:f1]
        (q, t), rest = self.offsets[0], self.offsets[1:]
        if self.is_max:
            if self.compiled:
                _peak_and_offset(self._x, self._phase_of, self._shift_of, self._acc, self._best, f0, f1)
            elif self.separable:
                self._separable_peak(f0, f1)
            else:
                # fmax skips NaNs, as Caffe's `value > max` test does (clamp_below: the same fmax
                # against a constant array, whose loop is faster than numpy's scalar one).
                clamp_below(self._x[q, f0 + t: f1 + t], _MAX_START, out=acc, fmax=True, split=False)
                for q, t in rest:
                    np.fmax(acc, self._x[q, f0 + t: f1 + t], out=acc)
            y[p0:p1] = self._outputs(self._acc[p0 * self.plane: p1 * self.plane])
        else:
            acc[...] = self._x[q, f0 + t: f1 + t]
            for q, t in rest:
                np.add(acc, self._x[q, f0 + t: f1 + t], out=acc)
            np.divide(self._outputs(self._acc[p0 * self.plane: p1 * self.plane]), self._divisor,
                      out=y[p0:p1])

    def _separable_peak(self, f0, f1):
        """acc[f0:f1] = the window peaks of a stride-1 MAX pooling (one phase: the padded grid).

        Row peaks are needed for the k_h - 1 grid rows below the block's last output too; those
        rows still belong to the block's last plane, so blocks stay apart."""
        grid, cols = self._x[0], self.cols
        kernel_h, kernel_w = self.windows.kernel_h, self.windows.kernel_w
        stop = f1 + (kernel_h - 1) * cols
        rows = self._row_peak[f0:stop]
        clamp_below(grid[f0:stop], _MAX_START, out=rows, fmax=True, split=False)
        for j in range(1, kernel_w):
            np.fmax(rows, grid[f0 + j: stop + j], out=rows)
        acc = self._acc[f0:f1]
        np.fmax(rows[:f1 - f0], rows[cols: cols + f1 - f0], out=acc)
        for i in range(2, kernel_h):
            np.fmax(acc, rows[i * cols: i * cols + f1 - f0], out=acc)

    # -- backward ----------------------------------------------------------------------
    def backward(self, dy, dx):
        """dx = the gradient of the last forward's pooling given dy (overwritten)."""
        w = self.windows
        if self.compiled:
            dy = np.ascontiguousarray(dy).reshape(self.planes, w.pooled_h, w.pooled_w)
            parallel_kernel(_max_pool_backward,
                            (dy, self._best, self._offset_rows, self._offset_cols,
                             dx.reshape(self.planes, w.height * w.width), w.stride_h, w.stride_w,
                             w.pad_h, w.pad_w, w.width, self.cols, self.plane),
                            self.planes, at=5, cost=w.height * w.width + w.pooled_h * w.pooled_w)
            return
        if self._dx is None:   # allocated here: TEST nets never need them
            size = self._acc.size
            self._dx = np.zeros((len(self.copies), size), dtype=self.dtype)
            self._grad = np.zeros(size, dtype=self.dtype)     # dy on the grid, 0 off the outputs
            self._tmp = np.empty(size, dtype=self.dtype)
            self._equal = np.empty(size, dtype=bool)
            self._taken = np.empty(size, dtype=bool)
        dy = dy.reshape(self.planes, self.windows.pooled_h, self.windows.pooled_w)
        dx = dx.reshape(self.planes, self.windows.height, self.windows.width)
        self._run(lambda p0, p1, f0, f1: self._backward_block(dy, dx, p0, p1, f0, f1))

    def _backward_block(self, dy, dx, p0, p1, f0, f1):
        whole = slice(p0 * self.plane, p1 * self.plane)
        grad_out = self._outputs(self._grad[whole])
        if self.is_max:
            grad_out[...] = dy[p0:p1]
        else:
            np.divide(dy[p0:p1], self._divisor, out=grad_out)
        grad, tmp = self._grad[f0:f1], self._tmp[f0:f1]
        if not self.covers_image:
            dx[p0:p1] = 0
        if self.is_max and self.disjoint:
            # Each pixel is in one window at one offset, i.e. offset k is phase k: write the
            # routed gradient straight into the image, no accumulation.
            self._route_max(f0, f1, lambda k, q, equal: np.multiply(
                self._grid(self._grad[whole])[self.copies[q][0]],
                self._grid(self._equal[whole])[self.copies[q][0]], out=dx[p0:p1][self.copies[q][1]]))
            return
        self._dx[:, whole] = 0
        if self.is_max:
            def accumulate(k, q, equal):
                # grad * mask, then add (numpy's where= is slower on random masks)
                np.multiply(grad, equal, out=tmp)
                routed = self._dx[q, f0 + self.offsets[k][1]: f1 + self.offsets[k][1]]
                np.add(routed, tmp, out=routed)
            self._route_max(f0, f1, accumulate)
        else:
            for q, t in self.offsets:
                routed = self._dx[q, f0 + t: f1 + t]
                np.add(routed, grad, out=routed)
        for phase, (grid_part, image_part) in zip(self._dx, self.copies):
            dx[p0:p1][image_part] = self._grid(phase[whole])[grid_part]

    def _route_max(self, f0, f1, route):
        """Call route(k, phase, mask) per offset k in Caffe's order, where mask (over grid cells
        f0:f1, shifted by offset k) marks the windows whose first maximum sits at offset k."""
        peak, equal, taken = self._acc[f0:f1], self._equal[f0:f1], self._taken[f0:f1]
        last = len(self.offsets) - 1
        for k, (q, t) in enumerate(self.offsets):
            np.equal(self._x[q, f0 + t: f1 + t], peak, out=equal)
            if k == 0:
                taken[...] = equal
            else:
                np.greater(equal, taken, out=equal)     # equal and not yet taken
                if k < last:
                    np.logical_or(taken, equal, out=taken)
            route(k, q, equal)


@jit.kernel
def _peak_and_offset(grid, phase_of, shift_of, peak, best, f0, f1):
    """For grid cells g in f0:f1: peak[g] = Caffe's max over the window offsets k of
    grid[phase_of[k], g + shift_of[k]], and best[g] = the first k (in Caffe's row-major order)
    holding it, -1 where no value beats -FLT_MAX. Caffe's `value > max` test, so NaNs never win.
    One branch-free pass per offset over contiguous runs, which vectorizes."""
    lowest = grid.dtype.type(-3.4028234663852886e38)
    n = f1 - f0
    peaks, bests = peak[f0:f1], best[f0:f1]
    for g in range(n):
        peaks[g] = lowest
        bests[g] = -1
    for k in range(phase_of.shape[0]):
        run = grid[phase_of[k], f0 + shift_of[k]: f1 + shift_of[k]]
        number = np.int32(k)
        for g in range(n):
            v = run[g]
            wins = v > peaks[g]
            bests[g] = number if wins else bests[g]
            peaks[g] = v if wins else peaks[g]


@jit.kernel
def _max_pool_backward(dy, best, offset_rows, offset_cols, dx, p0, p1, stride_h, stride_w, pad_h,
                       pad_w, width, cols, plane):
    """dx[p] = 0, then for each window (r, q) of plane p whose grid cell holds offset k >= 0:
    dx[p, h * width + w] += dy[p, r, q] at (h, w) = (r*s_h - pad_h + i_k, q*s_w - pad_w + j_k),
    summed in Caffe's window order."""
    out_h, out_w = dy.shape[1], dy.shape[2]
    for p in range(p0, p1):
        grad = dx[p]
        for e in range(grad.shape[0]):
            grad[e] = 0
        cells = best[p * plane: (p + 1) * plane]
        for r in range(out_h):
            for q in range(out_w):
                k = cells[r * cols + q]
                if k >= 0:
                    h = r * stride_h - pad_h + offset_rows[k]
                    grad[h * width + q * stride_w - pad_w + offset_cols[k]] += dy[p, r, q]


@jit.kernel
def _max_pool(x, out, p0, p1, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w):
    """out[p, r, q] = Caffe's max over the clipped window (r, q) of plane x[p], for planes p0:p1.

    Caffe starts each max at -FLT_MAX and takes a value only if it is greater, so NaNs never win
    and a window of -inf gives -FLT_MAX: the first row copied is clamped so, and every later
    comparison is `v > peak`. `row` holds the current output row's column peaks, with pad_w
    cells of -FLT_MAX before them and enough after for the last window."""
    height, width = x.shape[1], x.shape[2]
    out_h, out_w = out.shape[1], out.shape[2]
    lowest = x.dtype.type(-3.4028234663852886e38)
    row = np.full(max((out_w - 1) * stride_w + kernel_w, pad_w + width), lowest, x.dtype)
    peaks = row[pad_w:pad_w + width]
    for p in range(p0, p1):
        for r in range(out_h):
            top = r * stride_h - pad_h
            bottom = min(top + kernel_h, height)
            top = max(top, 0)
            src = x[p, top]
            for q in range(width):
                v = src[q]
                peaks[q] = v if v > lowest else lowest
            for h in range(top + 1, bottom):
                src = x[p, h]
                for q in range(width):
                    v = src[q]
                    peaks[q] = v if v > peaks[q] else peaks[q]
            dst = out[p, r]
            if kernel_w == 3 and stride_w == 2:
                for q in range(out_w):
                    a, b, c = row[2 * q], row[2 * q + 1], row[2 * q + 2]
                    a = b if b > a else a
                    dst[q] = c if c > a else a
            elif kernel_w == 3 and stride_w == 1:
                for q in range(out_w):
                    a, b, c = row[q], row[q + 1], row[q + 2]
                    a = b if b > a else a
                    dst[q] = c if c > a else a
            elif kernel_w == 2 and stride_w == 2:
                for q in range(out_w):
                    a, b = row[2 * q], row[2 * q + 1]
                    dst[q] = b if b > a else a
            else:
                for q in range(out_w):
                    peak = row[q * stride_w]
                    for j in range(1, kernel_w):
                        v = row[q * stride_w + j]
                        peak = v if v > peak else peak
                    dst[q] = peak


class CompiledMaxPool:
    """MAX pooling forward of `planes` planes by `_max_pool`, for layers whose backward never runs
    (it keeps nothing for one). Any geometry; needs numba (`jit.enabled()`)."""

    def __init__(self, windows, planes):
        self.windows, self.planes = windows, planes

    def forward(self, x, y):
        w = self.windows
        x = x.reshape(self.planes, w.height, w.width)
        y = y.reshape(self.planes, w.pooled_h, w.pooled_w)
        parallel_kernel(_max_pool, (x, y, w.kernel_h, w.kernel_w, w.stride_h, w.stride_w, w.pad_h, w.pad_w),
                        self.planes, at=2, cost=w.height * w.width + w.pooled_h * w.pooled_w)


def _phase_slices(phase, pad, stride, size, grid_size):
    """(grid slice, image slice) of the cells of one phase that hold image pixels, along one axis.

    Grid cell r of phase `phase` is padded-input row phase + r*stride, i.e. image row
    r*stride + phase - pad."""
    first, stop = _valid_range(size, grid_size, phase - pad, stride)
    if stop <= first:
        return slice(0, 0), slice(0, 0)
    start = first * stride + phase - pad
    return slice(first, stop), slice(start, start + (stop - first - 1) * stride + 1, stride)
