"""Depthwise convolution: the direct kernel equals the grouped-GEMM path, loops, gradients,
and the forks' DepthwiseConvolution / ConvolutionDepthwise types."""
import numpy as np
import pytest

from minicaffe.blob import Blob
from minicaffe.kernels.depthwise import DepthwiseConv
from minicaffe.layer import LayerError
from minicaffe.layers.conv import ConvGemm
from tests.gradient_check import check_gradient, make_blobs
from tests.layers.test_conv import make_layer, reference_conv

CONFIGS = [
    # (channels, multiplier, conv_text)
    (4, 1, "kernel_size: 3 pad: 1"),
    (4, 1, "kernel_size: 3 stride: 2 pad: 1"),
    (3, 1, "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 0 pad_w: 1"),
    (4, 1, "kernel_size: 3 pad: 2 dilation: 2"),
    (3, 2, "kernel_size: 3 stride: 2 pad: 1"),
    (2, 3, "kernel_size: 5 pad: 2 bias_term: false"),
    (5, 1, "kernel_size: 1"),
]


def conv_text(channels, multiplier, text):
    return f"num_output: {channels * multiplier} group: {channels} {text}"


def run(layer, x, dtype, use_depthwise=True, top_diff=None):
    layer.use_depthwise_kernel = use_depthwise
    bottom = make_blobs(x, dtype=dtype)
    top = [Blob(dtype=dtype)]
    layer.setup(bottom, top)
    layer.forward(bottom, top)
    result = {"top": top[0].data.copy()}
    if top_diff is not None:
        top[0].diff[...] = top_diff
        for b in layer.blobs:
            b.diff[...] = 0
        layer.backward(top, [True], bottom)
        result["bottom_diff"] = bottom[0].diff.copy()
        result.update({f"param{i}": b.diff.copy() for i, b in enumerate(layer.blobs)})
    return layer, result


@pytest.mark.parametrize("channels,multiplier,text", CONFIGS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_direct_kernel_equals_grouped_gemm(channels, multiplier, text, dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, channels, 9, 8))
    text = conv_text(channels, multiplier, text)
    ref, _ = run(make_layer("Convolution", text), x, dtype)
    top_diff = rng.standard_normal((2, channels * multiplier) + ref.top_spatial)
    fast, a = run(make_layer("Convolution", text, fillers=False, blobs=ref.blobs), x, dtype, True,
                  top_diff)
    plain, b = run(make_layer("Convolution", text, fillers=False, blobs=ref.blobs), x, dtype, False,
                   top_diff)
    assert isinstance(fast.gemm, DepthwiseConv) and isinstance(plain.gemm, ConvGemm)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for key in a:
        assert a[key].dtype == dtype
        np.testing.assert_allclose(a[key], b[key], rtol=tol, atol=tol, err_msg=key)


@pytest.mark.parametrize("channels,multiplier,text", CONFIGS[:5])
def test_forward_matches_loops(channels, multiplier, text):
    x = np.random.default_rng(0).standard_normal((2, channels, 7, 6))
    layer, out = run(make_layer("Convolution", conv_text(channels, multiplier, text)), x, np.float64)
    bias = layer.blobs[1].data if layer.bias_term else None
    expected = reference_conv(x, layer.blobs[0].data, bias, layer.kernel, layer.pad, layer.stride,
                              layer.dilation, channels)
    np.testing.assert_allclose(out["top"], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels,multiplier,text", [CONFIGS[1], CONFIGS[3], CONFIGS[4]])
def test_gradients(channels, multiplier, text):
    layer = make_layer("Convolution", conv_text(channels, multiplier, text))
    bottom = make_blobs(np.random.default_rng(1).standard_normal((2, channels, 6, 5)))
    check_gradient(layer, bottom, [Blob(dtype=np.float64)])
    assert isinstance(layer.gemm, DepthwiseConv)


def test_grouped_but_not_depthwise_keeps_the_gemm_path():
    layer, _ = run(make_layer("Convolution", "num_output: 4 group: 2 kernel_size: 3"),
                   np.zeros((1, 4, 5, 5)), np.float32)
    assert isinstance(layer.gemm, ConvGemm)


def test_param_diffs_accumulate():
    x = np.random.default_rng(2).standard_normal((1, 3, 5, 5))
    layer = make_layer("Convolution", conv_text(3, 1, "kernel_size: 3"))
    bottom, top = make_blobs(x), [Blob(dtype=np.float64)]
    layer.setup(bottom, top)
    layer.forward(bottom, top)
    top[0].diff[...] = 1
    for b in layer.blobs:
        b.diff[...] = 0
    layer.backward(top, [True], bottom)
    once = [b.diff.copy() for b in layer.blobs]
    layer.backward(top, [True], bottom)
    for b, first in zip(layer.blobs, once):
        np.testing.assert_allclose(b.diff, 2 * first)


def test_fork_types_equal_plain_convolution():
    x = np.random.default_rng(4).standard_normal((1, 6, 8, 8)).astype(np.float32)
    ref, expected = run(make_layer("Convolution", conv_text(6, 1, "kernel_size: 3 stride: 2 pad: 1")),
                        x, np.float32)
    a = make_layer("DepthwiseConvolution", conv_text(6, 1, "kernel_size: 3 stride: 2 pad: 1"),
                   fillers=False, blobs=ref.blobs)
    b = make_layer("ConvolutionDepthwise", "num_output: 6 kernel_size: 3 stride: 2 pad: 1",
                   fillers=False, blobs=ref.blobs)
    for layer in (a, b):
        layer, out = run(layer, x, np.float32)
        assert isinstance(layer.gemm, DepthwiseConv)
        np.testing.assert_array_equal(out["top"], expected["top"])


def test_convolution_depthwise_without_num_output_has_one_output_per_channel():
    layer, out = run(make_layer("ConvolutionDepthwise", "kernel_size: 3"),
                     np.ones((1, 5, 4, 4)), np.float32)
    assert out["top"].shape == (1, 5, 2, 2)
    assert layer.blobs[0].shape == (5, 1, 3, 3)


@pytest.mark.parametrize("text", ["num_output: 8 kernel_size: 3", "group: 2 kernel_size: 3"])
def test_convolution_depthwise_rejects_other_shapes(text):
    layer = make_layer("ConvolutionDepthwise", text)
    with pytest.raises(LayerError, match=r"layer 'conv' \(ConvolutionDepthwise\).*one output per input"):
        run(layer, np.ones((1, 4, 5, 5)), np.float32)


@pytest.mark.parametrize("multiplier", [1, 2])
def test_channel_blocks_match_one_block(monkeypatch, multiplier):
    import minicaffe.kernels.depthwise as depthwise
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 5, 7, 7))
    text = conv_text(5, multiplier, "kernel_size: 3 pad: 1")
    ref, whole = run(make_layer("Convolution", text), x, np.float64)
    top_diff = rng.standard_normal((2, 5 * multiplier, 7, 7))
    _, whole = run(make_layer("Convolution", text, fillers=False, blobs=ref.blobs), x, np.float64,
                   True, top_diff)
    monkeypatch.setattr(depthwise, "WORKING_SET_BYTES", 1)
    blocked_layer, blocked = run(make_layer("Convolution", text, fillers=False, blobs=ref.blobs), x,
                                 np.float64, True, top_diff)
    assert blocked_layer.gemm.block == 1
    for key in whole:
        np.testing.assert_allclose(blocked[key], whole[key], rtol=1e-12, atol=1e-12)


# The multiplier-1 forward runs on phase grids (one per stride phase), in channel blocks.
PHASE_CONFIGS = ["kernel_size: 3 pad: 1", "kernel_size: 3 stride: 2 pad: 1",
                 "kernel_size: 3 stride: 2", "kernel_size: 5 stride: 3 pad: 2",
                 "kernel_size: 3 pad: 2 dilation: 2", "kernel_size: 3 stride: 2 pad: 2 dilation: 3",
                 "kernel_h: 1 kernel_w: 3 stride_h: 2 stride_w: 1 pad_h: 0 pad_w: 1", "kernel_size: 2 stride: 2",
                 # the widest overrun of the spare grid row: (k_w - 1) * dil_w past the last output row
                 "kernel_h: 2 kernel_w: 5 pad_h: 0 pad_w: 1 dilation: 2"]


@pytest.mark.parametrize("text", PHASE_CONFIGS)
@pytest.mark.parametrize("num,height,width", [(1, 15, 13), (3, 8, 9)])
@pytest.mark.parametrize("working_set", [None, 1])
def test_phase_forward_equals_grouped_gemm(monkeypatch, text, num, height, width, working_set):
    from minicaffe.kernels import depthwise, jit
    monkeypatch.setattr(jit, "_enabled", False)   # the numpy path (tests/kernels/test_jit.py: numba's)
    if working_set is not None:
        monkeypatch.setattr(depthwise, "WORKING_SET_BYTES", working_set)   # one channel per block
    x = np.random.default_rng(7).standard_normal((num, 6, height, width)).astype(np.float32)
    text = conv_text(6, 1, text)
    fast, a = run(make_layer("Convolution", text), x, np.float32)
    plain, b = run(make_layer("Convolution", text, fillers=False, blobs=fast.blobs), x, np.float32,
                   use_depthwise=False)
    assert isinstance(fast.gemm, DepthwiseConv) and fast.gemm._phase_blocks is not None
    # the strided-view path's scratch is made only when a backward needs it
    assert not {"_padded", "_padded_diff", "_product"} & set(vars(fast.gemm))
    np.testing.assert_allclose(a["top"], b["top"], rtol=1e-5, atol=1e-5)
    # a second forward on new values and weights refills the phases (their padding stays zero)
    # and the weight columns the channel blocks read
    for layer in (fast, plain):
        layer.blobs[0].data[...] *= -0.5
    bottom = make_blobs(-x[::-1].copy(), dtype=np.float32)
    top = [Blob(dtype=np.float32)]
    fast.reshape(bottom, top)
    fast.forward(bottom, top)
    plain.reshape(bottom, top)
    expected = top[0].data.copy()
    plain.forward(bottom, top)
    np.testing.assert_allclose(expected, top[0].data, rtol=1e-5, atol=1e-5)


def test_layers_sharing_the_phase_scratch_keep_their_padding_zero(monkeypatch):
    """Depthwise layers of one thread share their grids and accumulators: a layer whose padding
    another layer (or anything) wrote over still reads zeros there, and a layer planned before a
    larger one grew the scratch re-slices its views."""
    from minicaffe.kernels import depthwise, jit
    monkeypatch.setattr(jit, "_enabled", False)   # the phase grids are the numpy path's
    rng = np.random.default_rng(11)
    small = rng.standard_normal((1, 4, 6, 5)).astype(np.float32)
    large = rng.standard_normal((2, 6, 13, 12)).astype(np.float32)
    layers = {}
    for name, x, text in [("small", small, "kernel_size: 3 pad: 1"), ("large", large, "kernel_size: 3 stride: 2 pad: 2")]:
        fast, a = run(make_layer("Convolution", conv_text(x.shape[1], 1, text)), x, np.float32)
        plain, b = run(make_layer("Convolution", conv_text(x.shape[1], 1, text), fillers=False,
                                  blobs=fast.blobs), x, np.float32, use_depthwise=False)
        layers[name] = fast, x, b["top"]
    for name in ["small", "large", "small", "large"]:
        for buffer in depthwise._SCRATCH.buffers.values():
            buffer[...] = np.nan
        fast, x, expected = layers[name]
        bottom, top = make_blobs(x, dtype=np.float32), [Blob(dtype=np.float32)]
        fast.reshape(bottom, top)
        fast.forward(bottom, top)
        np.testing.assert_allclose(top[0].data, expected, rtol=1e-5, atol=1e-5, err_msg=name)
