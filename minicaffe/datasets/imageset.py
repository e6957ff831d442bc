"""Image files to Caffe data: list files, image loading, convert_imageset, compute_image_mean.

Images are arrays of shape (C, H, W), uint8, with colour channels in BGR order
as Caffe (through OpenCV) stores them. Decoding uses Pillow, an optional
dependency (`pip install minicaffe[image]`); resizing is bilinear with OpenCV's
pixel-centre convention, done in numpy (results can differ from OpenCV's
fixed-point arithmetic by one grey level).
"""
import io
import os
import warnings

import numpy as np

from ..errors import MinicaffeError
from ..db import DBError, array_to_datum, decode_batch, open_reader, open_writer
from ..proto import caffe_pb2

__all__ = ["read_image_list", "load_image", "decode_image", "resize_bilinear", "encode_image",
           "convert_imageset", "compute_image_mean", "write_mean_file", "ImageError"]


class ImageError(MinicaffeError, ValueError):
    """An image list or image file that cannot be used."""


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImageError("reading images needs Pillow: pip install minicaffe[image] "
                         "(or pip install Pillow)") from None
    return Image


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


def _to_caffe_array(img, is_color):
    """A PIL image as a (C, H, W) uint8 BGR (or 1-channel) array."""
    if is_color:
        hwc = np.asarray(img.convert("RGB"))[:, :, ::-1]
    else:
        hwc = np.asarray(img.convert("L"))[:, :, None]
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def load_image(path, new_height=0, new_width=0, is_color=True):
    """Read an image file as (C, H, W) uint8 BGR, resized when both sizes are given."""
    Image = _pil()
    try:
        with Image.open(path) as img:
            array = _to_caffe_array(img, is_color)
    except (OSError, ValueError) as exc:
        raise ImageError(f"could not load image {os.fspath(path)!r}: {exc}") from None
    if new_height > 0 and new_width > 0:
        array = resize_bilinear(array, new_height, new_width)
    return array


def decode_image(data, force_color=False, force_gray=False):
    """Decode an encoded Datum's bytes to (C, H, W): native channel count unless forced."""
    Image = _pil()
    try:
        with Image.open(io.BytesIO(data)) as img:
            if force_color or force_gray:
                is_color = force_color
            else:
                is_color = img.mode not in ("1", "L", "LA", "I", "I;16", "F")
            return _to_caffe_array(img, is_color)
    except (OSError, ValueError) as exc:
        raise ImageError(f"could not decode an encoded Datum: {exc}") from None


def encode_image(array, fmt):
    """Encode a (C, H, W) uint8 BGR/gray array as image file bytes ('png', 'jpg', ...)."""
    Image = _pil()
    hwc = array.transpose(1, 2, 0)
    img = Image.fromarray(hwc[:, :, 0]) if hwc.shape[2] == 1 else Image.fromarray(
        np.ascontiguousarray(hwc[:, :, ::-1]))
    name = Image.registered_extensions().get("." + fmt.lower())
    if name is None:
        raise ImageError(f"unknown image encoding {fmt!r}")
    buf = io.BytesIO()
    img.save(buf, format=name)
    return buf.getvalue()


def _axis_weights(size_in, size_out):
    """Source indices (i0, i1) and weight of i1 for each output position (OpenCV's INTER_LINEAR)."""
    pos = (np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5
    i0 = np.floor(pos).astype(np.int64)
    frac = pos - i0
    frac[i0 < 0] = 0.0
    i0 = np.clip(i0, 0, size_in - 1)
    frac[i0 >= size_in - 1] = 0.0
    i1 = np.minimum(i0 + 1, size_in - 1)
    return i0, i1, frac.astype(np.float32)


def resize_bilinear(array, height, width):
    """Resize a (C, H, W) uint8 array to (C, height, width) bilinearly, rounding to uint8."""
    c, h, w = array.shape
    if (h, w) == (height, width):
        return array.copy()
    y0, y1, fy = _axis_weights(h, height)
    x0, x1, fx = _axis_weights(w, width)
    src = array.astype(np.float32)
    rows = src[:, y0, :] * (1 - fy)[:, None] + src[:, y1, :] * fy[:, None]
    out = rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def convert_imageset(root, list_file, db_path, gray=False, shuffle=False, resize_height=0,
                     resize_width=0, backend="lmdb", check_size=False, encoded=False,
                     encode_type="", rng=None, progress=None, overwrite=False):
    """Caffe's convert_imageset: images listed in `list_file` (under `root`) into a new database.

    Keys are `%08d_<filename>`, values Datums (raw BGR bytes, or the encoded file
    with `encoded`/`encode_type`). Unreadable images are skipped with a warning.
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
    size = None
    with open_writer(db_path, backend, overwrite=overwrite) as db:
        for line_id, (name, label) in enumerate(entries):
            path = os.path.join(root, name) if root else name
            try:
                array = load_image(path, resize_height, resize_width, is_color)
            except ImageError as exc:
                warnings.warn(f"skipping: {exc}")
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
        count = db.count + len(db.pending)
    return count


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
