"""GLM-4.5 / GLM-4.6 MoE (``glm4_moe``, transformers ``Glm4MoeForCausalLM``).

Grouped-query attention with a QKV bias (``attention_bias``; no bias on ``o_proj``), optional
per-head qk-norm (``use_qk_norm``), partial rotary embeddings, first-k dense layers, then MoE
layers with shared experts and the DeepSeek-V3 router (sigmoid scores, an expert bias that
only chooses, group-limited top-k, normalised and scaled).

Facts, read from transformers 4.57 ``models/glm4_moe/modeling_glm4_moe.py`` and Megatron-Core
0.15.3 ``models/common/embeddings/rope_utils.py``:

* Partial rotary: HF rotates the first ``int(head_dim * partial_rotary_factor)`` dims of each
  head with rotate-half and passes the rest; Megatron with ``rotary_percent`` does the same
  (``_apply_rotary_pos_emb_bshd`` splits ``t[..., :rot_dim]``), inverse frequencies
  ``base ** -(2k / rot_dim)`` in both.  So ``partial_rotary_factor = rotary_percent``, and
  the weights keep their layout (``rotary_interleaved`` must be False).
* qk-norm: HF applies ``q_norm``/``k_norm`` per head before the rotation, as Megatron's
  ``q_layernorm``/``k_layernorm`` do.
* Routing: ``Glm4MoeTopkRouter`` is DeepSeek-V3's ``noaux_tc`` router (same checks, same
  config keys, :func:`~.base.check_sigmoid_router`).  One difference no config key can
  express: with group-limited routing HF sets the biased scores of the unchosen groups'
  experts to 0 (``masked_fill(..., 0.0)``, DeepSeek-V3's code too), Megatron to ``-inf``; they
  choose the same experts while the biased scores (sigmoid + expert bias) they compare are
  positive -- always when no expert bias is negative; with negative biases HF can route a
  token to an expert of an unchosen group where Megatron does not.
* HF names are DeepSeek-V3's: ``mlp.gate.weight``, ``mlp.gate.e_score_correction_bias``
  (kept float32), ``mlp.shared_experts.*``, ``mlp.experts.{E}.*``.
* Megatron ``layernorm_zero_centered_gamma`` models export with ``+ 1`` on every norm weight
  (:data:`~..mappings.ZERO_CENTRED_NORM`); HF's norms are plain.
"""

from __future__ import annotations

from .. import mappings as mk
from .. import semantics as sem
from . import rule
from .base import (
    DENSE_MLP,
    GLU,
    NORM,
    QKV,
    QKV_BIAS,
    SWIGLU_EXPERTS,
    ArchRule,
    ModelInfo,
    R,
    activation_name,
    check_shared_experts_multiple,
    check_sigmoid_router,
    first_k_dense,
    llama_family_config,
    require,
    sigmoid_router_config,
)

MODEL_TYPE = "glm4_moe"

LAYER = {
    "input_layernorm.weight": NORM("input_layernorm.weight"),
    "self_attention.linear_qkv.layer_norm_weight": NORM("input_layernorm.weight"),
    "self_attention.linear_qkv.weight": QKV("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    **QKV_BIAS,
    "self_attention.q_layernorm.weight": NORM("self_attn.q_norm.weight"),
    "self_attention.k_layernorm.weight": NORM("self_attn.k_norm.weight"),
    "self_attention.linear_proj.weight": R("self_attn.o_proj.weight"),
    "pre_mlp_layernorm.weight": NORM("post_attention_layernorm.weight"),
    "mlp.linear_fc1.layer_norm_weight": NORM("post_attention_layernorm.weight"),
    **DENSE_MLP,
    "mlp.router.weight": R("mlp.gate.weight"),
    "mlp.router.expert_bias": R("mlp.gate.e_score_correction_bias").then(mk.NONNEGATIVE_GROUPED_EXPERT_BIAS),  # kept float32 (Job.keep_fp32)
    "mlp.shared_experts.linear_fc1.weight": GLU("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"),
    "mlp.shared_experts.linear_fc2.weight": R("mlp.shared_experts.down_proj.weight"),
}


def _check(info: ModelInfo) -> None:
    c, a, m = info.config, info.attrs, MODEL_TYPE
    require(c.normalization == "RMSNorm", f"{m} needs RMSNorm, the model uses {c.normalization}")
    require(c.gated_linear_unit, f"{m} needs a gated MLP (gated_linear_unit=True)")
    require(activation_name(c) == "silu", f"{m} needs SiLU, the model uses {activation_name(c)}")
    require(not getattr(c, "multi_latent_attention", False), f"{m} has no multi-latent attention")
    require(not c.add_bias_linear, f"{m} has biases only on q/k/v (add_qkv_bias), not on other linears (add_bias_linear=True)")
    require(a.position_embedding_type == "rope", f"{m} needs rotary embeddings, the model has {a['position_embedding_type']!r}")
    require(not a.rope_scaling, f"{m} export has no rope scaling (the model uses rotary_scaling)")
    require(not c.rotary_interleaved, f"{m} rotates halves (rotate_half); the model has rotary_interleaved=True")
    head_dim = c.kv_channels or c.hidden_size // c.num_attention_heads
    rot = int(head_dim * a.rotary_percent)
    require(
        0 < rot <= head_dim and rot % 2 == 0,
        f"{m}: rotary_percent={a['rotary_percent']} of head dim {head_dim} gives {rot} rotary dims (needs an even count > 0)",
    )
    sm = getattr(c, "softmax_scale", None)
    require(sm is None or abs(sm - head_dim ** -0.5) < 1e-12, f"{m} scales attention by 1/sqrt(head_dim); the model has softmax_scale={sm}")
    if not info.moe_layers:
        return
    first_k_dense(info, m)
    check_sigmoid_router(info, m)
    check_shared_experts_multiple(info, m)


def _config(info: ModelInfo) -> dict:
    c, a = info.config, info.attrs
    cfg = llama_family_config(info, MODEL_TYPE, "Glm4MoeForCausalLM")
    cfg.update(
        attention_bias=bool(c.add_qkv_bias),
        use_qk_norm=bool(c.qk_layernorm),
        partial_rotary_factor=float(a.rotary_percent),
        rope_scaling=None,
        first_k_dense_replace=first_k_dense(info, MODEL_TYPE),
    )
    if info.moe_layers:
        cfg.update(sigmoid_router_config(info))
    else:  # a dense model: every layer below first_k_dense_replace
        cfg.update(n_routed_experts=1, num_experts_per_tok=1, n_shared_experts=0, moe_intermediate_size=c.ffn_hidden_size)
    return cfg


SEMANTICS = {
    **sem.REFUSED_COMMON, **sem.SHAPES, **sem.BLOCK, **sem.SIGMOID_MOE,
    "rotary_interleaved": sem.BY_CHECK,
    "softmax_scale": sem.BY_CHECK,
    "layernorm_zero_centered_gamma": sem.mapped(why="norm weights written + 1 (ZERO_CENTRED_NORM)"),
}


GLM4_MOE = rule(ArchRule(
    model_type=MODEL_TYPE,
    architecture="Glm4MoeForCausalLM",
    layer_table=LAYER,
    expert_names=SWIGLU_EXPERTS,
    supports_moe=True,
    build_config=_config,
    check=_check,
    semantics=SEMANTICS,
    quant_exclude=("lm_head", "model.embed_tokens", "*.mlp.gate"),
    final_norm_transform=mk.ZERO_CENTRED_NORM,
))
