"""TRAIN data layers built as solver r of N read disjoint shares covering every record of an epoch.

Runs in one process: pycaffe's set_solver_count/set_solver_rank set what MPI's init sets.
"""
import numpy as np
import pytest
from google.protobuf import text_format

import minicaffe
from minicaffe.blob import Blob
from minicaffe.db import array_to_datum, open_writer
from minicaffe.layer_factory import create_layer
from minicaffe.proto import caffe_pb2

N_RECORDS, BATCH = 24, 2


@pytest.fixture
def solvers():
    def as_rank(rank, count):
        minicaffe.set_solver_count(count)
        minicaffe.set_solver_rank(rank)
    yield as_rank
    as_rank(0, 1)


def build(text, ntop=2, phase=caffe_pb2.TRAIN):
    layer = create_layer(text_format.Parse(text, caffe_pb2.LayerParameter()), phase)
    top = [Blob((), np.float32) for _ in range(ntop)]
    layer.setup([], top)
    return layer, top


def epoch_labels(layer, top, n_batches):
    seen = []
    for _ in range(n_batches):
        layer.forward([], top)
        seen += top[1].data.ravel().astype(int).tolist()
    if hasattr(layer, "close"):
        layer.close()
    return seen


def check_partition(read_by_rank, count):
    everything = sorted(sum(read_by_rank, []))
    assert everything == list(range(N_RECORDS))        # each record read exactly once
    assert all(len(r) == N_RECORDS // count for r in read_by_rank)


@pytest.mark.parametrize("count", [2, 3])
def test_data_layer_shards_lmdb(tmp_path, solvers, count):
    pytest.importorskip("lmdb", reason="the Data layer test writes an LMDB")
    with open_writer(str(tmp_path / "db")) as db:
        for i in range(N_RECORDS):   # the label is the record's index
            db.put(b"%08d" % i, array_to_datum(np.full((1, 2, 2), i, np.uint8), i).SerializeToString())
    text = f'name: "d" type: "Data" top: "data" top: "label" data_param {{ source: "{tmp_path / "db"}" ' \
           f'batch_size: {BATCH} backend: LMDB }}'
    read = []
    for rank in range(count):
        solvers(rank, count)
        layer, top = build(text)
        labels = epoch_labels(layer, top, N_RECORDS // count // BATCH)
        assert labels == list(range(rank, N_RECORDS, count))   # Caffe's order: r, r+N, r+2N, ...
        read.append(labels)
    check_partition(read, count)


def test_data_layer_test_phase_reads_everything(tmp_path, solvers):
    pytest.importorskip("lmdb", reason="the Data layer test writes an LMDB")
    with open_writer(str(tmp_path / "db")) as db:
        for i in range(N_RECORDS):
            db.put(b"%08d" % i, array_to_datum(np.zeros((1, 2, 2), np.uint8), i).SerializeToString())
    solvers(1, 2)
    layer, top = build(f'name: "d" type: "Data" top: "data" top: "label" data_param {{ source: '
                       f'"{tmp_path / "db"}" batch_size: {BATCH} backend: LMDB }}',
                       phase=caffe_pb2.TEST)
    assert epoch_labels(layer, top, N_RECORDS // BATCH) == list(range(N_RECORDS))


@pytest.mark.parametrize("shuffle", [False, True])
def test_hdf5_data_shards_rows(tmp_path, solvers, shuffle):
    h5py = pytest.importorskip("h5py", reason="HDF5Data needs h5py")
    for f in range(2):
        with h5py.File(tmp_path / f"part{f}.h5", "w") as h:
            rows = np.arange(f * 12, (f + 1) * 12, dtype=np.float32)
            h["data"] = rows.reshape(-1, 1)
            h["label"] = rows
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'part0.h5'}\n{tmp_path / 'part1.h5'}\n")
    text = f'name: "h" type: "HDF5Data" top: "data" top: "label" hdf5_data_param {{ source: ' \
           f'"{tmp_path / "list.txt"}" batch_size: {BATCH} shuffle: {str(shuffle).lower()} }}'
    read = []
    for rank in range(2):
        solvers(rank, 2)
        minicaffe.set_random_seed(rank)   # ranks' shuffles differ; the shares must not
        layer, top = build(text)
        read.append(epoch_labels(layer, top, N_RECORDS // 2 // BATCH))
    check_partition(read, 2)


def test_memory_data_shards_rows(solvers):
    data = np.arange(N_RECORDS, dtype=np.float32).reshape(-1, 1, 1, 1)
    read = []
    for rank in range(2):
        solvers(rank, 2)
        layer, top = build(f'name: "m" type: "MemoryData" top: "data" top: "label" memory_data_param '
                           f'{{ batch_size: {BATCH} channels: 1 height: 1 width: 1 }}')
        layer.set_input_arrays(data, data.ravel())
        read.append(epoch_labels(layer, top, N_RECORDS // 2 // BATCH))
    check_partition(read, 2)


def test_image_data_shards_the_list(tmp_path, solvers):
    pytest.importorskip("PIL", reason="ImageData needs Pillow")
    from PIL import Image
    lines = []
    for i in range(N_RECORDS):
        Image.fromarray(np.full((2, 2, 3), i, np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png {i}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    read = []
    for rank in range(2):
        solvers(rank, 2)
        minicaffe.set_random_seed(10 + rank)
        layer, top = build(f'name: "i" type: "ImageData" top: "data" top: "label" image_data_param {{ '
                           f'source: "{tmp_path / "list.txt"}" root_folder: "{tmp_path}/" '
                           f'batch_size: {BATCH} shuffle: true }}')
        read.append(epoch_labels(layer, top, N_RECORDS // 2 // BATCH))
    check_partition(read, 2)


def test_too_few_records_for_the_solvers(solvers):
    solvers(0, 4)
    layer, _ = build('name: "m" type: "MemoryData" top: "data" top: "label" memory_data_param '
                     '{ batch_size: 1 channels: 1 height: 1 width: 1 }')
    with pytest.raises(Exception, match="fewer than the 4 data-parallel solvers"):
        layer.set_input_arrays(np.zeros((2, 1, 1, 1), np.float32), np.zeros(2, np.float32))


def test_nccl_points_at_mpi():
    with pytest.raises(minicaffe.parallel.ParallelError, match="mpirun"):
        minicaffe.NCCL(None, None)
