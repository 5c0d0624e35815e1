"""gpt-oss export: real Megatron-Core GPT models (CPU, local spec, SequentialMLP and the
TEGroupedMLP stand-in) with attention sinks (softmax_type="learnable"), biases everywhere,
the clamped, offset SwiGLU (quick_gelu, glu_linear_offset=1, clamp 7) and alternating
sliding-window layers, exported in float32 -- experts stacked into gate_up_proj [E, H, 2F]
(interleaved) and down_proj [E, F, H] -- loaded by `transformers` (GptOssForCausalLM),
logits compared with Megatron's forward within 1e-4.

Megatron-Core 0.15's torch softmax path builds the sliding-window mask on a literal "cuda"
device; the CPU shim in nemo_export_hooks.testing.cpu builds the same mask on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import hf_logits, load_hf, tokens_for
from nemo_export_hooks import export_to_hf
from nemo_export_hooks.exporter.rules import ArchMismatchError, get_rule
from nemo_export_hooks.testing.cpu import TinySpec, build_gpt, megatron_logits
from nemo_export_hooks.testing.layouts import to_te_grouped

pytest.importorskip("transformers.models.gpt_oss")

ATOL = 1e-4


def oss_spec(extra=None, **kw) -> TinySpec:
    from megatron.core.activations import quick_gelu

    ex = dict(init_method_std=0.2, softmax_type="learnable", window_size=(3, 0), window_attn_skip_freq=2,
              activation_func=quick_gelu, glu_linear_offset=1.0, activation_func_clamp_value=7.0)
    ex.update(extra or {})
    base = dict(
        num_layers=3, num_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2, qk_layernorm=False, layernorm_epsilon=1e-5,
        add_qkv_bias=True, add_bias_linear=True, rotary_base=10000.0,
        extra=ex,
    )
    base.update(kw)
    return TinySpec(**base)


def build(spec, seed=1234):
    m = build_gpt(spec, seed=seed)
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for layer in m.decoder.layers:  # sinks are torch.empty in Megatron: give them values
            layer.self_attention.core_attention.softmax_offset.copy_(torch.randn(spec.num_attention_heads, generator=g))
    return m


@pytest.mark.parametrize("layout", ["sequential", "te_grouped"])
def test_gpt_oss_roundtrip(mcore, tmp_path, layout):
    spec = oss_spec()
    m = build(spec)
    if layout == "te_grouped":
        to_te_grouped(m)
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(m, tokens)
    res = export_to_hf(m, tmp_path / "hf", arch="gpt_oss", dtype=torch.float32)
    hf, info = load_hf(tmp_path / "hf")
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    diff = (hf_logits(hf, tokens) - ref).abs().max().item()
    assert diff <= ATOL, f"max abs logit diff {diff}"
    # (transformers 5 fuses experts in memory: count the files' tensors, not the state dict)
    assert res.num_tensors == len(json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"])
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert cfg["sliding_window"] == 4 and cfg["num_local_experts"] == 4 and cfg["intermediate_size"] == 32
    sd = hf.state_dict()
    assert sd["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, spec.hidden_size, 64)
    assert sd["model.layers.2.mlp.experts.down_proj_bias"].shape == (4, spec.hidden_size)
    assert torch.equal(sd["model.layers.1.self_attn.sinks"], m.decoder.layers[1].self_attention.core_attention.softmax_offset)
    # sharp enough to see the sinks and the window
    for layer in hf.model.layers:
        layer.self_attn.sinks.data.fill_(-1e4)
    assert (hf_logits(hf, tokens) - ref).abs().max().item() > 1e-3, "the sinks do not matter in this test"


def test_gpt_oss_window_is_exported(mcore, tmp_path):
    # a model whose windows were ignored would match a full-attention HF model: it must not
    spec = oss_spec()
    m = build(spec)
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(m, tokens)
    export_to_hf(m, tmp_path / "hf", arch="gpt_oss", dtype=torch.float32)
    cfg_path = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["sliding_window"] = 3  # off by one
    cfg_path.write_text(json.dumps(cfg))
    hf, _ = load_hf(tmp_path / "hf")
    assert (hf_logits(hf, tokens) - ref).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    "extra, kw, match",
    [
        (dict(glu_linear_offset=0.0), {}, r"experts compute \(up \+ 1\)"),
        (dict(activation_func_clamp_value=None), {}, "experts clamp at 7.0"),
        (dict(softmax_type="vanilla"), {}, "learned sink per head"),
        ({}, dict(qk_layernorm=True), "has no qk-norm"),
        # vLLM's gpt-oss ignores layer_types and rms_norm_eps (tests/vllm_cpu checks the numbers)
        (dict(window_attn_skip_freq=None), {}, r"windows the even layers \[0, 2\].*the model windows HF layers \[0, 1, 2\].*window_attn_skip_freq=None"),
        ({}, dict(layernorm_epsilon=1e-6), r"normalises with eps 1e-05 .*layernorm_epsilon=1e-06"),
    ],
)
def test_gpt_oss_refuses(mcore, tmp_path, extra, kw, match):
    m = build_gpt(oss_spec(extra=extra, **kw)) if extra.get("softmax_type") == "vanilla" else build(oss_spec(extra=extra, **kw))
    with pytest.raises(ArchMismatchError, match=match):
        export_to_hf(m, tmp_path / "hf", arch="gpt_oss", dtype=torch.float32)


def test_registered():
    assert get_rule("gpt_oss").architecture == "GptOssForCausalLM"


@pytest.mark.dist
def test_gpt_oss_ep2_and_tp2_match_single_rank(mcore, tmp_path):
    """Stacked experts over EP=2 (rank 0 assembles each layer) and sinks over TP=2: the same
    bytes as the world-size-1 export (tests/dist/run_gpt_oss.py under torchrun, gloo)."""
    import sys
    from pathlib import Path

    from nemo_export_hooks.testing.cpu import init_single_process

    sys.path.insert(0, str(Path(__file__).parent / "dist"))
    import dist_common as C
    from test_distributed import torchrun

    init_single_process()
    spec = oss_spec()
    m = build(spec)
    ref = tmp_path / "ref"
    ref.mkdir()
    C.save_reference_state(m, ref / "megatron.safetensors")
    export_to_hf(m, ref / "hf", arch="gpt_oss", dtype=torch.float32)
    out = tmp_path / "out"
    out.mkdir()
    rc, log = torchrun(2, ["--ref", str(ref), "--out", str(out)], out / "torchrun.log", program="run_gpt_oss.py")
    assert rc == 0, log[-4000:]
    res = json.loads((out / "results.json").read_text())
    for name in ("ep2", "tp2"):
        assert res[name]["diff"] == [] and res[name]["same_config"], (name, res[name])
        assert res[name]["n"] == 3 + 3 * 17  # embedding, final norm, lm_head + 17 per layer
    # EP=2: rank 0 owns every layer's stacks, each assembled from its own 2 local experts
    stacks = res["ep2"]["rank0_stacks"]
    assert len(stacks) == 3 * 4 and all(owner for _, owner, _ in stacks)
    assert all(shape[0] == 2 for _, _, shape in stacks)


def test_gpt_oss_quantized_experts_refused_at_planning(mcore, tmp_path):
    # stacked experts are written unquantized only: a ModelOpt-quantized expert is refused by
    # name before anything is written
    mtq = pytest.importorskip("modelopt.torch.quantization")
    import warnings

    spec = oss_spec()
    m = build(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(m, mtq.FP8_DEFAULT_CFG, lambda mm: megatron_logits(mm, tokens_for(spec.vocab_size)))
    with pytest.raises(ArchMismatchError, match=r"layer 0 experts: arch 'gpt_oss' stacks experts into one tensor.*is quantized"):
        export_to_hf(m, tmp_path / "hf", arch="gpt_oss", dtype=torch.bfloat16)
    assert not (tmp_path / "hf").exists()


def yarn_spec(factor=4.0, truncate=False, **attrs) -> TinySpec:
    """gpt-oss with YaRN, as Megatron-Bridge / NeMo configure it (position_embedding_type="yarn"
    and the yarn_* config fields), at a scale the 12-token test sequence feels: factor 4 over
    16 original positions puts the correction ramp inside the 16 frequency pairs of head dim
    32, so some dims interpolate, some extrapolate, and the attention factor is 1.139."""
    ya = dict(yarn_rotary_scaling_factor=factor, yarn_original_max_position_embeddings=16, yarn_beta_fast=32.0,
              yarn_beta_slow=1.0, yarn_correction_range_round_to_int=truncate, yarn_mscale=1.0, yarn_mscale_all_dim=0.0)
    ya.update(attrs)
    s = oss_spec()
    s.position_embedding_type = "yarn"
    s.config_attrs = ya
    return s


@pytest.mark.parametrize("truncate", [False, True])
def test_gpt_oss_yarn_roundtrip(mcore, tmp_path, truncate):
    spec = yarn_spec(truncate=truncate)
    m = build(spec)
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(m, tokens)
    export_to_hf(m, tmp_path / "hf", arch="gpt_oss", dtype=torch.float32)
    cfg_path = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    want = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
            "beta_slow": 1.0, "truncate": truncate}
    assert {k: cfg["rope_parameters"][k] for k in want} == want and cfg["rope_scaling"] == want
    assert cfg["max_position_embeddings"] == 64
    hf, _ = load_hf(tmp_path / "hf")
    diff = (hf_logits(hf, tokens) - ref).abs().max().item()
    assert diff <= ATOL, f"max abs logit diff {diff}"
    # the YaRN parameters matter here: plain RoPE (factor 1) computes something else
    for key in ("rope_parameters", "rope_scaling"):
        cfg[key]["factor"] = 1.0
    cfg_path.write_text(json.dumps(cfg))
    hf, _ = load_hf(tmp_path / "hf")
    assert (hf_logits(hf, tokens) - ref).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    "attrs, match",
    [
        # NeMo 2's GPTOSSConfig: mscale and mscale_all_dim both 1, so Megatron's factor is 1.0
        (dict(yarn_mscale=1.0, yarn_mscale_all_dim=1.0), r"scales q and k by 0.1 ln\(factor\) \+ 1 = 1.13863 .*concentration factor is 1 "),
        (dict(yarn_rotary_scaling_factor=0.5), "yarn_rotary_scaling_factor >= 1"),
    ],
)
def test_gpt_oss_yarn_refused_where_attention_factors_differ(mcore, tmp_path, attrs, match):
    m = build(yarn_spec(**attrs))
    with pytest.raises(ArchMismatchError, match=match):
        export_to_hf(m, tmp_path / "hf", arch="gpt_oss", dtype=torch.float32)


# -- HybridModel (megatron-core >= 0.18): windows are per Megatron layer, read per HF layer -----


def _have_hybrid_model() -> bool:
    try:
        from megatron.core.models.hybrid.hybrid_model import HybridModel  # noqa: F401
    except ImportError:
        return False
    return True


needs_hybrid = pytest.mark.skipif(not _have_hybrid_model(), reason="HybridModel is new in megatron-core 0.18")


def build_hybrid_oss(freq, seed=1234):
    """gpt-oss as ``*E*E*E*E``: attention in Megatron layers 0, 2, 4, 6 (numbers 1, 3, 5, 7)."""
    from nemo_export_hooks.testing.hybrid import build_hybrid

    spec = oss_spec(extra=dict(window_attn_skip_freq=freq), num_layers=4)
    m = build_hybrid(spec, "*E*E*E*E", seed=seed)
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for layer in m.decoder.layers[::2]:
            layer.self_attention.core_attention.softmax_offset.copy_(torch.randn(spec.num_attention_heads, generator=g))
    return spec, m


@needs_hybrid
def test_hybrid_skip_freq_2_windows_every_hf_layer(mcore, tmp_path):
    """window_attn_skip_freq=2 on ``*E*E*E*E`` windows every attention layer (Megatron numbers
    1, 3, 5, 7 are all odd): every HF layer is sliding, which vLLM's gpt-oss (even layers only)
    cannot express -- refused by name, nothing written.  (The old export wrote alternating
    layer_types: logits 0.8 off.)"""
    from nemo_export_hooks.exporter.plan import model_info
    from nemo_export_hooks.exporter.source import iter_layers
    from nemo_export_hooks.exporter.windows import hf_windows

    spec, m = build_hybrid_oss(2)
    info = model_info([m], list(iter_layers([m])), get_rule("gpt_oss"))
    assert hf_windows(info) == [(3, 0)] * 4
    with pytest.raises(ArchMismatchError, match=r"the model windows HF layers \[0, 1, 2, 3\].*window_attn_skip_freq=2"):
        export_to_hf(m, tmp_path / "hf", arch="gpt_oss", dtype=torch.float32)
    assert not (tmp_path / "hf").exists()


@needs_hybrid
def test_hybrid_window_list_per_megatron_layer_exports(mcore, tmp_path):
    """``[1,0,0,0,1,0,0,0]`` windows Megatron layers 0 and 4 = HF layers 0 and 2, gpt-oss's own
    pattern: exported (the old planner read the list per HF layer and refused "[0, 4]")."""
    spec, m = build_hybrid_oss([1, 0, 0, 0, 1, 0, 0, 0])
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(m, tokens)
    export_to_hf(m, tmp_path / "hf", arch="gpt_oss", dtype=torch.float32)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"] * 2 and cfg["num_hidden_layers"] == 4
    hf, info = load_hf(tmp_path / "hf")
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    diff = (hf_logits(hf, tokens) - ref).abs().max().item()
    assert diff <= ATOL, f"max abs logit diff {diff}"
    # the windows matter here: every layer sliding computes something else
    cfg["layer_types"] = ["sliding_attention"] * 4
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    hf2, _ = load_hf(tmp_path / "hf")
    assert (hf_logits(hf2, tokens) - ref).abs().max().item() > 1e-3
