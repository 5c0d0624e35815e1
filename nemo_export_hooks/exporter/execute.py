"""Run a plan: gather each tensor to its owner, pack it (cast or quantize), split it into
HF tensors, and yield them one at a time.

Every rank iterates the same job list in the same order, so the tensor-parallel gathers
inside each group line up; ranks that do not own a job take part in its gather and yield
nothing.  Memory held at any time: one gathered tensor and its packed form.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from . import mappings as mk
from .parallel import gather_to_owner, max_over
from .plan import ExportPlan, Job, attention_shape


def _quant_spec(job: Job, plan: ExportPlan):
    if job.quant_module is None:
        return None
    from . import quant  # lazy: ModelOpt state is only read when quantizers exist

    spec = quant.read_quant_spec(job.quant_module, job.source, expert_index=job.quant_index)
    if spec is not None and job.tp_dim is not None and job.group.size > 1:
        # Per-tensor scales of a TP-split weight must be the same on every shard: use the max
        # over the group (ModelOpt does not sync block-quantized amax across TP).  Row-parallel
        # inputs are split too, so their input amax is reduced the same way.
        spec.weight_amax = max_over(spec.weight_amax, job.group)
        if spec.input_amax is not None:
            spec.input_amax = max_over(spec.input_amax, job.group)
    return spec


def run_jobs(plan: ExportPlan, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    shape = attention_shape(plan.info.config)
    failure: Optional[Exception] = None
    for job in plan.jobs:
        spec = _quant_spec(job, plan) if job.is_weight else None
        full = gather_to_owner(job.tensor, job.tp_dim, job.group, glu=job.glu)
        if full is None or not job.owner or failure is not None:
            continue
        # A conversion error on the owner must not leave its group's peers waiting in the
        # next gather: remember it, keep taking part in the gathers, raise at the end.
        try:
            yield from convert(job, full, spec, dtype, shape)
        except Exception as e:
            failure = e
    if failure is not None:
        raise failure


def convert(job: Job, full: torch.Tensor, spec, dtype: torch.dtype, shape) -> Iterator[tuple[str, torch.Tensor]]:
    """One full Megatron tensor -> its HF tensors (pure)."""
    full = full.detach()
    if full.device.type != "cpu":
        full = full.to("cpu", non_blocking=False)
    rows = full.shape[0]
    plan = job.kind(job.targets, rows, shape)
    if spec is not None:
        from . import quant

        packed = quant.pack_weight(full.float(), spec, dtype)
        for target, part in mk.apply_plan_to_packed(packed, plan, rows):
            base = target[: -len(".weight")]
            for suffix, t in part.items():
                yield f"{base}.{suffix}", t.contiguous()
        return
    out_dtype = torch.float32 if job.keep_fp32 else dtype
    for target, idx in plan:
        if idx is None:  # a fresh tensor, never the model's own storage (async snapshots)
            yield target, full.to(out_dtype, copy=True).contiguous()
        else:
            yield target, full.index_select(0, idx).to(out_dtype).contiguous()
