"""Thin adapters that connect the framework-free scheduler (:mod:`nemo_export_hooks.scheduler`)
to a training framework: :mod:`.lightning` (Lightning / NeMo 2) and :mod:`.megatron_bridge`
(Megatron-Bridge).  Each is imported only when used, so the package imports with neither."""

from typing import Any

from ..config import ExportConfig


def export_node(cfg: Any, key: str = "hf_export") -> Any:
    """The enabled ``hf_export`` node of a recipe config (or ``cfg`` itself), else ``None``."""
    node = cfg
    if cfg is not None and not _looks_like_export_node(cfg):
        node = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
    if node is None:
        return None
    enabled = node.enabled if isinstance(node, ExportConfig) else bool(node.get("enabled", False)) if hasattr(node, "get") else False
    return node if enabled else None


def _looks_like_export_node(cfg: Any) -> bool:
    if isinstance(cfg, ExportConfig):
        return True
    try:
        keys = set(cfg.keys())
    except Exception:
        return False
    return "arch" in keys or ("enabled" in keys and "on_checkpoint_save" in keys)

