"""torchrun program: the Qwen3-Next / Qwen3.5-MoE test models (tests/test_qwen3_next.py,
tests/test_qwen3_5_moe.py) under tensor parallelism (TP=2).  Each rank loads the world-size-1 weights sliced the way megatron-core
0.19 lays them out -- a Gated DeltaNet ``in_proj`` / ``conv1d`` shard holds the rank's slice of
every part (``[q_r | k_r | v_r | z_r | b_r | a_r]``, ``[q_r | k_r | v_r]``: the sections its
``sharded_state_dict`` declares), everything else split contiguously -- then checks that

* Megatron's own TP=2 forward gives the world-size-1 logits (so the slicing is the layout the
  model computes with), and
* the TP=2 export equals the world-size-1 export tensor for tensor, bit for bit, and in
  config.json.

Usage: torchrun --nproc-per-node=2 run_qwen3_next.py --ref DIR --out DIR [--arch ARCH --pattern PATTERN]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "dist")]
import dist_common as C  # noqa: E402


def per_rank_parts(full: torch.Tensor, sizes: list[int], tp: int, r: int) -> torch.Tensor:
    return torch.cat([part.chunk(tp, dim=0)[r] for part in full.split(sizes, dim=0)], dim=0)


def load(m, ref_file: Path, naive: bool = False) -> None:
    """The reference weights into this rank's model; ``naive``: DeltaNet in_proj / conv1d split
    contiguously like any column-parallel weight (what the forward must reject)."""
    from megatron.core import parallel_state as ps
    from safetensors import safe_open

    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with safe_open(str(ref_file), "pt") as f, torch.no_grad():
        for name, t in m.named_parameters():
            full = f.get_tensor(C.reference_name(m, name))
            if not naive and (name.endswith("self_attention.in_proj.weight") or name.endswith("self_attention.conv1d.weight")):
                gdn = m.decoder.layers[int(name.split(".")[2])].self_attention
                local = list(gdn.in_proj_split_sections) if name.endswith("in_proj.weight") else [gdn.qk_dim_local_tp, gdn.qk_dim_local_tp, gdn.v_dim_local_tp]
                t.copy_(per_rank_parts(full, [s * tp for s in local], tp, r))
            else:
                t.copy_(C._slice(full, t, name, True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", default="qwen3_next")
    ap.add_argument("--pattern", default=None)
    a = ap.parse_args()
    import torch._dynamo
    from safetensors.torch import load_file
    from test_qwen3_next import PATTERN, build, next_spec

    from nemo_export_hooks import export_to_hf

    pattern = a.pattern or PATTERN
    C.init_parallel(tp=2)
    m = build(next_spec(), pattern)
    load(m, a.ref / "megatron.safetensors")
    spec = next_spec()
    tokens = C.tokens_for(spec.vocab_size)
    with torch._dynamo.config.patch(disable=True):
        logits = C.parallel_logits([m], tokens, SimpleNamespace(pp=1, vpp=None, sequence_parallel=False))
    ref_logits = load_file(str(a.ref / "logits.safetensors"))["logits"]
    naive = build(next_spec(), pattern)
    load(naive, a.ref / "megatron.safetensors", naive=True)
    with torch._dynamo.config.patch(disable=True):
        naive_logits = C.parallel_logits([naive], tokens, SimpleNamespace(pp=1, vpp=None, sequence_parallel=False))
    out = a.out / "tp2"
    export_to_hf(m, out, arch=a.arch, dtype=torch.float32)
    torch.distributed.barrier()
    if C.rank() != 0:
        return
    idx = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    diff = C.tensors_differing(a.ref / "hf", out)
    same_cfg = json.loads((out / "config.json").read_text()) == json.loads((a.ref / "hf" / "config.json").read_text())
    res = {"logit_diff": (logits - ref_logits).abs().max().item(), "naive_logit_diff": (naive_logits - ref_logits).abs().max().item(), "diff": diff, "same_config": same_cfg, "n": len(idx),
           "in_proj_local_rows": int(m.decoder.layers[0].self_attention.in_proj.weight.shape[0])}
    (a.out / "results.json").write_text(json.dumps(res))


if __name__ == "__main__":
    main()
