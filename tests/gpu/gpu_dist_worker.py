"""One rank of the 2-GPU export test (launched by tests/gpu/test_gpu_dist.py through torchrun).

    torchrun --nproc_per_node 2 tests/gpu/gpu_dist_worker.py MODE OUT_DIR NODEID

1. Reference: tensor and expert parallel 1 (each GPU holds the whole float32 TEGroupedMLP
   Qwen3-MoE; data parallel 2).  Megatron forward -> reference logits; collective export ->
   the one-GPU checkpoint (data-parallel replicas write nothing twice); Megatron's own
   distributed checkpoint (``dist_checkpointing.save``) of the same weights.
2. MODE ``ep2``: expert parallel 2 (each rank holds 2 of the 4 experts); ``tp2``: tensor
   parallel 2 (expert tensor parallel 2 too).  The model is rebuilt in that layout and loaded
   from the distributed checkpoint, so Megatron itself reshards the same weights (the test
   does not slice anything).  Collective export; rank 0 checks that the checkpoint equals the
   one-GPU export (keys, dtypes, bytes), loads it in transformers and compares logits with the
   reference forward (max abs diff <= 5e-3), and the parallel Megatron forward with it too.
Exit status 0 only if every check passed.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import gpu_common as G  # noqa: E402

FP32_ATOL = 5e-3


def compare_exports(out: Path, ref: Path) -> list[str]:
    """Keys, dtypes, shapes and values bit for bit, and config.json."""
    from safetensors import safe_open

    problems = []
    idx = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    ref_idx = json.loads((ref / "model.safetensors.index.json").read_text())["weight_map"]
    if set(idx) != set(ref_idx):
        problems.append(f"keys differ: missing {sorted(set(ref_idx) - set(idx))[:5]}, extra {sorted(set(idx) - set(ref_idx))[:5]}")
    for key in sorted(set(idx) & set(ref_idx)):
        with safe_open(str(out / idx[key]), "pt") as f:
            got = f.get_tensor(key)
        with safe_open(str(ref / ref_idx[key]), "pt") as f:
            want = f.get_tensor(key)
        if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
            d = (got.float() - want.float()).abs().max().item() if got.shape == want.shape else float("nan")
            problems.append(f"{key}: differs from the one-GPU export (max abs diff {d:.3g})")
    if json.loads((out / "config.json").read_text()) != json.loads((ref / "config.json").read_text()):
        problems.append("config.json differs from the one-GPU export's")
    return problems


def main(mode: str, out_dir: str, nodeid: str) -> int:
    from megatron.core import dist_checkpointing, parallel_state

    tp, ep = {"ep2": (1, 2), "tp2": (2, 1)}[mode]
    root = Path(out_dir)
    spec = G.tiny_spec("qwen3_moe")

    # 1. one-GPU reference (TP1 EP1, data parallel 2)
    G.init_mcore_gpu(tp=1, ep=1)  # sets this rank's CUDA device: tokens go there
    ids = G.tokens(spec.vocab_size, batch=4, seq=64)
    rank = dist.get_rank()
    ref_model = G.build_te_gpt(spec, torch.float32)
    ref = G.megatron_logits(ref_model, ids)
    ref_out = root / "one_gpu"
    ref_res, _ = G.export(ref_model, ref_out, "qwen3_moe", torch.float32)
    ckpt = root / "mcore_dist_ckpt"
    if rank == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(ref_model.sharded_state_dict(), str(ckpt))
    del ref_model
    torch.cuda.empty_cache()
    parallel_state.destroy_model_parallel()

    # 2. the parallel layout, same weights through Megatron's resharding
    G.init_mcore_gpu(seed=99, tp=tp, ep=ep)  # another seed: a failed load would show
    model = G.build_te_gpt(spec, torch.float32, seed=99)
    state = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt))
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad_load = [k for k in list(missing) + list(unexpected) if not k.endswith("_extra_state")]
    par = G.megatron_logits(model, ids)
    out = root / mode
    res, note = G.export(model, out, "qwen3_moe", torch.float32)
    code = 0
    if rank == 0:
        problems: list[str] = [f"dist checkpoint load: {bad_load[:5]}"] if bad_load else []
        try:
            problems += compare_exports(out, ref_out)
        except Exception:  # noqa: BLE001 - report it, with the other checks
            problems.append(traceback.format_exc(limit=3))
        hf, info = G.load_hf_gpu(out, torch.float32)
        got = G.hf_logits(hf, ids)
        diff = (got - ref).abs().max().item()
        par_diff = (par - ref).abs().max().item()
        agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        loading = G.loading_problems(info)
        files = sorted(p.name for p in out.glob("*.safetensors"))
        G.record(nodeid, mode=mode, world=dist.get_world_size(), tp=tp, ep=ep, experts=G.experts_type(model),
                 max_abs_diff=diff, parallel_megatron_vs_one_gpu=par_diff, argmax_agreement=agree,
                 loading_problems=loading, files=files, tensors=res.num_tensors, export_s=res.seconds,
                 one_gpu_export_s=ref_res.seconds,
                 vs_one_gpu_export="bit-exact" if not problems else f"{len(problems)} problems",
                 problems=problems[:6], note=note)
        if problems or loading or diff > FP32_ATOL or par_diff > FP32_ATOL:
            print(f"{mode}: FAILED max abs diff {diff:.3g} (parallel Megatron {par_diff:.3g}), loading {loading}, "
                  f"problems {problems[:6]}", flush=True)
            code = 1
        else:
            print(f"{mode}: ok, bit-exact with the one-GPU export; max abs diff {diff:.3g} (parallel Megatron "
                  f"{par_diff:.3g}), argmax {agree:.2%}, files {files}", flush=True)
    flag = torch.tensor([code], device="cuda")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    dist.barrier()
    dist.destroy_process_group()
    return int(flag.item())


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
