"""Module-level skips shared by the GPU tests: they must run before anything imports
Transformer Engine or megatron-core, so they live apart from ``gpu_common``."""

from __future__ import annotations

import importlib
import importlib.util

import pytest


def require_gpu(*modules: str, gpus: int = 1):
    """Skip the calling test module unless CUDA with ``gpus`` devices is there and every
    module in ``modules`` imports (TE's import can fail with OSError when its libraries are
    missing).  Returns ``torch``."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (run on the device: scripts/gpu_suite.sh)", allow_module_level=True)
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs (nvidia-h200-x{gpus})", allow_module_level=True)
    for mod in modules:
        try:
            if importlib.util.find_spec(mod.split(".")[0]) is None:
                raise ImportError(mod)
            importlib.import_module(mod)
        except Exception as e:
            pytest.skip(f"{mod} not importable ({type(e).__name__}: {e})", allow_module_level=True)
    return torch
