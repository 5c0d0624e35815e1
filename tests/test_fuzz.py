"""The config fuzzer's fixed CI seed set (issue 21 part 2): for every architecture, in every
Megatron form the installed megatron-core / transformers can build and load, draws 0 ..
``FUZZ_CI_SEEDS - 1`` of :func:`nemo_export_hooks.testing.fuzz.draw` are built, exported and
loaded; each must match Megatron's fp32 logits within 1e-4 (times the largest |logit| where
that is above 1) or be refused with nothing written.  A failing draw's message is a snippet that
reproduces it.

Draws that fall in a known, open defect class (``fuzz.KNOWN_DEFECTS``, issue 21) are
``xfail(strict=True)``: they must still fail, so the marker has to go when the fix lands.

``make test`` (megatron-core 0.15.3, transformers 4.x) runs the GPTModel forms it can build;
``make test-mcore19`` (0.19.2, transformers 5) the rest: HybridModel / MambaModel forms,
NemotronH, Qwen3-Next and Qwen3.5-MoE.  ``make fuzz`` runs many more seeds.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from nemo_export_hooks.testing import fuzz

def _default_seeds() -> int:
    """16 draws per (arch, form) where only the GPTModel forms build (``make test``, megatron-core
    0.15.3: 8 forms, ~1.5 min on 2 cores), 8 where every form does (``make test-mcore19``: 21
    forms, ~2.5 min)."""
    from nemo_export_hooks.testing.fuzz import _importable

    return 8 if _importable("megatron.core.models.hybrid.hybrid_model", "HybridModel") else 16


CI_SEEDS = int(os.environ.get("FUZZ_CI_SEEDS") or _default_seeds())


def _cases():
    for arch in fuzz.ARCHS:
        for form in fuzz.FORMS[arch]:
            for seed in range(CI_SEEDS):
                c = fuzz.draw(arch, form, seed)
                known = fuzz.known_defect(c)
                marks = [pytest.mark.xfail(strict=fuzz.known_defect_strict(c), reason=known)] if known else []
                yield pytest.param(arch, form, seed, marks=marks, id=f"{arch}-{form}-{seed}")


@pytest.fixture(scope="module")
def quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity(level)


@pytest.mark.parametrize("arch,form,seed", list(_cases()))
def test_fuzz_draw(mcore, quiet_transformers, tmp_path, arch, form, seed):
    ok, why = fuzz.available(arch, form)
    if not ok:
        pytest.skip(why)
    o = fuzz.run_config(fuzz.draw(arch, form, seed), tmp_path)
    assert o.ok, f"{o.line()}\nreproduce with:\n{fuzz.reproducer(o.config)}"


# -- the fuzzer itself ---------------------------------------------------------------------------


def test_draws_are_deterministic_and_plain_data():
    for arch in fuzz.ARCHS:
        for form in fuzz.FORMS[arch]:
            a, b = fuzz.draw(arch, form, 7), fuzz.draw(arch, form, 7)
            assert a == b and repr(a) == repr(b)
            assert eval(repr(a)) == a  # the reproducer's dict literal is the config  # noqa: S307


def test_draws_cover_the_option_space():
    """Over 300 draws, each dimension the issue lists takes more than one value (and probes
    outside what the rules support happen)."""
    seen: dict[str, set] = {}

    def note(k, v):
        seen.setdefault(k, set()).add(repr(v))

    for arch in fuzz.ARCHS:
        for form in fuzz.FORMS[arch]:
            for seed in range(300 // len(fuzz.FORMS[arch])):
                c = fuzz.draw(arch, form, seed)
                s, x = c["spec"], c["spec"]["extra"]
                note("layers", s.get("num_layers") or len(c["pattern"]))
                note("pattern", c["pattern"])
                for k in ("num_attention_heads", "num_query_groups", "kv_channels", "num_experts", "moe_router_topk",
                          "moe_shared_expert_intermediate_size", "moe_layer_freq", "moe_router_score_function",
                          "moe_router_pre_softmax", "moe_router_num_groups", "moe_router_enable_expert_bias",
                          "rotary_percent", "add_qkv_bias", "add_bias_linear", "tie_embeddings", "normalization"):
                    note(k, s.get(k))
                for k in ("window_size", "window_attn_skip_freq", "layernorm_zero_centered_gamma", "rotary_interleaved"):
                    note(k, x.get(k))
                note("rope_scaling", s.get("model_kwargs", {}).get("rope_scaling"))
                note("layout", c["layout"])
                note("probe", c["probe"])
    thin = {k: v for k, v in seen.items() if len(v) < 2}
    assert not thin, thin
    assert len(seen["probe"]) > 30


def test_a_wrong_export_is_a_failure(mcore, quiet_transformers, tmp_path, monkeypatch):
    """The fuzzer can fail: with a rule that writes a wrong ``rms_norm_eps`` the same draw that
    matches becomes a failure with a logit difference, and its reproducer names the config."""
    from nemo_export_hooks.exporter import rules

    c = next(fuzz.draw("qwen3", "gpt", s) for s in range(50)
             if fuzz.draw("qwen3", "gpt", s)["probe"] is None and fuzz.draw("qwen3", "gpt", s)["spec"]["extra"]["init_method_std"] == 0.2)
    assert fuzz.run_config(c, tmp_path / "a").kind == "matched"
    base = rules.get_rule("qwen3")
    wrong = dataclasses.replace(base, build_config=lambda info: {**base.build_config(info), "rms_norm_eps": 0.5})
    monkeypatch.setitem(rules.RULES, "qwen3", wrong)
    o = fuzz.run_config(c, tmp_path / "b")
    assert o.kind == "failed" and o.diff > fuzz.ATOL * 10, o.line()
    assert repr(c) in fuzz.reproducer(c)


def test_a_refusal_leaves_nothing(mcore, tmp_path):
    c = next(fuzz.draw("gpt_oss", "gpt", s) for s in range(2000) if fuzz.draw("gpt_oss", "gpt", s)["probe"] == "qk_layernorm")
    o = fuzz.run_config(c, tmp_path)
    assert o.kind == "refused" and "qk-norm" in o.detail, o.line()
    assert list((tmp_path / "export").iterdir()) == []


# -- what the fuzzer found and this branch fixed ------------------------------------------------

# `make fuzz` seed 1020 of qwen3_5_moe_text/hybrid: head dim 8, rotary_percent 0.25 -> two rotary dims
TWO_ROTARY_DIMS = {
    'arch': 'qwen3_5_moe_text', 'form': 'hybrid', 'seed': 1020, 'weights_seed': 2020, 'pattern': 'GE*E',
    'position_embedding_type': 'rope', 'layout': 'sequential', 'activation': None, 'probe': None,
    'spec': {'extra': {'init_method_std': 0.1, 'layernorm_zero_centered_gamma': False, 'attention_output_gate': True,
                       'moe_shared_expert_gate': True, 'deterministic_mode': True, 'linear_conv_kernel_dim': 2,
                       'linear_key_head_dim': 16, 'linear_value_head_dim': 8, 'linear_num_key_heads': 1,
                       'linear_num_value_heads': 1},
             'vocab_size': 64, 'max_seq_len': 64, 'ffn_hidden_size': 48, 'tie_embeddings': True, 'rotary_base': 10000.0,
             'layernorm_epsilon': 1e-05, 'hidden_size': 64, 'num_attention_heads': 8, 'num_query_groups': 2, 'kv_channels': 8,
             'num_experts': 4, 'moe_ffn_hidden_size': 32, 'moe_router_topk': 4, 'moe_shared_expert_intermediate_size': 48,
             'qk_layernorm': True, 'rotary_percent': 0.25}}


def test_two_rotary_dims_in_a_hybrid_model(mcore, quiet_transformers, tmp_path):
    """A ``HybridModel`` keeps no ``rotary_percent``: the export recovers it from ``inv_freq``.
    With two rotary dims there is one frequency (1.0 for every base), which was read as
    ``rotary_percent=1.0``: exported with ``partial_rotary_factor`` 1.0, logits 1.0 off."""
    ok, why = fuzz.available("qwen3_5_moe_text", "hybrid")
    if not ok:
        pytest.skip(why)
    from nemo_export_hooks.exporter.source import rotary_attrs

    assert rotary_attrs(fuzz.build(TWO_ROTARY_DIMS))[1] == 0.25
    o = fuzz.run_config(TWO_ROTARY_DIMS, tmp_path)
    assert o.kind == "matched", o.line()


# -- the classes the fuzzer found, each fixed or refused by name (issue 21) ----------------------
# (arch, form, seed) of a draw that exported silently wrong before the fix; what it must be now,
# and for a refusal the words that name the cause.
FOUND = [
    ("deepseek_v3", "gpt", 3002, "matched", None),  # group-limited routing, negative expert bias (was 1.12 off)
    ("qwen3", "gpt", 3013, "refused", "rope_scaling"),  # Llama-3.1 rope scaling (was 0.108 off)
    ("nemotron_h", "mamba", 3009, "refused", "share_embeddings_and_output_weights"),  # tied: random lm_head in HF
    ("qwen3_next", "hybrid", 3005, "refused", "full-attention layer"),  # GEGEGE: transformers' forward raised
]


@pytest.mark.parametrize("arch,form,seed,want,words", FOUND, ids=[f"{a}-{f}-{s}" for a, f, s, _, _ in FOUND])
def test_found_classes_are_fixed_or_refused(mcore, quiet_transformers, tmp_path, arch, form, seed, want, words):
    ok, why = fuzz.available(arch, form)
    if not ok:
        pytest.skip(why)
    c = fuzz.draw(arch, form, seed)
    o = fuzz.run_config(c, tmp_path)
    if o.kind == "invalid":
        pytest.skip(f"megatron-core {o.detail}")
    assert o.kind == want, f"{o.line()}\nreproduce with:\n{fuzz.reproducer(c)}"
    if words:
        assert words in o.detail, o.detail
