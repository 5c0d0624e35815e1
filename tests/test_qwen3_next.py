"""Qwen3-Next export: megatron-core 0.19's ``HybridModel`` with Gated DeltaNet (``G``) and gated
attention (``*``) layers, each followed by an MoE (``E``) or MLP (``-``) layer, and its ``GPTModel``
form (``experimental_attention_variant="gated_delta_net"``), zero-centred norms and a gated
shared expert, exported in float32, loaded by ``transformers``
(``Qwen3NextForCausalLM``), logits compared with Megatron's forward within 1e-4.

The Megatron forward is megatron-core's own: ``GatedDeltaNet`` with ``deterministic_mode=True``
runs its torch conv and ``torch_chunk_gated_delta_rule``; only fla's ``l2norm`` (a Triton
kernel) and TE's zero-centred ``RMSNorm`` have CPU stand-ins (``nemo_export_hooks.testing.hybrid``).
megatron-core wraps the GDN helpers in ``jit_fuser`` (``torch.compile``): compiling them on
CPU takes ~25 s and computes the same function, so the forward runs them eagerly.

Needs megatron-core >= 0.19 (Gated DeltaNet in ``HybridModel``); ``make test-mcore19`` runs it.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import hf_logits, load_hf, tokens_for


def _have_gdn() -> bool:
    try:
        from megatron.core.models.hybrid.hybrid_model import HybridModel  # noqa: F401
        from megatron.core.ssm.gated_delta_net import GatedDeltaNet  # noqa: F401
    except ImportError:
        return False
    return True


needs_gdn = pytest.mark.skipif(not _have_gdn(), reason="Gated DeltaNet layers in HybridModel are new in megatron-core 0.19")

ATOL = 1e-4
PATTERN = "GE*EG-GE"  # HF layers: linear+MoE, full+MoE, linear+MLP, linear+MoE


def next_spec(zero_centred: bool = True, **extra):
    from nemo_export_hooks.testing.cpu import TinySpec

    ex = dict(layernorm_zero_centered_gamma=zero_centred, attention_output_gate=True, moe_shared_expert_gate=True,
              deterministic_mode=True, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=8,
              linear_num_key_heads=2, linear_num_value_heads=4, init_method_std=0.2)
    ex.update(extra)
    return TinySpec(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                    ffn_hidden_size=96, vocab_size=128, num_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2,
                    moe_shared_expert_intermediate_size=48, qk_layernorm=True, rotary_percent=0.25, extra=ex)


def build(spec, pattern=PATTERN, seed=1234):
    from nemo_export_hooks.testing.hybrid import build_hybrid

    return build_hybrid(spec, pattern, seed=seed)


def megatron_logits(m, tokens):
    import torch._dynamo

    from nemo_export_hooks.testing.cpu import megatron_logits as forward

    with torch._dynamo.config.patch(disable=True):
        return forward(m, tokens)


def export(m, out, **kw):
    from nemo_export_hooks import export_to_hf

    return export_to_hf(m, out, arch="qwen3_next", dtype=torch.float32, **kw)


def roundtrip(m, out, tokens, ref):
    res = export(m, out)
    hf, info = load_hf(out)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    diff = (hf_logits(hf, tokens) - ref).abs().max().item()
    assert diff <= ATOL, f"max abs logit diff {diff}"
    return hf, res


@needs_gdn
@pytest.mark.parametrize("zero_centred", [True, False], ids=["zero-centred", "plain-norms"])
@pytest.mark.parametrize("layout", ["sequential", "te_grouped"])
def test_qwen3_next_roundtrip(mcore, tmp_path, zero_centred, layout):
    from nemo_export_hooks.testing.layouts import to_te_grouped

    spec = next_spec(zero_centred)
    m = build(spec)
    if layout == "te_grouped":
        to_te_grouped(m)
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(m, tokens)
    hf, res = roundtrip(m, tmp_path / "hf", tokens, ref)
    # (transformers 5 fuses experts in memory: count the files' tensors, not the state dict)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    # embedding, final norm, lm_head; per HF layer: DeltaNet 8 (input norm, in_proj_qkvz/ba, conv1d,
    # A_log, dt_bias, norm, out_proj) or attention 7 (input norm, q/k/v/o, q/k norm), then the
    # post-attention norm and MoE 17 (router, shared expert 3 + its gate, 4 experts x 3) or MLP 3
    assert res.num_tensors == len(index) == 3 + (8 + 1 + 17) + (7 + 1 + 17) + (8 + 1 + 3) + (8 + 1 + 17)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["layer_types"] == ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
    assert cfg["mlp_only_layers"] == [2] and cfg["num_experts"] == 4 and cfg["shared_expert_intermediate_size"] == 48
    assert cfg["partial_rotary_factor"] == 0.25
    # the norms: HF's block norms are zero-centred, its gated DeltaNet norm is plain
    sd = hf.state_dict()
    mega = dict(m.named_parameters())
    shift = 0.0 if zero_centred else -1.0
    for hf_name, mc_name in [("model.layers.0.input_layernorm.weight", "decoder.layers.0.input_layernorm.weight"),
                             ("model.layers.1.self_attn.q_norm.weight", "decoder.layers.2.self_attention.q_layernorm.weight"),
                             ("model.layers.1.post_attention_layernorm.weight", "decoder.layers.3.pre_mlp_layernorm.weight"),
                             ("model.norm.weight", "decoder.final_norm.weight")]:
        assert torch.equal(sd[hf_name], mega[mc_name] + shift), hf_name
    gated = mega["decoder.layers.0.self_attention.out_norm.weight"]
    assert torch.equal(sd["model.layers.0.linear_attn.norm.weight"], gated + 1 if zero_centred else gated)
    assert torch.equal(sd["model.layers.0.mlp.shared_expert_gate.weight"], mega["decoder.layers.1.mlp.shared_experts.gate_weight"])


@needs_gdn
def test_qwen3_next_te_fused_norm_names(mcore, tmp_path):
    """TE's fused pre-norms (``self_attention.in_proj.layer_norm_weight`` of a DeltaNet layer,
    ``linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``), zero-centred."""
    from nemo_export_hooks.testing.hybrid import to_te_fused_norms

    spec = next_spec()
    m = build(spec)
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(m, tokens)
    names = to_te_fused_norms(m)
    assert names == ["0: self_attention.in_proj.layer_norm_weight", "2: self_attention.linear_qkv.layer_norm_weight",
                     "4: self_attention.in_proj.layer_norm_weight", "5: mlp.linear_fc1.layer_norm_weight",
                     "6: self_attention.in_proj.layer_norm_weight"]
    assert (megatron_logits(m, tokens) - ref).abs().max().item() <= 1e-5
    roundtrip(m, tmp_path / "hf", tokens, ref)


@needs_gdn
def test_qwen3_next_mappings_matter(mcore, tmp_path):
    """Each Qwen3-Next-specific mapping changes the logits when done the naive way: the
    regrouped DeltaNet in_proj, the per-head q/gate interleave of q_proj, the ``+ 1`` of the
    gated norm, the shared-expert gate."""
    spec = next_spec()
    m = build(spec)
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(m, tokens)
    hf, _ = roundtrip(m, tmp_path / "hf", tokens, ref)
    mega = dict(m.named_parameters())
    in_proj = mega["decoder.layers.0.self_attention.in_proj.weight"]
    qkv = mega["decoder.layers.2.self_attention.linear_qkv.weight"]
    nq = spec.num_attention_heads * spec.kv_channels
    per_group = qkv.view(spec.num_query_groups, -1, spec.hidden_size)
    q_plain = per_group[:, : 2 * nq // spec.num_query_groups].reshape(-1, spec.hidden_size)  # [q heads | gate heads]
    naive = {
        "model.layers.0.linear_attn.in_proj_qkvz.weight": in_proj[: hf.model.layers[0].linear_attn.in_proj_qkvz.weight.shape[0]],
        "model.layers.1.self_attn.q_proj.weight": q_plain,
        "model.layers.0.linear_attn.norm.weight": mega["decoder.layers.0.self_attention.out_norm.weight"],
        "model.layers.0.mlp.shared_expert_gate.weight": torch.full_like(mega["decoder.layers.1.mlp.shared_experts.gate_weight"], 10.0),
    }
    sd = hf.state_dict()
    for name, wrong in naive.items():
        keep = sd[name].clone()
        assert not torch.equal(keep, wrong), name
        with torch.no_grad():
            sd[name].copy_(wrong)
            diff = (hf_logits(hf, tokens) - ref).abs().max().item()
            sd[name].copy_(keep)
        assert diff > 1e-3, f"{name} done naively still matches ({diff})"


@needs_gdn
@pytest.mark.parametrize(
    "extra,kw,pattern,match",
    [
        (dict(attention_output_gate=False), {}, PATTERN, r"always has an output gate .*attention_output_gate=False"),
        (dict(moe_shared_expert_gate=False), {}, PATTERN, r"gates its shared expert .*moe_shared_expert_gate=False"),
        ({}, dict(qk_layernorm=False), PATTERN, r"always has qk-norm; the model has qk_layernorm=False"),
        ({}, dict(moe_router_score_function="sigmoid"), PATTERN, r"routes with softmax; the model uses sigmoid"),
        ({}, dict(moe_shared_expert_intermediate_size=None), PATTERN, r"always have a shared expert; the model has none"),
        ({}, {}, "G*E-", r"pattern 'G\*E-' does not pair .*layer 1 is '\*'"),
    ],
    ids=["no-output-gate", "ungated-shared-expert", "no-qk-norm", "sigmoid-router", "no-shared-expert", "bad-pattern"],
)
def test_qwen3_next_refuses(mcore, tmp_path, extra, kw, pattern, match):
    from dataclasses import replace

    from nemo_export_hooks.exporter.rules import ArchMismatchError

    spec = replace(next_spec(**extra), **kw)
    m = build(spec, pattern)
    with pytest.raises(ArchMismatchError, match=match):
        export(m, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


@needs_gdn
@pytest.mark.parametrize("freq,types", [([1, 0, 1, 1], "G*GG"), (2, "G*G*")], ids=["list", "every-2nd-full"])
def test_qwen3_next_gpt_form(mcore, tmp_path, freq, types):
    """The ``GPTModel`` form (``experimental_attention_variant="gated_delta_net"``, Megatron-Bridge's
    Qwen3-Next): round trip; with the same weights in a ``HybridModel`` the logits and the export
    are the same, byte for byte."""
    from conftest import read_export

    from nemo_export_hooks.testing.hybrid import build_gpt_linear_attention, copy_gpt_into_hybrid

    spec = next_spec(experimental_attention_variant="gated_delta_net", linear_attention_freq=freq, moe_layer_freq=[1, 1, 0, 1])
    g = build_gpt_linear_attention(spec)
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(g, tokens)
    roundtrip(g, tmp_path / "gpt", tokens, ref)
    cfg = json.loads((tmp_path / "gpt" / "config.json").read_text())
    assert cfg["layer_types"] == ["linear_attention" if t == "G" else "full_attention" for t in types]
    assert cfg["mlp_only_layers"] == [2]
    if freq != [1, 0, 1, 1]:
        return
    h = build(next_spec(), PATTERN)
    copy_gpt_into_hybrid(g, h)
    assert torch.equal(megatron_logits(h, tokens), ref)
    export(h, tmp_path / "hybrid")
    a, b = read_export(tmp_path / "gpt"), read_export(tmp_path / "hybrid")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert json.loads((tmp_path / "hybrid" / "config.json").read_text()) == cfg


@needs_gdn
def test_qwen3_next_refuses_a_plain_gpt_model(mcore, tmp_path):
    from nemo_export_hooks.exporter.rules import ArchMismatchError
    from nemo_export_hooks.testing.cpu import TinySpec, build_gpt

    m = build_gpt(TinySpec())
    with pytest.raises(ArchMismatchError, match=r"always has an output gate .*attention_output_gate=False"):
        export(m, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_registered():
    from nemo_export_hooks.exporter.rules import get_rule

    assert get_rule("qwen3_next").architecture == "Qwen3NextForCausalLM"


def run_tp2(m, spec, tmp_path, export_fn=None, args=()) -> dict:
    """Save ``m``'s state, logits and world-size-1 export as the reference, run
    tests/dist/run_qwen3_next.py on 2 ranks (torchrun, gloo) with ``args``, return its results."""
    import sys
    from pathlib import Path

    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).parent / "dist"))
    import dist_common as C
    from test_distributed import torchrun

    ref = tmp_path / "ref"
    ref.mkdir()
    C.save_reference_state(m, ref / "megatron.safetensors")
    save_file({"logits": megatron_logits(m, C.tokens_for(spec.vocab_size)).contiguous()}, str(ref / "logits.safetensors"))
    (export_fn or export)(m, ref / "hf")
    out = tmp_path / "out"
    out.mkdir()
    rc, log = torchrun(2, ["--ref", str(ref), "--out", str(out), *args], out / "torchrun.log", program="run_qwen3_next.py")
    assert rc == 0, log[-4000:]
    return json.loads((out / "results.json").read_text())


@needs_gdn
@pytest.mark.dist
def test_qwen3_next_tp2_matches_single_rank(mcore, tmp_path):
    """TP=2 (tests/dist/run_qwen3_next.py under torchrun, gloo): each DeltaNet in_proj / conv1d
    shard holds its rank's slice of every part; Megatron's TP=2 forward on those shards gives the
    world-size-1 logits, and the export equals the world-size-1 export byte for byte."""
    spec = next_spec()
    m = build(spec)
    res = run_tp2(m, spec, tmp_path)
    assert res["in_proj_local_rows"] == m.decoder.layers[0].self_attention.in_proj.weight.shape[0] // 2
    assert res["logit_diff"] <= ATOL, res  # (TP=2 sums out_proj / linear_proj partials in another order)
    assert res["naive_logit_diff"] > 1e-2, res  # contiguous in_proj / conv1d shards compute something else
    assert res["diff"] == [] and res["same_config"] and res["n"] == 92, res


@needs_gdn
def test_qwen3_next_pre_softmax_router_roundtrip(mcore, tmp_path):
    """Unlike Qwen3.5-MoE's, transformers' ``Qwen3NextTopKRouter`` reads ``norm_topk_prob``:
    Megatron's pre-softmax router (unnormalised top-k of a softmax over all experts) is written
    as ``norm_topk_prob: false`` and round-trips; the key matters (true is off)."""
    spec = next_spec(moe_router_pre_softmax=True)
    m = build(spec)
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(m, tokens)
    roundtrip(m, tmp_path / "hf", tokens, ref)
    cfg_path = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["norm_topk_prob"] is False
    cfg["norm_topk_prob"] = True
    cfg_path.write_text(json.dumps(cfg))
    hf, _ = load_hf(tmp_path / "hf")
    assert (hf_logits(hf, tokens) - ref).abs().max().item() > 1e-3
