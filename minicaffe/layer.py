"""Layer base class and the type registry.

A layer implements `layer_setup` (read params, create `self.blobs`), `reshape`
(shape the tops), `forward(bottom, top)` and `backward(top, propagate_down, bottom)`
and is registered under Caffe's type string with `@register_layer("Type")`.
The Net calls `setup` once, then `run_forward` / `run_backward` each iteration.
"""
import difflib
import importlib

import numpy as np

from .proto import caffe_pb2

__all__ = ["Layer", "register_layer", "create_layer", "layer_registry", "LayerError"]

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST


class LayerError(ValueError):
    """Bad layer parameters or blob shapes, named after the layer at fault."""


class Layer:
    # Blob-count constraints (Caffe's ExactNumBottomBlobs & co.); None = unchecked.
    exact_num_bottom = None
    min_num_bottom = None
    max_num_bottom = None
    exact_num_top = None
    min_num_top = None
    max_num_top = None
    equal_num_bottom_top = False
    # Let the Net create anonymous tops up to the minimum / exact count.
    auto_top_blobs = False
    # Loss layers: top[0] gets loss_weight 1 unless the prototxt says otherwise.
    is_loss = False
    # Layers that may run with top[i] is bottom[i] (ReLU, Dropout, ...).
    allows_in_place = False

    type = None  # filled in by register_layer

    def __init__(self, layer_param=None, phase=None):
        if layer_param is None:
            layer_param = caffe_pb2.LayerParameter()
        elif not isinstance(layer_param, caffe_pb2.LayerParameter):
            raise TypeError(f"{type(self).__name__} expects a caffe_pb2.LayerParameter, "
                            f"got {type(layer_param).__name__}")
        self.layer_param = layer_param
        self.name = layer_param.name
        self.phase = layer_param.phase if phase is None else phase
        self.blobs = []
        self.param_propagate_down = []
        self.loss_weights = []
        self.dtype = np.float32
        # Set by the Net when weights were copied in before setup: fillers are skipped.
        self.blobs_loaded = False
        if len(layer_param.blobs):
            from .blob import Blob
            self.blobs = [Blob(Blob.proto_shape(p)).from_proto(p) for p in layer_param.blobs]
            self.blobs_loaded = True

    # -- what subclasses implement -----------------------------------------
    def layer_setup(self, bottom, top):
        """Read layer parameters and create learnable blobs (skip fillers if self.blobs_loaded)."""

    def reshape(self, bottom, top):
        raise NotImplementedError(f"layer type {self.type} does not implement reshape")

    def forward(self, bottom, top):
        raise NotImplementedError(f"layer type {self.type} does not implement forward")

    def backward(self, top, propagate_down, bottom):
        """Write bottom diffs (overwrite) and accumulate param diffs (+=)."""

    def allow_force_backward(self, bottom_index):
        return True

    # -- driven by the Net -------------------------------------------------
    def setup(self, bottom, top):
        self.dtype = bottom[0].dtype if bottom else np.float32
        self.check_blob_counts(bottom, top)
        self.layer_setup(bottom, top)
        if len(self.param_propagate_down) != len(self.blobs):
            self.param_propagate_down = [True] * len(self.blobs)
        self.reshape(bottom, top)
        self.set_loss_weights(top)

    def run_forward(self, bottom, top):
        """forward, then the weighted loss: sum over tops of data . diff (diff holds the weight)."""
        self.forward(bottom, top)
        loss = 0.0
        for t, w in zip(top, self.loss_weights):
            if w:
                loss += float(np.dot(t.data.ravel(), t.diff.ravel()))
        return loss

    def run_backward(self, top, propagate_down, bottom):
        self.backward(top, propagate_down, bottom)

    def check_blob_counts(self, bottom, top):
        nb, nt = len(bottom), len(top)

        def bad(what, n, rule, k):
            raise LayerError(f"layer {self.name!r} ({self.type}) takes {rule} {k} {what} blob(s), got {n}")

        if self.exact_num_bottom is not None and nb != self.exact_num_bottom:
            bad("bottom", nb, "exactly", self.exact_num_bottom)
        if self.min_num_bottom is not None and nb < self.min_num_bottom:
            bad("bottom", nb, "at least", self.min_num_bottom)
        if self.max_num_bottom is not None and nb > self.max_num_bottom:
            bad("bottom", nb, "at most", self.max_num_bottom)
        if self.exact_num_top is not None and nt != self.exact_num_top:
            bad("top", nt, "exactly", self.exact_num_top)
        if self.min_num_top is not None and nt < self.min_num_top:
            bad("top", nt, "at least", self.min_num_top)
        if self.max_num_top is not None and nt > self.max_num_top:
            bad("top", nt, "at most", self.max_num_top)
        if self.equal_num_bottom_top and nb != nt:
            raise LayerError(f"layer {self.name!r} ({self.type}) needs as many tops as bottoms, "
                             f"got {nb} bottoms and {nt} tops")

    def set_loss_weights(self, top):
        given = list(self.layer_param.loss_weight)
        if given and len(given) != len(top):
            raise LayerError(f"layer {self.name!r}: loss_weight must be given once per top "
                             f"({len(top)}), got {len(given)}")
        if not given:
            given = [1.0 if (self.is_loss and i == 0) else 0.0 for i in range(len(top))]
        self.loss_weights = given
        for t, w in zip(top, given):
            if w:
                t.diff[...] = w

    def error(self, message):
        """A LayerError naming this layer; use as `raise self.error(...)`."""
        return LayerError(f"layer {self.name!r} ({self.type}): {message}")

    def __repr__(self):
        return f"<{type(self).__name__} {self.name!r} type={self.type}>"


# -- registry ----------------------------------------------------------------
_REGISTRY = {}
_SOURCES = {}


def layer_registry():
    """{type string: class} of every registered layer."""
    return dict(_REGISTRY)


def layer_source(type_name):
    return _SOURCES.get(type_name)


def register_layer(type_name, override=False, source=None):
    """Class decorator: make `type: "<type_name>"` in a prototxt build this Layer subclass."""
    if not isinstance(type_name, str) or not type_name:
        raise TypeError("register_layer needs the layer's type string, e.g. @register_layer('MyLoss')")

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, Layer)):
            raise TypeError(f"@register_layer({type_name!r}) must decorate a minicaffe.Layer subclass")
        if type_name in _REGISTRY and _REGISTRY[type_name] is not cls and not override:
            raise ValueError(f"layer type {type_name!r} is already registered by "
                             f"{_SOURCES.get(type_name)}; pass override=True to replace it")
        cls.type = type_name
        _REGISTRY[type_name] = cls
        _SOURCES[type_name] = source or cls.__module__
        return cls

    return decorate


def unknown_type_message(type_name):
    known = sorted(_REGISTRY)
    close = difflib.get_close_matches(type_name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (f"unknown layer type {type_name!r}.{hint} Known types: {', '.join(known)}. "
            f"To add one, subclass minicaffe.Layer and decorate it with "
            f"@minicaffe.register_layer({type_name!r}) (load it with --plugin MODULE).")


def create_layer(layer_param, phase=None):
    """Instantiate the registered class for `layer_param.type`."""
    importlib.import_module("minicaffe.layers")  # registers the built-in layers
    cls = _REGISTRY.get(layer_param.type)
    if cls is None:
        raise LayerError(f"layer {layer_param.name!r}: " + unknown_type_message(layer_param.type))
    return cls(layer_param, phase)
