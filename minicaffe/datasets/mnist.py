"""MNIST: fetch the four IDX files and convert them to LMDBs as Caffe's convert_mnist_data does.

    paths = fetch_mnist(out_dir)                 # download (or find) and verify
    convert_mnist(paths["train-images-idx3-ubyte"], paths["train-labels-idx1-ubyte"],
                  "mnist_train_lmdb")

Each record is a Datum with channels=1, height=28, width=28, the 784 pixels as
bytes and the digit as label, under the key "%08d" % index. Files are checked by
the MD5 of their uncompressed contents, so .gz and plain copies both pass.
"""
import gzip
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request

import numpy as np

from ..errors import MinicaffeError
from ..db import DBError, open_reader, open_writer
from ..proto import caffe_pb2

__all__ = ["MNIST_FILES", "MNIST_MIRRORS", "MnistError", "read_idx", "find_local", "fetch_mnist",
           "convert_mnist", "prepare_mnist"]

# Uncompressed MD5 of each file.
MNIST_FILES = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
]
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


class MnistError(MinicaffeError, ValueError):
    pass


def _read_bytes(path):
    """A file's contents, decompressed when it is gzip (recognised by its magic bytes)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise MnistError(f"cannot read {os.fspath(path)!r}: {exc}") from None


def read_idx(path, expect_magic=None):
    """The array in an IDX file (.gz or plain): (N, rows, cols) images or (N,) labels, uint8."""
    raw = _read_bytes(path)
    if len(raw) < 8:
        raise MnistError(f"{os.fspath(path)!r} is too short to be an IDX file")
    magic = int.from_bytes(raw[:4], "big")
    if expect_magic is not None and magic != expect_magic:
        kind = "image" if expect_magic == IMAGE_MAGIC else "label"
        raise MnistError(f"{os.fspath(path)!r}: incorrect {kind} file magic {magic} (expected {expect_magic})")
    if magic not in (IMAGE_MAGIC, LABEL_MAGIC):
        raise MnistError(f"{os.fspath(path)!r} is not an MNIST IDX file (magic {magic})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    header = 4 + 4 * ndim
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise MnistError(f"{os.fspath(path)!r} is truncated: header says {dims} "
                         f"({size} bytes) but it holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _md5(path):
    return hashlib.md5(_read_bytes(path)).hexdigest()


def find_local(folder, names=MNIST_FILES):
    """{name: path} of the files present in `folder`, as `name`, `name.gz` or `name` with dots."""
    found = {}
    for name in names:
        for candidate in (name, name + ".gz", name.replace("-idx", ".idx"),
                          name.replace("-idx", ".idx") + ".gz"):
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                found[name] = path
                break
    return found


def _progress_bar(total, desc):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a core dependency
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False,
                disable=not sys.stderr.isatty())


def _download(url, dest, timeout=60):
    """Fetch url to dest atomically, with a progress bar on a terminal."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        total = response.headers.get("Content-Length")
        bar = _progress_bar(int(total) if total else None, os.path.basename(dest))
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest) or ".", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                while True:
                    chunk = response.read(1 << 16)
                    if not chunk:
                        break
                    f.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            os.replace(tmp, dest)
        except BaseException:
            os.unlink(tmp)
            raise
        finally:
            if bar is not None:
                bar.close()


def fetch_mnist(out_dir, source=None, mirrors=MNIST_MIRRORS, checksums=MNIST_FILES, verify=True,
                log=print):
    """Make sure the four MNIST files are available; return {name: path}.

    source: a local folder holding them (.gz or plain), or a base URL to download
    from. Without it, files already in out_dir are reused and the rest are
    downloaded from `mirrors`, tried in order. Every file is checked by MD5.
    """
    def ok(name, path):
        return not verify or _md5(path) == checksums[name]

    if source and not _is_url(source):
        if not os.path.isdir(source):
            raise MnistError(f"MNIST source folder {source!r} does not exist")
        found = find_local(source, checksums)
        missing = [n for n in checksums if n not in found]
        if missing:
            raise MnistError(f"{source!r} lacks {', '.join(missing)} (as plain or .gz files)")
        for name, path in found.items():
            if not ok(name, path):
                raise MnistError(f"{path!r} does not match the MNIST checksum (corrupt or not MNIST; "
                                 f"pass --no-verify to use it anyway)")
        return found

    os.makedirs(out_dir, exist_ok=True)
    bases = [source] if source else list(mirrors)
    paths = {}
    for name in checksums:
        have = find_local(out_dir, {name: None}).get(name)
        if have and ok(name, have):
            paths[name] = have
            continue
        dest = os.path.join(out_dir, name + ".gz")
        failures = []
        for base in bases:
            url = base.rstrip("/") + "/" + name + ".gz"
            try:
                log(f"Downloading {url}")
                _download(url, dest)
            except urllib.error.HTTPError as exc:
                failures.append(f"{url}: HTTP {exc.code} {exc.reason}")
                continue
            except (urllib.error.URLError, OSError, ValueError) as exc:
                failures.append(f"{url}: {getattr(exc, 'reason', exc)}")
                continue
            if ok(name, dest):
                paths[name] = dest
                break
            failures.append(f"{url}: checksum mismatch")
            os.unlink(dest)
        else:
            raise MnistError(f"could not download {name}: " + "; ".join(failures))
    return paths


def _is_url(source):
    return "://" in str(source)


def convert_mnist(images_path, labels_path, db_path, backend="lmdb", overwrite=False):
    """Write an IDX image/label pair to a new database; returns the record count."""
    images = read_idx(images_path, IMAGE_MAGIC)
    labels = read_idx(labels_path, LABEL_MAGIC)
    if images.ndim != 3 or labels.ndim != 1:
        raise MnistError(f"expected 3-d images and 1-d labels, got {images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise MnistError(f"{len(images)} images but {len(labels)} labels")
    rows, cols = images.shape[1:]
    if os.path.exists(db_path) and not overwrite:
        raise MnistError(f"{os.fspath(db_path)!r} already exists; remove it first")
    # Write beside the target and rename at the end, so an interrupted run
    # never leaves a half-written database under the final name.
    partial = os.fspath(db_path) + ".partial"
    datum = caffe_pb2.Datum(channels=1, height=rows, width=cols)
    with open_writer(partial, backend, overwrite=True) as db:
        for i in range(len(images)):
            datum.data = images[i].tobytes()
            datum.label = int(labels[i])
            db.put(b"%08d" % i, datum.SerializeToString())
    if os.path.exists(db_path):
        shutil.rmtree(db_path)
    os.replace(partial, db_path)
    return len(images)


def prepare_mnist(out_dir, source=None, force=False, backend="lmdb", verify=True,
                  mirrors=MNIST_MIRRORS, checksums=MNIST_FILES, log=print):
    """Fetch MNIST and write <out_dir>/mnist_{train,test}_<backend>; returns their paths.

    Existing databases with the right record count are kept unless `force`.
    """
    dbs = {split: os.path.join(out_dir, f"mnist_{split}_{backend}") for split in ("train", "test")}
    prefix = {"train": "train", "test": "t10k"}
    if not force and all(_complete(path, backend) for path in dbs.values()):
        log(f"MNIST databases already in {out_dir} (use --force to rebuild)")
        return dbs
    paths = fetch_mnist(out_dir, source, mirrors=mirrors, checksums=checksums, verify=verify, log=log)
    for split, db_path in dbs.items():
        n = convert_mnist(paths[f"{prefix[split]}-images-idx3-ubyte"],
                          paths[f"{prefix[split]}-labels-idx1-ubyte"], db_path, backend,
                          overwrite=True)
        log(f"Wrote {n} records to {db_path}")
    return dbs


def _complete(db_path, backend):
    """A readable, non-empty database (only finished runs get the final name)."""
    if not os.path.isdir(db_path):
        return False
    try:
        reader = open_reader(db_path, backend)
        n = len(reader)
        reader.close()
    except DBError:
        return False
    return n > 0
