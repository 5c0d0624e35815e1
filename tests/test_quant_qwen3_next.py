"""Quantized Qwen3-Next exports (issue 14): the qwen3_next rule's hybrid model (Gated DeltaNet and
gated attention layers, MoE with a gated shared expert) quantized and calibrated by ModelOpt on
CPU, exported in FP8 and NVFP4.

The reference needs no second copy of the rule's row mappings: every quantized Megatron weight is
replaced by ModelOpt's fake-quantized value in an unquantized twin of the model (same seed, same
names), the twin is exported in float32, and every packed tensor of the quantized export must
decode (``tests/quant_decoder.py``) to the twin's tensor of the same HF name -- for DeltaNet's
``in_proj_qkvz`` / ``in_proj_ba`` that is the per-key-head regrouping of the fused ``in_proj``'s
rows, which packed data allows since NVFP4 blocks and FP8 scales never span rows.  Needs
megatron-core >= 0.19 (``make test-mcore19``)."""

from __future__ import annotations

import json

import pytest
import torch

from quant_decoder import decode
from nemo_export_hooks import export_to_hf
from nemo_export_hooks.publish import verify_export

mtq = pytest.importorskip("modelopt.torch.quantization")

from test_qwen3_next import build, megatron_logits, needs_gdn, next_spec  # noqa: E402
from test_quant_export import CFGS, _fake_quant, _group, _read, quantize_on_cpu  # noqa: E402

pytestmark = needs_gdn


@pytest.fixture(scope="module", params=sorted(CFGS))
def quantized(mcore, request):
    spec = next_spec()
    model = quantize_on_cpu(build(spec), getattr(mtq, CFGS[request.param]), spec.vocab_size, forward=megatron_logits)
    return request.param, spec, model


def _fake_quantized_twin(spec, model, algo):
    """An unquantized model of the same seed whose quantized weights hold ModelOpt's fake quant."""
    twin = build(spec)
    params = dict(twin.named_parameters())
    replaced = []
    for name, mod in model.named_modules():
        q = getattr(mod, "weight_quantizer", None)
        if q is None or not getattr(q, "is_enabled", False) or getattr(mod, "weight", None) is None:
            continue
        with torch.no_grad():
            params[f"{name}.weight"].copy_(_fake_quant(mod, algo))
        replaced.append(name)
    return twin, replaced


def test_qwen3_next_quantized_decodes_to_fake_quant(quantized, tmp_path):
    algo, spec, model = quantized
    out = tmp_path / "q"
    res = export_to_hf(model, out, arch="qwen3_next", dtype=torch.bfloat16)
    assert res.quant_algo == algo
    assert verify_export(out, load_config=True) == []
    twin, replaced = _fake_quantized_twin(spec, model, algo)
    assert any(".self_attention.in_proj" in n for n in replaced), replaced  # DeltaNet's fused in_proj is quantized
    export_to_hf(twin, tmp_path / "ref", arch="qwen3_next", dtype=torch.float32)
    q, ref = _read(out), _read(tmp_path / "ref")
    packed = torch.float8_e4m3fn if algo == "FP8" else torch.uint8
    bases = sorted(k[: -len(".weight")] for k, v in q.items() if k.endswith(".weight") and v.dtype == packed)
    kinds = {b.split(".")[-1] for b in bases}
    assert {"in_proj_qkvz", "in_proj_ba", "out_proj", "q_proj", "o_proj", "gate_proj", "down_proj"} <= kinds, kinds
    for b in bases:
        parts = _group(q, b)
        assert parts["input_scale"].dtype == torch.float32 and float(parts["input_scale"]) > 0, b
        torch.testing.assert_close(decode(parts), ref[b + ".weight"], rtol=1e-6, atol=0, msg=b)
    # what stays unquantized: embeddings, lm_head, norms, the router and the shared-expert gate,
    # DeltaNet's conv1d, A_log and dt_bias
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.linear_attn.conv1d.weight",
              "model.layers.0.linear_attn.A_log", "model.layers.0.linear_attn.dt_bias", "model.layers.0.mlp.gate.weight",
              "model.layers.0.mlp.shared_expert_gate.weight", "model.layers.0.linear_attn.norm.weight"):
        assert k in q and q[k].dtype in (torch.bfloat16, torch.float32), (k, q.get(k, torch.empty(0)).dtype)
    hq = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quant_algo"] == algo
