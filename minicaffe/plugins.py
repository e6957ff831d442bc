"""Loading custom layers from outside minicaffe: plugins and entry points.

A plugin is any Python module that registers layers when imported (classes
decorated with `@minicaffe.register_layer("MyType")`). There are three ways in:

* `minicaffe --plugin my_layers train ...` (or `minicaffe train ... --plugin
  path/to/my_layers.py`), repeatable: a module name or a .py file (whose folder
  is then appended to sys.path, so modules next to it, such as Python layers,
  import too);
* the MINICAFFE_PLUGINS environment variable: names or files separated by
  os.pathsep (':' on Linux/macOS, ';' on Windows) or commas;
* the `minicaffe.layers` entry-point group, so a pip-installed package provides
  layers with no flag at all:

      [project.entry-points."minicaffe.layers"]
      my_layers = "my_package.layers"             # a module that registers on import
      MyType = "my_package.layers:MyLayer"        # a Layer class, registered as "MyType"
      setup = "my_package.layers:register_all"    # a function, called once

MINICAFFE_PLUGINS and entry points are loaded once, the first time a layer is
created (and at CLI start), so `minicaffe.Net(...)` sees them from Python too.
An entry point that fails to import only warns (a broken package should not stop
every net); a plugin you named yourself that fails is an error.
"""
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys
import warnings

from .argv_options import take_option
from .errors import MinicaffeError
from .layer import Layer, layer_registry, register_layer, registering_from

__all__ = ["load_plugin", "load_plugins", "load_entry_points", "load_default_plugins",
           "plugins_from_env", "loaded_plugins", "failed_plugins", "extract_plugin_args",
           "PluginError", "ENV_VAR", "ENTRY_POINT_GROUP"]

ENV_VAR = "MINICAFFE_PLUGINS"
ENTRY_POINT_GROUP = "minicaffe.layers"


class PluginError(MinicaffeError, ImportError):
    """A plugin named by the user could not be loaded."""


_loaded = {}      # what the user asked for (name, absolute path or entry point) -> description
_loaded_modules = {}  # absolute plugin path -> module name it was imported under
_failed = []      # (description, reason) of entry points that did not load
_defaults_done = False


def loaded_plugins():
    """[(spec, description)] of every plugin and entry point loaded so far."""
    return list(_loaded.items())


def failed_plugins():
    """[(description, reason)] of entry points that failed to load (they only warned)."""
    return list(_failed)


def _is_path(spec):
    return spec.endswith(".py") or os.sep in spec or (os.altsep is not None and os.altsep in spec)


def load_plugin(spec, origin=None):
    """Import a plugin given as a module name ('my_layers', 'pkg.layers') or a .py path.

    Returns the module. Loading the same plugin twice does nothing the second time.
    `origin` says where the request came from (for messages), e.g. "MINICAFFE_PLUGINS".
    """
    spec = os.fspath(spec).strip()
    importlib.import_module("minicaffe.layers")  # built-ins first, so plugins may override them
    if not spec:
        raise PluginError("empty plugin name; give a module name or a .py file")
    if _is_path(spec):
        return _load_file(spec, origin)
    return _load_module(spec, origin)


def _label(spec, origin):
    return f"plugin {spec}" + (f" from {origin}" if origin else "")


def _load_module(name, origin):
    if name in _loaded and name in sys.modules:
        return sys.modules[name]
    label = _label(name, origin)
    with registering_from(origin or "plugin"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name and not name.startswith(f"{exc.name}."):
                raise PluginError(f"plugin {name!r} could not be imported: {exc}") from exc
            # The `minicaffe` script does not put the working directory on sys.path
            # (`python -m minicaffe` does); a plugin next to the user is the common case.
            cwd = os.getcwd()
            top = name.split(".")[0]
            if importlib.machinery.PathFinder.find_spec(top, [cwd]) is None:
                raise PluginError(
                    f"plugin {name!r} not found: no module {name!r} on sys.path or in the current "
                    f"directory {cwd}; pass a file path (--plugin path/to/{top}.py) or add its "
                    f"folder to PYTHONPATH") from None
            sys.path.append(cwd)
            importlib.invalidate_caches()
            module = importlib.import_module(name)
    _loaded[name] = f"{label}: {getattr(module, '__file__', name)}"
    return module


def _load_file(path, origin):
    path = os.path.abspath(os.path.expanduser(path))
    if path in _loaded:
        return sys.modules[_loaded_modules[path]]
    if not os.path.isfile(path):
        raise PluginError(f"plugin file {path} does not exist")
    if not path.endswith(".py"):
        raise PluginError(f"plugin file {path} is not a .py file")
    stem = os.path.splitext(os.path.basename(path))[0]
    # Import under the file's own name when that is free (so `python_param { module: stem }`
    # and pickling find the same module); otherwise under a private name.
    name = stem
    existing = sys.modules.get(stem)
    if existing is not None:
        existing_file = getattr(existing, "__file__", None)
        if existing_file and os.path.realpath(existing_file) == os.path.realpath(path):
            _loaded[path] = _label(path, origin)
            _loaded_modules[path] = stem
            return existing
        name = f"minicaffe_plugin_{stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    # The plugin's folder becomes importable (appended, so it shadows nothing): the
    # plugin can import its neighbours, and Python layers next to it
    # (python_param { module: ... }) are found without setting PYTHONPATH.
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.append(folder)
        importlib.invalidate_caches()
    try:
        with registering_from(origin or "plugin"):
            module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise PluginError(f"plugin file {path} failed to import: {type(exc).__name__}: {exc}") from exc
    _loaded[path] = _label(path, origin)
    _loaded_modules[path] = name
    return module


def load_plugins(specs, origin=None):
    """load_plugin for each spec, in order; returns the modules."""
    return [load_plugin(s, origin) for s in specs]


def plugins_from_env(environ=None):
    """The plugin specs listed in MINICAFFE_PLUGINS (os.pathsep- or comma-separated)."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "")
    specs = []
    for part in value.split(os.pathsep):
        specs.extend(s.strip() for s in part.split(",") if s.strip())
    return specs


def load_entry_points(group=ENTRY_POINT_GROUP):
    """Load every entry point in `group`: a module, a Layer class, or a function to call.

    A Layer class not registered yet is registered under the entry point's name.
    Failures warn and are remembered (see failed_plugins), they do not raise.
    """
    loaded = []
    for ep in importlib.metadata.entry_points(group=group):
        dist = getattr(ep, "dist", None)
        where = f" in {dist.name} {dist.version}" if dist is not None else ""
        label = f"entry point {ep.name} = {ep.value}{where}"
        key = f"{group}:{ep.name}={ep.value}"
        if key in _loaded or any(f == label for f, _ in _failed):
            continue  # loaded (or failed) before
        try:
            with registering_from(label):
                obj = ep.load()
                if isinstance(obj, type) and issubclass(obj, Layer):
                    if obj not in layer_registry().values():
                        register_layer(ep.name)(obj)
                elif isinstance(obj, type(sys)):
                    pass  # importing the module registered its layers
                elif callable(obj):
                    obj()
                else:
                    raise TypeError(f"{ep.value} is a {type(obj).__name__}; a 'minicaffe.layers' "
                                    f"entry point must name a module, a Layer class or a function")
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            _failed.append((label, reason))
            warnings.warn(f"minicaffe: {label} failed to load ({reason}); its layers are "
                          f"not available", RuntimeWarning, stacklevel=2)
            continue
        _loaded[key] = label
        loaded.append(obj)
    return loaded


_env_failures = []  # PluginError of each MINICAFFE_PLUGINS entry that did not load


def load_default_plugins(force=False, strict=True):
    """Load MINICAFFE_PLUGINS and the installed entry points (once per process unless force).

    Every MINICAFFE_PLUGINS entry is tried. With strict (the default, used when a net is
    built) an entry that failed raises its PluginError, now and on later calls; with
    strict=False the failures are returned, so `minicaffe --help` and `minicaffe layers`
    can warn about a stale entry instead of refusing to run.
    """
    global _defaults_done
    if not _defaults_done or force:
        _defaults_done = True
        _env_failures.clear()
        importlib.import_module("minicaffe.layers")
        load_entry_points()
        for spec in plugins_from_env():
            try:
                load_plugin(spec, origin=ENV_VAR)
            except PluginError as exc:
                _env_failures.append(exc)
    if strict and _env_failures:
        raise PluginError(f"{_env_failures[0]} (remove it from {ENV_VAR} or fix it)")
    return list(_env_failures)


def extract_plugin_args(argv):
    """Split `--plugin X` / `--plugin=X` out of a command line, wherever they appear.

    Returns (remaining argv, [X, ...]); scanning stops at a bare `--`.
    Lets `minicaffe train ... --plugin m` work without every subcommand defining --plugin.
    """
    try:
        return take_option(argv, "--plugin", "a module name or a .py file")
    except ValueError as exc:
        raise PluginError(str(exc)) from None
