"""torchrun program: export the reference models under several parallel layouts and check
each export against the world-size-1 reference.

    torchrun --nproc-per-node N tests/dist/run_layouts.py --ref REF --out OUT --layouts a,b,c [--failures]

For every layout (re-initialising Megatron's parallel state in between):
1. build this rank's chunks and load the world-size-1 weights, sliced as Megatron lays them out;
2. forward the parallel model (TP/EP collectives, PP by send/recv) and gather the logits;
3. ``export_to_hf`` (float32) while an :class:`AllocTracker` counts what is allocated;
4. rank 0: same keys and the same tensors bit for bit as the world-size-1 export, same
   config.json; the export loads in transformers and its logits match the parallel Megatron
   forward (and that forward matches the world-size-1 Megatron forward).

Rank 0 writes ``OUT/results/<layout>.json``; an exception inside a layout is recorded and
the next layout still runs (which also proves the ranks' collectives stayed aligned).
``--failures`` adds the error-propagation cases (one rank fails, every rank must raise).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_common as C  # noqa: E402


def parse_size(s):
    from nemo_export_hooks.exporter.writer import parse_size as p

    return p(s)


class WriterStats:
    """Record the bytes each ShardWriter of this rank wrote (instrumentation only)."""

    def __init__(self):
        from nemo_export_hooks.exporter import writer

        self.cls = writer.ShardWriter
        self.orig_close = self.cls.close
        self.bytes = 0
        self.files = 0
        stats = self

        def close(w):
            out = stats.orig_close(w)
            stats.bytes = w.total_bytes
            stats.files = len(w.files)
            return out

        self.cls.close = close

    def restore(self):
        self.cls.close = self.orig_close


def convert_experts(chunks, kind: str) -> None:
    from nemo_export_hooks.testing.layouts import to_legacy_grouped, to_te_grouped

    if kind == "sequential":
        return
    fn = {"te_grouped": to_te_grouped, "legacy_grouped": to_legacy_grouped}[kind]
    for c in chunks:
        fn(c)


def compare_with_reference(out: Path, ref: Path) -> list[str]:
    """Keys, dtypes and values bit for bit, and config.json, vs the world-size-1 export."""
    from safetensors import safe_open

    problems = []
    idx = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    ref_idx = json.loads((ref / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    if set(idx) != set(ref_idx):
        problems.append(f"keys differ: missing {sorted(set(ref_idx) - set(idx))[:5]}, extra {sorted(set(idx) - set(ref_idx))[:5]}")
    for key in sorted(set(idx) & set(ref_idx)):
        with safe_open(str(out / idx[key]), "pt") as f:
            got = f.get_tensor(key)
        with safe_open(str(ref / "hf" / ref_idx[key]), "pt") as f:
            want = f.get_tensor(key)
        if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
            problems.append(f"{key}: differs from the world-size-1 export ({got.dtype} {tuple(got.shape)} vs {want.dtype} {tuple(want.shape)})")
    # shard files: the names transformers writes, every one used, no rank's part left over
    files = sorted(set(idx.values()))
    n = len(files)
    if files != [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]:
        problems.append(f"shard names {files[:3]}... are not model-0000k-of-{n:05d}.safetensors")
    on_disk = sorted(p.name for p in out.glob("*.safetensors"))
    if on_disk != files:
        problems.append(f"safetensors files on disk {on_disk} differ from the index's {files}")
    cfg = json.loads((out / "config.json").read_text())
    ref_cfg = json.loads((ref / "hf" / "config.json").read_text())
    if cfg != ref_cfg:
        diff = {k: (cfg.get(k), ref_cfg.get(k)) for k in set(cfg) | set(ref_cfg) if cfg.get(k) != ref_cfg.get(k)}
        problems.append(f"config.json differs: {diff}")
    return problems


def largest_tensor_bytes(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return max(torch.Size(f.get_slice(k).get_shape()).numel() * 4 for k in f.keys())


def naive_full_gather(chunks, res: dict) -> None:
    """Negative control for the memory bound: what a rank that gathered the whole model
    would hold (every rank all-gathers every local tensor) must exceed the bound."""
    import torch.distributed as dist

    from nemo_export_hooks.exporter import parallel

    tracker = C.AllocTracker(exclude=C.model_tensors(chunks))
    held = []
    with tracker:
        for t in C.model_tensors(chunks):
            if t.is_floating_point():
                parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, t.detach().contiguous())
                held.append(parts)
    mine = {"rank": dist.get_rank(), "naive_peak_bytes": tracker.peak}
    res["naive"] = parallel.gather_objects(mine)
    del held


def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32, output_loading_info=True, attn_implementation="eager")
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise AssertionError(f"transformers loading info: {bad}")
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def run_layout(layout: C.Layout, ref_root: Path, out_root: Path, extra_checks=None) -> dict:
    import torch.distributed as dist
    from safetensors.torch import load_file

    from nemo_export_hooks import export_to_hf
    from nemo_export_hooks.exporter import parallel

    arch, spec = C.SPECS[layout.model]
    ref = ref_root / layout.model
    out = out_root / layout.name
    rank = dist.get_rank()
    res: dict = {"layout": layout.to_json(), "world_size": dist.get_world_size(), "problems": [], "checks": {}}
    t0 = time.perf_counter()
    C.init_parallel(tp=layout.tp, ep=layout.ep, pp=layout.pp, vpp=layout.vpp, etp=layout.etp)
    chunks = C.build_chunks(layout.model, layout)
    C.load_reference(chunks, ref / "megatron.safetensors")
    convert_experts(chunks, layout.experts)
    res["timings"] = {"build": time.perf_counter() - t0}
    res["layers_per_rank"] = [[int(l.layer_number) - 1 for l in c.decoder.layers] for c in chunks]
    data = load_file(str(ref / "logits.safetensors"))
    tokens, ref_logits = data["tokens"], data["logits"]
    try:
        meg = C.parallel_logits(chunks, tokens, layout)
        fwd_err = None
    except Exception as e:  # a parallel forward that cannot run on CPU falls back to tensor equality
        meg, fwd_err = None, f"{type(e).__name__}: {e}"
        traceback.print_exc()
    fwd_errs = parallel.gather_objects(fwd_err)
    res["timings"]["forward"] = time.perf_counter() - t0 - res["timings"]["build"]

    stats = WriterStats()
    tracker = C.AllocTracker(exclude=C.model_tensors(chunks))
    t1 = time.perf_counter()
    try:
        with tracker:
            result = export_to_hf(chunks, out, arch=arch, dtype=torch.float32, max_shard_size=layout.max_shard_size)
    finally:
        stats.restore()
    export_s = time.perf_counter() - t1
    mine = {
        "rank": rank,
        "peak_bytes": tracker.peak,
        "allocated_bytes": tracker.total,
        "local_bytes": C.local_bytes(chunks),
        "written_bytes": stats.bytes,
        "part_files": stats.files,
        "export_s": export_s,
        "layers": res["layers_per_rank"],
    }
    per_rank = parallel.gather_objects(mine)
    if extra_checks is not None:
        extra_checks(chunks, res)
    if rank == 0:
        for n, r in zip(res.get("naive") or [], per_rank):
            if n["naive_peak_bytes"] <= r["local_bytes"] + parse_size(layout.max_shard_size):
                res["problems"].append(f"negative control: a full gather on rank {r['rank']} ({n['naive_peak_bytes']} B) would pass the memory bound")
        res["per_rank"] = per_rank
        res["num_tensors"] = result.num_tensors
        full_bytes = (ref / "megatron.safetensors").stat().st_size
        res["full_model_bytes"] = full_bytes
        shard = parse_size(layout.max_shard_size)
        res["max_shard_bytes"] = shard
        largest = largest_tensor_bytes(ref / "megatron.safetensors")
        res["largest_tensor_bytes"] = largest
        # memory: what the exporter allocated never exceeds this rank's shard + one shard
        # buffer (the bound; the full model does not fit in it, so a rank that
        # received the whole model fails), nor one shard buffer + two full tensors (gather
        # buffer and its converted copy: a bound that does not grow with the model)
        for r in per_rank:
            bound = r["local_bytes"] + shard
            if r["peak_bytes"] > bound:
                res["problems"].append(f"rank {r['rank']}: exporter peak {r['peak_bytes']} B > own shard {r['local_bytes']} + max shard {shard}")
            if full_bytes <= bound:
                res["problems"].append(f"rank {r['rank']}: bound {bound} B does not exclude the full model ({full_bytes} B): test too weak")
            if r["peak_bytes"] > shard + 2 * largest:
                res["problems"].append(f"rank {r['rank']}: exporter peak {r['peak_bytes']} B > max shard {shard} + 2 x largest tensor {largest}")
        res["problems"] += compare_with_reference(out, ref)
        res["checks"]["tensors_bitwise_vs_ws1_export"] = True
        # the manifest's sha256 of other ranks' shards came from those ranks (hashed while
        # writing): it must match the bytes on disk
        from nemo_export_hooks.publish import verify_export

        res["problems"] += [f"verify: {p}" for p in verify_export(out)]
        res["checks"]["manifest_verifies"] = True
        # logits
        got = hf_logits(out, tokens)
        d_ref = (got - ref_logits).abs().max().item()
        res["checks"]["hf_vs_ws1_megatron_max_abs"] = d_ref
        if d_ref > C.ATOL:
            res["problems"].append(f"HF logits vs world-size-1 Megatron: max abs diff {d_ref}")
        fwd_errs = [e for e in fwd_errs if e]
        if fwd_errs:
            res["checks"]["parallel_forward"] = f"not run: {fwd_errs[0]}"
        else:
            d_par = (got - meg).abs().max().item()
            d_meg = (meg - ref_logits).abs().max().item()
            res["checks"]["parallel_forward"] = "ran"
            res["checks"]["hf_vs_parallel_megatron_max_abs"] = d_par
            res["checks"]["parallel_vs_ws1_megatron_max_abs"] = d_meg
            if d_par > C.ATOL:
                res["problems"].append(f"HF logits vs parallel Megatron forward: max abs diff {d_par}")
            if d_meg > C.ATOL:
                res["problems"].append(f"parallel Megatron forward vs world-size-1 forward: max abs diff {d_meg}")
    res["seconds"] = time.perf_counter() - t0
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layouts", default="")
    ap.add_argument("--failures", action="store_true")
    args = ap.parse_args()

    import torch.distributed as dist

    torch.set_num_threads(1)
    C.init_parallel()
    rank = dist.get_rank()
    names = [n for n in args.layouts.split(",") if n]
    for name in names:
        layout = C.LAYOUTS[name]
        try:
            res = run_layout(layout, args.ref, args.out, extra_checks=naive_full_gather if name == "tp2" else None)
        except Exception as e:
            traceback.print_exc()
            res = {"layout": layout.to_json(), "problems": [f"rank {rank}: {type(e).__name__}: {e}"], "crashed": True}
            # write from every rank that crashed (rank 0 may not be among them)
            C.write_json(args.out / "results" / f"{name}.rank{rank}.json", res)
            continue
        if rank == 0:
            C.write_json(args.out / "results" / f"{name}.json", res)
            print(f"[layout {name}] {'OK' if not res['problems'] else 'FAIL'} {json.dumps(res['checks'])} "
                  f"{res['seconds']:.1f}s", flush=True)
    if args.failures:
        import failures

        res = failures.run_all(args.ref, args.out)
        if rank == 0:
            C.write_json(args.out / "results" / "failures.json", res)
    dist.barrier()
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
