"""Streaming .caffemodel loading (minicaffe/caffemodel_reader.py) equals protobuf's whole-file
parse, byte for byte, on files written by net.save and on hand-encoded wire layouts (unpacked
values, fields out of order, split runs, legacy 4-d shapes, double_data); a truncated file is one
ProtoFileError before any weight is written; the streaming path holds no copy of the weights."""
import struct
import tracemalloc
from unittest import mock

import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe import TEST, Net
from minicaffe import caffemodel_reader
from minicaffe.layer import LayerError
from minicaffe.proto import caffe_pb2
from minicaffe.proto_io import ProtoFileError
from tests.wire_format import field, varint

LENET = """name: "lenet"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 1 dim: 28 dim: 28 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 20 kernel_size: 5 weight_filler { type: "xavier" }
                      bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 50 kernel_size: 5 weight_filler { type: "xavier" }
                      bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
  inner_product_param { num_output: 500 weight_filler { type: "xavier" }
                        bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "ip2" top: "prob" }
"""

BN_NET = """name: "bn"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 bias_term: false weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv"
  scale_param { bias_term: true filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "gaussian" std: 1 } } }
"""


def make_net(text, tmp_path, dtype=np.float32, name="net.prototxt"):
    path = tmp_path / name
    path.write_text(text)
    return Net(str(path), TEST, dtype=dtype)


def randomize(net, seed=0, diff=False):
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        for blob in layer.blobs:
            blob.data[...] = rng.standard_normal(blob.shape)
            if diff:
                blob.diff[...] = rng.standard_normal(blob.shape)
    return net


def params(net):
    return {name: [(b.data.tobytes(), b.diff.tobytes()) for b in layer.blobs]
            for name, layer in zip(net.layer_names, net.layers) if layer.blobs}


def load_both(text, tmp_path, path, dtype=np.float32):
    """The params of two fresh nets loaded from `path`: one streamed, one through copy_from's
    whole-file protobuf path (which scan returning None selects)."""
    streamed = make_net(text, tmp_path, dtype).copy_from(str(path))
    with mock.patch.object(caffemodel_reader, "scan", lambda label: None):
        parsed = make_net(text, tmp_path, dtype).copy_from(str(path))
    return params(streamed), params(parsed)


# -- hand encoding of the wire format ------------------------------------------------------------
def encode_blob(proto, packed=True, order=None, split=False):
    """A BlobProto's bytes: values packed or unpacked (one tag per value), fields in `order`
    (field numbers), a packed field split into two runs when `split`."""
    parts = {}
    for number, name, fmt in ((5, "data", "<f"), (6, "diff", "<f"),
                              (8, "double_data", "<d"), (9, "double_diff", "<d")):
        values = list(getattr(proto, name))
        if not values:
            continue
        if not packed:
            wire = 5 if fmt == "<f" else 1
            parts[number] = b"".join(field(number, wire, struct.pack(fmt, v)) for v in values)
        elif split and len(values) > 1:
            half = len(values) // 2
            parts[number] = (field(number, 2, struct.pack(f"<{half}{fmt[1]}", *values[:half]))
                             + field(number, 2, struct.pack(f"<{len(values) - half}{fmt[1]}",
                                                            *values[half:])))
        else:
            parts[number] = field(number, 2, struct.pack(f"<{len(values)}{fmt[1]}", *values))
    if proto.HasField("shape"):
        parts[7] = field(7, 2, proto.shape.SerializeToString())
    for number, name in ((1, "num"), (2, "channels"), (3, "height"), (4, "width")):
        if proto.HasField(name):
            parts[number] = field(number, 0, varint(getattr(proto, name)))
    return b"".join(parts[n] for n in (order or sorted(parts)) if n in parts)


def encode_net(param, blob_options=lambda layer, j: {}, blobs_first=False, name_last=False):
    """A NetParameter's bytes with each BlobProto encoded by encode_blob(**blob_options(...))."""
    out = []
    for lp in param.layer:
        rest = caffe_pb2.LayerParameter()
        rest.CopyFrom(lp)
        rest.ClearField("blobs")
        blobs = b"".join(field(7, 2, encode_blob(b, **blob_options(lp.name, j)))
                         for j, b in enumerate(lp.blobs))
        rest = rest.SerializeToString()
        out.append(field(100, 2, blobs + rest if blobs_first else rest + blobs))
    name = field(1, 2, param.name.encode())
    return b"".join(out) + name if name_last else name + b"".join(out)


def legacy_4d(param):
    """Every blob's shape as num/channels/height/width (padded with leading 1s)."""
    for lp in param.layer:
        for b in lp.blobs:
            dims = list(b.shape.dim)
            b.ClearField("shape")
            b.num, b.channels, b.height, b.width = [1] * (4 - len(dims)) + dims
    return param


# -- equality with the protobuf path ---------------------------------------------------------------
@pytest.mark.parametrize("text", [LENET, BN_NET], ids=["lenet", "batchnorm"])
@pytest.mark.parametrize("write_diff", [False, True])
def test_saved_files_load_exactly_as_protobuf_does(tmp_path, text, write_diff):
    net = randomize(make_net(text, tmp_path), diff=True)
    net.save(str(tmp_path / "w.caffemodel"), write_diff=write_diff)
    streamed, parsed = load_both(text, tmp_path, tmp_path / "w.caffemodel")
    assert streamed == parsed
    assert streamed == params(net) if write_diff else all(
        s[0] == d[0] for name in streamed for s, d in zip(streamed[name], params(net)[name]))


def test_legacy_4d_shapes_load_as_protobuf_does(tmp_path):
    net = randomize(make_net(BN_NET, tmp_path))
    path = tmp_path / "legacy.caffemodel"
    path.write_bytes(legacy_4d(net.to_proto()).SerializeToString())
    streamed, parsed = load_both(BN_NET, tmp_path, path)
    assert streamed == parsed == params(net)


@pytest.mark.parametrize("file_dtype,net_dtype", [(np.float64, np.float32), (np.float64, np.float64),
                                                  (np.float32, np.float64)])
def test_double_data_and_dtype_conversions_match_protobuf(tmp_path, file_dtype, net_dtype):
    net = randomize(make_net(BN_NET, tmp_path, file_dtype), diff=True)
    net.save(str(tmp_path / "w.caffemodel"), write_diff=True)
    if file_dtype == np.float64:
        assert len(caffe_pb2.NetParameter.FromString(
            (tmp_path / "w.caffemodel").read_bytes()).layer[1].blobs[0].double_data)
    streamed, parsed = load_both(BN_NET, tmp_path, tmp_path / "w.caffemodel", net_dtype)
    assert streamed == parsed


def test_big_blob_crossing_conversion_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(caffemodel_reader, "_CHUNK", 1000)   # ip1's 400,000 weights: 400 chunks
    net = randomize(make_net(LENET, tmp_path, np.float64))
    net.save(str(tmp_path / "w.caffemodel"))
    streamed, parsed = load_both(LENET, tmp_path, tmp_path / "w.caffemodel")
    assert streamed == parsed


@pytest.mark.parametrize("layout", [
    {"packed": False},                          # one tag per value
    {"order": [9, 8, 6, 5, 4, 3, 2, 1, 7]},     # shape and values in reverse field order
    {"order": [7, 1, 2, 3, 4, 5, 6, 8, 9]},
    {"split": True},                            # one packed field in two runs, as protobuf joins
], ids=["unpacked", "reversed", "shape-first", "split-runs"])
@pytest.mark.parametrize("legacy", [False, True])
def test_hand_encoded_layouts_match_protobuf(tmp_path, layout, legacy):
    net = randomize(make_net(BN_NET, tmp_path, np.float64), diff=True)
    param = net.to_proto(write_diff=True)
    for lp in param.layer:   # float data for some blobs, double_data for others
        for j, b in enumerate(lp.blobs):
            if j == 1:
                b.data.extend(b.double_data)
                b.diff.extend(b.double_diff)
                b.ClearField("double_data")
                b.ClearField("double_diff")
    if legacy:
        legacy_4d(param)
    path = tmp_path / "hand.caffemodel"
    path.write_bytes(encode_net(param, lambda name, j: layout, blobs_first=True, name_last=True))
    assert caffe_pb2.NetParameter.FromString(path.read_bytes()) == param   # the layout is valid
    streamed, parsed = load_both(BN_NET, tmp_path, path)
    assert streamed == parsed


def test_unknown_fields_and_wrong_wire_types_are_skipped_as_protobuf_does(tmp_path):
    net = randomize(make_net(LENET, tmp_path))
    junk = field(7, 0, varint(3)) + field(999, 5, b"abcd") + field(998, 1, b"12345678")
    param = net.to_proto()
    body = b"".join(field(100, 2, junk + lp.SerializeToString() + field(5, 0, varint(1)))
                    for lp in param.layer)
    path = tmp_path / "junk.caffemodel"
    path.write_bytes(field(100, 0, varint(7)) + field(500, 2, b"xyz") + body)
    streamed, parsed = load_both(LENET, tmp_path, path)
    assert streamed == parsed == params(net)


def test_net_level_inputs_and_ignored_layers_keep_their_behaviour(tmp_path, caplog):
    net = randomize(make_net(LENET, tmp_path))
    param = net.to_proto()
    param.input.append("data")
    param.input_shape.add().dim.extend([2, 1, 28, 28])
    param.layer[0].name = "not_in_the_net"
    path = tmp_path / "w.caffemodel"
    path.write_bytes(param.SerializeToString())
    with caplog.at_level("INFO", logger="minicaffe"):
        streamed, parsed = load_both(LENET, tmp_path, path)
    assert streamed == parsed == params(net)
    assert "Ignoring source layer not_in_the_net" in caplog.text


def v1_file(net, path, legacy=False):
    """`net`'s weights as a V1 file (`layers`, V1LayerParameter), as the model zoo's older files."""
    param = legacy_4d(net.to_proto()) if legacy else net.to_proto()
    v1 = caffe_pb2.NetParameter(name=param.name)
    v1.input.append("data")   # a legacy file's record of its inputs, without shapes
    for lp in param.layer:
        layer = v1.layers.add(name=lp.name, type=caffe_pb2.V1LayerParameter.INNER_PRODUCT)
        layer.blobs.extend(lp.blobs)
        layer.blobs_lr.extend([1.0] * len(lp.blobs))
    path.write_bytes(v1.SerializeToString())
    return v1


@pytest.mark.parametrize("legacy", [False, True])
def test_v1_layers_stream_and_match_protobuf(tmp_path, legacy):
    net = randomize(make_net(LENET, tmp_path))
    v1_file(net, tmp_path / "v1.caffemodel", legacy)
    with caffemodel_reader.scan(str(tmp_path / "v1.caffemodel")) as streamed:
        assert [layer.name for layer in streamed.layer] == list(net.layer_names)
    streamed, parsed = load_both(LENET, tmp_path, tmp_path / "v1.caffemodel")
    assert streamed == parsed == params(net)


def test_v1_upgrade_errors_are_the_protobuf_paths(tmp_path):
    net = randomize(make_net(LENET, tmp_path))
    v1 = v1_file(net, tmp_path / "v1.caffemodel")
    mixed = caffe_pb2.NetParameter()
    mixed.CopyFrom(v1)
    mixed.layer.add(name="new")
    v0 = caffe_pb2.NetParameter()
    v0.CopyFrom(v1)
    v0.layers[1].layer.name = "v0"
    for message, pattern in ((mixed, "mixes V1 'layers' and current 'layer' fields"),
                             (v0, "in Caffe's V0 format")):
        path = tmp_path / "bad.caffemodel"
        path.write_bytes(message.SerializeToString())
        for streaming in (True, False):
            with mock.patch.object(caffemodel_reader, "scan",
                                   caffemodel_reader.scan if streaming else lambda label: None):
                with pytest.raises(ProtoFileError, match=r"bad\.caffemodel: .*" + pattern):
                    make_net(LENET, tmp_path).copy_from(str(path))


# -- errors -----------------------------------------------------------------------------------------
def test_shape_and_count_mismatches_raise_the_same_errors(tmp_path):
    net = randomize(make_net(LENET, tmp_path))
    net.save(str(tmp_path / "w.caffemodel"))
    other = LENET.replace("num_output: 500", "num_output: 400")
    shapes = r"layer 'ip1' param 0: the file has shape \(500, 800\) but the net expects \(400, 800\)"
    with pytest.raises(LayerError, match=r"w\.caffemodel: " + shapes):
        make_net(other, tmp_path, name="other.prototxt").copy_from(str(tmp_path / "w.caffemodel"))
    with pytest.raises(LayerError, match=r"NetParameter: " + shapes):
        make_net(other, tmp_path, name="other.prototxt").copy_from(net.to_proto())
    no_bias = LENET.replace('num_output: 10 weight', 'num_output: 10 bias_term: false weight')
    with pytest.raises(LayerError, match=r"w\.caffemodel: layer 'ip2' has 2 parameter blobs in the "
                                         r"file but 1 in the net"):
        make_net(no_bias, tmp_path, name="nobias.prototxt").copy_from(str(tmp_path / "w.caffemodel"))


def test_values_not_matching_the_shape_raise_blob_error(tmp_path):
    net = randomize(make_net(LENET, tmp_path))
    param = net.to_proto()
    del param.layer[1].blobs[1].data[-1]
    path = tmp_path / "short.caffemodel"
    path.write_bytes(param.SerializeToString())
    with pytest.raises(ValueError, match=r"w?short\.caffemodel: layer 'conv1' param 1: BlobProto "
                                         r"holds 19 values but its shape \(20,\) needs 20"):
        make_net(LENET, tmp_path).copy_from(str(path))


@pytest.mark.filterwarnings("ignore:.*copied weights for 0 layers")
def test_every_truncation_is_one_proto_file_error_and_writes_nothing(tmp_path):
    net = randomize(make_net(BN_NET, tmp_path))
    net.save(str(tmp_path / "w.caffemodel"))
    raw = (tmp_path / "w.caffemodel").read_bytes()
    target = randomize(make_net(BN_NET, tmp_path), seed=1)
    before = params(target)
    offsets = sorted(set(range(1, 200)) | set(range(1, len(raw), 37)) | {len(raw) - 1})
    for size in offsets:
        path = tmp_path / "cut.caffemodel"
        path.write_bytes(raw[:size])
        try:
            target.copy_from(str(path))
        except ProtoFileError as exc:
            assert "cut.caffemodel: " in str(exc) and "\n" not in str(exc), str(exc)
        else:   # a cut between two layers leaves a valid, shorter file
            assert caffe_pb2.NetParameter.FromString(raw[:size]) is not None
            randomize(target, seed=1)
            continue
        assert params(target) == before, size


def test_corrupt_wire_format_names_the_file(tmp_path):
    target = make_net(LENET, tmp_path)
    for raw in (b"\xff" * 12, b"\x07abc", field(100, 2, field(7, 2, field(5, 2, b"abc"))),
                field(100, 2, b"\x80" * 11), b"\x0b\x0c"):
        path = tmp_path / "bad.caffemodel"
        path.write_bytes(raw)
        with pytest.raises(ProtoFileError, match=r"bad\.caffemodel: ") as info:
            target.copy_from(str(path))
        assert "\n" not in str(info.value)


def test_a_file_of_no_layers_is_refused(tmp_path):
    path = tmp_path / "empty.caffemodel"
    path.write_bytes(field(1, 2, b"lenet"))
    with pytest.raises(ProtoFileError, match="the weights file holds no layers"):
        make_net(LENET, tmp_path).copy_from(str(path))


# -- memory -----------------------------------------------------------------------------------------
def test_streaming_holds_no_copy_of_a_40mb_blob(tmp_path):
    text = """name: "big"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 10000 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 1000 bias_term: false weight_filler { type: "constant" value: 0.5 } } }
"""
    values = np.arange(10_000_000, dtype="<f4")
    shape = caffe_pb2.BlobShape(dim=[1000, 10000]).SerializeToString()
    blob = field(5, 2, values.tobytes()) + field(7, 2, shape)   # as net.save writes it, faster
    (tmp_path / "big.caffemodel").write_bytes(field(100, 2, field(1, 2, b"ip") + field(7, 2, blob)))
    del values, blob
    target = make_net(text, tmp_path)
    tracemalloc.start()
    try:
        target.copy_from(str(tmp_path / "big.caffemodel"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2**20:.1f} MB allocated while loading a 40 MB blob"
    tracemalloc.start()   # the protobuf path, for scale: tracemalloc sees its array copy
    try:
        make_net(text, tmp_path).copy_from(caffe_pb2.NetParameter.FromString(
            (tmp_path / "big.caffemodel").read_bytes()))
        _, protobuf_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert protobuf_peak > 40_000_000
    assert target.layers[1].blobs[0].data[999, 9999] == 9_999_999
    assert np.array_equal(target.layers[1].blobs[0].data.ravel(), np.arange(10_000_000, dtype=np.float32))


def test_an_empty_blob_scans_and_loads_as_protobuf_does(tmp_path):
    from minicaffe.blob import Blob
    param = caffe_pb2.NetParameter()
    param.layer.add(name="x").blobs.add().shape.dim.append(0)
    path = tmp_path / "empty_blob.caffemodel"
    path.write_bytes(param.SerializeToString())
    with caffemodel_reader.scan(str(path)) as streamed:
        (source,) = streamed.layer[0].blobs
        assert caffemodel_reader.blob_shape(source) == (0,)
        caffemodel_reader.load_blob(Blob((0,)), source, "x")
    Blob((0,)).from_proto(param.layer[0].blobs[0], reshape=False)
