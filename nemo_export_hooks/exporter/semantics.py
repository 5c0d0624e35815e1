"""The semantics ledger: every megatron-core config field that changes the forward is either
exported, required to hold a value, or refused -- never silently ignored (issue 21).

* :data:`NEUTRAL` lists, once, the ``TransformerConfig`` fields that do not change what the
  forward computes (parallelism, fusions and kernels, recompute and offloading, initialisation,
  precision and communication, losses and logging, training-only regularisation, weight
  layouts the planner reads from the modules).
* Every other field of megatron-core's own config dataclasses (``dataclasses.fields`` of the
  model's config class, restricted to the classes megatron-core defines: ``TransformerConfig``,
  ``MLATransformerConfig``, ...) changes the forward.  A rule declares, in its ``semantics``
  table, how it handles each one it supports: :func:`mapped` (written to HF keys by its config
  builder), :func:`required` (allowed values, enforced here or by the rule's check, which names
  the field), or :func:`refused` (any non-default value is refused, with the rule's reason).
* :func:`check_semantics` runs at planning, before anything is written: a forward-changing
  field that the rule does not declare and that differs from megatron-core's dataclass default
  is refused, naming the field and its value.  A new megatron-core option is therefore refused
  until a rule says what it means.

Per-layer attributes (sliding windows, the hybrid layer pattern, MoE placement) are read in HF
layer terms after hybrid pairing (:mod:`.windows`, :func:`.plan.model_info`), never by Megatron
layer index.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .rules.base import ArchMismatchError, ModelInfo

# -- the central list: fields that do not change the forward ---------------------------------
_NEUTRAL_GROUPS: dict[str, tuple[str, ...]] = {
    "parallelism and pipeline schedule": (
        "tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
        "sequence_parallel", "context_parallel_size", "cp_comm_type", "hierarchical_context_parallel_sizes",
        "hybrid_context_parallel", "max_seqlen_per_dp_cp_rank", "expert_model_parallel_size", "expert_tensor_parallel_size",
        "moe_extended_tp", "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
        "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split", "pipeline_model_parallel_layout",
        "microbatch_group_size_per_vp_stage", "variable_seq_lengths", "tensor_parallel_num_weight_shards",
        "expert_tensor_parallel_num_weight_shards", "gtp_weight_remat_size", "expert_gtp_weight_remat_size",
        "pipeline_dtype", "deallocate_pipeline_outputs", "hetereogenous_dist_checkpoint", "is_hybrid_model",
    ),
    "communication and overlap": (
        "async_tensor_model_parallel_allreduce", "batch_p2p_comm", "batch_p2p_sync", "overlap_p2p_comm",
        "overlap_p2p_comm_warmup_flush", "use_ring_exchange_p2p", "pipeline_model_parallel_comm_backend",
        "tp_comm_overlap", "tp_comm_bulk_wgrad", "tp_comm_bulk_dgrad", "tp_comm_overlap_ag", "tp_comm_overlap_rs",
        "tp_comm_overlap_rs_dgrad", "tp_comm_split_ag", "tp_comm_atomic_ag", "tp_comm_split_rs", "tp_comm_atomic_rs",
        "tp_comm_bootstrap_backend", "tp_comm_overlap_disable_qkv", "tp_comm_overlap_disable_fc1", "tp_only_amax_red",
        "symmetric_ar_type", "nccl_all_reduce_for_prefill", "defer_embedding_wgrad_compute", "wgrad_deferral_limit",
        "delay_wgrad_compute", "moe_token_dispatcher_type", "moe_enable_deepep", "moe_deepep_num_sms",
        "moe_flex_dispatcher_backend", "moe_flex_dispatcher_num_sms", "moe_hybridep_num_sms",
        "moe_hybridep_num_sms_preprocessing", "moe_hybridep_num_blocks_permute", "moe_hybridep_num_blocks_unpermute",
        "moe_hybridep_pad_uneven_dispatch_inputs", "moe_ncclep_static_shape", "moe_ncclep_zero_copy",
        "moe_shared_expert_overlap", "overlap_moe_expert_parallel_comm", "ep_overlap_early_attn_memory_release",
        "high_priority_a2a_comm_stream", "overlap_dispatch_backward_with_experts_wgrad", "delta_offload_bytes_across_pp_ranks",
        "barrier_with_L1_time", "timers", "finalize_model_grads_func", "grad_scale_func", "grad_sync_func",
        "param_sync_func", "no_sync_func", "moe_grad_scale_func", "mtp_grad_scale_func",
    ),
    "fusions, kernels and backends (same function)": (
        "apply_rope_fusion", "bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion", "persist_layer_norm",
        "memory_efficient_layer_norm", "gradient_accumulation_fusion", "cross_entropy_loss_fusion", "cross_entropy_fusion_impl",
        "moe_permute_fusion", "moe_permute_fusion_into_hybridep", "moe_router_fusion", "fused_residual_rmsnorm",
        "fused_single_qkv_rope", "mla_down_proj_fusion", "use_te_activation_func", "use_transformer_engine_op_fuser",
        "use_fused_weighted_squared_relu", "attention_backend", "flash_attention_version", "kitchen_attention_backend",
        "use_kitchen", "use_kitchen_attention", "transformer_impl", "disable_parameter_transpose_cache",
        "use_grouped_gemm_for_dense_mlp", "use_grouped_gemm_for_shared_expert", "mlp_chunks_for_prefill",
        "mlp_chunks_for_training", "use_mamba_mem_eff_path", "activation_func_fp8_input_store",
        "clone_scatter_output_in_embedding", "deterministic_mode", "batch_invariant_mode", "test_mode",
        "dsa_kernel_backend", "moe_router_padding_for_fp8", "moe_router_padding_for_quantization",
    ),
    "weight layouts the planner reads from the modules (or refuses there)": (
        "moe_grouped_gemm", "moe_use_legacy_grouped_gemm", "moe_single_grouped_weight", "moe_single_grouped_bias",
        "moe_mlp_glu_interleave_size", "moe_shared_expert_glu_interleave_size",
    ),
    "recompute and offloading": (
        "recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules", "distribute_saved_activations",
        "num_microbatches_with_partial_activation_checkpoints", "moe_layer_recompute", "cpu_offloading", "cpu_offloading_num_layers",
        "_cpu_offloading_context", "cpu_offloading_activations", "cpu_offloading_weights", "cpu_offloading_double_buffering",
        "cpu_offloading_retain_pinned_cpu_buffers", "activation_offload_fraction", "fine_grained_activation_offloading",
        "fine_grained_offloading_max_inflight_offloads", "offload_modules", "min_offloaded_tensor_size",
        "delay_offload_until_cuda_graph", "moe_paged_stash", "moe_paged_stash_page_size",
        "moe_paged_stash_buffer_size_factor_cpu", "moe_paged_stash_buffer_size_factor_cuda",
    ),
    "CUDA graphs and inference runtime": (
        "enable_cuda_graph", "cuda_graph_impl", "cuda_graph_modules", "cuda_graph_retain_backward_graph", "cuda_graph_scope",
        "cuda_graph_use_single_mempool", "cuda_graph_warmup_steps", "external_cuda_graph", "inference_cuda_graph_scope",
        "inference_disable_triton_nvls_kernels", "inference_fuse_tp_communication", "inference_grouped_gemm_backend",
        "inference_moe_disable_fused_quant_kernels", "inference_moe_token_dispatcher_type", "inference_rng_tracker",
        "inference_sampling_seed", "use_inference_optimized_layers", "use_te_rng_tracker", "flash_decode", "cache_mla_latents",
        "moe_pad_experts_for_cuda_graph_inference",
    ),
    "initialisation": (
        "init_method", "init_method_std", "output_layer_init_method", "embedding_init_method", "embedding_init_method_std",
        "perform_initialization", "use_cpu_initialization", "init_model_with_meta_device",
    ),
    "precision and quantized training (the export writes the weights' values)": (
        "fp16", "bf16", "params_dtype", "autocast_dtype", "enable_autocast", "fp8", "fp8_recipe", "fp8_param", "fp8_margin",
        "fp8_interval", "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_wgrad", "fp8_dot_product_attention",
        "fp8_multi_head_attention", "fp8_output_proj", "fp8_quantizer_factory", "fp4", "fp4_recipe", "fp4_param",
        "fp4_quantizer_factory", "first_last_layers_bf16", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16",
        "disable_bf16_reduced_precision_matmul", "attention_softmax_in_fp32", "fp32_residual_connection", "moe_router_dtype",
        "quant_recipe", "mamba_training_ssm_states_dtype",
    ),
    "losses, logging and training-time updates (not the forward's output)": (
        "moe_aux_loss_coeff", "moe_z_loss_coeff", "calculate_per_token_loss", "moe_router_bias_update_rate",
        "moe_per_layer_logging", "log_max_attention_logit", "config_logger_dir", "qk_clip", "qk_clip_alpha",
        "qk_clip_threshold", "dsa_indexer_loss_coeff", "dsa_indexer_use_sparse_loss",
        "experimental_attention_variant_loss_scale_func", "mtp_loss_scaling_factor",
    ),
    "training-only regularisation (off in the evaluated forward)": ("hidden_dropout", "attention_dropout"),
    "multi-token prediction (mtp.* layers are not exported; the main logits do not use them)": (
        "mtp_num_layers", "mtp_use_repeated_layer", "mtp_hybrid_override_pattern", "mtp_standalone", "mtp_detach_heads",
    ),
}

NEUTRAL: dict[str, str] = {name: why for why, names in _NEUTRAL_GROUPS.items() for name in names}


# -- how a rule handles a field ----------------------------------------------------------------
@dataclass(frozen=True)
class Handling:
    """``kind``: ``mapped`` (written to ``hf_keys``), ``required`` (must be one of ``allowed``;
    an empty ``allowed`` means the rule's check enforces it, naming the field), or ``refused``
    (any non-default value is refused, ``why`` says why)."""

    kind: str
    hf_keys: tuple[str, ...] = ()
    allowed: tuple[Any, ...] = ()
    why: str = ""
    ok: Optional[Callable[[Any], bool]] = None  # required: a predicate instead of a value list


def mapped(*hf_keys: str, why: str = "") -> Handling:
    return Handling("mapped", hf_keys=hf_keys, why=why)


def required(*allowed: Any, why: str = "", ok: Optional[Callable[[Any], bool]] = None) -> Handling:
    """Allowed values (or a predicate ``ok``), enforced by :func:`check_semantics`; none given:
    the rule's own check enforces the field (and names it when it refuses)."""
    return Handling("required", allowed=allowed, why=why, ok=ok)


def refused(why: str) -> Handling:
    return Handling("refused", why=why)


BY_CHECK = required()  # the rule's check function enforces the supported values


# -- shared declarations, composed by rules (like the layer tables in rules/base.py) -----------
# Options most HF classes have no key for: refused by name with the reason (a rule that does
# express one overrides the entry, e.g. gpt_oss's windows and sinks).
REFUSED_COMMON = {
    "window_size": refused("this HF arch attends to every earlier token in every layer (no sliding window is written)"),
    # read by megatron-core only together with window_size (refused above when set)
    "window_attn_skip_freq": required(ok=lambda v: True, why="inert without window_size"),
    "softmax_type": refused("this HF arch's attention softmax has no sink (softmax_type='vanilla' only)"),
    "apply_residual_connection_post_layernorm": refused("HF adds each layer's input, before its norm, to the residual"),
}
# The Llama-family classes (llama, qwen2, qwen3, qwen3_moe, mixtral) in addition.
REFUSED_LLAMA = {
    **REFUSED_COMMON,
    "rotary_interleaved": refused("HF rotates halves (rotate_half), not interleaved pairs"),
    "layernorm_zero_centered_gamma": refused("HF norms compute x_hat * w; this arch's export does not add 1"),
}

# The transformer shape every rule writes through base.HF_KEYS.
SHAPES = {
    "num_layers": mapped("num_hidden_layers"),
    "hidden_size": mapped("hidden_size"),
    "num_attention_heads": mapped("num_attention_heads"),
    "num_query_groups": mapped("num_key_value_heads"),
    "kv_channels": mapped("head_dim"),
    "ffn_hidden_size": mapped("intermediate_size"),
    "layernorm_epsilon": mapped("rms_norm_eps"),
}
# Checked by every rule's check function (base.check_llama_family and its equivalents).
BLOCK = {
    "normalization": BY_CHECK,
    "gated_linear_unit": BY_CHECK,
    "activation_func": mapped("hidden_act"),
    "add_bias_linear": BY_CHECK,
    "add_qkv_bias": mapped("attention_bias"),
    "qk_layernorm": BY_CHECK,
    "multi_latent_attention": BY_CHECK,
}
# A softmax router (qwen3_moe, mixtral, qwen3_next, qwen3_5_moe_text, gpt_oss): expert shapes
# written, router options checked by the rule.
SOFTMAX_MOE = {
    "num_moe_experts": mapped("num_experts"),
    "moe_ffn_hidden_size": mapped("moe_intermediate_size"),
    "moe_router_topk": mapped("num_experts_per_tok"),
    "moe_layer_freq": mapped("mlp_only_layers", why="MoE placement read from the modules in HF layers"),
    "moe_router_score_function": BY_CHECK,
    "moe_router_enable_expert_bias": BY_CHECK,
    "moe_shared_expert_intermediate_size": BY_CHECK,
    "moe_router_topk_scaling_factor": BY_CHECK,
    "moe_router_num_groups": BY_CHECK,
}
def _no_sinkhorn(v) -> bool:
    return "sinkhorn" not in ([v] if isinstance(v, str) else list(v or []))


# Load balancing is a loss term, except Sinkhorn routing, which changes the routing itself.
LOAD_BALANCING = required(ok=_no_sinkhorn, why="Sinkhorn routing chooses experts differently from HF's top-k")
SOFTMAX_MOE["moe_router_load_balancing_type"] = LOAD_BALANCING

# The DeepSeek-V3-style sigmoid router (base.check_sigmoid_router / sigmoid_router_config).
SIGMOID_MOE = {
    "num_moe_experts": mapped("n_routed_experts"),
    "moe_ffn_hidden_size": mapped("moe_intermediate_size"),
    "moe_router_topk": mapped("num_experts_per_tok", "norm_topk_prob"),
    "moe_layer_freq": mapped("first_k_dense_replace", why="MoE placement read from the modules in HF layers"),
    "moe_router_score_function": BY_CHECK,  # sigmoid (when the model has MoE layers)
    "moe_router_enable_expert_bias": BY_CHECK,
    "moe_shared_expert_intermediate_size": mapped("n_shared_experts"),
    "moe_shared_expert_gate": BY_CHECK,
    "moe_router_num_groups": mapped("n_group"),
    "moe_router_group_topk": mapped("topk_group"),
    "moe_router_topk_scaling_factor": mapped("routed_scaling_factor"),
    "moe_router_topk_limited_devices": BY_CHECK,
    "moe_router_load_balancing_type": LOAD_BALANCING,
}


# -- the field list, from megatron-core itself -------------------------------------------------
def megatron_fields(config) -> dict[str, dataclasses.Field]:
    """The dataclass fields of ``config`` that megatron-core's own classes declare, each as
    megatron-core declares it.  A NeMo / Megatron-Bridge provider subclass adds build options,
    not model semantics, and may change a field's default (a Qwen3 provider defaults
    ``qk_layernorm=True``): the default compared against is megatron-core's."""
    out: dict[str, dataclasses.Field] = {}
    for cls in type(config).__mro__:  # most derived first: the nearest megatron-core declaration
        if dataclasses.is_dataclass(cls) and cls.__module__.startswith("megatron.core"):
            for f in dataclasses.fields(cls):
                out.setdefault(f.name, f)
    return out


def forward_fields(config) -> list[str]:
    """Fields of ``config`` that change the forward: megatron-core's fields minus :data:`NEUTRAL`."""
    return sorted(n for n in megatron_fields(config) if n not in NEUTRAL)


_NO_DEFAULT = object()


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return _NO_DEFAULT


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return list(a) == list(b)
        return bool(a == b)
    except Exception:  # tensors, callables without __eq__
        return False


def _show(v: Any) -> str:
    if callable(v):
        return getattr(v, "__qualname__", getattr(v, "__name__", repr(v)))
    return repr(v)


def inert(name: str, config) -> bool:
    """An option megatron-core reads only for a part the model does not have: ``moe_*`` in a
    model without experts (``num_moe_experts`` unset), which builds no router or experts."""
    return name.startswith("moe_") and not getattr(config, "num_moe_experts", None)


def undeclared_non_default(config, declared: dict[str, Handling]) -> list[tuple[str, Any]]:
    """``(field, value)`` of every forward-changing field that ``declared`` does not cover and
    whose value differs from megatron-core's dataclass default (a field without a default is
    always set, so it must be declared); :func:`inert` fields excepted."""
    out = []
    fields = megatron_fields(config)
    for name in forward_fields(config):
        if name in declared or inert(name, config):
            continue
        value = getattr(config, name, None)
        default = field_default(fields[name])
        if default is _NO_DEFAULT or not _same(value, default):
            out.append((name, value))
    return out


def check_semantics(info: ModelInfo, model_type: str, declared: dict[str, Handling]) -> None:
    """Refuse, before anything is written, a model whose forward the rule does not account for:
    a declared ``required`` field outside its allowed values, a ``refused`` field off its
    default, or an undeclared forward-changing field off its default (named with its value)."""
    c = info.config
    fields = megatron_fields(c)
    for name, h in sorted(declared.items()):
        if name not in fields:
            continue  # a field of another megatron-core version
        value = getattr(c, name, None)
        if h.kind == "required" and h.ok is not None and not h.ok(value):
            raise ArchMismatchError(f"arch {model_type!r} cannot express {name}={_show(value)}: {h.why}")
        if h.kind == "required" and h.allowed and not any(_same(value, a) for a in h.allowed):
            allowed = " or ".join(_show(a) for a in h.allowed)
            raise ArchMismatchError(
                f"arch {model_type!r} needs {name}={allowed}{f' ({h.why})' if h.why else ''}; the model has {name}={_show(value)}"
            )
        if h.kind == "refused" and not _same(value, field_default(fields[name])):
            raise ArchMismatchError(f"arch {model_type!r} cannot express {name}={_show(value)}: {h.why}")
    bad = undeclared_non_default(c, declared)
    if bad:
        detail = ", ".join(f"{n}={_show(v)}" for n, v in bad)
        raise ArchMismatchError(
            f"arch {model_type!r} does not export {detail}: megatron-core option(s) that change the forward and that "
            f"this rule does not map or check (dataclass default {', '.join(_show(field_default(fields[n])) for n, _ in bad)}); "
            "refused rather than exported as something else"
        )


def ledger(rules: Optional[dict] = None) -> dict[str, dict[str, int]]:
    """Per rule, how many fields it maps / requires / refuses (for reports and docs)."""
    from .rules import all_rules

    out = {}
    for name, r in sorted((rules or all_rules()).items()):
        counts = {"mapped": 0, "required": 0, "refused": 0}
        for h in r.semantics.values():
            counts[h.kind] += 1
        out[name] = counts
    return out
