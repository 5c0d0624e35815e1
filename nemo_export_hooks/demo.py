"""CPU demo: ``python -m nemo_export_hooks.demo --out DIR``.

Trains a tiny Qwen3-MoE-style Megatron-Core model for a few dozen steps on synthetic data
with a plain Lightning ``Trainer``, :class:`~nemo_export_hooks.callback.HFExportCallback`
(async export every N steps and on every checkpoint) and Lightning's ``ModelCheckpoint``;
then loads the newest export with ``transformers`` (no reference HF model anywhere), runs it
on the same tokens as the Megatron model and prints the largest logit difference and a
one-screen summary.  The export is float32 so the comparison is exact up to rounding.

Exit status: 0 when at least one export was made, the newest one holds the final step,
verifies against its manifest and its logits match (max |diff| <= 1e-4); 1 otherwise.
The same callback and exporter run on GPUs; only the model size and the trainer differ.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

TOLERANCE = 1e-4
_MARKER = ".nemo_export_hooks_demo"

log = logging.getLogger("nemo_export_hooks")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nemo_export_hooks.demo",
        description="Train a tiny Megatron-Core Qwen3-MoE on CPU with HF exports beside every checkpoint, "
        "then check the newest export with transformers.",
    )
    p.add_argument("--out", required=True, help="output directory (created; an earlier demo run there is replaced)")
    p.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    p.add_argument("--every", type=int, default=10, help="export every N steps (default 10)")
    p.add_argument("--ckpt-every", type=int, default=15, help="ModelCheckpoint every N steps; each gets an export beside it (default 15)")
    p.add_argument("--sync", action="store_true", help="write exports on the training thread (default: async)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: min(4, cores))")
    p.add_argument("--quiet", action="store_true", help="only the summary")
    return p


def _prepare_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise SystemExit(f"--out {out} exists and is not a directory")
        if any(out.iterdir()):
            if not (out / _MARKER).exists():
                raise SystemExit(f"--out {out} is not empty and not an earlier demo run; choose another directory")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text("created by python -m nemo_export_hooks.demo\n")


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    for name in ("lightning", "lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric", "megatron"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def max_logit_diff(export_dir: Path, megatron_model, vocab_size: int) -> tuple[float, str]:
    """Load ``export_dir`` with transformers and compare logits with the Megatron model."""
    import torch
    from transformers import AutoModelForCausalLM

    from .testing.cpu import megatron_logits

    hf = AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size, (2, 16), generator=g)
    ref = megatron_logits(megatron_model, tokens)
    with torch.no_grad():
        got = hf(input_ids=tokens).logits.float()
    return (got - ref).abs().max().item(), type(hf).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _setup_logging(args.quiet)
    out = Path(args.out).absolute()
    _prepare_out(out)

    import torch

    from .extras import require

    for extra, module in (("megatron", "megatron.core"), ("hf", "transformers"), ("lightning", "lightning.pytorch")):
        require(extra, module, "python -m nemo_export_hooks.demo")
    torch.set_num_threads(args.threads or max(1, min(4, os.cpu_count() or 1)))
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from .callback import HFExportCallback
    from .store.manifest import read_manifest
    from .verify import verify_export
    from .testing.cpu import TinySpec, init_single_process
    from .testing.lightning import TinyMegatronLM

    init_single_process()
    spec = TinySpec()  # 2 layers, 4 experts top-2, GQA, QK-norm: Qwen3-MoE-like
    model = TinyMegatronLM(spec, seq_len=32, batch_size=4)
    ckpt_dir = out / "checkpoints"
    export_cb = HFExportCallback(
        # without ModelCheckpoint there is no checkpoint directory to sit beside
        dirpath=None if args.ckpt_every else str(ckpt_dir),
        arch="qwen3_moe",
        dtype="float32",
        on_checkpoint_save=True,
        every_n_train_steps=args.every or None,
        at_train_end=True,
        async_write=not args.sync,
        # Steps here take milliseconds, far less than an export: wait rather than skip so
        # every checkpoint gets its export (with real models the default, skip, rarely fires).
        on_busy="wait",
    )
    callbacks = [export_cb]
    if args.ckpt_every:
        callbacks.append(ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=args.ckpt_every, save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        logger=CSVLogger(str(out), name="logs", version=0),
        callbacks=callbacks,
        enable_checkpointing=bool(args.ckpt_every),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=5,
        default_root_dir=str(out),
    )
    t0 = time.perf_counter()
    trainer.fit(model)
    train_s = time.perf_counter() - t0
    loss = trainer.callback_metrics.get("train_loss")

    problems: list[str] = []
    exports = export_cb.exports
    if not exports:
        problems.append("no export was made")
    diff, hf_class, newest = float("nan"), "-", None
    if exports:
        newest = Path(exports[-1]["path"])
        latest = newest.parent / "latest"
        if latest.exists() and latest.resolve() != newest.resolve():
            problems.append(f"{latest} does not point at the newest export {newest}")
        m = read_manifest(newest) or {}
        if m.get("step") != trainer.global_step:
            problems.append(f"newest export holds step {m.get('step')}, training ended at step {trainer.global_step}")
        for e in exports:
            if Path(e["path"]).exists():
                for p in verify_export(e["path"]):
                    problems.append(f"{e['path']}: {p}")
        diff, hf_class = max_logit_diff(newest, model.module, spec.vocab_size)
        if not diff <= TOLERANCE:
            problems.append(f"max |logit diff| {diff:.3g} > {TOLERANCE:g}")
    leftovers = [str(p) for p in out.rglob(".*") if p.is_dir()]
    if leftovers:
        problems.append(f"staging leftovers: {leftovers}")

    def rel(p) -> str:
        try:
            return str(Path(p).relative_to(out))
        except ValueError:
            return str(p)

    w = 34
    lines = [
        "",
        "nemo-export-hooks CPU demo: tiny Qwen3-MoE (Megatron-Core, %d layers, %d experts top-%d, hidden %d)"
        % (spec.num_layers, spec.num_experts, spec.moe_router_topk, spec.hidden_size),
        "  %d steps; HF export (%s, float32) every %s steps and beside every checkpoint (ModelCheckpoint every %s steps)"
        % (args.steps, "sync" if args.sync else "async", args.every or "-", args.ckpt_every or "-"),
        "",
        f"  {'step':>5}  {'trigger':<20} {'export':<{w}} {'MB':>7} {'s':>6} {'blocked ms':>10}",
    ]
    for e in exports:
        lines.append(
            f"  {e['step']:>5}  {e['trigger']:<20} {rel(e['path']):<{w}} {e['bytes'] / 1e6:>7.3f} {e['seconds']:>6.2f} {e['blocking_seconds'] * 1e3:>10.1f}"
        )
    total_mb = sum(e["bytes"] for e in exports) / 1e6
    ckpts = sorted(p.name for p in ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    lines += [
        "",
        f"  exports: {len(exports)} made ({total_mb:.2f} MB, {sum(e['seconds'] for e in exports):.2f} s writing, "
        f"{sum(e['blocking_seconds'] for e in exports) * 1e3:.0f} ms blocking training), "
        f"{export_cb.skipped} skipped, {export_cb.failed} failed; training checkpoints: {len(ckpts)}",
        f"  training: {trainer.global_step} steps in {train_s:.1f} s, final loss {float(loss):.3f}" if loss is not None else
        f"  training: {trainer.global_step} steps in {train_s:.1f} s",
    ]
    if newest is not None:
        lines += [
            f"  newest export: {rel(newest)} (step {trainer.global_step}), files verified against its manifest",
            f"  transformers {hf_class} vs Megatron-Core on the same 2x16 tokens: max |logit diff| = {diff:.2e} (limit {TOLERANCE:g})",
        ]
    lines.append(f"  total {time.perf_counter() - t_start:.1f} s; output in {out}")
    lines.append("  RESULT: " + ("OK" if not problems else "FAILED: " + "; ".join(problems)))
    print("\n".join(lines), flush=True)
    return 0 if not problems else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
