"""Shared helpers for the GPU tests (tests/gpu): Megatron-Core models built with the real
Transformer Engine spec (experts are ``TEGroupedMLP``), the Megatron forward on CUDA, loading
an export into ``transformers`` on the GPU, and the results file that
``scripts/gpu_suite.sh`` turns into its closing table.

Imported only after the test modules have checked that CUDA, Transformer Engine and
megatron-core are importable (they skip otherwise), so CPU CI never imports TE here.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

RESULTS = Path(os.environ.get("GPU_RESULTS", "/tmp/nemo_export_hooks_gpu_results.jsonl"))
ARTIFACTS = Path(os.environ.get("GPU_ARTIFACTS", "/tmp/nemo_export_hooks_gpu_artifacts"))


def record(test: str, **fields: Any) -> None:
    """Append one result line (test id + metrics) for the closing table."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    row = {"test": test, "time": time.time(), **fields}
    with RESULTS.open("a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    print("GPU-RESULT", json.dumps(row, default=str))


def artifact(name: str, text: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    p = ARTIFACTS / name
    with p.open("a") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    return p


# -- process setup -------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_mcore_gpu(seed: int = 1234, tp: int = 1, ep: int = 1, etp: Optional[int] = None) -> None:
    """torch.distributed (NCCL; world size 1 unless launched by torchrun) + Megatron parallel
    state + Megatron's CUDA RNG tracker.  Idempotent for the same layout."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        if "RANK" in os.environ:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl")
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            torch.cuda.set_device(0)
            dist.init_process_group("nccl", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        kw = dict(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
        if etp is not None:
            kw["expert_tensor_parallel_size"] = etp
        parallel_state.initialize_model_parallel(**kw)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


# -- model builders --------------------------------------------------------------------------
def tiny_spec(arch: str, **kw):
    """A TinySpec (shared with the CPU tests) sized for one GPU test."""
    from nemo_export_hooks.testing.cpu import TinySpec

    base = dict(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, kv_channels=32,
                ffn_hidden_size=256, vocab_size=256, max_seq_len=128, num_experts=4, moe_ffn_hidden_size=64,
                moe_router_topk=2)
    if arch == "mixtral":
        base.update(qk_layernorm=False, rotary_base=10000.0)
    elif arch == "qwen3_moe":
        base.update(qk_layernorm=True, rotary_base=1_000_000.0)
    elif arch == "qwen3":
        base.update(qk_layernorm=True, num_experts=None, moe_ffn_hidden_size=None)
    elif arch == "llama":
        base.update(qk_layernorm=False, num_experts=None, moe_ffn_hidden_size=None, rotary_base=10000.0)
    base.update(kw)
    return TinySpec(**base)


def build_te_gpt(spec, dtype: torch.dtype = torch.float32, seed: int = 1234, randomise_norms: bool = True,
                 grouped: Optional[bool] = None, **config_overrides):
    """A real Megatron-Core GPTModel on CUDA with the Transformer Engine layer spec:
    fused ``linear_qkv.layer_norm_weight``, TE norms, and (for MoE) ``TEGroupedMLP`` experts
    (``linear_fc1.weight0..N-1``), or with ``grouped=False`` ``SequentialMLP`` experts made of
    TE linears (``moe_grouped_gemm=False``).  A spec whose ``moe_layer_freq`` is not 1 is built
    with ``get_gpt_decoder_block_spec`` (dense layers where the pattern says 0); MLA specs
    (``spec.multi_latent_attention``) get TE's MLA layer.  Parallel state must be initialised
    (:func:`init_mcore_gpu`)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from nemo_export_hooks.testing.cpu import transformer_config

    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        init_mcore_gpu(seed)
    overrides = dict(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
        sequence_parallel=False,
        use_cpu_initialization=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        gradient_accumulation_fusion=False,
    )
    grouped = bool(spec.num_experts) if grouped is None else grouped
    if spec.num_experts:
        overrides.update(moe_grouped_gemm=grouped, moe_token_dispatcher_type="alltoall", moe_permute_fusion=False)
    overrides.update(config_overrides)
    cfg = transformer_config(spec, **overrides)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    if spec.num_experts and spec.moe_layer_freq != 1:
        layer_spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=True)
    else:
        layer_spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=spec.num_experts, moe_grouped_gemm=grouped, qk_layernorm=spec.qk_layernorm,
            multi_latent_attention=spec.multi_latent_attention,
        )
    model = GPTModel(
        config=cfg,
        transformer_layer_spec=layer_spec,
        vocab_size=spec.vocab_size,
        max_sequence_length=spec.max_seq_len,
        share_embeddings_and_output_weights=spec.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=spec.rotary_base,
        rotary_percent=spec.rotary_percent,
    ).cuda()
    if randomise_norms:
        randomise_norms_(model, seed)
    return model


def randomise_norms_(model: torch.nn.Module, seed: int) -> None:
    """Norm weights start at 1; give each a distinct value so a swapped or dropped norm shows."""
    g = torch.Generator(device="cuda").manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32).to(p.dtype))


def experts_type(model) -> str:
    for layer in model.decoder.layers:
        ex = getattr(getattr(layer, "mlp", None), "experts", None)
        if ex is not None:
            return type(ex).__name__
    return "dense"


def tokens(vocab: int, batch: int = 4, seq: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).cuda()


def megatron_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Megatron forward (causal mask from the TE attention's mask type) -> float32 logits."""
    b, s = ids.shape
    pos = torch.arange(s, device=ids.device).unsqueeze(0).expand(b, s)
    was_training = model.training
    model.eval()
    with torch.no_grad():  # runtime_gather_output: full-vocab logits under tensor parallelism
        out = model(ids, pos, attention_mask=None, runtime_gather_output=True)
    model.train(was_training)
    return out.float()


def train_permutation_task(model, vocab: int, steps: int = 150, lr: float = 3e-3, seed: int = 0) -> float:
    """A few Adam steps on "next token = P[current token]" so the model's predictions are
    confident (bf16 argmax agreement is then meaningful, not decided by near-ties)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=g).cuda()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    loss_v = float("nan")
    for step in range(steps):
        ids = torch.randint(0, vocab, (16, 32), generator=g).cuda()
        pos = torch.arange(32, device="cuda").unsqueeze(0).expand(16, 32)
        logits = model(ids, pos, attention_mask=None)
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), perm[ids].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_v = loss.item() if step == steps - 1 else loss_v
    model.eval()
    for p in model.parameters():
        p.grad = None
    return loss_v


def copy_weights(src, dst) -> None:
    """Copy parameters (and persistent buffers) by name into a model of another dtype."""
    sp = dict(src.named_parameters())
    with torch.no_grad():
        for n, p in dst.named_parameters():
            p.copy_(sp[n].to(p.dtype))
        sb = dict(src.named_buffers())
        for n, b in dst.named_buffers():
            if n in sb and sb[n] is not None and b is not None and b.shape == sb[n].shape:
                b.copy_(sb[n].to(b.dtype))


# -- export and load -------------------------------------------------------------------------
NAME_CHECK_NOTE = "exporter's HF-name check rejected the names (fallback: check_hf_keys=False)"


def export(model, out, arch: str, dtype: torch.dtype, **kw):
    """``export_to_hf``; if (and only if) its HF-name check is what fails, export again with the
    check off so the numerical comparison still runs, and say so (the dedicated test
    ``test_hf_name_check`` fails on its own)."""
    from nemo_export_hooks import export_to_hf
    from nemo_export_hooks.exporter.api import prepare_export, write_prepared

    try:
        return export_to_hf(model, out, arch=arch, dtype=dtype, **kw), None
    except ValueError as e:
        if "exported names do not match" not in str(e):
            raise
        note = f"{NAME_CHECK_NOTE}: {str(e)[:240]}"
    t0 = time.perf_counter()
    prepared = prepare_export(model, arch, dtype, check_hf_keys=False)
    return write_prepared(prepared, prepared.tensors(), Path(out), t0=t0, **kw), note


def load_hf_gpu(path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
    except TypeError:  # transformers 4.x
        model, info = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=dtype, output_loading_info=True)
    return model.cuda().eval(), info


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def loading_problems(info: dict) -> dict:
    return {k: sorted(map(str, info.get(k) or [])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
            if info.get(k)}


def saved_key_names(hf_model, tmp: Path) -> set[str]:
    """The tensor names transformers' own ``save_pretrained`` writes for this model."""
    from safetensors import safe_open

    hf_model.save_pretrained(str(tmp))
    idx = tmp / "model.safetensors.index.json"
    if idx.exists():
        return set(json.loads(idx.read_text())["weight_map"])
    keys: set[str] = set()
    for f in tmp.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            keys |= set(s.keys())
    return keys


def exported_keys(path: Path) -> set[str]:
    idx = path / "model.safetensors.index.json"
    if idx.exists():
        return set(json.loads(idx.read_text())["weight_map"])
    from safetensors import safe_open

    keys: set[str] = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            keys |= set(s.keys())
    return keys


def read_exported(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def te_name_map(model, arch: str, dtype: torch.dtype, layer: int = 0) -> tuple[list[str], list[str]]:
    """Which Megatron/TE state-dict names of one layer the exporter mapped (and to what), and
    which it left out (TE ``_extra_state`` and the like)."""
    from nemo_export_hooks.exporter.api import prepare_export

    prepared = prepare_export(model, arch, dtype, check_hf_keys=False)
    lines, mapped = [], set()
    tag = f"layer {layer} "
    for j in prepared.plan.jobs:
        if j.source.startswith(tag):
            lines.append(f"{j.source[len(tag):]} -> {', '.join(j.targets)}")
            mapped.add(j.source[len(tag):])
    ignored = []
    prefix = f"decoder.layers.{layer}."
    for k in model.state_dict().keys():
        if k.startswith(prefix):
            local = k[len(prefix):]
            hit = local in mapped or any(local in m for m in mapped)
            if not hit:
                ignored.append(local)
    return lines, ignored
