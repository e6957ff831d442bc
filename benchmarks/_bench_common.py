"""Helpers shared by the benchmarks that run each engine in its own child process.

A child per engine keeps peak RSS that engine's alone (os.wait4 reports one child's usage) and
keeps one engine's thread pools and allocator state away from the other's.
"""
import argparse
import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def child_env(threads, pythonpath=()):
    """os.environ with every BLAS / OpenMP pool set to `threads` and this checkout importable first."""
    t = str(threads)
    env = dict(os.environ, OMP_NUM_THREADS=t, OPENBLAS_NUM_THREADS=t, MKL_NUM_THREADS=t)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), *pythonpath, env.get("PYTHONPATH")]))
    return env


def child_rss_mb(cmd, env):
    """Runs cmd and measures its peak RSS through wait4, which reports that one child's usage."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} ... failed (exit {proc.returncode}):\n{output[-1500:]}")
    return output, usage.ru_maxrss / 1024


def in_process_args(description, rounds, repeats_help):
    """Parse --threads / --rounds / --repeats for a benchmark that times both of its paths in
    its own process, and set the thread count for BLAS and minicaffe before either is loaded."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=2, help="threads for both (default 2)")
    parser.add_argument("--rounds", type=int, default=rounds, help=f"alternated rounds (default {rounds})")
    parser.add_argument("--repeats", type=int, default=5, help=f"{repeats_help} timed per round (default 5)")
    args = parser.parse_args()
    if min(args.threads, args.rounds, args.repeats) < 1:
        parser.error("--threads, --rounds and --repeats must be at least 1")
    os.environ["OMP_NUM_THREADS"] = os.environ["MINICAFFE_THREADS"] = str(args.threads)
    return args


def alternated(rounds, engines):
    """(round, engine) pairs, the engine order reversed every other round so neither always goes first."""
    for r in range(rounds):
        for engine in (engines if r % 2 == 0 else engines[::-1]):
            yield r, engine


# Run in a child with the children's environment: the name of the kernel set numpy's OpenBLAS
# picked (OpenBLAS reads OPENBLAS_CORETYPE once, when numpy loads it), or "" if it is not OpenBLAS.
_KERNELS_PROBE = """
import ctypes, numpy
paths = {l.split()[-1] for l in open('/proc/self/maps') if 'openblas' in l.lower() and '/' in l}
for path in sorted(paths):
    for name in ('scipy_openblas_get_corename64_', 'scipy_openblas_get_corename', 'openblas_get_corename64_',
                 'openblas_get_corename'):
        getter = getattr(ctypes.CDLL(path), name, None)
        if getter is not None:
            getter.restype = ctypes.c_char_p
            print(getter().decode())
            raise SystemExit
"""


def blas_kernels(env):
    """Which kernels numpy's OpenBLAS runs in a child with environment `env`, as a phrase."""
    done = subprocess.run([sys.executable, "-c", _KERNELS_PROBE], env=env, capture_output=True, text=True)
    name = done.stdout.strip() if done.returncode == 0 else ""
    forced = env.get("OPENBLAS_CORETYPE")
    if not name:
        return "numpy's BLAS is not OpenBLAS (or not found)"
    # minicaffe/_blas_env.py sets it in minicaffe's own processes when it is not set
    timeout = env.get("OPENBLAS_THREAD_TIMEOUT")
    spin = (f"; its threads spin 2^{timeout} cycles after a GEMM (OPENBLAS_THREAD_TIMEOUT={timeout})"
            if timeout else "; OPENBLAS_THREAD_TIMEOUT unset (minicaffe's processes set their default)")
    if forced:
        return (f"numpy's OpenBLAS runs its {name} kernels, forced by OPENBLAS_CORETYPE={forced} "
                f"(unset it to run the kernels OpenBLAS picks for this CPU){spin}")
    return f"numpy's OpenBLAS runs its {name} kernels (its own pick for this CPU){spin}"


def compiled_kernels(env):
    """Whether minicaffe's children run its compiled (numba) kernels, as a phrase."""
    if env.get("MINICAFFE_JIT", "").strip().lower() in ("0", "off", "false", "no"):
        return "minicaffe's compiled kernels off (MINICAFFE_JIT=0)"
    try:
        version = importlib.metadata.version("numba")
    except importlib.metadata.PackageNotFoundError:
        return 'minicaffe\'s compiled kernels off: numba is not installed (pip install "minicaffe[fast]")'
    return f"minicaffe's compiled kernels on (numba {version})"


def print_command(script, env=None):
    """The command line that reproduces the table below it (and, given the children's
    environment, which BLAS kernels and whether compiled kernels minicaffe ran on)."""
    print(f"\n$ python benchmarks/{pathlib.Path(script).name} {' '.join(sys.argv[1:])}".rstrip())
    if env is not None:
        print(blas_kernels(env))
        print(compiled_kernels(env))


def print_table(header, rows):
    """A markdown table: header is a list of column names, rows lists of cell strings."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


# glog's time stamp on Solver::Step's display line (Caffe's, and minicaffe train's own log)
_ITERATION_LINE = re.compile(r"^[IWE]\d{4}(?:\d{4})? (\d\d):(\d\d):(\d\d\.\d+) .*\] Iteration (\d+) \(", re.M)


def iteration_stamps(log):
    """{iteration: seconds since midnight} of each `Iteration N (...)` display line in a log."""
    return {int(n): (int(h) * 60 + int(m)) * 60 + float(s) for h, m, s, n in _ITERATION_LINE.findall(log)}
