"""MNIST tools: IDX reading, Caffe-identical LMDB records, download with checksums, real data."""
import contextlib
import functools
import gzip
import hashlib
import http.server
import pathlib
import threading

import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe.blob import Blob
from minicaffe.datasets import mnist
from minicaffe.db import open_reader
from minicaffe.layer_factory import create_layer
from minicaffe.proto import caffe_pb2

NAMES = list(mnist.MNIST_FILES)
LENET = pathlib.Path(__file__).resolve().parents[2] / "models" / "lenet"


def idx_bytes(array):
    magic = (2051 if array.ndim == 3 else 2049).to_bytes(4, "big")
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return magic + dims + array.astype(np.uint8).tobytes()


def write_fake_mnist(folder, n_train=7, n_test=3, gz=True, seed=0):
    """Tiny MNIST-format files; returns ({name: uncompressed md5}, arrays)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, size=n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, size=n_test),
    }
    folder.mkdir(parents=True, exist_ok=True)
    sums = {}
    for name, array in arrays.items():
        raw = idx_bytes(array)
        sums[name] = hashlib.md5(raw).hexdigest()
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return sums, arrays


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(directory):
    """An HTTP server for `directory` on 127.0.0.1; yields its base URL."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    monkeypatch.setenv("no_proxy", "*")


def quiet(*args):
    pass


# -- IDX files ----------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx(tmp_path, gz):
    sums, arrays = write_fake_mnist(tmp_path, gz=gz)
    for name, array in arrays.items():
        path = tmp_path / (name + (".gz" if gz else ""))
        np.testing.assert_array_equal(mnist.read_idx(path), array)


def test_read_idx_errors(tmp_path):
    images = np.zeros((2, 28, 28), np.uint8)
    (tmp_path / "img").write_bytes(idx_bytes(images))
    with pytest.raises(mnist.MnistError, match="incorrect label file magic 2051"):
        mnist.read_idx(tmp_path / "img", mnist.LABEL_MAGIC)
    (tmp_path / "short").write_bytes(idx_bytes(images)[:-5])
    with pytest.raises(mnist.MnistError, match="truncated"):
        mnist.read_idx(tmp_path / "short")
    (tmp_path / "junk").write_bytes(b"hello world!")
    with pytest.raises(mnist.MnistError, match="not an MNIST IDX file"):
        mnist.read_idx(tmp_path / "junk")


# -- conversion ----------------------------------------------------------------------------
def test_convert_writes_caffe_identical_records(tmp_path):
    sums, arrays = write_fake_mnist(tmp_path / "src")
    n = mnist.convert_mnist(tmp_path / "src" / "train-images-idx3-ubyte.gz",
                            tmp_path / "src" / "train-labels-idx1-ubyte.gz", tmp_path / "db")
    assert n == 7
    reader = open_reader(tmp_path / "db")
    records = list(reader.iter_records())
    reader.close()
    assert [k for k, _ in records] == [b"%08d" % i for i in range(7)]
    images, labels = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    for i, (_, value) in enumerate(records):
        # The bytes convert_mnist_data writes: channels 1, height 28, width 28, data, label.
        expected = (b"\x08\x01\x10\x1c\x18\x1c\x22\x90\x06" + images[i].astype(np.uint8).tobytes()
                    + b"\x28" + bytes([int(labels[i])]))
        assert value == expected
    with pytest.raises(mnist.MnistError, match="already exists"):
        mnist.convert_mnist(tmp_path / "src" / "train-images-idx3-ubyte.gz",
                            tmp_path / "src" / "train-labels-idx1-ubyte.gz", tmp_path / "db")


def test_convert_rejects_mismatched_counts(tmp_path):
    sums, arrays = write_fake_mnist(tmp_path / "src")
    with pytest.raises(mnist.MnistError, match="7 images but 3 labels"):
        mnist.convert_mnist(tmp_path / "src" / "train-images-idx3-ubyte.gz",
                            tmp_path / "src" / "t10k-labels-idx1-ubyte.gz", tmp_path / "db")
    assert not (tmp_path / "db").exists()


# -- fetching -------------------------------------------------------------------------------
def test_download_falls_back_to_the_next_mirror(tmp_path):
    sums, arrays = write_fake_mnist(tmp_path / "site" / "good")
    (tmp_path / "site" / "empty").mkdir()
    with serve(tmp_path / "site") as url:
        paths = mnist.fetch_mnist(tmp_path / "out", mirrors=[url + "empty/", url + "good/"],
                                  checksums=sums, log=quiet)
    assert set(paths) == set(NAMES)
    for name in NAMES:
        np.testing.assert_array_equal(mnist.read_idx(paths[name]), arrays[name])
    # A second run finds the verified files and downloads nothing.
    again = mnist.fetch_mnist(tmp_path / "out", mirrors=["http://127.0.0.1:9/"], checksums=sums, log=quiet)
    assert again == paths


def test_download_rejects_a_bad_checksum(tmp_path):
    sums, _ = write_fake_mnist(tmp_path / "site")
    bad = dict(sums, **{"t10k-labels-idx1-ubyte": "0" * 32})
    with serve(tmp_path / "site") as url:
        with pytest.raises(mnist.MnistError, match="t10k-labels-idx1-ubyte: .*checksum mismatch"):
            mnist.fetch_mnist(tmp_path / "out", source=url, checksums=bad, log=quiet)
    assert not (tmp_path / "out" / "t10k-labels-idx1-ubyte.gz").exists()


def test_download_reports_every_failed_mirror(tmp_path):
    (tmp_path / "site").mkdir()
    with serve(tmp_path / "site") as url:
        with pytest.raises(mnist.MnistError, match=r"could not download train-images.*404.*404"):
            mnist.fetch_mnist(tmp_path / "out", mirrors=[url + "a/", url + "b/"], log=quiet)


def test_local_folder_source(tmp_path):
    sums, arrays = write_fake_mnist(tmp_path / "src", gz=False)
    paths = mnist.fetch_mnist(tmp_path / "out", source=str(tmp_path / "src"), checksums=sums)
    assert paths["train-images-idx3-ubyte"] == str(tmp_path / "src" / "train-images-idx3-ubyte")
    with pytest.raises(mnist.MnistError, match="does not match the MNIST checksum"):
        mnist.fetch_mnist(tmp_path / "out", source=str(tmp_path / "src"))
    (tmp_path / "src" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(mnist.MnistError, match="lacks t10k-labels-idx1-ubyte"):
        mnist.fetch_mnist(tmp_path / "out", source=str(tmp_path / "src"), checksums=sums)
    with pytest.raises(mnist.MnistError, match="does not exist"):
        mnist.fetch_mnist(tmp_path / "out", source=str(tmp_path / "nowhere"))


def test_prepare_keeps_finished_databases(tmp_path):
    sums, _ = write_fake_mnist(tmp_path / "src")
    dbs = mnist.prepare_mnist(tmp_path / "out", source=str(tmp_path / "src"), checksums=sums, log=quiet)
    stamp = (tmp_path / "out" / "mnist_train_lmdb" / "data.mdb").stat().st_mtime_ns
    messages = []
    assert mnist.prepare_mnist(tmp_path / "out", log=messages.append) == dbs
    assert "already" in messages[0]
    assert (tmp_path / "out" / "mnist_train_lmdb" / "data.mdb").stat().st_mtime_ns == stamp
    mnist.prepare_mnist(tmp_path / "out", source=str(tmp_path / "src"), checksums=sums, force=True,
                        log=quiet)
    reader = open_reader(dbs["test"])
    assert len(reader) == 3
    reader.close()


# -- the real thing ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_mnist_dbs(tmp_path_factory):
    from tests.conftest import SHARED_MNIST
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found at {SHARED_MNIST}")
    out = tmp_path_factory.mktemp("mnist")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("no_proxy", "*")
        with serve(SHARED_MNIST) as url:  # the download path, with the real checksums
            dbs = mnist.prepare_mnist(out, source=url, log=quiet)
    return dbs, out


def test_real_mnist_databases(real_mnist_dbs, mnist_dir):
    dbs, out = real_mnist_dbs
    for split, count, prefix in (("train", 60000, "train"), ("test", 10000, "t10k")):
        reader = open_reader(dbs[split])
        assert len(reader) == count
        key, value = reader.first()
        reader.close()
        datum = caffe_pb2.Datum.FromString(value)
        assert key == b"00000000" and (datum.channels, datum.height, datum.width) == (1, 28, 28)
        images = mnist.read_idx(out / f"{prefix}-images-idx3-ubyte.gz")
        labels = mnist.read_idx(out / f"{prefix}-labels-idx1-ubyte.gz")
        assert datum.data == images[0].tobytes() and datum.label == labels[0]
    assert mnist.read_idx(out / "train-labels-idx1-ubyte.gz")[0] == 5


def lenet_data_layer(phase, source):
    """The Data layer of models/lenet/lenet_train_test.prototxt for `phase`, reading `source`."""
    with open(LENET / "lenet_train_test.prototxt") as f:
        net = text_format.Parse(f.read(), caffe_pb2.NetParameter())
    param = next(l for l in net.layer if l.type == "Data" and l.include[0].phase == phase)
    param.data_param.source = str(source)
    layer = create_layer(param, phase)
    top = [Blob(), Blob()]
    layer.setup([], top)
    return layer, top


def test_lenet_data_layers_on_real_mnist(real_mnist_dbs):
    dbs, out = real_mnist_dbs
    images = mnist.read_idx(out / "t10k-images-idx3-ubyte.gz")
    labels = mnist.read_idx(out / "t10k-labels-idx1-ubyte.gz")
    layer, top = lenet_data_layer(caffe_pb2.TEST, dbs["test"])
    assert top[0].shape == (100, 1, 28, 28)
    for step in range(101):  # a full pass over the 10,000 test images, then wrap around
        layer.forward([], top)
        rows = np.arange(step * 100, step * 100 + 100) % 10000
        if step in (0, 57, 100):
            np.testing.assert_array_equal(top[0].data, images[rows, None] * np.float32(0.00390625))
            np.testing.assert_array_equal(top[1].data, labels[rows])
    layer.close()
    layer, top = lenet_data_layer(caffe_pb2.TRAIN, dbs["train"])
    layer.forward([], top)
    assert top[0].shape == (64, 1, 28, 28) and top[0].dtype == np.float32
    assert 0 <= top[0].data.min() and top[0].data.max() < 1
    layer.close()


def test_lenet_model_files_have_caffes_settings():
    with open(LENET / "lenet_solver.prototxt") as f:
        solver = text_format.Parse(f.read(), caffe_pb2.SolverParameter())
    assert (solver.base_lr, solver.momentum, solver.weight_decay) == pytest.approx((0.01, 0.9, 0.0005))
    assert (solver.lr_policy, solver.gamma, solver.power) == ("inv", pytest.approx(1e-4), 0.75)
    assert (solver.max_iter, solver.test_interval, solver.test_iter, solver.snapshot) == (10000, 500, [100], 5000)
    assert solver.net == "models/lenet/lenet_train_test.prototxt"
    with open(LENET.parents[1] / solver.net) as f:
        net = text_format.Parse(f.read(), caffe_pb2.NetParameter())
    data = [l for l in net.layer if l.type == "Data"]
    assert [l.data_param.batch_size for l in data] == [64, 100]
    assert all(l.transform_param.scale == 0.00390625 for l in data)
    convs = [l for l in net.layer if l.type in ("Convolution", "InnerProduct")]
    params = [l.convolution_param if l.type == "Convolution" else l.inner_product_param for l in convs]
    assert [p.num_output for p in params] == [20, 50, 500, 10]
    assert all(p.weight_filler.type == "xavier" for p in params)
    with open(LENET / "lenet.prototxt") as f:
        deploy = text_format.Parse(f.read(), caffe_pb2.NetParameter())
    assert deploy.layer[0].type == "Input" and deploy.layer[-1].type == "Softmax"
