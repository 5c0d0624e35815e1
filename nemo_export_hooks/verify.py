"""``verify_export``: the public check of a published export (what ``nemo-export-hooks
verify`` runs).

Why a module above ``store/``: the reader (:mod:`nemo_export_hooks.store.verify`) knows the
HF format only; this one adds what the exporter knows, the tensor-name suffixes of the
quantized formats and the checks of ``config.json`` against the HF model class, so that
``store/`` imports nothing from ``exporter/``.
"""

from __future__ import annotations

from typing import Optional

from .store.fs import PathLike
from .store.verify import ConfigChecks
from .store.verify import verify_export as _read_and_check

__all__ = ["verify_export", "quant_suffixes", "config_checks"]


def quant_suffixes() -> tuple:
    """The tensor-name suffixes of the registered quantization formats (scales beside a
    weight), as the exporter writes them: ``(".weight_scale", ".input_scale", ...)``."""
    from .exporter.quant import tensor_suffixes

    return tensor_suffixes()


def config_checks() -> Optional[ConfigChecks]:
    """The exporter's checks of ``config.json`` against the HF class; ``None`` without
    transformers (nothing is compared then)."""
    try:
        import transformers  # noqa: F401

        from .exporter.hf_config import config_problems, expected_hf_shapes, short_repr
        from .exporter.quant import logical_weight_shape
    except ImportError:
        return None
    return ConfigChecks(config_problems, expected_hf_shapes, short_repr, logical_weight_shape)


def verify_export(path: PathLike, load_config: bool = True) -> list[str]:
    """Check an export; return human-readable problems (an empty list means it is good).
    See :func:`nemo_export_hooks.store.verify.verify_export` for what is checked;
    ``load_config=False`` (the CLI's ``--no-load-config``) checks files and index only,
    without transformers (nor torch)."""
    checks = config_checks() if load_config else None
    suffixes = quant_suffixes() if checks is not None else ()
    return _read_and_check(path, load_config, known_suffixes=suffixes, config_checks=checks)
