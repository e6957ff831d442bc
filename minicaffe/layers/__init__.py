"""Built-in layers, one module per family; importing this package registers them all.

Every module in this folder is imported, so a new family needs no edit here.
"""
import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_info.name}")
