"""Image files to Caffe data: list files, convert_imageset, compute_image_mean.

Images are arrays of shape (C, H, W), uint8, with colour channels in BGR order
as Caffe (through OpenCV) stores them; loading and resizing live in
minicaffe.image_codec (re-exported here).
"""
import os
import shutil
import warnings

import numpy as np

from ..db import DBError, array_to_datum, decode_batch, open_reader, open_writer
from ..image_codec import (ImageError, decode_image, encode_image, load_image,  # noqa: F401
                           require_pillow, resize_bilinear)
from ..proto import caffe_pb2

__all__ = ["read_image_list", "load_image", "decode_image", "resize_bilinear", "encode_image",
           "convert_imageset", "compute_image_mean", "write_mean_file", "ImageError"]


def read_image_list(path):
    """[(filename, label)] from a list file of `path label` lines (the label is after the last space)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageError(f"image list {path!r} not found")
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            name, sep, label = line.rpartition(" ")
            try:
                if not sep or not name:
                    raise ValueError
                entries.append((name, int(label)))
            except ValueError:
                raise ImageError(f"line {number} of {path!r} should read 'path label', "
                                 f"got {line!r}") from None
    if not entries:
        raise ImageError(f"image list {path!r} is empty")
    return entries


def convert_imageset(root, list_file, db_path, gray=False, shuffle=False, resize_height=0,
                     resize_width=0, backend="lmdb", check_size=False, encoded=False,
                     encode_type="", rng=None, progress=None, overwrite=False):
    """Caffe's convert_imageset: images listed in `list_file` (under `root`) into a new database.

    Keys are `%08d_<filename>`, values Datums (raw BGR bytes, or the encoded file
    with `encoded`/`encode_type`). Unreadable images are skipped with a warning, as in
    Caffe; when none can be read it is an ImageError and nothing is written. The
    database is built under a temporary name and renamed when complete.
    Returns the number of records written.
    """
    entries = read_image_list(list_file)
    if shuffle:
        from .. import rng as _rng
        order = (rng or _rng.get_rng()).permutation(len(entries))
        entries = [entries[i] for i in order]
    encoded = encoded or bool(encode_type)
    resize_height, resize_width = max(0, resize_height), max(0, resize_width)
    is_color = not gray
    require_pillow()  # before anything is written: without Pillow every image would be skipped
    db_path = os.fspath(db_path)
    if os.path.exists(db_path) and not overwrite:
        raise DBError(f"{db_path!r} already exists; remove it first (Caffe's tools refuse "
                      f"to write into an existing database)")
    # Written next to the target and renamed when complete, so a failure leaves no
    # half-written database and an existing one (with overwrite) survives until then.
    parent = os.path.dirname(os.path.abspath(db_path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.getpid()}-{os.path.basename(os.path.abspath(db_path))}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    skipped = []
    try:
        count = _write_imageset(entries, root, tmp, backend, is_color, resize_height,
                                resize_width, encoded, encode_type, check_size, progress, skipped)
        if not count:
            raise ImageError(f"no image of {os.fspath(list_file)!r} could be read (the first, "
                             f"{skipped[0]!r}, failed: {skipped[1]}); nothing was written to "
                             f"{db_path!r}")
        if os.path.exists(db_path):
            shutil.rmtree(db_path) if os.path.isdir(db_path) else os.remove(db_path)
        os.replace(tmp, db_path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return count


def _write_imageset(entries, root, db_path, backend, is_color, resize_height, resize_width,
                    encoded, encode_type, check_size, progress, skipped):
    size = None
    with open_writer(db_path, backend) as db:
        for line_id, (name, label) in enumerate(entries):
            path = os.path.join(root, name) if root else name
            try:
                array = load_image(path, resize_height, resize_width, is_color)
            except ImageError as exc:
                # Caffe's convert_imageset logs unreadable images and goes on.
                if not skipped:
                    skipped.extend([path, exc])
                warnings.warn(f"skipping: {exc}", stacklevel=3)
                continue
            if encoded:
                fmt = encode_type or os.path.splitext(name)[1].lstrip(".").lower()
                datum = caffe_pb2.Datum(label=label, encoded=True)
                if _same_file_ok(name, fmt, array, is_color, resize_height, resize_width):
                    with open(path, "rb") as f:
                        datum.data = f.read()
                else:
                    datum.data = encode_image(array, fmt)
            else:
                datum = array_to_datum(array, label)
                if check_size:
                    if size is None:
                        size = array.size
                    elif array.size != size:
                        raise ImageError(f"{name!r} has {array.size} values, the first image "
                                         f"{size} (--check_size)")
            db.put(f"{line_id:08d}_{name}", datum.SerializeToString())
            if progress is not None:
                progress(1)
        return db.count + len(db.pending)


def _same_file_ok(name, fmt, array, is_color, resize_height, resize_width):
    """Whether the file's own bytes can be stored as-is (Caffe's shortcut for --encoded)."""
    ext = os.path.splitext(name)[1].lstrip(".").lower()
    same_ext = ext == fmt.lower() or (fmt.lower() == "jpg" and ext == "jpeg")
    return same_ext and not resize_height and not resize_width and (array.shape[0] == 3) == is_color


def compute_image_mean(db_path, backend="lmdb", chunk=1000):
    """Mean (C, H, W) float32 image over every Datum in a database, as compute_image_mean does."""
    reader = open_reader(db_path, backend)
    try:
        total, count, records = None, 0, []

        def flush():
            nonlocal total, count
            batch, _ = decode_batch(records, source=repr(os.fspath(db_path)))
            if total is None:
                total = np.zeros(batch.shape[1:], dtype=np.float64)
            elif batch.shape[1:] != total.shape:
                raise DBError(f"records of {os.fspath(db_path)!r} differ in size: "
                              f"{batch.shape[1:]} vs {total.shape}")
            total += batch.sum(axis=0, dtype=np.float64)
            count += len(records)
            records.clear()

        for record in reader.iter_records():
            records.append(record)
            if len(records) == chunk:
                flush()
        if records:
            flush()
        if not count:
            raise DBError(f"database {os.fspath(db_path)!r} is empty")
        return (total / count).astype(np.float32)
    finally:
        reader.close()


def write_mean_file(mean, path):
    """Save a (C, H, W) mean image as a BlobProto with num=1 (Caffe's mean file layout)."""
    c, h, w = mean.shape
    proto = caffe_pb2.BlobProto(num=1, channels=c, height=h, width=w)
    proto.data.extend(np.asarray(mean, dtype=np.float32).ravel().tolist())
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
