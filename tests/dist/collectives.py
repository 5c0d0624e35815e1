"""torchrun program: ``exporter/parallel.py``'s collectives on their own, without Megatron,
on NCCL (one GPU per rank) or gloo (CPU).

    torchrun --nproc-per-node 2 tests/dist/collectives.py --backend nccl   # a 2-GPU machine
    torchrun --nproc-per-node 2 tests/dist/collectives.py --backend gloo   # anywhere

Checks, for several shapes, dtypes and split dims (plus gated fc1 and non-contiguous
shards): ``gather_to_owner`` gives rank 0 exactly the full tensor, on the shards' device, and
``None`` elsewhere; ``all_ok``/``raise_if_any_failed`` make every rank raise when one fails
(naming it) and pass when none does; ``gather_objects``/``broadcast_object`` carry metadata;
``max_over`` reduces.  Rank 0 prints one JSON line ``{"ok": ..., "problems": [...]}``;
the exit status is 1 on any problem.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    import torch.distributed as dist

    from nemo_export_hooks.exporter import parallel
    from nemo_export_hooks.exporter.parallel import Group

    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="nccl")
    args = ap.parse_args()
    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=60))
    rank, n = dist.get_rank(), dist.get_world_size()
    if args.backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    group = Group(dist.new_group(list(range(n))), rank, n)
    problems: list[str] = []
    gen = torch.Generator().manual_seed(0)

    cases = [
        ("qkv rows", (8 * n, 16), 0, False, torch.float32, False),
        ("fc2 cols", (16, 8 * n), 1, False, torch.float32, False),
        ("glu fc1", (2 * 4 * n, 16), 0, True, torch.bfloat16, False),
        ("vocab rows bf16", (6 * n, 10), 0, False, torch.bfloat16, False),
        ("3-D middle dim", (3, 4 * n, 5), 1, False, torch.float16, False),
        ("legacy grouped view fc1", (4 * n, 12), 0, False, torch.float32, True),
        ("legacy grouped view glu", (2 * 2 * n, 12), 0, True, torch.float32, True),
        ("replicated", (7, 3), None, False, torch.float32, False),
    ]
    for name, shape, dim, glu, dtype, transposed in cases:
        full = torch.randn(shape, generator=gen).to(dtype)
        if dim is None:
            shard = full
        elif glu:
            gate, up = full.chunk(2, dim=0)
            shard = torch.cat([gate.chunk(n, dim=0)[rank], up.chunk(n, dim=0)[rank]], dim=0)
        else:
            shard = full.chunk(n, dim=dim)[rank]
        local = shard.to(device)
        if transposed:  # a non-contiguous [out, in] view of an [in, out] buffer, as GroupedMLP's
            local = local.t().contiguous().t()
            assert not local.is_contiguous()
        out = parallel.gather_to_owner(local, dim, group, glu=glu)
        if rank == 0:
            if out is None:
                problems.append(f"{name}: owner got None")
            elif out.device != local.device or out.dtype != dtype or not torch.equal(out.cpu(), full):
                problems.append(f"{name}: owner got {tuple(out.shape)} {out.dtype} {out.device}, not the full tensor")
        elif out is not None:
            problems.append(f"{name}: rank {rank} (not the owner) got a tensor")

    amax = parallel.max_over(torch.tensor([float(rank)], device=device), group)
    if amax.item() != n - 1:
        problems.append(f"max_over gave {amax.item()}, expected {n - 1}")

    # error agreement: nobody fails -> nobody raises
    try:
        parallel.all_ok(True, "")
        parallel.raise_if_any_failed(None)
    except Exception as e:
        problems.append(f"rank {rank}: raised although every rank was ok: {e}")
    # the last rank fails -> it returns from all_ok / re-raises its own; the others raise
    bad = rank == n - 1
    try:
        parallel.all_ok(not bad, f"rank {rank}: injected")
        if not bad:
            problems.append(f"rank {rank}: all_ok did not raise although rank {n - 1} failed")
    except RuntimeError as e:
        if bad or f"rank {n - 1}: injected" not in str(e):
            problems.append(f"rank {rank}: unexpected all_ok error {e}")
    try:
        parallel.raise_if_any_failed(OSError("disk full (injected)") if bad else None)
        problems.append(f"rank {rank}: raise_if_any_failed did not raise")
    except OSError:
        if not bad:
            problems.append(f"rank {rank}: got the other rank's exception type")
    except RuntimeError as e:
        if bad or "OSError: disk full (injected)" not in str(e):
            problems.append(f"rank {rank}: unexpected error {e}")

    got = parallel.gather_objects({"rank": rank, "problems": problems})
    box = parallel.broadcast_object("from rank 0" if rank == 0 else None)
    if box != "from rank 0":
        problems.append(f"rank {rank}: broadcast_object gave {box!r}")
    bcast = parallel.gather_objects(problems)
    status = 0
    if rank == 0:
        every = [p for r in got for p in r["problems"]] + [p for r in bcast for p in r if p not in problems]
        every = list(dict.fromkeys(every))
        print(json.dumps({"backend": args.backend, "world_size": n, "device": str(device), "ok": not every, "problems": every}), flush=True)
        status = 1 if every else 0
    dist.barrier()
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
