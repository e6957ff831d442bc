"""The shared thread pool (minicaffe.threads) and the layers that split their work over it.

Layer results at 2 threads, with the split threshold patched down so that small arrays split
into many blocks, must equal the 1-thread results bitwise (elementwise layers) or to 1e-6
(Softmax's reductions), forward and backward, in place too.
"""
import os
import threading
import time

import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe import Blob, create_layer, set_random_seed, threads
from minicaffe.proto import caffe_pb2


@pytest.fixture
def pool(monkeypatch):
    """Splits anything of 16+ elements, up to 4 blocks per thread; the thread count is restored
    afterwards."""
    monkeypatch.setattr(threads, "MIN_PARALLEL_ELEMENTS", 16)
    monkeypatch.setattr(threads, "BLOCKS_PER_THREAD", 4)
    before = threads.get_num_threads()
    yield threads
    threads.set_num_threads(before)


# --- the pool ---------------------------------------------------------------------------------

@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 1000])
def test_parallel_for_covers_the_range_once(pool, count, n):
    pool.set_num_threads(count)
    hits = np.zeros(n, dtype=np.int64)
    blocks = []

    def fn(lo, hi):
        blocks.append((lo, hi))
        hits[lo:hi] += 1

    pool.parallel_for(n, fn, 10)
    assert (hits == 1).all()
    assert all(lo < hi for lo, hi in blocks) or n == 0


def test_workers_take_blocks_while_the_caller_is_busy(pool):
    pool.set_num_threads(2)
    names = set()

    def fn(lo, hi):
        names.add(threading.current_thread().name)
        if lo == 0:
            time.sleep(0.05)   # the caller is held up, so the worker takes the other blocks

    pool.parallel_for(8, fn, 100)
    assert names == {threading.main_thread().name, "minicaffe-1"}


@pytest.mark.parametrize("failing_block", [0, 5])
def test_an_exception_in_any_block_reaches_the_caller(pool, failing_block):
    pool.set_num_threads(2)
    done = []

    def fn(lo, hi):
        if lo == failing_block:
            raise KeyError("boom")
        time.sleep(0.002)
        done.append(lo)

    with pytest.raises(KeyError, match="boom"):
        pool.parallel_for(8, fn, 100)
    assert len(done) == 7   # the other blocks still ran to the end
    pool.parallel_for(8, lambda lo, hi: None, 100)   # and the pool still works


def test_nested_calls_run_inline_in_workers(pool):
    pool.set_num_threads(2)
    hits = np.zeros((8, 8), dtype=np.int64)

    def row(lo, hi):
        for r in range(lo, hi):
            pool.parallel_for(8, lambda a, b, r=r: hits[r, a:b].__iadd__(1), 100)

    pool.parallel_for(8, row, 1000)
    assert (hits == 1).all()


def test_two_callers_at_once(pool):
    pool.set_num_threads(2)
    outs = [np.zeros(10000, dtype=np.float32) for _ in range(2)]

    def caller(out):
        for _ in range(50):
            pool.map_flat(lambda y: np.add(y, 1, out=y), out)

    others = [threading.Thread(target=caller, args=(out,)) for out in outs]
    for t in others:
        t.start()
    for t in others:
        t.join()
    assert all((out == 50).all() for out in outs)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_a_pool_of_its_own(pool):
    pool.set_num_threads(2)
    pool.parallel_for(8, lambda lo, hi: None, 100)   # the parent's worker exists
    pid = os.fork()
    if pid == 0:
        try:
            y = np.zeros(1000, dtype=np.float32)
            pool.map_flat(lambda a: np.add(a, 1, out=a), y)
            os._exit(0 if (y == 1).all() else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_thread_count_from_the_environment(monkeypatch):
    before = threads.get_num_threads()
    try:
        monkeypatch.setenv("MINICAFFE_THREADS", "3")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        threads._num_threads = None
        assert threads.get_num_threads() == 3
        monkeypatch.delenv("MINICAFFE_THREADS")
        threads._num_threads = None
        assert threads.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "two")
        threads._num_threads = None
        with pytest.raises(ValueError, match="OMP_NUM_THREADS='two' is not a thread count"):
            threads.get_num_threads()
    finally:
        threads.set_num_threads(before)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_set_num_threads_refuses_bad_counts(bad):
    with pytest.raises(ValueError, match="thread count must be a positive integer"):
        threads.set_num_threads(bad)


def test_map_flat_refuses_mismatched_sizes():
    with pytest.raises(ValueError, match="one size"):
        threads.map_flat(np.copyto, np.zeros(3), np.zeros(4))


def test_map_flat_runs_non_contiguous_arrays_whole(pool):
    pool.set_num_threads(2)
    x = np.arange(200.0).reshape(10, 20)[:, ::2]
    y = np.zeros_like(x)
    pool.map_flat(lambda a, b: np.negative(a, out=b), x, y)
    assert (y == -x).all()


@pytest.mark.parametrize("shape", [(4, 3, 50), (1, 5, 300), (7, 1, 1)])
def test_map_positions_keeps_channels_whole(pool, shape):
    pool.set_num_threads(2)
    x = np.random.default_rng(0).normal(size=shape)
    y = np.empty_like(x)
    pool.map_positions(lambda a, b: np.subtract(a, a.sum(axis=1, keepdims=True), out=b), x, y)
    np.testing.assert_allclose(y, x - x.sum(axis=1, keepdims=True), rtol=1e-12)


def test_copy_2d_splits_columns(pool):
    pool.set_num_threads(2)
    src = [np.random.default_rng(i).normal(size=(1, n)) for i, n in enumerate([500, 3, 70])]
    dst = np.zeros((1, 573))
    pool.copy_2d([(dst[:, :500], src[0]), (dst[:, 500:503], src[1]), (dst[:, 503:], src[2])])
    assert (dst == np.concatenate(src, axis=1)).all()


# --- the layers: 2 threads against 1 ----------------------------------------------------------

def make_layer(text, phase=caffe_pb2.TRAIN):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    param.name = param.name or "layer"
    return create_layer(param, phase)


def run_layer(text, shapes, count, in_place=False, phase=caffe_pb2.TRAIN, down=None):
    """Forward and backward at `count` threads; returns the tops' data and the bottoms' diffs."""
    threads.set_num_threads(count)
    set_random_seed(3)
    layer = make_layer(text, phase)
    rng = np.random.default_rng(0)
    bottom = []
    for shape in shapes:
        b = Blob(shape, dtype=np.float32)
        b.data[...] = rng.uniform(-2, 2, shape)
        bottom.append(b)
    top = bottom[:1] if in_place else [Blob((), dtype=np.float32) for _ in range(layer_tops(text))]
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    datas = [t.data.copy() for t in top]
    for t in top:
        t.diff[...] = rng.uniform(-1, 1, t.shape)
    layer.backward(top, down or [True] * len(bottom), bottom)
    return datas, [b.diff.copy() for b in bottom]


def layer_tops(text):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    return max(1, len(param.top))


ELEMENTWISE = {
    "relu": ('type: "ReLU"', [(4, 3, 5, 7)]),
    "leaky_relu": ('type: "ReLU" relu_param { negative_slope: 0.1 }', [(4, 3, 5, 7)]),
    "negative_slope_relu": ('type: "ReLU" relu_param { negative_slope: -0.5 }', [(2, 3, 31)]),
    "sigmoid": ('type: "Sigmoid"', [(3, 5, 11)]),
    "tanh": ('type: "TanH"', [(3, 5, 11)]),
    "dropout": ('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', [(6, 97)]),
    "elu": ('type: "ELU" elu_param { alpha: 0.7 }', [(3, 5, 11)]),
    "elu_negative_alpha": ('type: "ELU" elu_param { alpha: -0.5 }', [(3, 5, 11)]),
    "clip": ('type: "Clip" clip_param { min: -0.5 max: 1.2 }', [(3, 5, 11)]),
    "swish": ('type: "Swish" swish_param { beta: 1.5 }', [(3, 5, 11)]),
    "eltwise_sum": ('type: "Eltwise"', [(2, 3, 8, 9)] * 3),
    "eltwise_coeff": ('type: "Eltwise" eltwise_param { operation: SUM coeff: 2 coeff: -0.5 }',
                      [(2, 3, 8, 9)] * 2),
    "eltwise_prod": ('type: "Eltwise" eltwise_param { operation: PROD }', [(2, 3, 8, 9)] * 3),
    "eltwise_prod_quotient": ('type: "Eltwise" eltwise_param { operation: PROD '
                              'stable_prod_grad: false }', [(2, 3, 8, 9)] * 2),
    "eltwise_max": ('type: "Eltwise" eltwise_param { operation: MAX }', [(2, 3, 8, 9)] * 3),
    "concat": ('type: "Concat"', [(2, 3, 8, 9), (2, 5, 8, 9), (2, 1, 8, 9)]),
    "concat_batch_1": ('type: "Concat"', [(1, 64, 6, 6), (1, 3, 6, 6)]),
    "concat_axis_0": ('type: "Concat" concat_param { axis: 0 }', [(2, 3, 8), (5, 3, 8)]),
    "concat_last_axis": ('type: "Concat" concat_param { axis: -1 }', [(4, 3, 8), (4, 3, 50)]),
    "slice": ('type: "Slice" top: "a" top: "b" top: "c" slice_param { slice_point: 2 '
              'slice_point: 7 }', [(3, 9, 5, 4)]),
    "slice_axis_2": ('type: "Slice" top: "a" top: "b" slice_param { axis: 2 }', [(1, 2, 60, 3)]),
    "split": ('type: "Split" top: "a" top: "b" top: "c"', [(3, 4, 25)]),
}

IN_PLACE = ["relu", "leaky_relu", "negative_slope_relu", "sigmoid", "tanh", "dropout", "elu",
            "elu_negative_alpha", "clip", "swish"]


@pytest.mark.parametrize("case", sorted(ELEMENTWISE))
def test_elementwise_layers_equal_at_two_threads(pool, case):
    text, shapes = ELEMENTWISE[case]
    one = run_layer(text, shapes, 1)
    two = run_layer(text, shapes, 2)
    for a, b in zip(one[0] + one[1], two[0] + two[1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", IN_PLACE)
def test_in_place_layers_equal_at_two_threads(pool, case):
    text, shapes = ELEMENTWISE[case]
    plain = run_layer(text, shapes, 1)
    one = run_layer(text, shapes, 1, in_place=True)
    two = run_layer(text, shapes, 2, in_place=True)
    for a, b, c in zip(plain[0] + plain[1], one[0] + one[1], two[0] + two[1]):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_dropout_test_phase_copies_at_two_threads(pool):
    text, shapes = ELEMENTWISE["dropout"]
    one = run_layer(text, shapes, 1, phase=caffe_pb2.TEST)
    two = run_layer(text, shapes, 2, phase=caffe_pb2.TEST)
    for a, b in zip(one[0] + one[1], two[0] + two[1]):
        np.testing.assert_array_equal(a, b)


def test_eltwise_backward_to_some_bottoms(pool):
    text, shapes = ELEMENTWISE["eltwise_max"]
    one = run_layer(text, shapes, 1, down=[True, False, True])
    two = run_layer(text, shapes, 2, down=[True, False, True])
    for k in (0, 2):
        np.testing.assert_array_equal(one[1][k], two[1][k])


SOFTMAX = {
    "softmax": ('type: "Softmax"', [(6, 10, 3, 4)]),
    "softmax_batch_1": ('type: "Softmax"', [(1, 21, 20, 30)]),
    "softmax_axis_2": ('type: "Softmax" softmax_param { axis: 2 }', [(2, 3, 17, 5)]),
    "softmax_classes": ('type: "Softmax"', [(40, 1000)]),
}


@pytest.mark.parametrize("case", sorted(SOFTMAX))
@pytest.mark.parametrize("in_place", [False, True])
def test_softmax_close_at_two_threads(pool, case, in_place):
    text, shapes = SOFTMAX[case]
    one = run_layer(text, shapes, 1, in_place=in_place)
    two = run_layer(text, shapes, 2, in_place=in_place)
    for a, b in zip(one[0] + one[1], two[0] + two[1]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("shape,ignore", [((64, 10), ""), ((1, 21, 20, 30), "ignore_label: 3")])
def test_softmax_with_loss_close_at_two_threads(pool, shape, ignore):
    text = f'type: "SoftmaxWithLoss" loss_param {{ {ignore} }}'
    labels = (shape[0],) + shape[2:]
    results = []
    for count in (1, 2):
        threads.set_num_threads(count)
        layer = make_layer(text)
        rng = np.random.default_rng(0)
        scores = Blob(shape, dtype=np.float32)
        scores.data[...] = rng.normal(0, 3, shape)
        label = Blob(labels, dtype=np.float32)
        label.data[...] = rng.integers(0, shape[1], labels)
        loss = Blob((), dtype=np.float32)
        layer.setup([scores, label], [loss])
        layer.forward([scores, label], [loss])
        loss.diff[...] = 1
        layer.backward([loss], [True, False], [scores, label])
        results.append((loss.data.copy(), scores.diff.copy()))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)


# --- the CLI ----------------------------------------------------------------------------------

TINY_NET = """
layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "relu" type: "ReLU" bottom: "x" top: "y" }
"""


@pytest.mark.parametrize("command", ["time", "test"])
def test_threads_flag_sets_the_pool(tmp_path, capsys, command):
    from minicaffe.cli import main
    model = tmp_path / "net.prototxt"
    model.write_text(TINY_NET)
    extra = ["--weights", str(tmp_path / "w.caffemodel")] if command == "test" else []
    if extra:
        from minicaffe import Net
        Net(str(model), caffe_pb2.TEST).save(extra[1])
    before = threads.get_num_threads()
    try:
        status = main([command, "--model", str(model), "--iterations", "1", "--threads", "3",
                       *extra])
        assert status == 0
        assert threads.get_num_threads() == 3
        assert "Using 3 thread(s) for memory-bound layers." in capsys.readouterr().err
        assert main([command, "--model", str(model), "-threads", "0", *extra]) == 1
        assert "--threads must be at least 1, got 0" in capsys.readouterr().err
    finally:
        threads.set_num_threads(before)


# --- BLAS environment defaults (minicaffe/_blas_env.py) ------------------------------------------
@pytest.mark.parametrize("given, expected", [(None, "18"), ("7", "7")])
def test_openblas_thread_timeout_default_precedes_numpy(given, expected):
    """Importing minicaffe first sets OPENBLAS_THREAD_TIMEOUT before numpy loads OpenBLAS; a value
    the user set is kept."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if given is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = given
    code = ("import sys, os, minicaffe; "
            "print(os.environ['OPENBLAS_THREAD_TIMEOUT'], 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [expected, "True"]
    # ...and the package sets it before anything imports numpy
    code = ("import sys, builtins; real = builtins.__import__; seen = []\n"
            "def spy(name, *a, **k):\n"
            "    if name == 'numpy' and not seen: seen.append(__import__('os').environ.get('OPENBLAS_THREAD_TIMEOUT'))\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = spy\nimport minicaffe\nprint(seen[0])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
