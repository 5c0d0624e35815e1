"""A missing optional dependency names the extra that installs it (``nemo_export_hooks.extras``).

Each case runs a fresh Python in which the extra's packages are blocked as if not installed
(``nemo_export_hooks.testing.absent``), does what a user does, and checks the message.  The
same messages are checked against the installed wheel, where quant and Bridge are really
absent, by ``tests/wheel/wheel_smoke.py`` (``make test-wheel``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_export_hooks.extras import MissingExtraError, install_command, require
from nemo_export_hooks.testing.absent import preamble
from test_cli_verify import export_dir  # noqa: F401  (fixture: a tiny llama export, no Megatron)

ROOT = Path(__file__).resolve().parents[1]

# extra -> (packages blocked, what the user runs)
CASES = {
    "lightning": (["lightning", "pytorch_lightning"], "from nemo_export_hooks import HFExportCallback"),
    "megatron": (["megatron"], "from nemo_export_hooks.testing.cpu import build_gpt"),
    "quant": (["modelopt"], "from recipes import bridge_qat_qwen3_moe as r; r.compose(['hf_export.enabled=true'])"),
    "bridge": (["megatron.bridge"], "from recipes import bridge_pretrain_qwen3_moe as r; r.compose(['train.train_iters=10'])"),
}


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("extra", sorted(CASES))
def test_missing_extra_is_named(extra, tmp_path):
    blocked, code = CASES[extra]
    p = run_python(preamble(*blocked) + code, tmp_path)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("nemo_export_hooks.extras.MissingExtraError: "), p.stderr[-2000:]
    assert last.endswith(install_command(extra)) and f'"nemo-export-hooks[{extra}]"' in last


def test_verify_without_transformers_names_the_hf_extra(export_dir, tmp_path):  # noqa: F811
    p = run_python(preamble("transformers") + f"from nemo_export_hooks.cli import main; raise SystemExit(main(['verify', {str(export_dir)!r}]))", tmp_path)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "transformers is not installed" in p.stdout and install_command("hf") in p.stdout
    # what it says to do works: the export itself is fine
    p = run_python(preamble("transformers") + f"from nemo_export_hooks.cli import main; raise SystemExit(main(['verify', '--no-load-config', {str(export_dir)!r}]))", tmp_path)
    assert p.returncode == 0 and p.stdout.startswith("OK:"), p.stdout + p.stderr[-2000:]


def test_require_names_only_a_missing_package(tmp_path, monkeypatch):
    """An installed package that fails on a missing dependency of its own raises that error, not
    the extra's message (which would send the user to install what they have)."""
    (tmp_path / "halfinstalled").mkdir()
    (tmp_path / "halfinstalled" / "__init__.py").write_text("import not_a_dependency_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as e:
        require("hf", "halfinstalled", "a test")
    assert not isinstance(e.value, MissingExtraError) and e.value.name == "not_a_dependency_anywhere"
    with pytest.raises(MissingExtraError, match=r'a test needs transformers, which is not installed .*: pip install "nemo-export-hooks\[hf\]"'):
        require("hf", "not_installed_anywhere.sub", "a test")
    with pytest.raises(ValueError, match="unknown extra 'hff'"):
        install_command("hff")
