"""Dense Llama-family architectures: ``llama``, ``qwen2`` (QKV bias), ``qwen3`` (qk-norm)."""

from __future__ import annotations

from .. import semantics as sem
from . import rule
from .base import ATTENTION, DENSE_MLP, QK_NORM, QKV_BIAS, ArchRule, ModelInfo, check_llama_family, llama_family_config, require


def _dense_check(model_type: str, qk_norm: bool, qkv_bias: bool):
    def check(info: ModelInfo) -> None:
        c = info.config
        require(not info.moe_layers, f"{model_type} is a dense architecture but the model has MoE layers {info.moe_layers}")
        check_llama_family(info, model_type, qk_norm)
        require(
            bool(c.add_qkv_bias) == qkv_bias,
            f"{model_type} {'needs' if qkv_bias else 'has no'} QKV bias; the model has add_qkv_bias={c.add_qkv_bias}",
        )
        if model_type == "qwen2":
            # vLLM's Qwen2 ignores config.json's head_dim and uses hidden_size / heads, where
            # transformers honours head_dim: such an export would compute something else in vLLM.
            derived = c.hidden_size // c.num_attention_heads
            require(
                c.kv_channels is None or c.kv_channels == derived,
                f"qwen2 derives head_dim from hidden_size / num_attention_heads = {derived} (vLLM ignores config.json's "
                f"head_dim), but the model has kv_channels={c.kv_channels}; export it as qwen3 or use kv_channels={derived}",
            )

    return check


# The ledger (exporter/semantics.py): the transformer shape and block, checked by
# check_llama_family; every other forward-changing field (windows, rotary_interleaved, softmax_scale,
# zero-centred norms, ...) must hold megatron-core's default.
SEMANTICS = {**sem.REFUSED_LLAMA, **sem.SHAPES, **sem.BLOCK}


def _llama_config(info: ModelInfo) -> dict:
    cfg = llama_family_config(info, "llama", "LlamaForCausalLM")
    cfg.update(mlp_bias=False, pretraining_tp=1, rope_scaling=None)
    return cfg


def _qwen2_config(info: ModelInfo) -> dict:
    cfg = llama_family_config(info, "qwen2", "Qwen2ForCausalLM")
    cfg.pop("attention_bias")
    cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=info.num_layers, rope_scaling=None)
    return cfg


def _qwen3_config(info: ModelInfo) -> dict:
    cfg = llama_family_config(info, "qwen3", "Qwen3ForCausalLM")
    cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=info.num_layers, rope_scaling=None)
    return cfg


LLAMA = rule(ArchRule(
    model_type="llama",
    architecture="LlamaForCausalLM",
    layer_table={**ATTENTION, **DENSE_MLP},
    build_config=_llama_config,
    semantics=SEMANTICS,
    check=_dense_check("llama", qk_norm=False, qkv_bias=False),
))

QWEN2 = rule(ArchRule(
    model_type="qwen2",
    architecture="Qwen2ForCausalLM",
    layer_table={**ATTENTION, **QKV_BIAS, **DENSE_MLP},
    build_config=_qwen2_config,
    semantics=SEMANTICS,
    check=_dense_check("qwen2", qk_norm=False, qkv_bias=True),
))

QWEN3 = rule(ArchRule(
    model_type="qwen3",
    architecture="Qwen3ForCausalLM",
    layer_table={**ATTENTION, **QK_NORM, **DENSE_MLP},
    build_config=_qwen3_config,
    semantics=SEMANTICS,
    check=_dense_check("qwen3", qk_norm=True, qkv_bias=False),
))
