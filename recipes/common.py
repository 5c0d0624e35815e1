"""Builders shared by the NeMo 2 recipes: Hydra config (``conf/``) -> NeMo objects.

The recipe configs (``conf/<recipe>.yaml``) take the ``hf_export`` group from the installed
package (``hydra.searchpath: [pkg://nemo_export_hooks.conf]``), as a recipe of your own does.

The trainer side (strategy, trainer, checkpointing, logger, resume, optimizer) needs only
``nemo.lightning`` and Megatron-Core; the model and data builders import
``nemo.collections.llm`` lazily.  Nothing here starts training: ``build_*`` only construct
objects, so configs can be checked on a CPU machine; ``llm.pretrain`` / ``llm.finetune``
(in each recipe's ``run``) need GPUs (Megatron's optimizer is CUDA-only).

The HF export hook is one line: ``callbacks=callbacks_from_cfg(cfg)`` gives
``[HFExportCallback]`` when ``hf_export.enabled=true`` and ``[]`` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from nemo_export_hooks.callback import callbacks_from_cfg
from nemo_export_hooks.conf import GROUP

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

__all__ = [
    "CONF_DIR",
    "compose",
    "Recipe",
    "build_strategy",
    "build_checkpoint",
    "build_trainer",
    "build_log",
    "build_resume",
    "build_optim",
    "build_tokenizer",
    "callbacks_from_cfg",
]


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The recipe's config as Hydra composes it from ``conf/`` (for Python use and tests);
    ``hf_export/<option>`` composes that option of the packaged group on its own."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir, initialize_config_module

    if config_name.startswith(GROUP + "/"):
        init = initialize_config_module(config_module="nemo_export_hooks.conf", version_base=None)
    else:
        init = initialize_config_dir(config_dir=str(CONF_DIR), version_base=None)
    with init:
        return hydra_compose(config_name=config_name, overrides=list(overrides))


@dataclass
class Recipe:
    """What ``llm.pretrain`` / ``llm.finetune`` take."""

    model: Any
    data: Any
    trainer: Any
    log: Any
    resume: Any
    optim: Any

    def kwargs(self) -> dict:
        return dict(model=self.model, data=self.data, trainer=self.trainer, log=self.log, resume=self.resume, optim=self.optim)


def build_strategy(cfg: DictConfig):
    import torch
    from megatron.core.distributed import DistributedDataParallelConfig
    from nemo import lightning as nl

    p = cfg.parallel
    return nl.MegatronStrategy(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        pipeline_dtype=torch.bfloat16 if p.pipeline_model_parallel_size > 1 else None,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size,
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel,
        gradient_as_bucket_view=True,
        ckpt_async_save=cfg.checkpoint.async_save,
        ckpt_parallel_save=True,
        ddp=DistributedDataParallelConfig(
            check_for_nan_in_grad=True,
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=True,
            overlap_param_gather=True,
            average_in_collective=True,
        ),
    )


def build_checkpoint(cfg: DictConfig):
    from nemo import lightning as nl

    c = cfg.checkpoint
    return nl.ModelCheckpoint(
        every_n_train_steps=c.every_n_train_steps,
        save_top_k=c.save_top_k,
        save_last=c.save_last,
        monitor=c.monitor,
        save_optim_on_train_end=True,
        filename="{model_name}--{%s:.4f}-{step}-{consumed_samples}" % c.monitor,
    )


def build_trainer(cfg: DictConfig, callbacks: Optional[list] = None, tokenizer: Any = None):
    """``nl.Trainer`` with MegatronStrategy and the HF export callback when enabled.
    NeMo's ``ModelCheckpoint`` is attached by the ``NeMoLogger`` (``build_log``)."""
    from nemo import lightning as nl

    t = cfg.trainer
    cbs = list(callbacks or []) + callbacks_from_cfg(cfg, tokenizer=tokenizer)
    return nl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        max_steps=t.max_steps,
        strategy=build_strategy(cfg),
        plugins=nl.MegatronMixedPrecision(precision=t.precision),
        callbacks=cbs,
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_check_interval,
        limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        enable_checkpointing=True,
        enable_progress_bar=False,
    )


def build_log(cfg: DictConfig):
    from nemo import lightning as nl

    return nl.NeMoLogger(log_dir=cfg.log_dir, name=cfg.name, ckpt=build_checkpoint(cfg), use_datetime_version=False)


def build_resume(cfg: DictConfig, restore_from: Optional[str] = None):
    from nemo import lightning as nl

    r = cfg.resume
    restore = nl.RestoreConfig(path=str(restore_from)) if restore_from else None
    return nl.AutoResume(
        resume_if_exists=r.resume_if_exists,
        resume_ignore_no_checkpoint=r.resume_ignore_no_checkpoint,
        restore_config=restore,
    )


def build_optim(cfg: DictConfig):
    from megatron.core.optimizer import OptimizerConfig
    from nemo.lightning.pytorch.optim import CosineAnnealingScheduler, MegatronOptimizerModule

    o = cfg.optim
    bf16 = "bf16" in str(cfg.trainer.precision)
    return MegatronOptimizerModule(
        config=OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=0.9,
            adam_beta2=0.95,
            clip_grad=o.clip_grad,
            bf16=bf16,
            fp16=not bf16 and "16" in str(cfg.trainer.precision),
            use_distributed_optimizer=True,
        ),
        lr_scheduler=CosineAnnealingScheduler(warmup_steps=o.warmup_steps, constant_steps=0, max_steps=cfg.trainer.max_steps, min_lr=o.min_lr),
    )


def build_tokenizer(name_or_path: Optional[str], vocab_size: Optional[int] = None):
    """A HF tokenizer (NeMo's wrapper) by name or directory, or NeMo's NullTokenizer whose ids
    fit a ``vocab_size`` embedding: NullTokenizer(n) adds an end-of-document id n, so its
    ``vocab_size`` is n + 1 and mock data would draw ids one past the table; ask for n - 1."""
    if name_or_path:
        from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

        return AutoTokenizer(str(name_or_path))
    if vocab_size is None:
        return None
    from nemo.collections.common.tokenizers.null_tokenizer import NullTokenizer

    return NullTokenizer(int(vocab_size) - 1)


def finetune_data(cfg: DictConfig, tokenizer=None):
    from nemo.collections import llm

    d = cfg.data
    return llm.FineTuningDataModule(
        dataset_root=str(d.dataset_root),
        seq_length=d.seq_length,
        micro_batch_size=d.micro_batch_size,
        global_batch_size=d.global_batch_size,
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(d.tokenizer),
    )


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=False)
