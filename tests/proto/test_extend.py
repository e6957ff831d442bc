"""minicaffe.proto.extend / --proto: a fork's own caffe.proto, its fields and its custom layers."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import minicaffe
from minicaffe.layer import Layer, register_layer
from minicaffe.proto import caffe_pb2, extension
from minicaffe.proto_io import ProtoFileError, read_net_param

pytest.importorskip("grpc_tools", reason="proto.extend compiles with grpcio-tools' protoc")

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTO = pathlib.Path(caffe_pb2.__file__).with_name("caffe.proto")

NET = """name: "forked"
input: "data"
input_shape { dim: 2 dim: 3 }
layer {
  name: "triple"
  type: "ForkTestScale"
  bottom: "data"
  top: "out"
  fork_scale_param { alpha: 3 tag: "three" }
}
"""


@pytest.fixture
def fork_proto(tmp_path):
    """minicaffe's schema plus one message and one LayerParameter field, as a fork adds them."""
    text = PROTO.read_text().replace(
        "  optional WindowDataParameter window_data_param = 129;\n",
        "  optional WindowDataParameter window_data_param = 129;\n"
        "  optional ForkScaleParameter fork_scale_param = 90001;\n", 1)
    text += "\nmessage ForkScaleParameter {\n  optional float alpha = 1 [default = 2];\n" \
            "  optional string tag = 2;\n}\n"
    path = tmp_path / "fork_caffe.proto"
    path.write_text(text)
    (tmp_path / "net.prototxt").write_text(NET)
    yield path
    extension.reset()


@register_layer("ForkTestScale")
class ForkTestScaleLayer(Layer):
    """y = alpha * x, alpha from the fork's fork_scale_param."""

    def layer_setup(self, bottom, top):
        self.alpha = self.layer_param.fork_scale_param.alpha

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.alpha * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = self.alpha * top[0].diff


def test_without_the_fork_proto_the_field_is_named_with_its_place(fork_proto):
    with pytest.raises(ProtoFileError, match=r'net\.prototxt:9:3: .*no field named "fork_scale_param"'):
        read_net_param(fork_proto.parent / "net.prototxt")


def test_extend_parses_the_fork_and_its_layer_reads_its_params(fork_proto, tmp_path):
    minicaffe.proto.extend(fork_proto)
    net = minicaffe.Net(str(tmp_path / "net.prototxt"), minicaffe.TEST)
    layer = net.layer_dict["triple"]
    assert layer.layer_param.fork_scale_param.tag == "three"
    net.blobs["data"].data[...] = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(net.forward()["out"], 3 * np.arange(6).reshape(2, 3))
    # Saved weights keep the fork's field (number 90001), readable with the fork's schema.
    net.save(str(tmp_path / "forked.caffemodel"))
    saved = extension.active().message_class("caffe.NetParameter").FromString(
        (tmp_path / "forked.caffemodel").read_bytes())
    assert saved.layer[-1].fork_scale_param.alpha == 3
    # ... and minicaffe's own message carries it as an unknown field, byte for byte.
    mine = read_net_param(tmp_path / "forked.caffemodel")
    assert mine.SerializeToString() == saved.SerializeToString()


def test_cli_proto_flag(fork_proto, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "minicaffe", "draw", str(tmp_path / "net.prototxt"),
           str(tmp_path / "net.dot")]
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and 'no field named "fork_scale_param"' in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    good = subprocess.run(cmd + ["--proto", str(fork_proto)], capture_output=True, text=True, env=env)
    assert good.returncode == 0, good.stderr
    assert "triple" in (tmp_path / "net.dot").read_text()


def test_bad_fork_proto_is_one_line(tmp_path):
    path = tmp_path / "broken.proto"
    path.write_text('syntax = "proto2";\npackage caffe;\nmessage NetParameter { optional Nope x = 1; }\n')
    with pytest.raises(ProtoFileError, match=r"broken\.proto: cannot compile it: .*Nope"):
        minicaffe.proto.extend(path)
    other = tmp_path / "other.proto"
    other.write_text('syntax = "proto2";\npackage other;\nmessage NetParameter { optional int32 x = 1; }\n')
    with pytest.raises(ProtoFileError, match="does not define caffe.NetParameter"):
        minicaffe.proto.extend(other)
    assert extension.active() is None


def test_missing_grpc_tools_names_the_extra(fork_proto, monkeypatch):
    monkeypatch.setitem(sys.modules, "grpc_tools", None)
    with pytest.raises(ImportError, match=r"minicaffe\[proto\]"):
        minicaffe.proto.extend(fork_proto)


def test_fork_with_ceil_mode_at_13_keeps_its_meaning(tmp_path):
    text = PROTO.read_text()
    start = text.index("  optional RoundMode round_mode = 13 [default = CEIL];")
    end = text.index("  optional bool ceil_mode = 1013 [default = true];\n") + len(
        "  optional bool ceil_mode = 1013 [default = true];\n")
    text = text[:start] + "  optional bool ceil_mode = 13 [default = true];\n" + text[end:]
    proto = tmp_path / "ceil_caffe.proto"
    proto.write_text(text)
    net = tmp_path / "pool.prototxt"
    net.write_text('layer { name: "p" type: "Pooling" pooling_param { kernel_size: 3 ceil_mode: false } }\n'
                   'layer { name: "q" type: "Pooling" pooling_param { kernel_size: 3 } }\n')
    try:
        minicaffe.proto.extend(proto)
        p, q = read_net_param(net).layer
    finally:
        extension.reset()
    assert p.pooling_param.ceil_mode is False and not p.pooling_param.HasField("round_mode")
    assert not q.pooling_param.HasField("round_mode") and not q.pooling_param.HasField("ceil_mode")
