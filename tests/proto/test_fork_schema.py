"""The forks' messages and fields in caffe.proto: numbers, defaults, and the fork nets parse."""
import pathlib

import pytest

from minicaffe.proto import caffe_pb2
from minicaffe.proto_io import ProtoFileError, read_net_param, write_binary
from tests.wire_format import field

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
    return field(number, 2, payload)


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


FORK_PARAMS = ["annotated_data_param", "multibox_loss_param", "permute_param", "prior_box_param",
               "detection_output_param", "detection_evaluate_param", "norm_param",
               "video_data_param", "roi_pooling_param", "smooth_l1_loss_param", "bn_param",
               "interp_param", "upsample_param", "shuffle_channel_param", "reorg_param"]


def _fill_every_field(message, depth=0):
    """Set every field of `message` (recursively) to a non-default value."""
    fd = message.DESCRIPTOR.fields[0].__class__
    for field in message.DESCRIPTOR.fields:
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == fd.LABEL_REPEATED
        if field.type == fd.TYPE_MESSAGE:
            if depth < 3:
                sub = getattr(message, field.name).add() if repeated else getattr(message, field.name)
                _fill_every_field(sub, depth + 1)
            continue
        if field.type == fd.TYPE_ENUM:
            value = field.enum_type.values[-1].number
        elif field.type == fd.TYPE_BOOL:
            value = not field.default_value
        elif field.type == fd.TYPE_STRING:
            value = f"{field.name}-value"
        elif field.type in (fd.TYPE_FLOAT, fd.TYPE_DOUBLE):
            value = 0.375 + field.number
        else:
            value = 3 + field.number
        if repeated:
            getattr(message, field.name).extend([value, value])
        else:
            setattr(message, field.name, value)


def test_caffemodel_with_fork_params_keeps_every_field(tmp_path):
    net = caffe_pb2.NetParameter(name="forks")
    layer_types = {"interp_param": "Interp", "upsample_param": "Upsample", "bn_param": "BN"}
    for name in FORK_PARAMS:
        layer = net.layer.add(name=name, type=layer_types.get(name, name))
        _fill_every_field(getattr(layer, name))
        layer.blobs.add().data.extend([1.5, -2.0])
    _fill_every_field(net.layer.add(name="pool", type="Pooling").pooling_param)
    _fill_every_field(net.layer.add(name="data", type="Data").transform_param)
    first = tmp_path / "a.caffemodel"
    first.write_bytes(net.SerializeToString())
    loaded = read_net_param(first)
    assert loaded == net
    again = tmp_path / "b.caffemodel"
    write_binary(loaded, again)
    assert again.read_bytes() == first.read_bytes()


def test_unknown_fork_field_names_field_place_and_fork(tmp_path):
    path = tmp_path / "rfcn.prototxt"
    path.write_text('name: "rfcn"\nlayer {\n  name: "psroi"\n  type: "PSROIPooling"\n'
                    '  psroi_pooling_param { output_dim: 21 group_size: 7 }\n}\n')
    with pytest.raises(ProtoFileError) as err:
        read_net_param(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:5:3: ")
    assert '"psroi_pooling_param"' in message and "R-FCN" in message and "--proto" in message


def test_unknown_plain_field_gets_no_fork_guess(tmp_path):
    path = tmp_path / "typo.prototxt"
    path.write_text('layer {\n  name: "c"\n  type: "Convolution"\n  convolution_parm { }\n}\n')
    with pytest.raises(ProtoFileError, match=r'typo\.prototxt:4:3: .*"convolution_parm"\.$'):
        read_net_param(path)


def test_unknown_fork_layer_type_names_the_fork():
    from minicaffe import LayerError, create_layer
    with pytest.raises(LayerError, match=r"unknown layer type 'PSROIPooling'\. It is a layer of the "
                                         r"Caffe fork R-FCN"):
        create_layer(caffe_pb2.LayerParameter(name="ps", type="PSROIPooling"))
