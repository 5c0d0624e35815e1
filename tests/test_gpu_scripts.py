"""The device runs' own files, checked where CI runs (no GPU).

A device session is 30 minutes, and a script that fails to parse, or a call in docs/GPU.md that
names a file which is not there, costs a machine start and a call of it.  So: every shell script
under ``scripts/`` parses (``bash -n``), every Python file under ``tests/gpu/`` compiles (most of
them are never imported on CPU: their modules skip at collection, the smokes are not collected),
and every script or test file docs/GPU.md names exists.
"""

from __future__ import annotations

import py_compile
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHELL = sorted(ROOT.glob("scripts/**/*.sh"))
GPU_PY = sorted((ROOT / "tests" / "gpu").glob("*.py"))


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize("script", SHELL, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_script_parses(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("source", GPU_PY, ids=lambda p: p.name)
def test_gpu_python_compiles(source, tmp_path):
    py_compile.compile(str(source), cfile=str(tmp_path / "x.pyc"), doraise=True)


def test_files_named_in_gpu_doc_exist():
    doc = (ROOT / "docs" / "GPU.md").read_text()
    named = sorted(set(re.findall(r"(?:scripts|tests/gpu)/[A-Za-z0-9_/.-]+\.(?:sh|py)", doc)))
    assert len(named) >= 10, named  # the pattern still finds the call table's files
    missing = [n for n in named if not (ROOT / n).is_file()]
    assert not missing, f"docs/GPU.md names files that do not exist: {missing}"


def test_checks_can_fail(tmp_path):
    """The two checks above on a broken script and a broken module."""
    bad_sh = tmp_path / "bad.sh"
    bad_sh.write_text("if true; then\n  echo x\n")  # no fi
    assert subprocess.run(["bash", "-n", str(bad_sh)], capture_output=True).returncode != 0
    bad_py = tmp_path / "bad.py"
    bad_py.write_text("def f(:\n    pass\n")
    with pytest.raises(py_compile.PyCompileError):
        py_compile.compile(str(bad_py), cfile=str(tmp_path / "bad.pyc"), doraise=True)
