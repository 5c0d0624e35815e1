"""SequentialMLP experts built with the Transformer Engine spec (``moe_grouped_gemm=False``,
the layout ModelOpt's exporter asks for): each expert projection is a TE ``Linear``, which,
built without bias, keeps ``bias`` as an empty ``(0,)`` tensor instead of None.  The CPU
stand-in (``testing.layouts.TELinearStandIn``) holds exactly that state; the real module is
tested on the device (tests/gpu/test_gpu_te_layouts.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import hf_logits, load_hf, tokens_for
from nemo_export_hooks import export_to_hf
from nemo_export_hooks.exporter.rules import ArchMismatchError
from nemo_export_hooks.testing.cpu import TinySpec, build_gpt, megatron_logits
from nemo_export_hooks.testing.layouts import to_te_sequential

ATOL = 1e-4


def _roundtrip(m, arch, out, spec):
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(m, tokens)
    export_to_hf(m, out, arch=arch, dtype=torch.float32)
    hf, info = load_hf(out)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    diff = (hf_logits(hf, tokens) - ref).abs().max().item()
    assert diff <= ATOL, f"{arch}: max abs logit diff {diff}"


@pytest.mark.parametrize(
    "arch,spec",
    [("qwen3_moe", TinySpec()), ("mixtral", TinySpec(qk_layernorm=False, rotary_base=10000.0))],
    ids=["qwen3_moe", "mixtral"],
)
def test_te_sequential_experts_export_and_match(mcore, tmp_path, arch, spec):
    m = build_gpt(spec)
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(m, tokens)
    to_te_sequential(m)
    lin = m.decoder.layers[0].mlp.experts.local_experts[0].linear_fc2
    # the stand-in holds TE's no-bias state: an empty plain tensor, not a parameter
    assert lin.bias.shape == (0,) and "bias" not in dict(lin.named_parameters()) and lin.use_bias is False
    assert (megatron_logits(m, tokens) - ref).abs().max().item() <= 1e-6
    _roundtrip(m, arch, tmp_path / "hf", spec)


def test_wrongly_shaped_expert_bias_is_still_an_error(mcore, tmp_path):
    m = build_gpt(TinySpec())
    to_te_sequential(m)
    lin = m.decoder.layers[1].mlp.experts.local_experts[2].linear_fc2
    lin.use_bias = True
    lin.bias = torch.nn.Parameter(torch.zeros(5))
    with pytest.raises(ArchMismatchError, match=r"layer 1 expert 2 .*bias has shape \(5,\), expected \(64,\)"):
        export_to_hf(m, tmp_path / "hf", arch="qwen3_moe", dtype=torch.float32)
    assert not (tmp_path / "hf").exists()


def test_empty_bias_of_a_linear_that_has_bias_is_an_error(mcore, tmp_path):
    """Only TE's placeholder (no bias) is skipped: an empty bias on a linear with use_bias is wrong."""
    m = build_gpt(TinySpec())
    to_te_sequential(m)
    m.decoder.layers[0].mlp.experts.local_experts[1].linear_fc1.use_bias = True
    with pytest.raises(ArchMismatchError, match=r"layer 0 expert 1 .*bias has shape \(0,\), expected \(64,\)"):
        export_to_hf(m, tmp_path / "hf", arch="qwen3_moe", dtype=torch.float32)
