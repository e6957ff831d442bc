"""The optional packages behind the ONNX features, imported only when used."""
import importlib

EXTRA_HINT = 'pip install "minicaffe[onnx]"'


class MissingExtraError(ImportError):
    """onnx or onnxruntime is not installed."""


def require(module):
    """Import `module` ("onnx" or "onnxruntime") or fail in one line naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"the ONNX features need the {module!r} package, from the "
                                f"minicaffe[onnx] extra: {EXTRA_HINT}") from None
