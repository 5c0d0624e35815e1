"""Decode exported ModelOpt-format weights back to real values (a reference independent of the
exporter's packing code), used by tests/gpu/test_gpu_quant.py.

* NVFP4: ``weight`` uint8 ``[rows, cols/2]`` (two E2M1 codes a byte, the even column in the
  low nibble), ``weight_scale`` float8_e4m3fn ``[rows, cols/16]`` (one per 16-element block),
  ``weight_scale_2`` float32 scalar; value = e2m1 * weight_scale * weight_scale_2.
* FP8: ``weight`` float8_e4m3fn, ``weight_scale`` float32 scalar; value = weight * weight_scale.
"""

from __future__ import annotations

import torch

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def decode_nvfp4(weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor, block: int = 16) -> torch.Tensor:
    w = weight.to(torch.uint8)
    lo = (w & 0x0F).long()
    hi = (w >> 4).long()
    codes = torch.stack([lo, hi], dim=-1).reshape(w.shape[0], w.shape[1] * 2)
    vals = E2M1.to(weight.device)[codes]
    scale = weight_scale.float().repeat_interleave(block, dim=1)[:, : vals.shape[1]]
    return vals * scale * weight_scale_2.float().reshape(())


def decode_fp8(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    s = weight_scale.float()
    if s.dim() == 1 and s.numel() == weight.shape[0]:  # per-channel
        s = s.unsqueeze(1)
    return weight.float() * s


def decode(parts: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
    """``parts`` maps suffix (weight, weight_scale, weight_scale_2, ...) to tensors of one
    exported HF weight; returns (format, decoded float32 weight)."""
    w = parts["weight"]
    if w.dtype == torch.uint8 and "weight_scale_2" in parts:
        return "nvfp4", decode_nvfp4(w, parts["weight_scale"], parts["weight_scale_2"])
    if w.dtype == torch.float8_e4m3fn:
        return "fp8", decode_fp8(w, parts["weight_scale"])
    return "none", w.float()


def external_decoder():
    """``tests/quant_decoder.py`` (another engineer's), if it exists and offers a ``decode``-like
    function taking the same suffix dict; else None."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "quant_decoder.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("quant_decoder", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("quant_decoder", mod)
    spec.loader.exec_module(mod)
    for name in ("decode_parts", "decode", "dequantize_parts", "dequantize"):
        fn = getattr(mod, name, None)
        if callable(fn):
            return fn
    return None
