"""Winograd convolution F(m x m, 3x3) for 3x3, stride-1, undilated convolutions (forward only).

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2015). The output is cut
into m x m tiles; each tile needs an (m+2) x (m+2) = alpha x alpha patch d of the padded input:

    Y = A^T [ sum_c (G g_kc G^T) . (B^T d_c B) ] A

with g the 3x3 filter and "." the elementwise product. Summing over the channels c turns the
alpha*alpha elementwise products into alpha*alpha matrix products, run as ONE batched matmul

    M (alpha^2, K, T) = U (alpha^2, K, C) @ V (alpha^2, C, T),   T = tiles of the whole chunk,

instead of im2col's (K, 9C) @ (9C, m*m*T): 2.25x (m=2) or 4x (m=4) fewer multiplications. The
patches of all tiles are gathered with one strided view, and each of the four transform steps
(B^T over rows, B over columns, then A^T and A) is one GEMM with a tiny alpha x alpha matrix on
the left, over every tile at once (no per-tile Python loop). U is computed once per weight
version (`weights` compares a kept copy of the weights, far cheaper than the product).

With numba (kernels/jit.py), F(4x4)'s input and output transforms on images at least
COMPILED_MIN_TILE_COLUMNS tiles wide are instead one compiled pass each (`_winograd_input_4x4`,
`_winograd_output_4x4`), the latter also applying an inference net's fused ReLU; the batched
product is the same.

Accuracy in float32 against im2col, max |diff| / max |plain| with well-scaled random weights
(python -m pytest tests/kernels/test_winograd.py asserts the bounds in ACCURACY there): worst
seen 8e-7 for F(2x2) and 1e-5 for F(4x4), whose transforms hold 1/6, 1/24 and 8.
"""
import numpy as np

from ..blob import flat_view
from .workers import parallel_kernel
from . import gemm, jit

__all__ = ["WinogradConv", "TRANSFORMS"]

# (B^T, G, A^T) for each tile size m; alpha = m + 2.
TRANSFORMS = {
    2: (np.array([[1, 0, -1, 0],
                  [0, 1, 1, 0],
                  [0, -1, 1, 0],
                  [0, 1, 0, -1]], dtype=np.float64),
        np.array([[1, 0, 0],
                  [0.5, 0.5, 0.5],
                  [0.5, -0.5, 0.5],
                  [0, 0, 1]], dtype=np.float64),
        np.array([[1, 1, 1, 0],
                  [0, 1, -1, -1]], dtype=np.float64)),
    4: (np.array([[4, 0, -5, 0, 1, 0],
                  [0, -4, -4, 1, 1, 0],
                  [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0],
                  [0, 2, -1, -2, 1, 0],
                  [0, 4, 0, -5, 0, 1]], dtype=np.float64),
        np.array([[1 / 4, 0, 0],
                  [-1 / 6, -1 / 6, -1 / 6],
                  [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6],
                  [1 / 24, -1 / 12, 1 / 6],
                  [0, 0, 1]], dtype=np.float64),
        np.array([[1, 1, 1, 1, 1, 0],
                  [0, 1, -1, 2, -2, 0],
                  [0, 1, 1, 4, 4, 0],
                  [0, 1, -1, 8, -8, 1]], dtype=np.float64)),
}

# The compiled transforms (below) run on images at least this many tiles wide. Measured with
# benchmarks/winograd_bench.py (2 threads, batch 1), compiled against numpy transforms: VGG16's
# 112x112 layers 8.5 against 12.5 ms, 56x56 8.2 against 8.9, ResNet-50's 56x56 1.16 against 1.37,
# 224x224 equal; but 28x28 layers ran 1.05-1.5x slower (per-channel overhead, and the spare tile
# costs 1/7 more product), and 14x14 ones up to 1.8x.
COMPILED_MIN_TILE_COLUMNS = 14

# Bound on one chunk's transformed input V (each of the three scratch buffers is about this
# size); batches are cut into chunks of whole images to stay near it.
WINOGRAD_BUFFER_BYTES = 16 << 20


# The image is transformed a block of tile rows at a time, so that each step's operands stay in
# cache: the block's transformed input V (or product M) near BLOCK_BYTES, but at least
# MIN_BLOCK_TILES tiles, below which the 36 batched products lose speed (512 channels at 28x28).
# VGG16's conv1_2 (64 channels, 224x224, batch 1, one thread) went from 29 to 16-22 ms so in an
# A/B of the two versions; layers of at most 256 tiles are one block, as before.
BLOCK_BYTES = 2 << 20
MIN_BLOCK_TILES = 256


# Values of U transformed per block of output channels (float64 temporaries about 8x this).
U_BLOCK_VALUES = 1 << 20


def _fresh(role, size, dtype):
    return np.empty(int(size), dtype=dtype)


class WinogradConv:
    """Forward 3x3 stride-1 convolution of (N, C, H, W) images with (K, C, 3, 3) weights, group 1.

    `reshape(num, (H, W), dtype)` sizes the scratch; `conv(im, w, out, bias)` writes
    out (N, K, H + 2*pad_h - 2, W + 2*pad_w - 2). `scratch(role, size, dtype)` returns flat
    scratch arrays for each role (the convolution layers pass their shared per-thread workspace;
    by default every call allocates its own).
    """

    def __init__(self, in_channels, out_channels, pad, tile=2, scratch=None):
        if tile not in TRANSFORMS:
            raise ValueError(f"Winograd tile size must be one of {sorted(TRANSFORMS)}, got {tile}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.pad = tuple(pad)
        self.m = tile
        self.alpha = tile + 2
        self.scratch = scratch or _fresh
        self._weight_seen = None
        # Set by an inference net (fold.py), whose weights change only through copy_from or
        # fold_params, which call forget_weights(): the by-value check is skipped.
        self.frozen = False
        self._key = None
        self._bt = self._at = None

    # -- weights ---------------------------------------------------------------
    def weights(self, w):
        """U = G g G^T, (alpha^2, K, C), recomputed only when w differs from the last one seen."""
        # Compared by value: a Blob hands out a new view at every access, and weights are
        # edited in place (solvers, fold.py, net.params[...] = ...).
        seen = self._weight_seen
        if seen is not None and seen.shape == w.shape and seen.dtype == w.dtype \
                and (self.frozen or np.array_equal(seen, w)):
            return self._u
        _, g, _ = TRANSFORMS[self.m]
        a, k, c = self.alpha, self.out_channels, self.in_channels
        # float64 for the transform itself: U is computed once, and rounding it once keeps the
        # float32 error of F(4x4) (1/6, 1/24) at its unavoidable part. Blocks of output
        # channels keep the float64 temporaries small next to U (all at once, a 512x512 layer's
        # held 150 MB at the first forward).
        self._u = np.empty((a * a, k, c), dtype=w.dtype)
        step = max(1, U_BLOCK_VALUES // (a * a * c))
        for lo in range(0, k, step):
            hi = min(k, lo + step)
            block = g @ w[lo:hi].astype(np.float64) @ g.T                # (k block, C, alpha, alpha)
            self._u[:, lo:hi] = block.transpose(2, 3, 0, 1).reshape(a * a, hi - lo, c)
        # A frozen kernel never compares values: a zero-stride stand-in of w's shape and dtype
        # is enough (it saves a copy of the weights), and compares unequal if it is unfrozen.
        self._weight_seen = np.broadcast_to(w.dtype.type(0), w.shape) if self.frozen else w.copy()
        return self._u

    def forget_weights(self):
        """Recompute U at the next forward (after the weights changed behind a frozen kernel)."""
        self._weight_seen = self._u = None

    # -- geometry -------------------------------------------------------------
    def reshape(self, num, im_spatial, dtype):
        key = (num, tuple(im_spatial), np.dtype(dtype), jit.enabled())
        if key == self._key:
            return
        self._key = key
        self.num, self.dtype = num, np.dtype(dtype)
        bt, _, at = TRANSFORMS[self.m]
        self._bt, self._at = bt.astype(self.dtype), at.astype(self.dtype)
        self._at_t = np.ascontiguousarray(self._at.T)
        h, w = im_spatial
        m, a = self.m, self.alpha
        self.out_spatial = (h + 2 * self.pad[0] - 2, w + 2 * self.pad[1] - 2)
        oh, ow = self.out_spatial
        if oh < 1 or ow < 1:
            raise ValueError(f"output size {self.out_spatial} is empty")
        self.tiles = (-(-oh // m), -(-ow // m))
        th, tw = self.tiles
        # The compiled transforms (F(4x4) only) lay each tile row out with one spare tile.
        self.compiled = jit.enabled() and m == 4 and tw >= COMPILED_MIN_TILE_COLUMNS
        self.pitch = tw + 1 if self.compiled else tw
        # Padded up to whole tiles: the extra rows/columns are zeros and their outputs dropped.
        self.padded_spatial = (th * m + 2, tw * m + 2)
        per_image_v = a * a * self.in_channels * th * self.pitch * self.dtype.itemsize
        self.chunk = max(1, min(num, WINOGRAD_BUFFER_BYTES // per_image_v))
        c, k, n = self.in_channels, self.out_channels, self.chunk
        # Tile rows per block: the transforms' working set near BLOCK_BYTES, but enough tiles
        # for the batched product to stay efficient.
        row_bytes = a * a * max(c, k) * n * self.pitch * self.dtype.itemsize
        self.block_rows = min(th, max(1, BLOCK_BYTES // row_bytes, -(-MIN_BLOCK_TILES // (n * self.pitch))))
        block_tiles = n * self.block_rows * self.pitch
        if self.compiled:
            self._sizes = dict(d=a * a * c * block_tiles, m=a * a * k * block_tiles)
            self._no_bias = np.zeros(k, self.dtype)   # the output kernel always adds one
        else:
            self._sizes = dict(
                padded=n * c * self.padded_spatial[0] * self.padded_spatial[1],
                d=max(a * a * c, m * m * k) * block_tiles,   # the patches, V, the output tiles
                rows=max(a * c, m * k) * a * block_tiles,    # B^T d, then A^T M
                m=a * a * k * block_tiles)

    def _buf(self, role, shape):
        return flat_view(self.scratch("winograd_" + role, self._sizes[role], self.dtype), shape)

    # -- forward --------------------------------------------------------------
    @property
    def fuses_relu(self):
        """Whether conv() takes relu_slope (the compiled output transform applies it)."""
        return self.compiled

    def conv(self, im, w, out, bias=None, relu_slope=None):
        if relu_slope is not None and not self.compiled:
            raise ValueError("relu_slope needs the compiled Winograd transforms (see fuses_relu)")
        u = self.weights(w)
        for start in range(0, self.num, self.chunk):
            stop = min(self.num, start + self.chunk)
            if self.compiled:
                self._conv_chunk_compiled(im[start:stop], u, out[start:stop], bias, relu_slope)
            else:
                self._conv_chunk(im[start:stop], u, out[start:stop], bias)
        return out

    def _conv_chunk_compiled(self, im, u, out, bias, relu_slope):
        n, c = im.shape[:2]
        k, a, pitch = self.out_channels, self.alpha, self.pitch
        if bias is None:
            bias = self._no_bias
        relu = relu_slope is not None
        slope = out.dtype.type(relu_slope if relu else 0)
        th = self.tiles[0]
        for first in range(0, th, self.block_rows):
            cells = (min(th, first + self.block_rows) - first) * pitch
            v = self._buf("d", (a * a, c, n, cells))
            parallel_kernel(_winograd_input_4x4, (im, v, first, pitch, self.pad[0], self.pad[1]),
                            c, at=4, cost=n * a * a * cells)
            prod = self._buf("m", (a * a, k, n, cells))
            gemm.matmul(u, v.reshape(a * a, c, n * cells), prod.reshape(a * a, k, n * cells))
            parallel_kernel(_winograd_output_4x4, (prod, out, bias, first, pitch, relu, slope),
                            k, at=5, cost=n * a * a * cells)

    def _conv_chunk(self, im, u, out, bias):
        n, c = im.shape[:2]
        (ph, pw), (hp, wp) = self.pad, self.padded_spatial
        h, wd = im.shape[2:]
        padded = self._buf("padded", (n, c, hp, wp))
        padded[:, :, :ph].fill(0)
        padded[:, :, ph + h:].fill(0)
        padded[:, :, ph:ph + h, :pw].fill(0)
        padded[:, :, ph:ph + h, pw + wd:].fill(0)
        padded[:, :, ph:ph + h, pw:pw + wd] = im
        m, th = self.m, self.tiles[0]
        for first in range(0, th, self.block_rows):
            stop = min(th, first + self.block_rows)
            self._conv_block(padded[:, :, first * m:], u, out[:, :, first * m:stop * m], stop - first, bias)

    def _conv_block(self, padded, u, out, tile_rows, bias):
        """Output rows of `tile_rows` tile rows from the padded images starting at their first
        row: every transform's operands stay in cache (one whole-image pass each was memory-bound)."""
        bt, at = self._bt, self._at
        m, a = self.m, self.alpha
        n, c = padded.shape[:2]
        k, tw = self.out_channels, self.tiles[1]
        tiles = n * tile_rows * tw
        # Every tile's patch d, element (x, y) outermost and channels before images, so each
        # transform below is one GEMM with a tiny (alpha x alpha) left matrix, and V comes out
        # as (alpha^2, C, tiles) for the batched product.
        sn, sc, sh, sw = padded.strides
        patches = np.lib.stride_tricks.as_strided(
            padded, shape=(a, a, c, n, tile_rows, tw), strides=(sh, sw, sc, sn, m * sh, m * sw),
            writeable=False)
        d = self._buf("d", (a, a, c, n, tile_rows, tw))
        d[...] = patches
        rows = self._buf("rows", (a, a * c * tiles))                 # B^T d over x
        np.matmul(bt, d.reshape(a, a * c * tiles), out=rows)
        v = self._buf("d", (a, a, c * tiles))                        # (B^T d) B over y; d is dead
        np.matmul(bt, rows.reshape(a, a, c * tiles), out=v)

        prod = self._buf("m", (a * a, k, tiles))
        gemm.matmul(u, v.reshape(a * a, c, tiles), prod)

        half = self._buf("rows", (m, a, k * tiles))                  # A^T M over i
        np.matmul(at, prod.reshape(a, a * k * tiles), out=half.reshape(m, a * k * tiles))
        # (A^T M) A over j, one output row r of every tile at a time, as (k*tiles, alpha) @ A:
        # the product then comes out as (K, n, tile row, tile column, s), i.e. whole output
        # rows, and lands in the images with one copy of contiguous rows per r (the (r, s)-major
        # result of a left multiply took m*m copies crawling along every m-th pixel: 2x slower
        # on 14x14 and 28x28 layers).
        rows_out = self._buf("d", (k * tiles, m))                    # V is dead
        at_t = self._at_t
        for r in range(m):
            np.matmul(half[r].T, at_t, out=rows_out)
            dest = out[:, :, r::m, :]                                # tiles past the edge: padding
            src = rows_out.reshape(k, n, tile_rows, tw * m).transpose(1, 0, 2, 3)[
                :, :, :dest.shape[2], :dest.shape[3]]
            if bias is not None:
                np.add(src, bias.reshape(-1, 1, 1), out=dest)
            else:
                dest[...] = src


# -- compiled F(4x4, 3x3) transforms (numba, kernels/jit.py) --------------------------------------
# The numpy path above gathers every tile's 6x6 patch (2.25x the input) and runs each transform
# step as a GEMM with a tiny left matrix over all tiles: memory-bound passes that took longer
# than the batched product on VGG16's and ResNet-50's large layers. With numba the input and
# output transforms are one kernel each, reading the image and writing the output directly.
#
# They vectorize only as long contiguous loops with literal offsets (loops over one tile row's
# tiles are too short, and stride-4 reads are not vectorized). So a block's tiles sit on a flat
# grid of pitch tw + 1 (one spare tile per tile row, computed and dropped), and each channel is
# first split into its 16 phases mod 4: phase (a, b) holds the padded rows 4R + a and columns
# 4J + b. Row i of tile (R, J)'s patch is then grid row R + i // 4 of row phase i % 4, column j
# is grid column J + j // 4 of column phase j % 4, and B^T d B is 24 + 36 four-term sums over
# whole phase planes, shifted by 0, 1 or a pitch.

@jit.kernel
def _bt_rows(d0, d1, d2, d3, d4, d5, o0, o1, o2, o3, o4, o5, count):
    """o_x[t] = sum_i B^T[x, i] d_i[t] for t < count: F(4x4)'s B^T, one loop per row of it."""
    f = o0.dtype.type
    two, four, five = f(2), f(4), f(5)   # typed: a float64 literal would make the loop float64
    for t in range(count):
        o0[t] = four * d0[t] - five * d2[t] + d4[t]
    for t in range(count):
        o1[t] = d3[t] + d4[t] - four * (d1[t] + d2[t])
    for t in range(count):
        o2[t] = four * (d1[t] - d2[t]) - d3[t] + d4[t]
    for t in range(count):
        o3[t] = two * (d3[t] - d1[t]) - d2[t] + d4[t]
    for t in range(count):
        o4[t] = two * (d1[t] - d3[t]) - d2[t] + d4[t]
    for t in range(count):
        o5[t] = four * d1[t] - five * d3[t] + d5[t]


@jit.kernel
def _at_rows(m0, m1, m2, m3, m4, m5, o0, o1, o2, o3, count):
    """o_r[t] = sum_i A^T[r, i] m_i[t] for t < count: F(4x4)'s A^T, one loop per row of it."""
    f = o0.dtype.type
    two, four, eight = f(2), f(4), f(8)
    for t in range(count):
        o0[t] = m0[t] + m1[t] + m2[t] + m3[t] + m4[t]
    for t in range(count):
        o1[t] = m1[t] - m2[t] + two * (m3[t] - m4[t])
    for t in range(count):
        o2[t] = m1[t] + m2[t] + four * (m3[t] + m4[t])
    for t in range(count):
        o3[t] = m1[t] - m2[t] + eight * (m3[t] - m4[t]) + m5[t]


@jit.kernel
def _winograd_input_4x4(im, v, first, pitch, c0, c1, pad_h, pad_w):
    """v[x*6 + y, c, n, R*pitch + J] = (B^T d B)[x, y], d the 6x6 patch of tile (first + R, J) in
    the zero-padded image im[n, c], for channels c0:c1; J = pitch - 1 is the spare tile."""
    num, height, width = im.shape[0], im.shape[2], im.shape[3]
    cells = v.shape[3]
    rows = cells // pitch
    # 16 phase planes over rows + 1 grid rows (a patch reaches into the next tile row) and a
    # spare cell for the last tile's column shift; then the 24 row-transformed planes. Cells
    # outside the image are the same for every channel: zeroed once, never written.
    phases = np.zeros((16, (rows + 1) * pitch + 1), im.dtype)
    half = np.zeros((24, cells + 1), im.dtype)
    lo, hi = np.empty(4, np.int64), np.empty(4, np.int64)
    for b in range(4):    # grid columns J whose image column 4J + b - pad_w is inside: lo <= J < hi
        lo[b] = max(0, (pad_w - b + 3) // 4)
        hi[b] = max(lo[b], min(pitch, (width - 1 + pad_w - b) // 4 + 1))
    top = max(0, pad_h - 4 * first)                             # block rows inside the image
    bottom = min(4 * (rows + 1), height + pad_h - 4 * first)
    for n in range(num):
        for c in range(c0, c1):
            for row in range(top, bottom):
                grid_row, a = row // 4, row % 4
                image_row = im[n, c, 4 * first + row - pad_h]
                for b in range(4):
                    src = image_row[4 * lo[b] + b - pad_w:]
                    dst = phases[a * 4 + b, grid_row * pitch + lo[b]:]
                    for j in range(hi[b] - lo[b]):
                        dst[j] = src[4 * j]
            for b in range(4):    # B^T over the patch rows, per column phase b
                _bt_rows(phases[b], phases[4 + b], phases[8 + b], phases[12 + b], phases[b, pitch:],
                         phases[4 + b, pitch:], half[b], half[4 + b], half[8 + b], half[12 + b],
                         half[16 + b], half[20 + b], cells)
            for x in range(6):    # then B over the patch columns, into v
                row = half[x * 4:x * 4 + 4]
                _bt_rows(row[0], row[1], row[2], row[3], row[0, 1:], row[1, 1:], v[x * 6, c, n],
                         v[x * 6 + 1, c, n], v[x * 6 + 2, c, n], v[x * 6 + 3, c, n],
                         v[x * 6 + 4, c, n], v[x * 6 + 5, c, n], cells)


@jit.kernel
def _winograd_output_4x4(m, out, bias, first, pitch, k0, k1, relu, slope):
    """out[n, k, 4(first + R) + r, 4J + s] = (A^T M A)[r, s] + bias[k], M[i, j] = m[i*6 + j, k, n,
    R*pitch + J], for channels k0:k1 (rows and columns past the output's edge dropped); then, if
    relu, Caffe's max(v, 0) + slope*min(v, 0) (slope in out's dtype)."""
    num, out_h, out_w = out.shape[0], out.shape[2], out.shape[3]
    cells = m.shape[3]
    rows = cells // pitch
    half = np.empty((24, cells), m.dtype)     # half[r*6 + j] = sum_i A^T[r, i] M[i, j]
    line = np.empty(4 * pitch, m.dtype)
    four, eight = m.dtype.type(4), m.dtype.type(8)
    zero = slope - slope
    for n in range(num):
        for k in range(k0, k1):
            for j in range(6):
                _at_rows(m[j, k, n], m[6 + j, k, n], m[12 + j, k, n], m[18 + j, k, n], m[24 + j, k, n],
                         m[30 + j, k, n], half[j], half[6 + j], half[12 + j], half[18 + j], cells)
            beta = bias[k]
            for grid_row in range(rows):
                for r in range(4):
                    y = 4 * (first + grid_row) + r
                    if y >= out_h:
                        break
                    h = half[r * 6:r * 6 + 6, grid_row * pitch:(grid_row + 1) * pitch]
                    h0, h1, h2, h3, h4, h5 = h[0], h[1], h[2], h[3], h[4], h[5]
                    for q in range(pitch - 1):
                        s12, d12, s34, d34 = h1[q] + h2[q], h1[q] - h2[q], h3[q] + h4[q], h3[q] - h4[q]
                        line[4 * q] = h0[q] + s12 + s34
                        line[4 * q + 1] = d12 + (d34 + d34)
                        line[4 * q + 2] = s12 + four * s34
                        line[4 * q + 3] = d12 + eight * d34 + h5[q]
                    dst = out[n, k, y]
                    # Branch-free, as the depthwise kernel's (a test on the value stops the loop
                    # vectorizing); max / min keep NaN and -0.0 as Caffe's std::max / std::min.
                    if relu:
                        for q in range(out_w):
                            v = line[q] + beta
                            dst[q] = max(v, zero) + slope * min(v, zero)
                    else:
                        for q in range(out_w):
                            dst[q] = line[q] + beta


# The rule for choosing Winograd per layer (benchmarks/winograd_bench.py, 2 threads and 1, batch 1,
# numpy 2.4's OpenBLAS on the 2-core AMD EPYC): F(4x4) beats im2col + GEMM once each batched
# product has enough tiles and channels (56x56 and 28x28 ResNet/VGG layers: 1.0-2.6x), and
# whenever its transformed weights U (36 * C * K values) are at most 36 * 256 * 256, however few
# the tiles are (16, a 14x14 image): SqueezeNet's expand3x3 layers (16-64 -> 64-256 channels,
# 55x55 down to 13x13) ran 1.1-1.6x faster, GoogLeNet's 4a 3x3 (96 -> 208 at 14x14) 1.28x,
# ResNet-50's 256 -> 256 at 14x14 1.10x, since the 36 products are split over the threads as
# whole one-thread GEMMs (kernels/gemm.py; with OpenBLAS's own threading that layer was 0.80x).
# Larger weights on 16 tiles or fewer break even or lose (VGG16's 512 -> 512 at 14x14 0.99x,
# ResNet-50's at 7x7 0.46x). Three input channels are too few either way (VGG16's conv1_1 0.87x).
# F(2x2) was slower than F(4x4) at every size but 7x7 and the 512-channel 14x14.
MIN_IN_CHANNELS = 48
MIN_OUT_CHANNELS = 16
MIN_TILES = 32
SMALL_WEIGHTS_VALUES = 36 * 256 * 256   # U of ResNet-50's conv4_x 3x3: 9.4 MB in float32
SMALL_WEIGHTS_MIN_TILES = 16
SMALL_WEIGHTS_MIN_IN_CHANNELS = 16


def choose_tile(in_channels, out_channels, out_spatial, num):
    """Tile size m for F(m x m, 3x3) on a 3x3 stride-1 undilated group-1 convolution, or None."""
    oh, ow = out_spatial
    if out_channels < MIN_OUT_CHANNELS or oh < 4 or ow < 4:
        return None
    tiles = num * -(-oh // 4) * -(-ow // 4)
    if (36 * in_channels * out_channels <= SMALL_WEIGHTS_VALUES and tiles >= SMALL_WEIGHTS_MIN_TILES
            and in_channels >= SMALL_WEIGHTS_MIN_IN_CHANNELS):
        return 4
    if in_channels < MIN_IN_CHANNELS or tiles < MIN_TILES:
        return None
    return 4
