"""NemotronH (``nemotron_h``, transformers ``NemotronHForCausalLM``): Megatron-Core's hybrid
``MambaModel`` -- Mamba-2, attention, dense MLP and MoE layers in one stack, one mixer per layer
(``hybrid_override_pattern`` symbols ``M``, ``*``, ``-``, ``E``).

Names are the ones ``NemotronHForCausalLM.save_pretrained`` writes (transformers 5.23 holds
``model.*`` and fused experts in memory and maps them to these on disk):
``backbone.embeddings``, ``backbone.layers.{i}.norm`` (every layer's pre-norm),
``backbone.layers.{i}.mixer.*``, ``backbone.norm_f``, ``lm_head``.

Each layer's pre-norm is accepted under its local-spec name and under the Transformer Engine
name of the fused ``LayerNormColumnParallelLinear`` (megatron-core 0.16.1
``models/mamba/mamba_layer_specs.py``):

=====================  ==========================  ==============================================
layer                  local spec                  TE spec (``mamba_stack_spec``)
=====================  ==========================  ==============================================
Mamba ``M``            ``norm.weight``             ``mixer.in_proj.layer_norm_weight``
attention ``*``        ``input_layernorm.weight``  ``self_attention.linear_qkv.layer_norm_weight``
MLP ``-``              ``pre_mlp_layernorm.weight``  ``mlp.linear_fc1.layer_norm_weight``
MoE ``E``              ``pre_mlp_layernorm.weight``  ``pre_mlp_layernorm.weight`` (``TENorm``)
final                  ``decoder.final_norm.weight``  same (``TENorm``)
=====================  ==========================  ==============================================

Mamba mixer (Megatron ``ssm/mamba_mixer.py`` vs HF ``NemotronHMamba2Mixer``); every tensor keeps
its shape, values are copied unchanged:

* ``in_proj.weight`` ``[2*d_inner + 2*ngroups*d_state + nheads, hidden]``, rows ``[z | x | B | C |
  dt]`` -- HF splits ``[gate(=z) | x,B,C (conv input) | dt]``, the same order.  Under tensor
  parallelism each rank holds ``[z_r | x_r | B_r | C_r | dt_r]`` (its heads and groups of every
  part), so after the gather along dim 0 the rows are re-ordered part by part
  (:class:`PerRankParts`); at TP=1 this is the identity.
* ``conv1d.weight`` ``[conv_dim, 1, d_conv]`` / ``conv1d.bias`` ``[conv_dim]``, rows ``[x | B | C]``,
  same per-rank re-ordering (megatron-core >= 0.19: the mixer's own parameters
  ``conv1d_weight`` / ``conv1d_bias``, same shapes, no ``nn.Conv1d`` module).
* ``A_log``, ``D``, ``dt_bias`` ``[nheads]``; ``norm.weight`` ``[d_inner]`` (gated RMSNorm,
  groups of ``d_inner / ngroups``, ``norm_before_gate=False``: ``norm(y * silu(z))`` in both);
  ``out_proj.weight`` ``[hidden, d_inner]``: plain renames, split contiguously by TP.
* Megatron calls the scan without a ``dt_limit`` (kernel default ``(0, inf)``); transformers
  5.23 clamps ``dt`` at ``time_step_min``, so the config says ``time_step_min: 0.0`` (the
  mixer's ``dt_min`` only seeds the initialisation, which does not run on loaded weights).
* The gated norm's epsilon is hard-wired to 1e-5 in Megatron; HF uses ``layer_norm_epsilon``
  for it and for every block norm, so models with Mamba layers must use ``layernorm_epsilon``
  1e-5.

Attention: ``linear_qkv`` is split like Llama's (grouped-query interleave) into
``mixer.{q,k,v}_proj``; no rotary embedding (HF NemotronH attention has none, so the model must
use ``position_embedding_type="none"``), no biases, no qk-norm.  Dense MLP and experts are
non-gated (``up_proj``/``down_proj``, squared ReLU in NemotronH).  MoE: ``router.weight`` ->
``mixer.gate.weight``, ``router.expert_bias`` -> ``mixer.gate.e_score_correction_bias`` (kept
float32), shared experts -> ``mixer.shared_experts.*``, latent projections (megatron-core 0.16
``moe_latent_size``, TE ``TELinear``) -> ``mixer.fc{1,2}_latent_proj.weight``; routing is checked
like DeepSeek-V3's (sigmoid scores, bias-chosen, normalised when top-k > 1, scaled).

Multi-token-prediction layers are not exported (HF ignores ``mtp.*``).
"""

from __future__ import annotations

import math

from ..mappings import PerRankParts, per_rank_parts_rows  # noqa: F401 (moved to mappings; names kept here)
from .. import semantics as sem
from . import rule
from .base import ArchMismatchError, ArchRule, Entry, ModelInfo, QKV, R, activation_name, check_sigmoid_router, hf_config, require

MODEL_TYPE = "nemotron_h"
HF_LAYER_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}


def _mamba(info: ModelInfo) -> dict:
    m = info.attrs.get("mamba")  # a ModelAttrs, or a plain dict (tests)
    if not m:
        raise ArchMismatchError("the model has Mamba tensors but no Mamba layers in its hybrid pattern")
    return m


def _in_proj_parts(info: ModelInfo):
    m = _mamba(info)
    bc = m["ngroups"] * m["d_state"]
    return [m["d_inner"], m["d_inner"], bc, bc, m["nheads"]]  # z, x, B, C, dt


def _conv_parts(info: ModelInfo):
    m = _mamba(info)
    bc = m["ngroups"] * m["d_state"]
    return [m["d_inner"], bc, bc]  # x, B, C


IN_PROJ = PerRankParts("mixer.in_proj", _in_proj_parts)
CONV1D = PerRankParts("mixer.conv1d", _conv_parts)

NORM = R("norm.weight")
LAYER_TABLE = {
    # every layer's pre-norm: local names and the TE fused-norm names
    "norm.weight": NORM,  # Mamba, local
    "mixer.in_proj.layer_norm_weight": NORM,  # Mamba, TE
    "input_layernorm.weight": NORM,  # attention, local
    "self_attention.linear_qkv.layer_norm_weight": NORM,  # attention, TE
    "pre_mlp_layernorm.weight": NORM,  # MLP (local), MoE (local and TE's TENorm)
    "mlp.linear_fc1.layer_norm_weight": NORM,  # MLP, TE
    # Mamba mixer
    "mixer.in_proj.weight": Entry(IN_PROJ, ("mixer.in_proj.weight",)),
    "mixer.conv1d.weight": Entry(CONV1D, ("mixer.conv1d.weight",)),
    "mixer.conv1d.bias": Entry(CONV1D, ("mixer.conv1d.bias",)),
    # megatron-core >= 0.19 holds the conv as two parameters of the mixer (same shapes)
    "mixer.conv1d_weight": Entry(CONV1D, ("mixer.conv1d.weight",)),
    "mixer.conv1d_bias": Entry(CONV1D, ("mixer.conv1d.bias",)),
    "mixer.A_log": R("mixer.A_log"),
    "mixer.D": R("mixer.D"),
    "mixer.dt_bias": R("mixer.dt_bias"),
    "mixer.norm.weight": R("mixer.norm.weight"),
    "mixer.out_proj.weight": R("mixer.out_proj.weight"),
    # attention
    "self_attention.linear_qkv.weight": QKV("mixer.q_proj.weight", "mixer.k_proj.weight", "mixer.v_proj.weight"),
    "self_attention.linear_proj.weight": R("mixer.o_proj.weight"),
    # dense MLP (non-gated)
    "mlp.linear_fc1.weight": R("mixer.up_proj.weight"),
    "mlp.linear_fc2.weight": R("mixer.down_proj.weight"),
    # MoE (routed experts: expert_names below)
    "mlp.router.weight": R("mixer.gate.weight"),
    "mlp.router.expert_bias": R("mixer.gate.e_score_correction_bias"),  # kept float32 (Job.keep_fp32)
    "mlp.shared_experts.linear_fc1.weight": R("mixer.shared_experts.up_proj.weight"),
    "mlp.shared_experts.linear_fc2.weight": R("mixer.shared_experts.down_proj.weight"),
    "mlp.fc1_latent_proj.weight": R("mixer.fc1_latent_proj.weight"),
    "mlp.fc2_latent_proj.weight": R("mixer.fc2_latent_proj.weight"),
}

EXPERT_NAMES = {
    "up": "mixer.experts.{E}.up_proj.weight",
    "down": "mixer.experts.{E}.down_proj.weight",
}


def _check(info: ModelInfo) -> None:
    c, a = info.config, info.attrs
    m = MODEL_TYPE
    types = info.layer_types
    require(
        types is not None,
        f"{m} is a hybrid Mamba/attention/MLP/MoE stack (Megatron-Core MambaModel with "
        "hybrid_override_pattern); the model has no hybrid stack",
    )
    require(c.normalization == "RMSNorm", f"{m} needs RMSNorm, the model uses {c.normalization}")
    # transformers' NemotronH never ties lm_head to the embeddings (_tied_weights_keys = {}):
    # a tied export would load with a random head (found by the config fuzzer, issue 21)
    require(not info.attrs.tie_word_embeddings,
            f"{m} has its own lm_head (transformers' NemotronH does not tie it); the model has "
            f"share_embeddings_and_output_weights=True")
    require(not getattr(c, "layernorm_zero_centered_gamma", False), f"{m} has no zero-centred norm weights (layernorm_zero_centered_gamma=True)")
    require(not c.gated_linear_unit, f"{m} MLPs and experts are not gated (up/down only); the model has gated_linear_unit=True")
    activation_name(c)  # raises on an activation HF cannot name
    require(not c.add_bias_linear and not c.add_qkv_bias, f"{m} has no biases on linear layers (add_bias_linear/add_qkv_bias)")
    require(
        not getattr(c, "apply_residual_connection_post_layernorm", False),
        f"{m} adds each layer's input (before its norm) to the residual; the model has apply_residual_connection_post_layernorm=True",
    )
    require(
        a.position_embedding_type == "none",
        f"{m} has no position embeddings (its attention has no rotary embedding); "
        f"the model has position_embedding_type={a['position_embedding_type']!r}",
    )
    if "*" in types:
        require(not c.qk_layernorm, f"{m} attention has no qk-norm; the model has qk_layernorm=True")
        require(not getattr(c, "multi_latent_attention", False), f"{m} has no multi-latent attention")
        sm = getattr(c, "softmax_scale", None)
        kv = c.kv_channels or c.hidden_size // c.num_attention_heads
        require(sm is None or math.isclose(sm, kv ** -0.5), f"{m} scales attention by 1/sqrt(head_dim); the model has softmax_scale={sm}")
    if "M" in types:
        d = a.mamba
        require(d["rmsnorm"] and not d["norm_before_gate"], f"{m} Mamba mixers apply a gated RMSNorm after the gate (rmsnorm=True, norm_before_gate=False)")
        require(not d["D_has_hdim"], f"{m} has one D per Mamba head; the model has D_has_hdim=True")
        require(d["nheads"] % d["ngroups"] == 0, f"{m}: {d['nheads']} Mamba heads do not split into {d['ngroups']} groups")
        eps = d["norm_eps"]
        require(
            eps is None or math.isclose(c.layernorm_epsilon, eps, rel_tol=1e-9, abs_tol=0.0),
            f"{m} uses one epsilon (layer_norm_epsilon) for the block norms and the Mamba gated norm; "
            f"the model has layernorm_epsilon={c.layernorm_epsilon} and Mamba norm eps={eps}",
        )
    if "E" not in types:
        return
    require(bool(getattr(c, "num_moe_experts", None)), f"{m}: the pattern has MoE layers but the model has no experts")
    check_sigmoid_router(info, m)


def _config(info: ModelInfo) -> dict:
    c, a = info.config, info.attrs
    types = info.layer_types
    cfg = hf_config(
        info, MODEL_TYPE, "NemotronHForCausalLM",
        keys=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
              "attention_dropout", "initializer_range", "use_cache", "bos_token_id", "eos_token_id"),
        num_hidden_layers=len(types),
        layers_block_type=[HF_LAYER_TYPES[t] for t in types],
        # the same pattern in the older spelling (remote-code readers, transformers < 5)
        hybrid_override_pattern="".join(types),
        attention_bias=False,
        sliding_window=None,
        mlp_hidden_act=activation_name(c),
        mlp_bias=False,
        use_bias=False,
        layer_norm_epsilon=c.layernorm_epsilon,
        residual_in_fp32=bool(getattr(c, "fp32_residual_connection", False)),
        hidden_dropout=0.0,
        num_logits_to_keep=1,
        num_nextn_predict_layers=0,
        pad_token_id=None,
    )
    d = a.mamba
    if d:
        cfg.update(
            mamba_num_heads=d["nheads"],
            mamba_head_dim=d["headdim"],
            n_groups=d["ngroups"],
            ssm_state_size=d["d_state"],
            conv_kernel=d["d_conv"],
            use_conv_bias=d["conv_bias"],
            chunk_size=d["chunk_size"],
            mamba_hidden_act="silu",
            mamba_proj_bias=False,
            # Megatron's scan has no dt clamp; HF clamps dt at time_step_min (see module doc).
            time_step_min=0.0,
            time_step_max=0.1,
            time_step_floor=1e-4,
            mamba_ssm_cache_dtype="float32",
        )
        if d["d_inner"] % c.hidden_size == 0:
            cfg["expand"] = d["d_inner"] // c.hidden_size
    if "E" in types:
        topk = c.moe_router_topk
        gtopk = getattr(c, "moe_router_group_topk", None)
        cfg.update(
            n_routed_experts=c.num_moe_experts,
            num_experts_per_tok=topk,
            moe_intermediate_size=c.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=c.moe_shared_expert_intermediate_size,
            n_shared_experts=1,
            moe_latent_size=getattr(c, "moe_latent_size", None) or None,
            moe_shared_expert_overlap=bool(getattr(c, "moe_shared_expert_overlap", False)),
            n_group=c.moe_router_num_groups if gtopk else 1,
            topk_group=gtopk if gtopk else 1,
            routed_scaling_factor=float(c.moe_router_topk_scaling_factor or 1.0),
            norm_topk_prob=topk > 1,  # Megatron normalises the chosen sigmoid scores only when topk > 1
            output_router_logits=False,
        )
    return cfg


SEMANTICS = {
    **sem.REFUSED_COMMON, **sem.SHAPES, **sem.BLOCK, **sem.SIGMOID_MOE,
    "activation_func": sem.mapped("mlp_hidden_act"),
    "add_qkv_bias": sem.BY_CHECK,
    "layernorm_zero_centered_gamma": sem.BY_CHECK,
    "apply_residual_connection_post_layernorm": sem.BY_CHECK,
    "softmax_scale": sem.BY_CHECK,
    "mamba_state_dim": sem.mapped("ssm_state_size"),
    "mamba_head_dim": sem.mapped("mamba_head_dim"),
    "mamba_num_groups": sem.mapped("n_groups"),
    "mamba_num_heads": sem.mapped("mamba_num_heads"),
    "moe_latent_size": sem.mapped("moe_latent_size"),
    "moe_shared_expert_intermediate_size": sem.mapped("moe_shared_expert_intermediate_size"),
}


NEMOTRON_H = rule(ArchRule(
    model_type=MODEL_TYPE,
    architecture="NemotronHForCausalLM",
    layer_prefix="backbone.layers.{L}.",
    embedding="backbone.embeddings.weight",
    final_norm="backbone.norm_f.weight",
    final_norm_bias="backbone.norm_f.bias",
    output="lm_head.weight",
    layer_table=LAYER_TABLE,
    expert_names=EXPERT_NAMES,
    supports_moe=True,
    build_config=_config,
    check=_check,
    semantics=SEMANTICS,
    # What ModelOpt always leaves unquantized (its default_disabled_quantizers: `*router*`,
    # `*mixer.conv1d*`, `*lm_head*`/`*output_layer*`, embeddings), in HF names.  Mamba in_proj /
    # out_proj, attention and latent projections are quantized by some ModelOpt recipes
    # (mamba_moe_*_aggressive) and not by others (*_conservative): api._quant_summary lists
    # each one that has no quantizer by name, as ModelOpt's own export does.
    quant_exclude=("lm_head", "backbone.embeddings", "*.mixer.gate", "*.mixer.conv1d"),
    hybrid_native=True,
))

