"""Caffe's `Python` layer: a layer whose code is a Python class named in the prototxt.

    layer {
      name: "loss"  type: "Python"  bottom: "pred"  bottom: "label"  top: "loss"
      python_param { module: "pyloss"  layer: "EuclideanLossLayer"  param_str: "..." }
      loss_weight: 1     # Python layers are not losses unless the prototxt says so
    }

The class is written as for pycaffe: usually `class EuclideanLossLayer(caffe.Layer)`
with `setup(bottom, top)`, `reshape`, `forward(bottom, top)` and
`backward(top, propagate_down, bottom)` working on blobs' `.data` / `.diff`.
Before `setup` it gets `self.param_str` and `self.phase`; learnable parameters go
in `self.blobs` (`self.blobs.add_blob(*shape)`), where the Net finds them for
solvers, snapshots, lr_mult/decay_mult and sharing like any layer's.

`import caffe` inside the module finds minicaffe (see minicaffe.compat). The
module is imported from sys.path (PYTHONPATH); failing that, from the folder of
the prototxt and then the current directory. A prototxt with a Python layer
therefore runs code: MINICAFFE_PYTHON_LAYERS=0 in the environment (or the CLI's
`--no-python-layers`) refuses every Python layer, for serving untrusted files.

Any exception from importing the module or from the class's setup becomes a
LayerError naming the layer (and, through the Net, the prototxt), chained to the
original; exceptions in forward/backward keep their type, with a note.

The same adapter runs pycaffe-style classes registered with
`@register_layer("MyType")`: the Net drives `setup` for its own bookkeeping, so a
class that overrides `setup` itself is wrapped here and its `setup` is called in
the place of `layer_setup`.
"""
import importlib
import importlib.machinery
import os
import sys

from ..proto import caffe_pb2
from ..layer import (BlobVec, Layer, LayerError, current_model_dir, register_layer,
                     uses_pycaffe_setup)

__all__ = ["PythonLayer", "load_layer_class", "python_layers_allowed", "PYTHON_LAYERS_ENV"]

PYTHON_LAYERS_ENV = "MINICAFFE_PYTHON_LAYERS"


def python_layers_allowed(environ=None):
    """False when MINICAFFE_PYTHON_LAYERS is 0/false/no/off (set by --no-python-layers)."""
    value = (os.environ if environ is None else environ).get(PYTHON_LAYERS_ENV, "1")
    return value.strip().lower() not in ("0", "false", "no", "off")

# Attributes a user class may set to describe itself, as minicaffe.Layer subclasses do.
_CLASS_FLAGS = ("exact_num_bottom", "min_num_bottom", "max_num_bottom", "exact_num_top",
                "min_num_top", "max_num_top", "equal_num_bottom_top", "auto_top_blobs",
                "is_loss", "allows_in_place")


def _import_failed(module_name, layer_label, exc):
    where = ""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" ({exc.filename}:{exc.lineno})"
    return LayerError(f"{layer_label}: python_param.module {module_name!r} was found but importing "
                      f"it failed{where}: {type(exc).__name__}: {exc}")


def _import_layer_module(module_name, layer_label):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name and not module_name.startswith(f"{exc.name}."):
            raise _import_failed(module_name, layer_label, exc) from exc
    except Exception as exc:  # the module's own code failed: any type
        raise _import_failed(module_name, layer_label, exc) from exc
    folders = []
    for folder in (current_model_dir(), os.getcwd()):
        if folder and folder not in folders:
            folders.append(folder)
    top = module_name.split(".")[0]
    for folder in folders:
        if importlib.machinery.PathFinder.find_spec(top, [folder]) is not None:
            # Appended (not prepended) so it cannot shadow anything, and kept so the
            # module's own later imports of its neighbours work.
            if folder not in sys.path:
                sys.path.append(folder)
            importlib.invalidate_caches()
            try:
                return importlib.import_module(module_name)
            except Exception as exc:
                raise _import_failed(module_name, layer_label, exc) from exc
    looked = " or ".join(folders)
    raise LayerError(f"{layer_label}: cannot import python_param.module {module_name!r}: it is "
                     f"not on sys.path (PYTHONPATH) nor in {looked}. Put {top}.py next to the "
                     f"prototxt or add its folder to PYTHONPATH")


def load_layer_class(python_param, layer_label="Python layer"):
    """The class named by python_param { module layer }, imported as described above."""
    if not python_param.module or not python_param.layer:
        raise LayerError(f"{layer_label}: type \"Python\" needs python_param {{ module: "
                         f"\"file_name_without_py\" layer: \"ClassName\" }}")
    if not python_layers_allowed():
        raise LayerError(f"{layer_label}: Python layers are disabled ({PYTHON_LAYERS_ENV}=0 or "
                         f"--no-python-layers); this one would import and run module "
                         f"{python_param.module!r}")
    from .. import compat
    # The module's `import caffe` must give minicaffe, so its classes subclass our Layer.
    compat.install_if_absent()
    module = _import_layer_module(python_param.module, layer_label)
    cls = getattr(module, python_param.layer, None)
    if cls is None:
        classes = sorted(n for n, v in vars(module).items()
                         if isinstance(v, type) and v.__module__ == module.__name__)
        raise LayerError(f"{layer_label}: module {module.__name__!r} "
                         f"({getattr(module, '__file__', '?')}) has no class "
                         f"{python_param.layer!r}; it defines: {', '.join(classes) or 'no classes'}")
    if not isinstance(cls, type):
        raise LayerError(f"{layer_label}: {module.__name__}.{python_param.layer} is not a class")
    if not issubclass(cls, Layer):
        foreign = [b for b in cls.__mro__ if b.__module__.split(".")[0] == "caffe"]
        if foreign:
            raise LayerError(f"{layer_label}: {cls.__name__} subclasses {foreign[0].__module__}."
                             f"{foreign[0].__name__} from a real Caffe installation that was "
                             f"imported before minicaffe; call minicaffe.compat.install() before "
                             f"anything imports caffe (or do not import pycaffe in this process)")
    missing = [m for m in ("reshape", "forward") if not callable(getattr(cls, m, None))]
    if not callable(getattr(cls, "setup", None)) and not callable(getattr(cls, "layer_setup", None)):
        missing.insert(0, "setup")
    if missing:
        raise LayerError(f"{layer_label}: class {cls.__name__} does not define "
                         f"{', '.join(missing)}; a Python layer implements setup, reshape, "
                         f"forward and backward")
    return cls


class Phase(int):
    """A phase as pycaffe's Python layers see it: equal to caffe.TRAIN / caffe.TEST, and
    str() gives the name, as Boost.Python's enum does (py-faster-rcnn keys its config
    by str(self.phase))."""

    def __str__(self):
        return caffe_pb2.Phase.Name(int(self))

    __repr__ = __str__


@register_layer("Python")
class PythonLayer(Layer):
    """Runs a user's layer object: tops = forward(bottoms) as its class computes them.

    Shapes, parameters and loss weights are whatever the user's class and the
    prototxt say; `net.layers[i]` answers the user object's own attributes too.
    """

    check_io = True  # user code: check shapes, dtypes and unwritten tops as it runs

    def __init__(self, layer_param=None, phase=None, layer_class=None):
        super().__init__(layer_param, phase)
        if layer_class is None:
            label = f"layer {self.name!r} (Python)"
            layer_class = load_layer_class(self.layer_param.python_param, label)
        else:  # a pycaffe-style class registered under its own type name
            self.type = layer_class.type
        self.layer_class = layer_class
        # pycaffe-style classes override setup(); minicaffe-style ones implement layer_setup().
        self.pycaffe_style = (uses_pycaffe_setup(layer_class)
                              or not callable(getattr(layer_class, "layer_setup", None)))
        # pycaffe constructs the class with the LayerParameter only.
        try:
            impl = layer_class(self.layer_param)
        except Exception as exc:
            raise self.error(f"constructing class {layer_class.__module__}."
                             f"{layer_class.__qualname__} failed: {type(exc).__name__}: {exc}") from exc
        impl.param_str = self.layer_param.python_param.param_str
        impl.param_str_ = impl.param_str      # pycaffe's older name (py-faster-rcnn's layers)
        impl.phase = Phase(self.phase)
        if not isinstance(impl, Layer):
            impl.name = self.name
            impl.layer_param = self.layer_param
            impl.blobs = self.blobs
        impl.type = self.type
        self.impl = impl
        self.blobs = impl.blobs
        self.blobs_loaded = bool(len(self.layer_param.blobs))
        for flag in _CLASS_FLAGS:
            setattr(self, flag, getattr(impl, flag, getattr(Layer, flag)))
        if getattr(layer_class, "check_io", None) is False:
            self.check_io = False

    @property
    def class_name(self):
        return f"{self.layer_class.__module__}.{self.layer_class.__qualname__}"

    def _note(self, exc, stage):
        # Exceptions from user code keep their type (pycaffe raises them as they are),
        # with a note saying which layer raised them.
        if hasattr(exc, "add_note"):
            exc.add_note(f"in layer {self.name!r} ({self.type}, class {self.class_name}) {stage}")

    def layer_setup(self, bottom, top):
        impl = self.impl
        if not isinstance(impl.blobs, BlobVec):
            impl.blobs = BlobVec(impl.blobs)
        impl.blobs.dtype = self.dtype
        impl.dtype = self.dtype
        try:
            if self.pycaffe_style:
                impl.setup(bottom, top)
            else:
                impl.layer_setup(bottom, top)
        except LayerError as exc:
            if repr(self.name) in str(exc):
                raise
            raise self.error(f"class {self.class_name} failed in setup: {exc}") from exc
        except Exception as exc:
            # setup failures are almost always about the prototxt (param_str, bottoms), so
            # they become one line naming the layer; the original stays chained for --debug.
            raise self.error(f"class {self.class_name} failed in setup: "
                             f"{type(exc).__name__}: {exc}") from exc
        self.blobs = impl.blobs  # setup may have replaced the list

    def reshape(self, bottom, top):
        self.impl.reshape(bottom, top)

    def forward(self, bottom, top):
        try:
            self.impl.forward(bottom, top)
        except Exception as exc:
            self._note(exc, "forward")
            raise

    def backward(self, top, propagate_down, bottom):
        self.impl.param_propagate_down = self.param_propagate_down
        backward = getattr(self.impl, "backward", None)
        if backward is None:
            raise self.error(f"class {self.class_name} has no backward, but the net needs "
                             f"gradients through it")
        try:
            backward(top, propagate_down, bottom)
        except Exception as exc:
            self._note(exc, "backward")
            raise

    def allow_force_backward(self, bottom_index):
        allow = getattr(self.impl, "allow_force_backward", None)
        return allow(bottom_index) if allow is not None else True

    def __getattr__(self, name):
        # Only reached for attributes this adapter lacks: pycaffe code often talks to its
        # own layer object through net.layers[i] (e.g. a data layer's set_data).
        impl = self.__dict__.get("impl")
        if impl is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(impl, name)

    def __repr__(self):
        return f"<PythonLayer {self.name!r} type={self.type} class={self.class_name}>"
