"""Qwen3.5-MoE export (``arch="qwen3_5_moe_text"``, transformers ``Qwen3_5MoeForCausalLM``): the
Qwen3-Next test models (tests/test_qwen3_next.py: megatron-core 0.19 ``HybridModel`` and
``GPTModel`` forms, Megatron's own torch Gated DeltaNet forward on CPU) with MoE in every layer,
exported in float32, logits compared with Megatron's forward within 1e-4.  What differs from
Qwen3-Next is the DeltaNet input projection (four whole-part HF tensors) and the absence of
dense layers; both are checked here, the TP=2 layout under torchrun.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import hf_logits, tokens_for
from test_qwen3_next import ATOL, build, megatron_logits, needs_gdn, next_spec, run_tp2

ARCH = "qwen3_5_moe_text"
PATTERN = "GE*EGEGE"  # HF layers: linear, full, linear, linear; MoE in each


def export(m, out, **kw):
    from nemo_export_hooks import export_to_hf

    return export_to_hf(m, out, arch=ARCH, dtype=torch.float32, **kw)


def roundtrip(m, out, tokens, ref):
    from conftest import load_hf

    res = export(m, out)
    hf, info = load_hf(out)
    assert type(hf).__name__ == "Qwen3_5MoeForCausalLM"
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    diff = (hf_logits(hf, tokens) - ref).abs().max().item()
    assert diff <= ATOL, f"max abs logit diff {diff}"
    return hf, res


@needs_gdn
@pytest.mark.parametrize("zero_centred,layout", [(True, "sequential"), (True, "te_grouped"), (False, "sequential")],
                         ids=["zero-centred", "zero-centred-te_grouped", "plain-norms"])
def test_qwen3_5_moe_roundtrip(mcore, tmp_path, zero_centred, layout):
    from nemo_export_hooks.testing.layouts import to_te_grouped

    spec = next_spec(zero_centred)
    m = build(spec, PATTERN)
    if layout == "te_grouped":
        to_te_grouped(m)
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(m, tokens)
    hf, res = roundtrip(m, tmp_path / "hf", tokens, ref)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    # embedding, final norm, lm_head; per HF layer: DeltaNet 10 (input norm, in_proj_qkv/z/b/a,
    # conv1d, A_log, dt_bias, norm, out_proj) or attention 7, post-attention norm, MoE 17
    assert res.num_tensors == len(index) == 3 + 3 * (10 + 1 + 17) + (7 + 1 + 17)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == ARCH and cfg["layer_types"] == ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
    assert "mlp_only_layers" not in cfg and "intermediate_size" not in cfg
    # the four parts of Megatron's in_proj, in its own order
    sd, w = hf.state_dict(), m.decoder.layers[0].self_attention.in_proj.weight
    parts = [sd[f"model.layers.0.linear_attn.in_proj_{p}.weight"] for p in ("qkv", "z", "b", "a")]
    assert torch.equal(torch.cat(parts), w)


@needs_gdn
def test_qwen3_5_moe_gpt_form(mcore, tmp_path):
    """``GPTModel`` with ``experimental_attention_variant="gated_delta_net"``,
    ``linear_attention_freq=4`` (Qwen3.5's three linear layers per full one)."""
    from nemo_export_hooks.testing.hybrid import build_gpt_linear_attention

    spec = next_spec(experimental_attention_variant="gated_delta_net", linear_attention_freq=4)
    g = build_gpt_linear_attention(spec)
    tokens = tokens_for(spec.vocab_size)
    roundtrip(g, tmp_path / "hf", tokens, megatron_logits(g, tokens))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]


@needs_gdn
def test_qwen3_5_moe_in_proj_parts_matter(mcore, tmp_path):
    """The beta / alpha rows (``in_proj_b`` / ``in_proj_a``) swapped, or z taken from v, change the logits."""
    spec = next_spec()
    m = build(spec, PATTERN)
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(m, tokens)
    hf, _ = roundtrip(m, tmp_path / "hf", tokens, ref)
    sd = hf.state_dict()
    b, a = "model.layers.0.linear_attn.in_proj_b.weight", "model.layers.0.linear_attn.in_proj_a.weight"
    z, qkv = "model.layers.0.linear_attn.in_proj_z.weight", "model.layers.0.linear_attn.in_proj_qkv.weight"
    v_rows = sd[qkv][-sd[z].shape[0]:]
    for wrong in ({b: sd[a], a: sd[b]}, {z: v_rows}):
        keep = {k: sd[k].clone() for k in wrong}
        with torch.no_grad():
            for k, t in wrong.items():
                sd[k].copy_(t.clone())
            diff = (hf_logits(hf, tokens) - ref).abs().max().item()
            for k, t in keep.items():
                sd[k].copy_(t)
        assert diff > 1e-3, (list(wrong), diff)


@needs_gdn
def test_qwen3_5_moe_refuses_dense_layers(mcore, tmp_path):
    from nemo_export_hooks.exporter.rules import ArchMismatchError

    m = build(next_spec(), "GE*EG-GE")  # a Qwen3-Next-style dense layer
    with pytest.raises(ArchMismatchError, match=r"MoE block in every layer .*layers \[2\] of 4 are dense"):
        export(m, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []
    # the shared Qwen3-Next checks name this arch
    m = build(next_spec(attention_output_gate=False), PATTERN)
    with pytest.raises(ArchMismatchError, match=r"qwen3_5_moe_text attention always has an output gate"):
        export(m, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


@needs_gdn
@pytest.mark.dist
def test_qwen3_5_moe_tp2_matches_single_rank(mcore, tmp_path):
    """TP=2 under torchrun (tests/dist/run_qwen3_next.py): the four in_proj parts come from
    each rank's slice of every part; Megatron's TP=2 forward on per-part shards gives the
    single-rank logits, and the export equals the single-rank export byte for byte."""
    spec = next_spec()
    m = build(spec, PATTERN)
    res = run_tp2(m, spec, tmp_path, export, ["--arch", ARCH, "--pattern", PATTERN])
    assert res["logit_diff"] <= ATOL and res["naive_logit_diff"] > 1e-2, res
    assert res["diff"] == [] and res["same_config"] and res["n"] == 3 + 3 * 28 + 25, res


def test_registered():
    from nemo_export_hooks.exporter.rules import get_rule

    assert get_rule(ARCH).architecture == "Qwen3_5MoeForCausalLM"


def test_multimodal_model_type_points_to_the_text_arch():
    """arch='qwen3_5_moe' (the multimodal checkpoint's model_type) is refused naming the text arch."""
    from nemo_export_hooks.exporter.rules import get_rule

    with pytest.raises(ValueError, match=r"unknown arch 'qwen3_5_moe' \(qwen3_5_moe is the multimodal .* arch='qwen3_5_moe_text'\)"):
        get_rule("qwen3_5_moe")


@needs_gdn
def test_qwen3_5_moe_refuses_pre_softmax_router(mcore, tmp_path):
    """transformers 5.23's ``Qwen3_5MoeTopKRouter`` always renormalises the top-k (it reads no
    ``norm_topk_prob``); Megatron's pre-softmax router keeps them unnormalised.  The old export
    wrote ``norm_topk_prob: false`` and loaded 0.6 off; now refused by name, nothing written."""
    from nemo_export_hooks.exporter.rules import ArchMismatchError

    m = build(next_spec(moe_router_pre_softmax=True), PATTERN)
    with pytest.raises(ArchMismatchError, match=r"always renormalises the top-k .*moe_router_pre_softmax=True"):
        export(m, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []
