"""CPU shims and tiny Megatron-Core model builders for tests, the CPU demo and benchmarks.

Megatron-Core's forward pass assumes CUDA in two places (``torch.cuda.current_device()``
for rotary tables and router buffers, and Transformer Engine's ``te_general_gemm`` in the
router).  These shims exist so a real Megatron-Core model can run forward on a CPU-only
machine.  They live here, in ``nemo_export_hooks.testing``, and are never imported by the
export path: exporting needs no forward pass.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

import torch

from ..extras import require

require("megatron", "megatron.core", "nemo_export_hooks.testing (tiny Megatron-Core models)")

_SHIMS_APPLIED = False


def apply_cpu_shims() -> None:
    """Make Megatron-Core's forward pass run on CPU (idempotent)."""
    global _SHIMS_APPLIED
    if _SHIMS_APPLIED or torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: "cpu"  # rotary embedding, router buffers
    try:
        from megatron.core.transformer.moe import moe_utils

        if not hasattr(moe_utils, "te_general_gemm"):
            moe_utils.te_general_gemm = None  # router falls back to torch matmul
    except ImportError:  # pragma: no cover - megatron-core missing
        pass
    try:
        # megatron-core 0.15's torch softmax path builds the sliding-window mask with a literal
        # device="cuda" (transformer/utils.py get_sliding_window_causal_mask): the same mask on CPU
        from megatron.core.fusions import fused_softmax

        def _sliding_window_causal_mask(sq, skv, window_size):
            m = torch.ones(sq, skv, dtype=torch.bool)
            return ~torch.tril(torch.triu(m, diagonal=skv - sq - window_size[0]), diagonal=skv - sq + window_size[1])

        if hasattr(fused_softmax, "get_sliding_window_causal_mask"):
            fused_softmax.get_sliding_window_causal_mask = _sliding_window_causal_mask
    except ImportError:  # pragma: no cover
        pass
    _SHIMS_APPLIED = True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process(tp: int = 1, ep: int = 1, pp: int = 1, seed: int = 1234) -> None:
    """Initialise torch.distributed (gloo, world size 1 unless launched by torchrun) and
    Megatron's parallel state, and seed Megatron's RNG tracker without CUDA."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom

    apply_cpu_shims()
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            # An explicit init_method, not MASTER_PORT in os.environ: child processes (torchrun
            # tests) would inherit a port that is already taken.
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        else:
            dist.init_process_group("gloo")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
    )
    torch.manual_seed(seed)
    # The tracker must exist, but adding CUDA RNG states needs CUDA.  The inference tracker
    # forks nothing (dropout stays on the CPU generator); with
    # use_cpu_initialization=True Megatron initialises weights from torch's CPU generator.
    mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


@dataclass
class TinySpec:
    """Shape of a tiny model; defaults give a Qwen3-MoE-like model."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    kv_channels: int | None = 16
    ffn_hidden_size: int = 128
    vocab_size: int = 128
    max_seq_len: int = 64
    num_experts: int | None = 4
    moe_ffn_hidden_size: int | None = 32
    moe_router_topk: int = 2
    moe_shared_expert_intermediate_size: int | None = None
    moe_layer_freq: Any = 1
    moe_router_score_function: str = "softmax"
    moe_router_enable_expert_bias: bool = False
    moe_router_pre_softmax: bool = False
    moe_router_topk_scaling_factor: float | None = None
    moe_router_num_groups: int | None = None
    moe_router_group_topk: int | None = None
    qk_layernorm: bool = True
    add_qkv_bias: bool = False
    add_bias_linear: bool = False
    gated_linear_unit: bool = True
    activation: str = "silu"
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-6
    rotary_base: float = 1_000_000.0
    rotary_percent: float = 1.0
    tie_embeddings: bool = False
    multi_latent_attention: bool = False
    mla: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    position_embedding_type: str = "rope"
    # set on the built TransformerConfig: fields GPTModel reads that older megatron-core's
    # config lacks (0.15's GPTModel(position_embedding_type="yarn") reads yarn_* this way)
    config_attrs: dict = field(default_factory=dict)
    # further GPTModel constructor arguments (e.g. rope_scaling=True, rope_scaling_factor=8.0)
    model_kwargs: dict = field(default_factory=dict)


def _activation(name: str):
    import torch.nn.functional as F

    return {
        "silu": F.silu,
        "gelu": F.gelu,
        "relu": F.relu,
        "squared_relu": lambda x: torch.pow(F.relu(x), 2),
    }[name]


def transformer_config(spec: TinySpec, **overrides):
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    kw = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.kv_channels,
        ffn_hidden_size=spec.ffn_hidden_size,
        normalization=spec.normalization,
        layernorm_epsilon=spec.layernorm_epsilon,
        qk_layernorm=spec.qk_layernorm,
        add_qkv_bias=spec.add_qkv_bias,
        add_bias_linear=spec.add_bias_linear,
        gated_linear_unit=spec.gated_linear_unit,
        activation_func=_activation(spec.activation),
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        params_dtype=torch.float32,
    )
    if spec.num_experts:
        kw.update(
            num_moe_experts=spec.num_experts,
            moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
            moe_router_topk=spec.moe_router_topk,
            moe_shared_expert_intermediate_size=spec.moe_shared_expert_intermediate_size,
            moe_layer_freq=spec.moe_layer_freq,
            moe_router_score_function=spec.moe_router_score_function,
            moe_router_enable_expert_bias=spec.moe_router_enable_expert_bias,
            moe_router_pre_softmax=spec.moe_router_pre_softmax,
            moe_router_topk_scaling_factor=spec.moe_router_topk_scaling_factor,
            moe_router_num_groups=spec.moe_router_num_groups,
            moe_router_group_topk=spec.moe_router_group_topk,
            moe_router_dtype="fp32",
            moe_token_dispatcher_type="allgather",
            moe_aux_loss_coeff=0.0,
            moe_permute_fusion=False,
            moe_grouped_gemm=False,
        )
    kw.update(spec.extra)
    kw.update(overrides)
    if spec.multi_latent_attention:
        kw.update(spec.mla)
        return MLATransformerConfig(**kw)
    return TransformerConfig(**kw)


def build_gpt(spec: TinySpec | None = None, seed: int = 1234, pre_process=True, post_process=True, vp_stage=None, **config_overrides):
    """Build a real Megatron-Core GPTModel with the local (non-TE) layer spec on CPU.

    Parallel state must already be initialised (see :func:`init_single_process`).
    Expert layout is SequentialMLP; convert it with :mod:`nemo_export_hooks.testing.layouts`.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
    )

    spec = spec or TinySpec()
    cfg = transformer_config(spec, **config_overrides)
    for k, v in spec.config_attrs.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    if spec.num_experts and spec.moe_layer_freq != 1:
        layer_spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization=spec.normalization)
    else:
        layer_spec = get_gpt_layer_local_spec(
            num_experts=spec.num_experts,
            moe_grouped_gemm=False,
            qk_layernorm=spec.qk_layernorm,
            multi_latent_attention=spec.multi_latent_attention,
            normalization=spec.normalization,
        )
    if spec.multi_latent_attention:
        use_cpu_mla_attention(layer_spec)
    kwargs = {}
    if vp_stage is not None:
        kwargs["vp_stage"] = vp_stage
    model = GPTModel(
        config=cfg,
        transformer_layer_spec=layer_spec,
        vocab_size=spec.vocab_size,
        max_sequence_length=spec.max_seq_len,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=spec.tie_embeddings,
        position_embedding_type=spec.position_embedding_type,
        rotary_base=spec.rotary_base,
        rotary_percent=spec.rotary_percent,
        **kwargs,
        **spec.model_kwargs,
    )
    _randomise_norms_and_biases(model, seed)
    return model


def _randomise_norms_and_biases(model: torch.nn.Module, seed: int) -> None:
    """Megatron initialises norms to 1 and biases to 0, which would hide a swapped norm or a
    dropped bias in an export test.  Give every such tensor distinct values."""
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith("bias") or "bias" in name.rsplit(".", 1)[-1]:
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(0.01 * torch.randn(b.shape, generator=g))


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Forward a (single-stage) Megatron GPTModel on CPU; returns [batch, seq, vocab] float32."""
    apply_cpu_shims()
    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    # Megatron's default causal mask is built on "cuda"; pass it explicitly (True = masked).
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    model.eval()
    with torch.no_grad():
        out = model(input_ids=tokens, position_ids=position_ids, attention_mask=mask)
    return out.float()


class MLACoreAttentionStandIn(torch.nn.Module):
    """CPU core attention for multi-latent attention (MLA).

    Megatron-Core's local ``DotProductAttention`` cannot serve MLA (MLA passes ``k_channels``
    and ``v_channels``, which differ: q/k heads are ``qk_head_dim + qk_pos_emb_head_dim``
    wide, v heads ``v_head_dim``); on GPU, Transformer Engine's attention does.  This
    stand-in computes plain causal softmax attention with MLA's ``softmax_scale`` and holds
    no state, so a model built with it has exactly the parameters of the local MLA spec.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, k_channels=None, v_channels=None, cp_comm_type=None, pg_collection=None):
        super().__init__()
        self.config = config
        self.k_channels = k_channels or config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else self.k_channels ** -0.5

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        # query/key [s, b, n, dk], value [s, b, n, dv]; attention_mask True = masked out
        assert packed_seq_params is None and attention_bias is None
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.softmax_scale
        if attention_mask is None:  # MLA layers are causal (AttnMaskType.causal)
            sq, sk = scores.shape[-2:]
            attention_mask = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).triu(sk - sq + 1)
        scores = scores.masked_fill(attention_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        ctx = torch.matmul(probs, v)  # [b, n, s, dv]
        return ctx.permute(2, 0, 1, 3).reshape(ctx.shape[2], ctx.shape[0], -1)


def use_cpu_mla_attention(layer_spec) -> None:
    """Give every MLA layer of a (block or layer) spec the CPU core attention stand-in."""
    specs = getattr(layer_spec, "layer_specs", None) or [layer_spec]
    for s in specs:
        attn = getattr(getattr(s, "submodules", None), "self_attention", None)
        sub = getattr(attn, "submodules", None)
        if sub is not None and hasattr(sub, "linear_kv_down_proj"):
            sub.core_attention = MLACoreAttentionStandIn
