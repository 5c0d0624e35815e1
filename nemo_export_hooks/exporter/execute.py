"""Run a plan: gather each tensor to its owner, pack it (cast or quantize), split it into
HF tensors, and yield them one at a time.

Every rank iterates the same job list in the same order, so the tensor-parallel gathers
inside each group line up; ranks that do not own a job take part in its gather and yield
nothing.  Memory held at any time: one gathered tensor and its packed form.

All the work happens on the device where the weights live (pure torch ops that run on CPU
and CUDA alike): the consumer decides where the results go (``PreparedExport.tensors``
copies each to the host, ``host_snapshot`` into a pinned pool).  A yielded tensor may be a
view of the model's own storage (a rename or a gate/up half in the export dtype), so a
consumer that keeps it past the next optimizer step must copy it.

:func:`describe` lists, without touching any data, the names, dtypes and shapes that
:func:`run_jobs` will yield on this rank, in the same order: the writer lays out its part
headers from it and the host snapshot sizes its pool.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from . import mappings as mk
from .parallel import gather_to_owner, max_over
from .plan import ExportPlan, Job, attention_shape


def _read_spec(job: Job):
    if job.quant_module is None or not job.is_weight:
        return None
    from . import quant  # lazy: ModelOpt state is only read when quantizers exist

    return quant.read_quant_spec(job.quant_module, job.source, expert_index=job.quant_index)


def _quant_spec(job: Job, plan: ExportPlan):
    spec = _read_spec(job)
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
        full = gather_to_owner(job.local_tensor(), job.tp_dim, job.group, glu=job.glu)
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
    """One full Megatron tensor -> its HF tensors (pure, on ``full``'s device; the results
    may be views of ``full``)."""
    full = full.detach()
    rows = full.shape[0]
    plan = job.kind(job.targets, rows, shape)
    if spec is not None:
        from . import quant

        packed = quant.pack_weight(full.float(), spec, dtype)
        for target, part in mk.apply_plan_to_packed(packed, plan, rows):
            base = target[: -len(".weight")]
            for suffix, t in part.items():
                if job.transform is not None and t.dim() >= 1:  # a packed-safe one (planning checked)
                    t = job.transform(t)
                yield f"{base}.{suffix}", t.contiguous()
        return
    out_dtype = torch.float32 if job.keep_fp32 else dtype
    for target, idx in plan:
        t = mk.apply_rows(full, idx)
        if job.transform is not None:  # planning refused it for quantized weights
            t = job.transform(t)
        yield target, (t if t.dtype == out_dtype else t.to(out_dtype)).contiguous()


def full_shape(job: Job) -> list[int]:
    """The job's tensor shape after the tensor-parallel gather (from the plan, no data)."""
    shape = list(job.tensor.shape)
    if job.tp_dim is not None and job.group.size > 1:
        shape[job.tp_dim % len(shape)] *= job.group.size
    return shape


def describe(plan: ExportPlan, dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``[(HF name, dtype, shape)]`` of what :func:`run_jobs` yields on this rank, in order,
    from the plan alone (no data, no collectives)."""
    shape = attention_shape(plan.info.config)
    out: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    for job in plan.jobs:
        if not job.owner:
            continue
        full = full_shape(job)
        rows = full[0]
        row_plan = job.kind(job.targets, rows, shape)
        spec = _read_spec(job)
        if spec is not None:
            from . import quant

            packed = quant.tensor_specs(spec, full)
            for target, idx in row_plan:
                n = rows if idx is None else idx.numel()
                base = target[: -len(".weight")]
                for suffix, dt, s in packed:
                    s = [n, *s[1:]] if len(s) >= 1 and s[0] == rows else s
                    out.append((f"{base}.{suffix}", dt, tuple(s)))
            continue
        out_dtype = torch.float32 if job.keep_fp32 else dtype
        for target, idx in row_plan:
            n = rows if idx is None else idx.numel()
            s = tuple([n, *full[1:]])
            out.append((target, out_dtype, tuple(job.transform.shape(s)) if job.transform is not None else s))
    return out
