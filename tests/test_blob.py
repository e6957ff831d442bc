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


def test_diff_is_allocated_at_first_use_and_keeps_its_values_across_growth():
    b = Blob((3, 4))
    assert b._diff.buf.size == 0          # a forward-only net never pays for diffs
    np.testing.assert_array_equal(b.diff, np.zeros((3, 4), np.float32))
    b.diff[...] = 2
    b.reshape(2, 2)
    np.testing.assert_array_equal(b.diff, 2)
    b.reshape(5, 5)                       # grows only when read, zeros past the old values
    assert b._diff.buf.size == 12
    assert b.diff.sum() == 24 and b.diff.ravel()[12:].max() == 0


def test_shared_diff_grows_for_every_sharer():
    a, b = Blob((2, 3)), Blob((6,))
    b.share_diff(a)
    b.diff[...] = np.arange(6)
    np.testing.assert_array_equal(a.diff.ravel(), np.arange(6))


# Run in a fresh interpreter: whether glibc clears (touches) a calloc depends on what the
# process freed before, so the test's own heap state must not decide it.
_CHURN = """
import numpy as np
from minicaffe import Blob
def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS"))
np.ones(4 << 20, np.float32)   # 16 MiB freed: glibc now serves 16 MiB callocs from its heap
before = rss()
tops = []
for _ in range(4):             # what a net's Split tops do: a buffer of their own, soon dropped
    tops.append(Blob((4 << 20,)))
    tops[-1]._data = Blob((1,))._data
blobs = [Blob((4 << 20,)) for _ in range(4)]
print(rss() - before)
"""


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs /proc")
def test_big_zeros_cost_no_memory_until_touched_even_after_big_frees():
    import pathlib
    import subprocess
    import sys

    from minicaffe.blob import zeros

    root = str(pathlib.Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", _CHURN], capture_output=True, text=True, check=True,
                         env=dict(__import__("os").environ, PYTHONPATH=root)).stdout
    assert float(out) < 8          # 128 MiB allocated, nothing touched (np.zeros: 48 MiB touched)
    z = zeros(1 << 20, np.float64)
    assert z.dtype == np.float64 and z.shape == (1 << 20,) and z.flags.writeable and not z.any()
    assert zeros(3, np.int32).tolist() == [0, 0, 0]
    big = zeros((4, 256, 128), np.float32)            # shapes as np.zeros takes them
    assert big.shape == (4, 256, 128) and big.flags.c_contiguous and not big.any()
    big[1, 2, 3] = 5
    assert big.sum() == 5 and zeros((2, 0, 3)).shape == (2, 0, 3)
    b = Blob((1 << 20,))
    b.data[:10] = 1
    assert b.data[:11].tolist() == [1] * 10 + [0]


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_big_buffers_stay_private_to_a_forked_child():
    import os

    b = Blob((1 << 20,))
    pid = os.fork()
    if pid == 0:
        b.data[...] = 7
        os._exit(0)
    os.waitpid(pid, 0)
    assert not b.data.any()
