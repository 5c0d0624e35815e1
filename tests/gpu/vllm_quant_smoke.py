"""Quantized exports served by vLLM on one GPU (issue 13 part 2; PREPARED, NOT YET RUN).

vLLM's CPU build has no ModelOpt FP8 / NVFP4 kernels, so this runs on the device with
``vllm==0.26.0`` (pins torch 2.11, the device's), staged as ``tests/gpu/vllm-0.26.0-stage.txt`` says.

For each format (``nvfp4``, ``fp8``):
1. a Qwen3-MoE with real TE ``TEGroupedMLP`` experts is trained briefly in bf16 (next token =
   P[token], so predictions are confident), quantized with ModelOpt (``mtq.quantize`` default
   config, calibrated on the training distribution), QAT'd a few more steps, and exported;
2. every expert in the export has a non-zero ``input_scale`` (and NVFP4 ``w1``/``w3`` scales
   that vLLM fuses are checked equal, the precondition of vLLM's
   "w1_weight_scale_2 must match w3_weight_scale_2" warning);
3. vLLM loads the export (in-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so its log lines
   are caught here) and generates greedily; its bf16 prompt log-probs are compared with
   Megatron's fake-quantized forward on the same tokens.

Tolerance, and why: vLLM runs the real low-precision GEMMs (FP8 e4m3 or FP4 e2m1 operands with
their scales, bf16/fp32 accumulation in kernels that differ from TE's), while Megatron's fake
quant rounds operands to the same grids but multiplies in bf16; both quantize activations,
which amplifies accumulation-order differences at rounding boundaries.  So we do not ask for
bit agreement but for what a user sees: on the trained task the mean |delta log-prob| of the
prompt tokens <= 0.05 (FP8) / 0.15 (NVFP4), and top-1 agreement >= 0.98 / 0.95.  The measured
numbers are printed (``VLLM-QUANT``) and written to ``$OUT/vllm_quant.json``; a wrong scale or
a swapped expert moves the log-probs by whole units and the top-1 agreement to chance.

Run on the device (one H200) after staging:
    export PYTHONPATH=/root/site:/root/vllm_site:$PWD
    VLLM_ENABLE_V1_MULTIPROCESSING=0 python3 tests/gpu/vllm_quant_smoke.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

TOL = {"fp8": dict(mean_abs=0.05, top1=0.98), "nvfp4": dict(mean_abs=0.15, top1=0.95)}
# vLLM 0.26's automatic FP8 MoE choice on the H200 is FLASHINFER_CUTLASS with FlashInfer autotuning,
# which compiled (JIT) for more than 4 minutes without a token (2026-12-02).  The backends are named
# here instead, as a user should: FP8 -> vLLM's Triton fused MoE; NVFP4 on Hopper (no FP4 tensor
# cores) -> "emulation" (dequantised weights, activations quantised and dequantised: what ModelOpt's
# fake quant computes) or "marlin" (weight-only FP4, activations in bf16).
MOE_BACKEND = {"fp8": "triton", "nvfp4": "emulation"}
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")


def llm_kwargs(fmt: str, backend: str | None = None, max_model_len: int = 256) -> dict:
    """What a user passes to ``vllm.LLM`` to serve our quantized export on one Hopper GPU."""
    return dict(dtype="bfloat16", max_model_len=max_model_len, max_num_seqs=8, enforce_eager=True, gpu_memory_utilization=0.35,
                skip_tokenizer_init=True, seed=0, max_logprobs=1, moe_backend=backend or MOE_BACKEND.get(fmt, "auto"),
                enable_flashinfer_autotune=False)
BAD_LOG = ("w1_weight_scale_2 must match w3_weight_scale_2",)


class _Catch(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def compare_prompt_logprobs(outputs, ids, ref) -> tuple[list[float], list[bool]]:
    """vLLM's prompt log-probs (``prompt_logprobs=1``) against reference log-probs ``ref``
    [batch, seq, vocab] of the same tokens: |delta| of each actual next token, and whether vLLM's
    top-1 is the reference's argmax."""
    diffs, top1 = [], []
    for b, o in enumerate(outputs):
        for i in range(1, ids.shape[1]):
            tok = int(ids[b, i])
            entry = o.prompt_logprobs[i]
            diffs.append(abs(entry[tok].logprob - float(ref[b, i - 1, tok])))
            top1.append(max(entry.items(), key=lambda kv: kv[1].logprob)[0] == int(ref[b, i - 1].argmax()))
    return diffs, top1


def _spec():
    import gpu_common as G

    # dims multiples of 128 for the FP4/FP8 MoE kernels; head_dim 64 for the attention backends
    return G.tiny_spec("qwen3_moe", hidden_size=512, num_attention_heads=8, num_query_groups=4, kv_channels=64,
                       ffn_hidden_size=1024, moe_ffn_hidden_size=256, num_experts=8, moe_router_topk=2,
                       vocab_size=1024, max_seq_len=256)


def _task_batches(vocab: int, n: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=g)
    return perm, [torch.randint(0, vocab, (8, 64), generator=g) for _ in range(n)]


def _qat(model, perm, steps: int, vocab: int):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    perm = perm.cuda()
    for _ in range(steps):
        ids = torch.randint(0, vocab, (16, 32), generator=g).cuda()
        pos = torch.arange(32, device="cuda").unsqueeze(0).expand(16, 32)
        loss = F.cross_entropy(model(ids, pos, attention_mask=None).float().reshape(-1, vocab), perm[ids].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


def _expert_scales(path: Path, num_layers: int, num_experts: int) -> list[str]:
    """Problems with the experts' scales in the export: missing or zero input_scale, NVFP4 gate/up
    weight_scale_2 that vLLM must fuse but that differ."""
    import gpu_common as G

    t = G.read_exported(path)
    problems = []
    for li in range(num_layers):
        for e in range(num_experts):
            base = f"model.layers.{li}.mlp.experts.{e}"
            for p in ("gate_proj", "up_proj", "down_proj"):
                s = t.get(f"{base}.{p}.input_scale")
                if s is None:
                    problems.append(f"{base}.{p}.input_scale missing")
                elif not (s.float() > 0).all() or not s.float().isfinite().all():
                    problems.append(f"{base}.{p}.input_scale = {s.float().tolist()}")
            g2, u2 = t.get(f"{base}.gate_proj.weight_scale_2"), t.get(f"{base}.up_proj.weight_scale_2")
            if g2 is not None and u2 is not None and not g2.float().equal(u2.float()):
                problems.append(f"{base}: gate/up weight_scale_2 differ ({float(g2):.6g} vs {float(u2):.6g})")
    return problems


def run_format(fmt: str, out: Path, backend: str | None = None) -> dict:
    import modelopt.torch.quantization as mtq
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import gpu_common as G

    spec = _spec()
    parent = G.build_te_gpt(spec, torch.float32)
    loss = G.train_permutation_task(parent, spec.vocab_size, steps=200)
    model = G.build_te_gpt(spec, torch.bfloat16, randomise_norms=False)
    G.copy_weights(parent, model)
    del parent
    assert G.experts_type(model) == "TEGroupedMLP", G.experts_type(model)
    perm, calib = _task_batches(spec.vocab_size, 8, seed=0)

    def loop(m):
        for ids in calib:
            G.megatron_logits(m, ids.cuda())

    mtq.quantize(model, {"nvfp4": mtq.NVFP4_DEFAULT_CFG, "fp8": mtq.FP8_DEFAULT_CFG}[fmt], loop)
    qat_loss = _qat(model, perm, 30, spec.vocab_size)
    path = out / f"qwen3_moe-{fmt}"
    res, note = G.export(model, path, "qwen3_moe", torch.bfloat16)
    scale_problems = _expert_scales(path, spec.num_layers, spec.num_experts)

    ids = G.tokens(spec.vocab_size, batch=4, seq=48, seed=3)
    ref = torch.log_softmax(G.megatron_logits(model, ids).float(), dim=-1).cpu()  # fake-quantized forward
    del model
    torch.cuda.empty_cache()

    catch = _Catch()
    logging.getLogger("vllm").addHandler(catch)
    t_load = time.perf_counter()
    llm = LLM(model=str(path), **llm_kwargs(fmt, backend))
    load_s = time.perf_counter() - t_load
    prompts = [TokensPrompt(prompt_token_ids=t.tolist()) for t in ids.cpu()]
    pl = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=1, detokenize=False), use_tqdm=False)
    gen = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, detokenize=False), use_tqdm=False)
    logging.getLogger("vllm").removeHandler(catch)
    quant_method = getattr(llm.llm_engine.vllm_config.model_config, "quantization", None)
    del llm
    torch.cuda.empty_cache()

    diffs, top1 = compare_prompt_logprobs(pl, ids, ref)
    gen_tokens = [list(g.outputs[0].token_ids) for g in gen]
    # the task: next token = perm[current]; a served model that learned it follows the permutation
    follows = sum(int(perm[s[k]]) == s[k + 1] for s in gen_tokens for k in range(len(s) - 1)) / sum(len(s) - 1 for s in gen_tokens)
    bad_logs = [line for line in catch.lines if any(b in line for b in BAD_LOG)]
    r = dict(fmt=fmt, moe_backend=backend or MOE_BACKEND[fmt], vllm_load_s=round(load_s, 1), quant_method=str(quant_method), quant_algo=res.quant_algo, note=note, train_loss=loss,
             qat_loss=qat_loss, mean_abs_dlogprob=sum(diffs) / len(diffs), max_abs_dlogprob=max(diffs),
             top1_agreement=sum(top1) / len(top1), greedy_follows_task=follows, greedy=gen_tokens[0],
             scale_problems=scale_problems[:8], bad_vllm_logs=bad_logs[:4], vllm_warnings=catch.lines[:20])
    print("VLLM-QUANT", json.dumps(r, default=str))
    return r


def dequantized_twin(path: Path, twin: Path) -> str:
    """A bf16 copy of a quantized export with every packed weight decoded (``gpu_quant_decode``)
    and the scales and ``quantization_config`` dropped: what transformers can load as the
    weight-only reference for ``serve_export``.  Returns the format."""
    import shutil

    import torch
    from safetensors.torch import save_file

    import gpu_common as G
    import gpu_quant_decode as D

    t = G.read_exported(path)
    out, fmt = {}, "none"
    for k, v in t.items():
        if k.endswith((".weight_scale", ".weight_scale_2", ".input_scale", ".k_scale", ".v_scale")):
            continue
        base = k[: -len(".weight")] if k.endswith(".weight") else None
        if base and base + ".weight_scale" in t:
            parts = {s: t[f"{base}.{s}"] for s in ("weight", "weight_scale", "weight_scale_2") if f"{base}.{s}" in t}
            fmt, dec = D.decode({s: x.cuda() for s, x in parts.items()})
            out[k] = dec.to(torch.bfloat16).cpu().contiguous()
        else:
            out[k] = v.contiguous()
    twin.mkdir(parents=True, exist_ok=True)
    save_file(out, str(twin / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (twin / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in ("generation_config.json",):
        if (path / f).is_file():
            shutil.copy(path / f, twin / f)
    return fmt


def serve_export(path: Path, out: Path, backend: str | None = None) -> dict:
    """Serve an export made elsewhere (the Megatron-Bridge QAT recipe's ``iter_N/hf``) with vLLM:
    it must load, generate, and its prompt log-probs must agree with transformers' forward of the
    dequantized twin (weights as vLLM reads them; activations unquantized there, so the
    tolerance is the quantized smoke's)."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import gpu_common as G

    qc = json.loads((path / "hf_quant_config.json").read_text())
    fmt = {"FP8": "fp8", "NVFP4": "nvfp4"}[qc["quantization"]["quant_algo"]]
    twin = out / f"twin-{path.parent.name}-{fmt}"
    dequantized_twin(path, twin)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    ids = G.tokens(vocab, batch=4, seq=48, seed=5)
    hf, info = G.load_hf_gpu(twin, torch.bfloat16)
    ref = torch.log_softmax(G.hf_logits(hf, ids), dim=-1).cpu()
    problems = G.loading_problems(info)
    del hf
    torch.cuda.empty_cache()
    t_load = time.perf_counter()
    # vLLM refuses a max_model_len above the model's max_position_embeddings (the recipe's is 64)
    max_len = min(256, int(json.loads((path / "config.json").read_text()).get("max_position_embeddings", 256)))
    llm = LLM(model=str(path), **llm_kwargs(fmt, backend, max_len))
    load_s = time.perf_counter() - t_load
    prompts = [TokensPrompt(prompt_token_ids=x.tolist()) for x in ids.cpu()]
    pl = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=1, detokenize=False), use_tqdm=False)
    gen = llm.generate(prompts[:1], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, detokenize=False),
                       use_tqdm=False)
    del llm
    torch.cuda.empty_cache()
    diffs, top1 = compare_prompt_logprobs(pl, ids, ref)
    r = dict(served=str(path), fmt=fmt, moe_backend=backend or MOE_BACKEND[fmt], vllm_load_s=round(load_s, 1),
             mean_abs_dlogprob=sum(diffs) / len(diffs), max_abs_dlogprob=max(diffs),
             top1_agreement=sum(top1) / len(top1), ref_logprob_std=float(ref.std()),
             generated=list(gen[0].outputs[0].token_ids), twin_loading_problems=problems)
    print("VLLM-SERVE", json.dumps(r, default=str), flush=True)
    return r


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/vllm_quant"))
    ap.add_argument("--formats", default="fp8,nvfp4")
    ap.add_argument("--moe-backend", default="", help="fmt=backend,... (default: " + str(MOE_BACKEND) + ")")
    ap.add_argument("--serve", default="", help="comma-separated export dirs made elsewhere, served instead")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backends = dict(kv.split("=", 1) for kv in args.moe_backend.split(",") if kv)
    results, failures = [], []
    if args.serve:
        for d in args.serve.split(","):
            try:
                r = serve_export(Path(d), out)
            except Exception as e:  # noqa: BLE001
                import traceback

                failures.append(f"{d}: {type(e).__name__}: {e}")
                results.append(dict(served=d, error=traceback.format_exc()[-3000:]))
                print("VLLM-SERVE-ERROR", d, traceback.format_exc()[-3000:], flush=True)
                continue
            results.append(r)
            t = TOL[r["fmt"]]
            # a recipe export after a few iterations predicts near-uniformly: top-1 is decided by
            # near-ties there, so only the log-prob distance is a check (top-1 is reported)
            if r["mean_abs_dlogprob"] > t["mean_abs"] or r["twin_loading_problems"]:
                failures.append(f"{d}: mean |dlogprob| {r['mean_abs_dlogprob']:.3g} (tol {t['mean_abs']}), "
                                f"{r['twin_loading_problems']}")
        (out / "vllm_serve.json").write_text(json.dumps(results, indent=1, default=str))
        print("VLLM-SERVE-FAILURES", failures)
        return 1 if failures else 0
    import gpu_common as G

    G.init_mcore_gpu()
    for fmt in args.formats.split(","):
        try:
            r = run_format(fmt, out, backends.get(fmt))
        except Exception as e:  # noqa: BLE001 - report each format, then fail
            import traceback

            failures.append(f"{fmt}: {type(e).__name__}: {e}")
            results.append(dict(fmt=fmt, error=traceback.format_exc()[-3000:]))
            continue
        results.append(r)
        t = TOL[fmt]
        if r["scale_problems"]:
            failures.append(f"{fmt}: expert scales: {r['scale_problems'][:3]}")
        if r["bad_vllm_logs"]:
            failures.append(f"{fmt}: vLLM logged {r['bad_vllm_logs'][:2]}")
        if r["mean_abs_dlogprob"] > t["mean_abs"]:
            failures.append(f"{fmt}: mean |dlogprob| {r['mean_abs_dlogprob']:.3g} > {t['mean_abs']}")
        if r["top1_agreement"] < t["top1"]:
            failures.append(f"{fmt}: top-1 agreement {r['top1_agreement']:.3f} < {t['top1']}")
        if r["greedy_follows_task"] < 0.9:
            failures.append(f"{fmt}: greedy generation follows the trained task at {r['greedy_follows_task']:.2f}")
    (out / "vllm_quant.json").write_text(json.dumps(results, indent=1, default=str))
    print("VLLM-QUANT-FAILURES", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
