"""Inference nets fold in-place BatchNorm / Scale / Bias into the Convolution or InnerProduct before."""
import numpy as np
import pytest

import minicaffe
from minicaffe.layers.conv import ConvolutionLayer

INPUT = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 7 dim: 7 } } }\n'


def conv(name, bottom, extra=""):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
            f'convolution_param {{ num_output: 6 kernel_size: 3 pad: 1 {extra} }} }}\n')


def inplace(name, kind, blob, extra=""):
    return f'layer {{ name: "{name}" type: "{kind}" bottom: "{blob}" top: "{blob}" {extra} }}\n'


def _nets(tmp_path, text, **kwargs):
    model = tmp_path / "net.prototxt"
    model.write_text(text)
    plain = minicaffe.Net(str(model), minicaffe.TEST)
    rng = np.random.default_rng(0)
    for name, blobs in plain.params.items():
        for j, blob in enumerate(blobs):
            if plain.layer_dict[name].type == "BatchNorm":   # sums of mean, variance; normalizer
                blob.data[...] = (rng.normal(0, 1, blob.shape), rng.uniform(0.5, 2, blob.shape), 2.0)[j]
            else:
                blob.data[...] = rng.normal(0.3, 0.5, blob.shape)
    weights = tmp_path / "w.caffemodel"
    plain.save(str(weights))
    lean = minicaffe.Net(str(model), minicaffe.TEST, weights=str(weights), inference=True, **kwargs)
    x = rng.standard_normal(plain.blobs["data"].shape).astype(np.float32)
    return plain, lean, x


def _check(plain, lean, x, folded_away):
    expected = {k: v.copy() for k, v in plain.forward(data=x).items()}
    got = lean.forward(data=x)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5 * np.abs(value).max())
    run = {layer.name for _, layer, _, _ in lean.forward_plan()}
    assert {name for name in lean.layer_names if name not in run} == set(folded_away)


BN = 'batch_norm_param { eps: 0.001 }'
SCALE_BIAS = 'scale_param { bias_term: true }'


@pytest.mark.parametrize("conv_extra", ["", "bias_term: false", "group: 2", "stride: 2 dilation: 2"])
def test_conv_batchnorm_scale_relu(tmp_path, conv_extra):
    text = (INPUT + conv("c", "data", conv_extra) + inplace("bn", "BatchNorm", "c", BN)
            + inplace("sc", "Scale", "c", SCALE_BIAS) + inplace("relu", "ReLU", "c"))
    _check(*_nets(tmp_path, text), folded_away={"bn", "sc", "relu"})


# Every forward path of the products: im2col + GEMM, 1x1, Winograd (3x3 stride 1 at TEST),
# depthwise (group = channels), several images, and InnerProduct.
RELU_PRODUCTS = {
    "gemm": conv("c", "data", "stride: 2"),
    "1x1": conv("c", "data", "kernel_size: 1 pad: 0").replace("kernel_size: 3 pad: 1 ", ""),
    "winograd": conv("c", "data"),
    "depthwise": conv("c", "data", "group: 4").replace("num_output: 6", "num_output: 4"),
    "inner_product": 'layer { name: "c" type: "InnerProduct" bottom: "data" top: "c" '
                     'inner_product_param { num_output: 5 } }\n',
}


@pytest.mark.parametrize("slope", [0.0, 0.1, -0.5])
@pytest.mark.parametrize("product", list(RELU_PRODUCTS))
def test_relu_fuses_into_the_product(tmp_path, monkeypatch, product, slope):
    if product == "winograd":   # these small layers would not pick Winograd by themselves
        monkeypatch.setattr(ConvolutionLayer, "winograd", 2)
    text = INPUT + RELU_PRODUCTS[product] + inplace("relu", "ReLU", "c", f"relu_param {{ negative_slope: {slope} }}")
    plain, lean, x = _nets(tmp_path, text)
    _check(plain, lean, x, folded_away={"relu"})
    fused = [layer for _, layer, _, _ in lean.forward_plan() if layer.name == "c"]
    assert fused[0].fused_relu_slope == np.float32(slope) and lean.layer_dict["c"].fused_relu_slope is None


def test_relu_fuses_after_a_folded_chain_only_when_in_place(tmp_path):
    text = (INPUT + conv("c", "data") + inplace("sc", "Scale", "c", SCALE_BIAS)
            + 'layer { name: "relu" type: "ReLU" bottom: "c" top: "r" }\n')
    _check(*_nets(tmp_path, text), folded_away={"sc"})
    # a ReLU that is not next to the product stays a layer of its own
    text = (INPUT + conv("c", "data") + 'layer { name: "p" type: "Pooling" bottom: "c" top: "p" '
            'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n' + inplace("relu", "ReLU", "p"))
    _check(*_nets(tmp_path, text), folded_away=set())


def test_inner_product_chains_and_bias_layer(tmp_path):
    text = (INPUT + 'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
            'inner_product_param { num_output: 5 } }\n'
            + inplace("bn", "BatchNorm", "ip") + inplace("b", "Bias", "ip")
            + 'layer { name: "ipt" type: "InnerProduct" bottom: "ip" top: "ipt" '
              'inner_product_param { num_output: 3 transpose: true bias_term: false } }\n'
            + inplace("sc", "Scale", "ipt"))
    _check(*_nets(tmp_path, text), folded_away={"bn", "b", "sc"})


def test_layers_that_must_not_fold(tmp_path):
    text = (INPUT + conv("c", "data")
            # batch statistics at TEST: not a fixed affine map
            + inplace("bn", "BatchNorm", "c", "batch_norm_param { use_global_stats: false }")
            + conv("d", "c")
            # not in place: the raw output "d" stays a readable blob
            + 'layer { name: "bn2" type: "BatchNorm" bottom: "d" top: "d2" }\n'
            + conv("e", "d2")
            # a Scale over two axes is not per channel
            + inplace("sc", "Scale", "e", "scale_param { num_axes: 2 }"))
    _check(*_nets(tmp_path, text), folded_away=set())


def test_kept_blob_holds_the_chain_result(tmp_path):
    text = INPUT + conv("c", "data") + inplace("bn", "BatchNorm", "c") + conv("d", "c")
    plain, lean, x = _nets(tmp_path, text, keep_blobs=["c"])
    _check(plain, lean, x, folded_away={"bn"})
    np.testing.assert_allclose(lean.blobs["c"].data, plain.blobs["c"].data, rtol=1e-5, atol=1e-5)


def test_copy_from_and_hand_edits_refold(tmp_path):
    text = INPUT + conv("c", "data") + inplace("bn", "BatchNorm", "c", BN) + inplace("sc", "Scale", "c")
    plain, lean, x = _nets(tmp_path, text)
    lean.params["sc"][0].data[...] = 0.0     # a hand edit is seen after fold_params()
    lean.fold_params()
    np.testing.assert_array_equal(lean.forward(data=x)["c"], 0.0)
    lean.copy_from(str(tmp_path / "w.caffemodel"))   # loading weights refolds by itself
    _check(plain, lean, x, folded_away={"bn", "sc"})
    with pytest.raises(RuntimeError, match="inference=True"):
        plain.fold_params()


def test_frozen_winograd_weights_follow_fold_params_and_partial_forwards(tmp_path, monkeypatch):
    monkeypatch.setattr(ConvolutionLayer, "winograd", 2)
    text = INPUT + conv("c", "data") + inplace("sc", "Scale", "c") + conv("d", "c")
    plain, lean, x = _nets(tmp_path, text, keep_blobs=["c"])
    _check(plain, lean, x, folded_away={"sc"})
    assert lean.layer_dict["d"].frozen_weights and not plain.layer_dict["d"].frozen_weights
    # a hand edit reaches the frozen Winograd weights through fold_params()
    for net in (plain, lean):
        net.params["d"][0].data[...] *= -2
    lean.fold_params()
    _check(plain, lean, x, folded_away={"sc"})
    # a partial forward runs the unfolded layers, whose Winograd weights are their own
    lean.blobs["data"].data[...] = x
    lean.forward(end="sc")
    plain.blobs["data"].data[...] = x
    plain.forward(end="sc")
    np.testing.assert_allclose(lean.blobs["c"].data, plain.blobs["c"].data, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slope", [0.0, 0.1])
@pytest.mark.parametrize("eltwise", ["", "operation: SUM coeff: 0.5 coeff: -1", "operation: PROD",
                                     "operation: MAX"])
def test_relu_fuses_into_an_eltwise(tmp_path, eltwise, slope):
    """ResNet's residual sum and the in-place ReLU after it: one pass of the Eltwise's copy."""
    text = (INPUT + conv("a", "data") + conv("b", "data")
            + f'layer {{ name: "e" type: "Eltwise" bottom: "a" bottom: "b" top: "e" '
              f'eltwise_param {{ {eltwise} }} }}\n'
            + inplace("relu", "ReLU", "e", f"relu_param {{ negative_slope: {slope} }}"))
    plain, lean, x = _nets(tmp_path, text)
    _check(plain, lean, x, folded_away={"relu"})
    fused = [layer for _, layer, _, _ in lean.forward_plan() if layer.name == "e"]
    assert fused[0].fused_relu_slope == np.float32(slope) and lean.layer_dict["e"].fused_relu_slope is None


def test_eltwise_sum_of_three_with_default_coeffs_matches_numpy():
    from minicaffe.testing import make_blobs
    layer_param = minicaffe.proto.caffe_pb2.LayerParameter(name="e", type="Eltwise")
    from minicaffe.layer_factory import create_layer
    layer = create_layer(layer_param, minicaffe.TEST)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((2, 3, 4)).astype(np.float32) for _ in range(3)]
    bottom = make_blobs(*xs, dtype=np.float32)
    top = make_blobs(np.zeros(1, np.float32), dtype=np.float32)
    layer.setup(bottom, top)
    layer.forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, (xs[0] + xs[1]) + xs[2])


SMALL_INPUT = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 16 dim: 3 dim: 3 } } }\n'
# Products with more weights than outputs (batch 1, 3x3 maps): the copy scales its output.
WIDE_PRODUCTS = {
    "1x1": ('layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
            'convolution_param { num_output: 24 kernel_size: 1 } }\n'),
    "winograd": conv("c", "data").replace("num_output: 6", "num_output: 24"),
    "gemm": conv("c", "data", "stride: 2").replace("num_output: 6", "num_output: 24"),
    "inner_product": ('layer { name: "c" type: "InnerProduct" bottom: "data" top: "c" '
                      'inner_product_param { num_output: 20 } }\n'),
}


@pytest.mark.parametrize("product", list(WIDE_PRODUCTS))
@pytest.mark.parametrize("relu", [False, True])
def test_wide_products_scale_their_output_and_share_the_weights(tmp_path, monkeypatch, product, relu):
    if product == "winograd":
        monkeypatch.setattr(ConvolutionLayer, "winograd", 2)
    text = (SMALL_INPUT + WIDE_PRODUCTS[product] + inplace("bn", "BatchNorm", "c", BN)
            + inplace("sc", "Scale", "c", SCALE_BIAS) + (inplace("relu", "ReLU", "c") if relu else ""))
    plain, lean, x = _nets(tmp_path, text)
    _check(plain, lean, x, folded_away={"bn", "sc"} | ({"relu"} if relu else set()))
    folded = [layer for _, layer, _, _ in lean.forward_plan() if layer.name == "c"][0]
    assert folded.output_scale is not None and folded.output_scale.dtype == np.float32
    assert folded.blobs[0] is lean.params["c"][0]   # the net's own weights, not a scaled copy
    if product == "winograd":
        assert folded._winograd is not None


def test_narrow_products_fold_into_a_copy_of_the_weights(tmp_path):
    text = INPUT + conv("c", "data") + inplace("bn", "BatchNorm", "c", BN)
    plain, lean, x = _nets(tmp_path, text)
    _check(plain, lean, x, folded_away={"bn"})
    folded = [layer for _, layer, _, _ in lean.forward_plan() if layer.name == "c"][0]
    assert folded.output_scale is None and folded.blobs[0] is not lean.params["c"][0]
