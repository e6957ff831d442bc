"""Layer base class and the type registry.

A layer implements `layer_setup` (read params, create `self.blobs`), `reshape`
(shape the tops), `forward(bottom, top)` and `backward(top, propagate_down, bottom)`
and is registered under Caffe's type string with `@register_layer("Type")`.
The Net calls `setup` once, then `run_forward` / `run_backward` each iteration.

Layers defined outside minicaffe (plugins, user code, Python layers) are also
checked as they run: a param blob of the wrong dtype, a top that forward never
writes, or a blob reshaped behind the Net's back is reported naming the layer.
"""
import contextlib
import contextvars
import os
import sys
import warnings

import numpy as np

from .errors import MinicaffeError
from .proto import caffe_pb2

__all__ = ["Layer", "register_layer", "layer_registry", "layer_source", "LayerError", "BlobVec"]

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST


class LayerError(MinicaffeError, ValueError):
    """Bad layer parameters or blob shapes, named after the layer at fault."""


class BlobVec(list):
    """A layer's parameter blobs: a list, plus pycaffe's `add_blob(*shape)`.

    Blobs made by add_blob take the layer's dtype (set by `Layer.setup`), so a
    layer checked in float64 gets float64 parameters.
    """

    def __init__(self, blobs=(), dtype=np.float32):
        super().__init__(blobs)
        self.dtype = dtype

    def add_blob(self, *shape):
        """Append a zero-filled Blob of `shape` (pycaffe: `self.blobs.add_blob(2, 3)`) and return it."""
        from .blob import Blob
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        blob = Blob(shape, dtype=self.dtype)
        self.append(blob)
        return blob


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
    # Check dtypes/shapes/unwritten tops as the layer runs. None means: yes for
    # layers defined outside minicaffe (their code has no tests here), no for built-ins.
    check_io = None
    # Set by the Net: True when its backward never runs (an inference net, or no loss depends on
    # the layer), so the layer need not keep what backward reads (pooling's argmax state).
    forward_only = False

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
        self.blobs = BlobVec()
        self.param_propagate_down = []
        self.loss_weights = []
        self.dtype = np.float32
        # Set by the Net when weights were copied in before setup: fillers are skipped.
        self.blobs_loaded = False
        if len(layer_param.blobs):
            from .blob import Blob
            self.blobs = BlobVec(Blob(Blob.proto_shape(p)).from_proto(p) for p in layer_param.blobs)
            self.blobs_loaded = True
        if self.check_io is None:
            self.check_io = not type(self).__module__.startswith("minicaffe.")

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

    def snapshot_state(self):
        """What this layer needs, beyond its parameter blobs, to continue exactly where it is
        (a data cursor, a private random generator), as JSON-serializable data; None if nothing.
        Saved with each snapshot, next to the .solverstate, and given back to `restore_state`."""
        return None

    def restore_state(self, state):
        """Continue from a `snapshot_state()` value (of this layer in an earlier run)."""

    # -- driven by the Net -------------------------------------------------
    def setup(self, bottom, top):
        # Parameters follow the data: bottoms, else the tops the Net made (float64 nets)
        self.dtype = bottom[0].dtype if bottom else (top[0].dtype if top else np.dtype(np.float32))
        self.check_blob_counts(bottom, top)
        if isinstance(self.blobs, BlobVec):
            self.blobs.dtype = self.dtype
        self.layer_setup(bottom, top)
        if len(self.param_propagate_down) != len(self.blobs):
            self.param_propagate_down = [True] * len(self.blobs)
        if self.check_io:
            self._check_params_after_setup()
        self.reshape(bottom, top)
        self.set_loss_weights(top)

    def run_forward(self, bottom, top):
        """forward, then the weighted loss: sum over tops of data . diff (diff holds the weight)."""
        if self.check_io:
            self._checked_forward(bottom, top)
        else:
            self.forward(bottom, top)
        loss = 0.0
        for t, w in zip(top, self.loss_weights):
            if w:
                loss += float(np.dot(t.data.ravel(), t.diff.ravel()))
        return loss

    def run_backward(self, top, propagate_down, bottom):
        if self.check_io:
            self._checked_backward(top, propagate_down, bottom)
        else:
            self.backward(top, propagate_down, bottom)

    # -- checks for layers defined outside minicaffe (check_io) -------------------
    def _check_params_after_setup(self):
        from .blob import Blob
        for j, blob in enumerate(self.blobs):
            if not isinstance(blob, Blob):
                raise self.error(f"self.blobs[{j}] is a {type(blob).__name__}, not a Blob; create "
                                 f"parameters with self.blobs.add_blob(*shape) or "
                                 f"Blob(shape, dtype=self.dtype)")
            if not self.blobs_loaded and blob.dtype != self.dtype:
                raise self.error(f"param blob {j} is {blob.dtype} but the net computes in "
                                 f"{np.dtype(self.dtype)}; create it with Blob(shape, "
                                 f"dtype=self.dtype) or self.blobs.add_blob(*shape)")
        self._param_ids = [id(b) for b in self.blobs]
        self._param_shapes = [b.shape for b in self.blobs]

    def _check_params_unchanged(self, stage):
        ids = getattr(self, "_param_ids", None)
        if ids is None:  # set up outside Layer.setup (e.g. by hand): nothing to compare
            return
        if [id(b) for b in self.blobs] != ids:
            raise self.error(f"{stage} replaced, added or removed parameter blobs; the Net only "
                             f"learns the {len(ids)} blob(s) that existed after setup, so create "
                             f"every parameter in setup")
        for j, (blob, shape) in enumerate(zip(self.blobs, self._param_shapes)):
            if blob.shape != shape:
                raise self.error(f"{stage} reshaped param blob {j} from {shape} to {blob.shape}; "
                                 f"parameter shapes are fixed after setup")

    def _shapes_note(self, bottom, top):
        return (f"bottom shapes {[b.shape for b in bottom]}, top shapes {[t.shape for t in top]}, "
                f"param shapes {[b.shape for b in self.blobs]}")

    def _check_unmoved(self, stage, what, blobs, shapes):
        for j, (blob, shape) in enumerate(zip(blobs, shapes)):
            if blob.shape != shape:
                raise self.error(f"{stage} reshaped {what}[{j}] from {shape} to {blob.shape}; "
                                 f"only reshape() may change blob shapes")

    def _checked_forward(self, bottom, top):
        bottom_shapes = [b.shape for b in bottom]
        top_shapes = [t.shape for t in top]
        # On the first pass (and whenever shapes change) pre-fill the tops with NaN
        # so that elements forward never writes show up instead of passing stale values on.
        probe = top_shapes != getattr(self, "_probed_top_shapes", None)
        saved = {}
        if probe:
            self._probed_top_shapes = top_shapes
            shared = list(bottom) + list(self.blobs)
            for j, t in enumerate(top):
                if np.issubdtype(t.dtype, np.floating) and not any(t.shares_data_with(b) for b in shared):
                    saved[j] = t.data.copy()
                    t.data.fill(np.nan)
        try:
            self.forward(bottom, top)
        except LayerError:
            raise
        except ValueError as exc:  # numpy shape mismatches land here
            raise self.error(f"forward: {exc} ({self._shapes_note(bottom, top)})") from exc
        self._check_unmoved("forward", "bottom", bottom, bottom_shapes)
        self._check_params_unchanged("forward")
        for j, before in saved.items():
            data = top[j].data
            if data.shape != before.shape:  # reshaped inside forward: cannot tell
                continue
            unwritten = np.isnan(data)
            if not unwritten.any():
                continue
            if unwritten.all():
                data[...] = before
                warnings.warn(f"layer {self.name!r} ({self.type}): forward did not write top[{j}] "
                              f"{top[j].name!r}; a layer must fill its tops on every forward "
                              f"(set check_io = False on the class if the top is filled "
                              f"elsewhere on purpose)", LayerWarning, stacklevel=2)
                continue
            raise self.error(f"forward left {int(unwritten.sum())} of {data.size} elements of "
                             f"top[{j}] {top[j].name!r} (shape {data.shape}) unwritten or NaN; "
                             f"forward must write every element of its tops")

    def _checked_backward(self, top, propagate_down, bottom):
        bottom_shapes = [b.shape for b in bottom]
        top_shapes = [t.shape for t in top]
        try:
            self.backward(top, propagate_down, bottom)
        except LayerError:
            raise
        except ValueError as exc:
            raise self.error(f"backward: {exc}; a diff must have the shape of its blob "
                             f"({self._shapes_note(bottom, top)})") from exc
        self._check_unmoved("backward", "bottom", bottom, bottom_shapes)
        self._check_unmoved("backward", "top", top, top_shapes)
        self._check_params_unchanged("backward")

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


class LayerWarning(UserWarning):
    """Something suspicious (not fatal) in a layer defined outside minicaffe."""


def uses_pycaffe_setup(cls):
    """Is `cls` written pycaffe-style, overriding `setup` instead of `layer_setup`?

    Such classes are run through the Python-layer adapter, which calls their
    `setup` and does the Net's bookkeeping (dtype, loss weights) around it.
    """
    setup = getattr(cls, "setup", None)
    return (setup is not None and setup is not Layer.setup
            and getattr(cls, "layer_setup", Layer.layer_setup) is Layer.layer_setup
            and not cls.__module__.startswith("minicaffe."))


# -- registry ----------------------------------------------------------------
_REGISTRY = {}
_SOURCES = {}
# What is being loaded right now (a plugin, an entry point), for `minicaffe layers`.
_LOADING_FROM = contextvars.ContextVar("minicaffe_loading_from", default=None)
# The folder of the model file being built, where Python layer modules are also looked for.
_MODEL_DIR = contextvars.ContextVar("minicaffe_model_dir", default=None)


def layer_registry():
    """{type string: class} of every registered layer."""
    return dict(_REGISTRY)


def layer_source(type_name):
    """Where a registered type comes from: 'built-in (module)', a plugin, a module and file."""
    return _SOURCES.get(type_name)


@contextlib.contextmanager
def registering_from(description):
    """Label layers registered inside this block (used by the plugin loader)."""
    token = _LOADING_FROM.set(description)
    try:
        yield
    finally:
        _LOADING_FROM.reset(token)


@contextlib.contextmanager
def building_model(path):
    """Let Python layers built inside this block look for their modules next to `path`.

    With path None (a net given as a NetParameter) an enclosing block's folder stays in force.
    """
    if path is None:
        yield
        return
    token = _MODEL_DIR.set(os.path.dirname(os.path.abspath(os.fspath(path))))
    try:
        yield
    finally:
        _MODEL_DIR.reset(token)


def current_model_dir():
    return _MODEL_DIR.get()


def _module_file(cls):
    path = getattr(sys.modules.get(cls.__module__), "__file__", None)
    return os.path.realpath(path) if path else None


def _origin(cls):
    module = cls.__module__
    if module.startswith("minicaffe."):
        return f"built-in ({module})"
    path = _module_file(cls)
    return f"{module} ({path})" if path else module


def _same_definition(old, new):
    # Re-running a class definition (importlib.reload, a notebook cell, one file
    # imported under two names) must not count as a clash.
    if old.__qualname__ != new.__qualname__:
        return False
    return old.__module__ == new.__module__ or (
        _module_file(old) is not None and _module_file(old) == _module_file(new))


def register_layer(type_name, override=False, source=None):
    """Class decorator: make `type: "<type_name>"` in a prototxt build this Layer subclass.

    Registering a name that another class already holds is an error unless
    override=True (re-running the same class definition is fine).
    """
    if not isinstance(type_name, str) or not type_name:
        raise TypeError("register_layer needs the layer's type string, e.g. @register_layer('MyLoss')")

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, Layer)):
            raise TypeError(f"@register_layer({type_name!r}) must decorate a minicaffe.Layer subclass")
        old = _REGISTRY.get(type_name)
        if old is not None and old is not cls and not override and not _same_definition(old, cls):
            raise ValueError(f"layer type {type_name!r} is already registered by "
                             f"{_SOURCES.get(type_name)}; pass override=True to replace it")
        cls.type = type_name
        _REGISTRY[type_name] = cls
        loading = _LOADING_FROM.get()
        _SOURCES[type_name] = source or (f"{_origin(cls)} [{loading}]" if loading else _origin(cls))
        return cls

    return decorate
