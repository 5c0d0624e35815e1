"""NeMo 2 smoke run of the HF export hook, through the recipe itself (not a pytest module).

    PYTHONPATH=/root/site:/root/nemo_site:$PWD python3 tests/gpu/nemo_smoke.py [--set key=value ...]

``recipes/pretrain_qwen3_moe.py``'s ``compose`` + ``run`` with ``hf_export.enabled=true`` and
overrides for a tiny Qwen3-MoE (2 layers, hidden 128, 4 experts, vocab 256), MockDataModule,
6 steps, NeMo ``ModelCheckpoint`` every 3 steps, 1 GPU: ``nl.Trainer`` + ``nl.MegatronStrategy``
+ ``llm.pretrain``.  Then, for every export: it lies beside its checkpoint
(``<ckpt dir>/hf/<ckpt name>``), ``verify_export(path) == []``, and ``transformers``
``AutoModelForCausalLM.from_pretrained`` loads it with no missing/unexpected/mismatched keys and
gives finite logits on the GPU.  Prints ``NEMO-SMOKE-STAGE ...`` lines as it goes and one final
``NEMO-SMOKE {json}`` line (also ``$OUT/nemo_smoke.json``); exits 0 only on success.  Without
CUDA it builds everything but the trainer and stops there (exit 3).

Compatibility shims (this script only; see scripts/nemo_gpu/README.md):
  * megatron-core 0.16 removed ``no_weight_decay_cond``, ``scale_lr_cond``, ``lr_mult`` (and
    ``default_skip_embedding_weight_decay``) from ``get_megatron_optimizer``; NeMo 2.7.3's
    ``setup_megatron_optimizer`` still passes them.  The shim drops them when they hold their
    defaults (None, None, 1.0, False: then 0.16's default ``config_overrides=None`` gives the
    same groups, no weight decay on biases and 1-D params) and refuses anything else.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

T0 = time.perf_counter()
RESULT: dict = {"ok": False, "stage": "start", "shims": [], "workarounds": [], "errors": []}

TINY = [
    "trainer.devices=1",
    "trainer.max_steps=6",
    "trainer.log_every_n_steps=1",
    "trainer.val_check_interval=6",
    "trainer.limit_val_batches=0",
    "parallel.expert_model_parallel_size=1",
    "checkpoint.every_n_train_steps=3",
    "checkpoint.save_top_k=-1",
    "optim.warmup_steps=1",
    "resume.resume_if_exists=false",
    "model.num_layers=2",
    "model.hidden_size=128",
    "model.ffn_hidden_size=256",
    "model.moe_ffn_hidden_size=64",
    "model.num_moe_experts=4",
    "model.moe_router_topk=2",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.kv_channels=32",
    "model.vocab_size=256",
    "data.kind=mock",
    "data.seq_length=64",
    "data.global_batch_size=4",
    "data.micro_batch_size=2",
    "hf_export.enabled=true",
    "hf_export.on_busy=wait",
]


def stage(name: str, msg: str = "") -> None:
    RESULT["stage"] = name
    print(f"NEMO-SMOKE-STAGE {name} t={time.perf_counter() - T0:.1f}s {msg}".rstrip(), flush=True)


def finish(code: int) -> None:
    RESULT["seconds"] = round(time.perf_counter() - T0, 1)
    line = json.dumps(RESULT, sort_keys=True, default=str)
    out = os.environ.get("OUT")
    if out:
        try:
            Path(out, "nemo_smoke.json").write_text(json.dumps(RESULT, indent=1, sort_keys=True, default=str))
        except OSError:
            pass
    print("NEMO-SMOKE " + line, flush=True)
    sys.stdout.flush()
    # NeMo/Megatron leave non-daemon threads and process groups behind; don't hang on them.
    os._exit(code)


# -- compatibility shims ------------------------------------------------------------------------
_OPT_DEFAULTS = {"no_weight_decay_cond": None, "scale_lr_cond": None, "lr_mult": 1.0, "default_skip_embedding_weight_decay": False}
SHIM_CALLS: list = []


def install_mcore016_optimizer_shim() -> None:
    """megatron-core >= 0.16: translate NeMo 2.7.3's get_megatron_optimizer call (see module doc)."""
    import megatron.core.optimizer as mo

    orig = mo.get_megatron_optimizer
    if getattr(orig, "_nemo_smoke_shim", False):
        return
    params = inspect.signature(orig).parameters
    gone = [k for k in _OPT_DEFAULTS if k not in params]
    if not gone:
        RESULT["shims"].append("get_megatron_optimizer: not needed (signature has no_weight_decay_cond)")
        return

    @functools.wraps(orig)
    def get_megatron_optimizer(config, model_chunks, *args, **kwargs):
        if args:
            raise TypeError("nemo_smoke shim: pass get_megatron_optimizer's optional arguments by keyword")
        dropped = []
        for k in gone:
            if k in kwargs:
                v = kwargs.pop(k)
                if v != _OPT_DEFAULTS[k]:
                    raise NotImplementedError(
                        f"nemo_smoke shim: {k}={v!r} has no megatron-core {_mcore_version()} equivalent here "
                        "(use config_overrides); only the default can be dropped"
                    )
                dropped.append(k)
        SHIM_CALLS.append(dropped)
        return orig(config, model_chunks, **kwargs)

    get_megatron_optimizer._nemo_smoke_shim = True
    mo.get_megatron_optimizer = get_megatron_optimizer
    # modules that bound the name at import time (NeMo 2's path imports it inside the function)
    for name in ("nemo.core.classes.modelPT", "nemo.lightning._strategy_lib"):
        m = sys.modules.get(name)
        if m is not None and getattr(m, "get_megatron_optimizer", None) is orig:
            m.get_megatron_optimizer = get_megatron_optimizer
    RESULT["shims"].append(f"get_megatron_optimizer: drops default-valued {gone} (megatron-core {_mcore_version()})")


def _mcore_version() -> str:
    try:
        from importlib.metadata import version

        return version("megatron-core")
    except Exception:
        return "?"


def versions() -> dict:
    from importlib.metadata import version

    v = {"python": sys.version.split()[0]}
    for dist in ("torch", "transformers", "lightning", "megatron-core", "nemo-toolkit", "transformer-engine",
                 "transformer-engine-cu13", "nvidia-modelopt", "numpy", "pandas", "datasets", "huggingface-hub"):
        try:
            v[dist] = version(dist)
        except Exception:
            v[dist] = None
    try:
        import torch

        v["cuda"] = torch.version.cuda
        v["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        pass
    try:
        import lightning

        v["lightning_file"] = lightning.__file__
    except Exception:
        pass
    return v


# -- verification -------------------------------------------------------------------------------
def check_exports(cfg, export_cb) -> bool:
    import torch
    from transformers import AutoModelForCausalLM

    from nemo_export_hooks.publish import verify_export

    ckpt_dir = Path(cfg.log_dir) / cfg.name / "checkpoints"
    RESULT["checkpoint_dir"] = str(ckpt_dir)
    ckpts = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name != "hf") if ckpt_dir.is_dir() else []
    RESULT["checkpoints"] = ckpts
    hf_dir = ckpt_dir / "hf"
    RESULT["hf_dir_listing"] = sorted(p.name for p in hf_dir.iterdir()) if hf_dir.is_dir() else None
    exports = list(getattr(export_cb, "exports", [])) if export_cb is not None else []
    RESULT["export_failed"] = getattr(export_cb, "failed", None)
    RESULT["steps_exported"] = sorted(e["step"] for e in exports)
    RESULT["exports"] = [{k: e.get(k) for k in ("step", "trigger", "path", "checkpoint", "bytes", "num_tensors", "seconds", "blocking_seconds")}
                         for e in exports]
    ok = True
    problems: list = []
    if not exports:
        problems.append("no export was made")
    if export_cb is not None and export_cb.failed:
        problems.append(f"{export_cb.failed} export(s) failed")
    # one export per training checkpoint step (3 and 6), each next to its checkpoint
    if RESULT["steps_exported"] != [3, 6]:
        problems.append(f"steps exported {RESULT['steps_exported']} != [3, 6]")
    for e in exports:
        p = Path(e["path"])
        ck = e.get("checkpoint")
        if not p.is_dir():
            problems.append(f"export {p} missing")
        if ck is None:
            problems.append(f"export of step {e['step']} was not made for a checkpoint ({e['trigger']})")
        else:
            ckp = Path(ck)
            ck_name = ckp.name[: -len(".ckpt")] if ckp.name.endswith(".ckpt") else ckp.name
            want = ckp.parent / "hf" / ck_name
            if p != want:
                problems.append(f"export {p} is not beside its checkpoint (expected {want})")
            if not (ckp.parent / ck_name).exists():
                problems.append(f"checkpoint {ckp.parent / ck_name} of export {p} does not exist")
    non_last = [c for c in ckpts if not c.endswith("-last")]
    for c in non_last:
        if not (hf_dir / c).is_dir():
            problems.append(f"checkpoint {c} has no export at {hf_dir / c}")

    verify = {}
    loads = {}
    for e in exports:
        p = e["path"]
        try:
            verify[p] = verify_export(p)
        except Exception as ex:
            verify[p] = [f"verify_export raised {type(ex).__name__}: {ex}"]
        try:
            try:
                model, info = AutoModelForCausalLM.from_pretrained(p, dtype=torch.bfloat16, output_loading_info=True)
            except TypeError:
                model, info = AutoModelForCausalLM.from_pretrained(p, torch_dtype=torch.bfloat16, output_loading_info=True)
            lp = {k: sorted(map(str, info.get(k) or [])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
            model = model.cuda().eval()
            vocab = model.config.vocab_size
            ids = torch.randint(0, min(vocab, int(cfg.model.vocab_size)), (2, 32), device="cuda", generator=None)
            with torch.no_grad():
                logits = model(input_ids=ids).logits.float()
            finite = bool(torch.isfinite(logits).all().item())
            loads[p] = {"problems": lp, "finite": finite, "logits_shape": list(logits.shape), "logit_std": float(logits.std().item()),
                        "model_type": model.config.model_type, "class": type(model).__name__,
                        "params": sum(t.numel() for t in model.parameters())}
            if lp or not finite:
                problems.append(f"load of {p}: problems {lp}, finite logits {finite}")
            del model
        except Exception as ex:
            loads[p] = {"error": f"{type(ex).__name__}: {ex}"}
            problems.append(f"load of {p} raised {type(ex).__name__}: {ex}")
    RESULT["verify_export"] = verify
    RESULT["load"] = loads
    RESULT["load_problems"] = {p: v.get("problems") or v.get("error") for p, v in loads.items() if v.get("problems") or v.get("error")}
    for p, v in verify.items():
        if v:
            problems.append(f"verify_export({p}) = {v}")
    RESULT["problems"] = problems
    ok = not problems
    return ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra Hydra overrides (after the smoke's own)")
    ap.add_argument("--log-dir", default=None, help="default: a fresh temporary directory")
    args = ap.parse_args()

    stage("imports")
    import torch

    import megatron.core  # noqa: F401

    install_mcore016_optimizer_shim()  # before NeMo binds anything
    from nemo import lightning as nl  # noqa: F401
    from nemo.collections import llm  # noqa: F401

    install_mcore016_optimizer_shim()  # idempotent; re-binds modules NeMo loaded meanwhile
    if not hasattr(llm, "pretrain"):
        raise RuntimeError("nemo.collections.llm has no pretrain (llm.api failed to import; see the NeMo warnings above)")
    RESULT["versions"] = versions()
    stage("imports-ok", json.dumps(RESULT["versions"], default=str))

    stage("compose")
    from recipes import common
    from recipes import pretrain_qwen3_moe as r

    log_dir = args.log_dir or tempfile.mkdtemp(prefix="nemo_smoke_")
    overrides = TINY + [f"log_dir={log_dir}"]
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # CPU dry run only: Qwen3MoEConfig's moe_permute_fusion=True needs TE at config time
        overrides.append("+model.moe_permute_fusion=false")
        RESULT["workarounds"].append(f"no Transformer Engine ({type(e).__name__}): model.moe_permute_fusion=false")
    overrides += list(args.set)
    cfg = r.compose(overrides)
    RESULT["overrides"] = overrides
    RESULT["log_dir"] = log_dir

    # the recipe's callback list: record what it builds (same objects, same order)
    made: list = []
    orig_cbs = common.callbacks_from_cfg

    @functools.wraps(orig_cbs)
    def callbacks_from_cfg(*a, **kw):
        cbs = orig_cbs(*a, **kw)
        made.extend(cbs)
        return cbs

    common.callbacks_from_cfg = callbacks_from_cfg

    stage("build-parts", "model config, data, optimizer, logger, resume, strategy, callbacks (no trainer)")
    mcfg = r.model_config(cfg)
    data = r.build_data(cfg)
    RESULT["data_vocab"] = getattr(data.tokenizer, "vocab_size", None)
    common.build_optim(cfg)
    common.build_log(cfg)
    common.build_resume(cfg)
    common.build_strategy(cfg)
    cbs = orig_cbs(cfg)
    RESULT["callbacks"] = [type(c).__name__ for c in cbs]
    RESULT["model_config"] = {k: getattr(mcfg, k, None) for k in ("num_layers", "hidden_size", "num_moe_experts", "moe_router_topk",
                                                                  "moe_grouped_gemm", "vocab_size", "qk_layernorm", "seq_length")}
    assert RESULT["callbacks"] == ["HFExportCallback"], RESULT["callbacks"]
    stage("build-parts-ok", json.dumps(RESULT["model_config"], default=str))

    if not torch.cuda.is_available():
        stage("needs-cuda", "stopping at the first CUDA requirement: recipes.common.build_trainer -> nl.Trainer(accelerator='gpu') "
              "+ MegatronStrategy, then llm.pretrain (Megatron's optimizer and TE are CUDA-only)")
        RESULT["errors"].append("no CUDA: stopped before nl.Trainer")
        finish(3)

    stage("train", f"llm.pretrain via recipes.pretrain_qwen3_moe.run, log_dir={log_dir}")
    t = time.perf_counter()
    r.run(cfg)
    RESULT["train_seconds"] = round(time.perf_counter() - t, 1)
    RESULT["shim_calls"] = SHIM_CALLS
    export_cb = next((c for c in made if type(c).__name__ == "HFExportCallback"), None)
    if export_cb is None:
        raise RuntimeError("the recipe built no HFExportCallback")
    stage("train-ok", f"{RESULT['train_seconds']} s; exports {[e['step'] for e in export_cb.exports]}")

    stage("verify")
    ok = check_exports(cfg, export_cb)
    RESULT["ok"] = ok
    stage("done", "OK" if ok else f"FAILED: {RESULT['problems']}")
    finish(0 if ok else 1)


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001
        traceback.print_exc()
        RESULT["errors"].append(f"{type(e).__name__}: {e}")
        RESULT["traceback_tail"] = traceback.format_exc()[-3000:]
        RESULT["shim_calls"] = SHIM_CALLS
        finish(1)
