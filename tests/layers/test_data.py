"""Data, ImageData, HDF5Data and MemoryData layers, driven standalone (no Net).

Data layers have no bottoms and no backward, so there is no gradient check or
in-place case; each layer is checked against the records it was given.
"""
import gc
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe.blob import Blob
from minicaffe.datasets.imageset import write_mean_file
from minicaffe.db import array_to_datum, open_writer
from minicaffe.layer import LayerError
from minicaffe.layer_factory import create_layer
from minicaffe.proto import caffe_pb2
from minicaffe.rng import set_random_seed

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def make_layer(text, phase=TRAIN, ntop=2, dtype=np.float32):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    layer = create_layer(param, phase)
    top = [Blob((), dtype) for _ in range(ntop)]
    layer.setup([], top)
    return layer, top


def write_db(path, images, labels, backend="lmdb"):
    with open_writer(str(path), backend) as db:
        for i, (img, label) in enumerate(zip(images, labels)):
            db.put(b"%08d" % i, array_to_datum(img, label).SerializeToString())
    return str(path)


@pytest.fixture
def small_db(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 2, 4, 3)).astype(np.uint8)
    labels = np.arange(5) * 10 + 1
    return write_db(tmp_path / "small_lmdb", images, labels), images, labels


def data_text(source, batch=3, extra="", transform="", backend="LMDB"):
    return (f'name: "d" type: "Data" top: "data" top: "label" transform_param {{ {transform} }} '
            f'data_param {{ source: "{source}" batch_size: {batch} backend: {backend} {extra} }}')


def run(layer, top, steps):
    outs = []
    for _ in range(steps):
        layer.forward([], top)
        outs.append((top[0].data.copy(), top[1].data.copy() if len(top) > 1 else None))
    return outs


# -- Data --------------------------------------------------------------------------------
@pytest.mark.parametrize("prefetch", [4, 1, 0])
def test_data_reads_in_order_and_wraps_around(small_db, prefetch):
    source, images, labels = small_db
    layer, top = make_layer(data_text(source, extra=f"prefetch: {prefetch}"))
    assert top[0].shape == (3, 2, 4, 3) and top[1].shape == (3,)
    order = [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    for step, (data, label) in enumerate(run(layer, top, 4)):
        idx = order[3 * step: 3 * step + 3]
        np.testing.assert_array_equal(data, images[idx].astype(np.float32))
        np.testing.assert_array_equal(label, labels[idx])
        assert data.dtype == np.float32 and label.dtype == np.float32
    layer.close()


def test_data_without_label_top_and_with_transform(small_db):
    source, images, _ = small_db
    layer, top = make_layer(data_text(source, batch=2, transform="scale: 0.5 crop_size: 2"),
                            phase=TEST, ntop=1)
    assert top[0].shape == (2, 2, 2, 2)
    (data, _), = run(layer, top, 1)
    np.testing.assert_array_equal(data, images[:2, :, 1:3, 0:2] * np.float32(0.5))


def test_data_float_datums_and_float64_tops(tmp_path):
    images = np.random.default_rng(1).normal(size=(4, 1, 2, 2)).astype(np.float32)
    source = write_db(tmp_path / "float_lmdb", images, [0, 1, 2, 3])
    layer, top = make_layer(data_text(source, batch=4), dtype=np.float64)
    (data, label), = run(layer, top, 1)
    assert data.dtype == np.float64
    np.testing.assert_array_equal(data, images)
    np.testing.assert_array_equal(label, [0, 1, 2, 3])


def test_data_mean_file(small_db, tmp_path):
    source, images, _ = small_db
    mean = np.random.default_rng(2).uniform(0, 255, size=(2, 4, 3)).astype(np.float32)
    write_mean_file(mean, tmp_path / "mean.binaryproto")
    layer, top = make_layer(data_text(source, batch=5, transform=f'mean_file: "{tmp_path / "mean.binaryproto"}"'))
    (data, _), = run(layer, top, 1)
    np.testing.assert_allclose(data, images - mean, rtol=1e-6)


def test_rand_skip_in_train_only(small_db):
    source, images, labels = small_db
    skips = set()
    for seed in range(12):
        set_random_seed(seed)
        layer, top = make_layer(data_text(source, batch=1, extra="rand_skip: 5"))
        (_, label), = run(layer, top, 1)
        skips.add(int(label[0]))
        layer.close()
    assert len(skips) > 1 and skips <= set(labels.tolist())
    for seed in range(3):
        set_random_seed(seed)
        layer, top = make_layer(data_text(source, batch=1, extra="rand_skip: 5"), phase=TEST)
        (_, label), = run(layer, top, 1)
        assert label[0] == labels[0]


def test_random_transforms_repeat_under_seed_whatever_the_prefetch(small_db):
    source, _, _ = small_db
    results = []
    for prefetch in (4, 0, 2):
        set_random_seed(42)
        layer, top = make_layer(data_text(source, batch=3, extra=f"prefetch: {prefetch} rand_skip: 4",
                                          transform="crop_size: 2 mirror: true"))
        results.append(np.concatenate([d for d, _ in run(layer, top, 6)]))
        layer.close()
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


def test_prefetch_thread_stops_on_close_and_on_garbage_collection(small_db):
    source, _, _ = small_db
    layer, top = make_layer(data_text(source))
    thread = layer._prefetcher.thread
    assert thread.is_alive()
    layer.close()
    assert not thread.is_alive()
    layer, top = make_layer(data_text(source))
    thread = layer._prefetcher.thread
    run(layer, top, 2)
    del layer
    gc.collect()
    assert not thread.is_alive()


def test_interpreter_exits_with_running_prefetch_thread(small_db):
    source, _, _ = small_db
    script = textwrap.dedent(f"""
        import numpy as np
        from google.protobuf import text_format
        from minicaffe.blob import Blob
        from minicaffe.layer_factory import create_layer
        from minicaffe.proto import caffe_pb2
        p = text_format.Parse({data_text(source, batch=2)!r}, caffe_pb2.LayerParameter())
        layer = create_layer(p)
        top = [Blob(), Blob()]
        layer.setup([], top)
        layer.forward([], top)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_data_errors_name_the_problem(tmp_path, small_db):
    source, images, labels = small_db
    with pytest.raises(LayerError, match="does not exist"):
        make_layer(data_text(tmp_path / "missing_lmdb"))
    corrupt = tmp_path / "corrupt_lmdb"
    corrupt.mkdir()
    (corrupt / "data.mdb").write_bytes(b"this is not an lmdb file" * 100)
    with pytest.raises(LayerError, match="cannot open LMDB .*corrupt_lmdb': MDB_INVALID"):
        make_layer(data_text(corrupt))
    with pytest.raises(LayerError, match="crop_size 5 is larger than the 4x3"):
        make_layer(data_text(source, transform="crop_size: 5"))
    with pytest.raises(LayerError, match="mean_file .* not found"):
        make_layer(data_text(source, transform=f'mean_file: "{tmp_path / "none.binaryproto"}"'))
    with pytest.raises(LayerError, match="batch_size must be positive"):
        make_layer(data_text(source, batch=0))
    with pytest.raises(LayerError, match="source"):
        make_layer('name: "d" type: "Data" top: "data" data_param { batch_size: 1 backend: LMDB }', ntop=1)
    with pytest.raises(LayerError, match="add `backend: LMDB`"):
        make_layer(f'name: "d" type: "Data" top: "data" data_param {{ source: "{source}" batch_size: 1 }}',
                   ntop=1)
    with pytest.raises(LayerError, match="at most 2 top"):
        make_layer(data_text(source), ntop=3)


def test_datum_of_another_size_is_reported(tmp_path):
    path = tmp_path / "mixed_lmdb"
    with open_writer(str(path)) as db:
        for i in range(3):
            db.put(b"%08d" % i, array_to_datum(np.zeros((1, 2, 2), np.uint8), i).SerializeToString())
        db.put(b"00000003", array_to_datum(np.zeros((1, 3, 3), np.uint8), 3).SerializeToString())
        db.put(b"00000004", b"\xff\xff garbage")
    layer, top = make_layer(data_text(path, batch=2, extra="prefetch: 1"))
    layer.forward([], top)
    with pytest.raises(LayerError, match=r"record '00000003' .* is 1x3x3 .* record '00000002' is 1x2x2"):
        layer.forward([], top)
    with pytest.raises(LayerError):  # the failure sticks
        layer.forward([], top)
    layer, top = make_layer(data_text(path, batch=1, extra="prefetch: 0"))
    run(layer, top, 4)
    with pytest.raises(LayerError, match="'00000004' .* not a serialized Datum"):
        layer.forward([], top)


def test_leveldb_without_plyvel(monkeypatch, small_db, tmp_path):
    monkeypatch.setitem(sys.modules, "plyvel", None)
    (tmp_path / "some_leveldb").mkdir()
    with pytest.raises(LayerError, match="pip install plyvel"):
        make_layer(data_text(tmp_path / "some_leveldb", backend="LEVELDB"))


def test_leveldb_source(tmp_path):
    pytest.importorskip("plyvel")
    images = np.arange(3 * 4, dtype=np.uint8).reshape(3, 1, 2, 2)
    source = write_db(tmp_path / "small_leveldb", images, [7, 8, 9], backend="leveldb")
    layer, top = make_layer(data_text(source, batch=2, backend="LEVELDB"))
    outs = run(layer, top, 2)
    np.testing.assert_array_equal(outs[1][0], images[[2, 0]])
    np.testing.assert_array_equal(outs[1][1], [9, 7])


def test_encoded_datums(tmp_path):
    pytest.importorskip("PIL")
    from minicaffe.datasets.imageset import encode_image
    img = np.random.default_rng(3).integers(0, 256, size=(3, 4, 5)).astype(np.uint8)
    path = tmp_path / "enc_lmdb"
    with open_writer(str(path)) as db:
        datum = caffe_pb2.Datum(data=encode_image(img, "png"), label=4, encoded=True)
        db.put(b"0", datum.SerializeToString())
    layer, top = make_layer(data_text(path, batch=1))
    (data, label), = run(layer, top, 1)
    np.testing.assert_array_equal(data[0], img)
    layer, top = make_layer(data_text(path, batch=1, transform="force_gray: true"))
    assert top[0].shape == (1, 1, 4, 5)


def test_data_layer_in_a_net(small_db, tmp_path):
    net_mod = pytest.importorskip("minicaffe.net")
    source, images, labels = small_db
    proto = tmp_path / "net.prototxt"
    proto.write_text(f'name: "n" layer {{ {data_text(source, batch=2)} }}')
    net = net_mod.Net(str(proto), TEST)
    net.forward()
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data, images[2:4])
    np.testing.assert_array_equal(net.blobs["label"].data, labels[2:4])


# -- MemoryData -------------------------------------------------------------------------
MEMORY = 'name: "m" type: "MemoryData" top: "data" top: "label" memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 }'


def test_memory_data_serves_batches_and_wraps():
    layer, top = make_layer(MEMORY)
    assert top[0].shape == (2, 1, 2, 3) and top[1].shape == (2,)
    data = np.arange(4 * 6, dtype=np.float64).reshape(4, 1, 2, 3)
    labels = np.array([5, 6, 7, 8])
    layer.set_input_arrays(data, labels)
    outs = run(layer, top, 3)
    for (d, l), rows in zip(outs, ([0, 1], [2, 3], [0, 1])):
        assert d.dtype == np.float32
        np.testing.assert_array_equal(d, data[rows])
        assert l.shape == (2, 1, 1, 1)  # Caffe's forward shape for the label top
        np.testing.assert_array_equal(l.ravel(), labels[rows])
    layer.set_input_arrays(data.astype(np.float32), labels.reshape(4, 1, 1, 1).astype(np.float32))
    (d, l), = run(layer, top, 1)
    np.testing.assert_array_equal(l.ravel(), [5, 6])


def test_memory_data_shares_arrays_of_the_right_type():
    layer, top = make_layer(MEMORY)
    data = np.zeros((2, 1, 2, 3), np.float32)
    layer.set_input_arrays(data, np.zeros(2, np.float32))
    data[...] = 3
    layer.forward([], top)
    assert np.all(top[0].data == 3)


def test_memory_data_add_datum_vector_transforms():
    layer, top = make_layer(MEMORY.replace("memory_data_param", "transform_param { scale: 2 } memory_data_param"))
    imgs = [np.full((1, 2, 3), i, np.uint8) for i in range(4)]
    layer.add_datum_vector([array_to_datum(img, 10 + i) for i, img in enumerate(imgs)])
    with pytest.raises(LayerError, match="consumed"):
        layer.add_datum_vector([array_to_datum(imgs[0])] * 2)
    outs = run(layer, top, 2)
    np.testing.assert_array_equal(outs[1][0], np.stack(imgs[2:]) * 2.0)
    np.testing.assert_array_equal(outs[1][1].ravel(), [12, 13])
    layer.add_datum_vector([array_to_datum(imgs[0])] * 2)  # consumed now


def test_memory_data_errors():
    with pytest.raises(LayerError, match="must all be set and positive"):
        make_layer('name: "m" type: "MemoryData" top: "a" top: "b" memory_data_param { batch_size: 2 channels: 1 height: 2 }')
    with pytest.raises(LayerError, match="exactly 2 top"):
        make_layer(MEMORY, ntop=1)
    layer, top = make_layer(MEMORY)
    with pytest.raises(LayerError, match="set_input_arrays"):
        layer.forward([], top)
    with pytest.raises(LayerError, match=r"shape \(N, 1, 2, 3\)"):
        layer.set_input_arrays(np.zeros((2, 1, 3, 2)), np.zeros(2))
    with pytest.raises(LayerError, match="same first dimension"):
        layer.set_input_arrays(np.zeros((2, 1, 2, 3)), np.zeros(4))
    with pytest.raises(LayerError, match="multiple of batch_size"):
        layer.set_input_arrays(np.zeros((3, 1, 2, 3)), np.zeros(3))


# -- HDF5Data ---------------------------------------------------------------------------
def write_h5(path, **arrays):
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        for name, a in arrays.items():
            f.create_dataset(name, data=a)
    return str(path)


@pytest.fixture
def h5_files(tmp_path):
    rng = np.random.default_rng(5)
    a = dict(data=rng.normal(size=(3, 2, 2)).astype(np.float32), label=np.arange(3, dtype=np.int32))
    b = dict(data=rng.normal(size=(4, 2, 2)), label=np.arange(3, 7, dtype=np.int64))
    write_h5(tmp_path / "a.h5", **a)
    write_h5(tmp_path / "b.h5", **b)
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'a.h5'}\nb.h5\n")  # b.h5 relative to the list
    return str(tmp_path / "list.txt"), np.concatenate([a["data"], b["data"]]), np.arange(7)


def h5_text(source, batch, extra=""):
    return (f'name: "h" type: "HDF5Data" top: "data" top: "label" '
            f'hdf5_data_param {{ source: "{source}" batch_size: {batch} {extra} }}')


def test_hdf5_batches_cross_files_and_wrap(h5_files):
    source, data, labels = h5_files
    layer, top = make_layer(h5_text(source, 5))
    assert top[0].shape == (5, 2, 2) and top[1].shape == (5,)
    order = list(range(7)) * 3
    for step, (d, l) in enumerate(run(layer, top, 4)):
        rows = order[5 * step: 5 * step + 5]
        assert d.dtype == np.float32
        np.testing.assert_allclose(d, data[rows], rtol=1e-6)
        np.testing.assert_array_equal(l, labels[rows])


def test_hdf5_shuffle_is_a_permutation_and_seeded(h5_files):
    source, data, labels = h5_files
    seen = []
    for _ in range(2):
        set_random_seed(9)
        layer, top = make_layer(h5_text(source, 7, "shuffle: true"))
        seen.append(np.concatenate([l for _, l in run(layer, top, 3)]))
    np.testing.assert_array_equal(seen[0], seen[1])
    for epoch in seen[0].reshape(3, 7):
        assert sorted(epoch.tolist()) == list(range(7))
    assert not np.array_equal(seen[0], np.tile(np.arange(7), 3))


def test_hdf5_errors(h5_files, tmp_path, monkeypatch):
    source, _, _ = h5_files
    with pytest.raises(LayerError, match="does not transform"):
        make_layer(h5_text(source, 2) + " transform_param { scale: 2 }")
    with pytest.raises(LayerError, match="no dataset 'other'"):
        make_layer(h5_text(source, 2).replace('top: "label"', 'top: "other"'))
    with pytest.raises(LayerError, match="not found"):
        make_layer(h5_text(tmp_path / "none.txt", 2))
    with pytest.raises(LayerError, match="batch_size must be positive"):
        make_layer(h5_text(source, 0))
    write_h5(tmp_path / "bad.h5", data=np.zeros((3, 2)), label=np.zeros(2))
    (tmp_path / "bad.txt").write_text(str(tmp_path / "bad.h5"))
    with pytest.raises(LayerError, match="differ in length"):
        make_layer(h5_text(tmp_path / "bad.txt", 1))
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(LayerError, match=r"pip install minicaffe\[hdf5\]"):
        make_layer(h5_text(source, 2))


# -- ImageData ---------------------------------------------------------------------------
@pytest.fixture
def image_dir(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(6)
    rgb = rng.integers(0, 256, size=(4, 5, 6, 3)).astype(np.uint8)  # N, H, W, RGB
    (tmp_path / "imgs").mkdir()
    lines = []
    for i, img in enumerate(rgb):
        Image.fromarray(img).save(tmp_path / "imgs" / f"im {i}.png")
        lines.append(f"im {i}.png {i * 3}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return tmp_path, rgb


def image_text(tmp_path, batch, extra="", transform=""):
    return (f'name: "i" type: "ImageData" top: "data" top: "label" transform_param {{ {transform} }} '
            f'image_data_param {{ source: "{tmp_path / "list.txt"}" root_folder: "{tmp_path / "imgs"}" '
            f'batch_size: {batch} {extra} }}')


def test_image_data_reads_bgr_in_list_order(image_dir):
    tmp_path, rgb = image_dir
    layer, top = make_layer(image_text(tmp_path, 3))
    assert top[0].shape == (3, 3, 5, 6)
    outs = run(layer, top, 2)
    bgr = rgb[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32)
    np.testing.assert_array_equal(outs[0][0], bgr[:3])
    np.testing.assert_array_equal(outs[1][0], bgr[[3, 0, 1]])
    np.testing.assert_array_equal(outs[1][1], [9, 0, 3])
    layer.close()


def test_image_data_gray_resize_and_transform(image_dir):
    tmp_path, rgb = image_dir
    layer, top = make_layer(image_text(tmp_path, 2, "is_color: false new_height: 8 new_width: 4",
                                       "crop_size: 4 scale: 0.5"), phase=TEST)
    assert top[0].shape == (2, 1, 4, 4)
    (d, l), = run(layer, top, 1)
    assert d.dtype == np.float32 and d.max() <= 127.5
    layer.close()


def test_image_data_shuffle_is_seeded(image_dir):
    tmp_path, _ = image_dir
    seqs = []
    for _ in range(2):
        set_random_seed(3)
        layer, top = make_layer(image_text(tmp_path, 4, "shuffle: true"))
        seqs.append(np.concatenate([l for _, l in run(layer, top, 3)]))
        layer.close()
    np.testing.assert_array_equal(seqs[0], seqs[1])
    for epoch in seqs[0].reshape(3, 4):
        assert sorted(epoch.tolist()) == [0, 3, 6, 9]


def test_image_data_errors(image_dir):
    tmp_path, _ = image_dir
    with pytest.raises(LayerError, match="new_height and new_width together"):
        make_layer(image_text(tmp_path, 1, "new_height: 4"))
    with pytest.raises(LayerError, match="crop_size 6 is larger than the 5x6"):
        make_layer(image_text(tmp_path, 1, transform="crop_size: 6"))
    (tmp_path / "list.txt").write_text("missing.png 1\n")
    with pytest.raises(LayerError, match="could not load image"):
        make_layer(image_text(tmp_path, 1))
    (tmp_path / "list.txt").write_text("no_label_here\n")
    with pytest.raises(LayerError, match="should read 'path label'"):
        make_layer(image_text(tmp_path, 1))


def test_image_data_without_pillow(image_dir, monkeypatch):
    tmp_path, _ = image_dir
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(LayerError, match=r"needs Pillow: pip install minicaffe\[image\]"):
        make_layer(image_text(tmp_path, 1))


def test_image_data_mixed_sizes_need_resizing(image_dir):
    Image = pytest.importorskip("PIL.Image")
    tmp_path, _ = image_dir
    Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(tmp_path / "imgs" / "big.png")
    (tmp_path / "list.txt").write_text("im 0.png 0\nbig.png 1\n")
    layer, top = make_layer(image_text(tmp_path, 2))
    with pytest.raises(LayerError, match="set image_data_param new_height/new_width"):
        layer.forward([], top)
    layer.close()


def test_leveldb_writer_creates_missing_parent_folders(tmp_path):
    pytest.importorskip("plyvel")
    from minicaffe import db
    path = tmp_path / "new" / "nested" / "db_leveldb"
    with db.open_writer(str(path), backend="leveldb") as writer:
        writer.put("00000000", b"x")
    assert path.is_dir()
