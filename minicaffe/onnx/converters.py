"""The registry of ONNX converters, {Caffe layer type: fn(ctx)}, filled by exporter.py (BVLC's
layers) and fork_layers.py (the forks'). It sits below both so neither imports the other."""

__all__ = ["CONVERTERS", "converter"]

CONVERTERS = {}


def converter(*types):
    """Decorator: register fn(ctx) as the converter of these layer types."""
    def deco(fn):
        for t in types:
            CONVERTERS[t] = fn
        return fn
    return deco
