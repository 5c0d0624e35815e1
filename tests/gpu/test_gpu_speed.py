"""Export speed on the GPU for a ~3 GB bf16 Qwen3-MoE model with real TEGroupedMLP experts
(12 layers, hidden 2048, 16 experts of 1024): seconds and GB/s, cold and warm.  Informational
(no speed threshold); it fails only if the export itself fails or writes the wrong size."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from gpu_skip import require_gpu

pytestmark = pytest.mark.gpu

torch = require_gpu("transformer_engine.pytorch", "megatron.core")

import gpu_common as G  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _mcore():
    G.init_mcore_gpu()
    yield


def test_export_speed_3gb_moe(tmp_path, request):
    spec = G.tiny_spec(
        "qwen3_moe", num_layers=12, hidden_size=2048, num_attention_heads=16, num_query_groups=4,
        kv_channels=128, ffn_hidden_size=4096, vocab_size=32768, max_seq_len=4096, num_experts=16,
        moe_ffn_hidden_size=1024, moe_router_topk=4,
    )
    t0 = time.perf_counter()
    model = G.build_te_gpt(spec, torch.bfloat16, randomise_norms=False)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    # Baselines on this machine: device->host copy of every parameter, and safetensors write +
    # fsync of 1 GB into the same temporary directory the export writes to.
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    host_bytes = 0
    for p in model.parameters():
        host_bytes += p.detach().to("cpu").numel() * p.element_size()
    d2h_gbps = host_bytes / 1e9 / (time.perf_counter() - t0)
    from safetensors.torch import save_file

    blob = {f"t{i}": torch.empty(64 * 2**20 // 2, dtype=torch.bfloat16).fill_(i) for i in range(16)}  # 1 GiB
    t0 = time.perf_counter()
    save_file(blob, str(tmp_path / "baseline.safetensors"))
    fd = os.open(tmp_path / "baseline.safetensors", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    write_gbps = 2**30 / 1e9 / (time.perf_counter() - t0)
    (tmp_path / "baseline.safetensors").unlink()
    del blob
    # Where the export's time goes: planning + HF-name check, then producing the tensors
    # (device->host copy, splits, casts) without writing them.
    from nemo_export_hooks.exporter.api import prepare_export

    t0 = time.perf_counter()
    prepared = prepare_export(model, "qwen3_moe", torch.bfloat16, check_hf_keys=False)
    plan_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        prepare_export(model, "qwen3_moe", torch.bfloat16, check_hf_keys=True)
    except ValueError:
        pass
    plan_check_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    produced = sum(t.numel() * t.element_size() for _, t in prepared.tensors())
    produce_s = time.perf_counter() - t0
    runs = []
    note = None
    threads0 = torch.get_num_threads()
    for i, threads in enumerate((threads0, os.cpu_count() or threads0)):
        torch.set_num_threads(threads)
        out = tmp_path / f"hf{i}"
        t0 = time.perf_counter()
        res, note = G.export(model, out, "qwen3_moe", torch.bfloat16)
        wall = time.perf_counter() - t0
        runs.append(dict(threads=threads, seconds=round(res.seconds, 3), wall=round(wall, 3), gb=round(res.total_bytes / 1e9, 3),
                         gb_per_s=round(res.total_bytes / 1e9 / wall, 3), files=len(res.files), tensors=res.num_tensors))
        assert res.total_bytes == 2 * n_params, (res.total_bytes, n_params)
        shutil.rmtree(out, ignore_errors=True)
    torch.set_num_threads(threads0)
    G.record(request.node.nodeid, params=n_params, build_s=round(build_s, 2), experts=G.experts_type(model),
             runs=runs, seconds=runs[-1]["wall"], gb_per_s=runs[-1]["gb_per_s"], gb=runs[-1]["gb"],
             plan_s=round(plan_s, 3), plan_and_name_check_s=round(plan_check_s, 3), produce_tensors_s=round(produce_s, 3),
             produce_gb=round(produced / 1e9, 3), baseline_d2h_gb_per_s=round(d2h_gbps, 2), baseline_write_fsync_gb_per_s=round(write_gbps, 2),
             device=torch.cuda.get_device_name(0), note=note)
    del model
    torch.cuda.empty_cache()
