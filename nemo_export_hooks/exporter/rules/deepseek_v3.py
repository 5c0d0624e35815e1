"""DeepSeek-V3 (``deepseek_v3``, transformers ``DeepseekV3ForCausalLM``).

Multi-latent attention (MLA), first-k dense layers, shared experts and a sigmoid router with
expert bias (``noaux_tc``), group-limited routing and a routed scaling factor.

Layouts, read from Megatron-Core 0.15.3 ``transformer/multi_latent_attention.py`` and
transformers 4.57.6 ``models/deepseek_v3/modeling_deepseek_v3.py``; every tensor is a plain
rename, no rows are permuted:

* ``linear_q_proj`` / ``linear_q_up_proj``: ``[heads * (qk_head_dim + qk_pos_emb_head_dim), in]``,
  each head ``[nope | rope]`` (Megatron ``q.view(..., n, q_head_dim)`` then
  ``split([qk_head_dim, qk_pos_emb_head_dim])``; HF ``view(query_shape)`` then
  ``split([qk_nope_head_dim, qk_rope_head_dim])``).
* ``linear_kv_down_proj``: ``[kv_lora_rank + qk_pos_emb_head_dim, hidden]`` split
  ``[kv_lora_rank, rope]``, exactly HF ``kv_a_proj_with_mqa``.
* ``linear_kv_up_proj``: ``[heads * (qk_head_dim + v_head_dim), kv_lora_rank]``, each head
  ``[k_nope | v]``, exactly HF ``kv_b_proj``.
* RoPE: with ``multi_latent_attention`` Megatron's ``_apply_rotary_pos_emb_bshd``
  de-interleaves the rope dims (``t = cat(t[..., 0::2], t[..., 1::2])``) before a
  rotate-half rotation (the fused MLA yarn kernels do the same); HF's
  ``apply_rotary_pos_emb_interleave`` (``rope_interleave=True``, the DeepSeek default)
  does ``view(d//2, 2).transpose`` -- the same permutation -- before rotate-half.  So the
  weights keep DeepSeek's native interleaved rope layout and the config says
  ``rope_interleave: true``.

Routing (Megatron ``moe_utils.topk_routing_with_score_function`` / ``group_limited_topk``
vs HF ``DeepseekV3TopkRouter``): both take sigmoid scores, choose experts on
``scores + bias`` (group-limited), gather the unbiased scores, normalise over the top-k and
multiply by the scaling factor.  Differences that the checks below pin down: HF ranks
groups by the sum of the top **2** scores per group (Megatron: top ``topk // group_topk``);
HF always normalises when ``norm_topk_prob`` (Megatron only when ``topk > 1``); HF always
has ``e_score_correction_bias`` and shared experts.

Supported RoPE: Megatron MLA ``rope_type="rope"`` (no scaling) and ``rope_type="yarn"``
(``rope_scaling`` of type ``yarn`` with ``factor``, ``original_max_position_embeddings``,
``beta_fast``, ``beta_slow``, ``mscale``, ``mscale_all_dim``, plus ``attention_factor``
when HF would infer a different one).  Anything else raises :class:`ArchMismatchError`.
Multi-token-prediction layers (``mtp.*``) are not exported (HF drops them too).
"""

from __future__ import annotations

import math

from .. import mappings as mk
from .. import semantics as sem
from . import rule
from .base import (
    ATTENTION,
    DENSE_MLP,
    GLU,
    SWIGLU_EXPERTS,
    ArchRule,
    ModelInfo,
    R,
    activation_name,
    check_shared_experts_multiple,
    check_sigmoid_router,
    require,
    hf_config,
    sigmoid_router_config,
)
from .base import first_k_dense as _first_k_dense

MODEL_TYPE = "deepseek_v3"

MLA_ATTENTION = {
    "input_layernorm.weight": R("input_layernorm.weight"),
    # q without LoRA (q_lora_rank=None)
    "self_attention.linear_q_proj.weight": R("self_attn.q_proj.weight"),
    # q with LoRA
    "self_attention.linear_q_down_proj.weight": R("self_attn.q_a_proj.weight"),
    "self_attention.q_layernorm.weight": R("self_attn.q_a_layernorm.weight"),
    "self_attention.linear_q_up_proj.layer_norm_weight": R("self_attn.q_a_layernorm.weight"),  # TE fused
    "self_attention.linear_q_up_proj.weight": R("self_attn.q_b_proj.weight"),
    # kv
    "self_attention.linear_kv_down_proj.weight": R("self_attn.kv_a_proj_with_mqa.weight"),
    "self_attention.kv_layernorm.weight": R("self_attn.kv_a_layernorm.weight"),
    "self_attention.linear_kv_up_proj.layer_norm_weight": R("self_attn.kv_a_layernorm.weight"),  # TE fused
    "self_attention.linear_kv_up_proj.weight": R("self_attn.kv_b_proj.weight"),
    "self_attention.linear_proj.weight": R("self_attn.o_proj.weight"),
    # post-attention norm: separate (MoE layers, local spec) or fused into dense fc1 (TE)
    "pre_mlp_layernorm.weight": ATTENTION["pre_mlp_layernorm.weight"],
    "mlp.linear_fc1.layer_norm_weight": ATTENTION["mlp.linear_fc1.layer_norm_weight"],
}

MOE = {
    "mlp.router.weight": R("mlp.gate.weight"),
    "mlp.router.expert_bias": R("mlp.gate.e_score_correction_bias").then(mk.NONNEGATIVE_GROUPED_EXPERT_BIAS),  # kept float32 (Job.keep_fp32)
    "mlp.shared_experts.linear_fc1.weight": GLU("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"),
    "mlp.shared_experts.linear_fc2.weight": R("mlp.shared_experts.down_proj.weight"),
}


def _yarn_mscale(scale: float, mscale: float) -> float:
    # Megatron yarn_rotary_pos_embedding._yarn_get_mscale == HF deepseek_v3 yarn_get_mscale
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def first_k_dense(info: ModelInfo) -> int:
    return _first_k_dense(info, MODEL_TYPE)


def _check(info: ModelInfo) -> None:
    c, a = info.config, info.attrs
    m = MODEL_TYPE
    require(bool(getattr(c, "multi_latent_attention", False)), f"{m} needs multi-latent attention (MLATransformerConfig)")
    require(c.normalization == "RMSNorm", f"{m} needs RMSNorm, the model uses {c.normalization}")
    require(not getattr(c, "layernorm_zero_centered_gamma", False), f"{m} has no zero-centred norm weights (layernorm_zero_centered_gamma=True)")
    require(c.gated_linear_unit, f"{m} needs a gated MLP (gated_linear_unit=True)")
    require(activation_name(c) == "silu", f"{m} needs SiLU, the model uses {activation_name(c)}")
    require(not c.add_bias_linear and not c.add_qkv_bias, f"{m} export has no biases on linear layers (add_bias_linear/add_qkv_bias)")
    require(bool(c.qk_layernorm), f"{m} needs the q/kv latent norms (qk_layernorm=True); the model has none")
    ng = c.num_query_groups
    require(ng in (None, c.num_attention_heads), f"{m} (MLA) has one kv head per query head; the model has num_query_groups={ng}")
    require(
        a.position_embedding_type in ("rope", "none"),
        f"{m} applies RoPE inside MLA; the model has position_embedding_type={a['position_embedding_type']!r}",
    )
    require(not c.rotary_interleaved, f"{m} export needs rotary_interleaved=False (MLA de-interleaves the rope dims itself)")
    rope_type = getattr(c, "rope_type", "yarn")
    require(rope_type in ("rope", "yarn"), f"{m} supports rope_type 'rope' or 'yarn', the model uses {rope_type!r}")
    if rope_type == "rope":
        require(c.rotary_percent == 1.0, f"{m} needs rotary_percent=1.0, the model has {c.rotary_percent}")
        # Megatron scales softmax by mscale(rotary_scaling_factor, mscale_all_dim)^2 even
        # with plain rope; HF only does so with a yarn rope_scaling.
        ms = _yarn_mscale(c.rotary_scaling_factor, c.mscale_all_dim)
        require(
            ms == 1.0,
            f"{m}: rope_type='rope' with rotary_scaling_factor={c.rotary_scaling_factor} and "
            f"mscale_all_dim={c.mscale_all_dim} scales the softmax by {ms * ms:.6g}, which HF applies only with yarn",
        )
    if not info.moe_layers:
        return
    first_k_dense(info)
    check_sigmoid_router(info, m)
    check_shared_experts_multiple(info, m)


def _rope(info: ModelInfo) -> tuple[dict | None, int]:
    c, a = info.config, info.attrs
    if getattr(c, "rope_type", "yarn") == "rope":
        return None, a.max_sequence_length
    factor = float(c.rotary_scaling_factor)
    orig = int(c.original_max_position_embeddings)
    rs = {
        "type": "yarn",
        "rope_type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": orig,
        "beta_fast": float(c.beta_fast),
        "beta_slow": float(c.beta_slow),
        "mscale": float(c.mscale),
        "mscale_all_dim": float(c.mscale_all_dim),
    }
    # Megatron's cos/sin factor is mscale(f, mscale) / mscale(f, mscale_all_dim) always;
    # HF infers that only when both are non-zero, else mscale(f, 1).
    meg = _yarn_mscale(factor, c.mscale) / _yarn_mscale(factor, c.mscale_all_dim)
    hf = meg if (c.mscale and c.mscale_all_dim) else _yarn_mscale(factor, 1.0)
    if not math.isclose(meg, hf, rel_tol=0, abs_tol=1e-12):
        rs["attention_factor"] = float(meg)
    return rs, max(a.max_sequence_length, int(round(orig * factor)))


def _config(info: ModelInfo) -> dict:
    c, a = info.config, info.attrs
    rope_scaling, max_pos = _rope(info)
    cfg = hf_config(
        info, MODEL_TYPE, "DeepseekV3ForCausalLM",
        num_key_value_heads=c.num_attention_heads,
        q_lora_rank=c.q_lora_rank,
        kv_lora_rank=c.kv_lora_rank,
        qk_nope_head_dim=c.qk_head_dim,
        qk_rope_head_dim=c.qk_pos_emb_head_dim,
        v_head_dim=c.v_head_dim,
        hidden_act="silu",
        max_position_embeddings=max_pos,
        rope_theta=float(c.rotary_base),  # MLA's own base, not GPTModel.rotary_base
        rope_scaling=rope_scaling,
        rope_interleave=True,
        attention_bias=False,
        pretraining_tp=1,
    )
    cfg.pop("head_dim")  # MLA: per-part head dims above
    if info.moe_layers:
        cfg.update(
            first_k_dense_replace=first_k_dense(info),
            moe_layer_freq=1,
            **sigmoid_router_config(info),
            scoring_func="sigmoid",
            topk_method="noaux_tc",
        )
    else:  # a dense MLA model: every layer below first_k_dense_replace; the MoE keys are
        # ints, which transformers 5's config requires (n_shared_experts=None is refused)
        cfg.update(
            first_k_dense_replace=info.num_layers,
            moe_layer_freq=1,
            n_routed_experts=1,
            num_experts_per_tok=1,
            moe_intermediate_size=c.ffn_hidden_size,
            n_shared_experts=0,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
            norm_topk_prob=True,
        )
    return cfg


SEMANTICS = {
    **sem.REFUSED_COMMON, **sem.SHAPES, **sem.BLOCK, **sem.SIGMOID_MOE,
    "num_query_groups": sem.BY_CHECK,  # one kv head per query head
    "kv_channels": sem.required(why="MLA: head dims are qk_head_dim / v_head_dim", ok=lambda v: True),
    "qk_layernorm": sem.BY_CHECK,  # the q/kv latent norms
    "layernorm_zero_centered_gamma": sem.BY_CHECK,
    "rotary_interleaved": sem.BY_CHECK,
    "q_lora_rank": sem.mapped("q_lora_rank"),
    "kv_lora_rank": sem.mapped("kv_lora_rank"),
    "qk_head_dim": sem.mapped("qk_nope_head_dim"),
    "qk_pos_emb_head_dim": sem.mapped("qk_rope_head_dim"),
    "v_head_dim": sem.mapped("v_head_dim"),
    "rope_type": sem.BY_CHECK,
    "rotary_base": sem.mapped("rope_theta"),
    "rotary_percent": sem.BY_CHECK,
    "rotary_scaling_factor": sem.mapped("rope_scaling.factor"),
    "original_max_position_embeddings": sem.mapped("rope_scaling.original_max_position_embeddings"),
    "beta_fast": sem.mapped("rope_scaling.beta_fast"),
    "beta_slow": sem.mapped("rope_scaling.beta_slow"),
    "mscale": sem.mapped("rope_scaling.mscale", "rope_scaling.attention_factor"),
    "mscale_all_dim": sem.mapped("rope_scaling.mscale_all_dim", "rope_scaling.attention_factor"),
}


DEEPSEEK_V3 = rule(ArchRule(
    model_type=MODEL_TYPE,
    architecture="DeepseekV3ForCausalLM",
    layer_table={**MLA_ATTENTION, **DENSE_MLP, **MOE},
    expert_names=SWIGLU_EXPERTS,
    supports_moe=True,
    build_config=_config,
    check=_check,
    semantics=SEMANTICS,
    quant_exclude=("lm_head", "model.embed_tokens", "*.mlp.gate"),
))

