"""NemotronH on the real Transformer Engine spec, for the GPU tests (issue 26): Megatron-Core's
hybrid ``MambaModel`` built from megatron-core's own ``mamba_stack_spec``
(``models/mamba/mamba_layer_specs.py``: ``MambaMixer`` with ``TELayerNormColumnParallelLinear``
in_proj, TE attention, MoE layers with ``TEGroupedMLP`` experts, ``TENorm``), with the layer
pattern of NVIDIA-Nemotron-3-Nano at a tiny size.

Shared by ``test_gpu_nemotron_h.py`` (pytest) and ``vllm_nemotron_h_smoke.py`` (the vLLM step reads
the export list the pytest run writes).  Imported only after the callers checked that CUDA, TE,
megatron-core and mamba_ssm's Triton kernels are importable -- except :data:`NANO_PATTERN`,
:func:`tiny_pattern`, :func:`nano_spec` and :func:`mamba_kernels_problem`, which are plain Python
(checked on CPU by ``tests/test_gpu_nemotron_h_cpu.py``).

Why these settings:
* ``use_mamba_mem_eff_path=False``: the memory-efficient path
  (``mamba_split_conv1d_scan_combined``) needs causal_conv1d's CUDA extension; the other path
  (``_ssm_prefill``) runs the short conv as the mixer's own ``nn.Conv1d`` when ``causal_conv1d``
  is missing and the chunked scan in Triton (``mamba_chunk_scan_combined``, with backward), so
  only the pure-Python mamba-ssm wheel of ``scripts/mamba_gpu`` is needed.
* Squared-ReLU non-gated experts and MLPs, sigmoid router with expert bias and top-k scaling,
  shared experts, no rotary embedding, RMSNorm eps 1e-5: NemotronH (see
  ``nemo_export_hooks/exporter/rules/nemotron_h.py``).
* Sizes: every dim a multiple of 128 where vLLM's FP8 / FP4 MoE kernels want it (hidden 256,
  expert 256, shared expert 512); attention head dim 64, Mamba head dim 64 and state 128 as
  Nemotron-3 Nano.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

# Megatron-Bridge ``Nemotron3NanoProvider.hybrid_layer_pattern`` (NVIDIA-Nemotron-3-Nano-30B-A3B's
# ``hybrid_override_pattern``): 52 layers, 23 Mamba-2 (M), 23 MoE (E), 6 attention (*).
NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
EXPORTS_DIR = Path(os.environ.get("NEMOTRON_H_EXPORTS", "/tmp/nemotron_h_exports"))
EXPORTS_LIST = EXPORTS_DIR / "exports.json"


def tiny_pattern(n: int | None = None) -> str:
    """The first ``n`` layers of the Nano pattern (default 14, ``MEMEM*EMEMEM*E``: both of its
    repeating units, 6 Mamba, 6 MoE, 2 attention layers); ``NEMOTRON_H_LAYERS=52`` gives the full
    pattern."""
    n = int(os.environ.get("NEMOTRON_H_LAYERS", "14")) if n is None else n
    if not 1 <= n <= len(NANO_PATTERN):
        raise ValueError(f"NemotronH layers must be 1..{len(NANO_PATTERN)}, got {n}")
    return NANO_PATTERN[:n]


def nano_spec(pattern: str, **kw):
    """The tiny Nemotron-3-Nano-shaped ``TinySpec`` (routing as Nano: sigmoid, expert bias,
    scaling 2.5; 8 experts top-2 instead of 128 top-6)."""
    from nemo_export_hooks.testing.hybrid import nemotron_h_spec

    extra = dict(mamba_state_dim=128, mamba_head_dim=64, mamba_num_groups=2, mamba_num_heads=8,
                 use_mamba_mem_eff_path=False, init_method_std=0.02)
    extra.update(kw.pop("extra", {}))
    base = dict(hidden_size=256, num_attention_heads=8, num_query_groups=2, kv_channels=64, ffn_hidden_size=512,
                vocab_size=1024, max_seq_len=256, num_experts=8, moe_ffn_hidden_size=256, moe_router_topk=2,
                moe_shared_expert_intermediate_size=512, moe_router_topk_scaling_factor=2.5, extra=extra)
    base.update(kw)
    return nemotron_h_spec(pattern, **base)


def mamba_kernels_problem() -> str | None:
    """Why megatron-core's ``MambaMixer`` cannot run here, or None."""
    for mod in ("mamba_ssm.ops.triton.ssd_combined", "mamba_ssm.ops.triton.layernorm_gated"):
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 - the reason is the message
            return (f"{mod} not importable ({type(e).__name__}: {str(e)[:160]}); stage it with "
                    "scripts/mamba_gpu/stage.sh + device_setup.sh")
    try:
        mm = importlib.import_module("megatron.core.ssm.mamba_mixer")
    except Exception as e:  # noqa: BLE001
        return f"megatron.core.ssm.mamba_mixer not importable ({type(e).__name__}: {str(e)[:160]})"
    if not getattr(mm, "HAVE_MAMBA_SSM", False):
        return "megatron-core's mamba_mixer did not find mamba_ssm (HAVE_MAMBA_SSM=False)"
    if not getattr(mm, "HAVE_EINOPS", False):
        return "megatron-core's mamba_mixer did not find einops"
    return None


def build_te_nemotron_h(spec, pattern: str, dtype=None, seed: int = 1234, randomise: bool = True):
    """A real Megatron-Core ``MambaModel`` on CUDA from megatron-core's TE ``mamba_stack_spec``.
    Norms, the Mamba ``A_log`` / ``D`` / ``dt_bias`` / conv bias and the routers' expert bias
    get distinct values (a swapped or dropped tensor then shows in the logits).  Parallel state
    must be initialised (``gpu_common.init_mcore_gpu``)."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.models.mamba import MambaModel
    from megatron.core.models.mamba.mamba_layer_specs import mamba_stack_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    import gpu_common as G
    from nemo_export_hooks.testing.cpu import transformer_config

    dtype = dtype or torch.float32
    overrides = dict(
        num_layers=len(pattern),
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
        sequence_parallel=False,
        use_cpu_initialization=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        gradient_accumulation_fusion=False,
        moe_grouped_gemm=True,
        moe_token_dispatcher_type="alltoall",
        moe_permute_fusion=False,
    )
    cfg = transformer_config(spec, **overrides)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    model = MambaModel(
        config=cfg,
        mamba_stack_spec=mamba_stack_spec,
        vocab_size=spec.vocab_size,
        max_sequence_length=spec.max_seq_len,
        hybrid_override_pattern=pattern,
        share_embeddings_and_output_weights=spec.tie_embeddings,
        position_embedding_type="none",
    ).cuda()
    if randomise:
        G.randomise_norms_(model, seed)
        g = torch.Generator(device="cuda").manual_seed(seed + 11)
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name.endswith("expert_bias"):
                    b.copy_(0.1 * torch.randn(b.shape, generator=g, device=b.device, dtype=torch.float32).to(b.dtype))
    return model


def layer_kinds(model) -> dict[str, list[str]]:
    """Per pattern symbol, the module types that hold its weights (proves the TE spec was built:
    ``MambaMixer`` with ``TELayerNormColumnParallelLinear`` in_proj, ``TEGroupedMLP`` experts)."""
    out: dict[str, set] = {}
    for layer in model.decoder.layers:
        mixer = getattr(layer, "mixer", None)
        mlp = getattr(layer, "mlp", None)
        attn = getattr(layer, "self_attention", None)
        if mixer is not None:
            out.setdefault("M", set()).add(f"{type(mixer).__name__}/{type(mixer.in_proj).__name__}")
        elif mlp is not None and hasattr(mlp, "experts"):
            out.setdefault("E", set()).add(f"{type(mlp.experts).__name__}/{type(layer.pre_mlp_layernorm).__name__}")
        elif attn is not None:
            out.setdefault("*", set()).add(f"{type(attn).__name__}/{type(attn.linear_qkv).__name__}")
    return {k: sorted(v) for k, v in out.items()}


def expert_layers(pattern: str) -> list[int]:
    return [i for i, t in enumerate(pattern) if t == "E"]


def task_perm(vocab: int):
    """The permutation ``gpu_common.train_permutation_task(seed=0)`` trains (next token = P[token]):
    its generator's first draw."""
    import torch

    return torch.randperm(vocab, generator=torch.Generator().manual_seed(0))


def save_reference(path: Path, ids, logprobs, source: str) -> Path:
    """The token ids, float32 reference log-probs ([batch, seq, vocab]) and the trained task's
    permutation that a vLLM step compares with, beside (not inside) the export directory:
    ``<dir>.vllm_reference.safetensors`` (vLLM would read any ``*.safetensors`` inside it as
    weights, and the export's manifest lists what the directory holds)."""
    from safetensors.torch import save_file

    ref = path.parent / f"{path.name}.vllm_reference.safetensors"
    save_file({"ids": ids.detach().cpu().contiguous(), "logprobs": logprobs.detach().float().cpu().contiguous(),
               "perm": task_perm(logprobs.shape[-1]).contiguous()},
              str(ref), metadata={"source": source})
    return ref


def record_export(fmt: str, path: Path, ref: Path, **info) -> None:
    """Add one export to :data:`EXPORTS_LIST` (bf16 / fp8 / nvfp4 -> dir, reference, metadata)."""
    EXPORTS_LIST.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(EXPORTS_LIST.read_text()) if EXPORTS_LIST.exists() else {}
    data[fmt] = dict(path=str(path), reference=str(ref), **info)
    tmp = EXPORTS_LIST.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(EXPORTS_LIST)
