"""DeepSeek-V3 export: real Megatron-Core MLA models (CPU, local spec with the CPU MLA core
attention stand-in; experts as SequentialMLP and the TEGroupedMLP stand-in) exported in
float32, loaded by `transformers` (DeepseekV3ForCausalLM), logits compared with Megatron's.

Weights are drawn with init_method_std=0.2 (and a router expert bias of ~0.1) so that a
wrong rope layout, routing rule or scaling factor moves the logits by far more than the
tolerance; each full test also checks that it would see such a mistake."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import hf_logits, load_hf, tokens_for
from nemo_export_hooks import export_to_hf
from nemo_export_hooks.exporter.api import prepare_export
from nemo_export_hooks.exporter.rules import ArchMismatchError, get_rule
from nemo_export_hooks.testing.cpu import TinySpec, build_gpt, megatron_logits
from nemo_export_hooks.testing.layouts import to_te_grouped

ATOL = 1e-4

MLA = dict(q_lora_rank=32, kv_lora_rank=24, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=12, rope_type="rope", rotary_base=10000.0)


def ds_spec(mla=None, **kw) -> TinySpec:
    """DeepSeek-V3 in miniature: 3 layers, first one dense, MLA with q LoRA, 8 experts in
    4 groups (2 groups per token, top-4), sigmoid router with expert bias, scaling 2.5,
    2 shared experts' worth of shared-expert width."""
    base = dict(
        num_layers=3,
        moe_layer_freq=[0, 1, 1],
        num_attention_heads=4,
        num_query_groups=4,
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
        multi_latent_attention=True,
        mla={**MLA, **(mla or {})},
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
                router.expert_bias.copy_(0.1 * torch.randn(router.expert_bias.shape, generator=g))
    return m


def roundtrip(m, out, spec, **kw):
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(m, tokens)
    res = export_to_hf(m, out, arch="deepseek_v3", dtype=torch.float32, **kw)
    hf, info = load_hf(out)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    got = hf_logits(hf, tokens)
    diff = (got - ref).abs().max().item()
    assert diff <= ATOL, f"max abs logit diff {diff}"
    assert res.num_tensors == len(hf.state_dict())
    cfg = json.loads((out / "config.json").read_text())
    return hf, cfg, tokens, ref


def moved(hf, tokens, ref) -> float:
    return (hf_logits(hf, tokens) - ref).abs().max().item()


def test_registered():
    rule = get_rule("deepseek_v3")
    assert rule.architecture == "DeepseekV3ForCausalLM"


@pytest.mark.parametrize("layout", ["sequential", "te_grouped"])
def test_deepseek_v3_mla_qlora_groups_shared_experts(mcore, tmp_path, layout):
    spec = ds_spec()
    m = build(spec)
    if layout == "te_grouped":
        to_te_grouped(m)
    hf, cfg, tokens, ref = roundtrip(m, tmp_path / "hf", spec)
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["model_type"] == "deepseek_v3"
    expect = dict(
        first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, n_shared_experts=2, moe_intermediate_size=32,
        intermediate_size=128, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, num_key_value_heads=4, rope_interleave=True, rope_scaling=None, rope_theta=10000.0,
        scoring_func="sigmoid", topk_method="noaux_tc",
    )
    assert {k: cfg[k] for k in expect} == expect
    sd = hf.state_dict()
    for k in ("model.layers.0.mlp.gate_proj.weight", "model.layers.1.self_attn.q_a_proj.weight",
              "model.layers.1.self_attn.q_a_layernorm.weight", "model.layers.2.mlp.shared_experts.up_proj.weight",
              "model.layers.2.mlp.experts.7.down_proj.weight", "model.layers.1.mlp.gate.e_score_correction_bias"):
        assert k in sd, k
    assert torch.equal(sd["model.layers.1.mlp.gate.e_score_correction_bias"], _as_exported(m.decoder.layers[1].mlp.router.expert_bias))
    # The comparison is sharp enough to see each transform it relies on.
    hf.config.rope_interleave = False
    assert moved(hf, tokens, ref) > 1e-2, "a rope layout mistake would go unnoticed"
    hf.config.rope_interleave = True
    for layer in hf.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias.zero_()
    assert moved(hf, tokens, ref) > 1e-3, "the expert bias does not affect routing in this test"


def _as_exported(bias):
    """Group-limited routing: the export shifts the expert bias by one constant to >= 0 (the
    same ranking; transformers masks unchosen groups with 0.0, see mappings.NONNEGATIVE_GROUPED_EXPERT_BIAS)."""
    return bias - bias.min() if bool(bias.min() < 0) else bias


def test_deepseek_v3_bf16_keeps_expert_bias_fp32(mcore, tmp_path):
    spec = ds_spec()
    m = build(spec)
    export_to_hf(m, tmp_path / "hf", arch="deepseek_v3", dtype=torch.bfloat16)
    idx = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.2.mlp.gate.e_score_correction_bias"
    with safe_open(str(tmp_path / "hf" / idx[name]), "pt") as f:
        b = f.get_tensor(name)
    assert b.dtype == torch.float32 and torch.equal(b, _as_exported(m.decoder.layers[2].mlp.router.expert_bias))
    w = "model.layers.2.self_attn.kv_b_proj.weight"
    with safe_open(str(tmp_path / "hf" / idx[w]), "pt") as f:
        t = f.get_tensor(w)
    assert t.dtype == torch.bfloat16
    assert torch.equal(t, m.decoder.layers[2].self_attention.linear_kv_up_proj.weight.detach().to(torch.bfloat16))


def test_deepseek_v3_without_q_lora_top1_ungrouped(mcore, tmp_path):
    # q_lora_rank=None -> q_proj; top-1 routing (Megatron does not normalise: norm_topk_prob
    # False); no group-limited routing (n_group=1); no scaling factor (1.0).
    spec = ds_spec(mla={"q_lora_rank": None}, moe_router_topk=1, moe_router_num_groups=None,
                   moe_router_group_topk=None, moe_router_topk_scaling_factor=None)
    m = build(spec)
    hf, cfg, _, _ = roundtrip(m, tmp_path / "hf", spec)
    assert cfg["q_lora_rank"] is None
    assert (cfg["n_group"], cfg["topk_group"], cfg["norm_topk_prob"], cfg["routed_scaling_factor"]) == (1, 1, False, 1.0)
    sd = hf.state_dict()
    assert "model.layers.0.self_attn.q_proj.weight" in sd
    assert not any("q_a_proj" in k or "q_b_proj" in k for k in sd)


@pytest.mark.parametrize(
    "yarn,attention_factor",
    [
        (dict(rotary_scaling_factor=4.0, mscale=1.0, mscale_all_dim=0.8), False),
        # mscale != 1 with mscale_all_dim=0: HF would infer mscale(f, 1); the export states it
        (dict(rotary_scaling_factor=4.0, mscale=0.7, mscale_all_dim=0.0), True),
    ],
    ids=["mscale_all_dim", "attention_factor"],
)
def test_deepseek_v3_yarn(mcore, tmp_path, yarn, attention_factor):
    spec = ds_spec(mla={"rope_type": "yarn", "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0, **yarn})
    m = build(spec)
    hf, cfg, tokens, ref = roundtrip(m, tmp_path / "hf", spec)
    rs = cfg["rope_scaling"]
    assert rs["rope_type"] == "yarn" and rs["factor"] == 4.0 and rs["original_max_position_embeddings"] == 16
    assert (rs["mscale"], rs["mscale_all_dim"]) == (yarn["mscale"], yarn["mscale_all_dim"])
    assert ("attention_factor" in rs) == attention_factor
    assert cfg["max_position_embeddings"] == 64


def test_dense_mla_model(mcore, tmp_path):
    spec = ds_spec(num_experts=None, moe_layer_freq=1, num_layers=2)
    m = build(spec)
    hf, cfg, _, _ = roundtrip(m, tmp_path / "hf", spec)
    assert cfg["first_k_dense_replace"] == 2


@pytest.mark.parametrize(
    "kw,words",
    [
        (dict(moe_router_score_function="softmax", moe_router_enable_expert_bias=False), ["sigmoid", "softmax"]),
        (dict(moe_router_topk=2), ["top-2", "2 // 2 = 1"]),
        (dict(moe_router_enable_expert_bias=False), ["expert bias", "moe_router_enable_expert_bias"]),
        (dict(moe_shared_expert_intermediate_size=None), ["shared experts"]),
        (dict(moe_shared_expert_intermediate_size=48), ["not a multiple"]),
        (dict(moe_layer_freq=[1, 0, 1]), ["first_k_dense_replace", "[0, 2]"]),
        (dict(mla={"rotary_percent": 0.5}), ["rotary_percent"]),
        (dict(qk_layernorm=False), ["qk_layernorm"]),
    ],
    ids=["softmax-router", "group-top2", "no-expert-bias", "no-shared", "shared-width", "moe-not-suffix", "partial-rope", "no-latent-norms"],
)
def test_mismatch_raises_before_writing(mcore, tmp_path, kw, words):
    m = build(ds_spec(**kw))
    with pytest.raises(ArchMismatchError) as e:
        export_to_hf(m, tmp_path / "hf", arch="deepseek_v3", dtype=torch.float32)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert not (tmp_path / "hf").exists()
    assert not list(tmp_path.iterdir())


def test_non_mla_model_is_not_deepseek_v3(mcore):
    m = build_gpt(TinySpec(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_shared_expert_intermediate_size=32))
    with pytest.raises(ArchMismatchError, match="multi-latent attention"):
        prepare_export(m, "deepseek_v3", torch.float32)
