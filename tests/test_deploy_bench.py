"""benchmarks/deploy_bench.py: its ResNet builder writes ResNet-50's deploy net layer for layer,
and its ResNet-152 has the shapes and layer counts of MSRA's."""
import collections
import pathlib
import sys

import pytest

from tests.benchmark_module import load_benchmark

import minicaffe
from minicaffe.proto_io import read_net_param

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESNET50 = ROOT.parent / "shared" / "models" / "bench" / "resnet50_deploy.prototxt"


def load_bench():
    return load_benchmark("deploy_bench")


@pytest.mark.skipif(not RESNET50.exists(), reason=f"{RESNET50} not found")
def test_builder_with_resnet50_blocks_is_the_resnet50_deploy_prototxt():
    bench = load_bench()
    assert bench.resnet_deploy((3, 4, 6, 3), "ResNet-50") == read_net_param(str(RESNET50))


def test_resnet152_shapes_and_layer_counts(tmp_path):
    bench = load_bench()
    path, batch = bench.write_built_net("resnet152", tmp_path)
    assert batch == 10
    param = read_net_param(str(path))
    kinds = collections.Counter(layer.type for layer in param.layer)
    # 152 = conv1 + 3 convolutions in each of 3 + 8 + 36 + 3 blocks + fc1000; 4 projections more
    assert kinds["Convolution"] == 1 + 3 * 50 + 4 and kinds["InnerProduct"] == 1
    assert kinds["BatchNorm"] == kinds["Scale"] == kinds["Convolution"]
    assert kinds["Eltwise"] == 50 and kinds["ReLU"] == 1 + 3 * 50
    names = [layer.name for layer in param.layer]
    assert len(set(names)) == len(names)
    assert "res3b7" in names and "res4b35" in names and "res4b36" not in names and "res5c" in names
    small = bench.resnet_deploy((3, 8, 36, 3), "ResNet-152", batch=1)
    net = minicaffe.Net(small, minicaffe.TEST)
    shapes = {name: net.blobs[name].shape for name in ("res2c", "res3b7", "res4b35", "res5c", "prob")}
    assert shapes == {"res2c": (1, 256, 56, 56), "res3b7": (1, 512, 28, 28), "res4b35": (1, 1024, 14, 14),
                      "res5c": (1, 2048, 7, 7), "prob": (1, 1000)}
    weights = sum(blobs[0].count() for name, blobs in net.params.items()
                  if net.layer_dict[name].type in ("Convolution", "InnerProduct"))
    assert 60.0e6 < weights < 60.5e6            # ResNet-152: 60.2M parameters


def test_unknown_net_lists_the_built_ones(monkeypatch, capsys):
    bench = load_bench()
    monkeypatch.setattr(sys, "argv", ["deploy_bench.py", "--nets", "resnet151"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "resnet152" in capsys.readouterr().err
    with pytest.raises(ValueError, match="4 positive stage lengths"):
        bench.resnet_deploy((3, 4, 6), "short")
