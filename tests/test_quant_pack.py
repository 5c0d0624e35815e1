"""Quantized packing (exporter/quant.py) against ModelOpt, an independent decoder, a real
ModelOpt-quantized Megatron-Core MoE model, and bad inputs.  All on CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from nemo_export_hooks.exporter.quant import (
    QuantSpec,
    pack_weight,
    quant_config_files,
    read_quant_spec,
    split_packed_rows,
)

from quant_decoder import decode, decode_fp8, decode_nvfp4, e2m1_value, e4m3fn_to_float, nvfp4_global_scale, unpack_nibbles

mtq = pytest.importorskip("modelopt.torch.quantization")


def _nvfp4_reference(w: torch.Tensor, amax: torch.Tensor):
    """ModelOpt's own NVFP4 quantize -> dequantize with the global scale ModelOpt derives from a
    quantizer amax, amax / (6 * 448), computed as on the GPU (``nvfp4_global_scale``)."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    scale_2 = nvfp4_global_scale(amax)
    qt, scale, scale_2 = NVFP4QTensor.quantize(w.clone(), 16, weights_scaling_factor_2=scale_2)
    deq = qt.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: 16})
    return qt._quantized_data, scale, scale_2, deq


def _tensor_quantizer(**attrs):
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    return TensorQuantizer(QuantizerAttributeConfig(**attrs))


NVFP4_ATTRS = dict(num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)}, axis=None)
FP8_ATTRS = dict(num_bits=(4, 3), axis=None)


def _weights(rows=48, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[1, :16] = 0.0  # an all-zero block (scale falls back to 1)
    w[2, 16:32] *= 1e-7  # a block whose scale underflows e4m3 (clamped to 2**-9)
    w[3, 32:48] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2) * 0.01  # ties
    w[4, 5] = 0.4  # one large outlier
    return w


# --------------------------------------------------------------------------- decoder


def test_decoder_matches_the_bit_definitions():
    all_bytes = torch.arange(256, dtype=torch.uint8)
    torch_vals = all_bytes.view(torch.float8_e4m3fn).float()
    mine = e4m3fn_to_float(all_bytes)
    assert torch.equal(torch.isnan(mine), torch.isnan(torch_vals))
    assert torch.equal(torch.nan_to_num(mine), torch.nan_to_num(torch_vals))
    mags = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert e2m1_value(torch.arange(16)).tolist() == mags + [-m for m in mags]
    assert unpack_nibbles(torch.tensor([[0xF1, 0x02]], dtype=torch.uint8)).tolist() == [[1, 15, 2, 0]]


# --------------------------------------------------------------------------- NVFP4


@pytest.mark.parametrize("amax_factor", [1.0, 0.6, 3.0])  # 0.6: weights beyond amax (saturate)
def test_nvfp4_pack_equals_modelopt(amax_factor):
    w = _weights()
    w_before = w.clone()
    amax = w.abs().max() * amax_factor
    spec = QuantSpec("NVFP4", amax, torch.tensor(2.5), module="m")
    packed = pack_weight(w, spec, torch.bfloat16)
    assert torch.equal(w, w_before)  # input not mutated

    assert set(packed) == {"weight", "weight_scale", "weight_scale_2", "input_scale"}
    assert packed["weight"].dtype == torch.uint8 and packed["weight"].shape == (48, 64)
    assert packed["weight_scale"].dtype == torch.float8_e4m3fn and packed["weight_scale"].shape == (48, 8)
    for k in ("weight_scale_2", "input_scale"):
        assert packed[k].dtype == torch.float32 and packed[k].shape == ()

    data, scale, scale_2, deq = _nvfp4_reference(w, amax)
    # Bit-identical to ModelOpt: packed bytes (incl. nibble order), block scales, global scale.
    assert torch.equal(packed["weight"], data)
    assert torch.equal(packed["weight_scale"].view(torch.uint8), scale.view(torch.uint8))
    assert torch.equal(packed["weight_scale_2"], scale_2.reshape(()))
    assert packed["input_scale"].item() == pytest.approx(2.5 / 2688.0, rel=1e-7)
    # The independent decoder gives ModelOpt's dequantized weight (same fp32 operation order).
    torch.testing.assert_close(decode(packed), deq, rtol=0, atol=0)
    # and the quantization is sane: within half a step of the block scale of the original
    err = (decode(packed) - w.clamp(-amax, amax)).abs()
    assert float(err.max()) <= float(amax) / 6.0 + 1e-6


def test_nvfp4_nibble_order_is_what_vllm_unpacks():
    # vLLM unpacks NVFP4 bytes low nibble first: `break_fp4_bytes` in
    # vllm/model_executor/layers/quantization/utils/nvfp4_emulation_utils.py stacks
    # (low, high) per byte, and ModelOptNvFp4EmbeddingMethod in
    # vllm/model_executor/layers/quantization/modelopt.py documents "low nibble first";
    # sign is bit 3, magnitude bits 0-2 index [0, .5, 1, 1.5, 2, 3, 4, 6].
    w = torch.zeros(1, 16)
    w[0, :4] = torch.tensor([0.5, -6.0, 1.0, -0.0])
    # amax 2688 -> weight_scale_2 == 1.0 and the block scale 6 / (6 * 1) == 1.0 exactly
    packed = pack_weight(w, QuantSpec("NVFP4", torch.tensor(2688.0), None), torch.bfloat16)
    assert packed["weight_scale_2"].item() == 1.0
    assert packed["weight_scale"].float()[0, 0].item() == 1.0
    assert packed["weight"][0, 0].item() == 0xF1  # element 0 (+0.5, code 1) low, element 1 (-6, code 0xF) high
    assert packed["weight"][0, 1].item() == 0x02  # element 2 (1.0, code 2), element 3 (-0.0 -> code 0)
    assert "input_scale" not in packed
    torch.testing.assert_close(decode(packed), w, rtol=0, atol=0)


# --------------------------------------------------------------------------- FP8


@pytest.mark.parametrize("amax_factor", [1.0, 0.5])  # 0.5: weights beyond amax saturate
def test_fp8_pack_equals_modelopt_fake_quant(amax_factor):
    w = _weights(32, 64, seed=3)
    amax = w.abs().max() * amax_factor
    q = _tensor_quantizer(**FP8_ATTRS)
    q.amax = amax
    with torch.no_grad():
        fake = q(w.clone())  # ModelOpt's FP8 fake quant (CPU eager path)
    packed = pack_weight(w, QuantSpec("FP8", amax, torch.tensor(1.5)), torch.bfloat16)
    assert set(packed) == {"weight", "weight_scale", "input_scale"}
    assert packed["weight"].dtype == torch.float8_e4m3fn and packed["weight"].shape == w.shape
    assert packed["weight_scale"].dtype == torch.float32 and packed["weight_scale"].shape == ()
    assert packed["weight_scale"].item() == (amax / 448.0).item()
    assert packed["input_scale"].item() == (torch.tensor(1.5) / 448.0).item()
    # Fake quant computes x * (448/amax) and back with 1/(448/amax); the export divides by
    # amax/448.  Same e4m3 codes, values equal up to float32 rounding.
    torch.testing.assert_close(decode(packed), fake, rtol=1e-6, atol=0)
    assert not torch.isnan(decode(packed)).any()


def test_unquantized_is_a_fresh_cast():
    w = torch.randn(8, 16)
    out = pack_weight(w, None, torch.bfloat16)
    assert set(out) == {"weight"} and out["weight"].dtype == torch.bfloat16
    out32 = pack_weight(w, None, torch.float32)["weight"]
    assert torch.equal(out32, w) and out32.data_ptr() != w.data_ptr()


@pytest.mark.parametrize("algo", ["FP8", "NVFP4"])
def test_split_packed_rows_is_exact(algo):
    w = _weights(64, 64, seed=5)
    spec = QuantSpec(algo, w.abs().max(), torch.tensor(3.0))
    whole = pack_weight(w, spec, torch.bfloat16)
    gate, up = split_packed_rows(whole, [40, 24])
    for part, rows in ((gate, w[:40]), (up, w[40:])):
        alone = pack_weight(rows, spec, torch.bfloat16)
        assert set(part) == set(alone)
        for k in alone:
            assert torch.equal(part[k].view(torch.uint8) if part[k].dtype == torch.float8_e4m3fn else part[k],
                               alone[k].view(torch.uint8) if alone[k].dtype == torch.float8_e4m3fn else alone[k]), k
    # every part owns its memory (safetensors refuses tensors that share storage)
    ptrs = [t.untyped_storage().data_ptr() for d in (gate, up) for t in d.values()]
    assert len(set(ptrs)) == len(ptrs)
    with pytest.raises(ValueError, match="do not add up"):
        split_packed_rows(whole, [40, 20])


# --------------------------------------------------------------------------- real model


def _quantized_gpt(cfg):
    from nemo_export_hooks.testing.cpu import build_gpt, megatron_logits

    model = build_gpt()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 128, (2, 12), generator=g) for _ in range(2)]

    def forward_loop(m):
        for tokens in batches:
            megatron_logits(m, tokens)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, cfg, forward_loop)
    return model


@pytest.fixture(scope="module")
def fp8_gpt(mcore):
    return _quantized_gpt(mtq.FP8_DEFAULT_CFG)


@pytest.fixture(scope="module")
def nvfp4_gpt(mcore):
    return _quantized_gpt(mtq.NVFP4_DEFAULT_CFG)


def _modelopt_export(module):
    """What ModelOpt's unified export writes for this module (its own helpers)."""
    from modelopt.torch.export import quant_utils as qu

    fmt = qu.get_quantization_format(module)
    wsf = qu.get_weight_scaling_factor(module)
    wsf2 = qu.get_weight_scaling_factor_2(module)
    weight = qu.to_quantized_weight(module.weight.detach(), wsf, fmt, wsf2, 16)
    return fmt, weight, wsf, wsf2, qu.get_activation_scaling_factor(module)


def _bits(t):
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.uint8) else t


@pytest.mark.parametrize("which", ["fp8", "nvfp4"])
def test_real_megatron_moe_model(which, request):
    model = request.getfixturevalue(f"{which}_gpt")
    algo = which.upper()
    layer = model.decoder.layers[0]
    experts = layer.mlp.experts.local_experts
    ffn = experts[0].linear_fc1.weight.shape[0] // 2

    specs = []
    for i, expert in enumerate(experts):
        fc1 = expert.linear_fc1
        name = f"decoder.layers.0.mlp.experts.local_experts.{i}.linear_fc1"
        spec = read_quant_spec(fc1, name)
        assert spec is not None and spec.algo == algo and spec.module == name
        assert spec.weight_amax.shape == () and spec.weight_amax.dtype == torch.float32
        assert spec.weight_amax.item() == fc1.weight_quantizer._amax.item()
        # max calibration of a weight quantizer is max |W| of that expert's own weight
        assert spec.weight_amax.item() == fc1.weight.detach().abs().max().item()
        assert spec.input_amax.item() == fc1.input_quantizer._amax.item()
        specs.append(spec)

        packed = pack_weight(fc1.weight.detach(), spec, torch.bfloat16)
        fmt, mo_weight, mo_wsf, mo_wsf2, mo_isf = _modelopt_export(fc1)
        assert fmt == which
        if algo == "NVFP4":
            # ModelOpt's CPU helpers divide exactly; on the GPU (where QAT runs, and what the
            # exporter matches) the global scales are amax * f32(1/2688): at most 1 ulp apart.
            # Redo ModelOpt's export with the GPU scales, with ModelOpt's own quantizer.
            from modelopt.torch.export import quant_utils as qu
            from modelopt.torch.quantization.qtensor import NVFP4QTensor

            gpu_wsf2 = nvfp4_global_scale(fc1.weight_quantizer._amax)
            torch.testing.assert_close(gpu_wsf2.reshape(()), mo_wsf2.float().reshape(()), rtol=2 * 2**-23, atol=0)
            mo_wsf = NVFP4QTensor.get_weights_scaling_factor(fc1.weight.detach(), 16, gpu_wsf2)[0]
            mo_weight = qu.to_quantized_weight(fc1.weight.detach(), mo_wsf, fmt, gpu_wsf2, 16)
            mo_wsf2 = gpu_wsf2
            gpu_isf = nvfp4_global_scale(fc1.input_quantizer._amax)
            torch.testing.assert_close(gpu_isf.reshape(-1), mo_isf.float().reshape(-1), rtol=2 * 2**-23, atol=0)
            mo_isf = gpu_isf
        # byte-identical to ModelOpt's own unified-export tensors for this module
        assert torch.equal(_bits(packed["weight"]), _bits(mo_weight))
        assert torch.equal(_bits(packed["weight_scale"]).reshape(-1), _bits(mo_wsf).reshape(-1))
        assert torch.equal(packed["input_scale"].reshape(-1), mo_isf.reshape(-1))
        if algo == "NVFP4":
            assert torch.equal(packed["weight_scale_2"], mo_wsf2.reshape(()))
            torch.testing.assert_close(decode(packed), _nvfp4_reference(fc1.weight.detach(), spec.weight_amax)[3], rtol=0, atol=0)
        else:
            assert mo_wsf2 is None
            with torch.no_grad():
                fake = fc1.weight_quantizer(fc1.weight.detach())  # the module's own fake quant
            torch.testing.assert_close(decode(packed), fake, rtol=1e-6, atol=0)

        # gated fc1: pack once, split rows into gate / up; the halves decode to the halves
        gate, up = split_packed_rows(packed, [ffn, ffn])
        torch.testing.assert_close(decode(gate), decode(packed)[:ffn], rtol=0, atol=0)
        torch.testing.assert_close(decode(up), decode(packed)[ffn:], rtol=0, atol=0)
        scale_key = "weight_scale_2" if algo == "NVFP4" else "weight_scale"
        assert torch.equal(gate[scale_key], up[scale_key]) and torch.equal(gate["input_scale"], up["input_scale"])

    # experts have their own weight amax -> their own per-tensor weight scale
    amaxes = {round(s.weight_amax.item(), 8) for s in specs}
    assert len(amaxes) == len(specs)
    # ModelOpt syncs input amax across the local experts of a SequentialMLP
    assert len({s.input_amax.item() for s in specs}) == 1

    # fc2 and attention are quantized too; the router and lm_head are not
    assert read_quant_spec(experts[2].linear_fc2, "fc2").algo == algo
    assert read_quant_spec(layer.self_attention.linear_qkv, "qkv").algo == algo
    assert read_quant_spec(layer.mlp.router, "decoder.layers.0.mlp.router") is None
    assert read_quant_spec(model.output_layer, "output_layer") is None


# --------------------------------------------------------------------------- bad input


def _linear_quantized(cfg, calibrate=True):
    m = torch.nn.Sequential(torch.nn.Linear(64, 64))
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(m, cfg, (lambda mm: mm(x)) if calibrate else None)
    return m[0]


@pytest.mark.parametrize(
    "cfg_name, label",
    [
        ("INT8_DEFAULT_CFG", "INT8 per-channel"),
        ("INT8_WEIGHT_ONLY_CFG", "INT8 per-channel"),
        ("FP8_PER_CHANNEL_PER_TOKEN_CFG", "FP8 per-channel"),
        ("FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", "FP8 block-scaled"),
        ("MXFP8_DEFAULT_CFG", "MXFP8"),
        ("MXFP4_DEFAULT_CFG", "MXFP4"),
        ("W4A16_NVFP4_CFG", "W4A16_NVFP4"),
        ("W4A8_NVFP4_FP8_CFG", "32-element blocks"),
        ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "INT4"),
        ("W4A8_AWQ_BETA_CFG", "sequential"),
    ],
)
def test_unsupported_modelopt_formats_name_module_and_format(cfg_name, label):
    lin = _linear_quantized(getattr(mtq, cfg_name))
    with pytest.raises(ValueError) as err:
        read_quant_spec(lin, "decoder.layers.3.mlp.linear_fc1")
    msg = str(err.value)
    assert "decoder.layers.3.mlp.linear_fc1" in msg and "unsupported quantization format" in msg
    assert label in msg, msg


def test_uncalibrated_quantizers():
    lin = _linear_quantized(mtq.FP8_DEFAULT_CFG, calibrate=False)  # weights calibrated, inputs not
    with pytest.raises(ValueError, match=r"model\.fc1: input_quantizer is not calibrated"):
        read_quant_spec(lin, "model.fc1")
    lin = _linear_quantized(mtq.NVFP4_DEFAULT_CFG)
    lin.weight_quantizer.reset_amax()
    with pytest.raises(ValueError, match=r"model\.fc1: weight_quantizer is not calibrated"):
        read_quant_spec(lin, "model.fc1")


@pytest.mark.parametrize("bad, match", [(0.0, "amax is 0.0"), (float("inf"), r"amax is not finite \(inf\)"), (float("nan"), r"amax is not finite \(nan\)")])
@pytest.mark.parametrize("role", ["weight_quantizer", "input_quantizer"])
def test_zero_or_nonfinite_amax(bad, match, role):
    lin = _linear_quantized(mtq.NVFP4_DEFAULT_CFG)
    getattr(lin, role).amax = torch.tensor(bad)
    with pytest.raises(ValueError, match=f"layers.1.proj: {role} {match}"):
        read_quant_spec(lin, "layers.1.proj")


def test_non_scalar_amax():
    lin = _linear_quantized(mtq.FP8_DEFAULT_CFG)
    lin.weight_quantizer.reset_amax()
    lin.weight_quantizer.amax = torch.ones(64, 1)
    with pytest.raises(ValueError, match=r"proj: weight_quantizer has a non-scalar amax of shape \(64, 1\)"):
        read_quant_spec(lin, "proj")


def test_disabled_or_missing_quantizer_is_unquantized():
    lin = _linear_quantized(mtq.FP8_DEFAULT_CFG)
    lin.weight_quantizer.disable()
    assert read_quant_spec(lin, "x") is None
    assert read_quant_spec(torch.nn.Linear(4, 4), "plain") is None


class _GroupedLinear(torch.nn.Module):
    """Quantizer layout ModelOpt gives a TE GroupedLinear: one grouped weight quantizer
    (an nn.ModuleList, state keys ``weight_quantizer.{i}._amax``), one shared input quantizer."""

    def __init__(self, amaxes, input_amax=3.0):
        super().__init__()
        from modelopt.torch.quantization.nn import GroupedQuantizer

        self.weight_quantizer = GroupedQuantizer(*(_tensor_quantizer(**NVFP4_ATTRS) for _ in amaxes))
        for q, a in zip(self.weight_quantizer, amaxes):
            if a is not None:
                q.amax = torch.tensor(a)
        self.input_quantizer = _tensor_quantizer(**NVFP4_ATTRS)
        self.input_quantizer.amax = torch.tensor(input_amax)


def test_grouped_weight_quantizer_per_expert():
    mod = _GroupedLinear([0.1, 0.2, 0.3, None])
    assert "weight_quantizer.2._amax" in dict(mod.named_buffers())
    # the container delegates .amax to child 0: reading it would silently give expert 0's
    assert mod.weight_quantizer.amax.item() == pytest.approx(0.1)
    for i, a in enumerate([0.1, 0.2, 0.3]):
        spec = read_quant_spec(mod, "experts.linear_fc1", expert_index=i)
        assert spec.algo == "NVFP4" and spec.weight_amax.item() == pytest.approx(a)
        assert spec.input_amax.item() == pytest.approx(3.0)  # shared input quantizer
    with pytest.raises(ValueError, match=r"experts\.linear_fc1 \(expert 3\): weight_quantizer is not calibrated"):
        read_quant_spec(mod, "experts.linear_fc1", expert_index=3)
    with pytest.raises(ValueError, match="pass expert_index"):
        read_quant_spec(mod, "experts.linear_fc1")
    with pytest.raises(ValueError, match="out of range"):
        read_quant_spec(mod, "experts.linear_fc1", expert_index=4)


def test_pack_rejects_bad_weights():
    spec = QuantSpec("NVFP4", torch.tensor(1.0), torch.tensor(1.0), module="m.w")
    with pytest.raises(ValueError, match="multiple of 16"):
        pack_weight(torch.randn(4, 24), spec, torch.bfloat16)
    bad = torch.randn(4, 32)
    bad[1, 3] = float("nan")
    for algo in ("NVFP4", "FP8"):
        with pytest.raises(ValueError, match="m.w: weight has non-finite values"):
            pack_weight(bad, QuantSpec(algo, torch.tensor(1.0), None, module="m.w"), torch.bfloat16)
    with pytest.raises(ValueError, match="finite and positive"):
        pack_weight(torch.randn(4, 32), QuantSpec("FP8", torch.tensor(0.0), None, module="m.w"), torch.bfloat16)


# --------------------------------------------------------------------------- config files

EXCLUDE = ["model.embed_tokens", "lm_head", "*.mlp.gate", "lm_head"]


def test_quant_config_files_fp8():
    hf, qc = quant_config_files("FP8", EXCLUDE, "1.2.3")
    assert hf == {
        "producer": {"name": "nemo-export-hooks", "version": "1.2.3"},
        "quantization": {
            "quant_algo": "FP8",
            "kv_cache_quant_algo": None,
            "exclude_modules": ["*.mlp.gate", "lm_head", "model.embed_tokens"],
        },
    }
    assert qc == {
        "config_groups": {
            "group_0": {
                "input_activations": {"dynamic": False, "num_bits": 8, "type": "float"},
                "weights": {"dynamic": False, "num_bits": 8, "type": "float"},
                "targets": ["Linear"],
            }
        },
        "ignore": ["*.mlp.gate", "lm_head", "model.embed_tokens"],
        "quant_algo": "FP8",
        "producer": {"name": "nemo-export-hooks", "version": "1.2.3"},
        "quant_method": "modelopt",
    }


def test_quant_config_files_nvfp4_match_modelopt_conversion():
    hf, qc = quant_config_files("NVFP4", EXCLUDE, "1.2.3")
    q = hf["quantization"]
    assert q == {
        "quant_algo": "NVFP4",
        "kv_cache_quant_algo": None,
        "group_size": 16,
        "exclude_modules": ["*.mlp.gate", "lm_head", "model.embed_tokens"],
    }
    # vLLM's ModelOptNvFp4Config requires these keys in hf_quant_config.json
    assert {"group_size", "kv_cache_quant_algo", "exclude_modules"} <= set(q)
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "NVFP4"
    assert qc["config_groups"]["group_0"]["weights"] == {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    # ModelOpt's own hf_quant_config -> config.json conversion gives exactly our dict
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    for algo in ("FP8", "NVFP4"):
        hf, qc = quant_config_files(algo, EXCLUDE, "9")
        assert convert_hf_quant_config_format(hf) == qc


def test_quant_config_files_rejects_mixed_and_unknown():
    with pytest.raises(ValueError, match="mixed"):
        quant_config_files(["FP8", "NVFP4"], [], "1")
    with pytest.raises(ValueError, match="mixed-precision"):
        quant_config_files("MIXED_PRECISION", [], "1")
    with pytest.raises(ValueError, match="unsupported quantization algo"):
        quant_config_files("INT8", [], "1")
