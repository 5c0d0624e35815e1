"""Megatron-Bridge ``pretrain`` on one GPU with ``HFExportBridgeCallback`` (device only; not collected
by pytest). A tiny Qwen3-MoE through Bridge's ``GPTModelProvider`` (TE spec, ``moe_grouped_gemm``:
TEGroupedMLP), ``MockGPTDatasetConfig``, fp32 params, 6 iterations, a ``torch_dist`` checkpoint every
2, each run in its own process (one failure does not stop the others):

* ``ours_sync``, ``ours_async`` (``checkpoint.async_save``): our callback. For every checkpoint
  iteration N: (a) the export is at ``<save>/iter_N/hf``, ``verify_export`` is clean, transformers
  loads it with no missing/unexpected/mismatched keys; (b) iter_N is loaded back with Bridge's own
  loader (``load_megatron_model``) into a fresh model, exported again with ``export_to_hf``, and
  every tensor is compared byte for byte with the callback's export. Under async_save the smoke skips
  the loop's non-blocking finalize at the iteration that scheduled the save (storage slower than an
  iteration, as with a real model), so the event fires at a later iteration, when a naive export
  would hold later weights; consecutive exports must differ, so the comparison can fail. (c) HF
  logits of the export vs the Megatron forward of the reloaded model.
* ``baseline`` (no HF export) and ``bridge_hf`` (Bridge's ``also_save_hf_checkpoint``, HF source =
  a copy of one of our exports, which holds config.json and tokenizer files): (d) time of each
  checkpoint save on the training thread, next to our callback's ``blocking_seconds``.

Run (device): ``OUT=$OUT PYTHONPATH=/root/site19:/root/site:$PWD python3 tests/gpu/bridge_smoke.py``.
Writes ``$OUT/bridge_smoke.json`` and ``$OUT/bridge_<run>.log``; prints a table; last line
``BRIDGE-SMOKE {json}``; exit 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

# NVLink multicast stays off (device rule), also in the child processes, which inherit os.environ
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
for _k, _v in dict(CUDA_DEVICE_MAX_CONNECTIONS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1").items():
    os.environ.setdefault(_k, _v)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ITERS, SAVE_EVERY, SEQ, VOCAB, SEED = 6, 2, 64, 256, 1234
# fp32 Megatron (TE) vs fp32 transformers: max |logit difference| <= TOL_REL * max |Megatron logit|.
# The check worker runs with NVIDIA_TF32_OVERRIDE=0 (cuBLAS, hence TE's GEMMs too, in true fp32) and
# torch's TF32 off: on 2026-12-01 the diffs were 9.7e-4 at init and 5.6e-3 / 7.0e-3 after training,
# above a fixed 5e-3 while the bytes were exact; an absolute bound grows with the logits, TF32's
# 10-bit mantissa (~1e-3 relative) would explain them, and true fp32 should sit near 1e-5 relative.
TOL_REL = 1e-4
TOL = TOL_REL  # reported in the json as before
RUNS = {"ours_sync": (False, "ours"), "ours_async": (True, "ours"), "baseline": (False, None),
        "bridge_hf": (False, "bridge")}  # name: (async_save, who exports)
ORDER = ["ours_sync", "ours_async", "check", "baseline", "bridge_hf"]  # key checks first


# -- shared by the workers -----------------------------------------------------------------------
def make_config(save: Path, async_save: bool, also_hf: bool = False, hf_source: str | None = None):
    """The ConfigContainer of every run (only checkpoint options differ)."""
    import torch
    import torch.nn.functional as F
    from megatron.bridge.models.gpt_provider import GPTModelProvider
    from megatron.bridge.training.config import (
        CheckpointConfig, ConfigContainer, DistributedDataParallelConfig, LoggerConfig, MockGPTDatasetConfig,
        OptimizerConfig, RNGConfig, SchedulerConfig, TokenizerConfig, TrainingConfig, ValidationConfig)

    model = GPTModelProvider(
        num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4, num_query_groups=2, kv_channels=32,
        normalization="RMSNorm", layernorm_epsilon=1e-6, activation_func=F.silu, gated_linear_unit=True,
        add_bias_linear=False, add_qkv_bias=False, qk_layernorm=True, position_embedding_type="rope",
        rotary_base=1_000_000, share_embeddings_and_output_weights=False, init_method_std=0.02,
        num_moe_experts=4, moe_ffn_hidden_size=64, moe_router_topk=2, moe_grouped_gemm=True,
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-3,
        moe_router_pre_softmax=False, moe_permute_fusion=False,
        hidden_dropout=0.0, attention_dropout=0.0, seq_length=SEQ, make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=1,
        context_parallel_size=1, sequence_parallel=False,
        bf16=False, fp16=False, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False, cross_entropy_loss_fusion=False,
    )
    return ConfigContainer(
        model=model,
        train=TrainingConfig(train_iters=ITERS, global_batch_size=4, micro_batch_size=2),
        validation=ValidationConfig(eval_interval=1000, eval_iters=1),
        optimizer=OptimizerConfig(optimizer="adam", bf16=False, fp16=False, lr=1e-2, min_lr=1e-3, weight_decay=0.01,
                                  adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0,
                                  use_distributed_optimizer=True),
        scheduler=SchedulerConfig(lr_decay_style="constant", lr_warmup_iters=0, lr_decay_iters=ITERS,
                                  start_weight_decay=0.01, end_weight_decay=0.01, weight_decay_incr_style="constant"),
        ddp=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False, overlap_param_gather=False,
                                          use_distributed_optimizer=True, check_for_nan_in_grad=True),
        dataset=MockGPTDatasetConfig(seq_length=SEQ, random_seed=SEED, reset_attention_mask=False,
                                     reset_position_ids=False, eod_mask_loss=False, num_dataset_builder_threads=1,
                                     data_sharding=True, dataloader_type="single", num_workers=1),
        logger=LoggerConfig(log_interval=1),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=VOCAB),
        checkpoint=CheckpointConfig(save=str(save), load=None, save_interval=SAVE_EVERY, ckpt_format="torch_dist",
                                    async_save=async_save, also_save_hf_checkpoint=also_hf, hf_source_path=hf_source),
        rng=RNGConfig(seed=SEED),
    )


def make_tokenizer(path: Path) -> None:
    """A word-level tokenizer of VOCAB tokens built offline: Bridge's ``also_save_hf_checkpoint``
    copies the HF source's tokenizer (AutoTokenizer), and our exports carry it too."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>").save_pretrained(str(path))


def read_tracker(save: Path):
    p = save / "latest_checkpointed_iteration.txt"
    return p.read_text().strip() if p.is_file() else None


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for d in ("torch", "transformers", "megatron-core", "megatron-bridge", "transformer-engine", "nvidia-resiliency-ext"):
        try:
            out[d] = md.version(d)
        except md.PackageNotFoundError:
            out[d] = None
    return out


# -- worker: one pretrain run --------------------------------------------------------------------
def run_worker(name: str, work: Path, hf_source: str | None) -> dict:
    from megatron.bridge.training import train as bridge_train
    from megatron.bridge.training.callbacks import Callback
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain

    async_save, who = RUNS[name]
    save = work / name / "ckpt"
    cfg = make_config(save, async_save, also_hf=who == "bridge", hf_source=hf_source)

    saves = []  # wall time of each checkpoint save on the training thread (Bridge's save_checkpoint_and_time)
    orig = bridge_train.save_checkpoint_and_time

    def timed(state, *a, **k):
        t0 = time.perf_counter()
        orig(state, *a, **k)
        saves.append({"step": int(state.train_state.step), "seconds": time.perf_counter() - t0})

    bridge_train.save_checkpoint_and_time = timed
    if async_save:
        _delay_async_finalize()

    fired = []  # when Bridge fired on_checkpoint_save, and for which checkpoint (the tracker)

    class Recorder(Callback):
        def on_checkpoint_save(self, context):
            fired.append({"live_step": int(context.state.train_state.step), "tracker": read_tracker(save)})

    cb = None
    callbacks = []
    if who == "ours":
        from nemo_export_hooks.integrations.megatron_bridge import HFExportBridgeCallback

        cb = HFExportBridgeCallback(arch="qwen3_moe", dtype="float32", async_write=True, tokenizer=str(work / "tokenizer"))
        callbacks.append(cb)
    callbacks.append(Recorder())
    t0 = time.perf_counter()
    pretrain(cfg, forward_step, callbacks=callbacks)
    return {
        "name": name, "async_save": async_save, "exporter": who, "train_wall_s": round(time.perf_counter() - t0, 2),
        "exports": list(cb.exports) if cb else [], "failed": cb.failed if cb else 0, "skipped": cb.skipped if cb else 0,
        "saves": saves, "fired": fired, "save_dir": str(save),
        "checkpoints": sorted(p.name for p in save.glob("iter_*") if p.is_dir()),
        "bridge_hf_dirs": sorted(str(p) for p in save.glob("iter_*/hf") if p.is_dir()) if who == "bridge" else [],
        "versions": versions(),
    }


def _delay_async_finalize() -> None:
    """Storage slower than one iteration (a real model's save): the loop's non-blocking finalize
    at the top of iteration N (right after scheduling the save of N) is skipped, so the save of N is
    finalized, and on_checkpoint_save fired, at a later iteration, against the live model of N+1.
    The blocking finalize at the end of training is untouched."""
    from megatron.bridge.training import checkpointing as ck

    cls = ck.DefaultCheckpointManager
    orig = cls.finalize_async_saves

    def finalize(self, state, blocking=False, terminate=False):
        if not blocking and int(state.train_state.step) % SAVE_EVERY == 0:
            return None
        return orig(self, state, blocking=blocking, terminate=terminate)

    cls.finalize_async_saves = finalize


# -- worker: the checks of (a) (b) (c) -------------------------------------------------------------
def _init_dist() -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.cuda.set_device(0)
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(SEED)


def _reload(ckpt: Path, work: Path):
    """iter_N loaded back by Bridge (``load_megatron_model``: model config from the checkpoint's
    run_config.yaml); if that fails, the run's own provider + Bridge's weight loader."""
    from megatron.bridge.training.model_load_save import load_megatron_model

    try:
        model, how = load_megatron_model(str(ckpt), skip_temp_dist_context=True), "load_megatron_model"
    except Exception as e:  # noqa: BLE001 - reported, then the second way
        from megatron.bridge.training.checkpointing import _load_model_weights_from_checkpoint

        how = f"provider + _load_model_weights_from_checkpoint (load_megatron_model failed: {type(e).__name__}: {str(e)[:300]})"
        cfg = make_config(work / "unused", False)
        cfg.model.vocab_size = VOCAB
        if hasattr(cfg.model, "finalize"):
            cfg.model.finalize()
        model = cfg.model.provide_distributed_model(wrap_with_ddp=False)
        _load_model_weights_from_checkpoint(str(ckpt), model)
    m = model[0] if isinstance(model, (list, tuple)) else model
    while hasattr(m, "module") and not hasattr(m, "decoder"):
        m = m.module
    return m.cuda().eval(), how


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _byte_diff(a: dict, b: dict) -> list[str]:
    import torch

    probs = [f"only in the callback's export: {k}" for k in sorted(set(a) - set(b))]
    probs += [f"only in the re-export: {k}" for k in sorted(set(b) - set(a))]
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            probs.append(f"{k}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
        elif not torch.equal(x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8)):
            probs.append(f"{k}: bytes differ (max |diff| {(x.float() - y.float()).abs().max().item():.3g})")
    return probs


def against_checkpoint(export: Path, ckpt: Path, work: Path, label: str):
    """Reload ``ckpt`` with Bridge, export it again (``<work>/reexport/<label>``), compare byte for
    byte with ``export``: (reloaded model, how it was reloaded, the export's tensors, differences).
    Also used by bridge_resume_smoke.py."""
    import torch

    from nemo_export_hooks import export_to_hf

    model, how = _reload(ckpt, work)
    ref = work / "reexport" / label
    export_to_hf(model, ref, arch="qwen3_moe", dtype=torch.float32)
    mine = _tensors(export)
    return model, how, mine, _byte_diff(mine, _tensors(ref))


def check_worker(work: Path) -> dict:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # NVIDIA_TF32_OVERRIDE=0 is set by the driver
    torch.backends.cudnn.allow_tf32 = False
    from transformers import AutoModelForCausalLM

    from nemo_export_hooks.publish import verify_export

    _init_dist()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=g).cuda()
    pos = torch.arange(SEQ, device="cuda").unsqueeze(0).expand(2, SEQ)
    rows = []
    for name in ("ours_sync", "ours_async"):
        res_path = work / f"{name}.json"
        if not res_path.is_file():
            rows.append({"run": name, "ok": False, "problems": [f"no result of run {name}"]})
            continue
        res = json.loads(res_path.read_text())
        prev = None
        for e in res["exports"]:
            n, path, ckpt = int(e["step"]), Path(e["path"]), Path(e["checkpoint"])
            row = {"run": name, "step": n, "path": str(path), "problems": []}
            p = row["problems"]
            try:
                if ckpt.name != f"iter_{n:07d}" or path != ckpt / "hf":
                    p.append(f"export {path} is not <save>/iter_{n:07d}/hf of checkpoint {ckpt}")
                p += [f"verify_export: {v}" for v in verify_export(path)]
                hf, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, output_loading_info=True)
                for k in ("missing_keys", "unexpected_keys", "mismatched_keys"):
                    if info.get(k):
                        p.append(f"transformers {k}: {sorted(map(str, info[k]))[:8]}")
                model, row["reload"], mine, diff = against_checkpoint(path, ckpt, work, f"{name}_{n}")
                row["tensors"], row["byte_equal"] = len(mine), not diff
                p += [f"bytes vs iter_{n} reloaded: {d}" for d in diff[:8]]
                if prev is not None:  # the comparison can fail: training moved the weights
                    changed = sum(not torch.equal(mine[k], prev[k]) for k in mine if k in prev)
                    row["tensors_changed_since_previous"] = changed
                    if changed == 0:
                        p.append("export equals the previous checkpoint's: weights did not move, the byte check proves nothing")
                prev = mine
                with torch.no_grad():
                    ml = model(ids, pos, attention_mask=None).float()
                    hl = hf.cuda().eval()(input_ids=ids).logits.float()
                row["max_logit_diff"] = float((ml - hl).abs().max())
                row["max_abs_logit"] = float(ml.abs().max())
                row["rel_logit_diff"] = row["max_logit_diff"] / max(row["max_abs_logit"], 1e-30)
                row["argmax_agree"] = float((ml.argmax(-1) == hl.argmax(-1)).float().mean())
                if not row["rel_logit_diff"] <= TOL_REL:
                    p.append(f"logits: max |Megatron - HF| {row['max_logit_diff']:.3g} = {row['rel_logit_diff']:.3g} "
                             f"of max |logit| {row['max_abs_logit']:.3g} > {TOL_REL} (TF32 off)")
                del model, hf
                torch.cuda.empty_cache()
            except Exception as ex:  # noqa: BLE001 - one export's failure is reported, the others still run
                p.append(f"{type(ex).__name__}: {ex}")
                row["traceback"] = traceback.format_exc()[-2000:]
            row["ok"] = not p
            rows.append(row)
    return {"name": "check", "rows": rows, "tolerance": TOL}


# -- driver ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(name: str, work: Path, out: Path, timeout: float, extra: list[str], argv: list[str] | None = None,
           tf32_off: bool | None = None, log_prefix: str = "bridge") -> dict:
    """One worker process (``argv``: the script and its arguments; default this script's
    ``--worker name``), killed with its session at ``timeout``; returns ``<work>/<name>.json`` with
    rc, wall time and, on a failure, the log's tail.  Also used by bridge_resume_smoke.py."""
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if name == "check" if tf32_off is None else tf32_off:  # true fp32 GEMMs (cuBLAS reads this at load)
        env["NVIDIA_TF32_OVERRIDE"] = "0"
    log = out / f"{log_prefix}_{name}.log"
    t0 = time.perf_counter()
    argv = argv or [__file__, "--worker", name, "--work", str(work)]
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, *argv, *extra],
                                stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=str(ROOT))
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
        try:  # what the run left behind in its session (an async-save worker) goes with it
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    res_path = work / f"{name}.json"
    res = json.loads(res_path.read_text()) if res_path.is_file() else {"name": name}
    res.update(rc=rc, process_wall_s=round(time.perf_counter() - t0, 1), log=str(log))
    if rc != 0 and "error" not in res:
        res["error"] = f"exit {rc}; log tail:\n" + "".join(log.read_text(errors="replace").splitlines(True)[-40:])
    return res


def _hf_reference(work: Path, sync: dict) -> str | None:
    """A copy of our first sync export (config.json, weights, tokenizer) as Bridge's HF source."""
    if not sync.get("exports"):
        return None
    ref = work / "hf_reference"
    shutil.rmtree(ref, ignore_errors=True)
    shutil.copytree(sync["exports"][0]["path"], ref, symlinks=True)
    for f in (work / "tokenizer").iterdir():
        if not (ref / f.name).exists():
            shutil.copy2(f, ref / f.name)
    return str(ref)


def timing_table(res: dict) -> list[str]:
    """Per checkpoint iteration: save time on the training thread per run, our callback's
    training-thread wait, and Bridge's extra time for also_save_hf_checkpoint (vs the baseline)."""
    def by_step(rows, key="seconds"):
        return {int(r["step"]): r[key] for r in rows or []}

    saves = {k: by_step(res.get(k, {}).get("saves")) for k in RUNS}
    block = {k: by_step(res.get(k, {}).get("exports"), "blocking_seconds") for k in ("ours_sync", "ours_async")}
    steps = sorted(set().union(*saves.values(), *block.values()))
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["iter | save s: baseline  ours_sync  ours_async  bridge_hf | ours wait s: sync  async | bridge_hf extra s",
             "-----+--------------------------------------------------+------------------------+------------------"]
    for n in steps:
        b, h = saves["baseline"].get(n), saves["bridge_hf"].get(n)
        lines.append(f"{n:4d} | {f(b):>16} {f(saves['ours_sync'].get(n)):>10} {f(saves['ours_async'].get(n)):>11} "
                     f"{f(h):>10} | {f(block['ours_sync'].get(n)):>16} {f(block['ours_async'].get(n)):>6} | "
                     f"{f(None if b is None or h is None else h - b):>17}")
    return lines


def prepare_run(args, default_out: str) -> tuple[Path, Path, float]:
    """A driver's start: ``$OUT`` (or ``default_out``), a fresh ``--work`` holding the tokenizer,
    and the deadline of ``--budget``.  Also used by bridge_resume_smoke.py."""
    out = Path(os.environ.get("OUT") or default_out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    deadline = time.perf_counter() + args.budget
    make_tokenizer(work / "tokenizer")
    return out, work, deadline


def driver(args) -> int:
    out, work, deadline = prepare_run(args, "/tmp/bridge_smoke_out")
    res, problems = {}, []
    for name in ORDER:
        left = deadline - time.perf_counter()
        if left < 30:
            res[name] = {"name": name, "error": f"not run: {args.budget} s budget spent"}
            problems.append(f"{name}: not run (time)")
            continue
        extra = []
        if name == "bridge_hf":
            src = _hf_reference(work, res.get("ours_sync", {}))
            if src is None:
                res[name] = {"name": name, "error": "no export of ours_sync to serve as HF source"}
                problems.append("bridge_hf: no HF source")
                continue
            extra = ["--hf-source", src]
        res[name] = _spawn(name, work, out, min(left, args.run_timeout), extra)
        print(f"bridge_smoke: {name}: rc={res[name]['rc']} in {res[name]['process_wall_s']} s", flush=True)
        if res[name].get("error"):
            problems.append(f"{name}: {res[name]['error'][:2000]}")
    # expectations on the runs themselves
    for name in ("ours_sync", "ours_async"):
        r = res.get(name, {})
        if "exports" in r:
            want = [int(c.split("_")[1]) for c in r.get("checkpoints", [])]
            got = sorted(int(e["step"]) for e in r["exports"])
            if not want or got != want:
                problems.append(f"{name}: exports for iterations {got}, checkpoints {want}")
            if r.get("failed") or r.get("skipped"):
                problems.append(f"{name}: failed={r.get('failed')} skipped={r.get('skipped')}")
    late = [f for f in res.get("ours_async", {}).get("fired", []) if str(f.get("live_step")) != str(f.get("tracker"))]
    res["async_fired_late"] = late  # the case the byte check is about: the event came after training moved on
    if "fired" in res.get("ours_async", {}) and not late:
        problems.append("ours_async: on_checkpoint_save never fired after training moved on: the late case was not exercised")
    checked = {(r["run"], r.get("step")) for r in res.get("check", {}).get("rows", [])}
    for name in ("ours_sync", "ours_async"):
        missing = [int(e["step"]) for e in res.get(name, {}).get("exports", []) if (name, int(e["step"])) not in checked]
        if missing:
            problems.append(f"check: exports of {name} for iterations {missing} were not checked")
    for row in res.get("check", {}).get("rows", []):
        problems += [f"{row['run']} iter {row.get('step')}: {p}" for p in row.get("problems", [])]
    if "bridge_hf" in res and "saves" in res["bridge_hf"] and not res["bridge_hf"].get("bridge_hf_dirs"):
        problems.append("bridge_hf: no iter_*/hf written by also_save_hf_checkpoint")
    print("\n== checks (a) verify + transformers load, (b) bytes vs checkpoint reloaded, (c) logits, "
          "max |diff| <= %g of max |logit|, TF32 off" % TOL_REL)
    for row in res.get("check", {}).get("rows", []):
        print(f"{row['run']:>10} iter {row.get('step')}: ok={row['ok']} tensors={row.get('tensors')} "
              f"byte_equal={row.get('byte_equal')} changed_vs_prev={row.get('tensors_changed_since_previous')} "
              f"max_logit_diff={row.get('max_logit_diff')} rel={row.get('rel_logit_diff')} "
              f"argmax_agree={row.get('argmax_agree')} reload={str(row.get('reload'))[:60]}")
    print(f"async_save: on_checkpoint_save fired after training moved on for {len(late)} checkpoint(s): {late}")
    print("\n== (d) training-thread time per checkpoint save")
    print("\n".join(timing_table(res)))
    res["problems"] = problems
    res["ok"] = not problems
    write_json(out / "bridge_smoke.json", res)
    print("\n".join(["", "PROBLEMS:"] + problems) if problems else "\nALL CHECKS PASSED")
    line = {"ok": res["ok"], "problems": len(problems), "versions": res.get("ours_sync", {}).get("versions"),
            "checks": [(r["run"], r.get("step"), r["ok"], r.get("max_logit_diff"), r.get("rel_logit_diff")) for r in res.get("check", {}).get("rows", [])]}
    print("BRIDGE-SMOKE " + json.dumps(line, default=str), flush=True)
    return 0 if res["ok"] else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=[*RUNS, "check"])
    ap.add_argument("--work", default="/tmp/bridge_smoke")
    ap.add_argument("--hf-source")
    ap.add_argument("--budget", type=float, default=float(os.environ.get("BRIDGE_SMOKE_BUDGET", 480)),
                    help="seconds for all runs together")
    ap.add_argument("--run-timeout", type=float, default=200)
    args = ap.parse_args()
    if not args.worker:
        return driver(args)
    work = Path(args.work)
    try:
        res = check_worker(work) if args.worker == "check" else run_worker(args.worker, work, args.hf_source)
    except BaseException as e:  # noqa: BLE001 - the driver reads the reason from the result file
        res = {"name": args.worker, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}
    write_json(work / f"{args.worker}.json", res)
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, default=str)[:4000], flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # do not wait for Bridge's/NCCL's threads or the async-save worker (the NeMo smoke hung at exit)


if __name__ == "__main__":
    sys.exit(main())
