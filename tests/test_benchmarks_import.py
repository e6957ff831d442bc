"""Every benchmark script imports and parses its arguments: a broken import in one went unseen."""
import subprocess
import sys

import pytest

from tests.benchmark_module import BENCHMARKS

SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))


def test_there_are_benchmarks():
    assert {"deploy_bench.py", "train_bench.py", "winograd_bench.py", "conv_bench.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_runs(script):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                          cwd=BENCHMARKS, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
