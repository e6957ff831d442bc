"""Importing a script of benchmarks/ in a test (they are scripts, not a package)."""
import importlib
import pathlib
import sys

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name):
    """The module benchmarks/<name>.py (which imports its sibling _bench_common)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))
