"""Divergence, debug_info, snapshot writing and exact resumes of the solver (in-process)."""
import errno
import json
import logging
import os
import re
import tempfile
import warnings

import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe import Layer, register_layer
from minicaffe import layer as layer_module
from minicaffe.proto import caffe_pb2
from minicaffe.solvers import get_solver
from minicaffe.solvers.base import DivergenceError, SnapshotError, SolverError

from .solver_helpers import DATASETS, SolverTestDataLayer, lsq_solver_param, make_dataset


@pytest.fixture(autouse=True)
def _data():
    make_dataset("lsq", 4, 6)
    yield
    DATASETS.pop("nan", None)


def _no_runtime_warnings():
    """A context in which a numpy RuntimeWarning would fail the test."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error", RuntimeWarning)
    return ctx


# -- divergence ----------------------------------------------------------------------------
def test_huge_learning_rate_stops_with_the_iteration_and_keeps_the_last_snapshot(tmp_path):
    prefix = str(tmp_path / "x")
    p = lsq_solver_param("SGD", base_lr=1e18, max_iter=20, snapshot=1, snapshot_prefix=prefix)
    p.base_lr = 0.01
    solver = get_solver(p)
    solver.step(2)                       # two good iterations and snapshots
    good = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    solver.param.base_lr = 1e18          # then the rate explodes
    ctx = _no_runtime_warnings()
    try:
        with pytest.raises(DivergenceError) as info:
            solver.step(10)
    finally:
        ctx.__exit__(None, None, None)
    message = str(info.value)
    m = re.match(r"training diverged at iteration (\d+): ", message)
    assert m, message
    bad_iter = int(m.group(1))
    assert bad_iter >= 2
    assert "Lower base_lr (now 1e+18)" in message
    assert f"{prefix}_iter_{bad_iter}.solverstate, was written before it" in message
    # nothing from the diverged iteration was written, the good snapshots are untouched
    assert not os.path.exists(f"{prefix}_iter_{bad_iter + 1}.caffemodel")
    for name, data in good.items():
        assert (tmp_path / name).read_bytes() == data


class RawTestData(SolverTestDataLayer):
    """SolverTestData without the custom-layer output checks (which would flag a NaN)."""

    check_io = False


@pytest.fixture
def raw_data_layer():
    register_layer("RawTestData")(RawTestData)
    yield
    layer_module._REGISTRY.pop("RawTestData", None)
    layer_module._SOURCES.pop("RawTestData", None)


def test_nan_input_names_the_data_layer_at_iteration_0(raw_data_layer):
    data, targets = make_dataset("nan", 4, 6)
    data[1, 2] = np.nan
    p = lsq_solver_param("SGD", max_iter=5)
    p.net_param.layer[0].type = "RawTestData"
    p.net_param.layer[0].hdf5_data_param.source = "nan"
    solver = get_solver(p)
    before = solver.net.params["innerprod"][0].data.copy()
    ctx = _no_runtime_warnings()
    try:
        with pytest.raises(DivergenceError) as info:
            solver.solve()
    finally:
        ctx.__exit__(None, None, None)
    message = str(info.value)
    assert message.startswith("training diverged at iteration 0: the loss is nan")
    assert ("the first non-finite values: layer 'data' (RawTestData) forward: top 'data' data "
            "has 1 non-finite value (of 24)") in message
    # the loss was caught before the update: the weights in memory are still the good ones
    np.testing.assert_array_equal(solver.net.params["innerprod"][0].data, before)


class NaNGradLayer(Layer):
    """top = bottom; the bottom diff it sends back is nan (a broken backward)."""

    exact_num_bottom = exact_num_top = 1

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = np.nan


def test_non_finite_gradient_names_the_layer_whose_backward_made_it():
    register_layer("NaNGradTest")(NaNGradLayer)
    try:
        p = lsq_solver_param("SGD", max_iter=5)
        loss = p.net_param.layer[2]
        loss.bottom[0] = "passed"
        p.net_param.layer.insert(2, text_format.Parse(
            "name: 'nangrad' type: 'NaNGradTest' bottom: 'innerprod' top: 'passed'",
            caffe_pb2.LayerParameter()))
        solver = get_solver(p)
        with pytest.raises(DivergenceError) as info:
            solver.step(3)
    finally:
        layer_module._REGISTRY.pop("NaNGradTest", None)
        layer_module._SOURCES.pop("NaNGradTest", None)
    message = str(info.value)
    assert message.startswith("training diverged at iteration 0: the update (lr = 0.1) made "
                              "parameters non-finite"), message
    assert ("layer 'nangrad' (NaNGradTest) backward: bottom 'innerprod' diff has 4 non-finite "
            "values (of 4)") in message


def test_the_finite_check_sees_any_single_bad_value():
    solver = get_solver(lsq_solver_param("SGD", max_iter=1))
    assert solver.net.params_finite()
    for bad in (np.inf, -np.inf, np.nan):
        w = solver.net.params["innerprod"][0].data
        saved = w[0, 3]
        w[0, 3] = bad
        assert not solver.net.params_finite()
        w[0, 3] = saved
    big = solver.net.params["innerprod"][1].data
    big[...] = np.finfo(np.float32).max     # huge but finite: not divergence
    assert solver.net.params_finite()


# -- debug_info ----------------------------------------------------------------------------
DEBUG_LINE = re.compile(
    r"^    \[(Forward|Backward|Update)\] (Layer \S+, (top blob|bottom blob|param blob|param) .*"
    r"|All net params \(data, diff\): L1 norm = \(\S+, \S+\); L2 norm = \(\S+, \S+\))$")


def _g(x):
    return f"{float(x):g}"


def test_debug_info_prints_caffes_lines_on_display_iterations(caplog):
    p = lsq_solver_param("SGD", max_iter=3, display=2, debug_info=True)
    solver = get_solver(p)
    with caplog.at_level(logging.INFO, logger="minicaffe"):
        solver.step(1)
    net = solver.net
    records = [r for r in caplog.records if r.name == "minicaffe.net"]
    lines = [r.getMessage() for r in records]
    assert all(DEBUG_LINE.match(line) for line in lines), lines
    mean_abs = lambda a: _g(np.float32(np.abs(a).sum(dtype=np.float32)) / np.float32(a.size))
    top = net.blobs["innerprod"]
    assert lines[:6] == [
        f"    [Forward] Layer data, top blob data data: {mean_abs(net.blobs['data'].data)}",
        f"    [Forward] Layer data, top blob targets data: {mean_abs(net.blobs['targets'].data)}",
        f"    [Forward] Layer innerprod, top blob innerprod data: {mean_abs(top.data)}",
        "    [Forward] Layer innerprod, param blob weights data: "
        f"{mean_abs(net.params['innerprod'][0].data + net.params['innerprod'][0].diff)}",
        "    [Forward] Layer innerprod, param blob bias data: "
        f"{mean_abs(net.params['innerprod'][1].data + net.params['innerprod'][1].diff)}",
        f"    [Forward] Layer loss, top blob loss data: {mean_abs(net.blobs['loss'].data)}",
    ]
    assert lines[6:9] == [
        f"    [Backward] Layer loss, bottom blob innerprod diff: {mean_abs(top.diff)}",
        "    [Backward] Layer innerprod, param blob 0 diff: "
        f"{_g(float(lines[7].rsplit(' ', 1)[1]))}",
        "    [Backward] Layer innerprod, param blob 1 diff: "
        f"{_g(float(lines[8].rsplit(' ', 1)[1]))}",
    ]
    norms = [r for r in records if "All net params" in r.getMessage()]
    assert len(norms) == 1 and norms[0].levelno == logging.ERROR   # Caffe logs it as an error
    update = [line for line in lines if "[Update]" in line]
    assert [line.split(" data:")[0] for line in update] == [
        "    [Update] Layer innerprod, param weights", "    [Update] Layer innerprod, param bias"]
    assert update[1].endswith(f"; diff: {mean_abs(net.params['innerprod'][1].diff)}")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="minicaffe"):
        solver.step(2)     # iteration 1 is not a display iteration, 2 is
    assert sum("[Forward] Layer loss" in r.getMessage() for r in caplog.records) == 1


def test_debug_info_update_lines_for_shared_params(caplog):
    p = lsq_solver_param("SGD", max_iter=1, display=1, debug_info=True, share=True)
    solver = get_solver(p)
    with caplog.at_level(logging.INFO, logger="minicaffe"):
        solver.step(1)
    update = [r.getMessage() for r in caplog.records if "[Update]" in r.getMessage()]
    assert [line.split(" diff:")[0].split(" data:")[0] for line in update] == [
        "    [Update] Layer innerprod2, param blob weights (owned by layer innerprod, "
        "param weights)",
        "    [Update] Layer innerprod2, param blob bias (owned by layer innerprod, param bias)",
        "    [Update] Layer innerprod, param weights",
        "    [Update] Layer innerprod, param bias"]


def test_without_debug_info_nothing_is_printed(caplog):
    solver = get_solver(lsq_solver_param("SGD", max_iter=1, display=1))
    with caplog.at_level(logging.INFO, logger="minicaffe"):
        solver.step(1)
    assert not [r for r in caplog.records if r.name == "minicaffe.net"]


# -- snapshot files ------------------------------------------------------------------------
def _listing(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("failing_call", [1, 2, 3])
def test_disk_full_names_the_file_and_keeps_the_previous_snapshot(tmp_path, monkeypatch,
                                                                  failing_call):
    prefix = str(tmp_path / "x")
    solver = get_solver(lsq_solver_param("SGD", max_iter=4, snapshot=2, snapshot_prefix=prefix))
    solver.step(2)
    before = {n: (tmp_path / n).read_bytes() for n in _listing(tmp_path)}
    assert len(before) == 3
    calls = []
    real_fsync = os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) == failing_call:   # the weights, the resume state, or the solverstate
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(SnapshotError) as info:
        solver.step(2)
    target = [f"{prefix}_iter_4.caffemodel", f"{prefix}_iter_4.solverstate.resume.json",
              f"{prefix}_iter_4.solverstate"][failing_call - 1]
    assert str(info.value) == (f"cannot write snapshot file {target}: No space left on device; "
                               f"the last complete snapshot is {prefix}_iter_2.solverstate")
    assert _listing(tmp_path) == sorted(before)      # no new files, no temporaries
    for name, data in before.items():
        assert (tmp_path / name).read_bytes() == data


def test_permission_error_names_the_file(tmp_path, monkeypatch):
    prefix = str(tmp_path / "x")
    solver = get_solver(lsq_solver_param("SGD", max_iter=1, snapshot=1, snapshot_prefix=prefix))

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/elsewhere/.tmp-123")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(SnapshotError, match=re.escape(
            f"cannot write snapshot file {prefix}_iter_1.caffemodel: Permission denied; "
            "no earlier snapshot of this run to keep")):
        solver.step(1)
    assert _listing(tmp_path) == []


def test_the_solverstate_is_renamed_last(tmp_path, monkeypatch):
    prefix = str(tmp_path / "x")
    solver = get_solver(lsq_solver_param("SGD", max_iter=1, snapshot=1, snapshot_prefix=prefix))
    renamed = []
    real_replace = os.replace

    def replace(src, dst):
        assert os.path.basename(src).startswith(".tmp-")
        renamed.append(os.path.basename(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    solver.step(1)
    assert renamed == ["x_iter_1.caffemodel", "x_iter_1.solverstate.resume.json",
                       "x_iter_1.solverstate"]


def test_stale_temporaries_of_the_prefix_are_removed_at_start(tmp_path, caplog):
    mine = [".tmp-k2j4h_1-x_iter_5.caffemodel", ".tmp-9a8b7c6d-x_iter_5.solverstate"]
    others = [".tmp-abcdefgh-other_iter_5.caffemodel", "x_iter_4.caffemodel", "notes.tmp-x"]
    for name in mine + others:
        (tmp_path / name).write_bytes(b"partial")
    with caplog.at_level(logging.INFO, logger="minicaffe"):
        get_solver(lsq_solver_param("SGD", max_iter=1, snapshot=1,
                                    snapshot_prefix=str(tmp_path / "x")))
    assert _listing(tmp_path) == sorted(others)
    assert f"Removed 2 temporary snapshot files left in {tmp_path}" in caplog.text


def test_writability_is_checked_by_creating_a_file(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "access", lambda *a, **k: True)    # as on some network filesystems
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(SolverError, match=re.escape(
            f"the directory {tmp_path} must exist and be writable (Read-only file system)")):
        get_solver(lsq_solver_param("SGD", max_iter=1, snapshot=1,
                                    snapshot_prefix=str(tmp_path / "x")))


# -- exact resume of the random state --------------------------------------------------------
DROPOUT = "name: 'drop' type: 'Dropout' bottom: 'data' top: 'data' dropout_param { dropout_ratio: 0.5 }"


def _dropout_param(prefix, **fields):
    p = lsq_solver_param("SGD", max_iter=6, snapshot=3, snapshot_prefix=prefix, momentum=0.9,
                         **fields)
    p.net_param.layer.insert(1, text_format.Parse(DROPOUT, caffe_pb2.LayerParameter()))
    return p


def test_resume_continues_the_random_draws(tmp_path):
    straight = get_solver(_dropout_param(str(tmp_path / "a")))
    straight.solve()
    expected = (tmp_path / "a_iter_6.caffemodel").read_bytes()
    resumed = get_solver(_dropout_param(str(tmp_path / "b")))
    resumed.solve(resume_file=str(tmp_path / "a_iter_3.solverstate"))
    assert (tmp_path / "b_iter_6.caffemodel").read_bytes() == expected
    # without the resume file the dropout masks start afresh, as in Caffe, and differ
    os.unlink(tmp_path / "a_iter_3.solverstate.resume.json")
    fresh = get_solver(_dropout_param(str(tmp_path / "c")))
    fresh.solve(resume_file=str(tmp_path / "a_iter_3.solverstate"))
    assert (tmp_path / "c_iter_6.caffemodel").read_bytes() != expected


def test_a_resume_file_of_another_state_is_ignored(tmp_path, caplog):
    solver = get_solver(_dropout_param(str(tmp_path / "a")))
    solver.step(3)
    state = tmp_path / "a_iter_3.solverstate"
    sidecar = tmp_path / "a_iter_3.solverstate.resume.json"
    saved = json.loads(sidecar.read_text())
    assert saved["format"] == "minicaffe resume state" and saved["iter"] == 3
    saved["solverstate_sha256"] = "0" * 64
    sidecar.write_text(json.dumps(saved))
    with caplog.at_level(logging.INFO, logger="minicaffe"):
        get_solver(_dropout_param(str(tmp_path / "b"))).restore(str(state))
    assert f"Ignoring {sidecar}: it was written with another version of {state}" in caplog.text
    sidecar.write_text("{not json")
    with pytest.raises(SolverError, match=re.escape(f"{sidecar}: cannot read it")):
        get_solver(_dropout_param(str(tmp_path / "c"))).restore(str(state))
