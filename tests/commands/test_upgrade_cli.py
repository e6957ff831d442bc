import numpy as np
from google.protobuf import text_format

import minicaffe as caffe
from minicaffe.cli import main
from minicaffe.proto import caffe_pb2

V1_NET = """name: "old"
input: "data"
input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 3
layers { name: "ip" type: INNER_PRODUCT bottom: "data" top: "ip" blobs_lr: 1 blobs_lr: 2
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" } } }
layers { name: "prob" type: SOFTMAX bottom: "ip" top: "prob" }
"""


def test_upgrade_net_text(tmp_path, capsys):
    old, new = tmp_path / "old.prototxt", tmp_path / "new.prototxt"
    old.write_text(V1_NET)
    assert main(["upgrade-net", str(old), str(new)]) == 0
    param = text_format.Parse(new.read_text(), caffe_pb2.NetParameter())
    assert not len(param.layers) and [l.type for l in param.layer] == ["Input", "InnerProduct", "Softmax"]
    assert [p.lr_mult for p in param.layer[1].param] == [1, 2]
    assert "wrote" in capsys.readouterr().out


def test_upgrade_net_binary_keeps_weights(tmp_path):
    old = tmp_path / "old.prototxt"
    old.write_text(V1_NET)
    net = caffe.Net(str(old), caffe.TEST)
    v1 = caffe_pb2.NetParameter()
    text_format.Parse(V1_NET, v1)
    for layer in v1.layers:
        if layer.name == "ip":
            for blob in net.params["ip"]:
                blob.to_proto(proto=layer.blobs.add())
    (tmp_path / "old.caffemodel").write_bytes(v1.SerializeToString())
    assert main(["upgrade-net", str(tmp_path / "old.caffemodel"), str(tmp_path / "new.caffemodel")]) == 0
    upgraded = caffe_pb2.NetParameter.FromString((tmp_path / "new.caffemodel").read_bytes())
    ip = [l for l in upgraded.layer if l.name == "ip"][0]
    np.testing.assert_array_equal(np.array(ip.blobs[0].data), net.params["ip"][0].data.ravel())


def test_upgrade_solver_and_refuse_overwrite(tmp_path, capsys):
    old, new = tmp_path / "s.prototxt", tmp_path / "s2.prototxt"
    old.write_text("base_lr: 0.1\nsolver_type: ADAM\n")
    assert main(["upgrade-solver", str(old), str(new)]) == 0
    assert text_format.Parse(new.read_text(), caffe_pb2.SolverParameter()).type == "Adam"
    assert main(["upgrade-solver", str(old), str(old)]) == 1
    assert "not over it" in capsys.readouterr().err
