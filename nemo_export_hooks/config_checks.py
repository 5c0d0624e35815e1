"""The checks of an :class:`~nemo_export_hooks.config.ExportConfig` that need the exporter:
the architecture has a rule, the dtype is one the exporter writes, ``max_shard_size``
parses, ``expect_quant`` names a registered quantization format (``exporter.quant``).

Why a module of its own, above both: the config schema imports nothing from the exporter
(a schema must not depend on the code it configures); this module knows both and is
registered with :func:`nemo_export_hooks.config.add_check` by the package's
``__init__``, so ``ExportConfig.validate()`` reports these problems at step 0 as before.
"""

from __future__ import annotations

__all__ = ["exporter_problems"]


def exporter_problems(cfg) -> list[str]:
    """Problems of ``cfg``'s ``arch`` (when set), ``dtype``, ``max_shard_size`` and ``expect_quant``."""
    from .config import size_value

    p: list[str] = []
    if cfg.arch:
        try:
            from .exporter.rules import get_rule

            get_rule(cfg.arch)
        except ValueError as e:
            p.append(str(e))
    try:
        from .exporter.api import resolve_dtype

        resolve_dtype(cfg.dtype)
    except ValueError as e:
        p.append(f"dtype: {e}")
    try:
        from .exporter.writer import parse_size

        parse_size(size_value(cfg.max_shard_size))
    except ValueError as e:
        p.append(f"max_shard_size: {e}")
    if cfg.expect_quant is not None:
        from .exporter.quant import format_names  # the registry of formats (one place per format)

        names = format_names()
        if str(cfg.expect_quant).upper() not in names:
            p.append(f"expect_quant must be {', '.join(map(repr, names))} or null, got {cfg.expect_quant!r}")
    return p
