"""End-to-end quantized export: a real Megatron-Core MoE model quantized and calibrated by
ModelOpt on CPU, exported through `export_to_hf`, decoded by the independent decoder in
`tests/quant_decoder.py`, and compared with ModelOpt's fake-quantized weight of each expert.

The TEGroupedMLP case uses the CPU stand-in carrying the quantizer layout ModelOpt gives a
TE GroupedLinear (`weight_quantizer.{i}` per expert, one shared `input_quantizer`); the real
module is exercised on the GPU device (tests/gpu)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open

from quant_decoder import decode, nvfp4_global_scale
from nemo_export_hooks import export_to_hf
from nemo_export_hooks.testing.cpu import TinySpec, build_gpt, megatron_logits
from nemo_export_hooks.testing.layouts import to_te_grouped

mtq = pytest.importorskip("modelopt.torch.quantization")


def quantize_on_cpu(model, cfg, vocab_size: int = 128, forward=megatron_logits):
    """``mtq.quantize`` with two calibration batches of random tokens (ModelOpt's CPU path);
    also used by the other architectures' quantized-export tests."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab_size, (2, 12), generator=g) for _ in range(2)]

    def loop(m):
        for t in batches:
            forward(m, t)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, cfg, loop)
    return model


def _quantize(cfg, spec=None, seed=1234):
    return quantize_on_cpu(build_gpt(spec or TinySpec(), seed=seed), cfg)


def _read(path):
    out = {}
    for fn in sorted(path.glob("*.safetensors")):
        with safe_open(str(fn), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _group(tensors, base):
    return {k[len(base) + 1 :]: v for k, v in tensors.items() if k.startswith(base + ".")}


def _nvfp4_fake_quant(w, amax):
    """ModelOpt's NVFP4 quantize->dequantize on CPU (its fake-quant kernel needs CUDA), with the
    global scale as ModelOpt's GPU fake quant computes it (``nvfp4_global_scale``)."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    q, scale, scale2 = NVFP4QTensor.quantize(w.float(), 16, weights_scaling_factor_2=nvfp4_global_scale(amax))
    return q.dequantize(dtype=torch.float32, scale=scale, double_scale=scale2, block_sizes={-1: 16})


CFGS = {"FP8": "FP8_DEFAULT_CFG", "NVFP4": "NVFP4_DEFAULT_CFG"}


@pytest.fixture(scope="module", params=sorted(CFGS))
def quantized(mcore, request):
    return request.param, _quantize(getattr(mtq, CFGS[request.param]))


def _fake_quant(lin, algo):
    w = lin.weight.detach().float()
    if algo == "FP8":
        with torch.no_grad():
            return lin.weight_quantizer(w)
    return _nvfp4_fake_quant(w, lin.weight_quantizer.amax)


def test_quantized_experts_decode_to_modelopt_fake_quant(quantized, tmp_path):
    algo, model = quantized
    export_to_hf(model, tmp_path / "hf", arch="qwen3_moe", dtype=torch.bfloat16)
    from nemo_export_hooks.publish import verify_export

    # names and (unpacked) shapes match the HF class built from config.json
    assert verify_export(tmp_path / "hf", load_config=True) == []
    t = _read(tmp_path / "hf")
    ffn = TinySpec().moe_ffn_hidden_size
    weight_dtype = torch.float8_e4m3fn if algo == "FP8" else torch.uint8
    scales2 = []
    for layer_idx, layer in enumerate(model.decoder.layers):
        for e, expert in enumerate(layer.mlp.experts.local_experts):
            base = f"model.layers.{layer_idx}.mlp.experts.{e}"
            gate, up = _group(t, base + ".gate_proj"), _group(t, base + ".up_proj")
            down = _group(t, base + ".down_proj")
            for part in (gate, up, down):
                assert part["weight"].dtype == weight_dtype
                assert part["input_scale"].dtype == torch.float32 and part["input_scale"].dim() == 0
            fc1_ref = _fake_quant(expert.linear_fc1, algo)
            torch.testing.assert_close(decode(gate), fc1_ref[:ffn], rtol=1e-6, atol=0)
            torch.testing.assert_close(decode(up), fc1_ref[ffn:], rtol=1e-6, atol=0)
            torch.testing.assert_close(decode(down), _fake_quant(expert.linear_fc2, algo), rtol=1e-6, atol=0)
            if algo == "NVFP4":
                hidden = TinySpec().hidden_size
                assert gate["weight"].shape == (ffn, hidden // 2)
                assert gate["weight_scale"].dtype == torch.float8_e4m3fn and gate["weight_scale"].shape == (ffn, hidden // 16)
                # gate and up share one fused fc1 quantizer: same per-tensor scales
                assert torch.equal(gate["weight_scale_2"], up["weight_scale_2"])
                amax = expert.linear_fc1.weight_quantizer.amax.float()
                torch.testing.assert_close(gate["weight_scale_2"], nvfp4_global_scale(amax).reshape(gate["weight_scale_2"].shape), rtol=0, atol=0)
                scales2.append(gate["weight_scale_2"].item())
            assert torch.equal(gate["input_scale"], up["input_scale"])
    if algo == "NVFP4":
        assert len(set(scales2)) == len(scales2), "experts with different amax must get their own weight_scale_2"
    # router, embeddings, lm_head and norms stay unquantized
    assert t["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert t["lm_head.weight"].dtype == torch.bfloat16
    assert not any(k.startswith("model.layers.0.mlp.gate.weight_scale") for k in t)

    hq = json.loads((tmp_path / "hf" / "hf_quant_config.json").read_text())
    assert hq["quantization"]["quant_algo"] == algo
    assert {"lm_head", "model.embed_tokens", "*.mlp.gate"} <= set(hq["quantization"]["exclude_modules"])
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "modelopt"
    assert cfg["quantization_config"]["quant_algo"] == algo
    assert set(cfg["quantization_config"]["ignore"]) == set(hq["quantization"]["exclude_modules"])


def test_te_grouped_quantized_equals_sequential_bytes(quantized, tmp_path):
    """The seed bug: per-expert scales of a grouped linear must come from each expert."""
    algo, model = quantized
    export_to_hf(model, tmp_path / "seq", arch="qwen3_moe", dtype=torch.bfloat16)
    grouped = _quantize(getattr(mtq, CFGS[algo]))  # same seed and data: the same model
    to_te_grouped(grouped)
    assert "weight_quantizer.3._amax" in dict(grouped.decoder.layers[0].mlp.experts.linear_fc1.named_buffers())
    export_to_hf(grouped, tmp_path / "grp", arch="qwen3_moe", dtype=torch.bfloat16)
    a, b = _read(tmp_path / "seq"), _read(tmp_path / "grp")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.float8_e4m3fn else a[k],
                           b[k].view(torch.uint8) if b[k].dtype == torch.float8_e4m3fn else b[k]), k


def test_partly_quantized_model_lists_unquantized_linears(mcore, tmp_path):
    """A layer left unquantized must be listed as excluded, or readers would expect scales."""
    cfg = copy_cfg(mtq.FP8_DEFAULT_CFG)
    cfg["quant_cfg"].append({"quantizer_name": "*self_attention*", "enable": False})
    model = _quantize(cfg)
    export_to_hf(model, tmp_path / "hf", arch="qwen3_moe", dtype=torch.bfloat16)
    t = _read(tmp_path / "hf")
    assert t["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert t["model.layers.0.mlp.experts.0.up_proj.weight"].dtype == torch.float8_e4m3fn
    excl = set(json.loads((tmp_path / "hf" / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"])
    assert {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"} <= excl
    assert "model.layers.0.mlp.experts.0.up_proj" not in excl


def copy_cfg(cfg):
    import copy

    return copy.deepcopy(cfg)


def test_uncalibrated_quantizer_fails_before_writing(mcore, tmp_path):
    model = build_gpt(TinySpec())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, None)  # no calibration loop
    with pytest.raises(ValueError, match=r"not calibrated"):
        export_to_hf(model, tmp_path / "hf", arch="qwen3_moe")
    assert list(tmp_path.iterdir()) == []


def test_export_leaves_quantizers_untouched(quantized, tmp_path):
    algo, model = quantized
    before = {n: b.clone() for n, b in model.named_buffers() if "_quantizer" in n}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    export_to_hf(model, tmp_path / "hf", arch="qwen3_moe", dtype=torch.bfloat16)
    after = {n: b for n, b in model.named_buffers() if "_quantizer" in n}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(torch.equal(params[n], p) for n, p in model.named_parameters())


def test_nvfp4_input_dim_not_multiple_of_16_fails_before_writing(mcore, tmp_path):
    """Expert down_proj input dim 24: NVFP4's 16-blocks do not tile it; the planner refuses,
    naming the module and the expert, before a staging directory exists."""
    model = _quantize(mtq.NVFP4_DEFAULT_CFG, TinySpec(moe_ffn_hidden_size=24))
    out = tmp_path / "hf"
    with pytest.raises(ValueError, match=r"layer 0 expert 0 \(mlp.experts.local_experts.0.linear_fc2\): NVFP4 needs the input dim \(24\) to be a multiple of 16"):
        export_to_hf(model, out, arch="qwen3_moe", dtype=torch.bfloat16)
    assert not out.exists() and list(tmp_path.iterdir()) == []
