"""Layouts new since megatron-core 0.16, each exported correctly or refused by name before
anything is written (issue 12 item 4):

* ``moe_single_grouped_weight`` (TE >= 2.14): one ``linear_fc1.weight`` ``[E, 2F, H]`` /
  ``linear_fc2.weight`` ``[E, H, F]`` per TEGroupedMLP, a TE GroupedTensor that refuses
  indexing; the exporter reads its per-expert views.
* ``moe_mlp_glu_interleave_size``: TEGroupedMLP's fc1 rows in gate/up blocks.
* ``HybridModel`` (``GPTModel`` is deprecated in 0.19): a Qwen3-MoE as ``*E*E``.

Experts are megatron-core's own ``TEGroupedMLP`` (its forward, its de-interleaving) around the
TE GroupedLinear stand-in (``nemo_export_hooks/testing/layouts.py``); every layout is first
shown to compute what the SequentialMLP model computes, then exported in float32 and loaded
by transformers (logits within 1e-4), or compared key by key and byte by byte.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import hf_logits, load_hf, read_export, tokens_for
from nemo_export_hooks import export_to_hf
from nemo_export_hooks.exporter import mappings as mk
from nemo_export_hooks.exporter.experts import ExpertLayoutError
from nemo_export_hooks.exporter.rules import ArchMismatchError
from nemo_export_hooks.testing.cpu import TinySpec, build_gpt, megatron_logits
from nemo_export_hooks.testing.layouts import GroupedTensorStandIn, interleave_glu_rows, to_mcore_te_grouped

ATOL = 1e-4  # float32 end to end


def _config_has(field: str) -> bool:
    from megatron.core.transformer.transformer_config import TransformerConfig

    return field in TransformerConfig.__dataclass_fields__


def _have_hybrid_model() -> bool:
    try:
        from megatron.core.models.hybrid.hybrid_model import HybridModel  # noqa: F401
    except ImportError:
        return False
    return True


needs_interleave = pytest.mark.skipif(
    not _config_has("moe_mlp_glu_interleave_size"), reason="moe_mlp_glu_interleave_size is new in megatron-core 0.18"
)
needs_hybrid = pytest.mark.skipif(not _have_hybrid_model(), reason="HybridModel is new in megatron-core 0.18")


def _same_export(a, b):
    ta, tb = read_export(a), read_export(b)
    assert ta.keys() == tb.keys()
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def _roundtrip(model, out, tokens, ref, arch="qwen3_moe"):
    export_to_hf(model, out, arch=arch, dtype=torch.float32)
    hf, info = load_hf(out)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    diff = (hf_logits(hf, tokens) - ref).abs().max().item()
    assert diff <= ATOL, f"max abs logit diff {diff}"
    return hf


def _nothing_written(tmp_path):
    assert list(tmp_path.iterdir()) == []


# -- moe_single_grouped_weight ---------------------------------------------------------------


def test_single_grouped_weight_state_layout(mcore):
    """The stand-in holds what TE >= 2.14 holds: one `weight` [E, out, in], `weight{i}` None,
    indexing refused, per-expert views sharing the weight's storage."""
    m = build_gpt(TinySpec())
    to_mcore_te_grouped(m, single_grouped_weight=True)
    fc1 = m.decoder.layers[0].mlp.experts.linear_fc1
    fc2 = m.decoder.layers[0].mlp.experts.linear_fc2
    assert type(m.decoder.layers[0].mlp.experts).__name__ == "TEGroupedMLP"
    names = [n for n, _ in m.decoder.layers[0].mlp.experts.named_parameters()]
    assert names == ["linear_fc1.weight", "linear_fc2.weight"]
    assert tuple(fc1.weight.shape) == (4, 2 * 32, 64) and tuple(fc2.weight.shape) == (4, 64, 32)
    assert "weight0" in fc1._parameters and fc1._parameters["weight0"] is None
    assert isinstance(fc1.weight, GroupedTensorStandIn)
    with pytest.raises(TypeError, match="does not support indexing"):
        fc1.weight[0]
    assert fc1.weight.quantized_tensors[2].data_ptr() == fc1.weight.data_ptr() + 2 * 64 * 64 * 4


@pytest.mark.parametrize("single", [False, True], ids=["weight{i}", "single-grouped"])
def test_mcore_te_grouped_mlp_computes_what_sequential_computes(mcore, single):
    spec = TinySpec()
    m = build_gpt(spec)
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(m, tokens)
    to_mcore_te_grouped(m, single_grouped_weight=single)
    assert (megatron_logits(m, tokens) - ref).abs().max().item() <= 1e-5


def test_single_grouped_weight_roundtrip_and_bytes(mcore, tmp_path):
    spec = TinySpec()
    m = build_gpt(spec)
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(m, tokens)
    export_to_hf(m, tmp_path / "seq", arch="qwen3_moe", dtype=torch.bfloat16)
    to_mcore_te_grouped(m, single_grouped_weight=True)
    export_to_hf(m, tmp_path / "grp", arch="qwen3_moe", dtype=torch.bfloat16)
    _same_export(tmp_path / "seq", tmp_path / "grp")
    _roundtrip(m, tmp_path / "hf", tokens, ref)


def test_single_grouped_weight_without_view_api_is_unbound(mcore, tmp_path):
    """A plain [E, out, in] tensor as `weight` (no GroupedTensor API) is read per expert too."""
    spec = TinySpec()
    m = build_gpt(spec)
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(m, tokens)
    to_mcore_te_grouped(m, single_grouped_weight=True)
    for layer in m.decoder.layers:
        for lin in (layer.mlp.experts.linear_fc1, layer.mlp.experts.linear_fc2):
            lin._parameters["weight"] = torch.nn.Parameter(torch.stack(list(lin.weight.quantized_tensors)).clone())
    _roundtrip(m, tmp_path / "hf", tokens, ref)


def test_single_grouped_weight_wrong_count_names_the_module(mcore, tmp_path):
    m = build_gpt(TinySpec())
    to_mcore_te_grouped(m, single_grouped_weight=True)
    w = m.decoder.layers[1].mlp.experts.linear_fc2.weight
    w.quantized_tensors = w.quantized_tensors[:3]
    with pytest.raises(ExpertLayoutError, match=r"layer 1 \(mlp\.experts\.linear_fc2\.weight\).*holds 3 experts, expected 4"):
        export_to_hf(m, tmp_path / "hf", arch="qwen3_moe")
    _nothing_written(tmp_path)


def test_single_grouped_quantized_primary_weight_is_refused(mcore, tmp_path):
    class Float8TensorLike(torch.Tensor):  # what TE's members are with fp8 primary weights
        pass

    m = build_gpt(TinySpec())
    to_mcore_te_grouped(m, single_grouped_weight=True)
    w = m.decoder.layers[0].mlp.experts.linear_fc1.weight
    w.quantized_tensors = [t.as_subclass(Float8TensorLike) for t in w.quantized_tensors]
    with pytest.raises(ExpertLayoutError, match=r"layer 0 \(mlp\.experts\.linear_fc1\.weight\): expert 0 .*Float8TensorLike.*quantized primary weights"):
        export_to_hf(m, tmp_path / "hf", arch="qwen3_moe")
    _nothing_written(tmp_path)


# -- moe_mlp_glu_interleave_size ------------------------------------------------------------


@needs_interleave
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_interleave_rows_equal_megatron_deinterleave(tp):
    """Exact row permutation: the exporter's row selection against megatron-core's own
    ``TEGroupedMLP._remove_glu_interleaving``, applied per expert-TP shard as the forward does."""
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    size, ffn = 8, 64
    gathered = []  # rows of each rank's shard, [rank0 | rank1 | ...] as a plain gather gives
    gate_ref, up_ref = [], []
    for r in range(tp):
        shard = torch.arange(2 * ffn // tp) + r * 1000  # distinct row ids
        gathered.append(shard)
        plain = TEGroupedMLP._remove_glu_interleaving(shard[None, :].float(), size)[0].long()
        g, u = plain.chunk(2)
        gate_ref.append(g)
        up_ref.append(u)
    full = torch.cat(gathered)
    (gname, gidx), (uname, uidx) = mk.glu_interleaved(size, tp)(("gate", "up"), full.numel())
    assert (gname, uname) == ("gate", "up")
    assert torch.equal(full[gidx], torch.cat(gate_ref)) and torch.equal(full[uidx], torch.cat(up_ref))
    # the plain half split would mix the two
    (_, hidx), _ = mk.glu_split(("gate", "up"), full.numel())
    assert not torch.equal(full[hidx], torch.cat(gate_ref))


@needs_interleave
def test_planner_binds_the_expert_tp_size(mcore):
    """Through the planner and ``convert`` under a (simulated) expert-TP=2 layout: each rank's
    fc1 shard is its own gate/up halves interleaved, and the gathered rows come back as the
    HF gate and up projections."""
    from nemo_export_hooks.exporter import parallel
    from nemo_export_hooks.exporter.execute import convert
    from nemo_export_hooks.exporter.plan import attention_shape, build_plan
    from nemo_export_hooks.exporter.rules import get_rule
    from nemo_export_hooks.exporter.source import unwrap_model

    size = 8
    m = build_gpt(TinySpec(moe_ffn_hidden_size=64), moe_mlp_glu_interleave_size=size)
    seq = [e.linear_fc1.weight.detach().clone() for e in m.decoder.layers[0].mlp.experts.local_experts]
    to_mcore_te_grouped(m)
    one = parallel.Group.single()
    layout = parallel.ParallelLayout(one, parallel.Group(None, 0, 2), one, 0, 0, 0, 1, 0, 1)
    plan = build_plan(unwrap_model(m), get_rule("qwen3_moe"), layout)
    jobs = [j for j in plan.jobs if j.source.startswith("layer 0 expert") and "linear_fc1" in j.source]
    assert len(jobs) == 4 and all(not j.glu and j.tp_dim == 0 for j in jobs)
    for e, job in enumerate(jobs):
        gate, up = seq[e].chunk(2)
        shards = [interleave_glu_rows(torch.cat([gate.chunk(2)[r], up.chunk(2)[r]]), size) for r in range(2)]
        out = dict(convert(job, torch.cat(shards), None, torch.float32, attention_shape(m.config)))
        assert torch.equal(out[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"], gate)
        assert torch.equal(out[f"model.layers.0.mlp.experts.{e}.up_proj.weight"], up)


@needs_interleave
def test_interleaved_storage_is_what_megatron_computes(mcore):
    """The harness stores fc1 the way megatron-core reads it: same logits as the sequential
    model; the same weights left in cat(gate, up) order under the flag compute something else."""
    spec = TinySpec(moe_ffn_hidden_size=64)
    tokens = tokens_for(spec.vocab_size)
    m = build_gpt(spec, moe_mlp_glu_interleave_size=8)
    ref = megatron_logits(m, tokens)
    to_mcore_te_grouped(m)
    assert (megatron_logits(m, tokens) - ref).abs().max().item() <= 1e-5
    plain = build_gpt(spec)
    to_mcore_te_grouped(plain)  # not interleaved
    for layer in plain.decoder.layers:
        layer.mlp.experts.config.moe_mlp_glu_interleave_size = 8
    assert (megatron_logits(plain, tokens) - ref).abs().max().item() > 1e-3


@needs_interleave
@pytest.mark.parametrize("size,single", [(8, False), (8, True), (32, True)], ids=["8-weight{i}", "8-single", "32-single"])
def test_interleaved_fc1_roundtrip(mcore, tmp_path, size, single):
    """Megatron-Bridge's GB200 Qwen3-MoE recipe sets 32; experts of 64 rows per half."""
    spec = TinySpec(moe_ffn_hidden_size=64)
    tokens = tokens_for(spec.vocab_size)
    m = build_gpt(spec, moe_mlp_glu_interleave_size=size)
    ref = megatron_logits(m, tokens)
    export_to_hf(m, tmp_path / "seq", arch="qwen3_moe", dtype=torch.bfloat16)
    to_mcore_te_grouped(m, single_grouped_weight=single)
    w = m.decoder.layers[0].mlp.experts.linear_fc1.expert_tensor("weight", 1)
    seq_w = build_gpt(spec).decoder.layers[0].mlp.experts.local_experts[1].linear_fc1.weight
    assert torch.equal(w, interleave_glu_rows(seq_w, size)) and not torch.equal(w, seq_w)
    export_to_hf(m, tmp_path / "grp", arch="qwen3_moe", dtype=torch.bfloat16)
    _same_export(tmp_path / "seq", tmp_path / "grp")
    _roundtrip(m, tmp_path / "hf", tokens, ref)


@needs_interleave
def test_sequential_experts_ignore_the_interleave_flag(mcore, tmp_path):
    """SequentialMLP experts are plain MLPs: megatron-core never interleaves them, so neither
    does the export (logits of the model with the flag set)."""
    spec = TinySpec(moe_ffn_hidden_size=64)
    tokens = tokens_for(spec.vocab_size)
    m = build_gpt(spec, moe_mlp_glu_interleave_size=8)
    _roundtrip(m, tmp_path / "hf", tokens, megatron_logits(m, tokens))


@needs_interleave
def test_interleave_that_does_not_divide_fc1_is_refused(mcore, tmp_path):
    m = build_gpt(TinySpec(moe_ffn_hidden_size=64))
    to_mcore_te_grouped(m)
    m.config.moe_mlp_glu_interleave_size = 48  # 128 fc1 rows are not whole blocks of 2 x 48
    with pytest.raises(ArchMismatchError, match=r"layer 0 expert 0 \(mlp\.experts\.linear_fc1\.weight0\): 128 fc1 rows .*moe_mlp_glu_interleave_size=48"):
        export_to_hf(m, tmp_path / "hf", arch="qwen3_moe")
    _nothing_written(tmp_path)


def test_interleaved_shared_experts_are_refused():
    from types import SimpleNamespace

    from nemo_export_hooks.exporter.plan import _check_shared_expert_interleave
    from nemo_export_hooks.exporter.rules.base import ModelInfo

    cfg = SimpleNamespace(moe_shared_expert_glu_interleave_size=32, gated_linear_unit=True)
    info = ModelInfo(cfg, {}, [0], 1, has_shared_experts=True, has_expert_bias=False)
    with pytest.raises(ArchMismatchError, match=r"mlp\.shared_experts\.linear_fc1 .*moe_shared_expert_glu_interleave_size=32"):
        _check_shared_expert_interleave(info)
    cfg.moe_shared_expert_glu_interleave_size = None
    _check_shared_expert_interleave(info)


# -- HybridModel ----------------------------------------------------------------------------


@needs_hybrid
@pytest.mark.parametrize(
    "arch,spec,pattern,layout",
    [
        ("qwen3_moe", TinySpec(), "*E*E", "sequential"),
        ("qwen3_moe", TinySpec(), "*E*E", "single-grouped"),
        ("qwen3_moe", TinySpec(num_layers=3, moe_layer_freq=[0, 1, 1]), "*-*E*E", "sequential"),
        ("qwen3", TinySpec(num_experts=None, rotary_base=10000.0), "*-*-", "sequential"),
    ],
    ids=["qwen3_moe", "qwen3_moe-single-grouped", "qwen3_moe-first-dense", "qwen3-dense"],
)
def test_hybrid_model_exports_like_gpt_model(mcore, tmp_path, arch, spec, pattern, layout):
    """The same weights as GPTModel and as HybridModel: same Megatron logits, the same export
    (keys, bytes, config.json -- rope_theta recovered from the hybrid's rotary frequencies), and
    transformers' logits equal the HybridModel forward."""
    from nemo_export_hooks.testing.hybrid import build_hybrid, copy_gpt_into_hybrid

    gpt = build_gpt(spec)
    hybrid = build_hybrid(spec, pattern)
    assert type(hybrid).__name__ == "HybridModel"
    copy_gpt_into_hybrid(gpt, hybrid)
    assert type(hybrid.decoder).__name__ in ("HybridStack", "MambaStack") and hasattr(hybrid.decoder, "final_norm")
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(hybrid, tokens)
    assert (megatron_logits(gpt, tokens) - ref).abs().max().item() <= 1e-5
    if layout == "single-grouped":
        to_mcore_te_grouped(gpt, single_grouped_weight=True)
        to_mcore_te_grouped(hybrid, single_grouped_weight=True)
    export_to_hf(gpt, tmp_path / "gpt", arch=arch, dtype=torch.float32)
    hf = _roundtrip(hybrid, tmp_path / "hybrid", tokens, ref, arch=arch)
    _same_export(tmp_path / "gpt", tmp_path / "hybrid")
    assert type(hf).__name__ == {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    cfg = json.loads((tmp_path / "hybrid" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == len(pattern) // 2 and cfg["rope_theta"] == spec.rotary_base
    if pattern.startswith("*-*E"):
        assert cfg["mlp_only_layers"] == [0]


@needs_hybrid
@pytest.mark.parametrize(
    "pattern,where", [("*EE*", r"layer 2 is 'E'"), ("*E*", "layer 3 is missing its MLP/MoE"), ("E*E*", "layer 0 is 'E'")]
)
def test_hybrid_pattern_that_is_no_transformer_is_refused(mcore, tmp_path, pattern, where):
    from nemo_export_hooks.testing.hybrid import build_hybrid

    m = build_hybrid(TinySpec(), pattern)
    with pytest.raises(ArchMismatchError, match=rf"arch 'qwen3_moe' is a transformer.*pattern '{re.escape(pattern)}'.*\({where}\)"):
        export_to_hf(m, tmp_path / "hf", arch="qwen3_moe")
    _nothing_written(tmp_path)
