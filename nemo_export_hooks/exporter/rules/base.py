"""What an architecture rule is: a declarative name table plus a config builder.

A rule says, for one Hugging Face ``model_type``:
* ``layer_table``: Megatron layer-local tensor name -> (mapping kind, HF names relative to
  the HF layer prefix).  Several Megatron names may map to the same HF name (the local
  spec's ``input_layernorm.weight`` and TE's fused ``linear_qkv.layer_norm_weight``).
* ``expert_names``: HF names of one routed expert's projections (``{E}`` = global expert id).
* top-level names (embedding, final norm, output layer).
* ``build_config``: the HF ``config.json`` generated from ``TransformerConfig`` alone.

A Megatron tensor with no entry in the table means the model does not fit the arch; the
exporter refuses before writing anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .. import mappings as mk


@dataclass(frozen=True)
class Entry:
    """One mapping: a row selection (``kind``) into ``targets``, optionally followed by a
    value transform of each output (see :class:`~..mappings.ValueTransform`)."""

    kind: mk.MappingKind
    targets: tuple[str, ...]
    transform: Optional[mk.ValueTransform] = None
    # Split across tensor parallelism along this dim although Megatron does not mark the
    # parameter ``tensor_model_parallel`` (attention sinks: one value per local head)
    tp_split: Optional[int] = None

    def then(self, transform: mk.ValueTransform) -> "Entry":
        return Entry(self.kind, self.targets, transform, self.tp_split)


def R(*targets: str) -> Entry:
    return Entry(mk.rename, targets)


def NORM(target: str) -> Entry:
    """A norm weight: renamed, ``+ 1`` when the model stores it zero-centred."""
    return Entry(mk.rename, (target,), mk.ZERO_CENTRED_NORM)


def QKV(*targets: str) -> Entry:
    return Entry(mk.qkv_split, targets)


def GLU(*targets: str) -> Entry:
    return Entry(mk.glu_split, targets)


class ArchMismatchError(ValueError):
    """The model's structure does not fit the requested architecture."""


ACTIVATIONS = {"silu": "silu", "gelu": "gelu_pytorch_tanh", "relu": "relu", "squared_relu": "relu2"}


def activation_name(config) -> str:
    """Name Megatron's activation function the way HF configs do; unknown ones raise."""
    import torch.nn.functional as F

    fn = config.activation_func
    if fn is F.silu:
        return "silu"
    if fn is F.gelu:
        return "gelu"
    if fn is F.relu:
        return "relu"
    name = getattr(fn, "__name__", repr(fn))
    if "squared_relu" in name:
        return "relu2"
    if name == "<lambda>":
        # A lambda: probe it (squared ReLU is commonly written as one).
        x = torch.tensor([-1.0, 0.5, 2.0])
        y = fn(x)
        if torch.allclose(y, torch.relu(x) ** 2):
            return "relu2"
        if torch.allclose(y, torch.nn.functional.silu(x)):
            return "silu"
    raise ArchMismatchError(f"unsupported activation function {name!r}: export supports silu, gelu, relu, squared relu")


@dataclass
class ModelInfo:
    """Everything a rule needs to know about the model, read from config and attributes."""

    config: Any  # megatron TransformerConfig
    attrs: Any  # source.ModelAttrs (typed; attrs["name"] also works)
    moe_layers: list[int]  # global indices of MoE layers
    num_layers: int
    has_shared_experts: bool
    has_expert_bias: bool
    # Hybrid (MambaModel / HybridModel) stacks: the type of every global layer, in Megatron's
    # symbols ("M" Mamba, "*" attention, "-" MLP, "E" MoE); None for a GPTModel.
    layer_types: Optional[list[str]] = None
    # A hybrid stack exported to a transformer arch (one HF layer = attention + MLP/MoE): the HF
    # layer index of every Megatron global layer ("*E*E" -> [0, 0, 1, 1]); None otherwise.
    hf_layer_of: Optional[list[int]] = None


@dataclass
class ArchRule:
    model_type: str
    architecture: str
    layer_prefix: str = "model.layers.{L}."
    embedding: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    final_norm_bias: str = "model.norm.bias"
    output: str = "lm_head.weight"
    layer_table: dict[str, Entry] = field(default_factory=dict)
    expert_names: dict[str, str] = field(default_factory=dict)  # gate/up/down (or up/down)
    # Or all of a layer's experts in one HF tensor per projection: {"fc1": ..., "fc2": ...}
    expert_stack: dict[str, mk.ExpertStack] = field(default_factory=dict)
    final_norm_transform: Optional[mk.ValueTransform] = None
    supports_moe: bool = False
    build_config: Optional[Callable[[ModelInfo], dict]] = None
    check: Optional[Callable[[ModelInfo], None]] = None
    # Names excluded from quantization in HF terms (router, embeddings, lm_head), as patterns.
    quant_exclude: tuple[str, ...] = ("lm_head",)
    # The HF model is itself a hybrid stack, one HF layer per Megatron layer (nemotron_h).
    # Otherwise a hybrid Megatron stack must pair into attention + MLP/MoE layers.
    hybrid_native: bool = False
    # A hybrid stack exported to this (transformer) arch: the Megatron layer symbols that may
    # open an HF layer (attention ``*``; Qwen3-Next also Gated DeltaNet ``G``)
    hybrid_mixers: tuple[str, ...] = ("*",)
    # The semantics ledger (exporter/semantics.py): how this rule handles every megatron-core
    # config field that changes the forward and that it supports -- mapped to HF keys, required
    # to hold a value, or refused.  A forward-changing field missing here that differs from
    # megatron-core's default is refused at planning, naming the field.
    semantics: dict = field(default_factory=dict)

    def entry(self, local_name: str) -> Entry:
        e = self.layer_table.get(local_name)
        if e is None:
            raise ArchMismatchError(
                f"model has `{local_name}` in its layers, which arch {self.model_type!r} "
                "has no place for (the model's structure does not fit this architecture)"
            )
        return e


# Tensors Megatron keeps that are not weights of the model.
IGNORED_SUFFIXES = ("_extra_state", "local_tokens_per_expert")


# -- shared pieces of the Llama-family tables ----------------------------------------------
ATTENTION = {
    "input_layernorm.weight": R("input_layernorm.weight"),
    "self_attention.linear_qkv.layer_norm_weight": R("input_layernorm.weight"),
    "self_attention.linear_qkv.weight": QKV("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attention.linear_proj.weight": R("self_attn.o_proj.weight"),
    "pre_mlp_layernorm.weight": R("post_attention_layernorm.weight"),
    "mlp.linear_fc1.layer_norm_weight": R("post_attention_layernorm.weight"),
}
QKV_BIAS = {
    "self_attention.linear_qkv.bias": QKV("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
}
QK_NORM = {
    "self_attention.q_layernorm.weight": R("self_attn.q_norm.weight"),
    "self_attention.k_layernorm.weight": R("self_attn.k_norm.weight"),
}
DENSE_MLP = {
    "mlp.linear_fc1.weight": GLU("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2.weight": R("mlp.down_proj.weight"),
}
SWIGLU_EXPERTS = {
    "gate": "mlp.experts.{E}.gate_proj.weight",
    "up": "mlp.experts.{E}.up_proj.weight",
    "down": "mlp.experts.{E}.down_proj.weight",
}


def _head_dim(c) -> int:
    return c.kv_channels or c.hidden_size // c.num_attention_heads


# One table of the HF config keys rules share, each read from the model once; a rule takes
# the keys it needs (:func:`hf_config`) and adds or overrides its own.
HF_KEYS: dict[str, Callable[[ModelInfo], Any]] = {
    "vocab_size": lambda i: i.attrs.vocab_size,
    "hidden_size": lambda i: i.config.hidden_size,
    "intermediate_size": lambda i: i.config.ffn_hidden_size,
    "num_hidden_layers": lambda i: i.num_layers,
    "num_attention_heads": lambda i: i.config.num_attention_heads,
    "num_key_value_heads": lambda i: i.config.num_query_groups or i.config.num_attention_heads,
    "head_dim": lambda i: _head_dim(i.config),
    "max_position_embeddings": lambda i: i.attrs.max_sequence_length,
    "rms_norm_eps": lambda i: i.config.layernorm_epsilon,
    "rope_theta": lambda i: i.attrs.rotary_base,
    "tie_word_embeddings": lambda i: i.attrs.tie_word_embeddings,
    "attention_dropout": lambda i: 0.0,
    "initializer_range": lambda i: i.config.init_method_std,
    "use_cache": lambda i: True,
    "bos_token_id": lambda i: None,
    "eos_token_id": lambda i: None,
}


def hf_config(info: ModelInfo, model_type: str, architecture: str, keys=tuple(HF_KEYS), **extra) -> dict:
    """``architectures``, ``model_type``, the shared ``keys`` from :data:`HF_KEYS`, then the
    rule's own ``extra`` keys (which may override shared ones)."""
    cfg = {"architectures": [architecture], "model_type": model_type}
    cfg.update({k: HF_KEYS[k](info) for k in keys})
    cfg.update(extra)
    return cfg


def llama_family_config(info: ModelInfo, model_type: str, architecture: str) -> dict:
    """Fields every Llama-family HF config shares, from ``TransformerConfig``."""
    c = info.config
    return hf_config(
        info, model_type, architecture,
        hidden_act=activation_name(c),
        attention_bias=bool(c.add_qkv_bias or c.add_bias_linear),
    )


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ArchMismatchError(msg)


def check_llama_family(info: ModelInfo, model_type: str, qk_norm: bool | None) -> None:
    c = info.config
    require(c.normalization == "RMSNorm", f"{model_type} needs RMSNorm, the model uses {c.normalization}")
    require(c.gated_linear_unit, f"{model_type} needs a gated MLP (gated_linear_unit=True)")
    require(activation_name(c) == "silu", f"{model_type} needs SiLU, the model uses {activation_name(c)}")
    require(info.attrs.position_embedding_type == "rope", f"{model_type} needs rotary embeddings")
    require(info.attrs.rotary_percent == 1.0, f"{model_type} needs rotary_percent=1.0")
    # GPTModel(rope_scaling=True): Llama-3.1 frequency scaling, not written to config.json
    # (found by the config fuzzer, issue 21)
    require(not info.attrs.rope_scaling,
            f"{model_type} export writes no rope scaling; the model uses GPTModel(rope_scaling=True) (Llama-3.1 scaling)")
    require(not getattr(c, "multi_latent_attention", False), f"{model_type} has no multi-latent attention")
    if qk_norm is not None:
        require(
            bool(c.qk_layernorm) == qk_norm,
            f"{model_type} {'needs' if qk_norm else 'has no'} qk-norm; the model has qk_layernorm={c.qk_layernorm}",
        )
    require(not c.add_bias_linear, f"{model_type} has no biases on linear layers (add_bias_linear=True)")


# -- shared check fragments ------------------------------------------------------------------
def check_sigmoid_router(info: ModelInfo, model_type: str) -> None:
    """The DeepSeek-V3-style router HF models share (``deepseek_v3``, ``glm4_moe``,
    ``nemotron_h``): sigmoid scores, an expert bias that only chooses, shared experts, and
    group-limited routing ranking groups by the sum of their top-2 scores (HF) -- Megatron
    ranks them by the top ``topk // group_topk``, so only that value (or all groups) fits."""
    c, m = info.config, model_type
    score = getattr(c, "moe_router_score_function", "softmax")
    require(score == "sigmoid", f"{m} routes with sigmoid scores; the model's router uses {score} (moe_router_score_function)")
    require(
        info.has_expert_bias,
        f"{m} always has a router expert bias (e_score_correction_bias, topk_method noaux_tc); "
        "the model has moe_router_enable_expert_bias=False",
    )
    require(info.has_shared_experts, f"{m} always has shared experts; the model has none (moe_shared_expert_intermediate_size)")
    require(not getattr(c, "moe_shared_expert_gate", False), f"{m} shared experts have no gate (moe_shared_expert_gate=True)")
    n, topk = c.num_moe_experts, c.moe_router_topk
    groups, gtopk = getattr(c, "moe_router_num_groups", None), getattr(c, "moe_router_group_topk", None)
    if gtopk:
        require(n % groups == 0, f"{m}: {n} experts do not split into {groups} groups")
        require(
            topk // gtopk == 2 or gtopk == groups,
            f"{m} ranks expert groups by the sum of their top-2 scores; Megatron uses the top "
            f"moe_router_topk // moe_router_group_topk = {topk} // {gtopk} = {topk // gtopk}",
        )
    else:
        require(n >= 2, f"{m} routing needs at least 2 experts")
    require(
        getattr(c, "moe_router_topk_limited_devices", None) is None,
        f"{m}: moe_router_topk_limited_devices is not supported (use moe_router_num_groups/moe_router_group_topk)",
    )


def check_shared_experts_multiple(info: ModelInfo, model_type: str) -> None:
    """HF shared experts are ``n_shared_experts * moe_intermediate_size`` wide."""
    sh, ffn = info.config.moe_shared_expert_intermediate_size, info.config.moe_ffn_hidden_size
    require(
        sh % ffn == 0,
        f"{model_type} shared experts are n_shared_experts * moe_intermediate_size wide; "
        f"moe_shared_expert_intermediate_size={sh} is not a multiple of moe_ffn_hidden_size={ffn}",
    )


def sigmoid_router_config(info: ModelInfo) -> dict:
    """HF config keys of :func:`check_sigmoid_router`'s router (DeepSeek-V3 names)."""
    c = info.config
    topk = c.moe_router_topk
    gtopk = getattr(c, "moe_router_group_topk", None)
    return dict(
        n_routed_experts=c.num_moe_experts,
        num_experts_per_tok=topk,
        moe_intermediate_size=c.moe_ffn_hidden_size,
        n_shared_experts=c.moe_shared_expert_intermediate_size // c.moe_ffn_hidden_size,
        n_group=c.moe_router_num_groups if gtopk else 1,
        topk_group=gtopk if gtopk else 1,
        routed_scaling_factor=float(c.moe_router_topk_scaling_factor or 1.0),
        # Megatron normalises the gathered sigmoid scores only when topk > 1
        norm_topk_prob=topk > 1,
    )


def first_k_dense(info: ModelInfo, model_type: str) -> int:
    """HF builds MoE in every layer ``>= first_k_dense_replace``; Megatron's MoE layers must
    be exactly that suffix."""
    moe = sorted(info.moe_layers)
    if not moe:
        return info.num_layers
    k = moe[0]
    require(
        moe == list(range(k, info.num_layers)),
        f"{model_type} has dense layers first and MoE in every layer after them "
        f"(first_k_dense_replace); the model's MoE layers are {moe} of {info.num_layers}",
    )
    return k
