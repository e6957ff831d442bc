"""Stream a binary .caffemodel's weights into a net's blobs without reading the file whole.

A .caffemodel is a NetParameter in protobuf's wire format: a run of fields, each a tag varint
(field number << 3 | wire type) and a payload. Parsing it with protobuf holds the file's bytes
and every weight a second time (as a repeated float field); converting those to arrays makes
a third copy. Here the file is walked instead:

- pass 1 (`scan`) reads tags and lengths only, seeking over the packed weights. Everything
  except the weights (the net's and each layer's other fields, a BlobProto's shape) is small:
  those bytes are gathered and parsed with protobuf, so names, shapes, upgrades and unknown
  fields mean exactly what they mean on the protobuf path, and the file is checked whole
  before any weight is written, as ParseFromString does.
- pass 2 (`load_blob`, called by Net.copy_from) reads each blob's packed float32/float64
  values straight into the blob's array (`readinto`), so the memory held on top of the net's
  own weights is nothing when the file's dtype is the net's, and one small chunk otherwise.

Field numbers (BVLC caffe.proto): NetParameter.layer = 100, .layers (V1) = 2;
LayerParameter.blobs = 7, V1LayerParameter.blobs = 6; BlobProto.data = 5, diff = 6 (packed float), double_data = 8,
double_diff = 9 (packed double); shape = 7 and num/channels/height/width = 1-4 are parsed by
protobuf; V1 layers are upgraded from their small parts as read_net_param upgrades them. Files
with protobuf groups go to the protobuf path (`scan` returns None); so does one BlobProto whose values are unpacked or split into several runs (only that
blob is parsed with protobuf, at most one blob in memory).
"""
import os

import numpy as np

from .blob import Blob, BlobError
from .proto import caffe_pb2
from .proto_io import ProtoFileError, read_net_param

__all__ = ["scan", "StreamedNet", "StreamedBlob", "blob_shape", "load_blob"]

_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = 0, 1, 2, 3, 4, 5
_LAYER, _V1_LAYERS = 100, 2                      # NetParameter
_BLOBS, _V1_BLOBS = 7, 6                         # LayerParameter, V1LayerParameter
_VALUE_DTYPES = {5: np.dtype("<f4"), 6: np.dtype("<f4"),   # BlobProto data, diff
                 8: np.dtype("<f8"), 9: np.dtype("<f8")}   # double_data, double_diff
_DATA, _DIFF, _DOUBLE_DATA, _DOUBLE_DIFF = 5, 6, 8, 9
_CHUNK = 1 << 18   # values converted per step when the file's dtype is not the net's (2 MB)


class _Corrupt(Exception):
    """The wire format is broken (the text says where)."""


class _UseProtobuf(Exception):
    """A layout this reader leaves to protobuf's whole-file parse (groups)."""


class _Reader:
    """Tags, varints and field spans of a binary file, with the position tracked."""

    def __init__(self, f, size):
        self.f, self.pos, self.size = f, 0, size

    def varint(self, end):
        value = shift = 0
        while True:
            if self.pos >= end:
                raise _Corrupt(f"a varint runs past its message at byte {self.pos}")
            byte = self.f.read(1)
            if not byte:
                raise _Corrupt(f"the file ends inside a varint at byte {self.pos}")
            self.pos += 1
            value |= (byte[0] & 0x7F) << shift
            if byte[0] < 0x80:
                return value
            shift += 7
            if shift >= 70:
                raise _Corrupt(f"a varint longer than 10 bytes ends at byte {self.pos}")

    def tag(self, end):
        tag = self.varint(end)
        field, wire = tag >> 3, tag & 7
        if field == 0 or wire > _FIXED32:
            raise _Corrupt(f"invalid field tag {tag} at byte {self.pos}")
        if wire in (_START_GROUP, _END_GROUP):
            raise _UseProtobuf()
        return field, wire

    def length(self, end):
        """A length prefix, checked to fit the enclosing message ending at `end`."""
        n = self.varint(end)
        if self.pos + n > end:
            raise _Corrupt(f"a field of {n} bytes at byte {self.pos} runs past "
                           + ("the end of the file" if end == self.size else "its message")
                           + f" (byte {end})")
        return n

    def skip_bytes(self, n, end):
        if self.pos + n > end:
            raise _Corrupt(f"a {n}-byte field at byte {self.pos} runs past its message")
        self.f.seek(n, 1)
        self.pos += n

    def skip(self, wire, end):
        """Skip the payload of a field of wire type `wire`."""
        if wire == _VARINT:
            self.varint(end)
        elif wire == _FIXED64:
            self.skip_bytes(8, end)
        elif wire == _FIXED32:
            self.skip_bytes(4, end)
        else:
            self.skip_bytes(self.length(end), end)

    def span(self, start):
        """The raw bytes from `start` to the current position (a field just skipped)."""
        self.f.seek(start)
        raw = self.f.read(self.pos - start)
        if len(raw) != self.pos - start:
            raise _Corrupt(f"the file ends at byte {start + len(raw)}")
        return raw


class StreamedBlob:
    """Where one BlobProto's values lie in the file, and the shape it describes."""

    __slots__ = ("net", "shape", "runs", "start", "end")

    def __init__(self, net, shape, runs, start=None, end=None):
        self.net = net          # the StreamedNet that holds the open file
        self.shape = shape      # Blob.proto_shape of this BlobProto
        self.runs = runs        # {field number: (byte offset, number of values)}; None: parse
        self.start, self.end = start, end   # the BlobProto's bytes, for the protobuf parse

    def count(self, *fields):
        """The number of values in the first of `fields` that holds any (Caffe's precedence)."""
        for field in fields:
            n = self.runs.get(field, (0, 0))[1]
            if n:
                return n, field
        return 0, fields[-1]

    def parse(self):
        """This BlobProto parsed by protobuf (for unpacked or split values)."""
        raw = self.net.read_at(self.start, self.end - self.start)
        try:
            return caffe_pb2.BlobProto.FromString(raw)
        except Exception as exc:
            raise ProtoFileError(f"{self.net.path}: neither HDF5 nor a binary .caffemodel "
                                 f"({exc})") from None

    def copy_into(self, blob, what):
        """Blob.from_proto(proto, reshape=False, what=what), reading the values from the file."""
        if self.runs is None:
            proto = self.parse()
            blob.from_proto(proto, reshape=False, what=what)
            return
        count, shape = blob.count(), self.shape
        if int(np.prod(shape, dtype=np.int64)) != count or (
                len(shape) == len(blob.shape) and shape != blob.shape):
            raise BlobError(f"{what}: shape mismatch, expected {blob.shape} but the file has {shape}")
        n, field = self.count(_DOUBLE_DATA, _DATA)
        if n != count:
            raise BlobError(f"{what}: BlobProto holds {n} values but its shape {shape} "
                            f"needs {count}")
        if not count:   # an empty blob: nothing to read (its fields may be absent)
            return
        self.net.read_values(self.runs[field][0], _VALUE_DTYPES[field], blob.data.reshape(-1))
        n, field = self.count(_DOUBLE_DIFF, _DIFF)
        if n == count:
            self.net.read_values(self.runs[field][0], _VALUE_DTYPES[field], blob.diff.reshape(-1))


class StreamedLayer:
    __slots__ = ("name", "blobs")

    def __init__(self, name, blobs):
        self.name, self.blobs = name, blobs


class StreamedNet:
    """The layers of a scanned .caffemodel (`.layer`: name and StreamedBlobs, as a
    NetParameter's), reading values from the file, which stays open inside `with`."""

    def __init__(self, path):
        self.path = path
        self.layer = []
        self._file = None

    def __enter__(self):
        self._file = open(self.path, "rb")
        return self

    def __exit__(self, *exc):
        self._file.close()
        self._file = None

    def read_at(self, offset, n):
        self._file.seek(offset)
        raw = self._file.read(n)
        if len(raw) != n:
            raise self._ended(offset + len(raw))
        return raw

    def read_values(self, offset, file_dtype, out):
        """Fill the flat array `out` with len(out) values of `file_dtype` at `offset`."""
        self._file.seek(offset)
        if out.dtype == file_dtype:   # the common case: straight from the file, no copy
            view = memoryview(out).cast("B")
            while view.nbytes:
                n = self._file.readinto(view)
                if not n:
                    raise self._ended(self._file.tell())
                view = view[n:]
            return
        for start in range(0, out.size, _CHUNK):  # a float64 file into float32 or back
            stop = min(out.size, start + _CHUNK)
            raw = self.read_at(offset + start * file_dtype.itemsize,
                               (stop - start) * file_dtype.itemsize)
            out[start:stop] = np.frombuffer(raw, file_dtype)

    def _ended(self, at):
        return ProtoFileError(f"{self.path}: the file ends at byte {at}, inside a blob's values "
                              f"(was it changed while being read?)")


def _scan_blob(reader, end, net):
    start = reader.pos
    rest, runs, parse = bytearray(), {}, False
    while reader.pos < end:
        field_start = reader.pos
        field, wire = reader.tag(end)
        dtype = _VALUE_DTYPES.get(field)
        if dtype is not None and wire == _LENGTH and field not in runs:
            n = reader.length(end)
            if n % dtype.itemsize:
                raise _Corrupt(f"packed field {field} at byte {reader.pos} holds {n} bytes, "
                               f"not a multiple of {dtype.itemsize}")
            runs[field] = (reader.pos, n // dtype.itemsize)
            reader.skip_bytes(n, end)
        elif dtype is not None:   # unpacked, or a second run: protobuf joins them
            parse = True
            reader.skip(wire, end)
        else:
            reader.skip(wire, end)
            rest += reader.span(field_start)
    if parse:
        proto = caffe_pb2.BlobProto.FromString(reader.span(start))   # one blob, checked now
        return StreamedBlob(net, Blob.proto_shape(proto), None, start, end)
    proto = caffe_pb2.BlobProto.FromString(bytes(rest))
    blob = StreamedBlob(net, None, runs)
    if proto.HasField("shape") or any(proto.HasField(f) for f in ("num", "channels",
                                                                   "height", "width")):
        blob.shape = Blob.proto_shape(proto)
    else:   # Blob.proto_shape of a BlobProto that gives only its values
        n = blob.count(_DOUBLE_DATA, _DATA)[0]
        blob.shape = (n,) if n else ()
    return blob


def _scan_layer(reader, end, net, blobs_field):
    rest, blobs = bytearray(), []
    while reader.pos < end:
        field_start = reader.pos
        field, wire = reader.tag(end)
        if field == blobs_field and wire == _LENGTH:
            n = reader.length(end)
            blobs.append(_scan_blob(reader, reader.pos + n, net))
        else:
            reader.skip(wire, end)
            rest += reader.span(field_start)
    return bytes(rest), blobs


def scan(path):
    """A StreamedNet for the binary .caffemodel at `path` (whose size is > 0), or None when
    the file has protobuf groups (read it with protobuf). Raises ProtoFileError for a
    truncated or corrupt file, with the texts of Net.copy_from's protobuf path."""
    net, size = StreamedNet(path), os.path.getsize(path)
    top, layers = bytearray(), []
    try:
        with open(path, "rb") as f:
            reader = _Reader(f, size)
            while reader.pos < size:
                field_start = reader.pos
                field, wire = reader.tag(size)
                if field in (_LAYER, _V1_LAYERS) and wire == _LENGTH:
                    n = reader.length(size)
                    v1 = field == _V1_LAYERS
                    layers.append((v1,) + _scan_layer(reader, reader.pos + n, net,
                                                      _V1_BLOBS if v1 else _BLOBS))
                else:
                    reader.skip(wire, size)
                    top += reader.span(field_start)
        skeleton = caffe_pb2.NetParameter.FromString(bytes(top))
        for v1, rest, _ in layers:
            (skeleton.layers if v1 else skeleton.layer).add().MergeFromString(rest)
    except _UseProtobuf:
        return None
    except Exception as exc:   # _Corrupt, or protobuf's DecodeError on the small parts
        raise ProtoFileError(f"{path}: neither HDF5 nor a binary .caffemodel ({exc})") from None
    if not layers:
        raise ProtoFileError(f"{path}: the weights file holds no layers (is it a "
                             f"binary .caffemodel?)")
    try:   # V1 layers become layers in order; a net mixing both kinds is refused
        upgraded = read_net_param(skeleton)
    except ValueError as exc:  # an upgrade that does not apply, or a non-UTF-8 name
        raise ProtoFileError(f"{path}: {exc}") from None
    # upgrades keep the layers in order and may only put an Input layer (of net-level inputs,
    # which has no blobs) in front of them
    added = len(upgraded.layer) - len(layers)
    for i, lp in enumerate(upgraded.layer):
        net.layer.append(StreamedLayer(lp.name, layers[i - added][2] if i >= added else []))
    return net


def blob_shape(source):
    """The shape a BlobProto or StreamedBlob describes."""
    return source.shape if isinstance(source, StreamedBlob) else Blob.proto_shape(source)


def load_blob(blob, source, what):
    """Copy a BlobProto's or StreamedBlob's values (and diff) into `blob` of the same shape."""
    if isinstance(source, StreamedBlob):
        source.copy_into(blob, what)
    else:
        blob.from_proto(source, reshape=False, what=what)
