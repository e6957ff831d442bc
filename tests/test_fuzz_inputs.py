"""Fuzzing: mutated prototxts and caffemodels may be refused, but only with minicaffe's own
errors (MinicaffeError subclasses), never a numpy/protobuf traceback or a crash.

Mutations are byte flips, truncation and token edits (small numbers, deleted or duplicated
tokens), kept small so that a mutated net cannot ask for gigabytes. Each property runs a
modest number of examples with a per-example deadline, a few seconds in all.
"""
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (test extra)")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import minicaffe  # noqa: E402
from minicaffe.errors import MinicaffeError  # noqa: E402

NET = """name: "fuzz"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 2 dim: 1 dim: 6 dim: 6 } shape { dim: 2 }
    data_filler { type: "gaussian" std: 1 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 3 kernel_size: 3 stride: 1 pad: 0
    weight_filler { type: "xavier" } } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "relu" type: "ReLU" bottom: "pool" top: "pool" }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss"
  include { phase: TRAIN } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" include { phase: TEST } }
"""

FUZZ = settings(max_examples=100, deadline=3000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _tokens(text):
    return text.replace("{", " { ").replace("}", " } ").split()


@st.composite
def mutated_text(draw):
    tokens = _tokens(NET)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(tokens) - 1))
        kind = draw(st.sampled_from(["number", "delete", "duplicate", "swap", "word"]))
        if kind == "number":
            tokens[i] = str(draw(st.integers(-3, 12)))
        elif kind == "delete":
            del tokens[i]
        elif kind == "duplicate":
            tokens.insert(i, tokens[i])
        elif kind == "swap":
            j = draw(st.integers(0, len(tokens) - 1))
            tokens[i], tokens[j] = tokens[j], tokens[i]
        else:
            tokens[i] = draw(st.sampled_from(['"Nope"', "TEST", "TRAIN", "axis:", "dim:",
                                              "bottom:", "top:", '"ip"', '"data"', "-1"]))
        if not tokens:
            tokens = ["{"]
    return " ".join(tokens)


@st.composite
def mutated_bytes(draw, data):
    data = bytearray(data)
    kind = draw(st.sampled_from(["flip", "truncate", "both"]))
    if kind in ("truncate", "both") and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    if kind in ("flip", "both") and data:
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


def _run_net(path, phase):
    net = minicaffe.Net(str(path), phase)
    net.forward()
    if phase == minicaffe.TRAIN:
        net.backward()
    return net


def _only_own_errors(call):
    try:
        call()
    except MinicaffeError as exc:
        assert "\n" not in str(exc), str(exc)


@FUZZ
@given(text=mutated_text(), phase=st.sampled_from([minicaffe.TRAIN, minicaffe.TEST]))
def test_mutated_prototxt_only_raises_minicaffe_errors(tmp_path_factory, text, phase):
    path = tmp_path_factory.mktemp("fuzz") / "net.prototxt"
    path.write_text(text)
    _only_own_errors(lambda: _run_net(path, phase))


@FUZZ
@given(data=st.data())
def test_mutated_prototxt_bytes_only_raise_minicaffe_errors(tmp_path_factory, data):
    raw = data.draw(mutated_bytes(NET.encode()))
    path = tmp_path_factory.mktemp("fuzz") / "net.prototxt"
    path.write_bytes(raw)
    _only_own_errors(lambda: _run_net(path, minicaffe.TEST))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    (folder / "net.prototxt").write_text(NET)
    net = minicaffe.Net(str(folder / "net.prototxt"), minicaffe.TEST)
    net.save(str(folder / "w.caffemodel"))
    return folder, (folder / "w.caffemodel").read_bytes()


@FUZZ
@given(data=st.data())
def test_mutated_caffemodel_only_raises_minicaffe_errors(tmp_path_factory, model, data):
    folder, weights = model
    raw = data.draw(mutated_bytes(weights))
    path = tmp_path_factory.mktemp("fuzz") / "w.caffemodel"
    path.write_bytes(raw)
    net = minicaffe.Net(str(folder / "net.prototxt"), minicaffe.TEST)
    _only_own_errors(lambda: (net.copy_from(str(path)), net.forward()))
