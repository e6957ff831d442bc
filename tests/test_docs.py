"""The learner's guide in docs/ cannot rot: every code block in it runs here.

Each chapter's ```python blocks run in order in one namespace, in a fresh working
directory holding a copy of models/; a ```text block right after a code block
(only blank lines between them) is the output that block must print. ```bash
blocks run with `minicaffe` on PATH pointing at this checkout. The figure script
runs into a temporary folder (the training curve comes from the committed CSV).
"""
import contextlib
import io
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CHAPTERS = sorted(DOCS.glob("*.md"))


def code_blocks(text):
    """[(language, code, expected output or None)] in reading order."""
    blocks = []
    fence = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
    found = list(fence.finditer(text))
    i = 0
    while i < len(found):
        m = found[i]
        lang, code = m.group(1), m.group(2)
        expected = None
        if lang != "text" and i + 1 < len(found):
            nxt = found[i + 1]
            if nxt.group(1) == "text" and not text[m.end():nxt.start()].strip():
                expected = nxt.group(2)
                i += 1
        blocks.append((lang, code, expected))
        i += 1
    return blocks


def _normalized(output):
    return "\n".join(line.rstrip() for line in output.strip("\n").splitlines())


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "models", tmp_path / "models",
                    ignore=shutil.ignore_patterns("*.caffemodel", "*.solverstate", "__pycache__"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "minicaffe"
    shim.write_text(f"#!/bin/sh\nexec '{sys.executable}' -m minicaffe \"$@\"\n")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    monkeypatch.chdir(tmp_path)
    # Layers a chapter registers (GuideSquare, the plugin's LearnableSwish) leave with it, and
    # the example plugins other tests loaded from models/ make way for the chapter's copies.
    from minicaffe import layer as layer_module
    examples = str(ROOT / "models")
    registry = {name: cls for name, cls in layer_module._REGISTRY.items()
                if not (layer_module._module_file(cls) or "").startswith(examples)}
    monkeypatch.setattr(layer_module, "_REGISTRY", registry)
    monkeypatch.setattr(layer_module, "_SOURCES", dict(layer_module._SOURCES))
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=str(ROOT))
    return tmp_path, env


def test_guide_has_its_chapters():
    names = {p.name for p in CHAPTERS}
    assert "README.md" in names
    assert len([n for n in names if re.match(r"\d\d-", n)]) == 6, names
    for p in CHAPTERS:
        text = p.read_text()
        # every fence is part of a block the runner sees (none hidden in an indented list)
        assert text.count("```") == 2 * len(code_blocks(text)) + sum(
            1 for _, _, expected in code_blocks(text) if expected is not None) * 2, p.name
    index = (DOCS / "README.md").read_text()
    for p in CHAPTERS:
        if p.name != "README.md":
            assert f"({p.name})" in index, f"docs/README.md does not link {p.name}"


def test_readme_links_to_the_guide_near_the_top():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:25])
    assert "docs/README.md" in first_screen


@pytest.mark.parametrize("chapter", [p for p in CHAPTERS if code_blocks(p.read_text())],
                         ids=lambda p: p.name)
def test_chapter_code_runs(chapter, workdir):
    cwd, env = workdir
    namespace = {"__name__": "__guide__"}
    for n, (lang, code, expected) in enumerate(code_blocks(chapter.read_text()), 1):
        where = f"{chapter.name}, code block {n} ({lang})"
        if lang == "python":
            sys.path.insert(0, str(cwd))
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    exec(compile(code, where, "exec"), namespace)
            finally:
                sys.path.remove(str(cwd))
            printed = out.getvalue()
        elif lang in ("bash", "sh"):
            run = subprocess.run(["bash", "-e", "-c", code], cwd=cwd, env=env, capture_output=True,
                                 text=True, timeout=300)
            assert run.returncode == 0, f"{where} failed:\n{run.stdout}\n{run.stderr}"
            printed = run.stdout
        elif lang == "text":
            continue
        else:
            pytest.fail(f"{where}: unknown block language {lang!r} (use python, bash or text)")
        if expected is not None:
            assert _normalized(printed) == _normalized(expected), f"{where} printed:\n{printed}"


def test_make_figures_writes_every_figure(tmp_path):
    pytest.importorskip("matplotlib", reason="docs/make_figures.py needs matplotlib (extra 'plot')")
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    run = subprocess.run([sys.executable, str(DOCS / "make_figures.py"), "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    committed = sorted(p.name for p in (DOCS / "figures").glob("*.png"))
    assert written == committed and len(written) >= 5, (written, committed)
    for name in written:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
