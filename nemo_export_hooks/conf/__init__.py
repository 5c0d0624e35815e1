"""The Hydra config group ``hf_export`` (``hf_export/default.yaml``, ``hf_export/qat.yaml``),
shipped inside the package so that an installed wheel has it.

A Hydra recipe of your own finds it by adding this package to its search path::

    # my_recipe.yaml
    hydra:
      searchpath:
        - pkg://nemo_export_hooks.conf
    defaults:
      - hf_export: default
      - _self_
    hf_export:
      arch: qwen3_moe

and turns the export on with ``hf_export.enabled=true``.
"""

from __future__ import annotations

from importlib.resources import files

__all__ = ["SEARCHPATH", "GROUP", "group_file"]

SEARCHPATH = "pkg://nemo_export_hooks.conf"
GROUP = "hf_export"


def group_file(option: str = "default"):
    """The YAML of one option of the ``hf_export`` group (``default`` or ``qat``), as an
    ``importlib.resources`` traversable (a real file in a wheel install)."""
    f = files(__name__) / GROUP / f"{option}.yaml"
    if not f.is_file():
        raise ValueError(f"hf_export group has no option {option!r} (options: default, qat)")
    return f
