"""GLM-4.5 MoE export: real Megatron-Core GPT models (CPU, local spec, dense first layer via
``get_gpt_decoder_block_spec``; experts as SequentialMLP and the TEGroupedMLP stand-in)
exported in float32, loaded by `transformers` (Glm4MoeForCausalLM), logits compared with
Megatron's forward within 1e-4.

Weights are drawn with init_method_std=0.2 and a router expert bias of ~0.1, so a wrong
rotary split, routing rule or norm offset moves the logits far past the tolerance; the tests
check that they would see the expert bias and the zero-centred norm offset."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import hf_logits, load_hf, tokens_for
from nemo_export_hooks import export_to_hf
from nemo_export_hooks.exporter.rules import ArchMismatchError, get_rule
from nemo_export_hooks.testing.cpu import TinySpec, build_gpt, megatron_logits
from nemo_export_hooks.testing.layouts import to_te_grouped

pytest.importorskip("transformers.models.glm4_moe")

ATOL = 1e-4


def glm_spec(**kw) -> TinySpec:
    """GLM-4.5 MoE in miniature: 3 layers, the first dense; GQA (4 heads, 2 groups) with a
    QKV bias and qk-norm, half the head dims rotated; 8 experts in 4 groups (2 per token,
    top-4), sigmoid router with expert bias, scaling 2.5, two experts' worth of shared expert."""
    base = dict(
        num_layers=3,
        moe_layer_freq=[0, 1, 1],
        num_experts=8,
        moe_ffn_hidden_size=32,
        moe_router_topk=4,
        moe_router_num_groups=4,
        moe_router_group_topk=2,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=2.5,
        moe_shared_expert_intermediate_size=64,
        qk_layernorm=True,
        add_qkv_bias=True,
        rotary_percent=0.5,
        rotary_base=10000.0,
        extra={"init_method_std": 0.2},
    )
    base.update(kw)
    return TinySpec(**base)


def build(spec: TinySpec, seed: int = 1234):
    m = build_gpt(spec, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in m.decoder.layers:
            router = getattr(layer.mlp, "router", None)
            if router is not None and router.expert_bias is not None:
                # non-negative: HF fills the experts of unchosen groups with 0 (Megatron: -inf),
                # so a negative biased score would let HF pick outside the chosen groups
                router.expert_bias.copy_(0.1 * torch.randn(router.expert_bias.shape, generator=g).abs())
    return m


def export_and_compare(m, out, spec, ref=None):
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(m, tokens) if ref is None else ref
    res = export_to_hf(m, out, arch="glm4_moe", dtype=torch.float32)
    hf, info = load_hf(out)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    diff = (hf_logits(hf, tokens) - ref).abs().max().item()
    assert diff <= ATOL, f"max abs logit diff {diff}"
    # (transformers 5 fuses experts in memory: count the files' tensors, not the state dict)
    assert res.num_tensors == len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    return hf, json.loads((out / "config.json").read_text()), tokens, ref


def test_registered():
    assert get_rule("glm4_moe").architecture == "Glm4MoeForCausalLM"


@pytest.mark.parametrize("layout", ["sequential", "te_grouped"])
def test_glm4_moe_roundtrip(mcore, tmp_path, layout):
    spec = glm_spec()
    m = build(spec)
    if layout == "te_grouped":
        to_te_grouped(m)
    hf, cfg, tokens, ref = export_and_compare(m, tmp_path / "hf", spec)
    expect = dict(
        architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe", first_k_dense_replace=1, n_routed_experts=8,
        num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        n_shared_experts=2, moe_intermediate_size=32, intermediate_size=128, partial_rotary_factor=0.5,
        attention_bias=True, use_qk_norm=True, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
    )
    assert {k: cfg[k] for k in expect} == expect
    sd = hf.state_dict()
    written = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    for k in ("model.layers.0.mlp.gate_proj.weight", "model.layers.1.self_attn.q_proj.bias",
              "model.layers.1.self_attn.k_norm.weight", "model.layers.2.mlp.shared_experts.up_proj.weight",
              "model.layers.2.mlp.experts.7.down_proj.weight"):
        assert k in written, k
    b = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert torch.equal(sd[b], m.decoder.layers[1].mlp.router.expert_bias)
    for layer in hf.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias.zero_()
    assert (hf_logits(hf, tokens) - ref).abs().max().item() > 1e-3, "the expert bias does not affect routing in this test"


def test_glm4_moe_zero_centred_norms_get_plus_one(mcore, tmp_path):
    # The same function stored the zero-centred way (layernorm_zero_centered_gamma: the norm
    # applies 1 + w).  Megatron's CPU (torch) norm cannot run that form, so the reference is
    # the plain model's forward; the export must add 1 to every norm weight, final norm too.
    spec = glm_spec(num_layers=2, moe_layer_freq=[0, 1])
    m = build(spec)
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(m, tokens)
    norms = [n for n, p in m.named_parameters() if p.dim() == 1 and ("layernorm" in n or "final_layernorm" in n)]
    assert any(n.startswith("decoder.final_layernorm") for n in norms) and len(norms) >= 8
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n in norms:
                p.sub_(1.0)
    m.config.layernorm_zero_centered_gamma = True
    hf, _, _, _ = export_and_compare(m, tmp_path / "hf", spec, ref=ref)
    assert torch.allclose(hf.model.norm.weight, m.decoder.final_layernorm.weight + 1)


def test_glm4_moe_dense_only(mcore, tmp_path):
    spec = glm_spec(num_layers=2, num_experts=None, moe_layer_freq=1, qk_layernorm=False, add_qkv_bias=False)
    m = build(spec)
    _, cfg, _, _ = export_and_compare(m, tmp_path / "hf", spec)
    assert cfg["first_k_dense_replace"] == 2 and cfg["use_qk_norm"] is False and cfg["attention_bias"] is False


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(moe_router_score_function="softmax", moe_router_enable_expert_bias=False), "glm4_moe routes with sigmoid scores"),
        (dict(moe_router_enable_expert_bias=False), "always has a router expert bias"),
        (dict(moe_shared_expert_intermediate_size=None), "always has shared experts"),
        (dict(moe_layer_freq=[1, 0, 1]), r"dense layers first .* MoE layers are \[0, 2\] of 3"),
        (dict(num_experts=None, moe_layer_freq=1, add_bias_linear=True), "biases only on q/k/v"),
    ],
)
def test_glm4_moe_refuses_what_hf_cannot_express(mcore, tmp_path, kw, match):
    m = build(glm_spec(**kw))
    with pytest.raises(ArchMismatchError, match=match):
        export_to_hf(m, tmp_path / "hf", arch="glm4_moe", dtype=torch.float32)
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())
