import numpy as np
import pytest

from minicaffe import Blob
from minicaffe.proto import caffe_pb2


def test_defaults_float32_and_count():
    b = Blob((2, 3, 4, 5))
    assert b.data.dtype == np.float32 and b.diff.dtype == np.float32
    assert b.count() == 120 and b.count(1) == 60 and b.count(1, 3) == 12 and b.num_axes == 4
    assert b.canonical_axis(-1) == 3
    with pytest.raises(IndexError):
        b.canonical_axis(4)


def test_reshape_reuses_storage_until_it_must_grow():
    b = Blob((4, 5))
    buf = b._data.buf
    b.data[...] = 1
    b.reshape(2, 3)
    assert b._data.buf is buf and b.shape == (2, 3)
    b.reshape((4, 5))
    assert b._data.buf is buf
    b.reshape(10, 10)
    assert b._data.buf is not buf and b.count() == 100


def test_share_data_and_diff_see_each_others_writes():
    a, b = Blob((2, 3)), Blob((3, 2))
    b.share_data(a)
    a.data[...] = 7
    assert np.all(b.data == 7) and b.shape == (3, 2)
    b.share_diff(a)
    b.diff[...] = 2
    assert np.all(a.diff == 2)
    with pytest.raises(ValueError, match="elements"):
        Blob((5,)).share_data(a)


def test_setter_checks_shape_and_names_blob():
    b = Blob((2, 2), name="conv1")
    b.data = np.ones((2, 2))
    assert b.data.dtype == np.float32 and b.data.sum() == 4
    with pytest.raises(ValueError, match="conv1"):
        b.diff = np.ones((3, 3))


def test_update_subtracts_diff():
    b = Blob((3,))
    b.data[...] = [1, 2, 3]
    b.diff[...] = [0.5, 0.5, 0.5]
    b.update()
    np.testing.assert_allclose(b.data, [0.5, 1.5, 2.5])


def test_proto_round_trip_and_legacy_shape():
    b = Blob((2, 3))
    b.data[...] = np.arange(6).reshape(2, 3)
    b.diff[...] = -1
    p = b.to_proto(write_diff=True)
    assert list(p.shape.dim) == [2, 3] and len(p.diff) == 6
    c = Blob().from_proto(caffe_pb2.BlobProto.FromString(p.SerializeToString()))
    np.testing.assert_array_equal(c.data, b.data)
    np.testing.assert_array_equal(c.diff, b.diff)
    legacy = caffe_pb2.BlobProto(num=1, channels=2, height=1, width=3, data=range(6))
    assert Blob.proto_shape(legacy) == (1, 2, 1, 3)
    d = Blob().from_proto(legacy)
    assert d.shape == (1, 2, 1, 3) and d.data.sum() == 15


def test_from_proto_without_reshape_checks_shape():
    b = Blob((2, 3), name="w")
    p = Blob((3, 2)).to_proto()
    with pytest.raises(ValueError, match="shape mismatch"):
        b.from_proto(p, reshape=False)


def test_float64_blob_round_trips_double_fields():
    b = Blob((2,), dtype=np.float64)
    b.data[...] = [1e-300, 2.0]
    p = b.to_proto()
    assert len(p.double_data) == 2 and len(p.data) == 0
    assert Blob((2,), dtype=np.float64).from_proto(p).data[0] == 1e-300
