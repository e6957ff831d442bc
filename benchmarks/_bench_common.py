"""Helpers shared by the benchmarks that run each engine in its own child process.

A child per engine keeps peak RSS that engine's alone (os.wait4 reports one child's usage) and
keeps one engine's thread pools and allocator state away from the other's.
"""
import os
import pathlib
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


def alternated(rounds, engines):
    """(round, engine) pairs, the engine order reversed every other round so neither always goes first."""
    for r in range(rounds):
        for engine in (engines if r % 2 == 0 else engines[::-1]):
            yield r, engine


def print_command(script):
    """The command line that reproduces the table below it."""
    print(f"\n$ python benchmarks/{pathlib.Path(script).name} {' '.join(sys.argv[1:])}".rstrip())


def print_table(header, rows):
    """A markdown table: header is a list of column names, rows lists of cell strings."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
