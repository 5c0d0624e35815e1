"""The ``hf_export`` Hydra config group ships inside the package (``nemo_export_hooks/conf``):
a recipe of the user's own, in a directory of theirs, composes it through
``pkg://nemo_export_hooks.conf``.  The same against the installed wheel, with a training run:
``tests/wheel/wheel_smoke.py`` (``make test-wheel``)."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("hydra")

from hydra import compose, initialize_config_dir  # noqa: E402

from nemo_export_hooks.callback import HFExportCallback, callbacks_from_cfg  # noqa: E402
from nemo_export_hooks.conf import SEARCHPATH, group_file  # noqa: E402
from nemo_export_hooks.config import ExportConfig  # noqa: E402

USER_RECIPE = f"""\
hydra:
  searchpath:
    - {SEARCHPATH}
defaults:
  - hf_export: default
  - _self_

lr: 1.0e-4
hf_export:
  arch: qwen3
"""


def _compose(conf_dir, name, overrides=()):
    with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def test_users_own_recipe_composes_the_packaged_group(tmp_path):
    (tmp_path / "my_recipe.yaml").write_text(USER_RECIPE)
    cfg = _compose(tmp_path, "my_recipe")
    assert cfg.lr == 1.0e-4 and cfg.hf_export.enabled is False and callbacks_from_cfg(cfg) == []
    assert set(cfg.hf_export.keys()) == {f.name for f in dataclasses.fields(ExportConfig)}
    (cb,) = callbacks_from_cfg(_compose(tmp_path, "my_recipe", ["hf_export.enabled=true", "hf_export.keep_last_k=2"]))
    assert isinstance(cb, HFExportCallback) and cb.config.arch == "qwen3" and cb.config.keep_last_k == 2
    qat = _compose(tmp_path, "my_recipe", ["hf_export=qat", "hf_export.enabled=true"])
    assert qat.hf_export.expect_quant == "NVFP4" and qat.hf_export.arch == "qwen3"


def test_without_the_searchpath_the_group_is_not_found(tmp_path):
    """The searchpath line is what finds it (so the test above cannot pass by accident)."""
    from hydra.errors import MissingConfigException

    (tmp_path / "my_recipe.yaml").write_text(USER_RECIPE.replace(f"    - {SEARCHPATH}\n", "    []\n").replace("  searchpath:\n    []", "  searchpath: []"))
    with pytest.raises(MissingConfigException, match="hf_export"):
        _compose(tmp_path, "my_recipe")


def test_group_file():
    assert "expect_quant: NVFP4" in group_file("qat").read_text()
    with pytest.raises(ValueError, match="no option 'int8'"):
        group_file("int8")
