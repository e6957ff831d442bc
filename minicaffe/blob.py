"""Blob: an N-d array of `data` plus a same-shaped `diff` (its gradient), as in Caffe.

Storage is a flat buffer that only grows; `data`/`diff` are views of its first
`count` elements in the current shape, so `reshape` to a smaller or equal size
never reallocates, and blobs that share storage (`share_data`/`share_diff`)
keep seeing each other's writes. The diff buffer grows at its first use rather than
at `reshape`, so a net that never runs backward never allocates diffs.
"""
import math
import mmap

import numpy as np

from .errors import MinicaffeError
from .proto import caffe_pb2

__all__ = ["Blob", "BlobError", "zeros", "flat_view"]

# Buffers from this size on come straight from the kernel (see zeros); numpy asks for huge
# pages from 4 MiB on, and so do we.
MMAP_MIN_BYTES = 256 << 10
_HUGE_PAGE_MIN_BYTES = 4 << 20


def zeros(shape, dtype=np.float32):
    """np.zeros(shape, dtype) whose untouched pages cost no memory, whatever malloc did before.

    np.zeros is calloc, and glibc serves a calloc of up to 32 MiB from its heap once a freed
    block that size has raised its mmap threshold, clearing (so touching) every page; a net's
    build frees such blocks all the time (Split's tops drop their own buffer, for one). Big
    buffers therefore map zero pages of their own (private, so a forked worker's writes stay
    its own), which are unmapped again when the array goes.
    """
    dtype = np.dtype(dtype)
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
    size = math.prod(shape)
    nbytes = size * dtype.itemsize
    if nbytes < MMAP_MIN_BYTES or not hasattr(mmap, "MAP_PRIVATE"):   # (Windows has no MAP_PRIVATE)
        return np.zeros(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    if nbytes >= _HUGE_PAGE_MIN_BYTES and hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(region, dtype=dtype, count=size).reshape(shape)


def flat_view(buffer, shape):
    """The first prod(shape) values of a flat scratch buffer, viewed with `shape` (the kernels'
    shared buffers are sized for their largest use and viewed smaller)."""
    return buffer[:math.prod(shape)].reshape(shape)


class BlobError(MinicaffeError, ValueError):
    """A blob shape or BlobProto that does not fit; the text names the blob."""


class _Memory:
    """A growable flat buffer that several blobs can point to."""

    __slots__ = ("buf",)

    def __init__(self, size, dtype):
        self.buf = zeros(size, dtype)

    def ensure(self, size):
        if size > self.buf.size:
            grown = zeros(size, self.buf.dtype)
            grown[: self.buf.size] = self.buf
            self.buf = grown


class _Region:
    """Storage inside another blob's: values [offset, offset + size) of a parent _Memory.

    Inference nets place a Concat's bottoms this way (memory_plan.py), so that their producers
    write straight into the Concat's top. The regions of one Concat form a family: when any
    member must change size (a reshape to new input dimensions), every member moves, with its
    values, to a buffer of its own, since the regions would no longer tile the top.
    """

    __slots__ = ("parent", "offset", "size", "family", "own")

    def __init__(self, parent, offset, size, family):
        self.parent, self.offset, self.size, self.family = parent, offset, size, family
        self.own = None
        family.append(self)

    @property
    def buf(self):
        if self.own is not None:
            return self.own.buf
        return self.parent.buf[self.offset: self.offset + self.size]

    def ensure(self, size):
        if self.own is None and size != self.size:
            for region in self.family:
                region._move_out()
        if self.own is not None:
            self.own.ensure(size)

    def _move_out(self):
        if self.own is None:
            own = _Memory(self.size, self.parent.buf.dtype)
            own.buf[...] = self.buf
            self.own = own


class _Count(int):
    """A blob's element count that can also be called as `count(start, end)`.

    pycaffe scripts and Python layers read `blob.count` as a number, while Caffe's
    C++ API (and minicaffe's layers) call `blob.count(start_axis, end_axis)`;
    this int answers both spellings.
    """

    def __new__(cls, value, shape):
        self = super().__new__(cls, value)
        self._shape = shape
        return self

    def __call__(self, start=0, end=None):
        """Product of dims start..end-1 (all of them by default), as Blob::count."""
        if start == 0 and end is None:
            return int(self)
        return math.prod(self._shape[start:end])   # ints: exact, and ~10x cheaper than np.prod


class Blob:
    """`data` and `diff` arrays of one shape (float32 unless told otherwise)."""

    def __init__(self, shape=(), dtype=np.float32, name=None):
        self.name = name
        self._shape = None   # set by reshape below
        self._count = 1
        self._data = _Memory(0, dtype)
        self._diff = _Memory(0, dtype)
        self.reshape(shape)

    # -- shape -------------------------------------------------------------
    @property
    def shape(self):
        return self._shape

    @property
    def dtype(self):
        return self._data.buf.dtype

    @property
    def num_axes(self):
        return len(self._shape)

    @property
    def count(self):
        """Number of elements; `count(start, end)` is the product of dims start..end-1."""
        return _Count(self._count, self._shape)

    def _legacy_dim(self, index):
        # Caffe's LegacyShape: num/channels/height/width of a blob with at most 4 axes,
        # where missing axes count as 1.
        if len(self._shape) > 4:
            raise BlobError(f"blob {self._label()} has {len(self._shape)} axes; num/channels/"
                             f"height/width only describe blobs with at most 4, use .shape")
        return self._shape[index] if index < len(self._shape) else 1

    num = property(lambda self: self._legacy_dim(0), doc="shape[0] (pycaffe/legacy 4-d accessor)")
    channels = property(lambda self: self._legacy_dim(1), doc="shape[1] or 1 (legacy 4-d accessor)")
    height = property(lambda self: self._legacy_dim(2), doc="shape[2] or 1 (legacy 4-d accessor)")
    width = property(lambda self: self._legacy_dim(3), doc="shape[3] or 1 (legacy 4-d accessor)")

    def canonical_axis(self, axis):
        n = len(self._shape)
        if not -n <= axis < max(n, 1):
            raise IndexError(f"axis {axis} out of range for {n}-d blob {self._label()} of shape {self._shape}")
        return axis % n if n else 0

    def reshape(self, *shape):
        """Reshape to `shape` (dims or one tuple); storage grows only when needed."""
        if len(shape) == 1 and not isinstance(shape[0], (int, np.integer)):
            shape = shape[0]
        if shape == self._shape:   # the common case in a running net: nothing to do
            return self
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise BlobError(f"blob {self._label()}: negative dimension in shape {shape}")
        self._shape = shape
        self._count = math.prod(shape)
        self._data.ensure(self._count)
        return self

    def reshape_like(self, other):
        return self.reshape(other.shape)

    # -- arrays ------------------------------------------------------------
    @property
    def data(self):
        return self._data.buf[: self._count].reshape(self._shape)

    @data.setter
    def data(self, value):
        self._assign(self.data, value, "data")

    @property
    def diff(self):
        self._diff.ensure(self._count)   # lazily: forward-only nets never need diffs
        return self._diff.buf[: self._count].reshape(self._shape)

    @diff.setter
    def diff(self, value):
        self._assign(self.diff, value, "diff")

    def _assign(self, view, value, what):
        value = np.asarray(value)
        if value.shape != view.shape and value.size != view.size:
            raise BlobError(f"cannot set {what} of blob {self._label()}: shape {value.shape} "
                             f"does not match the blob's shape {view.shape}")
        view[...] = value.reshape(view.shape)

    def _label(self):
        return repr(self.name) if self.name else "<unnamed>"

    # -- sharing -----------------------------------------------------------
    def share_data(self, other):
        """Make this blob's data the same memory as `other`'s (shapes must hold the same count)."""
        if other._count != self._count:
            raise BlobError(f"share_data: blob {self._label()} has {self._count} elements but "
                             f"{other._label()} has {other._count}")
        self._data = other._data

    def share_diff(self, other):
        if other._count != self._count:
            raise BlobError(f"share_diff: blob {self._label()} has {self._count} elements but "
                             f"{other._label()} has {other._count}")
        self._diff = other._diff

    def shares_data_with(self, other):
        return self._data is other._data

    # -- numbers -----------------------------------------------------------
    def update(self):
        """data -= diff, Caffe's Blob::Update."""
        np.subtract(self.data, self.diff, out=self.data)

    def asum_data(self):
        return float(np.abs(self.data).sum())

    def asum_diff(self):
        return float(np.abs(self.diff).sum())

    def sumsq_data(self):
        d = self.data.ravel()
        return float(np.dot(d, d))

    def sumsq_diff(self):
        d = self.diff.ravel()
        return float(np.dot(d, d))

    def scale_diff(self, factor):
        self.diff[...] *= factor

    # -- BlobProto -----------------------------------------------------------
    def to_proto(self, write_diff=False, proto=None):
        """Fill a BlobProto (float data, shape in `shape.dim`) as Caffe's ToProto does."""
        proto = caffe_pb2.BlobProto() if proto is None else proto
        proto.Clear()
        proto.shape.dim.extend(self._shape)
        if self.dtype == np.float64:
            proto.double_data.extend(self.data.ravel().tolist())
            if write_diff:
                proto.double_diff.extend(self.diff.ravel().tolist())
        else:
            proto.data.extend(self.data.ravel().tolist())
            if write_diff:
                proto.diff.extend(self.diff.ravel().tolist())
        return proto

    @staticmethod
    def proto_shape(proto):
        """The shape a BlobProto describes, including the legacy num/channels/height/width form."""
        if proto.HasField("shape"):
            return tuple(int(d) for d in proto.shape.dim)
        if any(proto.HasField(f) for f in ("num", "channels", "height", "width")):
            return (proto.num, proto.channels, proto.height, proto.width)
        n = len(proto.double_data) or len(proto.data)
        return (n,) if n else ()

    def from_proto(self, proto, reshape=True, what=None):
        """Load data (and diff when present) from a BlobProto; checks the shape unless reshape."""
        shape = self.proto_shape(proto)
        if reshape:
            self.reshape(shape)
        elif int(np.prod(shape, dtype=np.int64)) != self._count or (
                len(shape) == len(self._shape) and shape != self._shape):
            raise BlobError(f"{what or 'blob ' + self._label()}: shape mismatch, "
                             f"expected {self._shape} but the file has {shape}")
        values = proto.double_data if len(proto.double_data) else proto.data
        if len(values) != self._count:
            raise BlobError(f"{what or 'blob ' + self._label()}: BlobProto holds {len(values)} "
                             f"values but its shape {shape} needs {self._count}")
        self.data[...] = np.asarray(values, dtype=self.dtype).reshape(self._shape)
        diffs = proto.double_diff if len(proto.double_diff) else proto.diff
        if len(diffs) == self._count:
            self.diff[...] = np.asarray(diffs, dtype=self.dtype).reshape(self._shape)
        return self

    def __repr__(self):
        return f"Blob({self._label()}, shape={self._shape}, dtype={self.dtype})"
