"""vLLM serves our NemotronH exports on one GPU (issue 26, step 3; PREPARED, NOT YET RUN).

Reads the export list that ``tests/gpu/test_gpu_nemotron_h.py`` writes
(``$NEMOTRON_H_EXPORTS/exports.json``, default ``/tmp/nemotron_h_exports``): a bf16 export of a
tiny Nemotron-3-Nano-patterned hybrid (Mamba-2, attention, ``TEGroupedMLP`` MoE) trained on
"next token = P[token]", and its FP8 and NVFP4 QAT exports (ModelOpt ``MAMBA_MOE_*_CONSERVATIVE``).
Beside each export lies ``<dir>.vllm_reference.safetensors``: the prompts, the reference
log-probs (bf16: transformers' bf16 forward of the same export; FP8/NVFP4: Megatron's
fake-quantized forward) and the task permutation.

Each format runs in its own child process (``--one FMT``, in-process engine:
``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so a hang or a crash costs one format, not the run:
``LLM(model=dir, enforce_eager=True, enable_prefix_caching=False, skip_tokenizer_init=True)`` with
the MoE backend picked explicitly (bf16 and FP8: ``triton``; NVFP4 on a Hopper GPU, which has
no FP4 tensor cores: ``emulation``, as ``vllm_quant_smoke.py`` -- dequantised FP4 weights with
activations quantised and dequantised, what ModelOpt's fake quant computes; ``marlin`` would run
FP4 weights with bf16 activations) and FlashInfer autotuning off (it waited more than 4 minutes for the Qwen3-MoE FP8
export; docs/GPU.md).  Checks, per format: the prompt log-probs of the actual next tokens vs the
reference, mean |delta| and top-1 agreement within the quantized smoke's tolerances
(``vllm_quant_smoke.TOL``; bf16 as FP8), and greedy generation follows the trained permutation
on >= 90% of steps.  Prints ``VLLM-NEMOTRON-H`` lines and writes ``$OUT/vllm_nemotron_h.json``.

Run on the device after the TE, Mamba and vLLM staging and the pytest run:
    PYTHONPATH=/root/site:/root/vllm_site:$PWD python3 tests/gpu/vllm_nemotron_h_smoke.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")

# mean |delta log-prob| of the prompt tokens, top-1 agreement (vllm_quant_smoke.TOL; bf16 as FP8)
TOL = {"bf16": dict(mean_abs=0.05, top1=0.98), "fp8": dict(mean_abs=0.05, top1=0.98),
       "nvfp4": dict(mean_abs=0.15, top1=0.95)}
MOE_BACKEND = {"bf16": "triton", "fp8": "triton", "nvfp4": "emulation"}
FOLLOWS_MIN = 0.9
DEFAULT_LIST = Path(os.environ.get("NEMOTRON_H_EXPORTS", "/tmp/nemotron_h_exports")) / "exports.json"


def compare(prompt_logprobs, ids, ref) -> dict:
    """``prompt_logprobs``: per prompt, vLLM's list (position 0 None) of {token: logprob-like}
    (objects with ``.logprob`` or floats); ``ids`` [B, S]; ``ref`` [B, S, V] reference log-probs
    (position i-1 predicts token i).  Returns mean/max |delta| of the actual tokens' log-probs and
    the top-1 agreement of vLLM's best token with the reference argmax."""
    def lp(v):
        return float(getattr(v, "logprob", v))

    diffs, top1 = [], []
    for b, entries in enumerate(prompt_logprobs):
        for i in range(1, ids.shape[1]):
            tok = int(ids[b, i])
            entry = entries[i]
            diffs.append(abs(lp(entry[tok]) - float(ref[b, i - 1, tok])))
            best = max(entry.items(), key=lambda kv: lp(kv[1]))[0]
            top1.append(int(best) == int(ref[b, i - 1].argmax()))
    if not diffs:
        raise ValueError("no prompt log-probs to compare")
    return dict(mean_abs_dlogprob=sum(diffs) / len(diffs), max_abs_dlogprob=max(diffs),
                top1_agreement=sum(top1) / len(top1), n=len(diffs))


def follows(seqs, perm) -> float:
    """Fraction of greedy steps that follow the trained task (next = perm[current])."""
    steps = [(s[k], s[k + 1]) for s in seqs for k in range(len(s) - 1)]
    if not steps:
        return 0.0
    return sum(int(perm[a]) == b for a, b in steps) / len(steps)


def failures_of(fmt: str, r: dict) -> list[str]:
    if "error" in r:
        return [f"{fmt}: {r['error'].strip().splitlines()[-1][:300]}"]
    t, out = TOL[fmt], []
    if r["mean_abs_dlogprob"] > t["mean_abs"]:
        out.append(f"{fmt}: mean |dlogprob| {r['mean_abs_dlogprob']:.3g} > {t['mean_abs']}")
    if r["top1_agreement"] < t["top1"]:
        out.append(f"{fmt}: top-1 agreement {r['top1_agreement']:.3f} < {t['top1']}")
    if r["greedy_follows_task"] < FOLLOWS_MIN:
        out.append(f"{fmt}: greedy generation follows the trained task at {r['greedy_follows_task']:.2f} < {FOLLOWS_MIN}")
    return out


class _Catch(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _make_llm(path: str, backend: str, mem: float):
    from vllm import LLM

    kw = dict(model=path, dtype="bfloat16", max_model_len=256, max_num_seqs=8, enforce_eager=True,
              gpu_memory_utilization=mem, skip_tokenizer_init=True, seed=0, max_logprobs=1,
              enable_prefix_caching=False)
    tries = ({"moe_backend": backend, "enable_flashinfer_autotune": False},  # vllm_quant_smoke's spelling
             {"kernel_config": {"moe_backend": backend, "enable_flashinfer_autotune": False}})
    errors = []
    for extra in tries:
        try:
            return LLM(**kw, **extra), extra
        except (TypeError, ValueError) as e:  # an engine argument this vLLM does not take (pydantic's
            errors.append(f"{extra}: {type(e).__name__}: {str(e)[:600]}")  # ValidationError is a ValueError)
    raise TypeError(f"vLLM accepted no MoE-backend argument: {errors}")


def run_one(fmt: str, entry: dict, backend: str, mem: float) -> dict:
    import torch
    from safetensors.torch import load_file
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ref = load_file(entry["reference"])
    ids, logprobs, perm = ref["ids"], ref["logprobs"], ref["perm"]
    catch = _Catch()
    logging.getLogger("vllm").addHandler(catch)
    t0 = time.perf_counter()
    llm, how = _make_llm(entry["path"], backend, mem)
    load_s = time.perf_counter() - t0
    prompts = [TokensPrompt(prompt_token_ids=t.tolist()) for t in ids]
    pl = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=1, detokenize=False), use_tqdm=False)
    gen = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, detokenize=False),
                       use_tqdm=False)
    logging.getLogger("vllm").removeHandler(catch)
    quant = getattr(llm.llm_engine.vllm_config.model_config, "quantization", None)
    seqs = [[int(ids[b, -1])] + list(g.outputs[0].token_ids) for b, g in enumerate(gen)]
    r = dict(fmt=fmt, path=entry["path"], recipe=entry.get("recipe"), quant_method=str(quant), moe_backend=backend,
             engine_args=str(how), load_s=load_s, **compare([o.prompt_logprobs for o in pl], ids, logprobs),
             greedy_follows_task=follows(seqs, perm), greedy=seqs[0], vllm_warnings=catch.lines[:12],
             torch=torch.__version__)
    return r


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--list", default=str(DEFAULT_LIST), help="exports.json written by test_gpu_nemotron_h.py")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/vllm_nemotron_h"))
    ap.add_argument("--formats", default="bf16,fp8,nvfp4")
    ap.add_argument("--moe-backend", action="append", default=[], metavar="FMT=BACKEND",
                    help="override the MoE backend of one format (default bf16/fp8: triton, nvfp4: emulation)")
    ap.add_argument("--timeout", type=int, default=170, help="seconds per format (child process)")
    ap.add_argument("--mem", type=float, default=0.3, help="gpu_memory_utilization")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    backends = dict(MOE_BACKEND)
    for o in args.moe_backend:
        k, _, v = o.partition("=")
        if k not in TOL or not v:
            ap.error(f"--moe-backend {o!r}: expected FMT=BACKEND with FMT in {sorted(TOL)}")
        backends[k] = v
    listing = Path(args.list)
    if not listing.exists():
        print(f"VLLM-NEMOTRON-H-FAILURES ['no export list {listing}: run tests/gpu/test_gpu_nemotron_h.py first']")
        return 2
    exports = json.loads(listing.read_text())

    if args.one:  # child: one format, one JSON line
        try:
            r = run_one(args.one, exports[args.one], backends[args.one], args.mem)
        except Exception:  # noqa: BLE001 - reported to the parent
            import traceback

            r = dict(fmt=args.one, error=traceback.format_exc()[-3000:])
        print("VLLM-NEMOTRON-H", json.dumps(r, default=str), flush=True)
        os._exit(0)  # vLLM's threads must not keep the child alive

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, failures = [], []
    for fmt in [f for f in args.formats.split(",") if f]:
        if fmt not in TOL:
            failures.append(f"{fmt}: unknown format (known: {sorted(TOL)})")
            continue
        if fmt not in exports:
            failures.append(f"{fmt}: not in {listing} (its pytest case failed or did not run)")
            continue
        cmd = [sys.executable, __file__, "--one", fmt, "--list", str(listing), "--mem", str(args.mem)]
        cmd += [f"--moe-backend={k}={v}" for k, v in backends.items()]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            text = p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            text += f"\nTIMEOUT after {args.timeout} s"
        line = next((ln for ln in text.splitlines() if ln.startswith("VLLM-NEMOTRON-H ")), None)
        r = json.loads(line.split(" ", 1)[1]) if line else dict(fmt=fmt, error=text[-3000:] or "no output")
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        (out / f"vllm_nemotron_h_{fmt}.log").write_text(text[-200000:])
        print("VLLM-NEMOTRON-H", json.dumps({k: v for k, v in r.items() if k != "vllm_warnings"}, default=str)[:1500], flush=True)
        results.append(r)
        failures += failures_of(fmt, r)
    (out / "vllm_nemotron_h.json").write_text(json.dumps(results, indent=1, default=str))
    print("VLLM-NEMOTRON-H-FAILURES", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
