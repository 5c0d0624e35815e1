"""Export throughput and memory on CPU, single process, against the physical limit.

    .venv/bin/python bench/throughput.py [--layers 1,2,4,10] [--repeat 2] [--main-repeat 3]

A real Megatron-Core Qwen3-MoE-shaped model (hidden 1024, 64 experts per layer, bf16
parameters; 10 layers = 2.2 GB) is exported with ``export_to_hf`` (bf16, default 5 GB
shards, HF key check included) into ``--out`` and compared, in the same run and on the same
filesystem, interleaved and repeated (medians), with:

* ``dd``: the same number of bytes written sequentially (64 MiB writes from one buffer) and
  fsync'd: the physical limit;
* ``save_file``: ``safetensors.torch.save_file`` of the already-mapped HF state dict (one
  file), fsync'd;
* ``save_pretrained``: transformers' ``save_pretrained`` of the same HF model (loaded from the
  export; 5 GB shards), fsync'd.

Memory (the largest model only): the peak RSS an export adds over the RSS with the model
resident (kernel high-water mark), for a synchronous export (``export_to_hf``) and for the
async path (host snapshot, then write), as a fraction of the model bytes this rank holds and
of the largest shard written.  Smaller models give the GB/s-against-size curve.
Results go to ``--json``; a table is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    PeakRSS,
    build_model,
    dd_write,
    drop_dirty,
    fsync_tree,
    load_average,
    median,
    median_phases,
    model_bytes,
    profile_line,
    quiet_env,
    rmtree,
    trim_heap,
    write_json,
)

ARCH = "qwen3_moe"


def export_once(model, out: Path, phases: dict) -> dict:
    from nemo_export_hooks import export_to_hf

    rmtree(out)
    drop_dirty()
    phases.clear()
    t0 = time.perf_counter()
    res = export_to_hf(model, out, arch=ARCH, dtype="bfloat16")
    dt = time.perf_counter() - t0
    shards = sorted(out.glob("*.safetensors"))
    info = {
        "seconds": dt,
        "bytes": res.total_bytes,
        "file_bytes": sum(p.stat().st_size for p in shards),
        "shards": len(shards),
        "largest_shard": max(p.stat().st_size for p in shards),
        "phases": dict(phases),
        "profile": dict(res.phases),  # the exporter's own per-phase seconds (ExportResult.phases)
        "profile_seconds": res.seconds,
    }
    return info


def warm_up(tmp: Path) -> None:
    """Imports and first-call costs a long-running trainer has paid long before its first
    export (transformers' model classes for the HF key check, Megatron's code paths)."""
    from nemo_export_hooks import export_to_hf
    from nemo_export_hooks.testing.cpu import TinySpec, build_gpt

    export_to_hf(build_gpt(TinySpec()), tmp / "warmup", arch=ARCH, dtype="bfloat16")
    rmtree(tmp / "warmup")


def memory_run(model, out: Path) -> dict:
    from nemo_export_hooks import export_to_hf
    from nemo_export_hooks.exporter.api import prepare_export, write_prepared

    rmtree(out / "mem-sync")
    drop_dirty()
    t0 = time.perf_counter()
    with PeakRSS() as sync:
        export_to_hf(model, out / "mem-sync", arch=ARCH, dtype="bfloat16")
    first_s = time.perf_counter() - t0
    largest = max(p.stat().st_size for p in (out / "mem-sync").glob("*.safetensors"))
    rmtree(out / "mem-async")
    with PeakRSS() as asyn:
        t0 = time.perf_counter()  # as the callback does: plan + snapshot count in the export's seconds
        prepared = prepare_export(model, ARCH, "bfloat16", check_hf_keys=False)
        plan_s = time.perf_counter() - t0
        snapshot = prepared.host_snapshot()
        res = write_prepared(prepared, snapshot, out / "mem-async", t0=t0)
        del snapshot
    rmtree(out / "mem-async")
    return {
        "model_bytes": model_bytes(model),
        "largest_shard": largest,
        "max_shard_size": 5 * 10**9,
        "first_export_s": first_s,
        "sync_added": sync.added,
        "sync_base": sync.base,
        "async_added": asyn.added,
        "async_profile": {"plan_s": round(plan_s, 4), **res.phases},
        "async_seconds": res.seconds,
    }


def baselines(model, export_dir: Path, out: Path, repeat: int, nbytes: int) -> dict:
    """save_file of the mapped state dict and save_pretrained of the HF model, each fsync'd."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from nemo_export_hooks.exporter.api import prepare_export

    sd = dict(prepare_export(model, ARCH, "bfloat16", check_hf_keys=False).host_snapshot())
    hf = AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=torch.bfloat16)
    sf_s, sp_s = [], []
    for _ in range(repeat):
        f = out / "save_file"
        rmtree(f)
        f.mkdir(parents=True)
        drop_dirty()
        t0 = time.perf_counter()
        save_file(sd, str(f / "model.safetensors"), metadata={"format": "pt"})
        fsync_tree(f)
        sf_s.append(time.perf_counter() - t0)
        rmtree(f)
        d = out / "save_pretrained"
        rmtree(d)
        drop_dirty()
        t0 = time.perf_counter()
        hf.save_pretrained(str(d), max_shard_size="5GB", safe_serialization=True)
        fsync_tree(d)
        sp_s.append(time.perf_counter() - t0)
        sp_bytes = sum(p.stat().st_size for p in d.glob("*.safetensors"))
        rmtree(d)
        drop_dirty()
    del sd, hf
    trim_heap()
    return {"save_file_s": sf_s, "save_pretrained_s": sp_s, "save_pretrained_bytes": sp_bytes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="1,2,4,10", help="model sizes (decoder layers); the last is the main one")
    ap.add_argument("--repeat", type=int, default=3, help="export/dd pairs per smaller size")
    ap.add_argument("--main-repeat", type=int, default=5, help="export/dd pairs at the main size")
    ap.add_argument("--baseline-repeat", type=int, default=2, help="save_file/save_pretrained runs at the main size")
    ap.add_argument("--out", type=Path, default=Path("bench_out/throughput"), help="scratch directory (same filesystem as the exports)")
    ap.add_argument("--json", type=Path, default=Path("bench_out/throughput.json"))
    args = ap.parse_args(argv)
    quiet_env()

    import torch

    from export_scaling import time_phases
    from nemo_export_hooks.testing.cpu import init_single_process

    init_single_process()
    out = args.out.resolve()
    rmtree(out)
    out.mkdir(parents=True)
    layers = [int(x) for x in args.layers.split(",")]
    main_layers = layers[-1]
    load0 = load_average()
    warm_up(out)
    phases = time_phases()

    result = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_start": load0, "sizes": []}
    for L in sorted(layers, reverse=True):  # the big one first: memory is measured on a fresh heap
        t0 = time.perf_counter()
        model = build_model(L)
        build_s = time.perf_counter() - t0
        row = {"layers": L, "model_bytes": model_bytes(model), "build_s": build_s}
        if L == main_layers:
            row["memory"] = memory_run(model, out)
        exports, dds = [], []
        reps = args.main_repeat if L == main_layers else args.repeat
        for r in range(reps):
            e = export_once(model, out / "export", phases)
            exports.append(e)
            if L == main_layers and r == 0:
                row["baselines"] = baselines(model, out / "export", out, args.baseline_repeat, e["bytes"])
            dds.append(dd_write(out / "dd.bin", e["bytes"]))
        rmtree(out / "export")
        rmtree(out / "mem-sync")
        row["export_s"] = [e["seconds"] for e in exports]
        row["dd_s"] = dds
        row["bytes"] = exports[0]["bytes"]
        row["file_bytes"] = exports[0]["file_bytes"]
        row["shards"] = exports[0]["shards"]
        row["phases_s"] = {k: median([e["phases"].get(k, 0.0) for e in exports]) for k in exports[0]["phases"]}
        row["profile"] = median_phases([e["profile"] for e in exports])
        row["profile_seconds"] = median([e["profile_seconds"] for e in exports])
        result["sizes"].append(row)
        del model
        trim_heap()
        gb = row["bytes"] / 1e9
        ex, dd = median(row["export_s"]), median(dds)
        print(f"[throughput] {L} layers: {gb:.2f} GB  export {gb / ex:.2f} GB/s  dd {gb / dd:.2f} GB/s  ratio {dd / ex:.2f}", flush=True)
    result["load_end"] = load_average()
    result["sizes"].sort(key=lambda r: r["bytes"])
    write_json(args.json, result)
    print_table(result)
    rmtree(out)
    return 0


def print_table(result: dict) -> None:
    print(f"\nexport throughput, 1 process, bf16, {result['threads']} torch threads, {result['cpus']} CPUs, "
          f"load {result['load_start']:.2f} -> {result['load_end']:.2f}")
    print(f"{'GB':>6} {'export GB/s':>11} {'dd GB/s':>8} {'export/dd':>9} {'plan s':>7} {'commit s':>8}")
    for r in result["sizes"]:
        gb = r["bytes"] / 1e9
        ex, dd = median(r["export_s"]), median(r["dd_s"])
        print(f"{gb:>6.2f} {gb / ex:>11.2f} {gb / dd:>8.2f} {dd / ex:>9.2f} {r['phases_s'].get('plan', 0):>7.2f} {r['phases_s'].get('commit', 0):>8.2f}")
    main = result["sizes"][-1]
    b = main.get("baselines")
    if b:
        gb = main["bytes"] / 1e9
        print(f"save_file {gb / median(b['save_file_s']):.2f} GB/s, save_pretrained {gb / median(b['save_pretrained_s']):.2f} GB/s")
    print(f"where the time goes, sync export_to_hf of {main['bytes'] / 1e9:.2f} GB (median of {len(main['export_s'])}): "
          f"{profile_line(main['profile'], main['profile_seconds'])}")
    m = main.get("memory")
    if m and m.get("async_profile"):
        print(f"where the time goes, async (plan + host snapshot on the training thread, then the write): "
              f"{profile_line(m['async_profile'], m['async_seconds'])}")
    if m:
        print(f"memory: sync export adds {m['sync_added'] / 1e6:.0f} MB ({m['sync_added'] / m['model_bytes']:.3f} x model bytes), "
              f"async (snapshot + write) {m['async_added'] / 1e6:.0f} MB ({m['async_added'] / m['model_bytes']:.3f} x)")


if __name__ == "__main__":
    sys.exit(main())
