"""Mixture-of-Experts Llama-family architectures: ``qwen3_moe`` and ``mixtral``."""

from __future__ import annotations

from .. import semantics as sem
from . import rule
from .base import (
    ATTENTION,
    DENSE_MLP,
    QK_NORM,
    SWIGLU_EXPERTS,
    ArchRule,
    ModelInfo,
    R,
    check_llama_family,
    llama_family_config,
    require,
)


def _check_softmax_router(info: ModelInfo, model_type: str) -> None:
    c = info.config
    require(bool(info.moe_layers), f"{model_type} is a MoE architecture but the model has no MoE layers")
    require(
        getattr(c, "moe_router_score_function", "softmax") == "softmax",
        f"{model_type} routes with softmax; the model uses {c.moe_router_score_function}",
    )
    require(not info.has_expert_bias, f"{model_type} has no router expert bias")
    require(not info.has_shared_experts, f"{model_type} has no shared experts")
    require(
        getattr(c, "moe_router_topk_scaling_factor", None) in (None, 1.0),
        f"{model_type} has no routed scaling factor (moe_router_topk_scaling_factor)",
    )
    require(not getattr(c, "moe_router_num_groups", None), f"{model_type} has no group-limited routing")


QWEN3_MOE_SEMANTICS = {
    **sem.REFUSED_LLAMA, **sem.SHAPES, **sem.BLOCK, **sem.SOFTMAX_MOE,
    "moe_router_pre_softmax": sem.mapped("norm_topk_prob"),
}


def _qwen3_moe_check(info: ModelInfo) -> None:
    check_llama_family(info, "qwen3_moe", qk_norm=True)
    _check_softmax_router(info, "qwen3_moe")


def _qwen3_moe_config(info: ModelInfo) -> dict:
    c = info.config
    cfg = llama_family_config(info, "qwen3_moe", "Qwen3MoeForCausalLM")
    dense = [i for i in range(info.num_layers) if i not in info.moe_layers]
    cfg.update(
        num_experts=c.num_moe_experts,
        num_experts_per_tok=c.moe_router_topk,
        moe_intermediate_size=c.moe_ffn_hidden_size,
        decoder_sparse_step=1,
        mlp_only_layers=dense,
        # Megatron's default (topk on logits, then softmax over the k) equals normalised top-k;
        # pre-softmax (softmax over all experts, then topk) leaves probabilities unnormalised.
        norm_topk_prob=not bool(c.moe_router_pre_softmax),
        output_router_logits=False,
        router_aux_loss_coef=float(getattr(c, "moe_aux_loss_coeff", 0.0) or 0.0),
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=info.num_layers,
        rope_scaling=None,
    )
    return cfg


QWEN3_MOE = rule(ArchRule(
    model_type="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    layer_table={**ATTENTION, **QK_NORM, **DENSE_MLP, "mlp.router.weight": R("mlp.gate.weight")},
    expert_names=SWIGLU_EXPERTS,
    supports_moe=True,
    build_config=_qwen3_moe_config,
    check=_qwen3_moe_check,
    semantics=QWEN3_MOE_SEMANTICS,
    quant_exclude=("lm_head", "model.embed_tokens", "*.mlp.gate"),
))


def _mixtral_check(info: ModelInfo) -> None:
    check_llama_family(info, "mixtral", qk_norm=False)
    _check_softmax_router(info, "mixtral")
    dense = [i for i in range(info.num_layers) if i not in info.moe_layers]
    require(not dense, f"mixtral has MoE in every layer; layers {dense} are dense")
    require(
        not info.config.moe_router_pre_softmax,
        "mixtral renormalises the top-k probabilities; the model routes with moe_router_pre_softmax=True",
    )


MIXTRAL_SEMANTICS = {
    **sem.REFUSED_LLAMA, **sem.SHAPES, **sem.BLOCK, **sem.SOFTMAX_MOE,
    "moe_layer_freq": sem.BY_CHECK,  # MoE in every layer
    "moe_router_pre_softmax": sem.BY_CHECK,  # renormalised top-k only
}


def _mixtral_config(info: ModelInfo) -> dict:
    c = info.config
    cfg = llama_family_config(info, "mixtral", "MixtralForCausalLM")
    cfg.pop("attention_bias")
    cfg.update(
        intermediate_size=c.moe_ffn_hidden_size,
        num_local_experts=c.num_moe_experts,
        num_experts_per_tok=c.moe_router_topk,
        output_router_logits=False,
        router_aux_loss_coef=float(getattr(c, "moe_aux_loss_coeff", 0.0) or 0.0),
        router_jitter_noise=0.0,
        sliding_window=None,
    )
    return cfg


MIXTRAL = rule(ArchRule(
    model_type="mixtral",
    architecture="MixtralForCausalLM",
    layer_table={**ATTENTION, "mlp.router.weight": R("block_sparse_moe.gate.weight")},
    expert_names={
        "gate": "block_sparse_moe.experts.{E}.w1.weight",
        "up": "block_sparse_moe.experts.{E}.w3.weight",
        "down": "block_sparse_moe.experts.{E}.w2.weight",
    },
    supports_moe=True,
    build_config=_mixtral_config,
    check=_mixtral_check,
    semantics=MIXTRAL_SEMANTICS,
    quant_exclude=("lm_head", "model.embed_tokens", "*.block_sparse_moe.gate"),
))
