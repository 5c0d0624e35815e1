"""torchrun program: export the gpt-oss test model under expert parallelism (EP=2: each rank
holds half of every layer's experts, which HF stores in one tensor per layer) and tensor
parallelism (TP=2: attention sinks split by head), and check on rank 0 that every tensor and
config.json equal the world-size-1 export bit for bit.

Also checks from the plan that each layer's stacked expert tensors have exactly one owner
(EP rank 0) and that its gathered buffer holds that one layer's experts.

Usage (tests/test_gpt_oss.py): torchrun --nproc-per-node=2 run_gpt_oss.py --ref DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "dist")]
import dist_common as C  # noqa: E402

LAYOUTS = {"ep2": dict(ep=2), "tp2": dict(tp=2, etp=1)}  # stacked experts refuse ETP > 1


def load(m, ref_file: Path) -> None:
    from megatron.core import parallel_state as ps
    from safetensors import safe_open

    with safe_open(str(ref_file), "pt") as f, torch.no_grad():
        for name, t in m.named_parameters():
            full = f.get_tensor(C.reference_name(m, name))
            if name.endswith("softmax_offset") and full.shape != t.shape:  # one value per head, not marked TP
                full = full.chunk(ps.get_tensor_model_parallel_world_size())[ps.get_tensor_model_parallel_rank()]
            t.copy_(C._slice(full, t, name, True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    from test_gpt_oss import oss_spec

    from nemo_export_hooks import export_to_hf
    from nemo_export_hooks.exporter.api import prepare_export
    from nemo_export_hooks.testing.cpu import build_gpt

    results = {}
    for name, kw in LAYOUTS.items():
        C.init_parallel(**kw)
        m = build_gpt(oss_spec())
        load(m, a.ref / "megatron.safetensors")
        prep = prepare_export(m, arch="gpt_oss", dtype=torch.float32)
        stacks = [(j.source, j.owner, tuple(j.local_tensor().shape)) for j in prep.plan.jobs if j.parts is not None]
        out = a.out / name
        export_to_hf(m, out, arch="gpt_oss", dtype=torch.float32)
        torch.distributed.barrier()
        if C.rank() != 0:
            continue
        idx = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        diff = C.tensors_differing(a.ref / "hf", out)
        same_cfg = json.loads((out / "config.json").read_text()) == json.loads((a.ref / "hf" / "config.json").read_text())
        results[name] = {"diff": diff, "same_config": same_cfg, "n": len(idx), "rank0_stacks": stacks}
    if C.rank() == 0:
        (a.out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
