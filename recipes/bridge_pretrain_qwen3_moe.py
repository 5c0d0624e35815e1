"""Megatron-Bridge pretraining of a Qwen3-MoE-style model, publishing a Hugging Face checkpoint
inside every training checkpoint (``<checkpoint.save>/iter_NNNNNNN/hf``).

Command line (8 GPUs, expert parallel 8, HF export on)::

    torchrun --nproc-per-node 8 recipes/bridge_pretrain_qwen3_moe.py hf_export.enabled=true \\
        model.expert_model_parallel_size=8 checkpoint.save=/ckpt/run1

Overrides: any field of Bridge's ``ConfigContainer`` in Bridge's own Hydra syntax (``key=value``,
``+key=value``, ``~key``, applied by ``megatron.bridge.training.utils.omegaconf_utils``, as its
example scripts do), e.g. ``train.train_iters=20000 checkpoint.save_interval=1000
checkpoint.async_save=true dataset.blend=[[/data/corpus_text_document],null]``. Keys under
``hf_export.`` are ``nemo_export_hooks.ExportConfig`` fields (the packaged group's
``nemo_export_hooks/conf/hf_export/default.yaml``);
``hf_export.enabled=true`` is the one switch that adds ``HFExportBridgeCallback``. From Python::

    from recipes import bridge_pretrain_qwen3_moe as r
    cfg, hf = r.compose(["hf_export.enabled=true", "train.train_iters=10"])
    r.run(cfg, hf)

Megatron-Bridge needs Python 3.12 and CUDA: this module imports it only inside functions, so it
imports (and ``split_overrides`` / ``hf_export_node`` run) anywhere.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make `recipes` and the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HF_KEY = "hf_export"


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """``hf_export.*`` overrides (prefix removed) apart from the ConfigContainer's."""
    bridge, hf = [], []
    for o in overrides:
        key = o.lstrip("+~")
        if key == HF_KEY or key.startswith(HF_KEY + "."):
            hf.append(key[len(HF_KEY) + 1:])
        else:
            bridge.append(o)
    return bridge, hf


def hf_export_node(overrides: Sequence[str] = (), group: str = "default", arch: str = "qwen3_moe"):
    """The ``hf_export`` node: the packaged group's ``<group>.yaml`` (on top of ``default.yaml``;
    the Hydra ``defaults`` list is not an ExportConfig field), ``arch``, then ``overrides``."""
    from omegaconf import OmegaConf

    from nemo_export_hooks.conf import group_file

    node = OmegaConf.create(group_file("default").read_text())
    if group != "default":
        extra = OmegaConf.create(group_file(group).read_text())
        extra.pop("defaults", None)
        node = OmegaConf.merge(node, extra)
    node.arch = arch
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"hf_export overrides must be key=value, got {bad}")
    return OmegaConf.merge(node, OmegaConf.from_dotlist(list(overrides)))


def need_bridge() -> None:
    """Megatron-Bridge, or an ImportError naming the extra that installs it."""
    from nemo_export_hooks.extras import require

    require("bridge", "megatron.bridge", "recipes/bridge_*_qwen3_moe.py")


def base_config():
    """A Qwen3-30B-A3B-shaped model scaled down (as ``conf/pretrain_qwen3_moe.yaml``), Bridge's
    mock GPT data, bf16 mixed precision, torch_dist checkpoints every 500 iterations."""
    need_bridge()
    import torch
    import torch.nn.functional as F
    from megatron.bridge.models.gpt_provider import GPTModelProvider
    from megatron.bridge.training.config import (
        CheckpointConfig, ConfigContainer, DistributedDataParallelConfig, LoggerConfig, MockGPTDatasetConfig,
        OptimizerConfig, RNGConfig, SchedulerConfig, TokenizerConfig, TrainingConfig, ValidationConfig)

    seq = 4096
    model = GPTModelProvider(
        num_layers=8, hidden_size=1024, ffn_hidden_size=3072, num_attention_heads=16, num_query_groups=4,
        kv_channels=128, normalization="RMSNorm", layernorm_epsilon=1e-6, activation_func=F.silu,
        gated_linear_unit=True, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=True,
        position_embedding_type="rope", rotary_base=1_000_000, share_embeddings_and_output_weights=False,
        num_moe_experts=32, moe_ffn_hidden_size=384, moe_router_topk=4, moe_grouped_gemm=True,
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-3,
        moe_router_pre_softmax=False, moe_permute_fusion=True, hidden_dropout=0.0, attention_dropout=0.0,
        seq_length=seq, make_vocab_size_divisible_by=128, bf16=True, params_dtype=torch.bfloat16,
        pipeline_dtype=torch.bfloat16, autocast_dtype=torch.bfloat16,
    )
    return ConfigContainer(
        model=model,
        train=TrainingConfig(train_iters=1000, global_batch_size=64, micro_batch_size=1),
        validation=ValidationConfig(eval_interval=500, eval_iters=8),
        optimizer=OptimizerConfig(optimizer="adam", bf16=True, lr=3e-4, min_lr=3e-5, weight_decay=0.1, adam_beta1=0.9,
                                  adam_beta2=0.95, clip_grad=1.0, use_distributed_optimizer=True),
        scheduler=SchedulerConfig(lr_decay_style="cosine", lr_warmup_iters=50, start_weight_decay=0.1,
                                  end_weight_decay=0.1, weight_decay_incr_style="constant"),
        ddp=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True, overlap_param_gather=True,
                                          use_distributed_optimizer=True, check_for_nan_in_grad=True),
        dataset=MockGPTDatasetConfig(seq_length=seq, random_seed=1234, reset_attention_mask=False,
                                     reset_position_ids=False, eod_mask_loss=False, num_dataset_builder_threads=1,
                                     data_sharding=True, dataloader_type="single", num_workers=2),
        logger=LoggerConfig(log_interval=10),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=151936),
        checkpoint=CheckpointConfig(save="checkpoints/bridge_qwen3_moe", save_interval=500, ckpt_format="torch_dist"),
        rng=RNGConfig(seed=1234),
    )


def compose(overrides: Sequence[str] = (), hf_group: str = "default"):
    """(ConfigContainer with the Bridge overrides applied, ``hf_export`` node)."""
    need_bridge()
    from megatron.bridge.training.utils.omegaconf_utils import process_config_with_overrides

    bridge, hf = split_overrides(overrides)
    cfg = base_config()
    if bridge:
        cfg = process_config_with_overrides(cfg, cli_overrides=bridge)
    fit_to_image(cfg.model, explicit=any(o.lstrip("+~").startswith("model.gradient_accumulation_fusion")
                                         for o in bridge))
    return cfg, hf_export_node(hf, group=hf_group)


GRAD_ACC_FUSION_EXT = "fused_weight_gradient_mlp_cuda"


def fit_to_image(model_cfg, explicit: bool = False) -> bool:
    """Turn off ``gradient_accumulation_fusion`` when APEX's fused weight-gradient extension is
    missing (many images, the H200 one included, have no APEX): Megatron would otherwise fail
    building the first linear layer ("fused_weight_gradient_mlp_cuda module is not found").
    The fusion changes only how the weight gradient is accumulated, not what is trained. A value
    the user set on the command line is kept and fails as Megatron says. Returns whether it
    changed the config."""
    import importlib.util
    import logging

    if explicit or not getattr(model_cfg, "gradient_accumulation_fusion", False):
        return False
    if importlib.util.find_spec(GRAD_ACC_FUSION_EXT) is not None:
        return False
    model_cfg.gradient_accumulation_fusion = False
    logging.getLogger(__name__).warning(
        "model.gradient_accumulation_fusion=true needs APEX's %s extension, which is not installed: "
        "training with it off (set model.gradient_accumulation_fusion explicitly to override)", GRAD_ACC_FUSION_EXT)
    return True


def callbacks(hf_node) -> list:
    """``[HFExportBridgeCallback]`` when ``hf_export.enabled`` is true, else ``[]``."""
    from nemo_export_hooks.integrations.megatron_bridge import bridge_callbacks

    return bridge_callbacks(hf_node)


def run(cfg, hf_node):
    need_bridge()
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain

    return pretrain(cfg, forward_step, callbacks=callbacks(hf_node))


def main(argv: Sequence[str] | None = None) -> None:
    cfg, hf = compose(sys.argv[1:] if argv is None else argv)
    run(cfg, hf)


if __name__ == "__main__":
    main()
