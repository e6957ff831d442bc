"""caffe.coord_map: coordinate maps through conv/pool/deconv/crop, and the Crop it builds."""
import numpy as np
import pytest
from google.protobuf import text_format

import minicaffe as caffe
from minicaffe import layers as L, params as P
from minicaffe.coord_map import coord_map_from_to, crop
from minicaffe.proto import caffe_pb2


def fcn_like(ks=4, stride=2, pad=0):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 20, 20]))
    n.conv = L.Convolution(n.data, num_output=2, kernel_size=3, pad=5)
    n.relu = L.ReLU(n.conv, in_place=True)
    n.pool = L.Pooling(n.relu, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.up = L.Deconvolution(n.pool, convolution_param=dict(num_output=2, kernel_size=ks,
                                                          stride=stride, pad=pad))
    return n


def test_maps_compose_through_the_graph():
    n = fcn_like()
    # conv with pad 5, kernel 3 moves every coordinate by 4; pool with stride 2 halves them
    ax, a, b = coord_map_from_to(n.conv, n.data)
    assert ax == 1 and a == 1 and b == -4
    ax, a, b = coord_map_from_to(n.up, n.data)
    assert ax == 1 and np.all(a == 1)
    ax, a, b = coord_map_from_to(n.pool, n.data)
    assert np.all(a == 2)


def test_crop_aligns_and_runs_in_a_net():
    n = fcn_like()
    n.crop = crop(n.up, n.data)
    param = n.to_proto()
    crop_layer = [l for l in param.layer if l.type == "Crop"][0]
    assert crop_layer.crop_param.axis == 2
    net = caffe.Net(param, caffe.TEST)
    offset = crop_layer.crop_param.offset[0]
    # the cropped deconvolution output lines up with the data pixel for pixel
    assert net.blobs["crop"].shape[2:] == net.blobs["data"].shape[2:]
    assert offset == -coord_map_from_to(n.up, n.data)[2][0]


def test_crop_refuses_scale_mismatch_and_unconnected_tops():
    n = fcn_like(ks=2, stride=1)
    with pytest.raises(AssertionError, match="scale mismatch"):
        crop(n.pool, n.data)
    m = caffe.NetSpec()
    m.a = L.Input(shape=dict(dim=[1, 1, 4, 4]))
    m.b = L.Input(shape=dict(dim=[1, 1, 4, 4]))
    with pytest.raises(RuntimeError, match="Could not compute map"):
        coord_map_from_to(m.a, m.b)


def test_draw_module_pydot_graph_and_image(tmp_path):
    pytest.importorskip("pydot", reason="caffe.draw needs pydot (the draw extra)")
    from minicaffe import draw
    param = fcn_like().to_proto()
    graph = draw.get_pydot_graph(param, "TB")
    names = {n.get_label().strip('"').split("\\n")[0] for n in graph.get_nodes() if n.get_label()}
    assert {"conv", "pool", "up", "data"} <= names
    draw.draw_net_to_file(param, str(tmp_path / "net.raw"))
    assert (tmp_path / "net.raw").read_text().startswith("digraph")
    import shutil
    if shutil.which("dot"):
        png = draw.draw_net(param, "LR", ext="png")
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
