"""Optional dependencies, and the pip extra that installs each.

The package itself needs only torch, safetensors and numpy; the rest comes with an extra
(``pyproject.toml``).  Where the package imports an optional module, it goes through
:func:`require` (or raises :func:`missing_extra`), so a missing one reads::

    ImportError: HFExportCallback needs Lightning, which is not installed (No module named
    'lightning'): pip install "nemo-export-hooks[lightning]"

instead of a bare ``ModuleNotFoundError`` that does not say what to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtraError", "install_command", "lightning_pytorch", "missing_extra", "require"]

# extra -> what it brings (the names a reader knows the packages by)
EXTRAS = {
    "lightning": "Lightning (with OmegaConf and Hydra)",
    "megatron": "Megatron-Core",
    "hf": "transformers",
    "quant": "NVIDIA ModelOpt",
    "bridge": "Megatron-Bridge (Python >= 3.12, CUDA)",
    "bench": "matplotlib",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, message: str, extra: str):
        super().__init__(message)
        self.extra = extra


def install_command(extra: str) -> str:
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r} (extras: {', '.join(EXTRAS)})")
    return f'pip install "nemo-export-hooks[{extra}]"'


def missing_extra(extra: str, needed_by: str, error: BaseException | None = None) -> MissingExtraError:
    """The error to raise (``raise missing_extra(...) from e``) when ``needed_by`` cannot import
    what ``extra`` installs."""
    cause = f" ({error})" if error is not None else ""
    return MissingExtraError(
        f"{needed_by} needs {EXTRAS[extra]}, which is not installed{cause}: {install_command(extra)}", extra
    )


def require(extra: str, module: str, needed_by: str) -> ModuleType:
    """``import module``, or raise :class:`MissingExtraError` naming ``extra``.

    Only a missing module (``ModuleNotFoundError`` for ``module`` or a package above it) becomes
    the extra's message; an installed module that fails to import raises its own error.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and not (module == e.name or module.startswith(e.name + ".")):
            raise  # the module is there; something it imports is not: that error is the real one
        raise missing_extra(extra, needed_by, e) from e


def lightning_pytorch(needed_by: str) -> ModuleType:
    """Lightning's trainer package: ``lightning.pytorch``, else the standalone
    ``pytorch_lightning`` (NeMo 2 images carry one or the other), else
    :class:`MissingExtraError` naming the ``lightning`` extra.  As :func:`require`, a package
    that is installed but fails inside its own import raises its own error."""
    try:
        return importlib.import_module("lightning.pytorch")
    except ModuleNotFoundError as no_lightning:
        if no_lightning.name not in ("lightning", "lightning.pytorch"):
            raise
        try:
            return importlib.import_module("pytorch_lightning")
        except ModuleNotFoundError as no_pl:
            if no_pl.name != "pytorch_lightning":
                raise
            raise missing_extra("lightning", needed_by, no_lightning) from None
