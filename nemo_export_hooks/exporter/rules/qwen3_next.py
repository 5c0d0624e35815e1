"""Qwen3-Next (``qwen3_next``, transformers ``Qwen3NextForCausalLM``): Gated DeltaNet linear
attention and gated full attention, zero-centred norms, MoE with a gated shared expert.

megatron-core 0.19 builds the model in two forms, both exported (same layer-local names):

* ``GPTModel`` with ``experimental_attention_variant="gated_delta_net"`` (Megatron-Bridge's
  Qwen3-Next provider): one ``TransformerLayer`` per HF layer, ``linear_attention_freq`` (an
  int ``N``: every ``N``-th layer is full attention; or a list, 1 = linear) picks its mixer;
* ``HybridModel`` whose pattern pairs a token mixer with an MoE (or MLP) layer: ``G`` (Gated
  DeltaNet) or ``*`` (attention), then ``E`` / ``-``; HF layer ``k`` is Megatron layers
  ``2k, 2k+1`` (``GEGEGE*E`` = Qwen3-Next's three linear layers per full one).

Facts below are read from megatron-core 0.19.2 (``ssm/gated_delta_net/{common,gdn}.py``,
``transformer/attention.py``, ``transformer/moe/shared_experts.py``,
``models/hybrid/hybrid_layer_specs.py``) and transformers 5.23
(``models/qwen3_next/modeling_qwen3_next.py``).

Gated DeltaNet (Megatron ``self_attention.*`` of a ``G`` layer -> HF ``linear_attn.*``), with
``nk``/``nv`` key/value heads of ``dk``/``dv`` and ``r = nv // nk``:

* ``in_proj.weight`` ``[2*nk*dk + 2*nv*dv + 2*nv, H]``: Megatron rows are ``[q | k | v | z |
  beta | alpha]``, each part whole (``in_proj_split_sections``); HF has two projections grouped
  per key head: ``in_proj_qkvz`` = ``[q_h | k_h | v_h | z_h]`` for each key head ``h`` (``v_h``,
  ``z_h`` its ``r`` value heads; ``fix_query_key_value_ordering``), ``in_proj_ba`` = ``[b_h |
  a_h]`` (``b`` -> ``beta = sigmoid(b)``, ``a`` -> the decay, Megatron's ``alpha``).  A row
  selection (:class:`GatedDeltaNetInProj`).  Under TP each rank holds its heads of every part,
  ``[q_r | k_r | v_r | z_r | b_r | a_r]``, re-ordered part by part first, as Mamba's in_proj.
* ``conv1d.weight`` ``[2*nk*dk + nv*dv, 1, K]``: channels ``[q | k | v]`` in both (HF concatenates
  q, k, v before its conv); per-rank parts under TP.  HF's conv has no bias (Megatron's
  ``conv_bias`` defaults to False; a model with one is refused by name).
* ``A_log``, ``dt_bias`` ``[nv]`` and ``out_proj.weight`` ``[H, nv*dv]``: renamed.  Both compute
  ``g = -exp(A_log) * softplus(a + dt_bias)``, ``beta = sigmoid(b)``, l2-normalised q/k
  (eps 1e-6), q scaled by ``dk ** -0.5``, q/k heads repeated ``r`` times (``repeat_interleave``),
  the SiLU of the causal conv, and ``out_norm(core) * silu(z)`` per value head.
* ``out_norm.weight`` ``[dv]`` -> ``linear_attn.norm.weight``: HF's gated norm
  (``Qwen3NextRMSNormGated``) is plain, ``x_hat * w``; Megatron's ``out_norm`` is a ``TENorm``,
  zero-centred when the model is: ``+ 1`` then (:data:`~..mappings.ZERO_CENTRED_NORM`).

Norms: every other HF norm (``input_layernorm``, ``post_attention_layernorm``, ``q_norm``,
``k_norm``, ``model.norm``; ``Qwen3NextRMSNorm``) is zero-centred, ``x_hat * (1 + w)``, as
Megatron's with ``layernorm_zero_centered_gamma=True`` (Megatron-Bridge's Qwen3-Next setting):
copied unchanged then; a model with plain norms is exported with ``w - 1``
(:data:`PLAIN_TO_ZERO_CENTRED`).

Gated attention (``attention_output_gate=True``): Megatron's ``linear_qkv`` rows per query group
are ``[q heads | gate heads | k | v]`` (``get_query_key_value_tensors``); HF's ``q_proj`` is
``2 * heads * head_dim`` rows, ``[q_h | gate_h]`` per head (``torch.chunk`` of each head's
``2 * head_dim``); both apply ``attn * sigmoid(gate)`` before ``o_proj``.  Partial rotary
(``rotary_percent`` = ``partial_rotary_factor``, rotate-half on the first dims; see
``glm4_moe.py``), per-head qk-norm before it.

MoE: softmax router, top-k renormalised (Megatron's default top-k-then-softmax; pre-softmax
leaves them unnormalised: ``norm_topk_prob``), ``mlp.router.weight`` -> ``mlp.gate.weight``,
experts ``mlp.experts.{E}.{gate,up,down}_proj`` on disk (transformers 5 fuses them in memory).
The shared expert (one, ``mlp.shared_expert.*``, singular) is gated in HF:
``sigmoid(shared_expert_gate(x)) * shared_expert(x)``; Megatron's
``moe_shared_expert_gate=True`` computes the same with ``shared_experts.gate_weight``
``[1, H]`` -> ``mlp.shared_expert_gate.weight``.  Dense layers (``-``) are ``mlp_only_layers``,
``intermediate_size = ffn_hidden_size``.

Not checked: ``GatedDeltaNet``'s ``use_qk_l2norm`` (a spec parameter, default True, not in
``TransformerConfig``; HF always l2-normalises q/k) and ``A_init_range`` (initialisation only).

Not expressible (refused at planning, naming the setting): attention without the output gate
or without qk-norm, a shared expert without its gate, models without shared experts, biases,
sigmoid / grouped / scaled routers, Mamba or other mixers (a hybrid pattern that does not pair into
``G``/``*`` + ``E``/``-``, another ``experimental_attention_variant``), learned or no position
embeddings.
"""

from __future__ import annotations

import math

import torch

from .. import mappings as mk
from .. import semantics as sem
from . import rule
from .base import (
    GLU,
    SWIGLU_EXPERTS,
    ArchMismatchError,
    ArchRule,
    Entry,
    ModelInfo,
    R,
    activation_name,
    hf_config,
    require,
)

MODEL_TYPE = "qwen3_next"


def _zero_centred(info) -> bool:
    return bool(getattr(info.config, "layernorm_zero_centered_gamma", False))


# HF Qwen3NextRMSNorm computes x_hat * (1 + w): a plain Megatron norm weight w is 1 + (w - 1).
PLAIN_TO_ZERO_CENTRED = mk.ValueTransform(
    "plain norm weight - 1 (Qwen3-Next norms are zero-centred)",
    lambda t: (t.float() - 1).to(t.dtype),
    when=lambda info: not _zero_centred(info),
)


def BLOCK_NORM(target: str) -> Entry:
    """A norm HF keeps zero-centred."""
    return Entry(mk.rename, (target,), PLAIN_TO_ZERO_CENTRED)


def gdn_dims(info: ModelInfo) -> tuple[int, int, int, int]:
    c = info.config
    return int(c.linear_num_key_heads), int(c.linear_num_value_heads), int(c.linear_key_head_dim), int(c.linear_value_head_dim)


class GatedDeltaNetInProj:
    """Mapping kind of ``GatedDeltaNet.in_proj.weight`` -> ``(in_proj_qkvz, in_proj_ba)``, bound
    to the TP size by the planner (see the module doc): rows ``[q | k | v | z | beta | alpha]``
    (per rank under TP) -> per key head ``[q_h | k_h | v_h | z_h]`` and ``[b_h | a_h]``."""

    name = "self_attention.in_proj"

    def bind_tp(self, info: ModelInfo, tp: int):
        nk, nv, dk, dv = gdn_dims(info)
        r = nv // nk
        sizes = [nk * dk, nk * dk, nv * dv, nv * dv, nv, nv]
        q0, k0, v0, z0, b0, a0 = (sum(sizes[:i]) for i in range(6))

        def kind(targets, rows, shape=None):
            qkvz, ba = targets
            if rows != sum(sizes):
                raise ValueError(f"{self.name} has {rows} rows, expected {sum(sizes)} = {' + '.join(map(str, sizes))}")
            # gathered row of every row of the whole-part order [q | k | v | z | b | a]
            whole = mk.per_rank_parts_rows(sizes, tp) if tp > 1 else torch.arange(rows)

            def run(start, n, h):
                return torch.arange(start + h * n, start + (h + 1) * n)

            per_head = [torch.cat([run(q0, dk, h), run(k0, dk, h), run(v0, r * dv, h), run(z0, r * dv, h)]) for h in range(nk)]
            per_head_ba = [torch.cat([run(b0, r, h), run(a0, r, h)]) for h in range(nk)]
            return [(qkvz, whole[torch.cat(per_head)]), (ba, whole[torch.cat(per_head_ba)])]

        kind.__name__ = f"gdn_in_proj_tp{tp}"
        return kind

    def __call__(self, targets, rows, shape=None):
        raise TypeError(f"{self.name}: the row order depends on the TP size; the planner binds it with bind_tp()")


def _conv_parts(info: ModelInfo):
    nk, nv, dk, dv = gdn_dims(info)
    return [nk * dk, nk * dk, nv * dv]  # q, k, v channels


def qkv_gated_split(targets, rows: int, shape: mk.AttentionShape | None = None) -> mk.RowPlan:
    """``attention_output_gate``: Megatron's ``linear_qkv`` per query group ``[q heads | gate
    heads | k | v]`` -> HF ``q_proj`` ``[q_h | gate_h]`` per head, ``k_proj``, ``v_proj``."""
    q, k, v = targets
    assert shape is not None
    ng, hd = shape.num_query_groups, shape.head_dim
    per = shape.num_heads // ng
    expected = ng * (2 * per + 2) * hd
    if rows != expected:
        raise ValueError(
            f"gated linear_qkv has {rows} rows, expected {expected} for {shape.num_heads} heads (each with an output "
            f"gate), {ng} query groups and head dim {hd}"
        )
    idx = torch.arange(rows).view(ng, 2 * per + 2, hd)
    q_and_gate = torch.stack((idx[:, :per], idx[:, per:2 * per]), dim=2)  # [ng, per, 2, hd]
    return [(q, q_and_gate.reshape(-1)), (k, idx[:, 2 * per].reshape(-1)), (v, idx[:, 2 * per + 1].reshape(-1))]


GDN = "linear_attn."
LAYER = {
    # pre-norms: local names and the TE fused-norm names
    "input_layernorm.weight": BLOCK_NORM("input_layernorm.weight"),
    "self_attention.linear_qkv.layer_norm_weight": BLOCK_NORM("input_layernorm.weight"),
    "self_attention.in_proj.layer_norm_weight": BLOCK_NORM("input_layernorm.weight"),
    "pre_mlp_layernorm.weight": BLOCK_NORM("post_attention_layernorm.weight"),
    "mlp.linear_fc1.layer_norm_weight": BLOCK_NORM("post_attention_layernorm.weight"),
    # Gated DeltaNet
    "self_attention.in_proj.weight": Entry(GatedDeltaNetInProj(), (GDN + "in_proj_qkvz.weight", GDN + "in_proj_ba.weight")),
    "self_attention.conv1d.weight": Entry(mk.PerRankParts("self_attention.conv1d", _conv_parts), (GDN + "conv1d.weight",)),
    "self_attention.A_log": R(GDN + "A_log"),
    "self_attention.dt_bias": R(GDN + "dt_bias"),
    "self_attention.out_norm.weight": Entry(mk.rename, (GDN + "norm.weight",), mk.ZERO_CENTRED_NORM),
    "self_attention.out_proj.weight": R(GDN + "out_proj.weight"),
    # gated attention
    "self_attention.linear_qkv.weight": Entry(qkv_gated_split, ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
    "self_attention.q_layernorm.weight": BLOCK_NORM("self_attn.q_norm.weight"),
    "self_attention.k_layernorm.weight": BLOCK_NORM("self_attn.k_norm.weight"),
    "self_attention.linear_proj.weight": R("self_attn.o_proj.weight"),
    # dense MLP
    "mlp.linear_fc1.weight": GLU("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2.weight": R("mlp.down_proj.weight"),
    # MoE (routed experts: expert_names)
    "mlp.router.weight": R("mlp.gate.weight"),
    "mlp.shared_experts.linear_fc1.weight": GLU("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight"),
    "mlp.shared_experts.linear_fc2.weight": R("mlp.shared_expert.down_proj.weight"),
    "mlp.shared_experts.gate_weight": R("mlp.shared_expert_gate.weight"),
}


def mixer_types(info: ModelInfo, m: str = MODEL_TYPE) -> list[str]:
    """The token mixer of every HF layer, ``"G"`` (Gated DeltaNet) or ``"*"`` (attention): from
    the hybrid pattern, or for a ``GPTModel`` from ``experimental_attention_variant`` and
    ``linear_attention_freq`` (megatron-core's ``get_linear_attention_pattern``: an int ``N``
    makes every ``N``-th layer full attention, a list says 1 for linear attention)."""
    if info.layer_types is not None:
        out = [""] * info.num_layers
        for i, t in enumerate(info.layer_types):
            if i % 2 == 0:
                out[info.hf_layer_of[i]] = t
        return out
    c, n = info.config, info.num_layers
    variant = getattr(c, "experimental_attention_variant", None)
    if variant is None:
        return ["*"] * n
    require(
        variant == "gated_delta_net",
        f"{m} mixes Gated DeltaNet and full attention; the model has experimental_attention_variant={variant!r}",
    )
    freq = c.linear_attention_freq
    if isinstance(freq, int) and not isinstance(freq, bool):
        return ["*" if (i + 1) % freq == 0 else "G" for i in range(n)]
    pattern = list(freq or [])
    require(len(pattern) == n, f"{m}: linear_attention_freq={freq!r} does not give one entry per layer ({n})")
    return ["G" if x else "*" for x in pattern]


def hf_layer_types(info: ModelInfo, m: str = MODEL_TYPE) -> list[str]:
    """``linear_attention`` / ``full_attention`` of every HF layer."""
    return ["linear_attention" if t == "G" else "full_attention" for t in mixer_types(info, m)]


def check_family(info: ModelInfo, m: str) -> None:
    """Everything Qwen3-Next and Qwen3.5-MoE share (``m`` names the arch in messages)."""
    c, a = info.config, info.attrs
    # transformers 5.23's forward fails without a full-attention layer (its cache asks one for
    # the sequence length); found by the config fuzzer (issue 21)
    require("full_attention" in hf_layer_types(info, m),
            f"{m} needs at least one full-attention layer (transformers' cache reads the sequence length from one); "
            f"the model has only Gated DeltaNet layers")
    require(c.normalization == "RMSNorm", f"{m} needs RMSNorm, the model uses {c.normalization}")
    require(c.gated_linear_unit, f"{m} needs a gated MLP (gated_linear_unit=True)")
    require(activation_name(c) == "silu", f"{m} needs SiLU (its MLPs, the DeltaNet conv and gated norm), the model uses {activation_name(c)}")
    require(not c.add_bias_linear and not c.add_qkv_bias, f"{m} has no biases on linear layers (add_bias_linear/add_qkv_bias)")
    require(
        not getattr(c, "apply_residual_connection_post_layernorm", False),
        f"{m} adds each layer's input (before its norm) to the residual; the model has apply_residual_connection_post_layernorm=True",
    )
    types = mixer_types(info, m)
    if "*" in types:
        require(a.position_embedding_type == "rope", f"{m} needs rotary embeddings, the model has {a['position_embedding_type']!r}")
        require(not a.rope_scaling, f"{m} export has no rope scaling (the model uses rotary_scaling)")
        require(not c.rotary_interleaved, f"{m} rotates halves (rotate_half); the model has rotary_interleaved=True")
        require(not getattr(c, "multi_latent_attention", False), f"{m} has no multi-latent attention")
        require(
            bool(getattr(c, "attention_output_gate", False)),
            f"{m} attention always has an output gate (q_proj is 2 * heads * head_dim wide); "
            "the model has attention_output_gate=False",
        )
        require(bool(c.qk_layernorm), f"{m} attention always has qk-norm; the model has qk_layernorm=False")
        head_dim = c.kv_channels or c.hidden_size // c.num_attention_heads
        rot = int(head_dim * a.rotary_percent)
        require(
            0 < rot <= head_dim and rot % 2 == 0,
            f"{m}: rotary_percent={a['rotary_percent']} of head dim {head_dim} gives {rot} rotary dims (needs an even count > 0)",
        )
        sm = getattr(c, "softmax_scale", None)
        require(sm is None or math.isclose(sm, head_dim ** -0.5), f"{m} scales attention by 1/sqrt(head_dim); the model has softmax_scale={sm}")
    if "G" in types:
        nk, nv, dk, dv = gdn_dims(info)
        require(nv % nk == 0, f"{m}: linear_num_value_heads={nv} is not a multiple of linear_num_key_heads={nk}")
    if not info.moe_layers:
        return
    score = getattr(c, "moe_router_score_function", "softmax")
    require(score == "softmax", f"{m} routes with softmax; the model uses {score} (moe_router_score_function)")
    require(not info.has_expert_bias, f"{m} has no router expert bias (moe_router_enable_expert_bias=True)")
    require(
        getattr(c, "moe_router_topk_scaling_factor", None) in (None, 1.0),
        f"{m} has no routed scaling factor (moe_router_topk_scaling_factor={c.moe_router_topk_scaling_factor})",
    )
    require(not getattr(c, "moe_router_num_groups", None), f"{m} has no group-limited routing (moe_router_num_groups)")
    require(info.has_shared_experts, f"{m} MoE layers always have a shared expert; the model has none (moe_shared_expert_intermediate_size)")
    require(
        bool(getattr(c, "moe_shared_expert_gate", False)),
        f"{m} gates its shared expert (sigmoid(shared_expert_gate(x))); the model has moe_shared_expert_gate=False",
    )


def _check(info: ModelInfo) -> None:
    check_family(info, MODEL_TYPE)


def family_config(info: ModelInfo, model_type: str, architecture: str, **extra) -> dict:
    """HF config keys Qwen3-Next and Qwen3.5-MoE share."""
    c, a = info.config, info.attrs
    return hf_config(
        info, model_type, architecture,
        hidden_act=activation_name(c),
        attention_bias=False,
        partial_rotary_factor=float(a.rotary_percent),
        rope_scaling=None,
        # transformers 5 reads rope_parameters (and folds the keys above into it when absent)
        rope_parameters={"rope_type": "default", "rope_theta": a.rotary_base, "partial_rotary_factor": float(a.rotary_percent)},
        layer_types=hf_layer_types(info, model_type),
        linear_conv_kernel_dim=int(c.linear_conv_kernel_dim),
        linear_key_head_dim=int(c.linear_key_head_dim),
        linear_value_head_dim=int(c.linear_value_head_dim),
        linear_num_key_heads=int(c.linear_num_key_heads),
        linear_num_value_heads=int(c.linear_num_value_heads),
        num_experts=int(c.num_moe_experts or 0) if info.moe_layers else 0,
        num_experts_per_tok=int(c.moe_router_topk) if info.moe_layers else 1,
        moe_intermediate_size=int(c.moe_ffn_hidden_size or c.ffn_hidden_size) if info.moe_layers else c.ffn_hidden_size,
        shared_expert_intermediate_size=int(c.moe_shared_expert_intermediate_size or 0) if info.moe_layers else 0,
        # Megatron's default (top-k of the logits, then softmax over the k) is normalised top-k
        norm_topk_prob=not bool(getattr(c, "moe_router_pre_softmax", False)),
        output_router_logits=False,
        router_aux_loss_coef=float(getattr(c, "moe_aux_loss_coeff", 0.0) or 0.0),
        **extra,
    )


def _config(info: ModelInfo) -> dict:
    dense = [i for i in range(info.num_layers) if i not in info.moe_layers]
    return family_config(info, MODEL_TYPE, "Qwen3NextForCausalLM", decoder_sparse_step=1, mlp_only_layers=dense)


# The ledger (exporter/semantics.py), shared with qwen3_5_moe_text.
FAMILY_SEMANTICS = {
    **sem.REFUSED_COMMON, **sem.SHAPES, **sem.BLOCK, **sem.SOFTMAX_MOE,
    "ffn_hidden_size": sem.mapped("intermediate_size", "moe_intermediate_size"),
    "moe_shared_expert_intermediate_size": sem.mapped("shared_expert_intermediate_size"),
    "moe_shared_expert_gate": sem.BY_CHECK,
    "moe_router_pre_softmax": sem.mapped("norm_topk_prob"),
    "layernorm_zero_centered_gamma": sem.mapped(why="plain norms written as w - 1 (PLAIN_TO_ZERO_CENTRED)"),
    "apply_residual_connection_post_layernorm": sem.BY_CHECK,
    "attention_output_gate": sem.BY_CHECK,
    "rotary_interleaved": sem.BY_CHECK,
    "softmax_scale": sem.BY_CHECK,
    "experimental_attention_variant": sem.BY_CHECK,
    "linear_attention_freq": sem.mapped("layer_types"),
    "linear_conv_kernel_dim": sem.mapped("linear_conv_kernel_dim"),
    "linear_key_head_dim": sem.mapped("linear_key_head_dim"),
    "linear_value_head_dim": sem.mapped("linear_value_head_dim"),
    "linear_num_key_heads": sem.mapped("linear_num_key_heads"),
    "linear_num_value_heads": sem.mapped("linear_num_value_heads"),
}

QWEN3_NEXT = rule(ArchRule(
    model_type=MODEL_TYPE,
    architecture="Qwen3NextForCausalLM",
    layer_table=LAYER,
    expert_names=SWIGLU_EXPERTS,
    supports_moe=True,
    build_config=_config,
    check=_check,
    semantics=FAMILY_SEMANTICS,
    final_norm_transform=PLAIN_TO_ZERO_CENTRED,
    hybrid_mixers=("*", "G"),
    # ModelOpt's defaults leave routers, the shared-expert gate and the DeltaNet conv unquantized
    quant_exclude=("lm_head", "model.embed_tokens", "*.mlp.gate", "*.mlp.shared_expert_gate", "*.linear_attn.conv1d"),
))

__all__ = ["FAMILY_SEMANTICS", "QWEN3_NEXT", "ArchMismatchError", "GatedDeltaNetInProj", "PLAIN_TO_ZERO_CENTRED", "check_family", "family_config", "gdn_dims",
           "hf_layer_types", "mixer_types", "qkv_gated_split"]
