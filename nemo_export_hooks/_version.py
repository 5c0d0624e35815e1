"""The package version, in a leaf module: the package ``__init__`` and every module below
it (the exporter's ``hf_quant_config.json``, the manifest's producer) read it from here, so
nothing below the package imports its ``__init__``."""

try:
    from importlib.metadata import version as _version

    __version__ = _version("nemo-export-hooks")
except Exception:  # pragma: no cover - not installed
    __version__ = "0+unknown"
