"""Image-set tools: list files, BGR loading, OpenCV-style bilinear resize, convert and mean."""
import numpy as np
import pytest

from minicaffe.datasets import imageset
from minicaffe.db import DBError, array_to_datum, open_reader, open_writer
from minicaffe.proto import caffe_pb2


def reference_resize(img, height, width):
    """Per-pixel bilinear with OpenCV's INTER_LINEAR conventions (half-pixel centres, clamped)."""
    c, h, w = img.shape

    def source(i, size_in, size_out):
        pos = (i + 0.5) * size_in / size_out - 0.5
        i0 = int(np.floor(pos))
        frac = pos - i0
        if i0 < 0:
            i0, frac = 0, 0.0
        if i0 >= size_in - 1:
            i0, frac = size_in - 1, 0.0
        return i0, min(i0 + 1, size_in - 1), frac

    out = np.zeros((c, height, width), np.uint8)
    for y in range(height):
        y0, y1, fy = source(y, h, height)
        for x in range(width):
            x0, x1, fx = source(x, w, width)
            for ch in range(c):
                top = img[ch, y0, x0] * (1 - fx) + img[ch, y0, x1] * fx
                bottom = img[ch, y1, x0] * (1 - fx) + img[ch, y1, x1] * fx
                out[ch, y, x] = int(np.floor(top * (1 - fy) + bottom * fy + 0.5))
    return out


@pytest.mark.parametrize("shape,size", [((1, 4, 4), (8, 8)), ((3, 7, 5), (3, 4)), ((2, 5, 6), (5, 6)),
                                        ((1, 1, 3), (2, 5))])
def test_resize_bilinear_matches_reference(shape, size):
    img = np.random.default_rng(0).integers(0, 256, size=shape).astype(np.uint8)
    got = imageset.resize_bilinear(img, *size)
    want = reference_resize(img.astype(np.float64), *size)
    assert got.dtype == np.uint8 and got.shape == (shape[0],) + size
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # float32 vs float64 rounding


def test_resize_known_values():
    img = np.array([[[0, 100]]], np.uint8)
    np.testing.assert_array_equal(imageset.resize_bilinear(img, 1, 4), [[[0, 25, 75, 100]]])


def test_read_image_list(tmp_path):
    (tmp_path / "l.txt").write_text("a b.jpg 3\nc.png 0\n\n  d.png 12\r\n")
    assert imageset.read_image_list(tmp_path / "l.txt") == [("a b.jpg", 3), ("c.png", 0), ("  d.png", 12)]
    (tmp_path / "bad.txt").write_text("x.png cat\n")
    with pytest.raises(imageset.ImageError, match="line 1 .* should read 'path label'"):
        imageset.read_image_list(tmp_path / "bad.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(imageset.ImageError, match="empty"):
        imageset.read_image_list(tmp_path / "empty.txt")
    with pytest.raises(imageset.ImageError, match="not found"):
        imageset.read_image_list(tmp_path / "none.txt")


@pytest.fixture
def pil():
    return pytest.importorskip("PIL.Image")


def test_load_image_is_bgr_chw(tmp_path, pil):
    rgb = np.random.default_rng(1).integers(0, 256, size=(3, 4, 3)).astype(np.uint8)
    pil.fromarray(rgb).save(tmp_path / "x.png")
    img = imageset.load_image(tmp_path / "x.png")
    np.testing.assert_array_equal(img, rgb[:, :, ::-1].transpose(2, 0, 1))
    gray = imageset.load_image(tmp_path / "x.png", is_color=False)
    assert gray.shape == (1, 3, 4)
    expected = np.asarray(pil.fromarray(rgb).convert("L"))
    np.testing.assert_array_equal(gray[0], expected)
    assert imageset.load_image(tmp_path / "x.png", 6, 2).shape == (3, 6, 2)
    # A grey file read in colour gets three equal channels, as OpenCV's imread does.
    pil.fromarray(rgb[:, :, 0]).save(tmp_path / "g.png")
    img = imageset.load_image(tmp_path / "g.png")
    assert img.shape == (3, 3, 4) and np.all(img == img[:1])


def test_encode_decode_round_trip(pil):
    img = np.random.default_rng(2).integers(0, 256, size=(3, 5, 4)).astype(np.uint8)
    np.testing.assert_array_equal(imageset.decode_image(imageset.encode_image(img, "png")), img)
    gray = img[:1]
    data = imageset.encode_image(gray, "png")
    np.testing.assert_array_equal(imageset.decode_image(data), gray)
    assert imageset.decode_image(data, force_color=True).shape == (3, 5, 4)
    assert imageset.decode_image(imageset.encode_image(img, "png"), force_gray=True).shape == (1, 5, 4)
    with pytest.raises(imageset.ImageError, match="could not decode"):
        imageset.decode_image(b"not an image")


@pytest.fixture
def image_folder(tmp_path, pil):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, size=(3, 6, 5, 3)).astype(np.uint8)
    (tmp_path / "img").mkdir()
    for i, im in enumerate(rgb):
        pil.fromarray(im).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "list.txt").write_text("0.png 4\n1.png 5\n2.png 6\n")
    return tmp_path, rgb


def read_db(path):
    reader = open_reader(path)
    records = [(k, caffe_pb2.Datum.FromString(v)) for k, v in reader.iter_records()]
    reader.close()
    return records


def test_convert_imageset(image_folder):
    tmp_path, rgb = image_folder
    n = imageset.convert_imageset(str(tmp_path / "img"), tmp_path / "list.txt", tmp_path / "db")
    assert n == 3
    records = read_db(tmp_path / "db")
    assert [k for k, _ in records] == [b"00000000_0.png", b"00000001_1.png", b"00000002_2.png"]
    for i, (_, d) in enumerate(records):
        assert (d.channels, d.height, d.width, d.label) == (3, 6, 5, 4 + i)
        assert d.data == rgb[i][:, :, ::-1].transpose(2, 0, 1).tobytes()


def test_convert_imageset_options(image_folder):
    tmp_path, rgb = image_folder
    imageset.convert_imageset(str(tmp_path / "img"), tmp_path / "list.txt", tmp_path / "g",
                              gray=True, resize_height=4, resize_width=3)
    d = read_db(tmp_path / "g")[0][1]
    assert (d.channels, d.height, d.width) == (1, 4, 3)
    imageset.convert_imageset(str(tmp_path / "img"), tmp_path / "list.txt", tmp_path / "s",
                              shuffle=True, rng=np.random.default_rng(0))
    keys = sorted(k.split(b"_")[1] for k, _ in read_db(tmp_path / "s"))
    assert keys == [b"0.png", b"1.png", b"2.png"]
    imageset.convert_imageset(str(tmp_path / "img"), tmp_path / "list.txt", tmp_path / "e", encoded=True)
    d = read_db(tmp_path / "e")[0][1]
    assert d.encoded and d.data == (tmp_path / "img" / "0.png").read_bytes()
    imageset.convert_imageset(str(tmp_path / "img"), tmp_path / "list.txt", tmp_path / "j",
                              encode_type="jpg")
    d = read_db(tmp_path / "j")[0][1]
    assert d.encoded and d.data[:2] == b"\xff\xd8"
    with pytest.raises(DBError, match="already exists"):
        imageset.convert_imageset(str(tmp_path / "img"), tmp_path / "list.txt", tmp_path / "j")


def test_convert_imageset_skips_unreadable_and_checks_size(image_folder, pil):
    tmp_path, _ = image_folder
    (tmp_path / "list.txt").write_text("0.png 1\nmissing.png 2\n2.png 3\n")
    with pytest.warns(UserWarning, match="missing.png"):
        n = imageset.convert_imageset(str(tmp_path / "img"), tmp_path / "list.txt", tmp_path / "db")
    assert n == 2
    assert [k for k, _ in read_db(tmp_path / "db")] == [b"00000000_0.png", b"00000002_2.png"]
    pil.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "img" / "small.png")
    (tmp_path / "list.txt").write_text("0.png 1\nsmall.png 2\n")
    with pytest.raises(imageset.ImageError, match="check_size"):
        imageset.convert_imageset(str(tmp_path / "img"), tmp_path / "list.txt", tmp_path / "c",
                                  check_size=True)


def test_compute_image_mean(tmp_path):
    images = np.random.default_rng(4).integers(0, 256, size=(25, 2, 3, 4)).astype(np.uint8)
    with open_writer(str(tmp_path / "db")) as db:
        for i, img in enumerate(images):
            db.put(b"%08d" % i, array_to_datum(img, 0).SerializeToString())
    mean = imageset.compute_image_mean(tmp_path / "db", chunk=7)
    assert mean.dtype == np.float32
    np.testing.assert_allclose(mean, images.mean(axis=0), rtol=1e-6)
    imageset.write_mean_file(mean, tmp_path / "mean.binaryproto")
    proto = caffe_pb2.BlobProto.FromString((tmp_path / "mean.binaryproto").read_bytes())
    assert (proto.num, proto.channels, proto.height, proto.width) == (1, 2, 3, 4)
    assert not proto.HasField("shape")
    np.testing.assert_allclose(np.array(proto.data).reshape(2, 3, 4), mean)


def test_compute_image_mean_rejects_mixed_sizes(tmp_path):
    with open_writer(str(tmp_path / "db")) as db:
        db.put(b"0", array_to_datum(np.zeros((1, 2, 2), np.uint8)).SerializeToString())
        db.put(b"1", array_to_datum(np.zeros((1, 3, 3), np.uint8)).SerializeToString())
    with pytest.raises(DBError, match="all Datums in a batch must have one size"):
        imageset.compute_image_mean(tmp_path / "db")
