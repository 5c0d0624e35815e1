"""megatron-core 0.19 layouts with the real Transformer Engine (issue 12 item 4, device half).

* ``moe_mlp_glu_interleave_size=32`` (Megatron-Bridge's GB200 Qwen3-MoE recipe) on real
  ``TEGroupedMLP`` / TE ``GroupedLinear`` (``weight{i}``; any TE megatron-core 0.19 accepts).
* ``moe_single_grouped_weight`` (TE >= 2.14, TE op fuser): one TE ``GroupedTensor``
  ``linear_fc1.weight``; read through its per-expert views.  The same weights in the
  ``weight{i}`` layout must export to the same bytes.

Both: float32, zero missing/unexpected keys, HF logits vs Megatron's forward (TE GEMMs, TF32)
within 5e-3.  Not run on CPU (the CPU counterpart is tests/test_mcore19_layouts.py).
"""

from __future__ import annotations

import pytest

from gpu_skip import require_gpu

pytestmark = pytest.mark.gpu

torch = require_gpu("transformer_engine.pytorch", "megatron.core", "transformers")

import gpu_common as G  # noqa: E402

FP32_ATOL = 5e-3


def _config_has(field: str) -> bool:
    from megatron.core.transformer.transformer_config import TransformerConfig

    return field in TransformerConfig.__dataclass_fields__


def _te_at_least(v: str) -> bool:
    from megatron.core.utils import is_te_min_version

    return bool(is_te_min_version(v))


@pytest.fixture(scope="module", autouse=True)
def _mcore():
    G.init_mcore_gpu()
    yield


def _roundtrip(model, out):
    ids = G.tokens(model.vocab_size, batch=4, seq=64)
    ref = G.megatron_logits(model, ids)
    res, note = G.export(model, out, "qwen3_moe", torch.float32)
    hf, info = G.load_hf_gpu(out, torch.float32)
    diff = (G.hf_logits(hf, ids) - ref).abs().max().item()
    G.record("mcore19_" + out.name, experts=G.experts_type(model), max_abs_diff=diff,
             loading_problems=G.loading_problems(info), note=note)
    assert not any(G.loading_problems(info).values()), G.loading_problems(info)
    assert diff <= FP32_ATOL, diff
    return G.read_exported(out)


@pytest.mark.skipif(not _config_has("moe_mlp_glu_interleave_size"), reason="needs megatron-core >= 0.18")
def test_glu_interleave_32_real_te(tmp_path):
    spec = G.tiny_spec("qwen3_moe", moe_ffn_hidden_size=128, extra={"moe_mlp_glu_interleave_size": 32})
    m = G.build_te_gpt(spec, torch.float32)
    assert type(m.decoder.layers[0].mlp.experts).__name__ == "TEGroupedMLP"
    _roundtrip(m, tmp_path / "interleave32")


@pytest.mark.skipif(not _config_has("moe_single_grouped_weight"), reason="needs megatron-core >= 0.18")
def test_single_grouped_weight_real_te(tmp_path):
    if not _te_at_least("2.14.0"):
        pytest.skip("moe_single_grouped_weight needs transformer-engine >= 2.14")
    extra = {"moe_single_grouped_weight": True, "use_transformer_engine_op_fuser": True}
    single = G.build_te_gpt(G.tiny_spec("qwen3_moe", extra=extra), torch.float32)
    fc1 = single.decoder.layers[0].mlp.experts.linear_fc1
    assert "weight" in fc1._parameters and fc1._parameters.get("weight0") is None, list(fc1._parameters)
    with pytest.raises(Exception):
        fc1.weight[0]  # TE's GroupedTensor refuses indexing: the exporter must not slice it
    per = G.build_te_gpt(G.tiny_spec("qwen3_moe"), torch.float32)
    # same weights in the weight{i} layout: load the single model's state into it (TE remaps keys)
    per.load_state_dict(single.state_dict(), strict=False)
    a = _roundtrip(single, tmp_path / "single")
    b = _roundtrip(per, tmp_path / "per_expert")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
