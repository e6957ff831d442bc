"""Inference nets fold in-place BatchNorm / Scale / Bias into the Convolution or InnerProduct before."""
import numpy as np
import pytest

import minicaffe

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
    _check(*_nets(tmp_path, text), folded_away={"bn", "sc"})


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
