"""NemotronH export: real Megatron-Core hybrid ``MambaModel`` stacks (CPU, local modules composed
like ``mamba_stack_spec`` -- see ``nemo_export_hooks/testing/hybrid.py`` -- with the norms also
fused the way Transformer Engine names them; experts as SequentialMLP, the TEGroupedMLP stand-in
and the real legacy GroupedMLP) exported and loaded by transformers' ``NemotronHForCausalLM``.

* Patterns without Mamba layers run forward in Megatron on CPU: logits equal transformers'
  within 1e-4 (float32).
* Megatron's Mamba forward needs mamba_ssm's CUDA kernels, so patterns with Mamba layers are
  checked tensor by tensor: every exported tensor against the Megatron tensor it came from
  (written here independently of the rule table: rename, grouped-query QKV split, per-expert
  views), zero missing/unexpected keys, the loaded HF modules holding those values, and a
  finite transformers forward (its torch Mamba-2 fallback).
* The tensor-parallel re-ordering of Mamba's fused ``in_proj`` / ``conv1d`` is checked on
  simulated shards (real TP runs are in the distributed suite).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "NemotronHForCausalLM"):
    pytest.skip(
        f"transformers {transformers.__version__} has no NemotronHForCausalLM (needs transformers >= 5)",
        allow_module_level=True,
    )
pytest.importorskip("megatron.core.models.mamba")

from conftest import hf_logits, load_hf, tokens_for  # noqa: E402
from nemo_export_hooks import export_to_hf  # noqa: E402
from nemo_export_hooks.exporter.api import prepare_export  # noqa: E402
from nemo_export_hooks.exporter.rules import ArchMismatchError, get_rule  # noqa: E402
from nemo_export_hooks.exporter.rules.base import ModelInfo  # noqa: E402
from nemo_export_hooks.testing.cpu import TinySpec, build_gpt, megatron_logits  # noqa: E402
from nemo_export_hooks.testing.hybrid import build_mamba, nemotron_h_spec, to_te_fused_norms  # noqa: E402
from nemo_export_hooks.testing.layouts import LEGACY_GROUPED_REMOVED, have_legacy_grouped, to_legacy_grouped, to_te_grouped  # noqa: E402

ATOL = 1e-4
LAYOUTS = {"sequential": lambda m: None, "te_grouped": to_te_grouped, "legacy_grouped": to_legacy_grouped}
NAMES = {"local": lambda m: [], "te": to_te_fused_norms}
LEGACY = pytest.mark.skipif(not have_legacy_grouped(), reason=LEGACY_GROUPED_REMOVED)


def _read(path):
    out = {}
    for fn in sorted(path.glob("*.safetensors")):
        with safe_open(str(fn), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _cfg(path):
    return json.loads((path / "config.json").read_text())


# -- what each HF tensor must be, from the Megatron model (independent of the rule table) ----


def _mixer_param(mixer, name):
    """A Mamba mixer parameter by its HF-side name; megatron-core >= 0.19 holds the conv as the
    mixer's own ``conv1d_weight`` / ``conv1d_bias`` instead of an ``nn.Conv1d``."""
    if name.startswith("conv1d.") and not hasattr(mixer, "conv1d"):
        return getattr(mixer, name.replace(".", "_"))
    return mixer.get_parameter(name)


def _norm_weight(layer, module_attr, fused_owner):
    from megatron.core.transformer.identity_op import IdentityOp

    norm = getattr(layer, module_attr)
    if isinstance(norm, IdentityOp):  # TE: fused into the following linear
        return fused_owner.layer_norm_weight
    return norm.weight


def _qkv(w, cfg):
    ng, nh = cfg.num_query_groups, cfg.num_attention_heads
    hd = cfg.kv_channels
    per = nh // ng
    v = w.view(ng, per + 2, hd, w.shape[1])
    return v[:, :per].reshape(-1, w.shape[1]), v[:, per].reshape(-1, w.shape[1]), v[:, per + 1].reshape(-1, w.shape[1])


def _experts(experts):
    """(fc1, fc2) weight of every local expert, whatever the layout."""
    if hasattr(experts, "local_experts"):
        return [(e.linear_fc1.weight, e.linear_fc2.weight) for e in experts.local_experts]
    if hasattr(getattr(experts, "linear_fc1", None), "num_gemms"):  # TEGroupedMLP
        n = experts.linear_fc1.num_gemms
        return [(getattr(experts.linear_fc1, f"weight{i}"), getattr(experts.linear_fc2, f"weight{i}")) for i in range(n)]
    n = experts.num_local_experts  # legacy GroupedMLP: x @ weight1 views
    h = experts.weight1.shape[0]
    w1, w2 = experts.weight1.view(n, h, -1), experts.weight2.view(n, -1, h)
    return [(w1[i].t(), w2[i].t()) for i in range(n)]


def expected_tensors(m, pattern) -> dict[str, torch.Tensor]:
    cfg = m.config
    out = {
        "backbone.embeddings.weight": m.embedding.word_embeddings.weight,
        "backbone.norm_f.weight": m.decoder.final_norm.weight,
        "lm_head.weight": m.output_layer.weight,
    }
    for layer in m.decoder.layers:
        i = int(layer.layer_number) - 1
        p = f"backbone.layers.{i}."
        t = pattern[i]
        if t == "M":
            mx = layer.mixer
            out[p + "norm.weight"] = _norm_weight(layer, "norm", mx.in_proj)
            for n in ("in_proj.weight", "out_proj.weight", "conv1d.weight", "conv1d.bias", "A_log", "D", "dt_bias", "norm.weight"):
                out[p + "mixer." + n] = _mixer_param(mx, n)
        elif t == "*":
            sa = layer.self_attention
            out[p + "norm.weight"] = _norm_weight(layer, "input_layernorm", sa.linear_qkv)
            q, k, v = _qkv(sa.linear_qkv.weight, cfg)
            out[p + "mixer.q_proj.weight"], out[p + "mixer.k_proj.weight"], out[p + "mixer.v_proj.weight"] = q, k, v
            out[p + "mixer.o_proj.weight"] = sa.linear_proj.weight
        elif t == "-":
            out[p + "norm.weight"] = _norm_weight(layer, "pre_mlp_layernorm", layer.mlp.linear_fc1)
            out[p + "mixer.up_proj.weight"] = layer.mlp.linear_fc1.weight
            out[p + "mixer.down_proj.weight"] = layer.mlp.linear_fc2.weight
        else:
            mlp = layer.mlp
            out[p + "norm.weight"] = layer.pre_mlp_layernorm.weight
            out[p + "mixer.gate.weight"] = mlp.router.weight
            out[p + "mixer.gate.e_score_correction_bias"] = mlp.router.expert_bias
            out[p + "mixer.shared_experts.up_proj.weight"] = mlp.shared_experts.linear_fc1.weight
            out[p + "mixer.shared_experts.down_proj.weight"] = mlp.shared_experts.linear_fc2.weight
            if cfg.moe_latent_size:
                out[p + "mixer.fc1_latent_proj.weight"] = mlp.fc1_latent_proj.weight
                out[p + "mixer.fc2_latent_proj.weight"] = mlp.fc2_latent_proj.weight
            for e, (w1, w2) in enumerate(_experts(mlp.experts)):
                out[p + f"mixer.experts.{e}.up_proj.weight"] = w1
                out[p + f"mixer.experts.{e}.down_proj.weight"] = w2
    return {k: v.detach() for k, v in out.items()}


def check_tensors(m, pattern, path):
    got = _read(path)
    exp = expected_tensors(m, pattern)
    assert sorted(got) == sorted(exp)
    for k, v in exp.items():
        assert got[k].dtype == torch.float32, k
        assert torch.equal(got[k], v.float()), k
    return got


def load_checked(path):
    hf, info = load_hf(path)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    return hf


# ---------------------------------------------------------------------------------------------


def test_registered():
    rule = get_rule("nemotron_h")
    assert rule.architecture == "NemotronHForCausalLM"
    assert rule.embedding == "backbone.embeddings.weight" and rule.final_norm == "backbone.norm_f.weight"


@pytest.mark.parametrize(
    "layout,names",
    [("sequential", "local"), ("te_grouped", "te"), ("te_grouped", "local"), ("sequential", "te")],
)
def test_attention_mlp_moe_logits_equal_transformers(mcore, tmp_path, layout, names):
    pattern = "*E-E*E"
    spec = nemotron_h_spec(pattern)
    m = build_mamba(spec, pattern)
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(m, tokens)
    fused = NAMES[names](m)
    LAYOUTS[layout](m)
    if fused or layout != "sequential":  # the converted model is the same function
        assert (megatron_logits(m, tokens) - ref).abs().max().item() <= 1e-5
    res = export_to_hf(m, tmp_path / "hf", arch="nemotron_h", dtype=torch.float32)
    check_tensors(m, pattern, tmp_path / "hf")
    hf = load_checked(tmp_path / "hf")
    diff = (hf_logits(hf, tokens) - ref).abs().max().item()
    assert diff <= ATOL, f"max abs logit diff {diff}"
    assert res.num_tensors == len(_read(tmp_path / "hf"))
    cfg = _cfg(tmp_path / "hf")
    assert cfg["layers_block_type"] == ["full_attention", "moe", "mlp", "moe", "full_attention", "moe"]
    assert cfg["hybrid_override_pattern"] == pattern and hf.config.hybrid_override_pattern == pattern
    expect = dict(
        mlp_hidden_act="relu2", intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, moe_shared_expert_intermediate_size=40,
        routed_scaling_factor=2.0, norm_topk_prob=True, n_group=1, topk_group=1, moe_latent_size=None,
        layer_norm_epsilon=1e-5, tie_word_embeddings=False, vocab_size=96, hidden_size=32,
    )
    assert {k: cfg[k] for k in expect} == expect
    assert "mamba_num_heads" not in cfg  # no Mamba layers: HF defaults, unused
    if layout == "sequential" and names == "local":
        # the comparison sees the router's expert bias and its scaling factor
        for layer in hf.model.layers:
            if layer.block_type == "moe":
                layer.mixer.gate.routed_scaling_factor = 1.0
        assert (hf_logits(hf, tokens) - ref).abs().max().item() > 1e-3
        for layer in hf.model.layers:
            if layer.block_type == "moe":
                layer.mixer.gate.routed_scaling_factor = 2.0
                layer.mixer.gate.e_score_correction_bias.zero_()
        assert (hf_logits(hf, tokens) - ref).abs().max().item() > 1e-3


def test_latent_moe_group_routing_logits(mcore, tmp_path):
    """megatron-core 0.16 latent MoE (fc1/fc2_latent_proj, TE TELinear stand-in), 8 experts in
    2 groups (1 group per token), TE fused-norm names, TEGroupedMLP."""
    pattern = "*E-E"
    spec = nemotron_h_spec(pattern, num_experts=8, moe_router_num_groups=2, moe_router_group_topk=1, extra={"moe_latent_size": 16})
    m = build_mamba(spec, pattern)
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(m, tokens)
    to_te_fused_norms(m)
    to_te_grouped(m)
    export_to_hf(m, tmp_path / "hf", arch="nemotron_h", dtype=torch.float32)
    check_tensors(m, pattern, tmp_path / "hf")
    hf = load_checked(tmp_path / "hf")
    assert (hf_logits(hf, tokens) - ref).abs().max().item() <= ATOL
    cfg = _cfg(tmp_path / "hf")
    assert (cfg["moe_latent_size"], cfg["n_group"], cfg["topk_group"], cfg["n_routed_experts"]) == (16, 2, 1, 8)
    assert hf.model.layers[1].mixer.experts.up_proj.shape == (8, 24, 16)


@pytest.mark.parametrize(
    "pattern,layout,names",
    [("M*M-EM", "sequential", "local"), ("M*M-EM", "te_grouped", "te"), pytest.param("ME*-M", "legacy_grouped", "te", marks=LEGACY)],
)
def test_mamba_patterns_tensor_by_tensor(mcore, tmp_path, pattern, layout, names):
    spec = nemotron_h_spec(pattern)
    m = build_mamba(spec, pattern)
    fused = NAMES[names](m)
    if names == "te":
        assert any("mixer.in_proj.layer_norm_weight" in f for f in fused)
    LAYOUTS[layout](m)
    export_to_hf(m, tmp_path / "hf", arch="nemotron_h", dtype=torch.float32)
    got = check_tensors(m, pattern, tmp_path / "hf")
    hf = load_checked(tmp_path / "hf")
    cfg = _cfg(tmp_path / "hf")
    expect = dict(
        mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=16, conv_kernel=4, use_conv_bias=True,
        chunk_size=128, expand=2, mamba_hidden_act="silu", time_step_min=0.0, layer_norm_epsilon=1e-5,
        hybrid_override_pattern=pattern, num_hidden_layers=len(pattern),
    )
    assert {k: cfg[k] for k in expect} == expect
    # the loaded HF modules hold those values where their forward reads them
    for i, t in enumerate(pattern):
        p = f"backbone.layers.{i}."
        layer = hf.model.layers[i]
        assert torch.equal(layer.norm.weight, got[p + "norm.weight"])
        if t == "M":
            mixer, meg = layer.mixer, m.decoder.layers[i].mixer
            assert mixer.intermediate_size == meg.d_inner and mixer.conv_dim == _mixer_param(meg, "conv1d.weight").shape[0]
            assert mixer.num_heads == meg.nheads and mixer.n_groups == meg.ngroups and mixer.ssm_state_size == meg.d_state
            assert mixer.norm.group_size == meg.norm.group_size
            for n in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "A_log", "D", "dt_bias", "norm.weight", "out_proj.weight"):
                assert torch.equal(mixer.get_parameter(n), got[p + "mixer." + n]), n
        if t == "E":
            experts = layer.mixer.experts
            for e in range(experts.num_experts):
                assert torch.equal(experts.up_proj[e], got[p + f"mixer.experts.{e}.up_proj.weight"])
                assert torch.equal(experts.down_proj[e], got[p + f"mixer.experts.{e}.down_proj.weight"])
            assert torch.equal(layer.mixer.gate.e_score_correction_bias, got[p + "mixer.gate.e_score_correction_bias"])
    logits = hf_logits(hf, tokens_for(spec.vocab_size))
    assert logits.shape == (2, 12, spec.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("layout", ["te_grouped", pytest.param("legacy_grouped", marks=LEGACY)])
def test_grouped_exports_equal_sequential_bytes(mcore, tmp_path, layout):
    pattern = "ME*-M"
    m = build_mamba(nemotron_h_spec(pattern), pattern)
    export_to_hf(m, tmp_path / "seq", arch="nemotron_h", dtype=torch.bfloat16)
    LAYOUTS[layout](m)
    to_te_fused_norms(m)
    export_to_hf(m, tmp_path / "grp", arch="nemotron_h", dtype=torch.bfloat16)
    a, b = _read(tmp_path / "seq"), _read(tmp_path / "grp")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # bf16 export: the router bias stays float32 (HF keeps it in fp32), the rest is cast
    bias = a["backbone.layers.1.mixer.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and torch.equal(bias, m.decoder.layers[1].mlp.router.expert_bias)
    assert a["backbone.layers.0.mixer.A_log"].dtype == torch.bfloat16


@pytest.mark.parametrize("tp", [2, 4])
def test_fused_mamba_projections_reordered_across_tp(tp):
    """Each TP rank's in_proj holds [z_r | x_r | B_r | C_r | dt_r] (its heads and groups of each
    part; megatron-core MambaMixer.sharded_state_dict splits it the same way); conv1d holds
    [x_r | B_r | C_r].  After the gather along dim 0 the rows must come back part by part."""
    from nemo_export_hooks.exporter.rules.nemotron_h import CONV1D, IN_PROJ

    d = {"nheads": 8, "headdim": 4, "ngroups": 4, "d_state": 6, "d_inner": 32}
    info = ModelInfo(None, {"mamba": d}, [], 1, False, False, layer_types=["M"])
    bc = d["ngroups"] * d["d_state"]
    for kind, sizes in ((IN_PROJ, [32, 32, bc, bc, 8]), (CONV1D, [32, bc, bc])):
        full = torch.randn(sum(sizes), 3)
        parts = full.split(sizes)
        shards = [torch.cat([part.chunk(tp)[r] for part in parts]) for r in range(tp)]
        gathered = torch.cat(shards)
        ((target, rows),) = kind.bind_tp(info, tp)(("t",), gathered.shape[0])
        assert target == "t" and torch.equal(gathered.index_select(0, rows), full)
        assert kind.bind_tp(info, 1)(("t",), full.shape[0]) == [("t", None)]
        with pytest.raises(ValueError, match="rows"):
            kind.bind_tp(info, tp)(("t",), gathered.shape[0] + 1)
    with pytest.raises(TypeError, match="bind_tp"):
        IN_PROJ(("t",), 10)


def test_planner_binds_the_tp_size(mcore):
    """Through the planner and ``convert``: a plan made under a (simulated) TP=2 layout turns
    rank-ordered in_proj/conv1d shards of a model back into that model's tensors."""
    from nemo_export_hooks.exporter import parallel
    from nemo_export_hooks.exporter.execute import convert
    from nemo_export_hooks.exporter.plan import attention_shape, build_plan
    from nemo_export_hooks.exporter.source import unwrap_model

    pattern = "M-"
    m = build_mamba(nemotron_h_spec(pattern), pattern)
    one = parallel.Group.single()
    tp2 = parallel.Group(None, 0, 2)
    layout = parallel.ParallelLayout(tp2, one, one, 0, 0, 0, 1, 0, 1)
    plan = build_plan(unwrap_model(m), get_rule("nemotron_h"), layout)
    mixer = m.decoder.layers[0].mixer
    d, bc, nh = mixer.d_inner, mixer.ngroups * mixer.d_state, mixer.nheads
    checked = 0
    for job in plan.jobs:
        if job.source.endswith(("in_proj.weight", "conv1d.weight", "conv1d.bias", "conv1d_weight", "conv1d_bias")):
            sizes = [d, d, bc, bc, nh] if "in_proj" in job.source else [d, bc, bc]
            full = job.tensor.detach()  # this model's (TP=1) tensor, in HF order
            parts = full.split(sizes)
            gathered = torch.cat([torch.cat([p.chunk(2)[r] for p in parts]) for r in range(2)])
            assert not torch.equal(gathered, full)
            ((name, t),) = list(convert(job, gathered, None, torch.float32, attention_shape(m.config)))
            assert name == job.targets[0] and torch.equal(t, full), job.source
            checked += 1
    assert checked == 3


@pytest.mark.parametrize(
    "pattern,kw,build_kw,words",
    [
        ("*E", {}, {"position_embedding_type": "rope"}, ["position_embedding_type='rope'"]),
        ("M-", dict(gated_linear_unit=True), {}, ["gated_linear_unit"]),
        ("*E", dict(moe_router_score_function="softmax", moe_router_enable_expert_bias=False), {}, ["sigmoid"]),
        ("*E", dict(moe_router_enable_expert_bias=False), {}, ["moe_router_enable_expert_bias"]),
        ("*E", dict(moe_shared_expert_intermediate_size=None), {}, ["shared experts"]),
        ("M*", dict(layernorm_epsilon=1e-6), {}, ["layernorm_epsilon=1e-06", "eps=1e-05"]),
        ("*-", dict(qk_layernorm=True), {}, ["qk_layernorm"]),
        ("*E", dict(num_experts=8, moe_router_topk=4, moe_router_num_groups=2, moe_router_group_topk=1), {}, ["top-2", "4 // 1 = 4"]),
    ],
    ids=["rope", "gated", "softmax-router", "no-expert-bias", "no-shared", "mamba-eps", "qk-norm", "group-topk"],
)
def test_mismatch_raises_before_writing(mcore, tmp_path, pattern, kw, build_kw, words):
    m = build_mamba(nemotron_h_spec(pattern, **kw), pattern, **build_kw)
    with pytest.raises(ArchMismatchError) as e:
        export_to_hf(m, tmp_path / "hf", arch="nemotron_h", dtype=torch.float32)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert not list(tmp_path.iterdir())


def test_gpt_model_is_not_nemotron_h(mcore):
    m = build_gpt(TinySpec(gated_linear_unit=False, activation="squared_relu", qk_layernorm=False, num_experts=None))
    with pytest.raises(ArchMismatchError, match="hybrid"):
        prepare_export(m, "nemotron_h", torch.float32)


@pytest.mark.parametrize(
    "pattern,match",
    [
        # pairs into HF layers (attention + MoE, attention + MLP): the MoE layers are counted in
        # HF layers, from the hybrid pattern (not moe_layer_freq), and a dense arch refuses them
        ("*E*-", r"arch 'llama' has no experts, but the model has MoE layers \[0\]"),
        # does not pair into transformer layers at all
        ("*E-", r"pattern '\*E-' does not pair .*layer 2 is '-'"),
    ],
)
def test_hybrid_model_is_not_a_gpt_arch(mcore, pattern, match):
    m = build_mamba(nemotron_h_spec(pattern), pattern)
    with pytest.raises(ArchMismatchError, match=match):
        prepare_export(m, "llama", torch.float32)


# -- quantized (ModelOpt) --------------------------------------------------------------------


def _calibrate_each_linear(model, seed=0):
    """ModelOpt calibration without a model forward (Megatron's Mamba forward needs CUDA): feed
    random activations to every quantized linear, experts included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            wq = getattr(mod, "weight_quantizer", None)
            w = getattr(mod, "weight", None)
            if wq is None or not isinstance(w, torch.Tensor) or w.dim() != 2 or "router" in name or "embedding" in name:
                continue
            x = torch.randn(6, 2, w.shape[1], generator=g)
            mod(x)


@pytest.mark.parametrize(
    "recipe,layout",
    [
        ("MAMBA_MOE_NVFP4_CONSERVATIVE_CFG", "sequential"),
        ("NVFP4_DEFAULT_CFG", "sequential"),
        ("MAMBA_MOE_FP8_CONSERVATIVE_CFG", "te_grouped"),
    ],
)
def test_quantized_nemotron_h(mcore, tmp_path, recipe, layout):
    mtq = pytest.importorskip("modelopt.torch.quantization")
    pattern = "M*-EM"
    # NVFP4 packs 16-element blocks of every input dim
    m = build_mamba(nemotron_h_spec(pattern, moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=48), pattern)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(m, getattr(mtq, recipe), _calibrate_each_linear)
    LAYOUTS[layout](m)  # TEGroupedMLP stand-in carries each expert's quantizer
    export_to_hf(m, tmp_path / "hf", arch="nemotron_h", dtype=torch.bfloat16)
    t = _read(tmp_path / "hf")
    hq = json.loads((tmp_path / "hf" / "hf_quant_config.json").read_text())["quantization"]
    excl = set(hq["exclude_modules"])
    algo = "FP8" if "FP8" in recipe else "NVFP4"
    qdtype = torch.float8_e4m3fn if algo == "FP8" else torch.uint8
    assert hq["quant_algo"] == algo
    # routed and shared experts are quantized in every recipe, each expert with its own scale
    scales = []
    for e in range(4):
        base = f"backbone.layers.3.mixer.experts.{e}.up_proj"
        assert t[base + ".weight"].dtype == qdtype
        scales.append(t[base + (".weight_scale_2" if algo == "NVFP4" else ".weight_scale")].item())
    assert len(set(scales)) == 4
    assert t["backbone.layers.3.mixer.shared_experts.down_proj.weight"].dtype == qdtype
    # what ModelOpt never quantizes stays in the export dtype and is excluded
    assert {"lm_head", "backbone.embeddings", "*.mixer.gate", "*.mixer.conv1d"} <= excl
    for k in ("backbone.layers.3.mixer.gate.weight", "backbone.layers.0.mixer.conv1d.weight", "backbone.embeddings.weight", "lm_head.weight"):
        assert t[k].dtype == torch.bfloat16, k
    assert t["backbone.layers.3.mixer.gate.e_score_correction_bias"].dtype == torch.float32
    for k in ("A_log", "D", "dt_bias", "norm.weight"):
        assert t[f"backbone.layers.0.mixer.{k}"].dtype == torch.bfloat16
    in_proj = "backbone.layers.0.mixer.in_proj"
    if recipe.startswith("MAMBA_MOE"):  # Mamba and attention projections left unquantized: listed by name
        assert t[in_proj + ".weight"].dtype == torch.bfloat16 and in_proj + ".weight_scale" not in t
        assert {in_proj, "backbone.layers.4.mixer.out_proj", "backbone.layers.1.mixer.q_proj", "backbone.layers.1.mixer.o_proj"} <= excl
        ref = m.decoder.layers[0].mixer.in_proj.weight.detach().to(torch.bfloat16)
        assert torch.equal(t[in_proj + ".weight"], ref)
    else:  # NVFP4_DEFAULT quantizes them: packed with their own scales, not excluded
        assert t[in_proj + ".weight"].dtype == qdtype and in_proj + ".weight_scale" in t
        assert in_proj not in excl and "backbone.layers.1.mixer.q_proj" not in excl
    assert not any(x.startswith("backbone.layers.3.mixer.experts") for x in excl)
    cfg = _cfg(tmp_path / "hf")
    assert cfg["quantization_config"]["quant_method"] == "modelopt"
    assert set(cfg["quantization_config"]["ignore"]) == excl
