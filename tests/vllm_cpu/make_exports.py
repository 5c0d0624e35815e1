"""Export every architecture the exporter supports, in every expert layout that exists on CPU,
and write Megatron's own prompt log-probs next to each export (the vLLM check's reference).

Run as a script (``python tests/vllm_cpu/make_exports.py OUT``); ``tests/vllm_cpu/test_vllm_cpu.py`` runs
it once in a subprocess, so Megatron's process group and vLLM never share a process.  Files are
the interface: ``OUT/cases.json`` and, per case, ``OUT/<case>/hf`` (the export) and
``OUT/<case>/megatron.safetensors`` (``tokens`` [B, S], ``logprobs`` [B, S, V] fp32).

Shapes fit vLLM's CPU build: its attention supports head_dim 32, 64, 80, ... (not 16), and its
Qwen2 uses hidden_size / num_attention_heads as head_dim, so kv_channels is exactly that; its MLA
backends support only a latent of kv_lora_rank + qk_pos_emb_head_dim = 576 (DeepSeek's 512 + 64);
its gpt-oss normalises with eps 1e-5 whatever the config says (the exporter refuses another).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

B, S = 2, 16
HEADS = dict(hidden_size=128, num_attention_heads=4, num_query_groups=2, kv_channels=32, ffn_hidden_size=192,
             vocab_size=256, moe_ffn_hidden_size=64, max_seq_len=64)
# init_method_std 0.1: logits spread far more than any layout or mapping slip can hide in
BIG = {"init_method_std": 0.1}


def _specs():
    from nemo_export_hooks.testing.cpu import TinySpec

    dense = dict(HEADS, num_experts=None, moe_ffn_hidden_size=None, extra=BIG)
    moe = dict(HEADS, num_experts=4, moe_router_topk=2, extra=BIG)
    mla = dict(q_lora_rank=48, kv_lora_rank=512, qk_head_dim=32, qk_pos_emb_head_dim=64, v_head_dim=32,
               rope_type="rope", rotary_base=10000.0)
    ds = dict(HEADS, num_layers=3, moe_layer_freq=[0, 1, 1], num_query_groups=4, num_experts=8, moe_router_topk=4,
              moe_router_num_groups=4, moe_router_group_topk=2, moe_router_score_function="sigmoid",
              moe_router_enable_expert_bias=True, moe_router_topk_scaling_factor=2.5,
              moe_shared_expert_intermediate_size=128, qk_layernorm=True, multi_latent_attention=True, mla=mla,
              extra=BIG)
    specs = {
        "llama": ("llama", TinySpec(**dict(dense, qk_layernorm=False, rotary_base=10000.0))),
        "llama-tied": ("llama", TinySpec(**dict(dense, qk_layernorm=False, rotary_base=10000.0, tie_embeddings=True))),
        "qwen2": ("qwen2", TinySpec(**dict(dense, qk_layernorm=False, add_qkv_bias=True))),
        "qwen3": ("qwen3", TinySpec(**dense)),
        "qwen3_moe": ("qwen3_moe", TinySpec(**dict(moe, num_layers=3, moe_layer_freq=[0, 1, 1]))),
        "mixtral": ("mixtral", TinySpec(**dict(moe, qk_layernorm=False, rotary_base=10000.0))),
        "deepseek_v3": ("deepseek_v3", TinySpec(**ds)),
        # GLM-4.5 MoE: dense first layer, QKV bias, qk-norm, half the head dims rotated, shared
        # experts and the sigmoid group-limited router (tests/test_glm4_moe.py, at these shapes)
        "glm4_moe": ("glm4_moe", TinySpec(**dict(ds, multi_latent_attention=False, mla={}, num_query_groups=2,
                                                   add_qkv_bias=True, rotary_percent=0.5, rotary_base=10000.0))),
        # gpt-oss: attention sinks, biases everywhere, clamped SwiGLU with the +1 offset, a
        # sliding window (3 + 1 keys) on layers 1 and 3 (tests/test_gpt_oss.py, at these shapes)
        "gpt_oss": ("gpt_oss", TinySpec(**dict(moe, num_layers=3, qk_layernorm=False, layernorm_epsilon=1e-5, add_qkv_bias=True, add_bias_linear=True,
                                                rotary_base=10000.0, extra=dict(BIG, **_oss_extra())))),
    }
    # gpt-oss with YaRN as released gpt-oss has it (truncate False), scaled to 16 original
    # positions so the 16-token prompt sees interpolated dims and the 0.1 ln(4) + 1 attention factor
    oss = specs["gpt_oss"][1]
    specs["gpt_oss-yarn"] = ("gpt_oss", dataclasses.replace(oss, position_embedding_type="yarn", config_attrs=dict(
        yarn_rotary_scaling_factor=4.0, yarn_original_max_position_embeddings=16, yarn_beta_fast=32.0, yarn_beta_slow=1.0,
        yarn_correction_range_round_to_int=False, yarn_mscale=1.0, yarn_mscale_all_dim=0.0)))
    return specs


def _oss_extra() -> dict:
    from megatron.core.activations import quick_gelu

    return dict(softmax_type="learnable", window_size=(3, 0), window_attn_skip_freq=2, activation_func=quick_gelu,
                glu_linear_offset=1.0, activation_func_clamp_value=7.0)


def _build(name: str, spec):
    """Megatron's model for ``name``, with the values its init leaves out: gpt-oss's sinks are
    ``torch.empty``; GLM's expert bias is made non-negative (HF fills unchosen groups' experts
    with 0 where Megatron uses -inf: with a negative biased score they could route apart)."""
    from nemo_export_hooks.testing.cpu import build_gpt

    m = build_gpt(spec)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in m.decoder.layers:
            if name.startswith("gpt_oss"):
                layer.self_attention.core_attention.softmax_offset.copy_(torch.randn(spec.num_attention_heads, generator=g))
            router = getattr(layer.mlp, "router", None)
            if name == "glm4_moe" and router is not None and router.expert_bias is not None:
                router.expert_bias.copy_(0.1 * torch.randn(router.expert_bias.shape, generator=g).abs())
    return m


LAYOUTS = ("sequential", "te_sequential", "te_grouped", "legacy_grouped")
# expert layouts a model cannot have: Megatron's legacy GroupedMLP refuses biases ("bias not
# supported in Grouped GEMM yet"), and gpt-oss's experts have them
NO_LAYOUT = {"gpt_oss": ("legacy_grouped",),
             "gpt_oss-yarn": ("te_sequential", "te_grouped", "legacy_grouped")}  # RoPE is no expert matter


def _convert(model, layout: str) -> None:
    from nemo_export_hooks.testing import layouts as L

    {"sequential": lambda m: None, "te_sequential": L.to_te_sequential, "te_grouped": L.to_te_grouped,
     "legacy_grouped": L.to_legacy_grouped}[layout](model)


def _logprobs(model, tokens) -> torch.Tensor:
    from nemo_export_hooks.testing.cpu import megatron_logits

    return torch.log_softmax(megatron_logits(model, tokens).double(), dim=-1).float()


def _tokens(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, vocab, (B, S), generator=g)


def _write(out: Path, name: str, model, arch: str, dtype: torch.dtype, layout: str, ref: torch.Tensor, tokens) -> dict:
    from safetensors.torch import save_file

    from nemo_export_hooks import export_to_hf

    d = out / name
    export_to_hf(model, d / "hf", arch=arch, dtype=dtype)
    save_file({"tokens": tokens.contiguous(), "logprobs": ref.contiguous()}, str(d / "megatron.safetensors"))
    return {"case": name, "arch": arch, "layout": layout, "dtype": str(dtype).replace("torch.", "")}


def _nemotron_h(out: Path, cases: list) -> None:
    """NemotronH needs transformers >= 5 for the exporter's HF key check; its Megatron forward
    runs on CPU only without Mamba layers (mamba_ssm's kernels are CUDA), so the pattern is
    attention + MLP + MoE ("*-E").  (vLLM's NemotronH also asserts "no mamba layers in the
    model" for a stack without Mamba layers, so a pattern without experts would not help.)"""
    import transformers

    if not hasattr(transformers, "NemotronHForCausalLM"):
        cases.append({"case": "nemotron_h", "arch": "nemotron_h", "error": f"transformers {transformers.__version__} has no NemotronHForCausalLM"})
        return
    from nemo_export_hooks.testing.hybrid import build_mamba, nemotron_h_spec

    pattern = "*-E"
    spec = nemotron_h_spec(pattern, **HEADS)
    for layout in LAYOUTS:
        m = build_mamba(spec, pattern)
        tokens = _tokens(spec.vocab_size)
        ref = _logprobs(m, tokens)
        _convert(m, layout)
        cases.append(_write(out, f"nemotron_h-{layout}", m, "nemotron_h", torch.float32, layout, ref, tokens))


def _qwen3_next(out: Path, cases: list) -> None:
    """Qwen3-Next (megatron-core >= 0.19: Gated DeltaNet in HybridModel), pattern ``GE*E``.
    vLLM's CPU DeltaNet kernel (``chunk_gated_delta_rule_cpu``) takes head dims of 128 only
    ("Unexpected head dim size, 32") and bf16 only ("CPU GDN attention requires BF16."): the
    linear-attention heads are 128 wide; the export is fp32, vLLM runs it in bf16."""
    import torch._dynamo

    from nemo_export_hooks.testing.cpu import TinySpec
    from nemo_export_hooks.testing.hybrid import build_hybrid

    ex = dict(layernorm_zero_centered_gamma=True, attention_output_gate=True, moe_shared_expert_gate=True,
              deterministic_mode=True, linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
              linear_num_key_heads=2, linear_num_value_heads=4, **BIG)
    spec = TinySpec(**dict(HEADS, num_layers=4, num_experts=4, moe_router_topk=2, moe_shared_expert_intermediate_size=96,
                           qk_layernorm=True, rotary_percent=0.25, extra=ex))
    m = build_hybrid(spec, "GE*E")
    tokens = _tokens(spec.vocab_size)
    with torch._dynamo.config.patch(disable=True):  # megatron-core compiles the GDN helpers: same function, eagerly
        ref = _logprobs(m, tokens)
    cases.append(_write(out, "qwen3_next-sequential", m, "qwen3_next", torch.float32, "sequential", ref, tokens))


def main(argv: list[str]) -> int:
    """``make_exports.py OUT`` (every GPT arch, cases.json) or ``make_exports.py OUT nemotron_h``
    (NemotronH only, cases-nemotron_h.json: megatron-core >= 0.16, whose hybrid stack has MoE
    layers and the layer types the exporter reads; the test puts that version on PYTHONPATH), or
    ``make_exports.py OUT qwen3_next`` (cases-qwen3_next.json: megatron-core >= 0.19)."""
    from nemo_export_hooks.testing.cpu import build_gpt, init_single_process

    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    init_single_process()
    cases: list[dict] = []
    hybrid = {"nemotron_h": _nemotron_h, "qwen3_next": _qwen3_next}
    if len(argv) == 2 and argv[1] in hybrid:
        try:
            hybrid[argv[1]](out, cases)
        except Exception as e:  # noqa: BLE001
            cases.append({"case": argv[1], "arch": argv[1], "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]})
        (out / f"cases-{argv[1]}.json").write_text(json.dumps(cases, indent=1))
        return 0
    for name, (arch, spec) in _specs().items():
        layouts = tuple(l for l in LAYOUTS if l not in NO_LAYOUT.get(name, ())) if spec.num_experts else ("dense",)
        for layout in layouts:
            try:
                m = _build(name, spec)
                tokens = _tokens(spec.vocab_size)
                ref = _logprobs(m, tokens)
                if layout != "dense":
                    _convert(m, layout)
                cases.append(_write(out, f"{name}-{layout}", m, arch, torch.float32, layout, ref, tokens))
            except Exception as e:  # noqa: BLE001 - the test reports it as that case's failure
                cases.append({"case": f"{name}-{layout}", "arch": arch, "layout": layout, "error": f"{type(e).__name__}: {e}",
                              "traceback": traceback.format_exc()[-2000:]})
    # bf16 export of qwen3_moe for greedy generation (reference computed by the test)
    arch, spec = _specs()["qwen3_moe"]
    m = build_gpt(spec)
    tokens = _tokens(spec.vocab_size)
    cases.append(_write(out, "qwen3_moe-bf16", m, arch, torch.bfloat16, "sequential", _logprobs(m, tokens), tokens))
    (out / "cases.json").write_text(json.dumps(cases, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
