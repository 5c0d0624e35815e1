"""An independent decoder of the unified-checkpoint quantized formats, for tests.

Written from the format definitions, not from ModelOpt or the exporter: fp8 e4m3fn and
fp4 e2m1 are decoded from their bit fields, nibbles are unpacked low-then-high (element
``2j`` in bits 0-3 of byte ``j``, ``2j+1`` in bits 4-7), and the scales are applied as
``value * (block_scale * global_scale)``.
"""

from __future__ import annotations

import torch


def e4m3fn_to_float(t: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn (or its raw uint8 bytes) -> float32, from the bits: 1 sign, 4 exponent
    bits (bias 7), 3 mantissa bits; exponent 0 is subnormal; S.1111.111 is NaN (no inf)."""
    bits = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    bits = bits.to(torch.int32)
    sign = torch.where((bits >> 7) & 1 == 1, -1.0, 1.0)
    exp = (bits >> 3) & 0xF
    man = (bits & 0x7).to(torch.float32)
    normal = (1.0 + man / 8.0) * torch.pow(2.0, (exp - 7).to(torch.float32))
    subnormal = (man / 8.0) * 2.0**-6
    val = torch.where(exp == 0, subnormal, normal) * sign
    return torch.where((exp == 0xF) & ((bits & 0x7) == 0x7), torch.full_like(val, float("nan")), val)


def e2m1_value(code: torch.Tensor) -> torch.Tensor:
    """4-bit e2m1 codes -> float32: 1 sign bit, 2 exponent bits (bias 1), 1 mantissa bit;
    exponent 0 is subnormal (0 or 0.5)."""
    code = code.to(torch.int32)
    sign = torch.where((code >> 3) & 1 == 1, -1.0, 1.0)
    exp = (code >> 1) & 0x3
    man = (code & 0x1).to(torch.float32)
    normal = (1.0 + man / 2.0) * torch.pow(2.0, (exp - 1).to(torch.float32))
    subnormal = man * 0.5
    return torch.where(exp == 0, subnormal, normal) * sign


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., n]`` -> codes ``[..., 2n]``: low nibble first."""
    assert packed.dtype == torch.uint8
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def decode_nvfp4(weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    assert weight.dtype == torch.uint8 and weight_scale.dtype == torch.float8_e4m3fn
    values = e2m1_value(unpack_nibbles(weight))
    rows, cols = values.shape
    assert weight_scale.shape == (rows, cols // block_size), (weight_scale.shape, values.shape)
    block_scale = e4m3fn_to_float(weight_scale) * weight_scale_2.float()
    return (values.reshape(rows, cols // block_size, block_size) * block_scale.unsqueeze(-1)).reshape(rows, cols)


def decode_fp8(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    assert weight.dtype == torch.float8_e4m3fn
    return e4m3fn_to_float(weight) * weight_scale.float()


def decode(packed: dict) -> torch.Tensor:
    if packed["weight"].dtype == torch.uint8:
        return decode_nvfp4(packed["weight"], packed["weight_scale"], packed["weight_scale_2"])
    if packed["weight"].dtype == torch.float8_e4m3fn:
        return decode_fp8(packed["weight"], packed["weight_scale"])
    return packed["weight"].float()


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """NVFP4 per-tensor scale (``weight_scale_2`` / ``input_scale``) as ModelOpt computes it on
    the GPU, where QAT runs: ``amax / (6 * 448)`` on CUDA is a multiplication by the float32
    reciprocal (measured on an H100, docs/GPU.md finding 2), one ulp off a true division for
    some amax.  ModelOpt's helpers run on CPU tensors divide exactly, so CPU references are
    built with this scale, not with theirs."""
    return amax.float() * torch.tensor(1.0 / (6.0 * 448.0), dtype=torch.float32)
