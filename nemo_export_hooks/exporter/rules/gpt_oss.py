"""gpt-oss (``gpt_oss``, transformers ``GptOssForCausalLM``).

Grouped-query attention with biases on q/k/v/o and a learned attention sink per head,
sliding-window and full attention layers alternating, and MoE in every layer with a biased
softmax router and clamped SwiGLU experts stored stacked.

Facts, read from transformers 4.57 ``models/gpt_oss/modeling_gpt_oss.py`` and Megatron-Core
0.15.3 (``transformer/dot_product_attention.py``, ``fusions/fused_softmax.py``,
``transformer/mlp.py``, ``transformer/utils.py``):

* Sinks: HF appends ``sinks[h]`` as one more logit to every softmax row and drops it after;
  Megatron ``softmax_type="learnable"`` (``SoftmaxOne``) does the same with
  ``core_attention.softmax_offset`` (one value per local head: split over TP along dim 0,
  but not marked ``tensor_model_parallel``, hence ``tp_split``).
* Sliding window: Megatron ``window_size=(W, 0)`` keeps keys ``q - W .. q`` (``W + 1`` of
  them); HF ``sliding_window=S`` keeps ``q - S < k <= q`` (``S``).  So ``S = W + 1``.
  Megatron windows layer ``i`` (1-based, Megatron layers: a hybrid ``*E*E`` stack numbers
  attention and MoE layers apart) unless ``i % window_attn_skip_freq == 0`` (or by a 0/1 list
  per Megatron layer); read per HF layer by :mod:`..windows`, written to ``layer_types``.
  vLLM 0.32 ignores ``layer_types`` and windows the even 0-based layers, and ignores
  ``rms_norm_eps`` (1e-5):
  models that differ are refused, as they would load there and compute something else.
* Experts: HF computes ``x @ gate_up_proj[e] + gate_up_proj_bias[e]`` with ``gate_up_proj``
  ``[E, H, 2F]``, gate/up columns interleaved (``gate = [..., ::2]``, ``up = [..., 1::2]``),
  then ``(clamp(up, -7, 7) + 1) * g * sigmoid(1.702 g)``, ``g = clamp(gate, max=7)``, and
  ``@ down_proj[e]`` ``[E, F, H]`` ``+ down_proj_bias[e]``.  Megatron's gated fc1 is
  ``[gate; up]`` along rows of ``[2F, H]``; with ``activation_func=quick_gelu``
  (``x * sigmoid(1.702 x)``), ``glu_linear_offset=1.0`` and
  ``activation_func_clamp_value=7.0`` it computes the same.  So each layer's experts are one
  :class:`~..mappings.ExpertStack` per projection: interleave the halves, transpose.
* Router: HF ``linear(x, weight, bias)``, top-k on the logits, softmax over the k; Megatron's
  ``TopKRouter`` with ``add_bias_linear`` has the bias and with ``moe_router_pre_softmax=False``
  routes the same way.
* RoPE: HF rotates halves (``chunk(2)``), as Megatron without ``rotary_interleaved``.
  Megatron ``position_embedding_type="yarn"`` (released gpt-oss: factor 32 over 4096
  positions, ``truncate`` False) exports as HF's YaRN when the attention factors agree
  (:func:`_check_yarn`); plain RoPE is written as YaRN with factor 1.0 (:func:`_rope`: the
  same function, and the only form vLLM's gpt-oss loads).
"""

from __future__ import annotations

import math

from .. import mappings as mk
from . import rule
from .. import semantics as sem
from ..windows import hf_windows
from .base import QKV, ArchRule, Entry, ModelInfo, R, hf_config, require

MODEL_TYPE = "gpt_oss"
ALPHA, LIMIT = 1.702, 7.0  # hard-wired in transformers' GptOssExperts
EPS = 1e-5  # hard-wired in vLLM's gpt-oss norms


def _transpose_last(s: tuple) -> tuple:
    return (*s[:-2], s[-1], s[-2])


GATE_UP = mk.ValueTransform(
    "gate/up interleaved and transposed ([E, 2F, H] -> [E, H, 2F])",
    lambda t: mk.interleave_halves(t, 1).transpose(1, 2),
    shape=_transpose_last,
)
GATE_UP_BIAS = mk.ValueTransform("gate/up interleaved ([E, 2F])", lambda t: mk.interleave_halves(t, 1))
DOWN = mk.ValueTransform("transposed ([E, H, F] -> [E, F, H])", lambda t: t.transpose(1, 2), shape=_transpose_last)

LAYER = {
    "input_layernorm.weight": R("input_layernorm.weight"),
    "self_attention.linear_qkv.layer_norm_weight": R("input_layernorm.weight"),
    "self_attention.linear_qkv.weight": QKV("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attention.linear_qkv.bias": QKV("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "self_attention.linear_proj.weight": R("self_attn.o_proj.weight"),
    "self_attention.linear_proj.bias": R("self_attn.o_proj.bias"),
    "self_attention.core_attention.softmax_offset": Entry(mk.rename, ("self_attn.sinks",), tp_split=0),
    "pre_mlp_layernorm.weight": R("post_attention_layernorm.weight"),
    "mlp.router.weight": R("mlp.router.weight"),
    "mlp.router.bias": R("mlp.router.bias"),
}

EXPERTS = {
    "fc1": mk.ExpertStack("mlp.experts.gate_up_proj", GATE_UP, "mlp.experts.gate_up_proj_bias", GATE_UP_BIAS),
    "fc2": mk.ExpertStack("mlp.experts.down_proj", DOWN, "mlp.experts.down_proj_bias"),
}


def _is_quick_gelu(c) -> bool:
    import torch

    x = torch.linspace(-6, 6, 25)
    try:
        y = c.activation_func(x)
    except Exception:
        return False
    return bool(torch.allclose(y, x * torch.sigmoid(ALPHA * x), atol=1e-6))


def _windowed(info: ModelInfo) -> list[bool]:
    """Whether Megatron windows each HF layer (:func:`~..windows.hf_windows`: per Megatron
    attention layer, then mapped to HF layers -- a hybrid ``*E*E`` stack's attention layers
    are Megatron layers 1, 3, 5, ...)."""
    return [w is not None for w in hf_windows(info)]


def _check(info: ModelInfo) -> None:
    c, a, m = info.config, info.attrs, MODEL_TYPE
    require(c.normalization == "RMSNorm", f"{m} needs RMSNorm, the model uses {c.normalization}")
    require(not getattr(c, "layernorm_zero_centered_gamma", False), f"{m} has no zero-centred norm weights")
    require(not getattr(c, "multi_latent_attention", False), f"{m} has no multi-latent attention")
    require(not c.qk_layernorm, f"{m} has no qk-norm; the model has qk_layernorm=True")
    require(bool(c.add_bias_linear), f"{m} has biases on every linear layer and the router (add_bias_linear=True)")
    require(getattr(c, "softmax_type", "vanilla") == "learnable",
            f"{m} attention has a learned sink per head (softmax_type='learnable'); the model has softmax_type={getattr(c, 'softmax_type', 'vanilla')!r}")
    require(a.position_embedding_type in ("rope", "yarn"),
            f"{m} needs rotary embeddings (rope or yarn), the model has {a['position_embedding_type']!r}")
    require(not a.rope_scaling and a.rotary_percent == 1.0,
            f"{m} export supports RoPE or YaRN on all head dims (no Llama-3.1 rotary_scaling, rotary_percent=1.0)")
    if a.position_embedding_type == "yarn":
        _check_yarn(c)
    require(not c.rotary_interleaved, f"{m} rotates halves; the model has rotary_interleaved=True")
    head_dim = c.kv_channels or c.hidden_size // c.num_attention_heads
    sm = getattr(c, "softmax_scale", None)
    require(sm is None or math.isclose(sm, head_dim ** -0.5), f"{m} scales attention by 1/sqrt(head_dim); the model has softmax_scale={sm}")
    ws = getattr(c, "window_size", None)
    if ws:
        require(int(ws[1]) == 0, f"{m} sliding windows look back only; the model has window_size={tuple(ws)}")
    # vLLM 0.32's gpt-oss reads neither layer_types nor rms_norm_eps: it windows the even
    # layers (0, 2, ...) and normalises with eps 1e-5 (as every released gpt-oss does), so
    # another model would load there silently and compute something else
    windowed = [i for i, w in enumerate(_windowed(info)) if w]
    even = list(range(0, info.num_layers, 2))
    require(not windowed or windowed == even,
            f"{m} windows the even layers {even} (vLLM's gpt-oss ignores layer_types); the model windows HF layers "
            f"{windowed} (window_size={tuple(ws) if ws else None}, window_attn_skip_freq={getattr(c, 'window_attn_skip_freq', None)!r})")
    require(math.isclose(c.layernorm_epsilon, EPS, rel_tol=1e-9, abs_tol=0.0),
            f"{m} normalises with eps {EPS} (vLLM's gpt-oss ignores rms_norm_eps); the model has layernorm_epsilon={c.layernorm_epsilon}")
    require(c.gated_linear_unit, f"{m} experts are gated (gated_linear_unit=True)")
    require(_is_quick_gelu(c), f"{m} experts use g * sigmoid({ALPHA} g) (activation_func=quick_gelu); the model uses {getattr(c.activation_func, '__name__', c.activation_func)!r}")
    require(getattr(c, "glu_linear_offset", 0.0) == 1.0, f"{m} experts compute (up + 1); the model has glu_linear_offset={getattr(c, 'glu_linear_offset', 0.0)}")
    require(getattr(c, "activation_func_clamp_value", None) == LIMIT,
            f"{m} experts clamp at {LIMIT}; the model has activation_func_clamp_value={getattr(c, 'activation_func_clamp_value', None)}")
    dense = [i for i in range(info.num_layers) if i not in info.moe_layers]
    require(not dense, f"{m} has MoE in every layer; layers {dense} are dense")
    score = getattr(c, "moe_router_score_function", "softmax")
    require(score == "softmax", f"{m} routes with softmax; the model uses {score}")
    require(not c.moe_router_pre_softmax, f"{m} applies softmax over the top-k logits; the model has moe_router_pre_softmax=True")
    require(not info.has_expert_bias, f"{m} has no router expert bias (moe_router_enable_expert_bias)")
    require(not info.has_shared_experts, f"{m} has no shared experts")
    require(getattr(c, "moe_router_topk_scaling_factor", None) in (None, 1.0), f"{m} has no routed scaling factor")
    require(not getattr(c, "moe_router_num_groups", None), f"{m} has no group-limited routing")


YARN_KEYS = {  # Megatron config field -> HF rope_parameters key
    "yarn_rotary_scaling_factor": "factor",
    "yarn_original_max_position_embeddings": "original_max_position_embeddings",
    "yarn_beta_fast": "beta_fast",
    "yarn_beta_slow": "beta_slow",
    "yarn_correction_range_round_to_int": "truncate",
}


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    # Megatron yarn_rotary_pos_embedding._yarn_get_mscale == HF / vLLM get_mscale
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _concentration(c) -> float:
    """Megatron's YaRN attention factor (``_yarn_get_concentration_factor``): the cos/sin of
    q and k are both multiplied by it.  ``mscale(f, yarn_mscale) / mscale(f, yarn_mscale_all_dim)``;
    megatron-core 0.19 takes ``mscale(f)`` when either is None (0.15's GPTModel needs both)."""
    f, ms, ms_all = c.yarn_rotary_scaling_factor, getattr(c, "yarn_mscale", None), getattr(c, "yarn_mscale_all_dim", None)
    if ms is None or ms_all is None:
        return _yarn_mscale(f)
    return _yarn_mscale(f, ms) / _yarn_mscale(f, ms_all)


def _check_yarn(c) -> None:
    """YaRN as gpt-oss computes it.  Megatron's ``YarnRotaryEmbedding`` and transformers'
    ``_compute_yarn_parameters`` (and vLLM's ``YaRNScalingRotaryEmbedding``) build the same
    inverse frequencies from ``factor``, ``original_max_position_embeddings``, ``beta_fast``,
    ``beta_slow`` and the rounding of the correction range (Megatron
    ``yarn_correction_range_round_to_int`` = HF ``truncate``), on all ``kv_channels`` dims.
    The attention factor is where they can part: HF infers ``0.1 ln(factor) + 1`` from a
    gpt-oss config and vLLM's gpt-oss hard-wires it (it reads no ``attention_factor`` or
    ``mscale``), while Megatron uses :func:`_concentration` -- e.g. NeMo 2's GPTOSSConfig
    (``yarn_mscale = yarn_mscale_all_dim = 1.0``) gives 1.0 on megatron-core 0.15.  Another
    factor is refused, naming both."""
    m = MODEL_TYPE
    missing = [k for k in YARN_KEYS if getattr(c, k, None) is None]
    require(not missing, f"{m} YaRN needs the config fields {missing} (position_embedding_type='yarn')")
    f = float(c.yarn_rotary_scaling_factor)
    require(f >= 1.0, f"{m} YaRN needs yarn_rotary_scaling_factor >= 1, the model has {f}")
    got, want = _concentration(c), _yarn_mscale(f)
    require(math.isclose(got, want, rel_tol=0, abs_tol=1e-9),
            f"{m} YaRN scales q and k by 0.1 ln(factor) + 1 = {want:.6g} (transformers infers it, vLLM's gpt-oss hard-wires it); "
            f"the model's concentration factor is {got:.6g} (yarn_mscale={getattr(c, 'yarn_mscale', None)}, "
            f"yarn_mscale_all_dim={getattr(c, 'yarn_mscale_all_dim', None)})")


def _rope(info: ModelInfo) -> dict:
    """The model's YaRN (:func:`_check_yarn`), or plain RoPE written as YaRN with ``factor``
    1.0, which is plain RoPE exactly in every reader: the interpolated and extrapolated inverse
    frequencies are the same numbers (so ``beta_*`` and ``truncate`` choose between equals) and
    the attention factor is 1 (``0.1 ln(factor) + 1`` only for ``factor > 1``, in transformers
    and vLLM alike).  vLLM 0.32's gpt-oss reads ``factor``, ``original_max_position_embeddings``
    and ``beta_*`` unconditionally, so ``{"rope_type": "default"}`` does not load there."""
    c = info.config
    if info.attrs.position_embedding_type == "yarn":
        out = {"rope_type": "yarn"}
        for k, hf in YARN_KEYS.items():
            v = getattr(c, k)
            out[hf] = bool(v) if hf == "truncate" else int(v) if hf.startswith("original") else float(v)
        return out
    return {"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": int(info.attrs.max_sequence_length),
            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}


def _config(info: ModelInfo) -> dict:
    c, a = info.config, info.attrs
    windowed = _windowed(info)
    ws = getattr(c, "window_size", None)
    rope = _rope(info)
    return hf_config(
        info, MODEL_TYPE, "GptOssForCausalLM",
        intermediate_size=c.moe_ffn_hidden_size,
        num_local_experts=c.num_moe_experts,
        num_experts_per_tok=c.moe_router_topk,
        sliding_window=int(ws[0]) + 1 if ws else a.max_sequence_length,
        layer_types=["sliding_attention" if w else "full_attention" for w in windowed],
        # transformers 5 reads rope_parameters (a missing one is gpt-oss's YaRN, factor 32),
        # 4.57 reads rope_scaling; vLLM's gpt-oss always builds YaRN from it (KeyError
        # 'factor' on {"rope_type": "default"}): see _rope
        rope_scaling=rope,
        rope_parameters=dict(rope, rope_theta=a.rotary_base),
        max_position_embeddings=max(a.max_sequence_length, int(rope["original_max_position_embeddings"] * rope["factor"])),
        swiglu_alpha=ALPHA,  # transformers 5 reads these; 4.57 hard-wires the same values
        swiglu_limit=LIMIT,
        hidden_act="silu",
        attention_bias=True,
        router_aux_loss_coef=float(getattr(c, "moe_aux_loss_coeff", 0.0) or 0.0),
        output_router_logits=False,
    )


SEMANTICS = {
    **sem.REFUSED_COMMON, **sem.SHAPES, **sem.BLOCK, **sem.SOFTMAX_MOE,
    "ffn_hidden_size": sem.required(why="unused: every layer is MoE (checked)", ok=lambda v: True),
    "layernorm_epsilon": sem.mapped("rms_norm_eps", why="1e-5 only (vLLM), checked"),
    "activation_func": sem.BY_CHECK,  # quick_gelu, hard-wired in HF
    "glu_linear_offset": sem.BY_CHECK,
    "activation_func_clamp_value": sem.BY_CHECK,
    "layernorm_zero_centered_gamma": sem.BY_CHECK,
    "softmax_type": sem.BY_CHECK,  # learnable sinks -> self_attn.sinks
    "softmax_scale": sem.BY_CHECK,
    "rotary_interleaved": sem.BY_CHECK,
    "window_size": sem.mapped("sliding_window", "layer_types"),
    "window_attn_skip_freq": sem.mapped("layer_types", why="per Megatron attention layer, mapped to HF layers"),
    "moe_layer_freq": sem.BY_CHECK,  # MoE in every layer
    "moe_router_pre_softmax": sem.BY_CHECK,
}

GPT_OSS = rule(ArchRule(
    model_type=MODEL_TYPE,
    architecture="GptOssForCausalLM",
    layer_table=LAYER,
    expert_stack=EXPERTS,
    supports_moe=True,
    build_config=_config,
    check=_check,
    semantics=SEMANTICS,
    quant_exclude=("lm_head", "model.embed_tokens", "*.mlp.router"),
))
