"""Errors of the ONNX converters: one line naming the layer, node or file at fault."""


class OnnxError(ValueError):
    """A net that cannot be exported, a model that cannot be imported, or a failed check."""
