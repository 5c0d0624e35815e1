"""Registry of architecture rules, keyed by the HF ``model_type`` they write.

A rule registers itself with the :func:`rule` decorator (or :func:`register`) when its module
is imported.  Built-in rules are the modules of this package, found by listing it, so a new
architecture is one new file here.  Third-party packages add rules through the entry point
group ``nemo_export_hooks.rules``: each entry point names a module (or an object) that
registers its rules on import, e.g. in ``pyproject.toml``::

    [project.entry-points."nemo_export_hooks.rules"]
    my_arch = "my_package.my_arch_rule"
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from typing import Callable, Union

from .base import ArchMismatchError, ArchRule

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "nemo_export_hooks.rules"
RULES: dict[str, ArchRule] = {}
_loaded = False


def register(rule: ArchRule) -> ArchRule:
    """Add ``rule`` under its ``model_type``; a second rule for the same type is an error
    (two modules claiming one architecture would otherwise depend on import order)."""
    old = RULES.get(rule.model_type)
    if old is not None and old is not rule:
        raise ValueError(f"arch {rule.model_type!r} is registered twice ({old.architecture} and {rule.architecture})")
    RULES[rule.model_type] = rule
    return rule


def rule(obj: Union[ArchRule, Callable[[], ArchRule]]) -> ArchRule:
    """Decorator: ``@rule`` on a function returning an :class:`ArchRule` (or applied to a
    rule) registers it and leaves the module attribute bound to the rule."""
    r = obj if isinstance(obj, ArchRule) else obj()
    if not isinstance(r, ArchRule):
        raise TypeError(f"@rule expects an ArchRule or a function returning one, got {type(r).__name__}")
    return register(r)


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if m.name != "base" and not m.name.startswith("_"):
            importlib.import_module(f"{__name__}.{m.name}")
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:  # a broken plug-in must not hide the built-in rules
            log.warning("HF export: rule plug-in %s (%s) failed to load: %s", ep.name, ep.value, e)


# model_types of checkpoints a Megatron language model cannot fill, with the arch to use instead
_INSTEAD = {
    "qwen3_5_moe": ("qwen3_5_moe_text", "qwen3_5_moe is the multimodal Qwen3.5 checkpoint (a vision tower "
                    "Megatron's language model does not have); its text model is"),
}


def get_rule(arch: str) -> ArchRule:
    _load_all()
    try:
        return RULES[arch]
    except KeyError:
        hint = ""
        if arch in _INSTEAD and _INSTEAD[arch][0] in RULES:
            hint = f" ({_INSTEAD[arch][1]} arch={_INSTEAD[arch][0]!r})"
        raise ValueError(f"unknown arch {arch!r}{hint}; supported: {', '.join(sorted(RULES))}") from None


def all_rules() -> dict[str, ArchRule]:
    _load_all()
    return dict(RULES)


__all__ = ["ArchMismatchError", "ArchRule", "ENTRY_POINT_GROUP", "RULES", "all_rules", "get_rule", "register", "rule"]
