"""Normalise Megatron-Core's three expert layouts into one per-expert view.

* ``SequentialMLP``: ``experts.local_experts.{i}.linear_fc1.weight`` (one module per expert).
* ``TEGroupedMLP``: one Transformer Engine ``GroupedLinear`` per projection holding
  ``linear_fc1.weight{i}`` / ``linear_fc2.weight{i}`` (+ ``bias{i}``) for each local expert,
  or -- megatron-core >= 0.19 ``moe_single_grouped_weight``, TE >= 2.14 -- one
  ``linear_fc1.weight`` ``[E_local, 2F, H]`` / ``linear_fc2.weight`` ``[E_local, H, F]`` (+ one
  ``bias``), a TE ``GroupedTensor``.  TE forbids slicing that tensor; its per-expert views are
  its ``quantized_tensors`` (or ``split_into_quantized_tensors()``), the same API
  megatron-core's ``TEGroupedLinear._split_grouped_checkpoint_tensor`` uses.  A plain tensor
  of that shape (no such API) is unbound along dim 0.
* legacy ``GroupedMLP``: ``experts.weight1`` ``[hidden, E*fc1_out]`` and ``experts.weight2``
  ``[E*ffn, hidden]``, viewed per expert (the grouped_gemm kernel multiplies ``x @ w``).

Every rule table then maps experts once, whatever the layout.  Layouts are recognised by
structure (``num_gemms`` and ``weight{i}`` for grouped linears), so neither Transformer
Engine nor grouped_gemm has to be importable.  Nothing here mutates the model: tensors are
views or fresh tensors, never aliases installed on modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch


class ExpertLayoutError(ValueError):
    """The experts of a layer are not in a layout we can read (names the layer and expert)."""


@dataclass
class ExpertLinear:
    """One projection of one expert as this rank holds it.

    ``weight`` is in ``nn.Linear`` orientation ``[out, in]``; ``tp_dim`` is the dimension
    split across the expert-tensor-parallel group (0 for fc1, 1 for fc2).  ``module`` and
    ``quant_index`` say where to read quantizer state: the expert's own linear
    (``quant_index=None``) or the grouped linear's per-expert child ``quant_index``.
    """

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    tp_dim: int
    module: torch.nn.Module
    quant_index: Optional[int]
    name: str


@dataclass
class ExpertView:
    local_index: int
    global_index: int
    fc1: ExpertLinear
    fc2: ExpertLinear


def detect_layout(experts: torch.nn.Module) -> str:
    if hasattr(experts, "local_experts"):
        return "sequential"
    fc1 = getattr(experts, "linear_fc1", None)
    if fc1 is not None and hasattr(fc1, "num_gemms"):
        return "te_grouped"
    if isinstance(getattr(experts, "weight1", None), torch.Tensor):
        return "legacy_grouped"
    raise ExpertLayoutError(
        f"unrecognised expert module {type(experts).__name__}: expected SequentialMLP "
        "(local_experts), TEGroupedMLP (linear_fc1.weight{i}) or GroupedMLP (weight1/weight2)"
    )


def _num_local_experts(experts: torch.nn.Module, layout: str) -> int:
    n = getattr(experts, "num_local_experts", None)
    if n is not None:
        return int(n)
    if layout == "sequential":
        return len(experts.local_experts)
    if layout == "te_grouped":
        return int(experts.linear_fc1.num_gemms)
    raise ExpertLayoutError(f"{type(experts).__name__} does not say how many local experts it holds")


def _grouped_param(linear: torch.nn.Module, kind: str, i: int, where: str) -> Optional[torch.Tensor]:
    t = getattr(linear, f"{kind}{i}", None)
    if t is None:
        t = linear._parameters.get(f"{kind}{i}") if hasattr(linear, "_parameters") else None
    if t is None and kind == "weight":
        raise ExpertLayoutError(f"{where}: missing grouped expert weight `{kind}{i}`")
    return t


def is_single_grouped(linear: torch.nn.Module, kind: str = "weight") -> bool:
    """A grouped linear holding all experts in one ``weight`` (or ``bias``) parameter and no
    ``weight0`` (TE >= 2.14 ``single_grouped_weight``; TE registers ``weight{i}`` as None)."""
    own = getattr(linear, "_parameters", {})
    return isinstance(own.get(kind), torch.Tensor) and own.get(f"{kind}0") is None


def grouped_members(linear: torch.nn.Module, kind: str, n: int, where: str) -> list[torch.Tensor]:
    """The per-expert views of a single grouped ``weight``/``bias`` (see module docstring).

    Refuses, naming ``where``: a count other than ``n``, members of the wrong rank, and
    members that are TE quantized tensors (quantized primary weights), which the exporter does
    not read."""
    t = linear._parameters[kind]
    members = getattr(t, "quantized_tensors", None)
    if members is None and callable(getattr(t, "split_into_quantized_tensors", None)):
        members = t.split_into_quantized_tensors()
    if members is None:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.dim() < 2 or t.shape[0] != n:
            raise ExpertLayoutError(
                f"{where}: single grouped `{kind}` of type {type(t).__name__} and shape {tuple(t.shape)} "
                f"has no per-expert views (quantized_tensors / split_into_quantized_tensors) and is "
                f"not a plain [{n}, ...] tensor"
            )
        members = list(t.unbind(0))
    members = list(members)
    if len(members) != n:
        raise ExpertLayoutError(f"{where}: single grouped `{kind}` holds {len(members)} experts, expected {n}")
    want = 2 if kind == "weight" else 1
    for i, m in enumerate(members):
        plain = type(m) in (torch.Tensor, torch.nn.Parameter) and m.dtype.is_floating_point
        if not plain:
            raise ExpertLayoutError(
                f"{where}: expert {i} of the single grouped `{kind}` is a {type(m).__name__} ({m.dtype}); "
                "quantized primary weights (fp8/fp4 parameters) are not exported -- train with "
                "high-precision primary weights or moe_single_grouped_weight=False"
            )
        if m.dim() != want:
            raise ExpertLayoutError(f"{where}: expert {i} of the single grouped `{kind}` has shape {tuple(m.shape)}, expected {want}-D")
    return members


def iter_experts(experts: torch.nn.Module, layer_index: int, expert_offset: int, name: str) -> Iterator[ExpertView]:
    """Yield every local expert of one MoE layer as an :class:`ExpertView`.

    ``expert_offset`` is ``ep_rank * num_local_experts``: EP rank r holds global experts
    ``r*n .. r*n+n-1``.  A missing expert weight raises, naming layer and expert.
    """
    layout = detect_layout(experts)
    n = _num_local_experts(experts, layout)
    if layout == "sequential":
        if len(experts.local_experts) != n:
            raise ExpertLayoutError(
                f"layer {layer_index}: {name} says {n} local experts but holds {len(experts.local_experts)}"
            )
        for i, expert in enumerate(experts.local_experts):
            g = expert_offset + i
            where = f"layer {layer_index} expert {g} ({name}.local_experts.{i})"
            yield ExpertView(
                i,
                g,
                _linear(expert, "linear_fc1", 0, where, f"{name}.local_experts.{i}"),
                _linear(expert, "linear_fc2", 1, where, f"{name}.local_experts.{i}"),
            )
    elif layout == "te_grouped":
        fc1, fc2 = experts.linear_fc1, experts.linear_fc2
        for lin, label in ((fc1, "linear_fc1"), (fc2, "linear_fc2")):
            if int(getattr(lin, "num_gemms", n)) != n:
                raise ExpertLayoutError(
                    f"layer {layer_index}: {name}.{label} has num_gemms={lin.num_gemms}, expected {n}"
                )
        per = {}
        for lin, label in ((fc1, "linear_fc1"), (fc2, "linear_fc2")):
            if is_single_grouped(lin):
                ws = grouped_members(lin, "weight", n, f"layer {layer_index} ({name}.{label}.weight)")
                names = [f"{name}.{label}.weight[{i}]" for i in range(n)]
            else:
                ws = [
                    _grouped_param(lin, "weight", i, f"layer {layer_index} expert {expert_offset + i} ({name}.{label}.weight{i})")
                    for i in range(n)
                ]
                names = [f"{name}.{label}.weight{i}" for i in range(n)]
            bs: list = [None] * n
            if getattr(lin, "use_bias", False):
                if is_single_grouped(lin, "bias"):
                    bs = grouped_members(lin, "bias", n, f"layer {layer_index} ({name}.{label}.bias)")
                else:
                    bs = [_grouped_param(lin, "bias", i, "") for i in range(n)]
            per[label] = (ws, bs, names)
        (w1, b1, n1), (w2, b2, n2) = per["linear_fc1"], per["linear_fc2"]
        for i in range(n):
            yield ExpertView(
                i,
                expert_offset + i,
                ExpertLinear(w1[i], b1[i], 0, fc1, i, n1[i]),
                ExpertLinear(w2[i], b2[i], 1, fc2, i, n2[i]),
            )
    else:  # legacy GroupedMLP: the kernel computes x @ w, so transpose each expert's view.
        hidden = experts.weight1.shape[0]
        w1 = experts.weight1.view(n, hidden, -1)
        w2 = experts.weight2.view(n, -1, hidden)
        for i in range(n):
            g = expert_offset + i
            yield ExpertView(
                i,
                g,
                ExpertLinear(w1[i].t(), None, 0, experts, None, f"{name}.weight1[{i}]"),
                ExpertLinear(w2[i].t(), None, 1, experts, None, f"{name}.weight2[{i}]"),
            )


def _linear(expert: torch.nn.Module, attr: str, tp_dim: int, where: str, prefix: str) -> ExpertLinear:
    """``where`` names layer and expert for errors; ``prefix.attr`` is the module's name."""
    lin = getattr(expert, attr, None)
    weight = getattr(lin, "weight", None) if lin is not None else None
    if weight is None:
        raise ExpertLayoutError(f"{where}: missing `{attr}.weight`")
    bias = getattr(lin, "bias", None)
    if not isinstance(bias, torch.Tensor):
        bias = None
    return ExpertLinear(weight, bias, tp_dim, lin, None, f"{prefix}.{attr}")
