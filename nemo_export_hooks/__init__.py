"""nemo-export-hooks: publish Hugging Face checkpoints next to every Megatron/NeMo
training checkpoint, per rank, for dense, MoE (every expert layout) and QAT models."""

from __future__ import annotations

from ._version import __version__

from .config import add_check as _add_check
from .config_checks import exporter_problems as _exporter_problems
from .exporter.api import ExportResult, export_to_hf, prepare_export

_add_check(_exporter_problems)  # ExportConfig.validate() checks arch, dtype, sizes (config_checks)

__all__ = ["export_to_hf", "prepare_export", "ExportResult", "HFExportCallback", "ExportConfig", "callbacks_from_cfg", "__version__"]


def __getattr__(name):
    # The callback needs Lightning; import it only when asked for.
    if name == "HFExportCallback":
        from .callback import HFExportCallback

        return HFExportCallback
    if name == "callbacks_from_cfg":
        from .callback import callbacks_from_cfg

        return callbacks_from_cfg
    if name == "ExportConfig":
        from .config import ExportConfig

        return ExportConfig
    raise AttributeError(name)
