"""Real Transformer Engine MoE models on the GPU: Qwen3-MoE and Mixtral built with
``get_gpt_layer_with_transformer_engine_spec(moe_grouped_gemm=True)`` (experts are
``TEGroupedMLP``: ``linear_fc1.weight0..N-1``), exported, loaded by ``transformers`` on the
GPU, logits compared with Megatron's own forward.

* float32: random initialisation, max |logit diff| <= 5e-3 (TF32 allowed in TE's GEMMs).
* bfloat16: a model trained for a few steps (so predictions are confident), cast to a bf16
  Megatron model; argmax agreement between HF-bf16 and Megatron-bf16 >= 99%.
Both: zero missing / unexpected / mismatched keys, and the exported names are exactly the
names transformers' ``save_pretrained`` writes for the class.
"""

from __future__ import annotations


import pytest

from gpu_skip import require_gpu

pytestmark = pytest.mark.gpu

torch = require_gpu("transformer_engine.pytorch", "megatron.core", "transformers")

import gpu_common as G  # noqa: E402

FP32_ATOL = 5e-3
BF16_MIN_ARGMAX = 0.99
ARCHS = ("qwen3_moe", "mixtral")


@pytest.fixture(scope="module", autouse=True)
def _mcore():
    G.init_mcore_gpu()
    yield


def _compare(model, arch, dtype, out, ref_model=None):
    """Export ``model``, load it in transformers on the GPU, return metrics."""
    spec_vocab = model.vocab_size
    ids = G.tokens(spec_vocab, batch=4, seq=64)
    ref = G.megatron_logits(model, ids)
    res, note = G.export(model, out, arch, dtype)
    hf, info = G.load_hf_gpu(out, dtype)
    problems = G.loading_problems(info)
    got = G.hf_logits(hf, ids)
    diff = (got - ref).abs().max().item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    ours = G.exported_keys(out)
    theirs = G.saved_key_names(hf, out.parent / (out.name + "_hf_saved"))
    metrics = dict(
        arch=arch, dtype=str(dtype).replace("torch.", ""), experts=G.experts_type(model),
        max_abs_diff=diff, argmax_agreement=agree, logit_std=ref.std().item(),
        export_s=res.seconds, tensors=res.num_tensors, bytes=res.total_bytes,
        loading_problems=problems, names_only_in_export=sorted(ours - theirs)[:8],
        names_only_in_save_pretrained=sorted(theirs - ours)[:8], note=note,
    )
    if ref_model is not None:  # the fp32 parent of a bf16 model: how far bf16 is from it
        fp32_ref = G.megatron_logits(ref_model, ids)
        metrics["hf_vs_fp32_argmax"] = (got.argmax(-1) == fp32_ref.argmax(-1)).float().mean().item()
        metrics["mcore_bf16_vs_fp32_argmax"] = (ref.argmax(-1) == fp32_ref.argmax(-1)).float().mean().item()
    del hf
    torch.cuda.empty_cache()
    return metrics


@pytest.mark.parametrize("arch", ARCHS)
def test_te_grouped_fp32_logits(arch, tmp_path, request):
    spec = G.tiny_spec(arch)
    model = G.build_te_gpt(spec, torch.float32)
    assert G.experts_type(model) == "TEGroupedMLP", G.experts_type(model)
    fc1 = model.decoder.layers[0].mlp.experts.linear_fc1
    assert hasattr(fc1, "weight0") and hasattr(fc1, f"weight{spec.num_experts - 1}")
    lines, ignored = G.te_name_map(model, arch, torch.float32)
    G.artifact("te_names.txt", f"== {arch} ({type(fc1).__module__}.{type(fc1).__name__}) layer 0: "
               f"mapped Megatron/TE name -> HF names\n" + "\n".join(lines)
               + "\n-- state-dict names not exported: " + ", ".join(ignored) + "\n")
    m = _compare(model, arch, torch.float32, tmp_path / "hf")
    m["te_names_not_exported"] = ignored
    G.record(request.node.nodeid, **m)
    assert not m["loading_problems"], m["loading_problems"]
    assert not m["names_only_in_export"] and not m["names_only_in_save_pretrained"], m
    assert m["max_abs_diff"] <= FP32_ATOL, f"{arch} fp32: max abs logit diff {m['max_abs_diff']:.3g} > {FP32_ATOL}"


@pytest.mark.parametrize("arch", ARCHS)
def test_te_grouped_bf16_argmax(arch, tmp_path, request):
    spec = G.tiny_spec(arch)
    parent = G.build_te_gpt(spec, torch.float32)
    loss = G.train_permutation_task(parent, spec.vocab_size)
    model = G.build_te_gpt(spec, torch.bfloat16, randomise_norms=False)
    G.copy_weights(parent, model)
    m = _compare(model, arch, torch.bfloat16, tmp_path / "hf", ref_model=parent)
    m["train_loss"] = loss
    G.record(request.node.nodeid, **m)
    assert not m["loading_problems"], m["loading_problems"]
    assert not m["names_only_in_export"] and not m["names_only_in_save_pretrained"], m
    assert m["argmax_agreement"] >= BF16_MIN_ARGMAX, f"{arch} bf16: argmax agreement {m['argmax_agreement']:.4f}"


def test_hf_name_check(tmp_path, request):
    """The public ``export_to_hf`` (with its HF-name check on) accepts a TEGroupedMLP model
    under the installed transformers (5.x fuses experts in memory but loads/saves per-expert
    names)."""
    import transformers

    from nemo_export_hooks import export_to_hf

    spec = G.tiny_spec("qwen3_moe")
    model = G.build_te_gpt(spec, torch.bfloat16)
    err = None
    try:
        export_to_hf(model, tmp_path / "hf", arch="qwen3_moe", dtype=torch.bfloat16)
    except ValueError as e:
        err = str(e)
    G.record(request.node.nodeid, transformers=transformers.__version__, error=(err or "")[:400])
    assert err is None, err
