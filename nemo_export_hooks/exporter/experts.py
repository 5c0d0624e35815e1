"""Normalise Megatron-Core's three expert layouts into one per-expert view.

* ``SequentialMLP``: ``experts.local_experts.{i}.linear_fc1.weight`` (one module per expert).
* ``TEGroupedMLP``: one Transformer Engine ``GroupedLinear`` per projection holding
  ``linear_fc1.weight{i}`` / ``linear_fc2.weight{i}`` (+ ``bias{i}``) for each local expert.
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
        for i in range(n):
            g = expert_offset + i
            where = f"layer {layer_index} expert {g} ({name}.%s.weight{i})"
            w1 = _grouped_param(fc1, "weight", i, where % "linear_fc1")
            w2 = _grouped_param(fc2, "weight", i, where % "linear_fc2")
            b1 = _grouped_param(fc1, "bias", i, where) if getattr(fc1, "use_bias", False) else None
            b2 = _grouped_param(fc2, "bias", i, where) if getattr(fc2, "use_bias", False) else None
            yield ExpertView(
                i,
                g,
                ExpertLinear(w1, b1, 0, fc1, i, f"{name}.linear_fc1.weight{i}"),
                ExpertLinear(w2, b2, 1, fc2, i, f"{name}.linear_fc2.weight{i}"),
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
