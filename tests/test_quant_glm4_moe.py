"""Quantized GLM-4.5 MoE exports (issue 14): the glm4_moe rule's model (first layer dense,
shared experts, sigmoid router with expert bias) quantized and calibrated by ModelOpt on CPU,
exported through ``export_to_hf`` in FP8 and NVFP4.  Every quantized linear (routed experts,
shared experts, the dense layer's MLP, attention) decodes, with the independent decoder of
``tests/quant_decoder.py``, to ModelOpt's fake-quantized weight; the router, its expert bias,
embeddings, norms and lm_head stay unquantized; names and unpacked shapes match the HF class."""

from __future__ import annotations

import json

import pytest
import torch

from quant_decoder import decode
from nemo_export_hooks import export_to_hf
from nemo_export_hooks.publish import verify_export

pytest.importorskip("transformers.models.glm4_moe")
mtq = pytest.importorskip("modelopt.torch.quantization")

from test_glm4_moe import build, glm_spec  # noqa: E402
from test_quant_export import CFGS, _fake_quant, _group, _read, quantize_on_cpu  # noqa: E402


@pytest.fixture(scope="module", params=sorted(CFGS))
def quantized(mcore, request):
    spec = glm_spec()
    model = quantize_on_cpu(build(spec), getattr(mtq, CFGS[request.param]), spec.vocab_size)
    return request.param, spec, model


def _check_fc1(t, base, lin, algo, ffn):
    ref = _fake_quant(lin, algo)
    gate, up = _group(t, base + ".gate_proj"), _group(t, base + ".up_proj")
    torch.testing.assert_close(decode(gate), ref[:ffn], rtol=1e-6, atol=0)
    torch.testing.assert_close(decode(up), ref[ffn:], rtol=1e-6, atol=0)
    return gate, up


def test_glm4_moe_quantized_decodes_to_fake_quant(quantized, tmp_path):
    algo, spec, model = quantized
    out = tmp_path / "hf"
    res = export_to_hf(model, out, arch="glm4_moe", dtype=torch.bfloat16)
    assert res.quant_algo == algo
    assert verify_export(out, load_config=True) == []
    t = _read(out)
    packed = torch.float8_e4m3fn if algo == "FP8" else torch.uint8
    checked = 0
    for li, layer in enumerate(model.decoder.layers):
        mlp = layer.mlp
        if not hasattr(mlp, "experts"):  # the first, dense layer
            base = f"model.layers.{li}.mlp"
            gate, _ = _check_fc1(t, base, mlp.linear_fc1, algo, spec.ffn_hidden_size)
            torch.testing.assert_close(decode(_group(t, base + ".down_proj")), _fake_quant(mlp.linear_fc2, algo), rtol=1e-6, atol=0)
            assert gate["weight"].dtype == packed
            checked += 1
            continue
        for e, expert in enumerate(mlp.experts.local_experts):
            base = f"model.layers.{li}.mlp.experts.{e}"
            gate, up = _check_fc1(t, base, expert.linear_fc1, algo, spec.moe_ffn_hidden_size)
            down = _group(t, base + ".down_proj")
            torch.testing.assert_close(decode(down), _fake_quant(expert.linear_fc2, algo), rtol=1e-6, atol=0)
            for part in (gate, up, down):
                assert part["weight"].dtype == packed
                assert part["input_scale"].dtype == torch.float32 and float(part["input_scale"]) > 0
            checked += 1
        sh = mlp.shared_experts
        base = f"model.layers.{li}.mlp.shared_experts"
        _check_fc1(t, base, sh.linear_fc1, algo, spec.moe_shared_expert_intermediate_size)
        torch.testing.assert_close(decode(_group(t, base + ".down_proj")), _fake_quant(sh.linear_fc2, algo), rtol=1e-6, atol=0)
        # the sigmoid router and its expert bias stay as they are (HF: gate.weight, gate.e_score_correction_bias)
        assert t[f"model.layers.{li}.mlp.gate.weight"].dtype == torch.bfloat16
        assert f"model.layers.{li}.mlp.gate.weight_scale" not in t
        bias = t[f"model.layers.{li}.mlp.gate.e_score_correction_bias"]
        assert bias.dtype == torch.float32 and torch.equal(bias, mlp.router.expert_bias.float())
    assert checked == 1 + 8 * (spec.num_layers - 1)
    # attention is quantized too (ModelOpt's default configs quantize every linear but the router/lm_head)
    q = _group(t, "model.layers.1.self_attn.q_proj")
    assert q["weight"].dtype == packed and "bias" in q and q["bias"].dtype == torch.bfloat16
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert t[k].dtype == torch.bfloat16, k
    hq = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quant_algo"] == algo
    assert {"lm_head", "model.embed_tokens", "*.mlp.gate"} <= set(hq["exclude_modules"])
