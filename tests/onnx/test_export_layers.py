"""Every exportable layer type, in several configurations: onnxruntime equals minicaffe to 1e-4."""
import pytest

pytest.importorskip("onnx", reason="the ONNX export needs the onnx package (minicaffe[onnx])")
pytest.importorskip("onnxruntime", reason="the ONNX check needs onnxruntime (minicaffe[onnx])")

from minicaffe.onnx import OnnxError  # noqa: E402

from .helpers import export_and_check, net_from_text, randomize  # noqa: E402


def _input(shape, name="data"):
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {dims} }} }} }}\n'


def _layer(type_, params="", bottoms=("data",), tops=("out",), name="L"):
    b = " ".join(f'bottom: "{x}"' for x in bottoms)
    t = " ".join(f'top: "{x}"' for x in tops)
    return f'layer {{ name: "{name}" type: "{type_}" {b} {t} {params} }}\n'


def _check(text, tmp_path, **kw):
    net = randomize(net_from_text(text))
    result = export_and_check(net, tmp_path, **kw)
    assert result.ok and result.worst <= 1e-4
    return result


CASES = {
    # Convolution: groups, dilation, stride, rectangular, no bias, N-d
    "conv_basic": (_input([2, 3, 9, 8]), "Convolution", "convolution_param { num_output: 4 kernel_size: 3 }"),
    "conv_pad_stride": (_input([2, 4, 11, 10]), "Convolution",
                        "convolution_param { num_output: 6 kernel_size: 3 pad: 2 stride: 2 }"),
    "conv_group_dilation": (_input([1, 4, 12, 12]), "Convolution",
                            "convolution_param { num_output: 6 kernel_size: 3 group: 2 dilation: 2 pad: 1 }"),
    "conv_rect_nobias": (_input([1, 3, 10, 9]), "Convolution",
                         "convolution_param { num_output: 2 kernel_h: 3 kernel_w: 2 stride_h: 2 "
                         "stride_w: 1 pad_h: 1 pad_w: 0 bias_term: false }"),
    "conv_3d": (_input([1, 2, 5, 6, 7]), "Convolution",
                "convolution_param { num_output: 3 kernel_size: 3 kernel_size: 2 kernel_size: 3 pad: 1 stride: 2 }"),
    "deconv_basic": (_input([2, 3, 5, 4]), "Deconvolution",
                     "convolution_param { num_output: 4 kernel_size: 4 stride: 2 pad: 1 }"),
    "deconv_group_dilation": (_input([1, 4, 5, 5]), "Deconvolution",
                              "convolution_param { num_output: 2 kernel_size: 3 group: 2 dilation: 2 stride: 3 }"),
    "deconv_3d": (_input([1, 2, 3, 4, 3]), "Deconvolution",
                  "convolution_param { num_output: 2 kernel_size: 2 stride: 2 }"),
    # Pooling: ceil rounding, padding, the last window past the padded edge, global
    "max_ceil": (_input([2, 3, 10, 9]), "Pooling", "pooling_param { pool: MAX kernel_size: 3 stride: 2 }"),
    "max_pad_ceil": (_input([1, 2, 7, 8]), "Pooling", "pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }"),
    "max_pad_drop_last": (_input([1, 2, 5, 5]), "Pooling",
                          "pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 }"),
    "max_floor": (_input([1, 2, 10, 9]), "Pooling",
                  "pooling_param { pool: MAX kernel_size: 3 stride: 2 round_mode: FLOOR }"),
    "ave_ceil": (_input([2, 3, 10, 9]), "Pooling", "pooling_param { pool: AVE kernel_size: 3 stride: 2 }"),
    "ave_pad": (_input([1, 2, 7, 7]), "Pooling", "pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }"),
    "ave_pad_past_edge": (_input([1, 2, 8, 9]), "Pooling",
                          "pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }"),
    "ave_pad_drop_last": (_input([1, 2, 5, 5]), "Pooling",
                          "pooling_param { pool: AVE kernel_size: 2 stride: 2 pad: 1 }"),
    "ave_rect": (_input([1, 2, 9, 11]), "Pooling",
                 "pooling_param { pool: AVE kernel_h: 3 kernel_w: 2 stride_h: 3 stride_w: 2 pad_h: 1 pad_w: 1 }"),
    "ave_stride1_pad2": (_input([1, 2, 5, 6]), "Pooling",
                         "pooling_param { pool: AVE kernel_size: 5 stride: 1 pad: 2 }"),
    "max_stride_gt_kernel": (_input([1, 2, 8, 9]), "Pooling",
                             "pooling_param { pool: MAX kernel_size: 2 stride: 3 pad: 1 }"),
    "ave_stride_gt_kernel": (_input([1, 2, 8, 9]), "Pooling",
                             "pooling_param { pool: AVE kernel_size: 2 stride: 3 pad: 1 }"),
    "global_max": (_input([2, 3, 5, 4]), "Pooling", "pooling_param { pool: MAX global_pooling: true }"),
    "global_ave": (_input([2, 3, 5, 4]), "Pooling", "pooling_param { pool: AVE global_pooling: true }"),
    # InnerProduct: axis, transpose, no bias
    "ip_4d": (_input([2, 3, 4, 5]), "InnerProduct", "inner_product_param { num_output: 7 }"),
    "ip_2d": (_input([3, 6]), "InnerProduct", "inner_product_param { num_output: 4 }"),
    "ip_axis2": (_input([2, 3, 4, 5]), "InnerProduct", "inner_product_param { num_output: 6 axis: 2 }"),
    "ip_axis_neg": (_input([2, 3, 4, 5]), "InnerProduct", "inner_product_param { num_output: 3 axis: -1 }"),
    "ip_transpose": (_input([2, 3, 4]), "InnerProduct",
                     "inner_product_param { num_output: 5 transpose: true bias_term: false }"),
    "ip_axis0": (_input([2, 3]), "InnerProduct", "inner_product_param { num_output: 4 axis: 0 }"),
    # neurons
    "relu": (_input([2, 3, 4]), "ReLU", ""),
    "relu_leaky": (_input([2, 3, 4]), "ReLU", "relu_param { negative_slope: 0.1 }"),
    "sigmoid": (_input([2, 5]), "Sigmoid", ""),
    "tanh": (_input([2, 5]), "TanH", ""),
    "elu": (_input([2, 5, 3]), "ELU", "elu_param { alpha: 0.7 }"),
    "absval": (_input([2, 5]), "AbsVal", ""),
    "power": (_input([2, 5]), "Power", "power_param { power: 2 scale: 0.5 shift: 3 }"),
    "power_linear": (_input([2, 5]), "Power", "power_param { scale: -2 shift: 1 }"),
    "exp": (_input([2, 5]), "Exp", "exp_param { scale: 0.5 shift: 0.1 }"),
    "exp_base": (_input([2, 5]), "Exp", "exp_param { base: 2 scale: 0.5 }"),
    "bnll": (_input([2, 5]), "BNLL", ""),
    "threshold": (_input([2, 5, 3]), "Threshold", "threshold_param { threshold: 0.2 }"),
    "prelu": (_input([2, 3, 4, 4]), "PReLU", ""),
    "prelu_2d": (_input([4, 3]), "PReLU", ""),
    "prelu_shared": (_input([2, 3, 4]), "PReLU", "prelu_param { channel_shared: true }"),
    "clip": (_input([2, 5]), "Clip", "clip_param { min: -0.5 max: 0.7 }"),
    "swish": (_input([2, 5]), "Swish", "swish_param { beta: 1.5 }"),
    "dropout": (_input([2, 5]), "Dropout", "dropout_param { dropout_ratio: 0.3 }"),
    # normalization
    "batchnorm": (_input([2, 3, 4, 5]), "BatchNorm", "batch_norm_param { eps: 1e-3 }"),
    "batchnorm_2d": (_input([4, 3]), "BatchNorm", ""),
    "scale_bias": (_input([2, 3, 4, 5]), "Scale", "scale_param { bias_term: true }"),
    "scale_axis2": (_input([2, 3, 4, 5]), "Scale", "scale_param { axis: 2 num_axes: 2 }"),
    "bias": (_input([2, 3, 4]), "Bias", ""),
    "lrn_across": (_input([2, 7, 5, 5]), "LRN", "lrn_param { local_size: 5 alpha: 0.1 beta: 0.75 k: 2 }"),
    "lrn_within": (_input([2, 3, 6, 7]), "LRN",
                   "lrn_param { local_size: 3 alpha: 0.2 beta: 0.75 norm_region: WITHIN_CHANNEL }"),
    "mvn": (_input([2, 3, 4, 5]), "MVN", ""),
    "mvn_across_mean_only": (_input([2, 3, 4, 5]), "MVN",
                             "mvn_param { across_channels: true normalize_variance: false }"),
    "softmax": (_input([3, 6]), "Softmax", ""),
    "softmax_axis": (_input([2, 3, 4, 5]), "Softmax", "softmax_param { axis: 2 }"),
    "softmax_axis1_4d": (_input([2, 3, 4, 5]), "Softmax", ""),
    # shape
    "flatten": (_input([2, 3, 4, 5]), "Flatten", ""),
    "flatten_axes": (_input([2, 3, 4, 5]), "Flatten", "flatten_param { axis: 1 end_axis: 2 }"),
    "reshape": (_input([2, 3, 4, 5]), "Reshape", "reshape_param { shape { dim: 0 dim: -1 dim: 10 } }"),
    "reshape_axis": (_input([2, 6, 4]), "Reshape",
                     "reshape_param { axis: 1 num_axes: 1 shape { dim: 2 dim: 3 } }"),
    "tile": (_input([2, 3, 4]), "Tile", "tile_param { axis: 1 tiles: 3 }"),
    "reduction_sum": (_input([2, 3, 4]), "Reduction", "reduction_param { axis: 1 coeff: 2 }"),
    "reduction_asum": (_input([2, 3, 4]), "Reduction", "reduction_param { operation: ASUM axis: 2 }"),
    "reduction_sumsq": (_input([2, 3, 4]), "Reduction", "reduction_param { operation: SUMSQ axis: 1 }"),
    "reduction_mean": (_input([2, 3, 4]), "Reduction", "reduction_param { operation: MEAN axis: -1 coeff: 0.5 }"),
    "reduction_all": (_input([2, 3, 4]), "Reduction", "reduction_param { operation: MEAN }"),
    "argmax": (_input([3, 10]), "ArgMax", ""),
    "argmax_topk_val": (_input([3, 2, 5]), "ArgMax", "argmax_param { top_k: 3 out_max_val: true }"),
    "argmax_axis": (_input([2, 5, 3]), "ArgMax", "argmax_param { axis: 1 top_k: 2 }"),
    "argmax_axis_val": (_input([2, 5, 3]), "ArgMax", "argmax_param { axis: 1 out_max_val: true }"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_single_layer(case, tmp_path):
    head, type_, params = CASES[case]
    _check(head + _layer(type_, params), tmp_path)


def test_in_place_chain_keeps_output_name(tmp_path):
    text = (_input([2, 3, 6, 6]) +
            _layer("Convolution", "convolution_param { num_output: 4 kernel_size: 3 }", tops=["c"], name="c")
            + _layer("BatchNorm", "", ["c"], ["c"], "bn") + _layer("Scale", "scale_param { bias_term: true }",
                                                                 ["c"], ["c"], "sc")
            + _layer("ReLU", "", ["c"], ["c"], "r"))
    _check(text, tmp_path)


@pytest.mark.parametrize("points,axis,tops", [("slice_point: 1 slice_point: 4", 1, 3),
                                              ("", 2, 2), ("slice_point: 2", -1, 2),
                                              ("slice_point: 1", 0, 2)])
def test_slice_points(points, axis, tops, tmp_path):
    names = [f"s{i}" for i in range(tops)]
    _check(_input([2, 6, 4, 5]) + _layer("Slice", f"slice_param {{ axis: {axis} {points} }}",
                                         tops=names), tmp_path)


@pytest.mark.parametrize("params,ref", [("crop_param { axis: 2 offset: 1 offset: 2 }", [1, 1, 4, 3]),
                                        ("crop_param { axis: 1 offset: 1 }", [1, 2, 4, 3]),
                                        ("crop_param { axis: 2 }", [1, 1, 5, 5]),
                                        ("crop_param { axis: 3 offset: 3 }", [1, 1, 1, 2])])
def test_crop_offsets(params, ref, tmp_path):
    text = _input([2, 3, 7, 6]) + _input(ref, "ref") + _layer("Crop", params, ["data", "ref"])
    _check(text, tmp_path)


@pytest.mark.parametrize("params", ["", "eltwise_param { operation: SUM coeff: 0.5 coeff: -2 coeff: 1 }",
                                    "eltwise_param { operation: PROD }", "eltwise_param { operation: MAX }"])
def test_eltwise(params, tmp_path):
    text = _input([2, 3, 4], "a") + _input([2, 3, 4], "b") + _input([2, 3, 4], "c")
    _check(text + _layer("Eltwise", params, ["a", "b", "c"]), tmp_path)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concat(axis, tmp_path):
    text = _input([2, 3, 4], "a") + _input([2, 3, 4], "b")
    _check(text + _layer("Concat", f"concat_param {{ axis: {axis} }}", ["a", "b"]), tmp_path)


def test_split_and_silence(tmp_path):
    text = (_input([2, 3]) + _input([2, 2], "unused")
            + _layer("Split", "", tops=["x1", "x2"], name="split")
            + _layer("Silence", "", ["unused"], [], name="silence")
            + _layer("Eltwise", "", ["x1", "x2"], ["out"], name="sum"))
    _check(text, tmp_path)


def test_scale_and_bias_from_second_bottom(tmp_path):
    text = (_input([2, 3, 4, 5]) + _input([3, 4], "s")
            + _layer("Scale", "scale_param { axis: 1 }", ["data", "s"], ["y"], "scale")
            + _layer("Bias", "bias_param { axis: 1 }", ["y", "s"], ["out"], "bias"))
    _check(text, tmp_path)


def test_embed(tmp_path):
    import numpy as np
    text = _input([4, 3]) + _layer("Embed", "embed_param { num_output: 5 input_dim: 10 }")
    net = randomize(net_from_text(text))
    ids = np.random.default_rng(1).integers(0, 10, (4, 3)).astype(np.float32)
    result = export_and_check(net, tmp_path, inputs={"data": ids})
    assert result.worst <= 1e-4


@pytest.mark.parametrize("opset", [13, 17, 21])
def test_opsets(opset, tmp_path):
    text = (_input([2, 3, 4, 5]) + _layer("Reduction", "reduction_param { operation: MEAN axis: 2 }",
                                          tops=["r"], name="r")
            + _layer("MVN", "", tops=["m"], name="m")
            + _layer("Softmax", "softmax_param { axis: 2 }", tops=["s"], name="s"))
    _check(text, tmp_path, opset=opset)


def test_dynamic_batch_runs_other_batch_sizes(tmp_path):
    import numpy as np
    import onnxruntime as ort
    text = (_input([2, 3, 8, 8]) + _layer("Convolution", "convolution_param { num_output: 4 kernel_size: 3 }",
                                          tops=["c"], name="c")
            + _layer("Pooling", "pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }", ["c"], ["p"], "p")
            + _layer("InnerProduct", "inner_product_param { num_output: 5 }", ["p"], ["out"], "ip"))
    net = randomize(net_from_text(text))
    _check_net = export_and_check(net, tmp_path, batch="dynamic")
    assert _check_net.ok
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)
    net.blobs["data"].reshape(x.shape)
    net.reshape()
    net.blobs["data"].data[...] = x
    net.forward()
    got = session.run(None, {"data": x})[0]
    np.testing.assert_allclose(got, net.blobs["out"].data, rtol=1e-4, atol=1e-5)


def test_fixed_batch(tmp_path):
    import onnx
    text = _input([2, 3]) + _layer("InnerProduct", "inner_product_param { num_output: 2 }")
    net = randomize(net_from_text(text))
    export_and_check(net, tmp_path, batch=4)
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4


@pytest.mark.parametrize("text,match", [
    (_input([2, 3]) + _input([2], "label") + _layer("Accuracy", "", ["data", "label"]),
     r"^layer 'L' \(Accuracy\): cannot export to ONNX: loss and accuracy layers"),
    (_input([2, 3, 4, 4]) + _layer("Im2col", "convolution_param { kernel_size: 1 }"),
     r"^layer 'L' \(Im2col\): cannot export to ONNX: no ONNX converter"),
    ('layer { name: "d" type: "DummyData" top: "data" dummy_data_param { shape { dim: 2 dim: 3 } } }\n'
     + _layer("ReLU", ""), r"^layer 'd' \(DummyData\): cannot export to ONNX: a data layer"),
    (_input([2, 3, 4, 4]) + _layer("Pooling", "pooling_param { pool: STOCHASTIC kernel_size: 2 }"),
     "STOCHASTIC"),
])
def test_unexportable_layer_is_named(text, match, tmp_path):
    from minicaffe import onnx as mo
    net = net_from_text(text)
    with pytest.raises(OnnxError, match=match):
        mo.export(net, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
