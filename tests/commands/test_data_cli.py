"""`minicaffe data mnist`, `convert-imageset` and `compute-image-mean` through the CLI."""
import gzip

import numpy as np
import pytest

from minicaffe.cli import main
from minicaffe.db import open_reader
from minicaffe.proto import caffe_pb2


def write_idx(path, array):
    magic = (2051 if array.ndim == 3 else 2049).to_bytes(4, "big")
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(magic + dims + array.astype(np.uint8).tobytes()))


@pytest.fixture
def fake_mnist(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    for prefix, n in (("train", 6), ("t10k", 4)):
        write_idx(src / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, size=(n, 28, 28)))
        write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return src


def count(path):
    reader = open_reader(path)
    n = len(reader)
    reader.close()
    return n


def test_data_mnist_from_a_folder(fake_mnist, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["data", "mnist", "--source", str(fake_mnist), "--out", str(out), "--no-verify"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "mnist_train_lmdb"), str(out / "mnist_test_lmdb")]
    assert count(out / "mnist_train_lmdb") == 6 and count(out / "mnist_test_lmdb") == 4
    assert main(["data", "mnist", "--out", str(out)]) == 0  # already there: nothing to do
    assert "already" in capsys.readouterr().err


def test_data_mnist_errors_are_one_line(fake_mnist, tmp_path, capsys):
    assert main(["data", "mnist", "--source", str(fake_mnist), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("minicaffe: error:") and "checksum" in err and "\n" not in err
    assert main(["data", "mnist", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_data_without_a_dataset_shows_help(capsys):
    assert main(["data"]) == 1
    assert "mnist" in capsys.readouterr().out


@pytest.fixture
def images(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(4, 6, 8, 3)).astype(np.uint8)
    (tmp_path / "img").mkdir()
    for i, im in enumerate(rgb):
        Image.fromarray(im).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "list.txt").write_text("".join(f"{i}.png {i % 2}\n" for i in range(4)))
    return tmp_path, rgb


def test_convert_imageset_and_mean(images, capsys):
    tmp_path, rgb = images
    db = tmp_path / "db"
    assert main(["convert-imageset", "--resize_height=4", "--resize-width", "5", "--gray",
                 "--shuffle", "--seed", "3", str(tmp_path / "img") + "/", str(tmp_path / "list.txt"),
                 str(db)]) == 0
    assert "Processed 4 files" in capsys.readouterr().err
    reader = open_reader(db)
    datums = [caffe_pb2.Datum.FromString(v) for _, v in reader.iter_records()]
    reader.close()
    assert len(datums) == 4 and all((d.channels, d.height, d.width) == (1, 4, 5) for d in datums)

    mean_path = tmp_path / "mean.binaryproto"
    assert main(["compute-image-mean", str(db), str(mean_path)]) == 0
    out = capsys.readouterr().out
    stack = np.stack([np.frombuffer(d.data, np.uint8).reshape(1, 4, 5) for d in datums]).astype(float)
    assert f"mean_value channel [0]: {stack.mean():.6g}" in out
    from minicaffe.data_transformer import load_mean_file
    np.testing.assert_allclose(load_mean_file(mean_path), stack.mean(axis=0), rtol=1e-6)

    assert main(["compute-image-mean", str(db)]) == 0  # prints only
    assert "mean_value channel [0]" in capsys.readouterr().out


def test_convert_imageset_refuses_an_existing_db(images, capsys):
    tmp_path, _ = images
    args = ["convert-imageset", str(tmp_path / "img"), str(tmp_path / "list.txt"), str(tmp_path / "db")]
    assert main(args) == 0
    assert main(args) == 1
    assert "already exists" in capsys.readouterr().err


def test_compute_image_mean_of_a_missing_db(tmp_path, capsys):
    assert main(["compute-image-mean", str(tmp_path / "none_lmdb"), str(tmp_path / "m")]) == 1
    assert "does not exist" in capsys.readouterr().err
