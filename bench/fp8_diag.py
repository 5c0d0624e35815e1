"""Where does the FP8 export's time go on one GPU?  (GPU diagnostic for the 43 s FP8 vs
6 s NVFP4 finding of bench/gpu_export.py; not a test.)

    PYTHONPATH=/root/site:$PWD python3 bench/fp8_diag.py     # one H200; writes $OUT/fp8_diag.txt

Builds the bench's 4-layer Qwen3-30B-A3B-shaped TEGroupedMLP model, quantizes it with
ModelOpt (FP8, then NVFP4), and times, per format, the stages of our sync export apart:
planning, conversion alone on the GPU (run_jobs drained, one synchronize), conversion plus
the per-tensor ``.to("cpu")`` of ``PreparedExport.tensors()``, and the whole
``export_to_hf`` under cProfile (top functions by own time).  Also: the device->host copy of
the same float8 bytes as float8 and as a uint8 view, and the same tensors one by one vs one
batched pinned copy.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import shutil
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_export as B  # noqa: E402  (its import patch and model builders)

OUT = Path(os.environ.get("OUT", "/tmp/fp8_diag_out"))
WORK = Path(os.environ.get("BENCH_DIR", "/tmp/fp8_diag_work"))
LINES: list[str] = []


def say(s: str) -> None:
    print(s, flush=True)
    LINES.append(s)


def timed(fn):
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    r = fn()
    torch.cuda.synchronize()
    return r, time.perf_counter() - t0


def one(fmt: str, torch) -> None:
    import gpu_common as G
    import modelopt.torch.quantization as mtq

    from nemo_export_hooks.exporter.api import prepare_export, write_prepared
    from nemo_export_hooks.exporter.execute import run_jobs

    spec = B.spec_of(4)
    model = B.build(spec, grouped=True, torch=torch)
    batches = [G.tokens(spec.vocab_size, batch=2, seq=64, seed=s) for s in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, {"NVFP4": mtq.NVFP4_DEFAULT_CFG, "FP8": mtq.FP8_DEFAULT_CFG}[fmt],
                     lambda m: [G.megatron_logits(m, b) for b in batches])
    torch.cuda.synchronize()
    prepared, s = timed(lambda: prepare_export(model, "qwen3_moe", torch.bfloat16, check_hf_keys=False))
    say(f"{fmt}: prepare_export (no HF-name check) {s:.2f} s")
    _, s = timed(prepared.layout)
    say(f"{fmt}: describe/layout {s:.2f} s")
    for rep in range(2):
        n = [0, 0]

        def drain():
            for _, t in run_jobs(prepared.plan, prepared.dtype):
                n[0] += 1
                n[1] += t.numel() * t.element_size()
        _, s = timed(drain)
        say(f"{fmt}: run_jobs on the GPU only #{rep + 1}: {n[0]} tensors, {n[1] / 1e9:.2f} GB, {s:.2f} s")
    by_dtype: dict = {}

    def to_host():
        for _, t in run_jobs(prepared.plan, prepared.dtype):
            t0 = time.perf_counter()
            h = t.to("cpu")
            d = by_dtype.setdefault(str(t.dtype), [0, 0, 0.0])
            d[0] += 1
            d[1] += h.numel() * h.element_size()
            d[2] += time.perf_counter() - t0
    _, s = timed(to_host)
    say(f"{fmt}: run_jobs + per-tensor .to('cpu') {s:.2f} s; .to('cpu') per dtype (n, GB, s): "
        + ", ".join(f"{k} {v[0]} {v[1] / 1e9:.2f} {v[2]:.2f}" for k, v in sorted(by_dtype.items())))
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    res = write_prepared(prepared, prepared.tensors(), WORK / "out", t0=t0)
    pr.disable()
    say(f"{fmt}: write_prepared (sync, whole) {time.perf_counter() - t0:.2f} s, {res.total_bytes / 1e9:.2f} GB")
    st = io.StringIO()
    pstats.Stats(pr, stream=st).sort_stats("tottime").print_stats(25)
    say(st.getvalue())
    shutil.rmtree(WORK, ignore_errors=True)
    if fmt == "FP8":
        w = next(p for n, p in model.named_parameters() if "experts.linear_fc1.weight" in n)
        q = (w.float() / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn)
        for label, x in (("float8", q), ("uint8 view", q.view(torch.uint8))):
            _, s = timed(lambda: [x.to("cpu") for _ in range(200)])
            say(f"d2h 200 x {x.numel() * x.element_size() / 1e6:.2f} MB as {label}: {s:.3f} s")
    del model, prepared
    torch.cuda.empty_cache()


def main() -> int:
    import torch
    import gpu_common as G

    OUT.mkdir(parents=True, exist_ok=True)
    G.init_mcore_gpu()
    for fmt in ("FP8", "NVFP4"):
        try:
            one(fmt, torch)
        except Exception as e:  # report and go on
            import traceback

            traceback.print_exc()
            say(f"{fmt}: FAILED {type(e).__name__}: {e}")
    (OUT / "fp8_diag.txt").write_text("\n".join(LINES) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
