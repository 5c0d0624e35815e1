"""Compatibility import path: the Lightning / NeMo 2 callback lives in
:mod:`nemo_export_hooks.integrations.lightning`, its scheduling core in
:mod:`nemo_export_hooks.scheduler`, the refusals in :mod:`nemo_export_hooks.store.commit`."""

from .config import ExportConfig
from .integrations.lightning import HFExportCallback, _SaveHook, callbacks_from_cfg
from .store.commit import ExportRefusedError

__all__ = ["HFExportCallback", "callbacks_from_cfg", "ExportConfig", "ExportRefusedError", "_SaveHook"]
