"""Qwen3.5-MoE language model (``qwen3_5_moe_text``, transformers ``Qwen3_5MoeForCausalLM``).

The arch is named by the ``model_type`` it writes: transformers 5.23 calls the multimodal
checkpoint ``qwen3_5_moe`` (``Qwen3_5MoeForConditionalGeneration``, a vision tower plus this
language model under ``model.language_model``) and the language model alone
``qwen3_5_moe_text``.  Megatron's language model has no vision tower, so the export is the
text model: ``AutoModelForCausalLM`` loads it (``model.*`` names, as ``save_pretrained`` of
``Qwen3_5MoeForCausalLM`` writes them).

Qwen3.5-MoE is Qwen3-Next's architecture (``qwen3_next.py`` has the facts and the shared
checks and table) with two differences, read from transformers 5.23
``models/qwen3_5_moe/modeling_qwen3_5_moe.py``:

* the Gated DeltaNet input projection is four HF tensors, each one whole part, in Megatron's
  own order: ``in_proj_qkv`` = ``[q | k | v]`` (all heads), ``in_proj_z``, ``in_proj_b``
  (-> ``beta``), ``in_proj_a`` (the decay); Megatron's ``in_proj`` is ``[q | k | v | z | beta |
  alpha]`` -- a split into contiguous runs (per-rank parts re-ordered first under TP);
* every layer is an MoE layer (``Qwen3_5MoeDecoderLayer`` has no dense MLP): a model with dense
  layers is refused;
* the router (``Qwen3_5MoeTopKRouter``) always renormalises the top-k probabilities and reads
  no ``norm_topk_prob`` (Qwen3-Next's router does): Megatron's default top-k-then-softmax is
  exactly that, but ``moe_router_pre_softmax=True`` (softmax over all experts, top-k kept
  unnormalised) is not expressible and is refused by name.

Rotary embeddings are multimodal (``mrope_section``) in HF, but a text-only sequence has the same
position in all three sections, which is plain (partial) rope -- what Megatron computes.
"""

from __future__ import annotations

import torch

from .. import mappings as mk
from .. import semantics as sem
from . import rule
from .base import SWIGLU_EXPERTS, ArchRule, Entry, ModelInfo, require
from .qwen3_next import FAMILY_SEMANTICS, GDN, LAYER as NEXT_LAYER, PLAIN_TO_ZERO_CENTRED, check_family, family_config, gdn_dims

MODEL_TYPE = "qwen3_5_moe_text"


class GatedDeltaNetInProjParts:
    """``GatedDeltaNet.in_proj.weight`` -> ``(in_proj_qkv, in_proj_z, in_proj_b, in_proj_a)``,
    bound to the TP size by the planner: rows ``[q | k | v | z | beta | alpha]`` (per rank under
    TP, each rank's slice of every part) -> ``[q | k | v]``, ``z``, ``beta``, ``alpha``."""

    name = "self_attention.in_proj"

    def bind_tp(self, info: ModelInfo, tp: int):
        nk, nv, dk, dv = gdn_dims(info)
        sizes = [nk * dk, nk * dk, nv * dv, nv * dv, nv, nv]
        qkv = z0 = 2 * nk * dk + nv * dv  # [q | k | v] ends where z starts
        b0 = z0 + nv * dv
        a0 = b0 + nv

        def kind(targets, rows, shape=None):
            t_qkv, t_z, t_b, t_a = targets
            if rows != sum(sizes):
                raise ValueError(f"{self.name} has {rows} rows, expected {sum(sizes)} = {' + '.join(map(str, sizes))}")
            if tp == 1:  # contiguous runs: views, no gather
                return [(t_qkv, torch.arange(0, qkv)), (t_z, torch.arange(z0, z0 + nv * dv)),
                        (t_b, torch.arange(b0, b0 + nv)), (t_a, torch.arange(a0, a0 + nv))]
            whole = mk.per_rank_parts_rows(sizes, tp)
            return [(t_qkv, whole[:qkv]), (t_z, whole[z0:z0 + nv * dv]), (t_b, whole[b0:b0 + nv]), (t_a, whole[a0:a0 + nv])]

        kind.__name__ = f"gdn_in_proj_parts_tp{tp}"
        return kind

    def __call__(self, targets, rows, shape=None):
        raise TypeError(f"{self.name}: the row order depends on the TP size; the planner binds it with bind_tp()")


LAYER = {
    **{k: v for k, v in NEXT_LAYER.items() if not k.startswith("mlp.linear_fc")},  # no dense MLPs
    "self_attention.in_proj.weight": Entry(
        GatedDeltaNetInProjParts(),
        (GDN + "in_proj_qkv.weight", GDN + "in_proj_z.weight", GDN + "in_proj_b.weight", GDN + "in_proj_a.weight"),
    ),
}


def _check(info: ModelInfo) -> None:
    check_family(info, MODEL_TYPE)
    dense = [i for i in range(info.num_layers) if i not in info.moe_layers]
    require(
        not dense,
        f"{MODEL_TYPE} has an MoE block in every layer (no dense MLP layers); the model's layers {dense} of "
        f"{info.num_layers} are dense",
    )
    require(
        not getattr(info.config, "moe_router_pre_softmax", False),
        f"{MODEL_TYPE}'s router (Qwen3_5MoeTopKRouter) always renormalises the top-k probabilities; the model has "
        "moe_router_pre_softmax=True (unnormalised top-k of a softmax over all experts), which it cannot express",
    )


def _config(info: ModelInfo) -> dict:
    cfg = family_config(info, MODEL_TYPE, "Qwen3_5MoeForCausalLM")
    cfg.pop("intermediate_size")  # no dense MLPs: Qwen3_5MoeTextConfig has no such key
    return cfg


SEMANTICS = {
    **FAMILY_SEMANTICS,
    "ffn_hidden_size": sem.mapped("moe_intermediate_size", why="every layer is MoE (checked); no dense width"),
    "moe_layer_freq": sem.BY_CHECK,  # MoE in every layer
    "moe_router_pre_softmax": sem.BY_CHECK,  # Qwen3_5MoeTopKRouter always renormalises: refused
}


QWEN3_5_MOE = rule(ArchRule(
    model_type=MODEL_TYPE,
    architecture="Qwen3_5MoeForCausalLM",
    layer_table=LAYER,
    expert_names=SWIGLU_EXPERTS,
    supports_moe=True,
    build_config=_config,
    check=_check,
    semantics=SEMANTICS,
    final_norm_transform=PLAIN_TO_ZERO_CENTRED,
    hybrid_mixers=("*", "G"),
    quant_exclude=("lm_head", "model.embed_tokens", "*.mlp.gate", "*.mlp.shared_expert_gate", "*.linear_attn.conv1d"),
))
