"""DataTransformer against a per-pixel reference written from Caffe's Transform(Datum)."""
import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe.data_transformer import DataTransformer, TransformError, load_mean_file
from minicaffe.datasets.imageset import write_mean_file
from minicaffe.proto import caffe_pb2
from minicaffe.rng import set_random_seed

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def tparam(text=""):
    return text_format.Parse(text, caffe_pb2.TransformationParameter())


def reference(batch, param, phase, draws, mean=None):
    """Caffe's loop: draws = (flips, y0s, x0s) as the transformer drew them."""
    flips, y0s, x0s = draws
    n, c, in_h, in_w = batch.shape
    k = param.crop_size
    h, w = (k, k) if k else (in_h, in_w)
    values = list(param.mean_value)
    if len(values) == 1:
        values = values * c
    out = np.zeros((n, c, h, w))
    for i in range(n):
        y0, x0 = (y0s[i], x0s[i]) if k and phase == TRAIN else ((in_h - h) // 2, (in_w - w) // 2)
        for ch in range(c):
            for y in range(h):
                for x in range(w):
                    v = float(batch[i, ch, y0 + y, x0 + x])
                    if mean is not None:
                        v -= mean[ch, y0 + y, x0 + x]
                    elif values:
                        v -= values[ch]
                    xo = w - 1 - x if flips[i] else x
                    out[i, ch, y, xo] = v * param.scale
    return out


def draws_for(param, phase, n, in_h, in_w, seed):
    """Repeat the transformer's random draws (mirror coins, then crop offsets)."""
    g = np.random.default_rng(seed)
    flips = g.integers(0, 2, size=n).astype(bool) if param.mirror else np.zeros(n, bool)
    k = param.crop_size
    if k and phase == TRAIN:
        return flips, g.integers(0, in_h - k + 1, size=n), g.integers(0, in_w - k + 1, size=n)
    return flips, None, None


@pytest.mark.parametrize("text,phase,shape", [
    ("", TRAIN, (2, 1, 5, 4)),
    ("scale: 0.00390625", TEST, (3, 1, 6, 6)),
    ("crop_size: 3", TRAIN, (4, 2, 5, 6)),
    ("crop_size: 3", TEST, (2, 3, 6, 5)),
    ("mirror: true", TRAIN, (6, 2, 4, 5)),
    ("mirror: true", TEST, (6, 1, 3, 3)),
    ("crop_size: 4 mirror: true scale: 0.5", TRAIN, (5, 3, 7, 6)),
    ("crop_size: 2 mirror: true mean_value: 10", TEST, (4, 3, 5, 5)),
    ("mean_value: 1 mean_value: 2 mean_value: 3 scale: 2", TRAIN, (2, 3, 4, 4)),
])
def test_matches_reference(text, phase, shape):
    param = tparam(text)
    batch = np.random.default_rng(0).integers(0, 256, size=shape).astype(np.uint8)
    t = DataTransformer(param, phase, rng=np.random.default_rng(7))
    got = t.transform(batch)
    want = reference(batch, param, phase, draws_for(param, phase, shape[0], *shape[2:], seed=7))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("text,phase", [("", TEST), ("crop_size: 3 mirror: true", TRAIN),
                                        ("crop_size: 3", TEST)])
def test_mean_file(tmp_path, text, phase):
    rng = np.random.default_rng(1)
    mean = rng.uniform(0, 255, size=(2, 5, 6)).astype(np.float32)
    path = tmp_path / "mean.binaryproto"
    write_mean_file(mean, path)
    np.testing.assert_array_equal(load_mean_file(path), mean)
    param = tparam(text + f' mean_file: "{path}" scale: 0.25')
    batch = rng.integers(0, 256, size=(3, 2, 5, 6)).astype(np.uint8)
    got = DataTransformer(param, phase, rng=np.random.default_rng(3)).transform(batch)
    want = reference(batch, param, phase, draws_for(param, phase, 3, 5, 6, seed=3), mean=mean)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_float_input_and_float64_output():
    batch = np.random.default_rng(2).normal(size=(2, 1, 4, 4)).astype(np.float32)
    t = DataTransformer(tparam("scale: 3 mean_value: 0.5"), TEST, dtype=np.float64)
    out = t.transform(batch)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, (batch.astype(np.float64) - 0.5) * 3, rtol=1e-6)


def test_float32_stays_float32_and_writes_into_out():
    batch = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    out = np.full((2, 3, 2, 2), -1, dtype=np.float32)
    t = DataTransformer(tparam("crop_size: 2 scale: 0.00390625 mean_value: 1"), TEST)
    result = t.transform(batch, out=out)
    assert result is out and out.dtype == np.float32
    np.testing.assert_allclose(out, (batch[:, :, 1:3, 1:3] - np.float32(1)) * np.float32(0.00390625))


def test_output_shape():
    assert DataTransformer(tparam("crop_size: 3"), TEST).output_shape((2, 5, 7)) == (2, 3, 3)
    assert DataTransformer(tparam(), TEST).output_shape((1, 28, 28)) == (1, 28, 28)


def test_random_draws_follow_the_global_seed():
    batch = np.random.default_rng(4).integers(0, 256, size=(8, 1, 6, 6)).astype(np.uint8)
    param = tparam("crop_size: 4 mirror: true")
    outs = []
    for _ in range(2):
        set_random_seed(123)
        outs.append(DataTransformer(param, TRAIN).transform(batch))
    np.testing.assert_array_equal(outs[0], outs[1])
    set_random_seed(124)
    assert not np.array_equal(DataTransformer(param, TRAIN).transform(batch), outs[0])


def test_train_crops_vary_and_test_crop_is_centred():
    batch = np.tile(np.arange(36, dtype=np.uint8).reshape(1, 1, 6, 6), (64, 1, 1, 1))
    train = DataTransformer(tparam("crop_size: 2"), TRAIN, rng=np.random.default_rng(0)).transform(batch)
    assert len({float(v) for v in train[:, 0, 0, 0]}) > 5
    test = DataTransformer(tparam("crop_size: 2"), TEST).transform(batch)
    np.testing.assert_array_equal(test[:, 0], np.tile([[14, 15], [20, 21]], (64, 1, 1)))


def test_mirror_flips_about_half():
    batch = np.tile(np.arange(4, dtype=np.uint8).reshape(1, 1, 1, 4), (200, 1, 1, 1))
    out = DataTransformer(tparam("mirror: true"), TEST, rng=np.random.default_rng(0)).transform(batch)
    flipped = out[:, 0, 0, 0] == 3
    assert np.all(flipped | (out[:, 0, 0, 0] == 0))
    assert 60 < flipped.sum() < 140


@pytest.mark.parametrize("text,shape,message", [
    ("crop_size: 29", (1, 28, 28), "crop_size 29 is larger than the 28x28"),
    ("mean_value: 1 mean_value: 2", (3, 4, 4), "1 mean_value or one per channel"),
])
def test_bad_inputs(text, shape, message):
    t = DataTransformer(tparam(text), TRAIN)
    with pytest.raises(TransformError, match=message):
        t.output_shape(shape)
    with pytest.raises(TransformError, match=message):
        t.transform(np.zeros((1,) + shape, np.uint8))


def test_bad_params(tmp_path):
    with pytest.raises(TransformError, match="not found"):
        DataTransformer(tparam(f'mean_file: "{tmp_path / "nope.binaryproto"}"'), TRAIN)
    write_mean_file(np.zeros((1, 4, 4), np.float32), tmp_path / "m.binaryproto")
    with pytest.raises(TransformError, match="at the same time"):
        DataTransformer(tparam(f'mean_file: "{tmp_path / "m.binaryproto"}" mean_value: 3'), TRAIN)
    with pytest.raises(TransformError, match="force_color and force_gray"):
        DataTransformer(tparam("force_color: true force_gray: true"), TRAIN)
    t = DataTransformer(tparam(f'mean_file: "{tmp_path / "m.binaryproto"}"'), TRAIN)
    with pytest.raises(TransformError, match="mean_file .* is 1x4x4 but the input images are 1x5x5"):
        t.output_shape((1, 5, 5))
    (tmp_path / "junk.binaryproto").write_bytes(b"\xff\xff\xff")
    with pytest.raises(TransformError, match="not a BlobProto"):
        load_mean_file(tmp_path / "junk.binaryproto")
