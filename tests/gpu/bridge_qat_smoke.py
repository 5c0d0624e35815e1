"""Megatron-Bridge QAT with ``recipes/bridge_qat_qwen3_moe.py`` on one GPU (device only; not
collected by pytest): ModelOpt quantizes the model in the recipe's pre-wrap hook, Bridge trains the
fake-quantized forward (TE spec, ``TEGroupedMLP``, bf16), and ``HFExportBridgeCallback`` (switched on
by the recipe's ``hf_export.enabled=true``) writes a quantized export into every checkpoint. One
process per format (``nvfp4``, ``fp8``); the recipe is driven as a user drives it (its ``compose``
with command-line overrides), only the model is shrunk in Python. Checks, per format:

(a) an export for every checkpoint iteration, at ``<save>/iter_N/hf``; ``verify_export`` clean;
    ``hf_quant_config.json`` names the format; every expert weight is packed (NVFP4: uint8 +
    float8 block scales + fp32 global scale; FP8: float8_e4m3fn + fp32 scale), with a positive
    ``input_scale``;
(b) the last export (the final iteration's checkpoint) is byte-equal to ``export_to_hf`` of the
    trained model held at ``on_train_end``;
(c) every expert's decoded weight equals ModelOpt's fake-quantized weight
    (``weight_quantizer[e](weight{e})``, what QAT trained with) within one bf16 ulp, except at
    rounding ties: at most ``TIE_FRACTION`` of the elements may differ (the GPU suite's
    ``test_gpu_quant.py`` explains the ties element by element; here only their share is bounded);
(d) consecutive exports differ (training moved the weights, so (b) could fail).

Run (device): ``OUT=$OUT PYTHONPATH=/root/site19:/root/site:$PWD python3 tests/gpu/bridge_qat_smoke.py``.
Writes ``$OUT/bridge_qat_smoke.json`` and ``$OUT/bridge_qat_<fmt>.log``; last line
``BRIDGE-QAT-SMOKE {json}``; exit 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
for _k, _v in dict(CUDA_DEVICE_MAX_CONNECTIONS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1").items():
    os.environ.setdefault(_k, _v)

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "tests" / "gpu"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bridge_smoke import _byte_diff, _free_port, _tensors  # noqa: E402 - the Bridge smoke's helpers (import-safe)

ITERS, SAVE_EVERY, SEQ, VOCAB = 4, 2, 64, 256
TIE_FRACTION = 1e-3
PACKED = {"nvfp4": "torch.uint8", "fp8": "torch.float8_e4m3fn"}


def shrink(cfg) -> None:
    """The recipe's Qwen3-MoE shape scaled to a few MB (dims multiples of NVFP4's 16-element block)."""
    m = cfg.model
    # hidden / expert widths multiples of 128 and head_dim 64, so that vLLM's FP8 / NVFP4 MoE and
    # attention kernels can serve the export (vllm_quant_smoke.py --serve)
    for k, v in dict(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
                     kv_channels=64, num_moe_experts=4, moe_ffn_hidden_size=128, moe_router_topk=2,
                     seq_length=SEQ).items():
        setattr(m, k, v)
    cfg.dataset.seq_length = SEQ
    cfg.dataset.num_workers = 1
    cfg.tokenizer.vocab_size = VOCAB
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 4, 2
    cfg.validation.eval_interval = 1000
    cfg.validation.eval_iters = 1
    cfg.logger.log_interval = 1
    cfg.scheduler.lr_warmup_iters = 0
    cfg.scheduler.lr_decay_iters = ITERS
    cfg.optimizer.lr = 1e-3


def run_worker(fmt: str, work: Path) -> dict:
    from megatron.bridge.training.callbacks import Callback
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain

    from bridge_smoke import make_tokenizer, versions
    from recipes import bridge_qat_qwen3_moe as qat

    save = work / fmt / "ckpt"
    tok = work / "tokenizer"
    if not tok.is_dir():
        make_tokenizer(tok)
    t0 = time.perf_counter()
    cfg, hf, quant = qat.compose([f"quant.format={fmt}", "quant.calib_steps=2", f"quant.calib_seq={SEQ}",
                                  "hf_export.enabled=true", f"hf_export.tokenizer={tok}", f"checkpoint.save={save}",
                                  f"checkpoint.save_interval={SAVE_EVERY}", f"train.train_iters={ITERS}"])
    shrink(cfg)
    held = {}

    class Holder(Callback):
        def on_train_end(self, context):
            held["model"] = context.model

    cbs = qat.base.callbacks(hf)
    pretrain(cfg, forward_step, callbacks=[*cbs, Holder()])
    train_s = time.perf_counter() - t0
    cb = cbs[0]
    res = {"fmt": fmt, "train_wall_s": round(train_s, 2), "exports": list(cb.exports), "failed": cb.failed,
           "skipped": cb.skipped, "expect_quant": hf.expect_quant, "versions": versions(), "problems": []}
    try:
        import modelopt

        res["versions"]["nvidia-modelopt"] = modelopt.__version__
    except ImportError:
        pass
    res["problems"] = check(fmt, save, cb.exports, held.get("model"), work, res)
    return res


def check(fmt: str, save: Path, exports: list, model, work: Path, res: dict) -> list[str]:
    import torch

    from nemo_export_hooks import export_to_hf
    from nemo_export_hooks.publish import verify_export
    import gpu_quant_decode as D

    p: list[str] = []
    want = list(range(SAVE_EVERY, ITERS + 1, SAVE_EVERY))
    got = sorted(int(e["step"]) for e in exports)
    if got != want:
        p.append(f"exports for iterations {got}, expected {want}")
    if res["failed"] or res["skipped"]:
        p.append(f"failed={res['failed']} skipped={res['skipped']}")
    algo = {"nvfp4": "NVFP4", "fp8": "FP8"}[fmt]
    rows, prev = [], None
    for e in sorted(exports, key=lambda e: int(e["step"])):
        n, path = int(e["step"]), Path(e["path"])
        row = {"step": n, "path": str(path), "blocking_s": e.get("blocking_seconds")}
        if path != save / f"iter_{n:07d}" / "hf":
            p.append(f"iter {n}: export at {path}, expected {save}/iter_{n:07d}/hf")
        p += [f"iter {n}: verify_export: {v}" for v in verify_export(path)]
        qc = json.loads((path / "hf_quant_config.json").read_text()) if (path / "hf_quant_config.json").is_file() else {}
        row["quant_algo"] = (qc.get("quantization") or {}).get("quant_algo")
        if row["quant_algo"] != algo:
            p.append(f"iter {n}: hf_quant_config.json quant_algo {row['quant_algo']!r}, expected {algo}")
        t = _tensors(path)
        experts = sorted(k[: -len(".weight")] for k in t if ".mlp.experts." in k and k.endswith(".weight"))
        row["expert_weights"] = len(experts)
        bad = [k for k in experts if str(t[k + ".weight"].dtype) != PACKED[fmt]
               or k + ".weight_scale" not in t or (fmt == "nvfp4" and k + ".weight_scale_2" not in t)]
        no_input = [k for k in experts if k + ".input_scale" not in t or not bool((t[k + ".input_scale"].float() > 0).all())]
        if not experts or bad:
            p.append(f"iter {n}: {len(bad)} of {len(experts)} expert weights not packed as {fmt}: {bad[:4]}")
        if no_input:
            p.append(f"iter {n}: {len(no_input)} expert weights with a missing or non-positive input_scale: {no_input[:4]}")
        if prev is not None:
            changed = sum(not torch.equal(t[k], prev[k]) for k in t if k in prev)
            row["tensors_changed_since_previous"] = changed
            if changed == 0:
                p.append(f"iter {n}: export equals the previous one: the byte check would prove nothing")
        prev = t
        rows.append(row)
    res["rows"] = rows
    if model is None:
        return p + ["on_train_end did not hand over the model: (b) and (c) not checked"]
    m = model[0] if isinstance(model, (list, tuple)) else model
    while hasattr(m, "module") and not hasattr(m, "decoder"):
        m = m.module
    if exports and prev is not None:
        ref = work / fmt / "reexport"
        export_to_hf(m, ref, arch="qwen3_moe", dtype=torch.bfloat16)
        diff = _byte_diff(prev, _tensors(ref))
        res["last_export_byte_equal_to_trained_model"] = not diff
        if diff:
            p.append(f"last export vs export_to_hf of the trained model: {len(diff)} tensors differ: {diff[:4]}")
    # (c) decoded experts vs ModelOpt's fake quant of the trained weights
    ffn, elems, off, worst = m.config.moe_ffn_hidden_size, 0, 0, 0.0
    for li, layer in enumerate(m.decoder.layers):
        ex = layer.mlp.experts
        for e in range(m.config.num_moe_experts):
            for lin, parts in ((ex.linear_fc1, (("gate_proj", 0, ffn), ("up_proj", ffn, 2 * ffn))),
                               (ex.linear_fc2, (("down_proj", 0, None),))):
                w = getattr(lin, f"weight{e}", None)
                if w is None:
                    p.append(f"layer {li}: {type(lin).__name__} has no weight{e} (single grouped weight?): (c) not checked")
                    break
                q = lin.weight_quantizer[e]
                amax = float(q.amax.float().max())
                with torch.no_grad():
                    fq = q(w.detach()).float()
                for hf_name, r0, r1 in parts:
                    base = f"model.layers.{li}.mlp.experts.{e}.{hf_name}"
                    got_parts = {k[len(base) + 1:]: v.cuda() for k, v in prev.items() if k.startswith(base + ".")}
                    _, dec = D.decode(got_parts)
                    ref = fq[r0:r1]
                    eps = torch.finfo(torch.bfloat16).eps
                    bad = (dec.float() - ref).abs() > eps * ref.abs() + 1e-7 * amax
                    elems += bad.numel()
                    off += int(bad.sum())
                    worst = max(worst, float((dec.float() - ref).abs().max()) / max(amax, 1e-12))
    res["decoded_vs_fake_quant"] = {"elements": elems, "off_by_more_than_1ulp": off,
                                    "fraction": off / max(elems, 1), "max_abs_diff_over_amax": worst}
    if not elems:
        p.append("no expert weight decoded: (c) not checked")
    elif off / elems > TIE_FRACTION:
        p.append(f"decoded experts differ from ModelOpt's fake quant in {off} of {elems} elements "
                 f"({off / elems:.2g} > {TIE_FRACTION}), max {worst:.3g} x amax")
    return p


def driver(args) -> int:
    out = Path(os.environ.get("OUT") or "/tmp/bridge_qat_out")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget
    res, problems = {}, []
    for fmt in args.formats.split(","):
        left = deadline - time.perf_counter()
        if left < 30:
            problems.append(f"{fmt}: not run ({args.budget} s budget spent)")
            continue
        env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        log = out / f"bridge_qat_{fmt}.log"
        t0 = time.perf_counter()
        with log.open("w") as f:
            proc = subprocess.Popen([sys.executable, __file__, "--worker", fmt, "--work", str(work)], stdout=f,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=str(ROOT))
            try:
                rc = proc.wait(timeout=min(left, args.run_timeout))
            except subprocess.TimeoutExpired:
                rc = "timeout"
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        rp = work / f"{fmt}.json"
        r = json.loads(rp.read_text()) if rp.is_file() else {"fmt": fmt}
        r.update(rc=rc, process_wall_s=round(time.perf_counter() - t0, 1))
        if rc != 0 and "error" not in r:
            r["error"] = f"exit {rc}; log tail:\n" + "".join(log.read_text(errors="replace").splitlines(True)[-40:])
        res[fmt] = r
        problems += [f"{fmt}: {x}" for x in r.get("problems", [])]
        if r.get("error"):
            problems.append(f"{fmt}: {r['error'][:2500]}")
        print(f"bridge_qat_smoke: {fmt}: rc={rc} in {r['process_wall_s']} s; exports {[e.get('step') for e in r.get('exports', [])]}; "
              f"rows {r.get('rows')}; byte_equal {r.get('last_export_byte_equal_to_trained_model')}; "
              f"decoded {r.get('decoded_vs_fake_quant')}", flush=True)
    res["problems"], res["ok"] = problems, not problems
    tmp = out / "bridge_qat_smoke.json.tmp"
    tmp.write_text(json.dumps(res, indent=1, default=str))
    tmp.replace(out / "bridge_qat_smoke.json")
    print("\n".join(["", "PROBLEMS:"] + problems) if problems else "\nALL CHECKS PASSED")
    print("BRIDGE-QAT-SMOKE " + json.dumps({"ok": res["ok"], "problems": len(problems),
                                             "versions": next((r.get("versions") for r in res.values() if isinstance(r, dict) and r.get("versions")), None)},
                                            default=str), flush=True)
    return 0 if res["ok"] else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=sorted(PACKED))
    ap.add_argument("--formats", default="nvfp4,fp8")
    ap.add_argument("--work", default="/tmp/bridge_qat_smoke")
    ap.add_argument("--budget", type=float, default=300)
    ap.add_argument("--run-timeout", type=float, default=170)
    args = ap.parse_args()
    if not args.worker:
        return driver(args)
    work = Path(args.work)
    try:
        res = run_worker(args.worker, work)
    except BaseException as e:  # noqa: BLE001 - the driver reads the reason from the result file
        res = {"fmt": args.worker, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}
    tmp = work / f"{args.worker}.json.tmp"
    tmp.write_text(json.dumps(res, indent=1, default=str))
    tmp.replace(work / f"{args.worker}.json")
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, default=str)[:4000], flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
