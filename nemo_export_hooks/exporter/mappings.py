"""Mapping kinds: how one Megatron tensor becomes one or more Hugging Face tensors.

The default, and almost every mapping, only *selects rows* (output features) of a full, TP-gathered Megatron
tensor: QKV de-interleaving, gate/up splitting, renaming.  Expressing them as row selections
lets the same mapping apply unchanged to a plain weight, a bias, and a packed quantized
weight with its per-row block scales (``weight``/``weight_scale`` are split by rows, scalar
scales are shared).  All functions are pure.

Two escape hatches for what is not a row selection (end of this module): a
:class:`ValueTransform` applied to a mapping's outputs (a zero-centred norm's ``+ 1``, a
transpose), which quantized exports refuse at planning unless it says it applies to packed
data; and an :class:`ExpertStack`, all of a layer's experts in one HF tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

# A row plan: list of (target name, row index tensor or None for "all rows").
RowPlan = list[tuple[str, "torch.Tensor | None"]]


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_query_groups: int
    head_dim: int


def rename(targets: Sequence[str], rows: int, shape: AttentionShape | None = None) -> RowPlan:
    (target,) = targets
    return [(target, None)]


def glu_split(targets: Sequence[str], rows: int, shape: AttentionShape | None = None) -> RowPlan:
    """Megatron's gated fc1 is ``cat(gate, up)`` along dim 0 (after TP gather)."""
    gate, up = targets
    if rows % 2:
        raise ValueError(f"gated fc1 has an odd number of rows ({rows}); cannot split into {gate}/{up}")
    half = rows // 2
    return [(gate, torch.arange(0, half)), (up, torch.arange(half, rows))]


def glu_interleaved(size: int, tp: int) -> "MappingKind":
    """Gated fc1 of ``TEGroupedMLP`` with ``moe_mlp_glu_interleave_size=size`` (megatron-core
    >= 0.19): each expert-TP rank's shard holds its gate and up rows in alternating blocks of
    ``size`` rows, ``[g_0, u_0, g_1, u_1, ...]`` (what ``TEGroupedMLP._remove_glu_interleaving``
    undoes on the fc1 output).  Bound to the TP size of the job: after a plain gather the rows
    are ``[rank 0 shard | rank 1 shard | ...]``, and gate = every rank's gate blocks in order.
    A plain ``cat(gate, up)`` split of such a tensor would mix gate and up rows silently."""

    def kind(targets: Sequence[str], rows: int, shape: AttentionShape | None = None) -> RowPlan:
        gate, up = targets
        if rows % (2 * size * tp):
            raise ValueError(
                f"gated fc1 with {rows} rows over {tp} rank(s) does not split into gate/up blocks of "
                f"moe_mlp_glu_interleave_size={size}"
            )
        idx = torch.arange(rows).view(tp, rows // (2 * size * tp), 2, size)
        return [(gate, idx[:, :, 0].reshape(-1)), (up, idx[:, :, 1].reshape(-1))]

    kind.__name__ = f"glu_interleaved_{size}_tp{tp}"
    kind.interleave_size = size
    return kind


def qkv_split(targets: Sequence[str], rows: int, shape: AttentionShape | None = None) -> RowPlan:
    """Megatron interleaves QKV per query group: ``[g0: q_0..q_{h/g-1}, k, v][g1: ...]``."""
    q, k, v = targets
    assert shape is not None
    ng, hd = shape.num_query_groups, shape.head_dim
    per = shape.num_heads // ng
    expected = ng * (per + 2) * hd
    if rows != expected:
        raise ValueError(
            f"linear_qkv has {rows} rows, expected {expected} for {shape.num_heads} heads, "
            f"{ng} query groups and head dim {hd}"
        )
    idx = torch.arange(rows).view(ng, per + 2, hd)
    return [
        (q, idx[:, :per].reshape(-1)),
        (k, idx[:, per].reshape(-1)),
        (v, idx[:, per + 1].reshape(-1)),
    ]


MappingKind = Callable[..., RowPlan]


class PerRankParts:
    """Mapping kind for a fused projection whose every tensor-parallel shard is
    ``[part_0 shard; part_1 shard; ...]`` along dim 0 (Mamba's ``in_proj`` and ``conv1d``).

    ``parts(info)`` gives the full (unsplit) row count of each part; :meth:`bind_tp` (called
    by the planner with the tensor's TP size) returns the row-selection kind that turns the
    gathered ``[rank0 parts | rank1 parts | ...]`` into ``[part_0 | part_1 | ...]``."""

    def __init__(self, name: str, parts):
        self.name = name
        self.parts = parts

    def bind_tp(self, info, tp: int):
        sizes = list(self.parts(info))
        name = self.name

        def kind(targets, rows, shape=None):
            (target,) = targets
            if rows != sum(sizes):
                raise ValueError(f"{name} has {rows} rows, expected {sum(sizes)} = {' + '.join(map(str, sizes))}")
            if tp == 1:
                return [(target, None)]
            return [(target, per_rank_parts_rows(sizes, tp))]

        kind.__name__ = f"{name}_tp{tp}"
        return kind

    def __call__(self, targets, rows, shape=None):
        raise TypeError(f"{self.name}: the row order depends on the TP size; the planner binds it with bind_tp()")


def per_rank_parts_rows(sizes: list[int], tp: int) -> torch.Tensor:
    """Row index that re-orders ``cat_r [part_0/tp of rank r; part_1/tp of rank r; ...]`` into
    ``[part_0; part_1; ...]`` (each part in rank order)."""
    for s in sizes:
        if s % tp:
            raise ValueError(f"part of {s} rows does not split over {tp} tensor-parallel ranks")
    local = [s // tp for s in sizes]
    per_rank = sum(local)
    idx = []
    off = 0
    for s in local:
        for r in range(tp):
            start = r * per_rank + off
            idx.append(torch.arange(start, start + s))
        off += s
    return torch.cat(idx)


def apply_rows(tensor: torch.Tensor, rows: "torch.Tensor | None") -> torch.Tensor:
    """``tensor[rows]`` on the tensor's own device: a view (``narrow``) when the rows are
    one ascending run (gate/up halves), else a gather with the index moved to the tensor."""
    if rows is None:
        return tensor
    n = rows.numel()
    if n and rows.dim() == 1:
        first = int(rows[0])
        if int(rows[-1]) == first + n - 1 and (n < 3 or bool((rows.diff() == 1).all())):
            return tensor.narrow(0, first, n)
    return tensor.index_select(0, rows.to(tensor.device))


def apply_plan_to_packed(packed: dict[str, torch.Tensor], plan: RowPlan, total_rows: int) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Apply a row plan to every row-wise tensor of a packed dict (scalars are shared)."""
    out = []
    for target, rows in plan:
        part = {}
        for suffix, t in packed.items():
            if t.dim() >= 1 and t.shape[0] == total_rows:
                part[suffix] = apply_rows(t, rows)
            else:
                part[suffix] = t
        out.append((target, part))
    return out


# -- the escape hatch: value transforms and stacked experts ---------------------------------
@dataclass(frozen=True)
class ValueTransform:
    """A function of the values of one HF tensor, applied after the row selection.

    Row selections commute with quantization (rows of a packed weight are rows of its block
    scales), value transforms in general do not: ``packed=False`` makes planning refuse a
    quantized weight that needs it, before anything is written.  ``shape`` maps the
    row-selected shape to the written one (a transpose or a stack changes it);
    ``when(info)`` says whether the transform applies to a given model at all (a
    zero-centred norm only when the model stores its norms zero-centred).  A ``packed=True``
    transform is applied to every non-scalar tensor of a packed weight (the codes and the
    row-wise block scales) and must keep their shapes (a row permutation, say)."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    shape: Callable[[tuple], tuple] = tuple
    packed: bool = False
    when: Callable[..., bool] = lambda info: True

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return self.fn(t)


def _zero_centred(info) -> bool:
    return bool(getattr(info.config, "layernorm_zero_centered_gamma", False))


# Megatron ``layernorm_zero_centered_gamma``: the norm stores ``gamma - 1`` and applies
# ``(1 + w) * x_hat``; an HF norm of the plain form needs ``w + 1`` (in float32, then cast).
ZERO_CENTRED_NORM = ValueTransform("zero-centred norm weight + 1", lambda t: (t.float() + 1).to(t.dtype), when=_zero_centred)


def _group_limited(info) -> bool:
    c = info.config
    groups = getattr(c, "moe_router_num_groups", None)
    return bool(groups) and getattr(c, "moe_router_group_topk", None) not in (None, groups)


def _shift_nonnegative(t: torch.Tensor) -> torch.Tensor:
    low = t.min()
    return t - low if bool(low < 0) else t


# Group-limited sigmoid routing (DeepSeek-V3, GLM-4.5): the expert bias only ranks experts (the
# gating weights use the unbiased scores), and adding one constant to every expert's bias ranks
# groups (sum of their top-2) and experts exactly as before.  transformers masks the experts of
# unchosen groups with 0.0 where Megatron uses -inf, so a chosen expert whose score + bias is
# negative would lose to a masked one there; shifting the bias to >= 0 (sigmoid scores are > 0)
# makes transformers route as Megatron does.  (Found by the config fuzzer, issue 21.)
NONNEGATIVE_GROUPED_EXPERT_BIAS = ValueTransform(
    "expert bias shifted to >= 0 (group-limited routing)", _shift_nonnegative, when=_group_limited)


@dataclass(frozen=True)
class ExpertStack:
    """All of a layer's routed experts in one HF tensor (gpt-oss ``mlp.experts.gate_up_proj``
    ``[E, H, 2F]``): the planner makes one job per layer and projection whose local tensor is
    this rank's experts stacked on a new dim 0, gathered over the expert-parallel group to its
    rank 0 (the layer's one owner, holding one layer's experts at a time); ``transform`` turns
    the gathered ``[E, rows, cols]`` (``[E, rows]`` for a bias) into the HF layout."""

    target: str  # HF name relative to the layer prefix
    transform: Optional[ValueTransform] = None
    bias_target: Optional[str] = None  # where the expert linear's bias goes, if it has one
    bias_transform: Optional[ValueTransform] = None


def interleave_halves(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``[gate; up]`` along ``dim`` -> ``[g_0, u_0, g_1, u_1, ...]`` (gpt-oss stores its fused
    gate/up columns interleaved, ``gate = x[..., ::2]``, ``up = x[..., 1::2]``)."""
    dim = dim % t.dim()
    n = t.shape[dim]
    if n % 2:
        raise ValueError(f"cannot interleave gate/up halves of an odd dimension ({n})")
    gate, up = t.split(n // 2, dim=dim)
    return torch.stack((gate, up), dim=dim + 1).flatten(dim, dim + 1)
