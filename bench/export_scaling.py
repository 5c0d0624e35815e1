"""Weak scaling of the per-rank export over expert parallelism (CPU, gloo).

    .venv/bin/python bench/export_scaling.py [--eps 1,2,4] [--local-experts 8] [--repeat 3]

For each EP size the same *per-rank* model is exported: ``local-experts`` experts per MoE
layer on every rank (so ``EP x local-experts`` experts in all) plus the dense part, which is
replicated across the EP ranks and written by rank 0 only.  Each EP size is one ``torchrun``
launch with ``EP`` ranks.  Printed per EP size: the export's wall time (slowest rank; the
median of ``--repeat`` runs after one warm-up), the bytes each rank wrote (max and min
over ranks), the most bytes the exporter held at once on any rank (every allocation counted
by tests/dist/dist_common.AllocTracker in one extra run), and the ratios to EP=1.  Ideal weak
scaling keeps seconds and bytes per rank flat while the checkpoint grows with EP.

On a machine with fewer cores than ranks the ranks share cores, so the time ratio then
measures contention as much as the exporter; the core count is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "dist"))


def spec_for(args, ep: int):
    from nemo_export_hooks.testing.cpu import TinySpec

    return TinySpec(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=8,
        num_query_groups=4,
        kv_channels=args.hidden // 8,
        ffn_hidden_size=4 * args.hidden,
        vocab_size=args.vocab,
        num_experts=args.local_experts * ep,
        moe_ffn_hidden_size=args.moe_ffn,
        moe_router_topk=2,
    )


def time_phases() -> dict:
    """Accumulate seconds spent in the export's phases on this rank (wrapping module
    attributes the exporter looks up at call time): the HF key check (rank 0 builds the HF
    model on the meta device; the others wait for its verdict), planning as a whole, and
    rank 0's commit (shard renames + index, manifest hashing, publish)."""
    from nemo_export_hooks import publish
    from nemo_export_hooks.exporter import api, writer

    acc: dict = {}

    def wrap(mod, name, label):
        orig = getattr(mod, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                acc[label] = acc.get(label, 0.0) + time.perf_counter() - t0

        setattr(mod, name, timed)

    wrap(api, "prepare_export", "plan")
    wrap(api, "check_names", "hf_key_check")  # hf_names.check_names, as api calls it
    wrap(writer, "finalize_shards", "commit")
    wrap(publish, "write_manifest", "commit")
    wrap(publish, "publish", "commit")
    return acc


def worker(args) -> int:
    import torch
    import torch.distributed as dist

    from dist_common import AllocTracker, init_parallel, local_bytes, model_tensors
    from nemo_export_hooks import export_to_hf
    from nemo_export_hooks.exporter import parallel, writer
    from nemo_export_hooks.testing.cpu import build_gpt

    torch.set_num_threads(1)
    ep = args.ep
    init_parallel(ep=ep, timeout_s=600)
    rank = dist.get_rank()
    model = build_gpt(spec_for(args, ep), expert_model_parallel_size=ep)
    written = {"bytes": 0}
    orig_close = writer.ShardWriter.close

    def close(w):
        out = orig_close(w)
        written["bytes"] = w.total_bytes
        return out

    writer.ShardWriter.close = close
    phases = time_phases()
    out_root = Path(args.out_dir)

    def one(tag: str) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        export_to_hf(model, out_root / f"ep{ep}-{tag}", arch="qwen3_moe", dtype=args.dtype, max_shard_size=args.max_shard_size)
        dt = time.perf_counter() - t0
        slowest = torch.tensor([dt], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if rank == 0:  # keep the disk flat; not timed
            shutil.rmtree(out_root / f"ep{ep}-{tag}")
        return slowest.item()

    one("warmup")
    phases.clear()
    times = [one(f"run{i}") for i in range(args.repeat)]
    phase_s = {k: v / args.repeat for k, v in phases.items()}
    tracker = AllocTracker(exclude=model_tensors([model]))
    with tracker:
        one("tracked")
    mine = {"rank": rank, "written_bytes": written["bytes"], "peak_bytes": tracker.peak, "local_bytes": local_bytes([model]), "phases_s": phase_s}
    per_rank = parallel.gather_objects(mine)
    if rank == 0:
        total = sum(r["written_bytes"] for r in per_rank)
        result = {
            "ep": ep,
            "experts": args.local_experts * ep,
            "seconds": statistics.median(times),
            "all_seconds": times,
            "total_bytes": total,
            "per_rank": per_rank,
        }
        Path(args.json).write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def launch(args, ep: int, out_dir: Path) -> dict:
    js = out_dir / f"ep{ep}.json"
    cmd = [
        str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc-per-node={ep}", __file__, "--worker",
        "--ep", str(ep), "--json", str(js), "--out-dir", str(out_dir / "exports"),
        "--local-experts", str(args.local_experts), "--layers", str(args.layers), "--hidden", str(args.hidden),
        "--moe-ffn", str(args.moe_ffn), "--vocab", str(args.vocab), "--repeat", str(args.repeat),
        "--dtype", args.dtype, "--max-shard-size", args.max_shard_size,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log = out_dir / f"ep{ep}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = -9
    if rc != 0 or not js.exists():
        tail = log.read_text(errors="replace")[-4000:]
        raise SystemExit(f"EP={ep}: torchrun exited with {rc}\n{tail}")
    return json.loads(js.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eps", default="1,2,4")
    ap.add_argument("--local-experts", type=int, default=8, help="experts per rank per MoE layer")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--moe-ffn", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-shard-size", default="16MB")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per torchrun launch")
    ap.add_argument("--keep", type=Path, default=None, help="write exports and logs here (default: a temp dir)")
    # worker mode (inside torchrun)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    eps = [int(x) for x in args.eps.split(",")]
    tmp = None
    if args.keep is None:
        tmp = tempfile.TemporaryDirectory(prefix="export_scaling_")
        out_dir = Path(tmp.name)
    else:
        out_dir = args.keep
        out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for ep in eps:
        results.append(launch(args, ep, out_dir))
    base = next((r for r in results if r["ep"] == 1), results[0])
    base_bytes = max(r["written_bytes"] for r in base["per_rank"])
    base_peak = max(r["peak_bytes"] for r in base["per_rank"])

    print(f"weak scaling over EP: {args.local_experts} experts/rank/layer, {args.layers} layers, hidden {args.hidden}, "
          f"moe_ffn {args.moe_ffn}, {args.dtype}, max shard {args.max_shard_size}; {os.cpu_count()} CPU cores, gloo")
    hdr = f"{'EP':>3} {'ranks':>5} {'experts':>7} {'ckpt MB':>8} {'export s':>9} {'s/EP1':>6} " \
          f"{'MB/rank max':>11} {'MB/rank min':>11} {'bytes/EP1':>9} {'peak MB/rank':>12} {'peak/EP1':>8} " \
          f"{'plan s':>7} {'key chk s':>9} {'commit s':>8}"
    print(hdr)
    for r in results:
        wb = [x["written_bytes"] for x in r["per_rank"]]
        peak = max(x["peak_bytes"] for x in r["per_rank"])
        ph = r["per_rank"][0]["phases_s"]  # rank 0: the one that checks keys and commits
        print(f"{r['ep']:>3} {len(r['per_rank']):>5} {r['experts']:>7} {r['total_bytes'] / 1e6:>8.1f} {r['seconds']:>9.3f} "
              f"{r['seconds'] / base['seconds']:>6.2f} {max(wb) / 1e6:>11.2f} {min(wb) / 1e6:>11.2f} {max(wb) / base_bytes:>9.2f} "
              f"{peak / 1e6:>12.2f} {peak / base_peak:>8.2f} {ph.get('plan', 0):>7.3f} {ph.get('hf_key_check', 0):>9.3f} "
              f"{ph.get('commit', 0):>8.3f}")
    print("export s: slowest rank, median of runs; MB/rank: bytes each rank wrote; peak: most bytes the exporter "
          "held at once on any rank; plan/key chk/commit: rank 0's seconds in planning (incl. the HF key check), "
          "the HF key check, and the commit (index, manifest hashing, publish)")
    if args.keep is not None:
        (out_dir / "summary.json").write_text(json.dumps(results, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
