"""Net(..., inference=True): blobs share buffers once dead, and outputs stay exactly the plain net's."""
import importlib
import pathlib

import numpy as np
import pytest

import minicaffe
from minicaffe.memory_plan import share_dead_buffers

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "models"

# Every kind of memory sharing a planner must respect: in place (ReLU, Dropout), views of a
# bottom (Flatten, Reshape), Split fan-out (conv1 feeds two branches), Concat, Slice, Eltwise.
BRANCHY = """
name: "branchy"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 12 dim: 12 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 }
                            bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "a" type: "Convolution" bottom: "conv1" top: "a"
        convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "b" type: "Pooling" bottom: "conv1" top: "b" pooling_param { pool: MAX kernel_size: 3 stride: 1 pad: 1 } }
layer { name: "slice" type: "Slice" bottom: "b" top: "b1" top: "b2" slice_param { slice_point: 4 } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b1" top: "sum" eltwise_param { coeff: 1 coeff: -0.5 } }
layer { name: "cat" type: "Concat" bottom: "sum" bottom: "b2" top: "cat" }
layer { name: "drop" type: "Dropout" bottom: "cat" top: "cat" }
layer { name: "pool" type: "Pooling" bottom: "cat" top: "pool" pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "flat" type: "Flatten" bottom: "pool" top: "flat" }
layer { name: "ip" type: "InnerProduct" bottom: "flat" top: "ip"
        inner_product_param { num_output: 10 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "shape" type: "Reshape" bottom: "ip" top: "ip2" reshape_param { shape { dim: 0 dim: 2 dim: 5 } } }
layer { name: "prob" type: "Softmax" bottom: "ip2" top: "prob" softmax_param { axis: 2 } }
"""


def _randomize(net, seed=0):
    rng = np.random.default_rng(seed)
    for name, blobs in net.params.items():
        for blob in blobs:
            if net.layer_dict[name].type == "BatchNorm":
                blob.data[...] = 1.0
            else:
                blob.data[...] = rng.normal(0, 0.05, blob.shape)


def _pair(tmp_path, model, batch=None, **kwargs):
    plain = minicaffe.Net(str(model), minicaffe.TEST)
    _randomize(plain)
    lean = minicaffe.Net(str(model), minicaffe.TEST, inference=True, **kwargs)
    for name, blobs in plain.params.items():
        for mine, theirs in zip(lean.params[name], blobs):
            mine.data[...] = theirs.data
    lean.fold_params()
    data = plain.inputs[0]
    shape = plain.blobs[data].shape if batch is None else (batch,) + plain.blobs[data].shape[1:]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    return plain, lean, {data: x}


def _distinct_buffers(net):
    return len({id(blob._data) for blob in net.blobs.values()})


def test_branchy_net_outputs_equal_and_buffers_are_shared(tmp_path):
    model = tmp_path / "branchy.prototxt"
    model.write_text(BRANCHY)
    plain, lean, feed = _pair(tmp_path, model)
    expected = plain.forward(**feed)["prob"].copy()
    for _ in range(2):   # the second pass runs on buffers dirtied by the first
        np.testing.assert_array_equal(lean.forward(**feed)["prob"], expected)
    assert _distinct_buffers(lean) < _distinct_buffers(plain)


def test_kept_blob_stays_readable(tmp_path):
    model = tmp_path / "branchy.prototxt"
    model.write_text(BRANCHY)
    plain, lean, feed = _pair(tmp_path, model, keep_blobs=["sum"])
    plain.forward(**feed)
    out = lean.forward(blobs=["sum"], **feed)
    np.testing.assert_array_equal(out["sum"], plain.blobs["sum"].data)
    np.testing.assert_array_equal(lean.blobs["data"].data, feed["data"])   # inputs are kept too


@pytest.mark.parametrize("model, batch", [
    ("bench/squeezenet_v1.1_deploy.prototxt", 1),
    ("bench/mobilenet_v1_deploy.prototxt", 1),
    ("bench/googlenet_deploy.prototxt", 1),
])
def test_deploy_nets_match_the_plain_net(tmp_path, model, batch):
    path = SHARED / model
    if not path.exists():
        pytest.skip(f"{path} not found")
    plain, lean, feed = _pair(tmp_path, path, batch=batch)
    expected = {k: v.copy() for k, v in plain.forward(**feed).items()}
    for _ in range(2):
        got = lean.forward(**feed)
        for name, value in expected.items():   # folded BatchNorm/Scale round differently
            np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-4 * np.abs(value).max())
    assert _distinct_buffers(lean) * 3 < _distinct_buffers(plain)


def test_inference_net_refuses_backward_and_unkept_blobs(tmp_path):
    model = tmp_path / "branchy.prototxt"
    model.write_text(BRANCHY)
    _, lean, feed = _pair(tmp_path, model)
    with pytest.raises(RuntimeError, match="inference=True.*no backward pass"):
        lean.backward()
    with pytest.raises(KeyError, match="'conv1'.*keep_blobs"):
        lean.forward(blobs=["conv1"], **feed)
    with pytest.raises(KeyError, match="no blob named 'nope'"):
        minicaffe.Net(str(model), minicaffe.TEST, inference=True, keep_blobs=["nope"])
    with pytest.raises(ValueError, match="only applies to .*inference=True"):
        minicaffe.Net(str(model), minicaffe.TEST, keep_blobs=["sum"])


def test_planner_never_gives_overlapping_lifetimes_one_buffer():
    """A chain a -> b -> c -> d: a and c may share, b and d may share, neighbours never."""
    from minicaffe.blob import Blob

    class _Layer:
        blobs = []

    a, b, c, d = (Blob((4, 5), name=n) for n in "abcd")
    layers = [_Layer(), _Layer(), _Layer()]
    bottoms, tops = [[a], [b], [c]], [[b], [c], [d]]
    buffers = share_dead_buffers(layers, bottoms, tops, keep_blobs=[d])
    assert not a.shares_data_with(b) and not b.shares_data_with(c)
    assert a.shares_data_with(c)
    assert buffers == 2        # a/c and b; d is kept with its own


def test_time_and_test_commands_take_inference(tmp_path, capsys):
    from minicaffe.cli import main

    model = tmp_path / "branchy.prototxt"
    model.write_text(BRANCHY)
    assert main(["time", "--model", str(model), "--phase", "TEST", "--iterations", "2", "--inference"]) == 0
    plain = minicaffe.Net(str(model), minicaffe.TEST)
    plain.save(str(tmp_path / "w.caffemodel"))
    assert main(["test", "--model", str(model), "--weights", str(tmp_path / "w.caffemodel"),
                 "--iterations", "2", "--inference"]) == 0


# Batch 1: each Concat's bottoms are consecutive runs of its top. "early" feeds the first Concat
# and a layer after it, so only "late" joins its top; "cat2"'s top "out" is an output (kept).
JOINED = """
name: "joined"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 9 dim: 8 } } }
layer { name: "early" type: "Convolution" bottom: "data" top: "early"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "late" type: "Convolution" bottom: "data" top: "late"
        convolution_param { num_output: 5 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu" type: "ReLU" bottom: "late" top: "late" }
layer { name: "cat1" type: "Concat" bottom: "early" bottom: "late" top: "cat1" }
layer { name: "reuse" type: "Pooling" bottom: "early" top: "reuse" pooling_param { pool: MAX kernel_size: 3 stride: 1 pad: 1 } }
layer { name: "a" type: "Convolution" bottom: "cat1" top: "a"
        convolution_param { num_output: 3 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "b" type: "Pooling" bottom: "cat1" top: "b" pooling_param { pool: AVE kernel_size: 3 stride: 1 pad: 1 } }
layer { name: "cat2" type: "Concat" bottom: "a" bottom: "b" bottom: "reuse" top: "out" }
"""


def _joined_net(tmp_path, **kwargs):
    model = tmp_path / "joined.prototxt"
    model.write_text(JOINED)
    return _pair(tmp_path, model, **kwargs)


def _sits_in(part, whole, offset):
    address = lambda a: a.__array_interface__["data"][0]   # noqa: E731
    return address(part) == address(whole) + offset * whole.itemsize


def test_concat_bottoms_are_planned_inside_the_top(tmp_path, monkeypatch):
    from minicaffe.blob import _Region

    plain, lean, feed = _joined_net(tmp_path)
    expected = plain.forward(**feed)["out"].copy()
    shape_module = importlib.import_module("minicaffe.layers.shape")
    copied = []
    real_copy = shape_module.copy_2d
    monkeypatch.setattr(shape_module, "copy_2d", lambda pairs: (copied.append(pairs), real_copy(pairs)))
    for _ in range(2):
        np.testing.assert_array_equal(lean.forward(**feed)["out"], expected)
    blobs = lean.blobs
    # "early" is read after cat1, so cat1 copies it (alone); "late" is written into cat1's top,
    # and cat2 writes into its (kept) output
    assert not isinstance(blobs["early"]._data, _Region)
    assert _sits_in(blobs["late"].data, blobs["cat1"].data, blobs["early"].count)
    assert [[src.size for _, src in pairs] for pairs in copied] == [[blobs["early"].count]] * 2
    out = blobs["out"].data
    assert _sits_in(blobs["a"].data, out, 0)
    assert _sits_in(blobs["b"].data, out, blobs["a"].count)
    assert _sits_in(blobs["reuse"].data, out, blobs["a"].count + blobs["b"].count)


def test_concat_without_a_late_reader_joins_and_copies_nothing(tmp_path, monkeypatch):
    text = JOINED.replace('bottom: "early" top: "reuse"', 'bottom: "cat1" top: "reuse"')
    model = tmp_path / "joined2.prototxt"
    model.write_text(text)
    plain, lean, feed = _pair(tmp_path, model)
    expected = plain.forward(**feed)["out"].copy()
    shape_module = importlib.import_module("minicaffe.layers.shape")   # (minicaffe.layers is pycaffe's L)
    calls = []
    monkeypatch.setattr(shape_module, "copy_2d", lambda pairs: calls.append(pairs))
    np.testing.assert_array_equal(lean.forward(**feed)["out"], expected)
    assert calls == []   # both Concats found their bottoms already in place
    cat1 = lean.blobs["cat1"].data
    assert _sits_in(lean.blobs["late"].data, cat1, lean.blobs["early"].count)


def test_joined_concat_after_a_reshape_moves_its_bottoms_out(tmp_path):
    """New input dimensions: the bottoms no longer tile the top, so they take buffers of their
    own (values and all) and the Concat copies again; outputs stay the plain net's."""
    plain, lean, feed = _joined_net(tmp_path)
    lean.forward(**feed)
    for shape in [(1, 3, 7, 11), (2, 3, 9, 8), (1, 3, 9, 8)]:
        x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
        expected = plain.forward(data=x)["out"].copy()
        np.testing.assert_array_equal(lean.forward(data=x)["out"], expected)


def test_joined_concat_keeps_named_bottoms_readable(tmp_path):
    plain, lean, feed = _joined_net(tmp_path, keep_blobs=["a"])
    plain.forward(**feed)
    got = lean.forward(blobs=["a"], **feed)
    np.testing.assert_array_equal(got["a"], plain.blobs["a"].data)
    np.testing.assert_array_equal(got["out"], plain.blobs["out"].data)


def test_region_family_moves_out_together_with_its_values():
    from minicaffe.blob import Blob, _Memory, _Region

    parent = _Memory(10, np.float32)
    parent.buf[:] = np.arange(10)
    family = []
    a, b = Blob((4,)), Blob((6,))
    a._data, b._data = _Region(parent, 0, 4, family), _Region(parent, 4, 6, family)
    b.data[0] = 40
    assert parent.buf[4] == 40
    a.reshape(5)   # a no longer fits its run: both move out
    assert b.data.tolist() == [40, 5, 6, 7, 8, 9] and a.data[:4].tolist() == [0, 1, 2, 3]
    b.data[0] = -1
    assert parent.buf[4] == 40   # b writes its own buffer now


def test_all_placed_needs_every_part_at_its_own_run():
    from minicaffe.blob import Blob, _Region
    from minicaffe.layers.shape import _all_placed

    def placed(offsets, sizes=(4, 6)):
        whole, family = Blob((10,)), []
        parts = [Blob((size,)) for size in sizes]
        for part, offset in zip(parts, offsets):
            if offset is not None:
                part._data = _Region(whole._data, offset, part.count, family)
        return parts, whole

    assert _all_placed(*placed((0, 4)))
    assert not _all_placed(*placed((0, None)))     # the second part has a buffer of its own
    assert not _all_placed(*placed((6, 0), (6, 4)))   # runs in the other order
    parts, whole = placed((0, 4))
    assert not _all_placed(parts, Blob((10,)))      # runs of another blob
    parts[0].reshape(5)                             # no longer fits: the family moves out
    assert not _all_placed(parts, whole)


# Batch 1: "slice" cuts "c" into two runs of it and is its last reader; "slice2" is not the last
# reader of "c2" (the Eltwise reads it later), so it copies.
SLICED = """
name: "sliced"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 7 dim: 6 } } }
layer { name: "c" type: "Convolution" bottom: "data" top: "c"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "slice" type: "Slice" bottom: "c" top: "s1" top: "s2" slice_param { slice_point: 2 } }
layer { name: "relu" type: "ReLU" bottom: "s1" top: "s1" }
layer { name: "d" type: "Convolution" bottom: "s2" top: "d"
        convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "c2" type: "Convolution" bottom: "s1" top: "c2"
        convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "slice2" type: "Slice" bottom: "c2" top: "t1" top: "t2" }
layer { name: "sum" type: "Eltwise" bottom: "t1" bottom: "d" top: "sum" }
layer { name: "sum2" type: "Eltwise" bottom: "t2" bottom: "sum" top: "sum2" }
layer { name: "cat" type: "Concat" bottom: "c2" bottom: "sum2" top: "out" }
"""


def test_slice_tops_are_planned_inside_the_bottom(tmp_path, monkeypatch):
    from minicaffe.blob import _Region

    model = tmp_path / "sliced.prototxt"
    model.write_text(SLICED)
    plain, lean, feed = _pair(tmp_path, model)
    expected = plain.forward(**feed)["out"].copy()
    shape_module = importlib.import_module("minicaffe.layers.shape")
    calls = []
    real_copy = shape_module.copy_2d
    monkeypatch.setattr(shape_module, "copy_2d", lambda pairs: (calls.append(len(pairs)), real_copy(pairs)))
    for _ in range(2):
        np.testing.assert_array_equal(lean.forward(**feed)["out"], expected)
    assert isinstance(lean.blobs["s1"]._data, _Region) and isinstance(lean.blobs["s2"]._data, _Region)
    assert not isinstance(lean.blobs["t1"]._data, _Region)   # c2 is read after slice2
    assert isinstance(lean.blobs["c2"]._data, _Region)      # cat is the last reader of c2 and sum2
    assert calls == [2, 2]   # only slice2 copies; slice and cat find their blobs in place
    # new input dimensions: the regions move out, the outputs stay the plain net's
    x = np.random.default_rng(5).standard_normal((2, 3, 5, 9)).astype(np.float32)
    np.testing.assert_array_equal(lean.forward(data=x)["out"], plain.forward(data=x)["out"])


def test_shufflenet_v2_inference_equals_the_plain_net(tmp_path, monkeypatch):
    path = SHARED / "forks" / "shufflenet_v2_1x_deploy.prototxt"
    if not path.exists():
        pytest.skip(f"{path} not found")
    from minicaffe.blob import _Region
    plain, lean, feed = _pair(tmp_path, path, batch=1)
    expected = {k: v.copy() for k, v in plain.forward(**feed).items()}
    shape_module = importlib.import_module("minicaffe.layers.shape")
    copied = []
    real_copy = shape_module.copy_2d
    monkeypatch.setattr(shape_module, "copy_2d", lambda pairs: (copied.extend(pairs), real_copy(pairs)))
    got = lean.forward(**feed)
    # each unit's Slice places both tops in its bottom, and its Concat copies the first one: the
    # identity half of a unit is copied once, its other half not at all
    slices = sum(layer.type == "Slice" for layer in lean.layers)
    assert len(copied) == slices
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-4 * np.abs(value).max())
    assert any(isinstance(b._data, _Region) for b in lean.blobs.values())
