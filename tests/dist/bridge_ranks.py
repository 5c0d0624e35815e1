"""Two ranks (gloo) through the Megatron-Bridge loop stand-in with the Bridge callback:
``torchrun --nproc-per-node 2 tests/dist/bridge_ranks.py OUT sync|async``.

Data parallel 2 with the same data on both ranks, so the replicas stay bit-identical (the
stand-in has no gradient all-reduce); rank 0 saves the checkpoints, as Megatron's rank 0
writes the tracker.  Exercises the adapter's collectives: the tracker iteration broadcast,
the agreements on refusals and host copies, held copies on every rank, the background
writer's own group, and the all-ranks-finished poll.  Rank 0 writes ``OUT/result.json``;
the test compares every export with the reloaded checkpoint in its own process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from nemo_export_hooks.integrations.megatron_bridge import HFExportBridgeCallback
from nemo_export_hooks.testing.bridge_loop import BridgeRun, CheckpointConfig
from nemo_export_hooks.testing.cpu import TinySpec, build_gpt, init_single_process


def main() -> int:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    init_single_process()
    model = build_gpt(TinySpec(), seed=5)
    cb = HFExportBridgeCallback(arch="qwen3_moe", dtype="float32", on_busy="wait")
    BridgeRun(model, [cb], CheckpointConfig(str(out / "ckpt"), 2, mode == "async"), 6).run()
    if dist.get_rank() == 0:
        (out / "result.json").write_text(json.dumps({"exports": cb.exports, "failed": cb.failed, "world": dist.get_world_size()}))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
