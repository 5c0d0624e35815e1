"""GPU export bench (issue 17): every figure against a limit measured in the same run.

    PYTHONPATH=/root/site:$PWD python3 bench/gpu_export.py      # on one H200; table -> $OUT

A Qwen3-30B-A3B-shaped model (hidden 2048, 32 heads, 4 KV groups, head_dim 128, 128 experts
of 768, vocab 151936, 12 layers, ~16 GB bf16) with real Transformer Engine ``TEGroupedMLP``
experts (``tests/gpu/gpu_common.py``'s builder), one process, one GPU, one disk.  Measured:

* limit 1: pinned device->host copy of the rank's bytes (one page-locked buffer, one
  non-blocking ``copy_`` per parameter);
* limit 2: write + fsync of 8 GiB by 1, 2, 4, 8 parallel writers (one file each); the best
  is the disk's durable rate;
* ours, async: the training thread's wait (``prepare_export`` + ``host_snapshot``, the pool
  reserved at setup) / limit 1 (target <= 2), host memory peak / the rank's share (target
  <= 1.1), then the background write;
* ours, sync ``export_to_hf``, twice (first and second of the process): rate / limit 2
  (target >= 0.9);
* ModelOpt 0.47 ``export_mcore_gpt_to_hf`` on the same weights (a SequentialMLP copy of the
  model: ModelOpt's exporter walks ``local_experts``), plus an fsync of its files; ours must
  be no slower;  names and sampled tensors are compared;
* NVFP4 and FP8 (ModelOpt ``mtq.quantize``, 4 layers): our export vs ModelOpt's, + fsync.

ModelOpt 0.47 imports ``megatron.core.models.hybrid.hybrid_model`` (and may import other
newer module paths) inside an import guard; on megatron-core 0.16.1 the guard fails and its
exporter then has no ``GPTModel``.  Missing ``megatron.core`` modules are therefore given
empty stand-in modules before ModelOpt is imported (listed in the output as "import
patches"); no ModelOpt code is changed.

Parts run in order, each guarded (an error is reported in its row, the rest still run) and
skipped once 7 minutes have passed; files are deleted after each part (the device has a
64 GB disk).  Writes ``$OUT/gpu_export.md`` and ``$OUT/gpu_export.json``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import re
import shutil
import sys
import threading
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
sys.path.insert(0, str(ROOT / "bench"))

from common import profile_line  # noqa: E402  (stdlib only at import)

T_START = time.perf_counter()
DEADLINE_S = 420
OUT = Path(os.environ.get("OUT", "/tmp/gpu_export_out"))
WORK = Path(os.environ.get("BENCH_DIR", "/tmp/gpu_export_work"))
# BENCH_PARTS=limits,ours_async,ours_sync,modelopt,NVFP4,FP8 (comma list; default all): rerun a part alone
PARTS = {p.strip() for p in os.environ.get("BENCH_PARTS", "").split(",") if p.strip()}


def wanted(name: str) -> bool:
    return not PARTS or name in PARTS
RESULTS: dict = {"parts": {}, "errors": {}, "skipped": []}
STUBBED: list[str] = []


# -- ModelOpt import patch ------------------------------------------------------------------
class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty modules for ``megatron.core`` paths that this megatron-core does not have; any
    name imported from them is a fresh placeholder class (never an instance of anything)."""

    def find_spec(self, name, path, target=None):
        if not name.startswith("megatron.core.") or name in sys.modules:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            try:
                if finder.find_spec(name, path, target) is not None:
                    return None
            except Exception:
                continue
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        mod = types.ModuleType(spec.name)
        mod.__path__ = []

        def __getattr__(attr, _n=spec.name):
            if attr.startswith("__"):
                raise AttributeError(attr)
            cls = type(attr, (), {"__module__": _n})
            setattr(mod, attr, cls)
            return cls

        mod.__getattr__ = __getattr__
        STUBBED.append(spec.name)
        return mod

    def exec_module(self, module):
        pass


def import_modelopt_export():
    finder = _StubFinder()
    sys.meta_path.append(finder)
    try:
        from modelopt.torch.export import unified_export_megatron as ue
    finally:
        sys.meta_path.remove(finder)  # only ModelOpt's own imports see the stand-ins

    if not getattr(ue, "has_mcore", True):
        raise RuntimeError(f"ModelOpt's megatron plugin did not import (stubbed: {STUBBED})")
    return ue.export_mcore_gpt_to_hf


# -- helpers --------------------------------------------------------------------------------
def now() -> float:
    return time.perf_counter() - T_START


def part(name):
    def deco(fn):
        def run(*a, **kw):
            if now() > DEADLINE_S:
                RESULTS["skipped"].append(name)
                print(f"[gpu_export] {name}: skipped (time)", flush=True)
                return None
            t0 = time.perf_counter()
            try:
                r = fn(*a, **kw)
                RESULTS["parts"][name] = r
                print(f"[gpu_export] {name}: {json.dumps(r, default=str)} ({time.perf_counter() - t0:.1f} s)", flush=True)
                return r
            except Exception as e:  # reported, the other parts still run
                import traceback

                RESULTS["errors"][name] = f"{type(e).__name__}: {str(e)[:400]}"
                print(f"[gpu_export] {name}: FAILED {type(e).__name__}: {e}", flush=True)
                traceback.print_exc()
                return None
            finally:
                shutil.rmtree(WORK, ignore_errors=True)
                WORK.mkdir(parents=True, exist_ok=True)
                write_report()  # after every part: a run cut short still leaves its table
        return run
    return deco


def fsync_tree(d: Path) -> None:
    for p in sorted(d.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    fd = os.open(d, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    def __enter__(self):
        self.base = self.peak = rss()
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss())
        self.added = self.peak - self.base


def build(spec, grouped: bool, torch):
    """gpu_common.build_te_gpt, with the expert layout chosen: TEGroupedMLP or SequentialMLP
    (of TE linears, what ModelOpt's Megatron exporter walks)."""
    import gpu_common as G

    if grouped:
        return G.build_te_gpt(spec, torch.bfloat16, randomise_norms=False)
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    from nemo_export_hooks.testing.cpu import transformer_config

    cfg = transformer_config(
        spec, tensor_model_parallel_size=1, expert_model_parallel_size=1, expert_tensor_parallel_size=1,
        sequence_parallel=False, use_cpu_initialization=False, params_dtype=torch.bfloat16, bf16=True,
        gradient_accumulation_fusion=False, moe_grouped_gemm=False, moe_token_dispatcher_type="alltoall",
        moe_permute_fusion=False,
    )
    assert ps.get_tensor_model_parallel_world_size() == 1
    layer_spec = get_gpt_layer_with_transformer_engine_spec(num_experts=spec.num_experts, moe_grouped_gemm=False,
                                                            qk_layernorm=spec.qk_layernorm)
    return GPTModel(config=cfg, transformer_layer_spec=layer_spec, vocab_size=spec.vocab_size,
                    max_sequence_length=spec.max_seq_len, share_embeddings_and_output_weights=spec.tie_embeddings,
                    position_embedding_type="rope", rotary_base=spec.rotary_base).cuda()


_GROUPED = re.compile(r"^(.*\.mlp\.experts)\.(linear_fc[12])\.weight(\d+)$")


def copy_to_sequential(src, dst, torch) -> None:
    dp = dict(dst.named_parameters())
    seen = set()
    with torch.no_grad():
        for n, p in src.named_parameters():
            m = _GROUPED.match(n)
            target = f"{m.group(1)}.local_experts.{m.group(3)}.{m.group(2)}.weight" if m else n
            if target not in dp:
                raise KeyError(f"{n} -> {target}: not in the SequentialMLP model")
            dp[target].copy_(p)
            seen.add(target)
    missing = sorted(set(dp) - seen)
    if missing:
        raise KeyError(f"SequentialMLP parameters not copied: {missing[:5]}")


def spec_of(layers: int):
    import gpu_common as G

    return G.tiny_spec(
        "qwen3_moe", num_layers=layers, hidden_size=2048, num_attention_heads=32, num_query_groups=4, kv_channels=128,
        ffn_hidden_size=6144, vocab_size=151936, max_seq_len=4096, num_experts=128, moe_ffn_hidden_size=768,
        moe_router_topk=8,
    )


# -- parts ----------------------------------------------------------------------------------
@part("limit_pinned_d2h")
def limit_pinned_d2h(model, torch):
    from nemo_export_hooks.exporter import snapshot

    params = [p.detach() for p in model.parameters()]
    total = sum(snapshot._aligned(p.numel() * p.element_size()) for p in params)
    pool = snapshot._Pool(total, pin=True)
    views, off = [], 0
    for p in params:
        n = p.numel() * p.element_size()
        views.append(pool.buf.narrow(0, off, n).view(p.dtype).view(p.shape))
        off += snapshot._aligned(n)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for v, p in zip(views, params):
            v.copy_(p, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    pinned = pool.pinned
    del views
    pool.free()
    nbytes = sum(p.numel() * p.element_size() for p in params)
    return {"bytes": nbytes, "seconds": min(times), "gb_per_s": nbytes / 1e9 / min(times), "pinned": pinned, "runs": times}


def disk_rate(n: int, total: int, d: Path) -> dict:
    """write + fsync of ``total`` bytes by ``n`` parallel writers, one file each, under ``d``."""
    buf = memoryview(bytearray(os.urandom(1 << 20) * 64))  # 64 MiB of incompressible bytes
    d.mkdir(parents=True)
    per = total // n
    total = per * n

    def one(i):
        fd = os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644)
        left = per
        while left > 0:
            left -= os.write(fd, buf[: min(len(buf), left)])
        os.fsync(fd)
        os.close(fd)

    os.sync()
    t0 = time.perf_counter()
    ths = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    [t.start() for t in ths]
    [t.join() for t in ths]
    dt = time.perf_counter() - t0
    written = sum(p.stat().st_size for p in d.iterdir())
    shutil.rmtree(d)
    if written != total:  # a writer thread failed (its traceback is above)
        raise RuntimeError(f"{n} writers wrote {written} of {total} bytes")
    return {"seconds": dt, "gb_per_s": total / 1e9 / dt, "bytes": total}


@part("limit_disk")
def limit_disk(total: int = 8 << 30):
    out = {n: disk_rate(n, total, WORK / f"dd{n}") for n in (1, 2, 4, 8)}
    best = max(out, key=lambda k: out[k]["gb_per_s"])
    return {"bytes": total, "writers": out, "best_writers": best, "best_gb_per_s": out[best]["gb_per_s"]}


@part("ours_async")
def ours_async(model, torch):
    from nemo_export_hooks.exporter.api import prepare_export, write_prepared

    runs = []
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        prepare_export(model, "qwen3_moe", torch.bfloat16, check_hf_keys=False).reserve_host()  # at setup
        reserve_s = time.perf_counter() - t0
        from nemo_export_hooks.exporter import snapshot as _snap

        reserve_split = dict(_snap._POOL.seconds) if _snap._POOL is not None else {}
        for i in range(2):
            torch.cuda.synchronize()
            t_start = time.perf_counter()
            prepared = prepare_export(model, "qwen3_moe", torch.bfloat16, check_hf_keys=False)
            plan_s = time.perf_counter() - t_start
            snap = prepared.host_snapshot()
            stall = time.perf_counter() - t_start
            share = sum(t.numel() * t.element_size() for _, t in snap)
            t0 = time.perf_counter()
            res = write_prepared(prepared, snap, WORK / f"async{i}", t0=t_start)  # phases add up within res.seconds
            write_s = time.perf_counter() - t0
            del snap
            manifest = json.loads((WORK / f"async{i}" / "export_manifest.json").read_text())
            runs.append({"stall_s": stall, "write_s": write_s, "bytes": res.total_bytes, "files": len(res.files),
                         "profile": {"plan_s": round(plan_s, 4), **res.phases}, "profile_seconds": res.seconds,
                         "sha": {k: v.get("sha256") for k, v in manifest.get("files", {}).items() if k.endswith(".safetensors")}})
            shutil.rmtree(WORK / f"async{i}")
    from nemo_export_hooks.exporter import snapshot

    if snapshot._POOL is not None:  # give the 16 GB of page-locked memory back for the other parts
        snapshot._POOL.free()
        snapshot._POOL = None
    same = runs[0]["sha"] == runs[1]["sha"]
    for r in runs:
        r.pop("sha")
    return {"reserve_s": reserve_s, "reserve_split_s": reserve_split, "runs": runs, "share_bytes": share, "host_peak_added": mem.added,
            "host_peak_over_share": mem.added / share, "outputs_identical": same}


@part("ours_sync")
def ours_sync(model, torch):
    """Sync ``export_to_hf`` twice with the default writer count, then once with the count
    that was best for the disk at the start of the run (if different).  The disk's durable
    rate drifts during a run (2026-12-01: the sync exports ran after 50 GB of writes), so
    each export also gets the best count's write + fsync of 8 GiB right before it, and a
    ratio against that adjacent limit."""
    from nemo_export_hooks.exporter.writer import default_writers

    disk = RESULTS["parts"].get("limit_disk") or {}
    best_n = disk.get("best_writers")
    plan = [(default_writers(), "first"), (default_writers(), "second")]
    if best_n and best_n != default_writers():
        plan.append((best_n, "writers = the disk's best"))
    runs = []
    for i, (n, label) in enumerate(plan):
        adjacent = disk_rate(best_n, 8 << 30, WORK / f"adj{i}") if best_n else None
        os.sync()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = our_export(model, WORK / f"sync{i}", torch, writers=n)
        dt = time.perf_counter() - t0
        runs.append({"label": label, "writers": n, "seconds": dt, "gb_per_s": res.total_bytes / 1e9 / dt,
                     "bytes": res.total_bytes, "phases": res.phases, "profile_seconds": res.seconds,
                     "adjacent_limit_gb_per_s": adjacent and adjacent["gb_per_s"],
                     "shards": sum(f.endswith(".safetensors") for f in res.files), "tensors": res.num_tensors})
        shutil.rmtree(WORK / f"sync{i}")
        print(f"[gpu_export] sync {label}: {dt:.2f} s, {runs[-1]['gb_per_s']:.2f} GB/s, phases {profile_line(res.phases, res.seconds)}, "
              f"adjacent limit {runs[-1]['adjacent_limit_gb_per_s']}", flush=True)
    return {"runs": runs}


def _read_names(d: Path) -> dict:
    if (d / "model.safetensors.index.json").exists():
        return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    from safetensors import safe_open

    names = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            names.update({k: f.name for k in st.keys()})
    return names


def our_export(model, out: Path, torch, **kw):
    """export_to_hf via gpu_common.export (falls back to no HF-name check only if that check
    is what fails on this stack, and says so)."""
    import gpu_common as G

    res, note = G.export(model, out, "qwen3_moe", torch.bfloat16, **kw)
    if note:
        RESULTS.setdefault("notes", []).append(note)
    return res


@part("modelopt_bf16")
def modelopt_bf16(model, spec, torch):
    """ModelOpt on a SequentialMLP copy of the same weights; compare with ours."""
    from safetensors import safe_open


    export = import_modelopt_export()
    ours = WORK / "ours"
    r = our_export(model, ours, torch)
    src = WORK / "hf_src"
    src.mkdir()
    for f in ("config.json", "generation_config.json"):
        shutil.copy2(ours / f, src / f)
    seq = build(spec, grouped=False, torch=torch)
    copy_to_sequential(model, seq, torch)
    torch.cuda.synchronize()
    out = WORK / "modelopt"
    os.sync()
    t0 = time.perf_counter()
    export(seq, str(src), dtype=torch.bfloat16, export_dir=str(out))
    export_s = time.perf_counter() - t0
    fsync_tree(out)
    total_s = time.perf_counter() - t0
    del seq
    torch.cuda.empty_cache()
    ours_map, mo_map = _read_names(ours), _read_names(out)
    names_equal = set(ours_map) == set(mo_map)
    common = sorted(set(ours_map) & set(mo_map))
    sample = common[:: max(1, len(common) // 300)]
    differ = []
    for n in sample:
        with safe_open(str(ours / ours_map[n]), "pt") as a, safe_open(str(out / mo_map[n]), "pt") as b:
            x, y = a.get_tensor(n), b.get_tensor(n)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.uint8) if x.dtype.itemsize == 1 else x, y.view(torch.uint8) if y.dtype.itemsize == 1 else y):
            differ.append(n)
    mo_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"export_s": export_s, "export_fsync_s": total_s, "bytes": mo_bytes, "names_equal": names_equal,
            "ours_only": sorted(set(ours_map) - set(mo_map))[:5], "modelopt_only": sorted(set(mo_map) - set(ours_map))[:5],
            "sampled": len(sample), "sampled_differ": differ[:10], "import_patches": list(STUBBED), "our_bytes": r.total_bytes}


def quant(fmt: str, torch):
    import warnings

    import gpu_common as G

    export = import_modelopt_export()  # first: importing mtq alone would import the exporter without its stand-ins
    import modelopt.torch.quantization as mtq

    cfg = {"NVFP4": mtq.NVFP4_DEFAULT_CFG, "FP8": mtq.FP8_DEFAULT_CFG}[fmt]
    spec = spec_of(4)
    grouped = build(spec, grouped=True, torch=torch)
    seq = build(spec, grouped=False, torch=torch)
    copy_to_sequential(grouped, seq, torch)
    batches = [G.tokens(spec.vocab_size, batch=2, seq=64, seed=s) for s in range(2)]

    def loop(m):
        for b in batches:
            G.megatron_logits(m, b)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(grouped, cfg, loop)
        mtq.quantize(seq, cfg, loop)
    torch.cuda.synchronize()
    os.sync()
    t0 = time.perf_counter()
    res = our_export(grouped, WORK / "ours_q", torch)
    ours_s = time.perf_counter() - t0
    src = WORK / "hf_src_q"
    src.mkdir()
    cfg_json = json.loads((WORK / "ours_q" / "config.json").read_text())
    cfg_json.pop("quantization_config", None)
    (src / "config.json").write_text(json.dumps(cfg_json))
    shutil.rmtree(WORK / "ours_q")
    os.sync()
    t0 = time.perf_counter()
    export(seq, str(src), dtype=torch.bfloat16, export_dir=str(WORK / "mo_q"))
    mo_s = time.perf_counter() - t0
    fsync_tree(WORK / "mo_q")
    mo_fsync_s = time.perf_counter() - t0
    del grouped, seq
    torch.cuda.empty_cache()
    return {"fmt": fmt, "ours_s": ours_s, "bytes": res.total_bytes, "modelopt_s": mo_s, "modelopt_fsync_s": mo_fsync_s,
            "ours_over_modelopt_fsync": ours_s / mo_fsync_s}


# -- report ---------------------------------------------------------------------------------
def table() -> str:
    P = RESULTS["parts"]
    d2h, disk = P.get("limit_pinned_d2h"), P.get("limit_disk")
    rows = ["| what | seconds | GB/s | ratio to the limit | target |", "|---|---:|---:|---:|---|"]
    if d2h:
        rows.append(f"| limit: pinned device->host copy, {d2h['bytes'] / 1e9:.2f} GB | {d2h['seconds']:.3f} | {d2h['gb_per_s']:.1f} | - | - |")
    if disk:
        for n, w in disk["writers"].items():
            rows.append(f"| write + fsync 8 GiB, {n} writer(s) | {w['seconds']:.2f} | {w['gb_per_s']:.2f} | - | {'limit (best)' if n == disk['best_writers'] else ''} |")
    a = P.get("ours_async")
    if a:
        for i, r in enumerate(a["runs"]):
            ratio = f"{r['stall_s'] / d2h['seconds']:.2f}x the pinned copy" if d2h else "-"
            rows.append(f"| ours async #{i + 1}: training-thread wait (plan + snapshot) | {r['stall_s']:.3f} | {r['bytes'] / 1e9 / r['stall_s']:.1f} | {ratio} | <= 1.3x |")
            rows.append(f"| ours async #{i + 1}: background write ({r['files']} files) | {r['write_s']:.2f} | {r['bytes'] / 1e9 / r['write_s']:.2f} | "
                        f"{(r['bytes'] / 1e9 / r['write_s']) / disk['best_gb_per_s']:.2f}x best durable | >= 0.95x |" if disk else "")
        rows.append(f"| ours async: host memory peak added | - | - | {a['host_peak_over_share']:.3f}x the share ({a['host_peak_added'] / 1e9:.2f} GB) | <= 1.1x |")
        split = ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in (a.get("reserve_split_s") or {}).items())
        rows.append(f"| ours async: pool reserved at setup ({split or 'plan + pool'}) | {a['reserve_s']:.2f} | - | - | say where it goes |")
    s = P.get("ours_sync")
    if s:
        for i, r in enumerate(s["runs"]):
            ratio = f"{r['gb_per_s'] / disk['best_gb_per_s']:.2f}x best durable" if disk else "-"
            if r.get("adjacent_limit_gb_per_s"):
                ratio += f"; {r['gb_per_s'] / r['adjacent_limit_gb_per_s']:.2f}x the same measured just before ({r['adjacent_limit_gb_per_s']:.2f} GB/s)"
            target = ">= 0.9x, plan <= 0.3 s" if r.get("label") == "first" else ">= 0.95x"
            rows.append(f"| ours sync export_to_hf, {r.get('label', i)} ({r['shards']} shards, {r.get('writers')} writers) | {r['seconds']:.2f} | {r['gb_per_s']:.2f} | {ratio} | {target} |")
    m = P.get("modelopt_bf16")
    if m:
        ours_best = min(r["seconds"] for r in s["runs"]) if s else float("nan")
        rows.append(f"| ModelOpt export_mcore_gpt_to_hf (SequentialMLP copy) | {m['export_s']:.2f} | {m['bytes'] / 1e9 / m['export_s']:.2f} | - | - |")
        rows.append(f"| ModelOpt + fsync of its files | {m['export_fsync_s']:.2f} | {m['bytes'] / 1e9 / m['export_fsync_s']:.2f} | "
                    f"ours sync / ModelOpt+fsync = {ours_best / m['export_fsync_s']:.2f} | <= 0.5 |")
    for fmt in ("NVFP4", "FP8"):
        q = P.get(f"quant_{fmt}")
        if q:
            rows.append(f"| {fmt} 4 layers: ours export_to_hf / ModelOpt + fsync | {q['ours_s']:.2f} / {q['modelopt_fsync_s']:.2f} | - | "
                        f"{q['ours_over_modelopt_fsync']:.2f} (ModelOpt without fsync {q['modelopt_s']:.2f} s) | <= 1 |")
    notes = []
    if a:
        notes.append(f"async outputs of the two exports identical (sha256 of every shard): {a['outputs_identical']}")
    if a:  # where the time goes (ExportResult.phases: the exporter's own clocks)
        for i, r in enumerate(a["runs"]):
            if r.get("profile"):
                notes.append(f"where the time goes, async #{i + 1} (plan + snapshot on the training thread, then the write): "
                             f"{profile_line(r['profile'], r.get('profile_seconds'))}")
    if s:
        for r in s["runs"]:
            notes.append(f"where the time goes, sync {r.get('label')}: {profile_line(r['phases'], r.get('profile_seconds'))}")
    if m:
        notes.append(f"ModelOpt vs ours: same names {m['names_equal']} (ours only {m['ours_only']}, ModelOpt only {m['modelopt_only']}); "
                     f"{m['sampled']} sampled tensors, differing: {m['sampled_differ']}; import patches: {m['import_patches']}")
    for k, v in RESULTS["errors"].items():
        notes.append(f"FAILED {k}: {v}")
    if RESULTS["skipped"]:
        notes.append(f"skipped (time): {RESULTS['skipped']}")
    notes.append(f"total {now():.0f} s")
    return "\n".join([r for r in rows if r]) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def write_report() -> str:
    text = (f"# GPU export bench ({RESULTS.get('device')}, {RESULTS.get('params', 0) / 1e9:.2f} B params, "
            f"{RESULTS.get('experts')})\n\n" + table())
    for n in RESULTS.get("notes", []):
        text += f"- note: {n}\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu_export.md").write_text(text)
    (OUT / "gpu_export.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    return text


def main() -> int:
    import torch

    import gpu_common as G

    OUT.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    G.init_mcore_gpu()
    RESULTS["device"] = torch.cuda.get_device_name(0)
    spec = spec_of(12)
    if any(wanted(p) for p in ("limits", "ours_async", "ours_sync", "modelopt")):
        t0 = time.perf_counter()
        model = build(spec, grouped=True, torch=torch)
        torch.cuda.synchronize()
        RESULTS["build_s"] = time.perf_counter() - t0
        RESULTS["params"] = sum(p.numel() for p in model.parameters())
        RESULTS["experts"] = G.experts_type(model)
        print(f"[gpu_export] model: {RESULTS['params'] / 1e9:.2f} B params, {RESULTS['experts']}, built in {RESULTS['build_s']:.1f} s", flush=True)
        if wanted("limits"):
            limit_pinned_d2h(model, torch)
            limit_disk()
        if wanted("ours_async"):
            ours_async(model, torch)
        if wanted("ours_sync"):
            ours_sync(model, torch)
        if wanted("modelopt"):
            modelopt_bf16(model, spec, torch)
        del model
        torch.cuda.empty_cache()
    for fmt in ("NVFP4", "FP8"):
        if wanted(fmt):
            part(f"quant_{fmt}")(quant)(fmt, torch)
    print(write_report(), flush=True)
    shutil.rmtree(WORK, ignore_errors=True)
    return 0 if not RESULTS["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
