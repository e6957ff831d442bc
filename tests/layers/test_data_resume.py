"""Data layer positions saved with snapshots: a restored layer serves exactly the next batches."""
import json

import numpy as np
import pytest

from minicaffe.layer import LayerError

from .test_data import data_text, make_layer, run, small_db  # noqa: F401


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
