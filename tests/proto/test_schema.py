import ast
import pathlib
import re

import pytest

from minicaffe.proto import caffe_pb2

PROTO = pathlib.Path(caffe_pb2.__file__).with_name("caffe.proto")


def test_generated_module_matches_schema(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc")
    rc = protoc.main(["protoc", f"-I{PROTO.parent}", f"--python_out={tmp_path}", str(PROTO)])
    assert rc == 0
    fresh = _serialized_descriptor(tmp_path / "caffe_pb2.py")
    assert fresh == _serialized_descriptor(pathlib.Path(caffe_pb2.__file__)), \
        "minicaffe/proto/caffe_pb2.py is stale: run python tools/gen_proto.py"


def _serialized_descriptor(module_path):
    # The schema as protoc serialized it; version headers around it may differ.
    text = module_path.read_text()
    return ast.literal_eval(re.search(r"AddSerializedFile\((b'.*?')\)", text).group(1))


def test_field_numbers_and_defaults_match_caffe():
    lp = caffe_pb2.LayerParameter
    assert lp.DESCRIPTOR.fields_by_name["convolution_param"].number == 106
    assert lp.DESCRIPTOR.fields_by_name["clip_param"].number == 148
    assert lp.DESCRIPTOR.fields_by_name["swish_param"].number == 147
    sp = caffe_pb2.SolverParameter()
    assert sp.momentum2 == pytest.approx(0.999) and sp.delta == pytest.approx(1e-8)
    assert sp.regularization_type == "L2" and sp.type == "SGD" and sp.random_seed == -1
    assert caffe_pb2.ConvolutionParameter().bias_term is True
    assert caffe_pb2.PoolingParameter().pool == caffe_pb2.PoolingParameter.MAX
    assert caffe_pb2.LRNParameter().k == 1.0 and caffe_pb2.LRNParameter().local_size == 5
    assert caffe_pb2.BlobProto.DESCRIPTOR.fields_by_name["double_data"].number == 8
