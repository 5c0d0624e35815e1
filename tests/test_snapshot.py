"""The plan's layout (``execute.describe``) and the host snapshot: what the writer and the
snapshot pool are sized from must be exactly what the conversion yields, and a snapshot is a
copy in one reused buffer, never the model's storage."""

from __future__ import annotations

import warnings

import pytest
import torch

from nemo_export_hooks.exporter import snapshot
from nemo_export_hooks.exporter.api import prepare_export, write_prepared
from nemo_export_hooks.testing.cpu import TinySpec, build_gpt, megatron_logits
from nemo_export_hooks.testing.layouts import to_te_grouped


def _quantized(cfg_name):
    mtq = pytest.importorskip("modelopt.torch.quantization")
    model = build_gpt(TinySpec(), seed=7)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 128, (2, 12), generator=g) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, getattr(mtq, cfg_name), lambda m: [megatron_logits(m, t) for t in batches])
    return model


def _models():
    plain = build_gpt(TinySpec(), seed=3)
    grouped = build_gpt(TinySpec(), seed=3)
    to_te_grouped(grouped)
    return {"sequential": plain, "te_grouped": grouped}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_describe_lists_exactly_what_is_yielded(mcore, dtype):
    for label, model in _models().items():
        prepared = prepare_export(model, "qwen3_moe", dtype, check_hf_keys=False)
        got = [(n, t.dtype, tuple(t.shape)) for n, t in prepared.tensors()]
        assert got == prepared.layout(), label


@pytest.mark.parametrize("cfg", ["FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG"])
def test_describe_lists_quantized_tensors(mcore, cfg):
    prepared = prepare_export(_quantized(cfg), "qwen3_moe", torch.bfloat16, check_hf_keys=False)
    got = [(n, t.dtype, tuple(t.shape)) for n, t in prepared.tensors()]
    assert got == prepared.layout()
    assert any(n.endswith("weight_scale") for n, _, _ in got)


def test_snapshot_is_a_copy_in_one_reused_buffer(mcore, tmp_path):
    model = _models()["sequential"]
    prepared = prepare_export(model, "qwen3_moe", torch.bfloat16, check_hf_keys=False)
    expected = {n: t.clone() for n, t in prepared.tensors()}
    model_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    snap = prepared.host_snapshot()
    assert [n for n, _ in snap] == list(expected)
    assert all(torch.equal(t, expected[n]) for n, t in snap)
    assert not {t.untyped_storage().data_ptr() for _, t in snap} & model_ptrs  # never the model's storage
    buf = snap[0][1].untyped_storage().data_ptr()
    assert {t.untyped_storage().data_ptr() for _, t in snap} == {buf}  # one buffer
    pool = snap.pool
    assert pool.buf.numel() <= 1.1 * sum(t.numel() * t.element_size() for t in expected.values()) + 64 * len(expected)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the training step after the snapshot
    assert all(torch.equal(t, expected[n]) for n, t in snap)
    res = write_prepared(prepared, snap, tmp_path / "a")
    assert len(snap) == 0 and not pool.in_use()  # released once written
    assert res.num_tensors == len(expected)
    again = prepare_export(model, "qwen3_moe", torch.bfloat16, check_hf_keys=False).host_snapshot()
    assert again.pool is pool  # reused by the next export of the same layout
    busy = prepare_export(model, "qwen3_moe", torch.bfloat16, check_hf_keys=False).host_snapshot()
    assert busy.pool is not pool and busy[0][1].untyped_storage().data_ptr() != buf  # in use: a fresh buffer
    busy.release()
    kept = dict(again)  # a caller still holding the tensors after release: never overwritten
    kept_values = {n: t.clone() for n, t in kept.items()}
    again.release()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    third = prepare_export(model, "qwen3_moe", torch.bfloat16, check_hf_keys=False).host_snapshot()
    assert third.pool is not pool
    assert all(torch.equal(kept[n], v) for n, v in kept_values.items())
    assert not all(torch.equal(t, kept_values[n]) for n, t in third)  # the model did change
    third.release()
    del kept, third
    dropped = prepare_export(model, "qwen3_moe", torch.bfloat16, check_hf_keys=False).host_snapshot()
    assert dropped.pool is pool
    del dropped  # a snapshot dropped without release (a failed export) frees the pool too
    fourth = prepare_export(model, "qwen3_moe", torch.bfloat16, check_hf_keys=False).host_snapshot()
    assert fourth.pool is pool
    fourth.release()


def test_snapshot_layout_mismatch_is_an_error(mcore):
    prepared = prepare_export(_models()["sequential"], "qwen3_moe", torch.bfloat16, check_hf_keys=False)
    layout = prepared.layout()
    items = [(n, torch.zeros(s, dtype=d)) for n, d, s in layout]
    items[2] = (items[2][0], torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match=f"produced {items[2][0]!r} torch.bfloat16 \\[3\\] where its plan lists"):
        snapshot.take(iter(items), layout, on_cuda=False)
    with pytest.raises(RuntimeError, match=f"produced 2 tensors where its plan lists {len(layout)}"):
        snapshot.take(iter(items[:2]), layout, on_cuda=False)
    assert not snapshot._POOL.in_use()
