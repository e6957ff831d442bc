"""RNN and LSTM export as an ONNX Scan that applies cont_t like Caffe (restarts anywhere)."""
import numpy as np
import pytest

pytest.importorskip("onnx", reason="the ONNX export needs the onnx package (minicaffe[onnx])")
pytest.importorskip("onnxruntime", reason="the ONNX check needs onnxruntime (minicaffe[onnx])")

from .helpers import export_and_check, net_from_text, randomize  # noqa: E402

T, N, D = 5, 2, 4
RESTARTS = np.array([[0, 0], [1, 1], [1, 0], [1, 1], [0, 1]], np.float32)


def _net(type_, expose_hidden, static):
    text = (f'layer {{ name: "x" type: "Input" top: "x" input_param {{ shape {{ dim: {T} dim: {N} dim: 3 dim: 2 }} }} }}\n'
            f'layer {{ name: "cont" type: "Input" top: "cont" input_param {{ shape {{ dim: {T} dim: {N} }} }} }}\n')
    bottoms, tops = ["x", "cont"], ["y"]
    if static:
        text += f'layer {{ name: "xs" type: "Input" top: "xs" input_param {{ shape {{ dim: {N} dim: 3 }} }} }}\n'
        bottoms.append("xs")
    if expose_hidden:
        for k in range(2 if type_ == "LSTM" else 1):
            text += (f'layer {{ name: "s{k}" type: "Input" top: "s{k}" '
                     f'input_param {{ shape {{ dim: 1 dim: {N} dim: {D} }} }} }}\n')
            bottoms.append(f"s{k}")
            tops.append(f"final{k}")
    b = " ".join(f'bottom: "{x}"' for x in bottoms)
    t = " ".join(f'top: "{x}"' for x in tops)
    text += (f'layer {{ name: "r" type: "{type_}" {b} {t} recurrent_param {{ num_output: {D} '
             f'expose_hidden: {str(expose_hidden).lower()} }} }}\n')
    return randomize(net_from_text(text))


@pytest.mark.parametrize("type_", ["LSTM", "RNN"])
@pytest.mark.parametrize("expose_hidden,static,cont", [(False, False, "restarts"), (True, False, "ones"),
                                                      (True, True, "restarts"), (False, True, "ones")])
def test_recurrent(type_, expose_hidden, static, cont, tmp_path):
    net = _net(type_, expose_hidden, static)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(net.blobs[n].shape).astype(np.float32) for n in net.inputs}
    feeds["cont"] = RESTARTS if cont == "restarts" else np.ones((T, N), np.float32)
    result = export_and_check(net, tmp_path, inputs=feeds)
    assert result.ok and len(result.errors) == (1 + (2 if type_ == "LSTM" else 1) * expose_hidden)


def test_lstm_dynamic_batch(tmp_path):
    net = _net("LSTM", False, False)
    feeds = {"x": np.random.default_rng(1).standard_normal((T, N, 3, 2)).astype(np.float32),
             "cont": RESTARTS}
    assert export_and_check(net, tmp_path, inputs=feeds, batch="dynamic").ok


def test_lstm_batch_is_the_stream_axis(tmp_path):
    import onnx
    net = _net("LSTM", False, False)
    assert export_and_check(net, tmp_path, batch=3).ok
    dims = [d.dim_value for d in onnx.load(str(tmp_path / "model.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [T, 3, 3, 2]
