import numpy as np
import pytest

from minicaffe import io
from minicaffe.proto import caffe_pb2


def test_blobproto_round_trip_and_legacy():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    p = io.array_to_blobproto(a, diff=-a)
    np.testing.assert_array_equal(io.blobproto_to_array(p), a)
    np.testing.assert_array_equal(io.blobproto_to_array(p, return_diff=True), -a)
    legacy = caffe_pb2.BlobProto(num=1, channels=1, height=2, width=2, data=[1, 2, 3, 4])
    assert io.blobproto_to_array(legacy).shape == (1, 1, 2, 2)
    s = io.arraylist_to_blobprotovector_str([a, a[0]])
    back = io.blobprotovector_str_to_arraylist(s)
    assert [b.shape for b in back] == [(2, 3, 4), (3, 4)]


def test_datum_conversions():
    u = np.arange(12, dtype=np.uint8).reshape(1, 3, 4)
    d = io.array_to_datum(u, label=7)
    assert d.label == 7 and d.data == u.tobytes()
    np.testing.assert_array_equal(io.datum_to_array(d), u)
    f = io.array_to_datum(u.astype(np.float32) / 2)
    assert len(f.float_data) == 12 and io.datum_to_array(f).dtype == np.float32
    with pytest.raises(ValueError, match="channels, height, width"):
        io.array_to_datum(np.zeros((2, 2)))


def test_resize_bilinear_and_nearest():
    im = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    same = io.resize_image(im, (4, 4))
    np.testing.assert_array_equal(same, im)
    down = io.resize_image(im, (2, 2))
    # each output pixel is the average of a 2x2 block's centre: bilinear at (0.5, 0.5) offsets
    np.testing.assert_allclose(down[:, :, 0], [[2.5, 4.5], [10.5, 12.5]])
    near = io.resize_image(im, (8, 8), interp_order=0)
    assert near.shape == (8, 8, 1) and set(np.unique(near)) <= set(range(16))


def test_transformer_round_trip():
    t = io.Transformer({"data": (1, 3, 4, 5)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    t.set_mean("data", np.array([10, 20, 30]))
    t.set_input_scale("data", 0.5)
    img = np.random.default_rng(0).random((4, 5, 3)).astype(np.float32)
    x = t.preprocess("data", img)
    assert x.shape == (3, 4, 5) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], (img[:, :, 2] * 255 - 10) * 0.5, rtol=1e-5)
    np.testing.assert_allclose(t.deprocess("data", x), img, rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="not one of"):
        t.preprocess("nope", img)
    with pytest.raises(ValueError, match="channels"):
        t.set_mean("data", np.zeros(4))


def test_oversample_ten_crops():
    crops = io.oversample([np.zeros((6, 6, 3))], (4, 4))
    assert crops.shape == (10, 4, 4, 3)
