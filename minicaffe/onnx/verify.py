"""Run an exported model in onnxruntime and compare every output with minicaffe's forward."""
import os

import numpy as np

from .deps import require
from .errors import OnnxError

__all__ = ["check", "CheckResult", "random_inputs"]


class CheckResult:
    """Worst relative error per output: max |onnx - caffe| / max(max |caffe|, tiny)."""

    def __init__(self, errors, tolerance):
        self.errors, self.tolerance = errors, tolerance
        self.worst_output = max(errors, key=errors.get) if errors else None
        self.worst = errors[self.worst_output] if errors else 0.0
        self.ok = self.worst <= tolerance

    def __str__(self):
        verdict = "OK" if self.ok else "FAILED"
        return (f"{verdict}: worst relative error {self.worst:.3g} (output {self.worst_output!r}, "
                f"tolerance {self.tolerance:g}) over {len(self.errors)} output(s)")


def random_inputs(net, seed=0):
    """Standard normal data for every input blob, in the net's input shapes."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(net.blobs[name].shape).astype(np.float32)
            for name in net.inputs}


def _load_inputs(net, inputs):
    if inputs is None:
        return None
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if isinstance(inputs, dict):
        return {k: np.asarray(v, dtype=np.float32) for k, v in inputs.items()}
    arrays = {}
    if len(inputs) != len(net.inputs):
        raise OnnxError(f"the net has {len(net.inputs)} input(s) {list(net.inputs)}, got "
                        f"{len(inputs)} .npy file(s)")
    for name, path in zip(net.inputs, inputs):
        try:
            arrays[name] = np.load(path).astype(np.float32)
        except (OSError, ValueError) as exc:
            raise OnnxError(f"{path}: cannot read input array: {exc}") from None
    return arrays


def relative_error(got, want):
    want = np.asarray(want, dtype=np.float64)
    scale = max(float(np.abs(want).max()) if want.size else 0.0, 1e-12)
    if got.shape != want.shape:
        return float("inf")
    return float(np.abs(np.asarray(got, np.float64) - want).max()) / scale if want.size else 0.0


def check(net, path, inputs=None, tolerance=1e-4, seed=0):
    """Feed the same inputs to `net` and to the ONNX model at `path`; return a CheckResult.

    inputs: None (random normal data), a dict name -> array, or .npy paths, one per net input.
    Raises OnnxError when the worst relative error is above `tolerance`.
    """
    ort = require("onnxruntime")
    feeds = _load_inputs(net, inputs) or random_inputs(net, seed)
    for name, array in feeds.items():
        if name not in net.blobs:
            raise OnnxError(f"the net has no input blob {name!r}")
        if tuple(net.blobs[name].shape) != array.shape:
            net.blobs[name].reshape(array.shape)
    net.reshape()
    for layer in net.layers:   # recurrent layers: start from zero state, as the ONNX model does
        if callable(getattr(layer, "reset", None)) and layer.type in ("RNN", "LSTM"):
            layer.reset()
    for name, array in feeds.items():
        net.blobs[name].data[...] = array
    net.forward()
    expected = {name: net.blobs[name].data.copy() for name in net.blobs}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        got = session.run(None, feeds)
    except Exception as exc:   # onnxruntime raises its own exception types
        raise OnnxError(f"{os.fspath(path)}: onnxruntime cannot run the model: "
                        f"{str(exc).splitlines()[0]}") from None
    names = [o.name for o in session.get_outputs()]
    # Graph outputs are the net's outputs, then any extra blobs exported (under their names).
    blob_names = list(net.outputs) + [n for n in names[len(net.outputs):]]
    errors = {}
    for caffe_name, value in zip(blob_names, got):
        if caffe_name not in expected:
            raise OnnxError(f"{os.fspath(path)}: output {caffe_name!r} is not a blob of the net")
        errors[caffe_name] = relative_error(np.asarray(value), expected[caffe_name])
    result = CheckResult(errors, tolerance)
    if not result.ok:
        raise OnnxError(f"{os.fspath(path)}: check {result}")
    return result
