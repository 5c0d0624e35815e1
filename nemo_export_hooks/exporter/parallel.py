"""Process groups, ownership and tensor-parallel gathers: the only module that talks to
``torch.distributed``.

Who writes what:
* Non-expert tensors are replicated across data parallel (and expert parallel, which is
  carved out of data parallel) ranks; the owner is TP rank 0 of data-parallel rank 0
  (context parallel included) of each pipeline stage.
* Expert tensors: each EP rank owns its own experts (no gather); the owner inside an
  expert-tensor-parallel group is its rank 0, of expert-data-parallel rank 0.
* TP (and expert-TP) shards are gathered to the owner inside their own group only, one
  tensor at a time, straight into one buffer on the owner (the other ranks only send), so
  no rank ever holds more than its shard plus one full tensor.

Failures: a collective export must never leave one rank waiting for another that gave up.
Every step that can fail on some ranks only ends in an agreement (:func:`all_ok`,
:func:`raise_if_any_failed`) before the next collective, so if one rank fails every rank
raises, naming the rank and its error.  The write is one sequence whose rounds are the same
whether it succeeds or not: the coordinator opens the staging directory, every rank writes
locally, the ranks' reports go to the coordinator, the coordinator commits or refuses
(:func:`on_coordinator` for its two steps); :func:`check_gathers_aligned` refuses, before the
first gather, TP peers whose gathers would not line up.  Only small metadata (names, key
maps, error messages) travels through the ``*_object`` collectives; tensors never do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

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

    Only the owner allocates: one buffer of the full tensor, which the shards are received
    into in place (``dist.gather``; the other ranks only send).  Splits along dim 0 (QKV,
    fc1, vocab) need no further copy; other dims are re-laid out once.
    """
    local = tensor.detach()
    if group.size == 1:
        return local
    if dim is None:
        return local if group.rank == 0 else None
    dist = _dist()
    if local.device.type != "cpu" and dist.get_backend(group.group) == "gloo":
        local = local.cpu()  # gloo gathers host tensors only
    dim = dim % local.dim()
    owner = group.rank == 0
    n = group.size
    full_shape = list(local.shape)
    full_shape[dim] *= n
    if dim != 0:
        if glu:
            raise ValueError(f"a gated fc1 must be split along dim 0, not dim {dim}")
        # shards received in place as [n, *local], then the group axis is moved next to
        # `dim` and merged with it (one copy): full[..., r*d + j, ...] = shard_r[..., j, ...]
        stacked = torch.empty((n, *local.shape), dtype=local.dtype, device=local.device) if owner else None
        _gather_into(local, stacked, group)
        return stacked.movedim(0, dim).reshape(full_shape) if owner else None
    out = torch.empty(full_shape, dtype=local.dtype, device=local.device) if owner else None
    if glu:
        rows = local.shape[0]
        if rows % 2:
            raise ValueError(f"gated fc1 shard has an odd number of rows ({rows}); cannot split gate/up")
        half = rows // 2
        # gate shards land in the first half of the full tensor, up shards in the second
        for h, piece in enumerate(local.split(half, dim=0)):
            _gather_into(piece, out.narrow(0, h * half * n, half * n) if owner else None, group)
    else:
        _gather_into(local, out, group)
    return out


def _gather_into(piece: torch.Tensor, out: Optional[torch.Tensor], group: Group) -> None:
    """``dist.gather`` of every rank's equal-shaped ``piece`` into ``out`` (owner only, a
    contiguous buffer of ``group.size`` pieces, received in place in rank order)."""
    dist = _dist()
    piece = piece.contiguous()
    parts = list(out.view(group.size, *piece.shape).unbind(0)) if out is not None else None
    dist.gather(piece, parts, dst=dist.get_global_rank(group.group, 0), group=group.group)


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


def _device(group: Any = None) -> str:
    """Where a collective's tensors must live: NCCL-only groups need CUDA tensors."""
    dist = _dist()
    return "cuda" if dist.get_backend(group) == "nccl" else "cpu"


_MAX_MESSAGE = 1000  # characters of one rank's error message sent to the others


def all_ok(ok: bool, message: str = "", group: Any = None) -> None:
    """Collective error check: if any rank failed, every rank raises (no rank hangs).

    Every rank calls it once, ``ok=False`` with a ``message`` where it failed.  A failed
    rank returns (it raises its own error afterwards); every other rank raises a
    ``RuntimeError`` carrying the failed ranks' messages.  One integer all-reduce when all
    is well; only after a failure are the (short) messages exchanged.

    ``group`` lets a background writer use its own (gloo) group, so its metadata
    collectives never interleave with the training loop's on the default group."""
    dist = _dist()
    if _world(group) == 1:
        return
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if not flag.item():
        return
    reports: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(reports, None if ok else (message or "failed")[:_MAX_MESSAGE], group=group)
    if ok:
        failed = "; ".join(m for m in reports if m is not None)
        raise RuntimeError(f"export failed on another rank: {failed}")


def raise_if_any_failed(error: Optional[BaseException], group: Any = None) -> None:
    """Collective: every rank passes its own exception (or ``None``).  If any rank failed,
    every rank raises: a failed rank its own exception, the others a ``RuntimeError``
    naming the failed ranks and why.  Use it after every step that can fail on some ranks
    only (planning, a rank's own writes) and before the next collective."""
    dist = _dist()
    if _world(group) == 1:
        if error is not None:
            raise error
        return
    message = None if error is None else f"rank {dist.get_rank()}: {type(error).__name__}: {error}"
    all_ok(error is None, message or "", group=group)
    if error is not None:
        raise error


def check_gathers_aligned(jobs: list, layout: "ParallelLayout", as_error: bool = False) -> Any:
    """Collective inside each tensor / expert-tensor parallel group: its ranks must run the
    same gathers in the same order (same tensors, shapes, dtypes, quantization), or one
    would wait for the others forever.  Returns a description of the mismatch on every
    rank of a mismatched group (a ``ValueError`` with ``as_error``), else ``None``.
    ``jobs`` are duck-typed plan jobs."""
    import hashlib

    dist = _dist()
    problems = []
    for label, g in (("tensor", layout.tp), ("expert-tensor", layout.etp)):
        if g.size == 1:
            continue
        h = hashlib.sha1()
        count = 0
        for j in jobs:
            if j.group is not g or j.tp_dim is None:
                continue
            t = j.tensor
            sig = (j.source, j.tp_dim, tuple(t.shape), str(t.dtype), bool(j.glu), j.quant_module is not None)
            h.update(repr(sig).encode())
            count += 1
        mine = (count, h.hexdigest())
        peers: list = [None] * g.size
        dist.all_gather_object(peers, mine, group=g.group)
        if any(p != mine for p in peers):
            ranks = dist.get_process_group_ranks(g.group)
            detail = ", ".join(f"rank {r}: {c} gathers" for r, (c, _) in zip(ranks, peers))
            problems.append(
                f"the ranks of a {label}-parallel group hold different models ({detail}; same count "
                "means different names, shapes or quantization): their gathers would not line up"
            )
    if not problems:
        return None
    return ValueError("; ".join(problems)) if as_error else "; ".join(problems)


class RanksFailed(Exception):
    """Raised by a coordinator step to refuse because ranks failed; its message is their own
    reports, each naming its rank and error (so :func:`on_coordinator` adds no type name)."""


def on_coordinator(step: Callable[[], Any], failure: str, group: Any = None) -> Any:
    """The coordinator's step of a sequence, and the agreement on its outcome in one broadcast.

    Global rank 0 runs ``step()``; every rank returns its value, or every rank raises
    ``RuntimeError("{failure}: {Type}: {message}")`` (chained to the original exception on
    rank 0; :class:`RanksFailed` reads ``"{failure}: {message}"``).  ``step`` is not called on
    the other ranks (pass any callable there).  An export is written as: the coordinator opens the staging directory (this), every rank
    writes its own parts locally, :func:`gather_objects` brings each rank's report to the
    coordinator, the coordinator commits or refuses (this again).  Success or failure, every
    rank makes the same collectives in the same order, so none is left waiting."""
    dist = _dist()
    if _world(group) == 1 or dist.get_rank() == 0:
        try:
            box: tuple = ("ok", step())
            cause = None
        except Exception as e:
            what = str(e) if isinstance(e, RanksFailed) else f"{type(e).__name__}: {e}"
            box, cause = ("error", f"{failure}: {what}"[: 4 * _MAX_MESSAGE]), e
    else:
        box, cause = ("pending", None), None
    box = broadcast_object(box, group=group)
    if box[0] == "error":
        raise RuntimeError(box[1]) from cause
    return box[1]


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


# -- the training hooks' own groups -------------------------------------------------------
class ControlPlane:
    """The collectives a training hook (any framework's) needs around its exports.

    With several ranks it creates two gloo groups of its own at construction: ``write``
    for the background writer's metadata collectives and ``ctl`` for the training thread's
    agreements ("did every rank's plan work", "has every rank finished writing"), so that
    collectives of two threads never share a group, and neither shares one with training.
    With one rank (or no ``torch.distributed``) every method is a local no-op."""

    def __init__(self) -> None:
        dist = _dist()
        self.world = dist.get_world_size() if dist is not None else 1
        self.rank = dist.get_rank() if dist is not None else 0
        self.write = self.ctl = None
        if self.world > 1:
            self.write = dist.new_group(backend="gloo")
            self.ctl = dist.new_group(backend="gloo")

    def agree(self, err: Optional[BaseException]) -> Optional[BaseException]:
        """Every rank learns whether any rank failed: returns this rank's error, or one
        naming another rank's failure, or ``None`` when every rank succeeded."""
        if self.world <= 1:
            return err
        try:
            msg = f"rank {self.rank}: {type(err).__name__}: {err}" if err else ""
            all_ok(err is None, msg, group=self.ctl)
        except Exception as e:
            err = err or e
        return err

    def all_true(self, flag: bool) -> bool:
        if self.world <= 1:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        _dist().all_reduce(t, op=_dist().ReduceOp.MIN, group=self.ctl)
        return bool(t.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (small metadata: decisions, ids, paths)."""
        return broadcast_object(obj, group=self.ctl) if self.world > 1 else obj
