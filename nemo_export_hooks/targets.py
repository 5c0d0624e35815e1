"""Deprecated: the refusals of a target directory now live in
:mod:`nemo_export_hooks.store.commit` (``check_target`` is ``check_target_dir`` there).
Re-exported for one release; new code imports from ``store.commit``."""

from __future__ import annotations

from .store.commit import (  # noqa: F401
    ExportRefusedError,
    check_target_dir,
    check_writable,
    checkpoint_markers,
    inside_its_checkpoint,
    refuse_inside_checkpoint,
    remove_staging_of,
    same_lineage,
    training_checkpoint_containing,
)

check_target = check_target_dir

__all__ = [
    "ExportRefusedError",
    "check_writable",
    "checkpoint_markers",
    "training_checkpoint_containing",
    "refuse_inside_checkpoint",
    "check_target",
    "remove_staging_of",
    "same_lineage",
    "inside_its_checkpoint",
]
