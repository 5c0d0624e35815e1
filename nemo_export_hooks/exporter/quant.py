"""ModelOpt quantizer state -> packed weights, scales and the quantization config files.

Each format is one :class:`QuantFormat` (at the end of this module) registered with
:func:`register_format`: how its quantizers look, how a weight is packed, the tensors and
config entries that gives, the planning-time checks.  The planner, the executor, the HF name
check and config validation ask the registry, so a new format touches this module and its
tests only.

The output is ModelOpt's *unified Hugging Face checkpoint* format, which vLLM
(``vllm/model_executor/layers/quantization/modelopt.py``: ``ModelOptFp8Config`` /
``ModelOptNvFp4Config``) loads (served on an H200 with vLLM 0.26, docs/GPU.md; TensorRT-LLM
reads the same format but is untested here):

FP8 (per-tensor, ``mtq.FP8_DEFAULT_CFG``)
    ``weight``          float8_e4m3fn ``[out, in]`` = ``clamp(w / weight_scale, +-448)``
    ``weight_scale``    float32 scalar = weight amax / 448
    ``input_scale``     float32 scalar = input amax / 448

NVFP4 (``mtq.NVFP4_DEFAULT_CFG``: e2m1 values, e4m3 scales per 16 inputs, fp32 global scale)
    ``weight``          uint8 ``[out, in/2]``: two e2m1 codes per byte, element ``2j`` in the
                        low nibble and ``2j+1`` in the high nibble (the order vLLM unpacks:
                        ``break_fp4_bytes`` in ``vllm/model_executor/layers/quantization/utils/
                        nvfp4_emulation_utils.py`` stacks ``(low, high)``)
    ``weight_scale``    float8_e4m3fn ``[out, in/16]`` = block amax / (6 * weight_scale_2)
    ``weight_scale_2``  float32 scalar = weight amax / (6 * 448)
    ``input_scale``     float32 scalar = input amax / (6 * 448)
    A weight decodes as ``e2m1(code) * (float(weight_scale) * weight_scale_2)``.

Everything here is a pure function of tensors and quantizer attributes.  ModelOpt itself is
never imported: quantizers are recognised by structure (``is_enabled``, ``num_bits``,
``block_sizes``, ``axis``, ``_amax``), so the package imports without ModelOpt, and
``state_dict()`` (which calls ``torch.cuda.synchronize()`` on quantized Megatron modules) is
never used.  Nothing here needs CUDA or mutates its inputs; packing runs
on the weight's device (CPU or CUDA) with the same bits on both.

Tensor parallelism: :func:`read_quant_spec` returns *this rank's* amax.  A per-tensor amax
of a TP-split weight must be reduced (max over the TP group) before :func:`pack_weight`;
``parallel.max_over`` does that in ``execute.py``.  ModelOpt syncs FP8 amax across TP
itself, but not NVFP4's (its TP sync skips block-quantized quantizers), so for NVFP4 the
shards of one weight may carry different amax and the exported ``weight_scale_2`` is their
max, as one HF tensor can only have one global scale.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

__all__ = [
    "QuantFormat",
    "QuantSpec",
    "register_format",
    "unregister_format",
    "get_format",
    "format_names",
    "tensor_suffixes",
    "tensor_specs",
    "check_packable",
    "logical_weight_shape",
    "read_quant_spec",
    "pack_weight",
    "split_packed_rows",
    "quant_config_files",
    "NVFP4_BLOCK_SIZE",
]

NVFP4_BLOCK_SIZE = 16
_E4M3_MAX = 448.0
_E2M1_MAX = 6.0
_NVFP4_GLOBAL_DIV = _E2M1_MAX * _E4M3_MAX  # 2688.0, exactly as ModelOpt's E2M1_MAX * E4M3_MAX
# Its float32 reciprocal, applied as a multiplication (see _pack_nvfp4).  Not used for FP8: there
# the plain division matches ModelOpt's FP8 fake-quant kernel exactly.
_NVFP4_GLOBAL_RECIP = torch.tensor(1.0 / _NVFP4_GLOBAL_DIV, dtype=torch.float32)
_E4M3_MIN_SUBNORMAL = 2.0**-9


@dataclass
class QuantSpec:
    """How one linear layer's weight is quantized.

    ``weight_amax`` is a float32 scalar tensor on the quantizer's device.  It must already
    be the max over the tensor-parallel group when the weight is TP-split (the caller
    all-reduces it; see ``parallel.max_over``).  ``input_amax`` is the (shared) activation
    amax; :func:`read_quant_spec` always fills it, ``None`` is only accepted by
    :func:`pack_weight` for callers that build a spec themselves (no ``input_scale`` is
    written then).
    """

    algo: str  # a registered QuantFormat's name: "FP8", "NVFP4"
    weight_amax: torch.Tensor
    input_amax: Optional[torch.Tensor]
    block_size: int = NVFP4_BLOCK_SIZE
    module: str = ""
    expert_index: Optional[int] = None

    @property
    def where(self) -> str:
        return _where(self.module, self.expert_index)


# ---------------------------------------------------------------------------------------
# reading quantizers
# ---------------------------------------------------------------------------------------


def _where(module_name: str, expert_index: Optional[int]) -> str:
    return module_name if expert_index is None else f"{module_name} (expert {expert_index})"


def _is_enabled(q: Any) -> bool:
    en = getattr(q, "is_enabled", True)
    return bool(en() if callable(en) else en)


def _looks_like_quantizer(q: Any) -> bool:
    """A single ModelOpt-style TensorQuantizer (not a container)."""
    return q is not None and all(hasattr(q, a) for a in ("is_enabled", "num_bits", "block_sizes"))


def _indexed_children(q: Any) -> Optional[list]:
    """Children of a grouped (per-expert) quantizer container, in index order, or None.

    ModelOpt's ``GroupedQuantizer`` (TEGroupedLinear) is an ``nn.ModuleList`` of
    TensorQuantizers, one per local expert (state keys ``weight_quantizer.{i}._amax``).  Note
    that it *delegates* ``amax`` and ``is_enabled`` to child 0, so reading ``.amax`` on the
    container silently gives expert 0's value: always index it.
    """
    if isinstance(q, torch.nn.ModuleList):
        return list(q)
    if isinstance(q, torch.nn.ModuleDict):
        keys = list(q.keys())
        if keys and all(k.isdigit() for k in keys) and sorted(int(k) for k in keys) == list(range(len(keys))):
            return [q[str(i)] for i in range(len(keys))]
        return None
    if isinstance(q, (list, tuple)):
        return list(q)
    return None


def _norm_bits(nb: Any) -> Any:
    if isinstance(nb, (list, tuple)):
        return tuple(int(v) for v in nb)
    return nb


def _norm_block_sizes(bs: Any) -> Optional[dict]:
    if not bs:
        return None
    out = {}
    for k, v in dict(bs).items():
        if isinstance(k, str) and k.lstrip("-").isdigit():
            k = int(k)
        if k == "scale_bits" and isinstance(v, list):
            v = tuple(v)
        out[k] = v
    return out


def _fmt_desc(q: Any) -> str:
    return (
        f"num_bits={_norm_bits(getattr(q, 'num_bits', None))}, axis={getattr(q, 'axis', None)}, "
        f"block_sizes={getattr(q, 'block_sizes', None)}"
    )


def _label(q: Any) -> str:
    """A human name for a quantizer format (error messages only)."""
    nb = _norm_bits(getattr(q, "num_bits", None))
    bs = _norm_block_sizes(getattr(q, "block_sizes", None))
    axis = getattr(q, "axis", None)
    scale_bits = _norm_bits(bs.get("scale_bits")) if bs else None
    if isinstance(nb, int):
        if bs:
            return f"INT{nb} block-wise (block {bs.get(-1)})"
        if axis is not None:
            return f"INT{nb} per-channel (axis={axis})"
        return f"INT{nb} per-tensor"
    if nb == (4, 3):
        if bs and scale_bits == (8, 0):
            return "MXFP8"
        if bs:
            return "FP8 block-scaled"
        if axis is not None:
            return f"FP8 per-channel (axis={axis})"
        return "FP8 per-tensor"
    if nb == (2, 1):
        if bs and scale_bits == (8, 0):
            return "MXFP4"
        if bs and bs.get("four_over_six"):
            return "NVFP4 four-over-six"
        if bs and bs.get("type", "static") != "dynamic":
            return "NVFP4 static block scales"
        if bs and bs.get(-1) not in (None, NVFP4_BLOCK_SIZE):
            return f"FP4 e2m1 with {bs.get(-1)}-element blocks"
        return "NVFP4"
    return f"num_bits={nb}"


def _supported() -> str:
    """The registered formats' recipes, for error messages: "A and B", "A, B and C"."""
    recipes = [f.recipe for f in _FORMATS.values()]
    return recipes[0] if len(recipes) == 1 else ", ".join(recipes[:-1]) + " and " + recipes[-1]


def _unsupported(where: str, what: str, q: Any) -> ValueError:
    return ValueError(
        f"{where}: unsupported quantization format {what} ({_fmt_desc(q)}); "
        f"the exporter supports {_supported()}"
    )


def _block_of_last_dim(bs: dict) -> Optional[int]:
    """The block size along the input (last) dim of a 2-D weight, None if the block layout
    is anything else (2-D blocks, blocks along the output dim)."""
    dims = {k: v for k, v in bs.items() if isinstance(k, int)}
    if set(dims) == {-1} or set(dims) == {1}:
        return int(next(iter(dims.values())))
    return None


def _check_extras(q: Any, role: str, where: str) -> None:
    """Features that change the math the exported format cannot express."""
    if getattr(q, "_pre_quant_scale", None) is not None:
        raise ValueError(
            f"{where}: {role} has a pre_quant_scale (AWQ / SmoothQuant); exporting it needs the "
            "scale folded into the previous layer, which is not supported"
        )
    if getattr(q, "svdquant_lora_a", None) is not None:
        raise ValueError(f"{where}: {role} carries SVDQuant low-rank factors, which are not supported")
    rot = getattr(q, "rotate_is_enabled", False)
    if isinstance(rot, bool) and rot:
        raise ValueError(f"{where}: {role} applies a rotation (Hadamard), which is not supported")
    if getattr(q, "fake_quant", True) is False:
        raise ValueError(
            f"{where}: {role} uses real quantization (compressed weights in the module); "
            "export needs a fake-quant (QAT/PTQ) model with the original high-precision weights"
        )


def _classify_weight(wq: Any, where: str) -> str:
    if not _looks_like_quantizer(wq):
        kind = type(wq).__name__
        if isinstance(wq, torch.nn.Sequential):
            raise ValueError(
                f"{where}: unsupported quantization format: the weight quantizer is a sequential "
                f"multi-stage quantizer ({kind}, e.g. W4A8_AWQ); the exporter supports {_supported()}"
            )
        raise ValueError(f"{where}: weight_quantizer of type {kind} is not a recognised quantizer")
    for fmt in _FORMATS.values():
        if fmt.weight_matches(wq):
            return fmt.name
    raise _unsupported(where, _label(wq), wq)


def _check_input_format(iq: Any, algo: str, where: str) -> None:
    fmt = get_format(algo)
    if iq is None or not _is_enabled(iq):
        raise ValueError(
            f"{where}: unsupported quantization format {fmt.weight_only}: the input quantizer is missing or "
            f"disabled, but the exported {algo} format needs a static input_scale (vLLM's ModelOpt "
            f"{algo} method reads one); the exporter supports {_supported()}"
        )
    if not _looks_like_quantizer(iq):
        raise ValueError(f"{where}: input_quantizer of type {type(iq).__name__} is not a recognised quantizer")
    if not fmt.input_matches(iq):
        what = (fmt.input_mismatch(iq) if fmt.input_mismatch is not None else None) or (
            f"{algo} weights with {_label(iq)} activations"
        )
        raise ValueError(
            f"{where}: unsupported quantization format {what} (input_quantizer {_fmt_desc(iq)}); "
            f"the exporter supports {_supported()}"
        )


def _raw_amax(q: Any) -> Optional[torch.Tensor]:
    a = getattr(q, "_amax", None)
    if a is None:
        try:
            a = getattr(q, "amax", None)
        except (AssertionError, AttributeError, RuntimeError):
            a = None
    if a is not None and not isinstance(a, torch.Tensor):
        a = torch.tensor(float(a))
    return a


def _scalar_amax(q: Any, role: str, where: str, algo: str) -> torch.Tensor:
    """The quantizer's amax as a validated float32 0-dim tensor (on its own device).

    ModelOpt's unified export only supports a scalar amax for these formats (its Megatron
    exporter raises "weight_scale_2 must be a scalar!", ``preprocess_linear_fusion`` asserts
    "Only support scalar input quant amax"), so an amax with more than one element
    (per-channel / per-block calibration) is an error rather than something reduced here.
    ModelOpt's ``export_amax`` silently replaces zero/NaN amax by maxbound with a warning;
    we refuse instead, because such a value means calibration never saw this layer.
    """
    amax = _raw_amax(q)
    if amax is None:
        raise ValueError(
            f"{where}: {role} is not calibrated (amax is None); calibrate the model "
            "(mtq.quantize(model, cfg, forward_loop) with data reaching this layer) before exporting"
        )
    if amax.is_meta:
        raise ValueError(f"{where}: {role} amax is on the meta device (not materialised)")
    if amax.numel() != 1:
        raise ValueError(
            f"{where}: {role} has a non-scalar amax of shape {tuple(amax.shape)} (per-channel or "
            f"per-block calibration); the {algo} export needs one per-tensor amax"
        )
    amax = amax.detach().reshape(()).float().clone()
    value = float(amax)
    if not math.isfinite(value):
        raise ValueError(f"{where}: {role} amax is not finite ({value}); the calibration or training diverged")
    if value <= 0.0:
        raise ValueError(
            f"{where}: {role} amax is {value}; a zero amax means calibration never activated this "
            "layer (or its weights are all zero), and it would give a zero scale"
        )
    return amax


def _select(q: Any, expert_index: Optional[int], role: str, module_name: str) -> Any:
    children = None if _looks_like_quantizer(q) else _indexed_children(q)
    if children is None or isinstance(q, torch.nn.Sequential):
        return q
    if expert_index is None:
        raise ValueError(
            f"{module_name}: {role} is grouped per expert ({len(children)} children); "
            "pass expert_index to choose one"
        )
    if not 0 <= expert_index < len(children):
        raise ValueError(
            f"{module_name}: expert_index {expert_index} is out of range for the grouped {role} "
            f"with {len(children)} children"
        )
    return children[expert_index]


def read_quant_spec(linear_module: Any, module_name: str, expert_index: Optional[int] = None) -> Optional[QuantSpec]:
    """Read how ``linear_module``'s weight is quantized, or ``None`` when it is not.

    ``linear_module`` is any module with ModelOpt-style ``weight_quantizer`` /
    ``input_quantizer`` attributes (recognised by structure).  ``expert_index`` picks the
    expert's child of a grouped per-expert weight quantizer (TEGroupedLinear); for a plain
    quantizer it is only used in messages (the one quantizer is shared by all experts).

    Returns ``None`` when there is no weight quantizer or it is disabled (e.g. ``lm_head``
    under the default configs).  Raises ``ValueError`` naming the module (and expert) for
    an unsupported format, an uncalibrated quantizer, or a zero / non-finite / non-scalar
    amax, so errors surface before anything is written.
    """
    where = _where(module_name, expert_index)
    wq = getattr(linear_module, "weight_quantizer", None)
    if wq is None:
        return None
    wq = _select(wq, expert_index, "weight_quantizer", module_name)
    if not _is_enabled(wq):
        return None
    algo = _classify_weight(wq, where)
    _check_extras(wq, "weight_quantizer", where)
    iq = getattr(linear_module, "input_quantizer", None)
    if iq is not None:
        iq = _select(iq, expert_index, "input_quantizer", module_name)
    _check_input_format(iq, algo, where)
    _check_extras(iq, "input_quantizer", where)
    weight_amax = _scalar_amax(wq, "weight_quantizer", where, algo)
    input_amax = _scalar_amax(iq, "input_quantizer", where, algo)
    return QuantSpec(
        algo=algo,
        weight_amax=weight_amax,
        input_amax=input_amax,
        block_size=NVFP4_BLOCK_SIZE,
        module=module_name,
        expert_index=expert_index,
    )


# ---------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------

# Rows per chunk when packing, so the float32 temporaries stay small for large weights.
_CHUNK_ELEMS = 1 << 24


def _checked_amax(spec: QuantSpec, which: str, device: torch.device) -> torch.Tensor:
    a = spec.weight_amax if which == "weight" else spec.input_amax
    if not isinstance(a, torch.Tensor):
        a = torch.tensor(float(a))
    if a.numel() != 1:
        raise ValueError(f"{spec.where}: {which} amax must be a scalar, got shape {tuple(a.shape)}")
    a = a.detach().reshape(()).to(device=device, dtype=torch.float32)
    v = float(a)
    if not math.isfinite(v) or v <= 0.0:
        raise ValueError(f"{spec.where}: {which} amax must be finite and positive, got {v}")
    return a


def _e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values (already divided by their block scale) to the nearest e2m1 value
    (ties to the even code, saturating at +-6) and return 4-bit codes ``s e e m`` as uint8.

    The non-negative e2m1 grid is 0, .5, 1, 1.5 (step .5), 2, 3 (step 1), 4, 6 (step 2) and
    codes 0..7 enumerate it in order, so in each step region the code is an offset plus the
    value rounded to the region's step; ``torch.round`` rounds half to even, which is the
    even-mantissa tie rule.  The sign bit is set for every negative input, even one that
    rounds to zero (a -0 code), like ModelOpt.
    """
    mag = x.abs().clamp_(max=_E2M1_MAX)
    code = torch.where(
        mag < 2.0,
        torch.round(mag * 2.0),
        torch.where(mag < 4.0, torch.round(mag) + 2.0, torch.round(mag * 0.5) + 4.0),
    ).to(torch.uint8)
    return code | ((x < 0).to(torch.uint8) << 3)


def check_nvfp4_input_dim(cols: int, spec: QuantSpec) -> None:
    """NVFP4 packs 16-element blocks along the input dim of the full (TP-gathered) weight;
    the planner calls this before staging, the packer again on the tensor it gets."""
    if cols % NVFP4_BLOCK_SIZE != 0:
        raise ValueError(
            f"{spec.where}: NVFP4 needs the input dim ({cols}) to be a multiple of {NVFP4_BLOCK_SIZE} "
            "(vLLM rejects other sizes)"
        )


def _pack_nvfp4(weight: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    block = int(spec.block_size)
    if block != NVFP4_BLOCK_SIZE:
        raise ValueError(f"{spec.where}: NVFP4 block size must be {NVFP4_BLOCK_SIZE}, got {block}")
    if weight.dim() != 2:
        raise ValueError(f"{spec.where}: NVFP4 packing needs a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    check_nvfp4_input_dim(cols, spec)
    amax = _checked_amax(spec, "weight", weight.device)
    # amax * float32(1 / (6 * 448)): what ModelOpt computes on the GPU, where QAT runs (CUDA
    # turns `tensor / scalar` into a multiplication by the float32 reciprocal; its fake-quant
    # kernel and its export of a GPU-resident model agree on it).  A true IEEE division is one
    # ulp off for some amax values, which moves e4m3 block scales that sit on a rounding
    # midpoint (measured on an H100: docs/GPU.md, finding 2).
    scale_2 = amax * _NVFP4_GLOBAL_RECIP
    if not float(scale_2 * _E4M3_MIN_SUBNORMAL) > 0.0:
        raise ValueError(f"{spec.where}: weight amax {float(amax)} is too small for NVFP4 scales")
    n_blocks = cols // block
    packed = torch.empty((rows, cols // 2), dtype=torch.uint8, device=weight.device)
    scales = torch.empty((rows, n_blocks), dtype=torch.float8_e4m3fn, device=weight.device)
    step = max(1, _CHUNK_ELEMS // max(cols, 1))
    for r0 in range(0, rows, step):
        w = weight[r0 : r0 + step].to(torch.float32).reshape(-1, n_blocks, block)
        block_amax = w.abs().amax(dim=-1)
        s = block_amax / (scale_2 * _E2M1_MAX)
        s = torch.where(s == 0, torch.ones_like(s), s)  # all-zero block: scale 1 (codes are 0)
        s8 = s.clamp_(min=_E4M3_MIN_SUBNORMAL, max=_E4M3_MAX).to(torch.float8_e4m3fn)
        codes = _e2m1_codes(w / (s8.to(torch.float32) * scale_2).unsqueeze(-1)).reshape(w.shape[0], cols)
        packed[r0 : r0 + step] = codes[:, 0::2] | (codes[:, 1::2] << 4)
        scales[r0 : r0 + step] = s8
    out = {"weight": packed, "weight_scale": scales, "weight_scale_2": scale_2.clone()}
    if spec.input_amax is not None:
        out["input_scale"] = _checked_amax(spec, "input", weight.device) * _NVFP4_GLOBAL_RECIP
    return out


def _device_scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-dim float32 tensor on ``like``'s device.  Dividing by it is an IEEE
    division on every device: CUDA turns ``tensor / python_or_cpu_scalar`` into a
    multiplication by the float32 reciprocal, which is not the same number."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _pack_fp8(weight: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    amax = _checked_amax(spec, "weight", weight.device)
    scale = amax / _device_scalar(_E4M3_MAX, amax)
    q = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)
    flat_w, flat_q = weight.reshape(-1), q.view(-1)
    for i in range(0, flat_w.numel(), _CHUNK_ELEMS):
        # ModelOpt's export divides by the scale; the clamp matches its fake quant (which
        # saturates), where a plain cast would turn values past amax into NaN.
        chunk = flat_w[i : i + _CHUNK_ELEMS].to(torch.float32) / scale
        flat_q[i : i + _CHUNK_ELEMS] = chunk.clamp_(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn)
    out = {"weight": q, "weight_scale": scale.clone()}
    if spec.input_amax is not None:
        input_amax = _checked_amax(spec, "input", weight.device)
        out["input_scale"] = input_amax / _device_scalar(_E4M3_MAX, input_amax)
    return out


def pack_weight(weight: torch.Tensor, spec: Optional[QuantSpec], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Pack one full (TP-gathered) ``[out, in]`` weight.

    ``spec is None``: ``{"weight": weight cast to dtype}`` (a fresh tensor).  Otherwise the
    format's tensors (its :class:`QuantFormat`'s ``pack``), e.g. FP8 -> ``weight``,
    ``weight_scale``, ``input_scale``; NVFP4 -> ``weight``, ``weight_scale``,
    ``weight_scale_2``, ``input_scale`` (``input_scale`` only when ``spec.input_amax`` is
    known).  Scales are 0-dim float32.  Block scales are computed from this weight's own
    values; the global scale from ``spec.weight_amax``.  Runs on the weight's device
    (CPU is fine), never modifies ``weight``, and raises ``ValueError`` on non-finite
    weights.  ``dtype`` is unused for quantized weights (their dtypes are fixed).
    """
    if spec is None:
        return {"weight": weight.detach().to(dtype, copy=True)}
    weight = weight.detach()
    if not weight.is_floating_point():
        raise ValueError(f"{spec.where}: cannot quantize a {weight.dtype} weight")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{spec.where}: weight has non-finite values; refusing to quantize it")
    fmt = _FORMATS.get(spec.algo)
    if fmt is None:
        raise ValueError(f"{spec.where}: unknown quantization algo {spec.algo!r} (supported: {format_names()})")
    return fmt.pack(weight, spec)


def split_packed_rows(packed: dict[str, torch.Tensor], sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    """Split a packed weight row-wise, e.g. a gated fc1 ``[gate; up]`` into gate and up.

    Tensors whose first dim equals the weight's row count (``weight``, NVFP4's
    ``weight_scale``; block scales run along the input dim, so a row split is exact) are
    sliced; scalar scales are shared (each part gets its own copy).  Every returned tensor
    owns its memory, so parts can go to the same safetensors file.
    """
    rows = packed["weight"].shape[0]
    if any(int(s) < 0 for s in sizes) or sum(int(s) for s in sizes) != rows:
        raise ValueError(f"split sizes {list(sizes)} do not add up to the {rows} rows of the packed weight")
    parts: list[dict[str, torch.Tensor]] = [{} for _ in sizes]
    for key, t in packed.items():
        if t.dim() >= 1 and t.shape[0] == rows:
            for part, piece in zip(parts, torch.split(t, [int(s) for s in sizes], dim=0)):
                part[key] = piece.clone()
        elif t.numel() == 1:
            for part in parts:
                part[key] = t.clone()
        else:
            raise ValueError(f"cannot split packed tensor {key!r} of shape {tuple(t.shape)} by rows ({rows})")
    return parts


# ---------------------------------------------------------------------------------------
# config files
# ---------------------------------------------------------------------------------------


def quant_config_files(algo: str, exclude_modules: list[str], producer_version: str) -> tuple[dict, dict]:
    """``(hf_quant_config.json, config.json["quantization_config"])`` for one format.

    Mirrors ModelOpt's unified export (``get_quant_config`` / ``process_layer_quant_config``
    and ``convert_hf_quant_config_format``): the first is
    ``{producer, quantization: {quant_algo, kv_cache_quant_algo, [group_size], exclude_modules}}``
    (vLLM requires ``group_size``, ``kv_cache_quant_algo`` and ``exclude_modules`` there for
    NVFP4), the second the compressed-tensors style dict with ``quant_method: "modelopt"``,
    ``quant_algo``, ``config_groups`` and ``ignore`` that vLLM reads from config.json.
    ``exclude_modules`` are HF module names or ModelOpt-style wildcards (vLLM matches them
    with fnmatch); they are de-duplicated and sorted as ModelOpt does.  KV-cache
    quantization is not exported (``kv_cache_quant_algo`` is null).  Mixed formats
    (ModelOpt's MIXED_PRECISION, which TensorRT-LLM reads from an extra ``quant_cfg.json``)
    are rejected.
    """
    if not isinstance(algo, str):
        algos = sorted(set(algo))
        if len(algos) == 1:
            algo = algos[0]
        else:
            raise ValueError(f"mixed quantization formats {algos} in one model are not supported")
    fmt = _FORMATS.get(algo)
    if fmt is None:
        if algo.upper() == "MIXED_PRECISION":
            raise ValueError("mixed-precision (per-layer) quantization export is not supported")
        raise ValueError(f"unsupported quantization algo {algo!r}; supported: {list(format_names())}")
    exclude = sorted(set(str(m) for m in exclude_modules))
    from ..store.layout import PRODUCER_NAME  # one spelling of the producer, the manifest's

    producer = {"name": PRODUCER_NAME, "version": str(producer_version)}
    quantization: dict[str, Any] = {"quant_algo": algo, "kv_cache_quant_algo": None, **copy.deepcopy(fmt.hf_quant_extra)}
    quantization["exclude_modules"] = exclude
    hf_quant_config = {"producer": producer, "quantization": quantization}
    quantization_config = {
        "config_groups": {"group_0": copy.deepcopy(fmt.config_group)},
        "ignore": list(exclude),
        "quant_algo": algo,
        "producer": dict(producer),
        "quant_method": "modelopt",
    }
    return hf_quant_config, quantization_config


# ---------------------------------------------------------------------------------------
# formats: everything one format means, in one object, and the registry every caller asks
# ---------------------------------------------------------------------------------------

TensorSpec = tuple  # (suffix, torch dtype, shape as a list): one tensor a packed weight gives


@dataclass(frozen=True)
class QuantFormat:
    """One export format: how its quantizers look, how a weight is packed, which tensors and
    config entries that gives, and what planning checks.  The planner, the executor, the
    name check, ``verify`` and config validation ask the registry (:func:`get_format`,
    :func:`tensor_specs`, :func:`check_packable`, :func:`tensor_suffixes`,
    :func:`format_names`, :func:`logical_weight_shape`) and never name a format, so a new
    format is one ``QuantFormat`` passed to :func:`register_format` and its tests.

    ``name``            ``quant_algo`` in ``hf_quant_config.json`` and ``quantization_config``;
                        ``QuantSpec.algo``; a value ``ExportConfig.expect_quant`` accepts
    ``recipe``          the quantization config that makes it (named in error messages)
    ``weight_only``     what a model with this weight format and no input quantizer is called
    ``weight_matches``  ``(weight quantizer) -> bool``: an enabled single quantizer has this format
    ``input_matches``   ``(input quantizer) -> bool``: it is the one ``input_scale`` describes
    ``pack``            ``(full [out, in] float weight, spec) -> {suffix: tensor}`` in ``specs``
                        order; the input scale only when ``spec.input_amax`` is known
    ``specs``           ``(full shape, with_input) -> [(suffix, dtype, shape)]``: what ``pack``
                        returns, from the shape alone (the writer lays out its headers from it)
    ``suffixes``        the tensors besides ``weight`` that ``pack`` writes (``<module>.<suffix>``)
    ``config_group``    ``config.json["quantization_config"]["config_groups"]["group_0"]``
    ``hf_quant_extra``  extra keys of ``hf_quant_config.json["quantization"]``
    ``check_shape``     ``(full shape, spec)``: raise ``ValueError`` at planning time for a
                        weight ``pack`` would refuse (None: every shape packs)
    ``unpacked_shape``  ``(safetensors dtype, stored shape) -> logical shape`` for a weight this
                        format stores packed, None otherwise (``verify`` compares logical shapes)
    ``input_mismatch``  ``(input quantizer) -> str or None``: a better name for a refused
                        weight/activation combination (error messages only)
    """

    name: str
    recipe: str
    weight_only: str
    weight_matches: Callable[[Any], bool]
    input_matches: Callable[[Any], bool]
    pack: Callable[[torch.Tensor, QuantSpec], dict]
    specs: Callable[[list, bool], list]
    suffixes: tuple
    config_group: dict
    hf_quant_extra: dict = field(default_factory=dict)
    check_shape: Optional[Callable[[list, QuantSpec], None]] = None
    unpacked_shape: Optional[Callable[[str, tuple], Optional[tuple]]] = None
    input_mismatch: Optional[Callable[[Any], Optional[str]]] = None


_FORMATS: dict[str, QuantFormat] = {}


def register_format(fmt: QuantFormat) -> QuantFormat:
    """Add ``fmt`` to the formats the exporter recognises (in the order quantizers are matched)."""
    if not fmt.name or fmt.name != fmt.name.upper():
        raise ValueError(f"a quantization format's name is upper case, got {fmt.name!r}")
    if fmt.name in _FORMATS:
        raise ValueError(f"quantization format {fmt.name!r} is already registered")
    _FORMATS[fmt.name] = fmt
    return fmt


def unregister_format(name: str) -> None:
    """Remove a format added by :func:`register_format` (tests register toy formats)."""
    _FORMATS.pop(name, None)


def get_format(name: str) -> QuantFormat:
    try:
        return _FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown quantization algo {name!r} (supported: {format_names()})") from None


def format_names() -> tuple:
    """The registered formats' names (what ``expect_quant`` accepts)."""
    return tuple(_FORMATS)


def tensor_suffixes() -> tuple:
    """Every format's extra tensor-name endings, with their dot (``".weight_scale"``, ...): the
    HF names a quantized export adds beside each ``<module>.weight``, which the name check
    and ``verify`` set aside before comparing with the HF class."""
    out: list[str] = []
    for fmt in _FORMATS.values():
        out.extend(f".{s}" for s in fmt.suffixes if f".{s}" not in out)
    return tuple(out)


def tensor_specs(spec: QuantSpec, full_shape) -> list:
    """``[(suffix, dtype, shape)]`` that :func:`pack_weight` returns for a weight of
    ``full_shape`` (TP-gathered) quantized as ``spec`` says, in its order, without data."""
    return get_format(spec.algo).specs(list(full_shape), spec.input_amax is not None)


def check_packable(spec: QuantSpec, full_shape) -> None:
    """Planning-time shape check of a weight's TP-gathered shape (the packer checks again)."""
    fmt = get_format(spec.algo)
    if fmt.check_shape is not None:
        fmt.check_shape(list(full_shape), spec)


def logical_weight_shape(dtype: str, shape) -> tuple:
    """The shape the HF class declares for a stored weight of safetensors ``dtype`` and
    ``shape``: unpacked when some format stores its weights packed in that dtype (NVFP4: two
    e2m1 values a byte), else ``shape`` itself."""
    for fmt in _FORMATS.values():
        if fmt.unpacked_shape is not None:
            logical = fmt.unpacked_shape(dtype, tuple(shape))
            if logical is not None:
                return tuple(logical)
    return tuple(shape)


# FP8 per-tensor ---------------------------------------------------------------------------


def _fp8_per_tensor(q: Any) -> bool:
    return _norm_bits(q.num_bits) == (4, 3) and _norm_block_sizes(q.block_sizes) is None and getattr(q, "axis", None) is None


def _fp8_specs(shape: list, with_input: bool) -> list:
    out = [("weight", torch.float8_e4m3fn, shape), ("weight_scale", torch.float32, [])]
    return out + [("input_scale", torch.float32, [])] if with_input else out


FP8 = register_format(QuantFormat(
    name="FP8",
    recipe="mtq.FP8_DEFAULT_CFG (FP8 per-tensor)",
    weight_only="FP8 weight-only",
    weight_matches=_fp8_per_tensor,
    input_matches=_fp8_per_tensor,
    pack=_pack_fp8,
    specs=_fp8_specs,
    suffixes=("weight_scale", "input_scale"),
    config_group={
        "input_activations": {"dynamic": False, "num_bits": 8, "type": "float"},
        "weights": {"dynamic": False, "num_bits": 8, "type": "float"},
        "targets": ["Linear"],
    },
))


# NVFP4 ------------------------------------------------------------------------------------


def _nvfp4_blocks(bs: Optional[dict]) -> bool:
    """Dynamic 16-element blocks along the input dim with e4m3 block scales."""
    return (
        bs is not None
        and bs.get("type") == "dynamic"
        and _norm_bits(bs.get("scale_bits")) == (4, 3)
        and _block_of_last_dim(bs) == NVFP4_BLOCK_SIZE
    )


def _nvfp4_weight(q: Any) -> bool:
    bs = _norm_block_sizes(q.block_sizes)
    static = getattr(q, "_global_amax", None) is not None or getattr(q, "global_amax", None) is not None
    return _norm_bits(q.num_bits) == (2, 1) and _nvfp4_blocks(bs) and not bs.get("four_over_six", False) and not static


def _nvfp4_input(q: Any) -> bool:
    return _norm_bits(q.num_bits) == (2, 1) and _nvfp4_blocks(_norm_block_sizes(q.block_sizes))


def _nvfp4_specs(shape: list, with_input: bool) -> list:
    rows, cols = shape  # pack_weight raises for other ranks; planning checked the tiling
    out = [
        ("weight", torch.uint8, [rows, cols // 2]),
        ("weight_scale", torch.float8_e4m3fn, [rows, cols // NVFP4_BLOCK_SIZE]),
        ("weight_scale_2", torch.float32, []),
    ]
    return out + [("input_scale", torch.float32, [])] if with_input else out


def _nvfp4_check_shape(shape: list, spec: QuantSpec) -> None:
    if len(shape) == 2:
        check_nvfp4_input_dim(shape[1], spec)


NVFP4 = register_format(QuantFormat(
    name="NVFP4",
    recipe="mtq.NVFP4_DEFAULT_CFG (NVFP4, 16-element blocks)",
    weight_only="W4A16_NVFP4 (NVFP4 weight-only)",
    weight_matches=_nvfp4_weight,
    input_matches=_nvfp4_input,
    pack=_pack_nvfp4,
    specs=_nvfp4_specs,
    suffixes=("weight_scale", "weight_scale_2", "input_scale"),
    config_group={
        "input_activations": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": NVFP4_BLOCK_SIZE},
        "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": NVFP4_BLOCK_SIZE},
        "targets": ["Linear"],
    },
    hf_quant_extra={"group_size": NVFP4_BLOCK_SIZE},  # vLLM's ModelOptNvFp4Config requires it
    check_shape=_nvfp4_check_shape,
    unpacked_shape=lambda dtype, shape: (shape[0], shape[1] * 2) if dtype == "U8" and len(shape) == 2 else None,
    input_mismatch=lambda q: "W4A8_NVFP4_FP8 (NVFP4 weights, FP8 activations)" if _norm_bits(q.num_bits) == (4, 3) else None,
))
