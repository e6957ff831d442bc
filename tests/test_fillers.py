import math

import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe import Blob, set_random_seed
from minicaffe import fillers
from minicaffe.fillers import fill
from minicaffe.rng import get_rng
from minicaffe.proto import caffe_pb2


def filler(text):
    return text_format.Parse(text, caffe_pb2.FillerParameter())


def filled(shape, text, seed=1):
    set_random_seed(seed)
    return fill(Blob(shape), filler(text)).data


def test_constant_and_dtype():
    d = filled((2, 3), 'type: "constant" value: 2.5')
    assert d.dtype == np.float32 and np.all(d == 2.5)


def test_uniform_range():
    d = filled((1000,), 'type: "uniform" min: -2 max: 3')
    assert d.min() >= -2 and d.max() <= 3 and abs(d.mean() - 0.5) < 0.2


def test_gaussian_moments_and_sparse():
    d = filled((100, 200), 'type: "gaussian" mean: 1 std: 2')
    assert abs(d.mean() - 1) < 0.05 and abs(d.std() - 2) < 0.05
    s = filled((50, 400), 'type: "gaussian" std: 1 sparse: 10')
    # each of the 50 outputs keeps about 10/50 of its weights
    assert abs((s != 0).mean() - 10 / 50) < 0.02


def test_positive_unitball_rows_sum_to_one():
    d = filled((4, 3, 2), 'type: "positive_unitball"')
    np.testing.assert_allclose(d.reshape(4, -1).sum(1), 1, rtol=1e-5)
    assert d.min() >= 0


@pytest.mark.parametrize("norm,n", [("FAN_IN", 3 * 5 * 5), ("FAN_OUT", 20 * 5 * 5),
                                    ("AVERAGE", (75 + 500) / 2)])
def test_xavier_and_msra_scales(norm, n):
    x = filled((20, 3, 5, 5), f'type: "xavier" variance_norm: {norm}')
    assert np.abs(x).max() <= math.sqrt(3 / n) + 1e-6
    assert abs(x.std() - math.sqrt(1 / n)) < 0.1 * math.sqrt(1 / n)
    m = filled((200, 3, 5, 5), f'type: "msra" variance_norm: {norm}')
    n_m = {"FAN_IN": 75, "FAN_OUT": 200 * 25, "AVERAGE": (75 + 5000) / 2}[norm]
    assert abs(m.std() - math.sqrt(2 / n_m)) < 0.05 * math.sqrt(2 / n_m)


@pytest.mark.parametrize("k", [3, 4, 5])
def test_bilinear_matches_formula(k):
    d = filled((2, 1, k, k), 'type: "bilinear"')
    f = math.ceil(k / 2)
    c = (k - 1) / (2 * f)
    ref = np.array([[(1 - abs(x / f - c)) * (1 - abs(y / f - c)) for x in range(k)] for y in range(k)])
    np.testing.assert_allclose(d[1, 0], ref, rtol=1e-6)
    with pytest.raises(ValueError, match="square"):
        filled((1, 1, 3, 4), 'type: "bilinear"')


def test_seed_reproducible_and_errors():
    a = filled((10,), 'type: "gaussian"', seed=5)
    b = filled((10,), 'type: "gaussian"', seed=5)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="unknown filler type 'gauss'"):
        filled((2,), 'type: "gauss"')
    with pytest.raises(ValueError, match="sparse"):
        filled((2, 2), 'type: "xavier" sparse: 1')


@pytest.mark.parametrize("text", ['type: "gaussian" std: 0.5 mean: 0.1', 'type: "gaussian" std: 1 sparse: 3',
                                  'type: "uniform" min: -2 max: 1', 'type: "xavier"', 'type: "msra"'])
def test_chunked_draws_equal_one_draw(monkeypatch, text):
    """Big blobs are drawn in pieces (no float64 copy of the whole blob): the same values."""
    param = text_format.Parse(text, caffe_pb2.FillerParameter())
    results = []
    for chunk in (1 << 20, 7):
        monkeypatch.setattr(fillers, "_DRAW_CHUNK", chunk)
        set_random_seed(11)
        blob = Blob((6, 5, 3))
        fill(blob, param)
        results.append(blob.data.copy())
    np.testing.assert_array_equal(results[0], results[1])
    set_random_seed(11)
    rng = get_rng()
    if param.type == "gaussian":
        expected = rng.normal(param.mean, param.std, (6, 5, 3))
        if param.sparse >= 0:
            expected *= rng.random((6, 5, 3)) < param.sparse / 6
    elif param.type == "uniform":
        expected = rng.uniform(param.min, param.max, (6, 5, 3))
    elif param.type == "xavier":
        scale = np.sqrt(3.0 / 15)
        expected = rng.uniform(-scale, scale, (6, 5, 3))
    else:
        expected = rng.normal(0.0, np.sqrt(2.0 / 15), (6, 5, 3))
    np.testing.assert_array_equal(results[0], expected.astype(np.float32))
