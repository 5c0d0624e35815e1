"""ModelOpt QAT on a real TEGroupedMLP model: ``mtq.quantize`` (NVFP4 and FP8 default configs),
export, decode every exported expert weight and compare with ModelOpt's own fake-quantized
weight of that expert (``linear_fc1.weight_quantizer[i](linear_fc1.weight{i})``); the per-expert
global scales must follow each expert's ``weight_quantizer.{i}`` amax (not expert 0's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_skip import require_gpu

pytestmark = pytest.mark.gpu

torch = require_gpu("transformer_engine.pytorch", "megatron.core", "modelopt.torch.quantization")

import gpu_common as G  # noqa: E402
import gpu_quant_decode as D  # noqa: E402

QUANT_PY = Path(__file__).resolve().parents[2] / "nemo_export_hooks" / "exporter" / "quant.py"
FP4_MAX, FP8_MAX = 6.0, 448.0
TIES = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # midpoints of the e2m1 grid
EPS32 = torch.finfo(torch.float32).eps


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cuda()
    if t.dtype in (torch.uint8, torch.float8_e4m3fn):
        return t.view(torch.uint8)
    return t.float()


def _modelopt_export(fmt: str, w: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """ModelOpt's own real-quant export of one weight (what its unified HF export writes), run on
    ``w``'s device with the given global scale (NVFP4 ``weight_scale_2`` / FP8 ``weight_scale``)."""
    if fmt == "nvfp4":
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

        qt, s, s2 = NVFP4QTensor.quantize(w, 16, weights_scaling_factor_2=scale)
        return {"weight": qt._quantized_data, "weight_scale": s, "weight_scale_2": s2.float().reshape(())}
    return {"weight": (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), "weight_scale": scale}


def _global_scales(fmt: str, amax_gpu: torch.Tensor) -> dict[str, torch.Tensor]:
    """The global scale as computed (a) on the GPU, where ModelOpt's fake quant and its export of a
    GPU-resident model compute it (PyTorch CUDA divides by a Python scalar as a multiplication
    by its float32 reciprocal), (b) on the CPU with IEEE division (the exporter's FP8 arithmetic),
    (c) on the CPU as amax * float32(1/d) (the exporter's NVFP4 arithmetic since the fix)."""
    d = FP4_MAX * FP8_MAX if fmt == "nvfp4" else FP8_MAX
    amax_cpu = amax_gpu.detach().float().reshape(()).cpu()
    return {
        "gpu": (amax_gpu.detach().float().reshape(()) / d),
        "cpu": amax_cpu / d,
        "fix": amax_cpu * torch.tensor(1.0 / d, dtype=torch.float32),
    }


def _slice(parts: dict[str, torch.Tensor], r0, r1) -> dict[str, torch.Tensor]:
    return {k: (v[r0:r1] if v.dim() else v) for k, v in parts.items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a if k in b and not torch.equal(_bits(a[k]), _bits(b[k]))]


def _scale_tie_blocks(w: torch.Tensor, s2: torch.Tensor, block: int = 16) -> torch.Tensor:
    """Per element: its 16-block's scale block_amax / (6 * s2) lies on an e4m3 rounding boundary,
    so a 1-ulp change of s2 can move the block scale by one e4m3 step."""
    ba = w.float().abs().reshape(w.shape[0], -1, block).amax(-1)
    r = ba / (FP4_MAX * s2.float().to(w.device))
    up = (r * (1 + 8 * EPS32)).clamp(max=FP8_MAX).to(torch.float8_e4m3fn).float()
    dn = (r * (1 - 8 * EPS32)).clamp(max=FP8_MAX).to(torch.float8_e4m3fn).float()
    return (up != dn).repeat_interleave(block, dim=1)


def _value_ties(w: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    sc = (parts["weight_scale"].float() * parts["weight_scale_2"].float()).repeat_interleave(16, dim=1)
    a = w.float().abs() / sc
    t = TIES.to(a.device)
    return ((a.unsqueeze(-1) - t).abs() <= 4 * EPS32 * t).any(-1)


@pytest.fixture(scope="module", autouse=True)
def _mcore():
    G.init_mcore_gpu()
    yield


def _need_quant():
    if not QUANT_PY.exists():
        pytest.skip("nemo_export_hooks/exporter/quant.py does not exist yet (read_quant_spec / pack_weight): "
                    "nothing exports quantized weights")
    from nemo_export_hooks.exporter import quant

    missing = [n for n in ("read_quant_spec", "pack_weight") if not hasattr(quant, n)]
    if missing:
        pytest.skip(f"nemo_export_hooks/exporter/quant.py lacks {missing}")


def _ulp_close(dec: torch.Tensor, fq: torch.Tensor, amax: float) -> torch.Tensor:
    """Elementwise: the decoded value equals ModelOpt's fake-quantized one within one ulp of
    the model dtype (ModelOpt returns the fake-quantized weight in the weight's dtype)."""
    eps = torch.finfo(fq.dtype).eps
    return (dec - fq.float()).abs() <= eps * fq.float().abs() + 1e-7 * amax


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_quantized_te_grouped_experts(fmt, tmp_path, request):
    _need_quant()
    import modelopt
    import modelopt.torch.quantization as mtq

    cfg = {"nvfp4": mtq.NVFP4_DEFAULT_CFG, "fp8": mtq.FP8_DEFAULT_CFG}[fmt]
    spec = G.tiny_spec("qwen3_moe")
    model = G.build_te_gpt(spec, torch.bfloat16)
    assert G.experts_type(model) == "TEGroupedMLP"
    calib = [G.tokens(spec.vocab_size, batch=4, seq=64, seed=s) for s in range(4)]

    def loop(m):
        for ids in calib:
            G.megatron_logits(m, ids)

    mtq.quantize(model, cfg, loop)
    n_quantizers = sum(1 for n, _ in model.named_modules() if n.endswith("_quantizer"))
    fc1 = model.decoder.layers[0].mlp.experts.linear_fc1
    wq = fc1.weight_quantizer
    assert len(list(wq)) == spec.num_experts, f"expected a grouped weight_quantizer with one child per expert: {type(wq)}"

    out = tmp_path / "hf"
    res, note = G.export(model, out, "qwen3_moe", torch.bfloat16)
    tensors = G.read_exported(out)
    ext = D.external_decoder()
    decoder_used = "tests/gpu/gpu_quant_decode.py"
    ffn = spec.moe_ffn_hidden_size
    st = dict(bad=0, elems=0, value_ties=0, scale_tie_elems=0, unexplained=0, max_rel=0.0, scale2=0.0,
              vs_cpu_algo=0, vs_gpu_export=0, fix_vs_gpu_export=0, fix_bad=0, fix_unexplained=0,
              n_scales=0, gpu_is_reciprocal_mul=0, gpu_equals_ieee_div=0)
    formats, scale_rows, failures, examples = set(), [], [], []
    for li, layer in enumerate(model.decoder.layers):
        ex = layer.mlp.experts
        for e in range(spec.num_experts):
            for lin, hf_parts in ((ex.linear_fc1, (("gate_proj", 0, ffn), ("up_proj", ffn, 2 * ffn))),
                                  (ex.linear_fc2, (("down_proj", 0, None),))):
                q = lin.weight_quantizer[e]
                amax = float(q.amax.float().max())
                w = getattr(lin, f"weight{e}").detach()
                gs = _global_scales(fmt, q.amax)
                st["n_scales"] += 1
                st["gpu_is_reciprocal_mul"] += int(torch.equal(gs["gpu"].cpu(), gs["fix"]))
                st["gpu_equals_ieee_div"] += int(torch.equal(gs["gpu"].cpu(), gs["cpu"]))
                with torch.no_grad():
                    fq = q(w).detach()  # ModelOpt's fake-quantized weight: what QAT trained with
                    mo = {k: _modelopt_export(fmt, w if k == "gpu" else w.cpu(), v) for k, v in gs.items()}
                for hf_name, r0, r1 in hf_parts:
                    base = f"model.layers.{li}.mlp.experts.{e}.{hf_name}"
                    parts = {k[len(base) + 1:]: v.cuda() for k, v in tensors.items() if k.startswith(base + ".")}
                    if "weight" not in parts:
                        failures.append(f"{base}.weight missing")
                        continue
                    dec = None
                    if ext is not None:
                        try:
                            r = ext(parts)
                            dec = (r[1] if isinstance(r, tuple) else r).float().cuda()
                            decoder_used = "tests/quant_decoder.py"
                        except Exception as err:  # noqa: BLE001 - fall back, say so
                            decoder_used = f"tests/gpu/gpu_quant_decode.py (quant_decoder.py failed: {err!r:.80})"
                    f, mine = D.decode(parts)
                    formats.add(f)
                    dec = mine if dec is None else dec
                    ref = fq[r0:r1]
                    if dec.shape != ref.shape:
                        failures.append(f"{base}: decoded shape {tuple(dec.shape)} != {tuple(ref.shape)}")
                        continue
                    if f not in ("nvfp4", "fp8"):
                        failures.append(f"{base}: exported unquantized ({parts['weight'].dtype})")
                        continue
                    # 1. bit-exact with ModelOpt's export: NVFP4 as ModelOpt computes it on the GPU
                    # (global scale amax * f32(1/2688), what QAT trained with; the exporter does the
                    # same on the CPU), FP8 with IEEE division (matches ModelOpt's FP8 fake quant).
                    mo_rows = {k: _slice(v, r0, r1) for k, v in mo.items()}
                    want_key = "gpu" if fmt == "nvfp4" else "cpu"
                    diff = _same(parts, mo_rows[want_key])
                    if diff:
                        st["vs_cpu_algo"] += 1
                        failures.append(f"{base}.{diff} differ from ModelOpt's export ({want_key} arithmetic)")
                    # 1b. (reported) vs ModelOpt's export of the GPU-resident model, and the proposed fix
                    st["vs_gpu_export"] += int(bool(_same(parts, mo_rows["gpu"])))
                    st["fix_vs_gpu_export"] += int(bool(_same(mo_rows["fix"], mo_rows["gpu"])))
                    # 2. decoded == ModelOpt's fake-quantized weight, except at exact rounding ties
                    wr = w[r0:r1]
                    ok = _ulp_close(dec, ref, amax)
                    bad = ~ok
                    st["bad"] += int(bad.sum())
                    st["elems"] += ok.numel()
                    st["max_rel"] = max(st["max_rel"], ((dec - ref.float()).abs().max() / max(amax, 1e-12)).item())
                    _, dec_fix = D.decode({k: v.cuda() for k, v in mo_rows["fix"].items()})
                    bad_fix = ~_ulp_close(dec_fix, ref, amax)
                    st["fix_bad"] += int(bad_fix.sum())
                    if f == "nvfp4":
                        # ModelOpt's Triton fake-quant kernel divides with approximate fp32 division, so
                        # a value exactly on an e2m1 midpoint may round the other way; and a block scale
                        # exactly on an e4m3 midpoint moves with a 1-ulp change of weight_scale_2.
                        vt = _value_ties(wr, parts)
                        stt = _scale_tie_blocks(wr, parts["weight_scale_2"])
                        st["value_ties"] += int(vt.sum())
                        st["scale_tie_elems"] += int(stt.sum())
                        unexplained = bad & ~vt & ~stt
                        st["fix_unexplained"] += int((bad_fix & ~_value_ties(wr, _slice({k: v.cuda() for k, v in mo["fix"].items()}, r0, r1))).sum())
                        want, got = amax / (FP4_MAX * FP8_MAX), float(parts["weight_scale_2"].float())
                    else:
                        unexplained = bad
                        st["fix_unexplained"] += int(bad_fix.sum())
                        want, got = amax / FP8_MAX, float(parts["weight_scale"].float().max())
                    st["unexplained"] += int(unexplained.sum())
                    for i, j in unexplained.nonzero()[:2].tolist():
                        sc = (parts["weight_scale_2"].float() * parts["weight_scale"].float()[i, j // 16] if f == "nvfp4"
                              else parts["weight_scale"].float())
                        examples.append(dict(where=f"{base}[{i},{j}]", w=float(wr[i, j]), w_over_scale=float(wr[i, j].float() / sc),
                                             fq_over_scale=float(ref[i, j].float() / sc), dec_over_scale=float(dec[i, j] / sc)))
                    st["scale2"] = max(st["scale2"], abs(got - want) / want)
                    if li == 0 and hf_name != "up_proj":
                        scale_rows.append(f"L0 E{e} {hf_name}: amax {amax:.5g} scale {got:.6g} want {want:.6g} "
                                          f"gpu {float(gs['gpu']):.9g} cpu {float(gs['cpu']):.9g}")
    amaxes = [float(wq[e].amax.float().max()) for e in range(spec.num_experts)]
    G.artifact("quant_scales.txt", f"== {fmt}: {n_quantizers} quantizers\n" + "\n".join(scale_rows))
    G.record(request.node.nodeid, fmt=fmt, modelopt=modelopt.__version__, quantizers=n_quantizers,
             exported_formats=sorted(formats), quant_algo=res.quant_algo, elems=st["elems"],
             frac_elems_off=st["bad"] / max(st["elems"], 1), unexplained=st["unexplained"],
             value_tie_elems=st["value_ties"], scale_tie_elems=st["scale_tie_elems"],
             max_abs_diff_over_amax=st["max_rel"], max_scale_rel_err=st["scale2"],
             tensors_differing_from_modelopt_reference=st["vs_cpu_algo"],
             tensors_differing_from_modelopt_gpu_export=st["vs_gpu_export"],
             fix_tensors_differing_from_modelopt_gpu_export=st["fix_vs_gpu_export"],
             fix_frac_elems_off=st["fix_bad"] / max(st["elems"], 1), fix_unexplained=st["fix_unexplained"],
             global_scales=st["n_scales"], gpu_scale_is_reciprocal_mul=st["gpu_is_reciprocal_mul"],
             gpu_scale_equals_ieee_div=st["gpu_equals_ieee_div"], expert_amax_layer0_fc1=amaxes,
             decoder=decoder_used, failures=failures[:6], examples=examples[:4], note=note, export_s=res.seconds)
    assert not failures, failures[:6]
    assert formats == {fmt}, formats
    assert len(set(amaxes)) > 1, "experts' amax are all equal: the test cannot tell per-expert scales apart"
    assert st["scale2"] <= 1e-5, f"per-expert global scale does not follow weight_quantizer.{{i}} amax (rel err {st['scale2']:.3g})"
    assert st["unexplained"] == 0, (
        f"{st['unexplained']} of {st['elems']} decoded expert weights differ from ModelOpt's fake quant away from "
        f"rounding ties (max {st['max_rel']:.3g} x amax): {examples[:2]}")


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_quantized_te_sequential_experts(fmt, tmp_path, request):
    """The layout ModelOpt's own exporter asks users to train with: SequentialMLP experts made of
    TE linears (``moe_grouped_gemm=False``), each with its own ``weight_quantizer``.  Every
    exported expert weight decodes to ModelOpt's fake-quantized weight of that expert
    (``local_experts[e].linear_fc{1,2}.weight_quantizer(weight)``) within one ulp, except at
    exact rounding ties (as in the grouped test); no ``*.bias`` is exported for TE's empty
    no-bias placeholder, and the exporter's own HF-name check accepts the names (``note`` None)."""
    _need_quant()
    import modelopt
    import modelopt.torch.quantization as mtq

    cfg = {"nvfp4": mtq.NVFP4_DEFAULT_CFG, "fp8": mtq.FP8_DEFAULT_CFG}[fmt]
    spec = G.tiny_spec("qwen3_moe")
    model = G.build_te_gpt(spec, torch.bfloat16, grouped=False)
    assert G.experts_type(model) == "SequentialMLP"
    calib = [G.tokens(spec.vocab_size, batch=4, seq=64, seed=s) for s in range(4)]

    def loop(m):
        for ids in calib:
            G.megatron_logits(m, ids)

    mtq.quantize(model, cfg, loop)
    out = tmp_path / "hf"
    res, note = G.export(model, out, "qwen3_moe", torch.bfloat16)
    tensors = G.read_exported(out)
    ffn = spec.moe_ffn_hidden_size
    failures, formats, amaxes = [], set(), []
    elems = unexplained = 0
    scale_err = 0.0
    for li, layer in enumerate(model.decoder.layers):
        for e, expert in enumerate(layer.mlp.experts.local_experts):
            for lin, hf_parts in ((expert.linear_fc1, (("gate_proj", 0, ffn), ("up_proj", ffn, 2 * ffn))),
                                  (expert.linear_fc2, (("down_proj", 0, None),))):
                q = lin.weight_quantizer
                amax = float(q.amax.float().max())
                if li == 0 and lin is expert.linear_fc1:
                    amaxes.append(amax)
                w = lin.weight.detach()
                with torch.no_grad():
                    fq = q(w).detach()
                for hf_name, r0, r1 in hf_parts:
                    base = f"model.layers.{li}.mlp.experts.{e}.{hf_name}"
                    if base + ".bias" in tensors:
                        failures.append(f"{base}.bias exported (TE's empty no-bias placeholder)")
                    parts = {k[len(base) + 1:]: v.cuda() for k, v in tensors.items() if k.startswith(base + ".")}
                    if "weight" not in parts:
                        failures.append(f"{base}.weight missing")
                        continue
                    f, dec = D.decode(parts)
                    formats.add(f)
                    ref = fq[r0:r1]
                    if dec.shape != ref.shape:
                        failures.append(f"{base}: decoded shape {tuple(dec.shape)} != {tuple(ref.shape)}")
                        continue
                    bad = ~_ulp_close(dec, ref, amax)
                    if f == "nvfp4":
                        wr = w[r0:r1]
                        bad = bad & ~_value_ties(wr, parts) & ~_scale_tie_blocks(wr, parts["weight_scale_2"])
                        want, got = amax / (FP4_MAX * FP8_MAX), float(parts["weight_scale_2"].float())
                    else:
                        want, got = amax / FP8_MAX, float(parts["weight_scale"].float().max())
                    scale_err = max(scale_err, abs(got - want) / want)
                    elems += bad.numel()
                    unexplained += int(bad.sum())
    G.record(request.node.nodeid, fmt=fmt, modelopt=modelopt.__version__, exported_formats=sorted(formats),
             quant_algo=res.quant_algo, elems=elems, unexplained=unexplained, max_scale_rel_err=scale_err,
             expert_amax_layer0_fc1=amaxes, failures=failures[:6], note=note)
    assert note is None, note
    assert not failures, failures[:6]
    assert formats == {fmt}, formats
    assert len(set(amaxes)) > 1, "experts' amax are all equal: the test cannot tell per-expert scales apart"
    assert scale_err <= 1e-5, f"per-expert global scale does not follow the expert's own amax (rel err {scale_err:.3g})"
    assert unexplained == 0, f"{unexplained} of {elems} decoded expert weights differ from ModelOpt's fake quant"
