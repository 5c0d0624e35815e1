"""Two ranks (gloo) through the Megatron-Bridge loop stand-in with the Bridge callback:
``torchrun --nproc-per-node 2 tests/dist/bridge_ranks.py OUT sync|async``.

Data parallel 2 with the same data on both ranks, so the replicas stay bit-identical (the
stand-in has no gradient all-reduce); rank 0 saves the checkpoints, as Megatron's rank 0
writes the tracker.  Exercises the adapter's collectives: the tracker iteration broadcast,
the agreements on refusals and host copies, held copies on every rank, the background
writer's own group, and the all-ranks-finished poll.  Then a second run resumes from
iteration 2, whose export ``keep_last_k=2`` deleted: every rank takes the run's identity
from the state rank 0 reads in ``iter_0000002`` (broadcast), and the exports of 4 and 6 are
replaced.  Rank 0 writes ``OUT/result.json``; the test compares every export with the
reloaded checkpoint in its own process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from nemo_export_hooks.integrations.megatron_bridge import HFExportBridgeCallback
from nemo_export_hooks.testing.bridge_loop import BridgeRun, CheckpointConfig, load_saved_weights
from nemo_export_hooks.testing.cpu import TinySpec, build_gpt, init_single_process


def main() -> int:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    init_single_process()
    model = build_gpt(TinySpec(), seed=5)
    cb = HFExportBridgeCallback(arch="qwen3_moe", dtype="float32", on_busy="wait", keep_last_k=2)
    BridgeRun(model, [cb], CheckpointConfig(str(out / "ckpt"), 2, mode == "async"), 6).run()
    dist.barrier()
    resumed_model = build_gpt(TinySpec(), seed=77)
    load_saved_weights(resumed_model, out / "ckpt", 2)
    cb2 = HFExportBridgeCallback(arch="qwen3_moe", dtype="float32", on_busy="wait", keep_last_k=2)
    BridgeRun(resumed_model, [cb2], CheckpointConfig(str(out / "ckpt"), 2, mode == "async", load=str(out / "ckpt")), 6, start_step=2, seed=1).run()
    ids = [None] * dist.get_world_size()
    dist.all_gather_object(ids, cb2.scheduler.run_id)
    if dist.get_rank() == 0:
        resumed = {"exports": cb2.exports, "failed": cb2.failed, "run_ids": ids, "first_run_id": cb.scheduler.run_id}
        (out / "result.json").write_text(json.dumps({"exports": cb.exports, "failed": cb.failed, "world": dist.get_world_size(), "resumed": resumed}))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
