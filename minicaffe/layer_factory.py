"""Making a layer from its LayerParameter: the registry lookup, plugins, and Python layers.

This sits above layer.py (the base class and registry), the built-in layers and plugins.py,
all of which it imports, so that none of them has to import upward.
"""
import difflib

from . import plugins
from .layer import LayerError, layer_registry, uses_pycaffe_setup
# Importing the package registers every built-in layer.
from .layers.python_layer import PythonLayer
from .proto import extension, known_forks

__all__ = ["create_layer", "layer_type_list", "unknown_type_message"]


def unknown_type_message(type_name):
    known = sorted(layer_registry())
    close = difflib.get_close_matches(type_name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    failed = "".join(f" (Note: {what} failed to load: {why}.)" for what, why in plugins.failed_plugins())
    # A known fork layer is not a typo of a built-in one.
    hint = known_forks.layer_type_hint(type_name) or hint
    return (f"unknown layer type {type_name!r}.{hint} Known types: {', '.join(known)}. "
            f"To add one, subclass minicaffe.Layer, decorate the class with "
            f"@minicaffe.register_layer({type_name!r}) and load its module with "
            f"`--plugin MODULE_OR_FILE.py` (or the MINICAFFE_PLUGINS variable, or a "
            f"'minicaffe.layers' entry point); or use type: \"Python\" with python_param "
            f"{{ module: ... layer: ... }}. `minicaffe layers` lists the known types.{failed}")


def create_layer(layer_param, phase=None):
    """Instantiate the registered class for `layer_param.type`."""
    plugins.load_default_plugins()  # MINICAFFE_PLUGINS and installed entry points, once
    cls = layer_registry().get(layer_param.type)
    if cls is None:
        raise LayerError(f"layer {layer_param.name!r}: " + unknown_type_message(layer_param.type))
    if uses_pycaffe_setup(cls):
        return PythonLayer(layer_param, phase, layer_class=cls)
    layer = cls(layer_param, phase)
    ext = extension.active()
    if ext is not None and not cls.__module__.startswith("minicaffe."):
        # A custom layer of the fork whose caffe.proto is in use reads its own params.
        layer.layer_param = ext.view(layer.layer_param)
    return layer


def layer_type_list():
    """Sorted registered type names (pycaffe's caffe.layer_type_list())."""
    return sorted(layer_registry())
