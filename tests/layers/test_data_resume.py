"""Data layer positions saved with snapshots: a restored layer serves exactly the next batches."""
import json

import numpy as np
import pytest

from minicaffe.layer import LayerError
from minicaffe.rng import set_random_seed

from .test_data import (data_text, h5_files, h5_text, image_dir, image_text, make_layer,  # noqa: F401
                        run, small_db)


@pytest.mark.parametrize("prefetch", [3, 0])
def test_restored_data_layer_continues_batches_and_random_crops(small_db, prefetch):
    source, _, _ = small_db
    text = data_text(source, batch=2, extra=f"prefetch: {prefetch}",
                     transform="crop_size: 2 mirror: true")
    layer, top = make_layer(text)
    run(layer, top, 2)                                  # the prefetch thread has run further
    state = json.loads(json.dumps(layer.snapshot_state()))   # as it travels through the file
    expected = run(layer, top, 4)                       # wraps around the 5 records
    other, other_top = make_layer(text)
    run(other, other_top, 1)                            # somewhere else, then restored
    other.restore_state(state)
    for (data, label), (want_data, want_label) in zip(run(other, other_top, 4), expected):
        np.testing.assert_array_equal(data, want_data)
        np.testing.assert_array_equal(label, want_label)
    layer.close()
    other.close()


def test_a_position_missing_from_the_database_is_one_error(small_db):
    source, _, _ = small_db
    layer, top = make_layer(data_text(source))
    state = layer.snapshot_state()
    state["key"] = b"nope".hex()
    with pytest.raises(LayerError, match="has no record with key b'nope' to resume from"):
        layer.restore_state(state)
    run(layer, top, 1)          # still serves batches after the refused restore
    layer.close()


def test_restored_image_data_continues_shuffled_epochs(image_dir):
    tmp_path, _ = image_dir
    text = image_text(tmp_path, 3, "shuffle: true", "crop_size: 4 mirror: true")
    set_random_seed(3)
    layer, top = make_layer(text)
    run(layer, top, 3)                                   # 9 images: past two reshuffles
    state = json.loads(json.dumps(layer.snapshot_state()))
    assert state["shuffles"] >= 2 and "first_rng" in state
    expected = run(layer, top, 4)
    set_random_seed(99)                                  # another run's generator
    other, other_top = make_layer(text)
    other.restore_state(state)
    for (data, label), (want_data, want_label) in zip(run(other, other_top, 4), expected):
        np.testing.assert_array_equal(data, want_data)
        np.testing.assert_array_equal(label, want_label)
    state["count"] = 7
    with pytest.raises(LayerError, match="a list of 7 images, this one has 4"):
        other.restore_state(state)
    layer.close()
    other.close()


def test_restored_hdf5_data_continues_shuffled_files_and_rows(h5_files):
    pytest.importorskip("h5py", reason="HDF5Data needs h5py")
    source, _, _ = h5_files
    set_random_seed(4)
    layer, top = make_layer(h5_text(source, 3, "shuffle: true"))
    run(layer, top, 4)                                  # 12 rows: into the second pass
    state = json.loads(json.dumps(layer.snapshot_state()))
    expected = run(layer, top, 5)
    set_random_seed(5)
    other, other_top = make_layer(h5_text(source, 3, "shuffle: true"))
    run(other, other_top, 1)
    other.restore_state(state)
    for (data, label), (want_data, want_label) in zip(run(other, other_top, 5), expected):
        np.testing.assert_array_equal(data, want_data)
        np.testing.assert_array_equal(label, want_label)
    state["files"] = 3
    with pytest.raises(LayerError, match="the saved position is for 3 files"):
        other.restore_state(state)
