import math

import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe import Blob, set_random_seed
from minicaffe.fillers import fill
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
