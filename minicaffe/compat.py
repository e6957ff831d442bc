"""`import caffe` that finds minicaffe, for running pycaffe code unchanged.

Opt in from Python, before the code that does `import caffe`:

    import minicaffe.compat
    minicaffe.compat.install()
    import caffe                                  # minicaffe
    from caffe.proto import caffe_pb2             # minicaffe.proto.caffe_pb2

or run a pycaffe script as it is:

    python -m minicaffe.compat train_net.py --its --own --args

Python layers (`type: "Python"`) install the alias by themselves when they load
their module, unless a real `caffe` is already imported, so their
`class MyLayer(caffe.Layer)` subclasses minicaffe.Layer.
"""
import importlib
import importlib.abc
import importlib.util
import os
import runpy
import sys

import minicaffe

__all__ = ["install", "uninstall", "is_installed", "install_if_absent"]

ALIAS = "caffe"


class _AliasLoader(importlib.abc.Loader):
    """Hands the import system a module that is already loaded (minicaffe's)."""

    def __init__(self, module):
        self.module = module

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        pass  # already executed under its minicaffe name


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Resolves `caffe.<sub>` to `minicaffe.<sub>` (caffe.proto, caffe.io, ...)."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(ALIAS + ".") or sys.modules.get(ALIAS) is not minicaffe:
            return None
        real_name = "minicaffe" + fullname[len(ALIAS):]
        try:
            module = importlib.import_module(real_name)
        except ModuleNotFoundError as exc:
            if exc.name == real_name:
                return None  # let the usual "No module named caffe.x" error happen
            raise
        return importlib.util.spec_from_loader(fullname, _AliasLoader(module))


_finder = _AliasFinder()


def is_installed():
    return sys.modules.get(ALIAS) is minicaffe


def install(replace=False):
    """Make `import caffe` (and `import caffe.<sub>`) give minicaffe.

    If a different `caffe` (real pycaffe) is already imported this raises,
    unless replace=True, which drops it from sys.modules.
    """
    existing = sys.modules.get(ALIAS)
    if existing is not None and existing is not minicaffe:
        if not replace:
            where = getattr(existing, "__file__", None) or repr(existing)
            raise RuntimeError(f"a different 'caffe' module is already imported ({where}); call "
                               f"minicaffe.compat.install() before anything imports caffe, or "
                               f"install(replace=True) to swap it out")
        for name in [n for n in sys.modules if n == ALIAS or n.startswith(ALIAS + ".")]:
            del sys.modules[name]
    sys.modules[ALIAS] = minicaffe
    # Submodules imported already (minicaffe.proto, minicaffe.io, ...) answer to caffe.* now.
    for name, module in list(sys.modules.items()):
        if name.startswith("minicaffe.") and module is not None:
            sys.modules.setdefault(ALIAS + name[len("minicaffe"):], module)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
    return minicaffe


def install_if_absent():
    """install() unless a real caffe is already imported; True if `caffe` is minicaffe now."""
    existing = sys.modules.get(ALIAS)
    if existing is None:
        install()
        return True
    return existing is minicaffe


def uninstall():
    """Remove the alias (and the caffe.* names it created)."""
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    for name in [n for n in sys.modules if n == ALIAS or n.startswith(ALIAS + ".")]:
        module = sys.modules[name]
        if module is minicaffe or getattr(module, "__name__", "").startswith("minicaffe"):
            del sys.modules[name]


def main(argv=None):
    """`python -m minicaffe.compat script.py [args]`: run a pycaffe script on minicaffe."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m minicaffe.compat SCRIPT.py [ARGS...]\n"
              "Runs SCRIPT.py with `import caffe` importing minicaffe.")
        return 0 if argv else 2
    script = argv[0]
    if not os.path.isfile(script):
        print(f"minicaffe.compat: error: no such script: {script}", file=sys.stderr)
        return 2
    install()
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script.py` does
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
