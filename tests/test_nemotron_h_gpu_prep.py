"""CPU checks of what the NemotronH GPU run (issue 26) uses, so that the device time goes to the
GPU parts: the Nemotron-3-Nano layer pattern and the tiny spec of ``tests/gpu/gpu_nemotron_h.py``
(built here as a real megatron-core ``MambaModel`` from the local CPU stack spec and planned by
the ``nemotron_h`` rule, so a spec the rule rejects fails here, not on the device), the reason
the GPU module skips without mamba_ssm's kernels, and the comparison logic of
``tests/gpu/vllm_nemotron_h_smoke.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

GPU_DIR = Path(__file__).resolve().parent / "gpu"
sys.path.insert(0, str(GPU_DIR))

import gpu_nemotron_h as N  # noqa: E402
import vllm_nemotron_h_smoke as V  # noqa: E402


def test_nano_pattern_and_tiny_prefix(monkeypatch):
    p = N.NANO_PATTERN
    assert (len(p), p.count("M"), p.count("E"), p.count("*")) == (52, 23, 23, 6)
    monkeypatch.delenv("NEMOTRON_H_LAYERS", raising=False)
    assert N.tiny_pattern() == "MEMEM*EMEMEM*E"
    monkeypatch.setenv("NEMOTRON_H_LAYERS", "52")
    assert N.tiny_pattern() == p
    with pytest.raises(ValueError, match="1..52"):
        N.tiny_pattern(53)
    assert N.expert_layers("MEM*E") == [1, 4]


def test_tiny_nano_spec_is_a_valid_nemotron_h(mcore):
    """The GPU test's spec, built on CPU (local modules standing in for TE) with the same
    pattern, passes the ``nemotron_h`` rule's checks and gives the config transformers and
    vLLM will read."""
    pytest.importorskip("megatron.core.models.mamba")
    from megatron.core.ssm.mamba_hybrid_layer_allocation import Symbols

    valid = getattr(Symbols, "VALID", None) or getattr(Symbols, "VALID_LAYERS", ())  # 0.19 renamed it
    if "E" not in valid:
        pytest.skip("MoE layers in hybrid patterns need megatron-core >= 0.16 (make test-next)")
    from nemo_export_hooks.exporter.api import prepare_export
    from nemo_export_hooks.testing.hybrid import build_mamba

    pattern = N.tiny_pattern(14)
    spec = N.nano_spec(pattern)
    assert spec.extra["use_mamba_mem_eff_path"] is False  # the path that needs no causal_conv1d CUDA
    m = build_mamba(spec, pattern)
    prepared = prepare_export(m, "nemotron_h", torch.bfloat16, check_hf_keys=False)
    cfg = prepared.hf_config
    want = dict(model_type="nemotron_h", hidden_size=256, num_hidden_layers=14, mamba_num_heads=8, mamba_head_dim=64,
                n_groups=2, ssm_state_size=128, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
                moe_shared_expert_intermediate_size=512, routed_scaling_factor=2.5, mlp_hidden_act="relu2",
                head_dim=64, num_key_value_heads=2, vocab_size=1024, hybrid_override_pattern=pattern)
    assert {k: cfg.get(k) for k in want} == want
    names = {t for j in prepared.plan.jobs for t in j.targets}
    experts = {n for n in names if ".mixer.experts." in n}
    assert len(experts) == 6 * 8 * 2  # 6 MoE layers x 8 experts x up/down
    assert "backbone.layers.0.mixer.in_proj.weight" in names and "backbone.layers.5.mixer.q_proj.weight" in names


def test_gpu_module_says_why_it_cannot_run():
    """Without mamba_ssm's Triton kernels (this CPU machine has no triton) the GPU module skips
    with the staging scripts in its reason."""
    why = N.mamba_kernels_problem()
    assert why is not None and ("scripts/mamba_gpu" in why or "HAVE_MAMBA_SSM" in why), why


def _fake_prompt_logprobs(ref, ids, shift=0.0, wrong=False):
    out = []
    for b in range(ids.shape[0]):
        entries = [None]
        for i in range(1, ids.shape[1]):
            row = ref[b, i - 1]
            tok = int(ids[b, i])
            best = int(row.argmax()) if not wrong else (int(row.argmax()) + 1) % row.numel()
            entries.append({tok: float(row[tok]) + shift, best: float(row[best]) + shift})
        out.append(entries)
    return out


def test_vllm_comparison_logic():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (2, 9), generator=g)
    ref = torch.log_softmax(3 * torch.randn(2, 9, 32, generator=g), -1)
    same = V.compare(_fake_prompt_logprobs(ref, ids), ids, ref)
    assert same["mean_abs_dlogprob"] == 0 and same["top1_agreement"] == 1 and same["n"] == 16
    off = V.compare(_fake_prompt_logprobs(ref, ids, shift=0.2, wrong=True), ids, ref)
    assert off["mean_abs_dlogprob"] == pytest.approx(0.2, abs=1e-6) and off["top1_agreement"] == 0
    r = dict(off, greedy_follows_task=0.5)
    msgs = V.failures_of("fp8", r)
    assert len(msgs) == 3 and "mean |dlogprob|" in msgs[0] and "top-1" in msgs[1] and "follows" in msgs[2]
    assert V.failures_of("nvfp4", dict(same, greedy_follows_task=1.0)) == []
    assert V.failures_of("bf16", {"error": "Traceback...\nRuntimeError: boom"}) == ["bf16: RuntimeError: boom"]
    perm = torch.randperm(32, generator=g)
    seq = [3]
    for _ in range(5):
        seq.append(int(perm[seq[-1]]))
    assert V.follows([seq], perm) == 1.0 and V.follows([[seq[0], (seq[1] + 1) % 32]], perm) == 0.0
    assert N.task_perm(32).equal(torch.randperm(32, generator=torch.Generator().manual_seed(0)))


def test_vllm_smoke_without_export_list(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["vllm_nemotron_h_smoke.py", "--list", str(tmp_path / "none.json"), "--out", str(tmp_path)])
    assert V.main() == 2
    assert "run tests/gpu/test_gpu_nemotron_h.py first" in capsys.readouterr().out


def test_vllm_smoke_reports_a_failing_child(tmp_path, monkeypatch, capsys):
    """Parent/child orchestration: a format whose child fails (here: no vLLM on this machine, or
    a reference file that is not there) is reported by name with the child's last error line,
    and the results file and the child's log are written; a format missing from the list is
    reported as such."""
    listing = tmp_path / "exports.json"
    listing.write_text('{"bf16": {"path": "%s", "reference": "%s"}}' % (tmp_path / "bf16", tmp_path / "missing.safetensors"))
    monkeypatch.setattr(sys, "argv", ["vllm_nemotron_h_smoke.py", "--list", str(listing), "--out", str(tmp_path / "out"),
                                      "--formats", "bf16,fp8", "--timeout", "120"])
    assert V.main() == 1
    out = capsys.readouterr().out
    fails = [ln for ln in out.splitlines() if ln.startswith("VLLM-NEMOTRON-H-FAILURES")][0]
    assert "bf16: " in fails and ("Error" in fails or "No such file" in fails) and "fp8: not in" in fails, fails
    assert (tmp_path / "out" / "vllm_nemotron_h.json").exists() and (tmp_path / "out" / "vllm_nemotron_h_bf16.log").exists()
