"""Compiled kernels: the one switch between numba loops and the numpy paths they replace.

numba is optional (`pip install "minicaffe[fast]"`). A kernel is a plain loop nest written in
Python, decorated with `kernel`: with numba it is compiled to machine code on its first call
(and cached on disk); without numba the call runs the Python function itself, which stays
correct (the tests run it) but is far too slow to use. So callers choose their path with
`enabled()`, at reshape time, and keep their numpy path for when it is False.

Where numpy runs a kernel as many whole-array passes, each reading and writing memory (a 3x3
depthwise convolution: nine multiplies and eight adds over every channel block), a compiled
loop makes one pass and keeps its sums in registers. Kernels run on one thread with the GIL
released; callers split them over minicaffe.threads' pool, as the numpy paths do, so no second
thread pool competes with BLAS's.

MINICAFFE_JIT=0 in the environment turns compiled kernels off (numba installed or not), and
`set_enabled(False)` does so at run time, e.g. to compare both paths (benchmarks/deploy_bench.py
--numpy). The price of compiled kernels is memory: numba's LLVM adds about 150 MB to the peak RSS
of a process that runs one (MobileNet v1 at batch 1, inference: 232 MB instead of 82).
"""
import importlib.util
import os
import threading
import types

__all__ = ["kernel", "enabled", "set_enabled", "available", "INSTALL_HINT"]

INSTALL_HINT = 'compiled kernels need numba: pip install "minicaffe[fast]"'

_enabled = None   # None: not decided yet (MINICAFFE_JIT and numba's presence decide)
_compile_lock = threading.RLock()   # a kernel compiles the kernels it calls first


def available():
    """Whether numba is installed (it is imported only when a kernel first runs)."""
    return importlib.util.find_spec("numba") is not None


def _from_env():
    value = os.environ.get("MINICAFFE_JIT", "").strip().lower()
    if value in ("", "1", "on", "true", "yes"):
        return available()
    if value in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"MINICAFFE_JIT={value!r}: use 1 (compiled kernels, if numba is installed) or 0")


def enabled():
    """Whether layers should run their compiled kernels (read by each layer at its reshape)."""
    global _enabled
    if _enabled is None:
        _enabled = _from_env()
    return _enabled


def set_enabled(flag):
    """Turn compiled kernels on or off for layers reshaped from now on."""
    global _enabled
    if not isinstance(flag, bool):
        raise ValueError(f"set_enabled takes True or False, got {flag!r}")
    if flag and not available():
        raise RuntimeError(INSTALL_HINT)
    _enabled = flag


class kernel:
    """Decorator: fn compiled by numba (nopython, GIL released, cached on disk) at its first call,
    or fn itself when numba is missing. Bounds are not checked: callers pass arrays sized by their
    reshape. numba (and its LLVM, about 150 MB of resident code) is imported only then, so a net none of
    whose layers runs a compiled kernel costs no memory for it. A kernel may call other kernels
    (module globals): they are compiled first and called as compiled code."""

    def __init__(self, fn, cache=True):
        self.py_func, self.cache = fn, cache
        self.__doc__, self.__name__ = fn.__doc__, fn.__name__
        self._compiled = None

    def __call__(self, *args):
        return self.compiled()(*args)

    def compiled(self):
        """The function that runs: numba's compiled dispatcher, or py_func without numba."""
        if self._compiled is None:
            with _compile_lock:
                if self._compiled is None:
                    self._compiled = self._compile()
        return self._compiled

    def _compile(self):
        if not available():
            return self.py_func
        import numba
        fn = self.py_func
        callees = {name: value.compiled() for name in fn.__code__.co_names
                   if isinstance(value := fn.__globals__.get(name), kernel)}
        if callees:   # numba resolves globals at typing time: point them at the compiled callees
            fn = types.FunctionType(fn.__code__, {**fn.__globals__, **callees}, fn.__name__,
                                    fn.__defaults__, fn.__closure__)
            fn.__qualname__, fn.__module__ = self.py_func.__qualname__, self.py_func.__module__
        return numba.njit(nogil=True, cache=self.cache, boundscheck=False)(fn)
