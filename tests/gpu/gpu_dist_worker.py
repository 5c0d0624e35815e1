"""One rank of the 2-GPU export test (launched by tests/gpu/test_gpu_dist.py through torchrun).

    torchrun --nproc_per_node 2 tests/gpu/gpu_dist_worker.py MODE OUT_DIR NODEID

MODE ``ep2``: expert parallel 2 (each rank holds 2 of the 4 TEGroupedMLP experts);
``tp2``: tensor parallel 2 (expert tensor parallel 2 too).  Every rank builds its part of a
float32 Qwen3-MoE model, runs Megatron's forward on the same tokens, and takes part in the
collective export; rank 0 loads the checkpoint in transformers and compares logits.
Exit status 0 only if rank 0's comparison passed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import gpu_common as G  # noqa: E402

FP32_ATOL = 5e-3


def main(mode: str, out_dir: str, nodeid: str) -> int:
    tp, ep = {"ep2": (1, 2), "tp2": (2, 1)}[mode]
    G.init_mcore_gpu(tp=tp, ep=ep)
    rank = dist.get_rank()
    spec = G.tiny_spec("qwen3_moe")
    model = G.build_te_gpt(spec, torch.float32)
    ids = G.tokens(spec.vocab_size, batch=4, seq=64)
    ref = G.megatron_logits(model, ids)
    out = Path(out_dir) / mode
    res, note = G.export(model, out, "qwen3_moe", torch.float32)
    code = 0
    if rank == 0:
        hf, info = G.load_hf_gpu(out, torch.float32)
        got = G.hf_logits(hf, ids)
        diff = (got - ref).abs().max().item()
        agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        problems = G.loading_problems(info)
        files = sorted(p.name for p in out.glob("*.safetensors"))
        G.record(nodeid, mode=mode, world=dist.get_world_size(), tp=tp, ep=ep, experts=G.experts_type(model),
                 max_abs_diff=diff, argmax_agreement=agree, loading_problems=problems, files=files,
                 tensors=res.num_tensors, export_s=res.seconds, note=note)
        if problems or diff > FP32_ATOL:
            print(f"{mode}: FAILED max abs diff {diff:.3g}, loading problems {problems}", flush=True)
            code = 1
        else:
            print(f"{mode}: ok max abs diff {diff:.3g}, argmax {agree:.2%}, files {files}", flush=True)
    flag = torch.tensor([code], device="cuda")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    dist.barrier()
    dist.destroy_process_group()
    return int(flag.item())


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
