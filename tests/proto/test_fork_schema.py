"""The forks' messages and fields in caffe.proto: numbers, defaults, and the fork nets parse."""
import pathlib

import pytest

from minicaffe.proto import caffe_pb2
from minicaffe.proto_io import read_net_param

FORKS = pathlib.Path(__file__).resolve().parents[2] / ".." / "shared" / "models" / "forks"
LP = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name


@pytest.mark.parametrize("name,number", [
    ("annotated_data_param", 200), ("multibox_loss_param", 201), ("permute_param", 202),
    ("prior_box_param", 203), ("detection_output_param", 204),
    ("detection_evaluate_param", 205), ("norm_param", 206), ("video_data_param", 207),
    ("roi_pooling_param", 8266711), ("smooth_l1_loss_param", 8266712),
    ("bn_param", 152), ("shuffle_channel_param", 164), ("reorg_param", 159),
    # moved off numbers BVLC uses (143 input_param, 137 embed_param)
    ("interp_param", 2143), ("upsample_param", 2137), ("segnet_bn_param", 45),
])
def test_layer_parameter_fork_field_numbers(name, number):
    assert LP[name].number == number


def test_fork_defaults():
    pb = caffe_pb2.PriorBoxParameter()
    assert pb.flip is True and pb.clip is False and pb.offset == pytest.approx(0.5)
    do = caffe_pb2.DetectionOutputParameter()
    assert do.share_location is True and do.keep_top_k == -1
    assert do.code_type == caffe_pb2.PriorBoxParameter.CORNER
    assert caffe_pb2.NonMaximumSuppressionParameter().nms_threshold == pytest.approx(0.3)
    assert caffe_pb2.NonMaximumSuppressionParameter().eta == pytest.approx(1.0)
    norm = caffe_pb2.NormalizeParameter()
    assert norm.across_spatial and norm.channel_shared and norm.eps == pytest.approx(1e-10)
    assert caffe_pb2.ROIPoolingParameter().spatial_scale == 1
    assert caffe_pb2.SmoothL1LossParameter().sigma == 1
    assert caffe_pb2.InterpParameter().zoom_factor == 1
    assert caffe_pb2.UpsampleParameter().scale == 2
    assert caffe_pb2.BNParameter().momentum == pytest.approx(0.9)
    assert caffe_pb2.ShuffleChannelParameter().group == 1
    pp = caffe_pb2.PoolingParameter()
    assert pp.ceil_mode is True and pp.round_mode == caffe_pb2.PoolingParameter.CEIL
    assert caffe_pb2.PoolingParameter.DESCRIPTOR.fields_by_name["round_mode"].number == 13


@pytest.mark.parametrize("path", sorted(FORKS.glob("*.prototxt")), ids=lambda p: p.name)
def test_fork_nets_parse(path):
    assert len(read_net_param(path).layer) > 10


def _field(number, payload):
    """Raw bytes of one length-delimited field, as a fork's Caffe would write it."""
    def varint(n):
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_binary_fork_numbers_are_remapped(tmp_path):
    interp = caffe_pb2.InterpParameter(height=33, width=17, pad_beg=0, pad_end=-1)
    upsample = caffe_pb2.UpsampleParameter(scale=2, pad_out_h=True, upsample_w=40)
    segnet_bn = caffe_pb2.SegNetBNParameter(bn_mode=caffe_pb2.BNParameter.INFERENCE)
    segnet_bn.shift_filler.value = 0.25
    layers = [(caffe_pb2.LayerParameter(name="i", type="Interp"), 143, interp),
              (caffe_pb2.LayerParameter(name="u", type="Upsample"), 137, upsample),
              (caffe_pb2.LayerParameter(name="b", type="BN"), 45, segnet_bn)]
    raw = b"".join(_field(100, lp.SerializeToString() + _field(n, m.SerializeToString()))
                   for lp, n, m in layers)
    path = tmp_path / "fork.caffemodel"
    path.write_bytes(raw)
    net = read_net_param(path)
    i, u, b = net.layer
    assert i.interp_param == interp and not i.HasField("input_param")
    assert u.upsample_param == upsample and not u.HasField("embed_param")
    assert b.bn_param.bn_mode == caffe_pb2.BNParameter.INFERENCE
    assert b.bn_param.shift_filler.value == pytest.approx(0.25)
    assert not b.HasField("segnet_bn_param")
