"""ONNX export, check and import for minicaffe nets (the `minicaffe[onnx]` extra).

    from minicaffe.onnx import export, check, import_model
    export(net, "model.onnx", opset=17, batch=None)      # or net.to_onnx("model.onnx")
    check(net, "model.onnx")                             # onnxruntime vs minicaffe, worst rel. error
    import_model("model.onnx", "out.prototxt", "out.caffemodel")

Custom layers export themselves with a `to_onnx(self, ctx)` method; `ctx` is an
`ExportContext` (see minicaffe/onnx/exporter.py for its small API).
"""
from .deps import MissingExtraError, require
from .errors import OnnxError

__all__ = ["export", "check", "import_model", "OnnxError", "MissingExtraError", "require",
           "ExportContext", "DEFAULT_OPSET"]

DEFAULT_OPSET = 17


def export(net, path, opset=DEFAULT_OPSET, batch=None, extra_outputs=()):
    """Write `net` to `path` as ONNX; extra_outputs also exposes those intermediate blobs."""
    from .exporter import export as _export
    return _export(net, path, opset=opset, batch=batch, extra_outputs=extra_outputs)


def check(net, path, inputs=None, tolerance=1e-4, seed=0):
    """Compare onnxruntime on the model at `path` with net's forward (see verify.check)."""
    from .verify import check as _check
    return _check(net, path, inputs=inputs, tolerance=tolerance, seed=seed)


def import_model(onnx_path, prototxt_path, caffemodel_path):
    from .importer import import_model as _import
    return _import(onnx_path, prototxt_path, caffemodel_path)


def __getattr__(name):
    if name == "ExportContext":
        from .exporter import ExportContext
        return ExportContext
    raise AttributeError(name)
