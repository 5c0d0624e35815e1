"""Mappings beyond row selections, and the rule registry.

* the registry: ``@rule``, a second rule for one ``model_type`` refused, third-party rules
  through a real entry point (a ``.dist-info`` on ``sys.path``, read by importlib.metadata);
* an :class:`ExpertStack`: a real Megatron-Core MoE model planned with a rule that stores each
  layer's experts in one tensor (gpt-oss layout: gate/up interleaved, transposed), compared
  value for value with the per-expert export;
* a value transform on a quantized weight is refused at planning (real ModelOpt FP8)."""

from __future__ import annotations

import dataclasses
import sys
import textwrap

import pytest
import torch

from nemo_export_hooks.exporter import mappings as mk
from nemo_export_hooks.exporter import rules as registry
from nemo_export_hooks.exporter.execute import describe, run_jobs
from nemo_export_hooks.exporter.parallel import current_layout
from nemo_export_hooks.exporter.plan import build_plan
from nemo_export_hooks.exporter.rules import ArchMismatchError, get_rule, rule
from nemo_export_hooks.testing.cpu import TinySpec, build_gpt, megatron_logits


@pytest.fixture
def scratch_rules():
    """Rules a test registers are removed afterwards."""
    before = dict(registry.all_rules())
    yield
    registry.RULES.clear()
    registry.RULES.update(before)


def test_builtin_rules_found_by_listing_the_package():
    assert {"llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "deepseek_v3", "nemotron_h", "glm4_moe"} <= set(registry.all_rules())


def test_rule_decorator_and_duplicates(scratch_rules):
    @rule
    def mine():
        return dataclasses.replace(get_rule("llama"), model_type="test_arch")

    assert get_rule("test_arch") is mine and mine.architecture == "LlamaForCausalLM"
    with pytest.raises(ValueError, match="'test_arch' is registered twice"):
        rule(dataclasses.replace(get_rule("qwen3"), model_type="test_arch"))
    with pytest.raises(TypeError, match="@rule expects an ArchRule"):
        rule(lambda: 3)
    with pytest.raises(ValueError, match="unknown arch 'nope'; supported: .*glm4_moe"):
        get_rule("nope")


def test_third_party_rule_through_entry_point(scratch_rules, tmp_path, monkeypatch):
    (tmp_path / "plugin_rule_mod.py").write_text(textwrap.dedent("""
        import dataclasses
        from nemo_export_hooks.exporter.rules import get_rule, rule
        PLUGIN = rule(dataclasses.replace(get_rule("qwen3"), model_type="plugin_arch"))
    """))
    dist = tmp_path / "plugin_rule-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-rule\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\nplugin_arch = plugin_rule_mod\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.delitem(sys.modules, "plugin_rule_mod", raising=False)
    assert get_rule("plugin_arch").architecture == "Qwen3ForCausalLM"


def test_interleave_halves():
    t = torch.arange(12).view(2, 6)  # rows [g0 g1 g2 | u0 u1 u2]
    assert mk.interleave_halves(t, 1).tolist() == [[0, 3, 1, 4, 2, 5], [6, 9, 7, 10, 8, 11]]
    with pytest.raises(ValueError, match="odd dimension"):
        mk.interleave_halves(torch.zeros(3, 5), 1)


# gpt-oss's layout: gate_up_proj [E, H, 2F] with gate/up columns interleaved, down_proj [E, F, H]
GATE_UP = mk.ValueTransform(
    "gate/up interleaved, transposed",
    lambda t: mk.interleave_halves(t, 1).transpose(1, 2),
    shape=lambda s: (s[0], s[2], s[1]),
)
DOWN = mk.ValueTransform("transposed", lambda t: t.transpose(1, 2), shape=lambda s: (s[0], s[2], s[1]))


def test_expert_stack_matches_per_expert_export(mcore, scratch_rules):
    spec = TinySpec(num_experts=4, moe_ffn_hidden_size=24)
    m = build_gpt(spec)
    base = get_rule("qwen3_moe")
    stacked = rule(dataclasses.replace(
        base, model_type="test_stacked", expert_names={},
        expert_stack={"fc1": mk.ExpertStack("mlp.experts.gate_up_proj", GATE_UP), "fc2": mk.ExpertStack("mlp.experts.down_proj", DOWN)},
    ))
    layout = current_layout()
    per_expert = dict(run_jobs(build_plan([m], base, layout), torch.float32))
    plan = build_plan([m], stacked, layout)
    got = dict(run_jobs(plan, torch.float32))
    assert [(n, tuple(t.shape)) for n, t in got.items()] == [(n, s) for n, _, s in describe(plan, torch.float32)]
    for L in range(spec.num_layers):
        p = f"model.layers.{L}.mlp.experts."
        gu, down = got[p + "gate_up_proj"], got[p + "down_proj"]
        assert gu.shape == (4, spec.hidden_size, 2 * 24) and down.shape == (4, 24, spec.hidden_size)
        for e in range(4):
            assert torch.equal(gu[e][:, 0::2], per_expert[f"{p}{e}.gate_proj.weight"].T)
            assert torch.equal(gu[e][:, 1::2], per_expert[f"{p}{e}.up_proj.weight"].T)
            assert torch.equal(down[e], per_expert[f"{p}{e}.down_proj.weight"].T)
        assert not any(n.startswith(p + "0.") for n in got)
    # everything else is the same tensors
    rest = {n for n in per_expert if ".mlp.experts." not in n}
    assert rest == {n for n in got if ".mlp.experts." not in n}
    assert all(torch.equal(got[n], per_expert[n]) for n in rest)


def test_value_transform_refused_for_quantized_weight(mcore, scratch_rules):
    mtq = pytest.importorskip("modelopt.torch.quantization")
    import warnings

    spec = TinySpec(num_experts=None)
    m = build_gpt(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(m, mtq.FP8_DEFAULT_CFG, lambda mm: megatron_logits(mm, torch.randint(0, 128, (1, 8))))
    base = get_rule("qwen3")
    scale = mk.ValueTransform("times two", lambda t: 2 * t)
    table = dict(base.layer_table)
    table["self_attention.linear_proj.weight"] = table["self_attention.linear_proj.weight"].then(scale)
    r = rule(dataclasses.replace(base, model_type="test_xform", layer_table=table))
    with pytest.raises(ArchMismatchError, match=r"layer 0 self_attention.linear_proj.weight: the export applies `times two`.*quantized"):
        build_plan([m], r, current_layout())
    # a transform that says it applies to packed data is accepted
    table["self_attention.linear_proj.weight"] = table["self_attention.linear_proj.weight"].then(dataclasses.replace(scale, packed=True))
    r2 = rule(dataclasses.replace(base, model_type="test_xform2", layer_table=table))
    assert build_plan([m], r2, current_layout()).jobs
