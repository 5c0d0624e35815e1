"""Where the MoE layers sit is read from the modules, not from ``moe_layer_freq`` alone: a
single MoE layer spec (``get_gpt_layer_local_spec(num_experts=...)``) puts experts in every
layer whatever ``moe_layer_freq`` says."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import hf_logits, load_hf, tokens_for
from nemo_export_hooks import export_to_hf
from nemo_export_hooks.exporter.plan import moe_placement
from nemo_export_hooks.exporter.rules import ArchMismatchError
from nemo_export_hooks.exporter.source import LayerRef
from nemo_export_hooks.testing.cpu import TinySpec, build_gpt, megatron_logits


def _single_spec_model():
    # TinySpec(moe_layer_freq=1) picks the single MoE layer spec; the config says [0, 1, 1]
    spec = TinySpec(num_layers=3)
    m = build_gpt(spec, moe_layer_freq=[0, 1, 1])
    assert m.config.moe_layer_freq == [0, 1, 1]
    assert all(hasattr(layer.mlp, "router") for layer in m.decoder.layers)
    return spec, m


def test_single_moe_spec_with_freq_exports_what_the_modules_hold(mcore, tmp_path):
    spec, m = _single_spec_model()
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(m, tokens)
    export_to_hf(m, tmp_path / "hf", arch="qwen3_moe", dtype=torch.float32)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["mlp_only_layers"] == []
    hf, info = load_hf(tmp_path / "hf")
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert (hf_logits(hf, tokens) - ref).abs().max().item() <= 1e-4


def test_block_spec_placement_agrees_with_freq(mcore):
    m = build_gpt(TinySpec(num_layers=3, moe_layer_freq=[0, 1, 1]))
    refs = [LayerRef(i, layer) for i, layer in enumerate(m.decoder.layers)]
    assert moe_placement(m.config, refs) == [1, 2]


def test_a_stage_whose_layers_disagree_with_freq_names_it_in_one_line(mcore):
    """A pipeline stage sees only its own layers: it cannot read the others' placement, so a
    disagreement on its layers is refused, in one line naming the layers."""
    _, m = _single_spec_model()
    stage = [LayerRef(0, m.decoder.layers[0])]  # as if this rank held layer 0 only
    with pytest.raises(ArchMismatchError) as e:
        moe_placement(m.config, stage)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300
    assert "moe_layer_freq=[0, 1, 1] at layers [0]" in msg and "MoE layers [0]" in msg
