"""Registry of architecture rules, keyed by the HF ``model_type`` they write."""

from __future__ import annotations

from .base import ArchMismatchError, ArchRule
from .llama import LLAMA, QWEN2, QWEN3
from .moe import MIXTRAL, QWEN3_MOE

RULES: dict[str, ArchRule] = {r.model_type: r for r in (LLAMA, QWEN2, QWEN3, QWEN3_MOE, MIXTRAL)}


def register(rule: ArchRule) -> None:
    RULES[rule.model_type] = rule


def get_rule(arch: str) -> ArchRule:
    _load_optional()
    try:
        return RULES[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; supported: {', '.join(sorted(RULES))}") from None


def _load_optional() -> None:
    """Rules in their own modules register themselves on import."""
    import importlib

    for mod in ("deepseek_v3", "nemotron_h"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise


__all__ = ["ArchMismatchError", "ArchRule", "RULES", "get_rule", "register"]
