"""A quantization format is one ``QuantFormat`` in ``exporter/quant.py``: a toy format
registered here, and nowhere else, is recognised by the planner (quantizer reading, the
planning-time shape check, the HF name check), written by the executor and the writer
(packed tensors, their header layout, ``hf_quant_config.json``, ``quantization_config``),
and accepted by config validation (``expect_quant``).  Also: the built-in formats' specs
agree with what their packers return.  Real Megatron-Core model on CPU, no ModelOpt."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from nemo_export_hooks.config import ExportConfig
from nemo_export_hooks.exporter import quant
from nemo_export_hooks.exporter.api import export_to_hf, prepare_export
from nemo_export_hooks.testing.cpu import TinySpec, build_gpt

TOY = "TOY_INT8"
_LIMITS = {"max_in": 1 << 20}  # the toy's planning-time shape limit (a test lowers it)


class ToyQuantizer(torch.nn.Module):
    """A quantizer recognised by structure, as ModelOpt's are: int8 per-tensor."""

    def __init__(self, amax: float):
        super().__init__()
        self.is_enabled = True
        self.num_bits = 8
        self.block_sizes = None
        self.axis = None
        self.register_buffer("_amax", torch.tensor(float(amax)))


def _int8_per_tensor(q) -> bool:
    return q.num_bits == 8 and not q.block_sizes and q.axis is None


def _pack_toy(weight: torch.Tensor, spec: quant.QuantSpec) -> dict:
    step = spec.weight_amax.float() / 127.0
    out = {"weight": torch.round(weight.float() / step).clamp_(-127, 127).to(torch.int8), "weight_step": step.clone()}
    if spec.input_amax is not None:
        out["input_step"] = spec.input_amax.float() / 127.0
    return out


def _check_toy_shape(shape: list, spec: quant.QuantSpec) -> None:
    if len(shape) == 2 and shape[1] > _LIMITS["max_in"]:
        raise ValueError(f"{spec.where}: {TOY} takes input dims up to {_LIMITS['max_in']}, got {shape[1]}")


TOY_FORMAT = quant.QuantFormat(
    name=TOY,
    recipe="a toy int8 per-tensor config",
    weight_only="TOY_INT8 weight-only",
    weight_matches=_int8_per_tensor,
    input_matches=_int8_per_tensor,
    pack=_pack_toy,
    specs=lambda shape, with_input: [("weight", torch.int8, shape), ("weight_step", torch.float32, [])]
    + ([("input_step", torch.float32, [])] if with_input else []),
    suffixes=("weight_step", "input_step"),
    config_group={"weights": {"num_bits": 8, "type": "int"}, "input_activations": {"num_bits": 8, "type": "int"},
                  "targets": ["Linear"]},
    hf_quant_extra={"toy_key": 1},
    check_shape=_check_toy_shape,
)
LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@pytest.fixture
def toy_format():
    quant.register_format(TOY_FORMAT)
    try:
        yield TOY_FORMAT
    finally:
        quant.unregister_format(TOY)


def _toy_model(spec: TinySpec):
    model = build_gpt(spec)
    for name, mod in model.named_modules():
        if name.endswith(LINEARS):
            mod.weight_quantizer = ToyQuantizer(mod.weight.detach().abs().max())
            mod.input_quantizer = ToyQuantizer(3.0)
    return model


def _read(path) -> dict:
    out = {}
    for fn in sorted(path.glob("*.safetensors")):
        with safe_open(str(fn), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_config_validation_reads_the_registry(toy_format):
    assert TOY in quant.format_names() and ".weight_step" in quant.tensor_suffixes()
    assert not [p for p in ExportConfig(arch="qwen3", expect_quant="toy_int8").problems() if "expect_quant" in p]
    quant.unregister_format(TOY)
    assert TOY not in quant.format_names() and ".weight_step" not in quant.tensor_suffixes()
    problems = ExportConfig(arch="qwen3", expect_quant="toy_int8").problems()
    assert problems == ["expect_quant must be 'FP8', 'NVFP4' or null, got 'toy_int8'"]


def test_toy_format_is_planned_packed_and_written(mcore, tmp_path, toy_format):
    spec = TinySpec(num_experts=None)
    model = _toy_model(spec)
    prepared = prepare_export(model, "qwen3", dtype=torch.float32)  # includes the HF name/shape check
    assert prepared.quant_algo == TOY
    layout = {n: (dt, s) for n, dt, s in prepared.layout()}
    o_proj = "model.layers.0.self_attn.o_proj"
    assert layout[f"{o_proj}.weight"] == (torch.int8, (spec.hidden_size, spec.num_attention_heads * spec.kv_channels))
    assert layout[f"{o_proj}.weight_step"] == (torch.float32, ()) and f"{o_proj}.input_step" in layout

    out = tmp_path / "hf"
    res = export_to_hf(model, out, arch="qwen3", dtype=torch.float32)  # the writer checks the layout it was given
    assert res.quant_algo == TOY
    tensors = _read(out)
    quantized = sorted(n[: -len(".weight")] for n, t in tensors.items() if n.endswith(".weight") and t.dtype == torch.int8)
    # q, k, v, o, gate, up, down per layer
    assert len(quantized) == 7 * spec.num_layers
    for base in quantized:
        assert tensors[f"{base}.weight_step"].shape == () and tensors[f"{base}.input_step"].shape == ()
    for i, layer in enumerate(model.decoder.layers):
        for hf, meg in (("self_attn.o_proj", layer.self_attention.linear_proj), ("mlp.down_proj", layer.mlp.linear_fc2)):
            base = f"model.layers.{i}.{hf}"
            step = tensors[f"{base}.weight_step"]
            w = meg.weight.detach().float()
            assert torch.allclose(step, w.abs().max() / 127.0)
            err = (tensors[f"{base}.weight"].float() * step - w).abs().max()
            assert err <= step / 2 + 1e-7, f"{base}: decoded weight off by {err} (step {step})"
            assert torch.allclose(tensors[f"{base}.input_step"], torch.tensor(3.0 / 127.0))

    hf_quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert hf_quant["quant_algo"] == TOY and hf_quant["toy_key"] == 1 and "lm_head" in hf_quant["exclude_modules"]
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_algo"] == TOY and qcfg["config_groups"]["group_0"] == TOY_FORMAT.config_group


def test_toy_format_shape_check_refuses_at_planning(mcore, tmp_path, toy_format, monkeypatch):
    spec = TinySpec(num_experts=None)
    monkeypatch.setitem(_LIMITS, "max_in", spec.hidden_size)  # fc2's input dim (ffn_hidden_size) is larger
    with pytest.raises(ValueError, match=r"layer 0 mlp.linear_fc2.weight: TOY_INT8 takes input dims up to 64, got 128"):
        prepare_export(_toy_model(spec), "qwen3", dtype=torch.float32)


@pytest.mark.parametrize("algo", ["FP8", "NVFP4"])
@pytest.mark.parametrize("with_input", [True, False])
def test_builtin_specs_match_what_pack_returns(algo, with_input):
    fmt = quant.get_format(algo)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    spec = quant.QuantSpec(algo=algo, weight_amax=w.abs().max(), input_amax=torch.tensor(2.0) if with_input else None)
    packed = quant.pack_weight(w, spec, torch.bfloat16)
    specs = quant.tensor_specs(spec, list(w.shape))
    assert [(k, t.dtype, list(t.shape)) for k, t in packed.items()] == [(s, dt, list(sh)) for s, dt, sh in specs]
    assert set(packed) - {"weight"} <= set(fmt.suffixes)
    assert {f".{s}" for s in fmt.suffixes} <= set(quant.tensor_suffixes())
