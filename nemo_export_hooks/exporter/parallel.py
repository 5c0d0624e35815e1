"""Process groups, ownership and tensor-parallel gathers: the only module that talks to
``torch.distributed``.

Who writes what:
* Non-expert tensors are replicated across data parallel (and expert parallel, which is
  carved out of data parallel) ranks; the owner is TP rank 0 of data-parallel rank 0
  (context parallel included) of each pipeline stage.
* Expert tensors: each EP rank owns its own experts (no gather); the owner inside an
  expert-tensor-parallel group is its rank 0, of expert-data-parallel rank 0.
* TP (and expert-TP) shards are gathered to the owner inside their own group only, one
  tensor at a time, so no rank ever holds more than its shard plus one full tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _ps():
    """Megatron's parallel_state, if initialised (lazy: the package imports without it)."""
    try:
        from megatron.core import parallel_state as ps
    except ImportError:  # pragma: no cover
        return None
    return ps if ps.model_parallel_is_initialized() else None


@dataclass
class Group:
    """A process group with this rank's position in it (``group=None`` means size 1)."""

    group: Any
    rank: int
    size: int

    @staticmethod
    def single() -> "Group":
        return Group(None, 0, 1)


@dataclass
class ParallelLayout:
    tp: Group
    etp: Group
    ep: Group
    dp_rank: int  # data-parallel (with context parallel) rank, for non-expert tensors
    edp_rank: int  # expert-data-parallel rank, for expert tensors
    pp_rank: int
    pp_size: int
    world_rank: int
    world_size: int

    @property
    def owns_dense(self) -> bool:
        return self.tp.rank == 0 and self.dp_rank == 0

    @property
    def owns_experts(self) -> bool:
        return self.etp.rank == 0 and self.edp_rank == 0

    @property
    def is_writer(self) -> bool:
        return self.owns_dense or self.owns_experts


def current_layout() -> ParallelLayout:
    dist = _dist()
    ps = _ps()
    if dist is None or ps is None:
        rank = dist.get_rank() if dist else 0
        size = dist.get_world_size() if dist else 1
        if size > 1:
            raise RuntimeError(
                "torch.distributed is initialised with several ranks but Megatron's parallel_state "
                "is not: cannot tell which rank owns which tensors"
            )
        one = Group.single()
        return ParallelLayout(one, one, one, 0, 0, 0, 1, rank, size)

    def grp(get_group, get_rank, get_size) -> Group:
        size = get_size()
        return Group(get_group() if size > 1 else None, get_rank(), size)

    tp = grp(ps.get_tensor_model_parallel_group, ps.get_tensor_model_parallel_rank, ps.get_tensor_model_parallel_world_size)
    etp = grp(
        ps.get_expert_tensor_parallel_group,
        ps.get_expert_tensor_parallel_rank,
        ps.get_expert_tensor_parallel_world_size,
    )
    ep = grp(ps.get_expert_model_parallel_group, ps.get_expert_model_parallel_rank, ps.get_expert_model_parallel_world_size)
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    edp_rank = ps.get_expert_data_parallel_rank()
    return ParallelLayout(
        tp=tp,
        etp=etp,
        ep=ep,
        dp_rank=dp_rank,
        edp_rank=edp_rank,
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        world_rank=dist.get_rank(),
        world_size=dist.get_world_size(),
    )


def gather_to_owner(tensor: torch.Tensor, dim: Optional[int], group: Group, glu: bool = False) -> Optional[torch.Tensor]:
    """Gather a tensor-parallel tensor to rank 0 of ``group``; others get ``None``.

    ``dim=None`` means the tensor is replicated in the group (rank 0's copy is taken).
    ``glu=True``: each rank holds ``[gate_shard; up_shard]`` along dim 0, so the shards are
    split before concatenating, giving the single-rank layout ``[gate; up]``.
    """
    local = tensor.detach()
    if group.size == 1:
        return local
    if dim is None:
        return local if group.rank == 0 else None
    dist = _dist()
    local = local.contiguous()
    if local.device.type == "cuda" or dist.get_backend(group.group) != "gloo":
        parts = [torch.empty_like(local) for _ in range(group.size)]
        dist.all_gather(parts, local, group=group.group)
        if group.rank != 0:
            return None
    else:
        parts = [torch.empty_like(local) for _ in range(group.size)] if group.rank == 0 else None
        dist.gather(local, parts, dst=dist.get_global_rank(group.group, 0), group=group.group)
        if group.rank != 0:
            return None
    if glu:
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=dim)


def max_over(value: torch.Tensor, group: Group) -> torch.Tensor:
    """All-reduce max (per-tensor amax of a TP-split weight is the max over the group)."""
    if group.size == 1:
        return value
    dist = _dist()
    out = value.detach().clone().float()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group.group)
    return out


def _world(group) -> int:
    dist = _dist()
    return 1 if dist is None else dist.get_world_size(group)


def all_ok(ok: bool, message: str = "", group: Any = None) -> None:
    """Collective error check: if any rank failed, every rank raises (no rank hangs).

    ``group`` lets a background writer use its own (gloo) group, so its metadata
    collectives never interleave with the training loop's on the default group."""
    dist = _dist()
    if _world(group) == 1:
        return
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if flag.item() and ok:
        raise RuntimeError(f"export failed on another rank{': ' + message if message else ''}")


def barrier(group: Any = None) -> None:
    if _world(group) > 1:
        _dist().barrier(group=group)


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """Small metadata only (paths, key maps); never tensors.  ``src`` is a global rank."""
    if _world(group) == 1:
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src, group=group)
    return box[0]


def gather_objects(obj: Any, group: Any = None) -> Optional[list]:
    """Gather small metadata to global rank 0 (key->file maps); None on other ranks."""
    dist = _dist()
    if _world(group) == 1:
        return [obj]
    out = [None] * dist.get_world_size(group) if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0, group=group)
    return out
