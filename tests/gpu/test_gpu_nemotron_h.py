"""NemotronH on the GPU (issue 26): a Nemotron-3-Nano-patterned hybrid ``MambaModel`` built from
megatron-core's own Transformer Engine ``mamba_stack_spec`` -- Mamba-2 mixers (mamba_ssm's Triton
kernels), TE attention, MoE layers with squared-ReLU experts in real ``TEGroupedMLP`` -- exported
with ``export_to_hf(arch="nemotron_h")`` and loaded by transformers' ``NemotronHForCausalLM``.

* ``test_nemotron_h_te_fp32_logits``: random init, fp32, TF32 off (torch, and Triton's
  ``TRITON_F32_DEFAULT=ieee`` for the Mamba scan): zero missing/unexpected/mismatched keys, the
  exporter's HF-name check passes, exported names equal ``save_pretrained``'s, max |logit diff|
  vs Megatron <= 5e-3 (the suite's tolerance).
* ``test_nemotron_h_callback_lightning``: the training hook (Lightning + ``HFExportCallback``,
  async writes) on this model; every export verifies; the last one's logits match the trained
  model (5e-3).
* ``test_nemotron_h_bf16_export``: a model trained on a permutation task (confident predictions),
  copied to bf16, exported in bf16: HF-bf16 agrees with Megatron-bf16 on >= 99% of argmaxes.
* ``test_nemotron_h_quantized``: ModelOpt 0.47 ``mtq.quantize`` of that bf16 model with the
  Mamba-MoE recipes NVIDIA uses for Nemotron-3 Nano (``MAMBA_MOE_{NVFP4,FP8}_CONSERVATIVE_CFG``:
  Mamba and attention projections left in bf16) and with ``NVFP4_DEFAULT_CFG`` (everything
  quantized).  For every routed expert (``TEGroupedMLP`` ``weight{e}``): (1) the exported packed
  tensors are bit-exact with ModelOpt's own packing of that weight (``NVFP4QTensor.quantize``
  with the global scale as the GPU computes it / FP8 cast with IEEE division, as in
  ``test_gpu_quant.py``); (2) they decode to ModelOpt's fake-quantized weight
  ``weight_quantizer[e](weight{e})`` within one bf16 ulp except at exact rounding ties; (3) the
  expert's global scale follows its own ``weight_quantizer.{e}`` amax (rel. err <= 1e-5), and the
  experts' amaxes differ.  Shared experts: (2) and (3).  ModelOpt's whole-model Megatron exporter
  (``export_mcore_gpt_to_hf``, which has the NemotronH ``GroupedMLPSlicing`` rule) cannot run on
  this stack: it imports ``megatron.core.models.hybrid`` (megatron-core >= 0.19) and accepts only
  ``GPTModel`` / ``HybridModel``, so the comparison is per tensor.

The bf16, FP8 and NVFP4 (conservative) exports are written under ``$NEMOTRON_H_EXPORTS``
(default ``/tmp/nemotron_h_exports``) with reference log-probs beside each, and listed in
``exports.json`` there, for ``tests/gpu/vllm_nemotron_h_smoke.py``.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

# fp32 tl.dot in Triton is TF32 unless told otherwise; read when the Mamba kernels compile
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

from gpu_skip import require_gpu  # noqa: E402

pytestmark = pytest.mark.gpu

torch = require_gpu("transformer_engine.pytorch", "megatron.core")

import gpu_nemotron_h as N  # noqa: E402

_why = N.mamba_kernels_problem()
if _why:
    pytest.skip(_why, allow_module_level=True)
import transformers  # noqa: E402

if not hasattr(transformers, "NemotronHForCausalLM"):
    pytest.skip(f"transformers {transformers.__version__} has no NemotronHForCausalLM", allow_module_level=True)

import gpu_common as G  # noqa: E402

FP32_ATOL = 5e-3
BF16_ARGMAX_MIN = 0.99
ARCH = "nemotron_h"
RECIPES = {  # test id -> (format, ModelOpt config name, listed for vLLM)
    "nvfp4-mamba-moe": ("nvfp4", "MAMBA_MOE_NVFP4_CONSERVATIVE_CFG", True),
    "fp8-mamba-moe": ("fp8", "MAMBA_MOE_FP8_CONSERVATIVE_CFG", True),
    "nvfp4-default": ("nvfp4", "NVFP4_DEFAULT_CFG", False),
}
VLLM_IDS = dict(batch=4, seq=48, seed=3)  # the prompts the vLLM step scores


@pytest.fixture(scope="module", autouse=True)
def _mcore():
    G.init_mcore_gpu()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield


@pytest.fixture(scope="module")
def pattern():
    return N.tiny_pattern()


@pytest.fixture(scope="module")
def spec(pattern):
    return N.nano_spec(pattern)


@pytest.fixture(scope="module")
def trained(spec, pattern):
    """An fp32 model trained 200 Adam steps on next token = P[token] (so bf16 and quantized
    predictions are confident, not decided by near-ties), and its final loss."""
    model = N.build_te_nemotron_h(spec, pattern, torch.float32)
    loss = G.train_permutation_task(model, spec.vocab_size, steps=int(os.environ.get("NH_TRAIN_STEPS", "200")), lr=3e-3)
    return model, loss


def _bf16_copy(parent, spec, pattern):
    model = N.build_te_nemotron_h(spec, pattern, torch.bfloat16, randomise=False)
    G.copy_weights(parent, model)
    model.eval()
    return model


def _copy_list():
    """The export list as it stands, also under $OUT (GPU_ARTIFACTS) so it comes back."""
    G.ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (G.ARTIFACTS / "nemotron_h_exports.json").write_text(N.EXPORTS_LIST.read_text())


def _check_te_spec(model):
    kinds = N.layer_kinds(model)
    assert all(k.startswith("MambaMixer/TELayerNormColumnParallelLinear") for k in kinds.get("M", [])), kinds
    assert kinds.get("E") and all(k.startswith("TEGroupedMLP/") for k in kinds["E"]), kinds
    assert all(k.startswith("SelfAttention/TELayerNormColumnParallelLinear") for k in kinds.get("*", [])), kinds
    return kinds


def test_nemotron_h_te_fp32_logits(tmp_path, request, spec, pattern):
    model = N.build_te_nemotron_h(spec, pattern, torch.float32)
    kinds = _check_te_spec(model)
    ids = G.tokens(spec.vocab_size, batch=4, seq=64)
    ref = G.megatron_logits(model, ids)
    out = tmp_path / "hf"
    res, note = G.export(model, out, ARCH, torch.float32)
    hf, info = G.load_hf_gpu(out, torch.float32)
    got = G.hf_logits(hf, ids)
    diff = (got - ref).abs().max().item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    problems = G.loading_problems(info)
    saved = G.saved_key_names(hf, tmp_path / "saved")
    exported = G.exported_keys(out)
    te_lines, ignored = G.te_name_map(model, ARCH, torch.float32, layer=pattern.index("E"))
    G.artifact("te_names.txt", f"== nemotron_h MoE layer {pattern.index('E')}\n" + "\n".join(te_lines)
               + "\n-- not exported: " + ", ".join(ignored))
    G.record(request.node.nodeid, arch=ARCH, pattern=pattern, kinds=kinds, max_abs_diff=diff, argmax_agreement=agree,
             logit_std=ref.std().item(), tensors=len(exported), loading_problems=problems,
             names_only_in_export=sorted(exported - saved)[:8], names_only_in_save_pretrained=sorted(saved - exported)[:8],
             note=note, export_s=res.seconds)
    assert note is None, note
    assert not problems, problems
    assert exported == saved, (sorted(exported - saved)[:6], sorted(saved - exported)[:6])
    assert diff <= FP32_ATOL, f"max abs logit diff {diff:.3g} > {FP32_ATOL} (argmax agreement {agree:.4f})"


def test_nemotron_h_bf16_export(request, trained, spec, pattern):
    parent, loss = trained
    model = _bf16_copy(parent, spec, pattern)
    path = N.EXPORTS_DIR / "bf16"
    shutil.rmtree(path, ignore_errors=True)
    res, note = G.export(model, path, ARCH, torch.bfloat16)
    ids = G.tokens(spec.vocab_size, batch=4, seq=64, seed=1)
    meg = G.megatron_logits(model, ids)
    par = G.megatron_logits(parent, ids)
    hf, info = G.load_hf_gpu(path, torch.bfloat16)
    got = G.hf_logits(hf, ids)
    agree = (got.argmax(-1) == meg.argmax(-1)).float().mean().item()
    vs_parent = (meg.argmax(-1) == par.argmax(-1)).float().mean().item()
    problems = G.loading_problems(info)
    vids = G.tokens(spec.vocab_size, **VLLM_IDS)
    ref = N.save_reference(path, vids, torch.log_softmax(G.hf_logits(hf, vids).float(), -1), "transformers bf16")
    N.record_export("bf16", path, ref, recipe=None, pattern=pattern, train_loss=loss)
    _copy_list()
    G.record(request.node.nodeid, train_loss=loss, argmax_agreement=agree, vs_fp32_parent=vs_parent,
             max_abs_diff=(got - meg).abs().max().item(), loading_problems=problems, note=note, path=str(path))
    assert note is None, note
    assert not problems, problems
    assert agree >= BF16_ARGMAX_MIN, f"HF-bf16 vs Megatron-bf16 argmax agreement {agree:.4f} < {BF16_ARGMAX_MIN}"


def _packed_checks(fmt, Q, D, parts, w, q, r0=0, r1=None, bitexact=True):
    """(bit-exact vs ModelOpt's packing, unexplained decode mismatches, scale rel. error, format)."""
    amax = float(q.amax.float().max())
    gs = Q._global_scales(fmt, q.amax)
    want_key = "gpu" if fmt == "nvfp4" else "cpu"
    with torch.no_grad():
        fq = q(w).detach()
        mo = Q._modelopt_export(fmt, w if want_key == "gpu" else w.cpu(), gs[want_key])
    f, dec = D.decode(parts)
    ref, wr = fq[r0:r1], w[r0:r1]
    diff = Q._same(parts, Q._slice(mo, r0, r1)) if bitexact else []
    if dec.shape != ref.shape:
        return diff, -1, float("inf"), f
    bad = ~Q._ulp_close(dec, ref, amax)
    if f == "nvfp4":
        bad = bad & ~Q._value_ties(wr, parts) & ~Q._scale_tie_blocks(wr, parts["weight_scale_2"])
        want, got = amax / (Q.FP4_MAX * Q.FP8_MAX), float(parts["weight_scale_2"].float())
    else:
        want, got = amax / Q.FP8_MAX, float(parts["weight_scale"].float().max())
    return diff, int(bad.sum()), abs(got - want) / want, f


@pytest.mark.parametrize("case", list(RECIPES))
def test_nemotron_h_quantized(case, request, trained, spec, pattern):
    pytest.importorskip("modelopt.torch.quantization")
    import modelopt
    import modelopt.torch.quantization as mtq

    import gpu_quant_decode as D
    import test_gpu_quant as Q

    Q._need_quant()
    fmt, recipe, for_vllm = RECIPES[case]
    parent, _ = trained
    model = _bf16_copy(parent, spec, pattern)
    g = torch.Generator().manual_seed(5)
    calib = [torch.randint(0, spec.vocab_size, (8, 64), generator=g).cuda() for _ in range(8)]

    def loop(m):
        for ids in calib:
            G.megatron_logits(m, ids)

    mtq.quantize(model, getattr(mtq, recipe), loop)
    path = N.EXPORTS_DIR / case
    shutil.rmtree(path, ignore_errors=True)
    res, note = G.export(model, path, ARCH, torch.bfloat16)
    tensors = G.read_exported(path)
    hq = json.loads((path / "hf_quant_config.json").read_text())["quantization"]
    failures, formats, amaxes = [], set(), []
    st = dict(experts=0, not_bitexact=0, unexplained=0, scale_err=0.0, shared=0)

    def parts_of(base):
        return {k[len(base) + 1:]: v.cuda() for k, v in tensors.items() if k.startswith(base + ".")}

    for li in N.expert_layers(pattern):
        mlp = model.decoder.layers[li].mlp
        assert type(mlp.experts).__name__.endswith("TEGroupedMLP"), type(mlp.experts)  # QuantTEGroupedMLP once quantized
        for lin, hf in ((mlp.experts.linear_fc1, "up_proj"), (mlp.experts.linear_fc2, "down_proj")):
            for e in range(spec.num_experts):
                q = lin.weight_quantizer[e]
                if lin is mlp.experts.linear_fc1 and li == N.expert_layers(pattern)[0]:
                    amaxes.append(float(q.amax.float().max()))
                base = f"backbone.layers.{li}.mixer.experts.{e}.{hf}"
                parts = parts_of(base)
                if "weight" not in parts:
                    failures.append(f"{base}.weight missing")
                    continue
                diff, bad, serr, f = _packed_checks(fmt, Q, D, parts, getattr(lin, f"weight{e}").detach(), q)
                formats.add(f)
                st["experts"] += 1
                st["not_bitexact"] += int(bool(diff))
                st["unexplained"] += max(bad, 0)
                st["scale_err"] = max(st["scale_err"], serr)
                if diff:
                    failures.append(f"{base}.{diff} differ from ModelOpt's packing")
                if bad:
                    failures.append(f"{base}: {bad} decoded elements differ from ModelOpt's fake quant")
        sh = getattr(mlp, "shared_experts", None)
        if sh is not None:
            for lin, hf in ((sh.linear_fc1, "up_proj"), (sh.linear_fc2, "down_proj")):
                base = f"backbone.layers.{li}.mixer.shared_experts.{hf}"
                parts = parts_of(base)
                if "weight" not in parts or not hasattr(lin, "weight_quantizer"):
                    failures.append(f"{base}: weight or quantizer missing")
                    continue
                _, bad, serr, f = _packed_checks(fmt, Q, D, parts, lin.weight.detach(), lin.weight_quantizer, bitexact=False)
                formats.add(f)
                st["shared"] += 1
                st["unexplained"] += max(bad, 0)
                st["scale_err"] = max(st["scale_err"], serr)
                if bad:
                    failures.append(f"{base}: {bad} decoded elements differ from ModelOpt's fake quant")
    in_proj = f"backbone.layers.{pattern.index('M')}.mixer.in_proj"
    in_proj_packed = tensors[in_proj + ".weight"].dtype != torch.bfloat16
    mamba_moe = recipe.startswith("MAMBA_MOE")
    if mamba_moe and (in_proj_packed or in_proj not in hq["exclude_modules"]):
        failures.append(f"{recipe}: {in_proj} should stay bf16 and be listed as excluded")
    if not mamba_moe and not in_proj_packed:
        failures.append(f"{recipe}: {in_proj} should be quantized")
    # the prompts the vLLM step scores, through Megatron's fake-quantized forward
    vids = G.tokens(spec.vocab_size, **VLLM_IDS)
    ref = N.save_reference(path, vids, torch.log_softmax(G.megatron_logits(model, vids), -1),
                           f"Megatron fake-quant ({recipe})")
    if for_vllm:
        N.record_export(fmt, path, ref, recipe=recipe, pattern=pattern)
        _copy_list()
    G.record(request.node.nodeid, recipe=recipe, modelopt=modelopt.__version__, quant_algo=res.quant_algo,
             hf_quant_algo=hq.get("quant_algo"), exported_formats=sorted(formats), **st,
             expert_amax_first_moe_fc1=amaxes, in_proj_packed=in_proj_packed, excluded=sorted(hq["exclude_modules"])[:12],
             failures=failures[:6], note=note, path=str(path))
    assert note is None, note
    assert not failures, failures[:6]
    assert formats == {fmt}, formats
    assert st["experts"] == 2 * spec.num_experts * len(N.expert_layers(pattern)), st
    assert len(set(amaxes)) > 1, "experts' amax are all equal: the test cannot tell per-expert scales apart"
    assert st["scale_err"] <= 1e-5, f"a global scale does not follow its own weight_quantizer amax (rel err {st['scale_err']:.3g})"


# last: the exports the vLLM step needs come first, if the call's time runs short
def test_nemotron_h_callback_lightning(tmp_path, request, spec, pattern):
    from nemo_export_hooks.publish import verify_export
    from test_gpu_callback import fit_with_export

    model = N.build_te_nemotron_h(spec, pattern, torch.float32)
    _, export, _, _ = fit_with_export(model, ARCH, spec.vocab_size, 6, tmp_path)
    exported = list(export.exports)
    paths = sorted({str(e["path"]) for e in exported})
    problems = {p: verify_export(p) for p in paths}
    last = max(exported, key=lambda e: e["step"]) if exported else None
    diff, load_problems = float("nan"), {}
    if last is not None:
        model.cuda()  # Lightning's teardown moved the module back to the CPU
        ids = G.tokens(spec.vocab_size, batch=4, seq=32)
        ref = G.megatron_logits(model, ids)
        hf, info = G.load_hf_gpu(last["path"], torch.float32)
        diff = (G.hf_logits(hf, ids) - ref).abs().max().item()
        load_problems = G.loading_problems(info)
    got_steps = sorted(e["step"] for e in exported)
    G.record(request.node.nodeid, exports=len(exported), steps=got_steps, max_abs_diff=diff,
             loading_problems=load_problems, verify="ok" if not any(problems.values()) else problems,
             failed=export.failed)
    assert export.failed == 0, export.failed
    assert got_steps == [2, 3, 4, 6], got_steps
    assert not any(problems.values()), problems
    assert not load_problems, load_problems
    assert diff <= FP32_ATOL, f"max abs logit diff {diff:.3g} > {FP32_ATOL}"
