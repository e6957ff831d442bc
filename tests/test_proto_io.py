import pathlib

import pytest

from minicaffe.proto import caffe_pb2
from minicaffe.proto_io import (ProtoFileError, atomic_write, read_net_param, read_solver_param)

# BVLC example prototxts, read from the shared tree rather than copied into this project
BVLC = pathlib.Path(__file__).resolve().parents[2] / "shared" / "models" / "bvlc"
NETS = sorted(p for p in BVLC.glob("*.prototxt") if "solver" not in p.name)
SOLVERS = sorted(BVLC.glob("*solver*.prototxt"))


@pytest.mark.parametrize("path", NETS, ids=lambda p: p.name)
def test_bvlc_nets_parse(path):
    param = read_net_param(path)
    assert len(param.layer) > 0 and not len(param.layers)


@pytest.mark.parametrize("path", SOLVERS, ids=lambda p: p.name)
def test_bvlc_solvers_parse(path):
    param = read_solver_param(path)
    assert param.base_lr > 0


def test_syntax_error_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.prototxt"
    bad.write_text('name: "x"\nlayer {\n  name: "a"\n  typo: "Input"\n}\n')
    with pytest.raises(ProtoFileError) as info:
        read_net_param(bad)
    msg = str(info.value)
    assert msg.startswith(f"{bad}:4:3") and "typo" in msg and "\n" not in msg


def test_missing_file_is_one_line():
    with pytest.raises(ProtoFileError, match="no such file"):
        read_net_param("/nonexistent/net.prototxt")


def test_yaml_net_and_solver(tmp_path):
    net = tmp_path / "net.yaml"
    net.write_text("name: tiny\nlayer:\n  - name: data\n    type: Input\n    top: [data]\n"
                   "    input_param: {shape: [{dim: [2, 3]}]}\n")
    param = read_net_param(net)
    assert param.layer[0].input_param.shape[0].dim == [2, 3]
    solver = tmp_path / "s.yml"
    solver.write_text("net: net.yaml\nbase_lr: 0.1\nlr_policy: fixed\ntype: Adam\n")
    assert read_solver_param(solver).type == "Adam"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ProtoFileError, match=r"bad.yaml:\d+:\d+"):
        read_net_param(bad)


def test_v1_layers_are_upgraded(tmp_path):
    v1 = tmp_path / "v1.prototxt"
    v1.write_text('''name: "old"
layers { name: "data" type: DATA top: "data" top: "label"
  data_param { source: "db" batch_size: 4 scale: 0.5 mirror: true } }
layers { name: "ip" type: INNER_PRODUCT bottom: "data" top: "ip"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0 param: "w"
  inner_product_param { num_output: 3 } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "ip" bottom: "label" }
''')
    p = read_net_param(v1)
    assert [l.type for l in p.layer] == ["Data", "InnerProduct", "SoftmaxWithLoss"]
    assert p.layer[0].transform_param.scale == 0.5 and p.layer[0].transform_param.mirror
    assert not p.layer[0].data_param.HasField("scale")
    ip = p.layer[1]
    assert [s.lr_mult for s in ip.param] == [1, 2] and [s.decay_mult for s in ip.param] == [1, 0]
    assert ip.param[0].name == "w" and ip.inner_product_param.num_output == 3


def test_deprecated_inputs_become_input_layer(tmp_path):
    f = tmp_path / "deploy.prototxt"
    f.write_text('input: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 8\ninput_dim: 8\n'
                 'layer { name: "relu" type: "Softmax" bottom: "data" top: "out" }\n')
    p = read_net_param(f)
    assert p.layer[0].type == "Input" and list(p.layer[0].top) == ["data"]
    assert list(p.layer[0].input_param.shape[0].dim) == [1, 3, 8, 8] and not len(p.input)


def test_solver_type_enum_upgrade(tmp_path):
    f = tmp_path / "s.prototxt"
    f.write_text("base_lr: 0.01\nsolver_type: NESTEROV\n")
    p = read_solver_param(f)
    assert p.type == "Nesterov" and not p.HasField("solver_type")


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    atomic_write(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_binary_netparameter_reads(tmp_path):
    p = caffe_pb2.NetParameter(name="bin")
    p.layer.add(name="d", type="Input", top=["x"])
    f = tmp_path / "m.caffemodel"
    f.write_bytes(p.SerializeToString())
    assert read_net_param(f).name == "bin"
