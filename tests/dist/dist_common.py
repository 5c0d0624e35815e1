"""Shared by the torchrun-launched test programs (tests/dist/run_layouts.py, failures.py), the pytest launcher
(tests/test_distributed.py) and bench/export_scaling.py.

* the tiny model specs every layout is built from (one world-size-1 reference each);
* Megatron parallel state with the knobs ``init_single_process`` lacks (virtual pipeline,
  expert-tensor parallel) and a collective timeout, so a hung collective fails;
* building this rank's model chunks and loading the reference weights into them, sliced
  the way Megatron lays them out (TP/ETP split, gated fc1 as [gate_r; up_r], experts by EP
  rank, layers by global layer number);
* a forward pass through the parallel model (manual pipeline over send/recv) whose logits
  are gathered on every rank;
* :class:`AllocTracker`: counts the bytes of every tensor storage allocated while it is
  active and still alive (a conservative peak), to prove the exporter never holds the model.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nemo_export_hooks.testing.cpu import TinySpec, apply_cpu_shims, transformer_config  # noqa: E402

ATOL = 1e-4

# One reference per model.  Sizes divide every layout below: 4 layers (PP2 x VPP2), 4 heads
# in 2 query groups (TP2), 4 experts (EP4), 128 vocab, 12 tokens (sequence parallel TP2).
SPECS: dict[str, tuple[str, TinySpec]] = {
    # qwen3_moe with a first dense layer: dense GLU, experts and router in one model
    "moe": ("qwen3_moe", TinySpec(num_layers=4, moe_layer_freq=[0, 1, 1, 1])),
    # qwen3 dense with tied embeddings: the shared weight must be exported exactly once
    "dense_tied": ("qwen3", TinySpec(num_layers=4, num_experts=None, tie_embeddings=True)),
    # llama: untied output layer, GQA 8 heads / 2 groups
    "llama": ("llama", TinySpec(num_layers=4, num_experts=None, qk_layernorm=False, num_attention_heads=8, num_query_groups=2, kv_channels=8)),
}


def tokens_for(vocab: int, batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


@dataclass
class Layout:
    name: str
    model: str = "moe"
    tp: int = 1
    ep: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    etp: Optional[int] = None
    experts: str = "sequential"  # sequential | te_grouped | legacy_grouped
    world: int = 2
    max_shard_size: str = "64KB"

    # Sequence parallel stays off: Megatron's torch norms (the CPU, non-TE spec) refuse it,
    # and it changes no weight layout (MoE with TP and EP wants it only for training).
    sequence_parallel = False

    def to_json(self) -> dict:
        return asdict(self)


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def init_parallel(tp=1, ep=1, pp=1, vpp=None, etp=None, seed=1234, timeout_s: Optional[int] = None) -> None:
    """gloo + Megatron parallel state (re-initialised on every call)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    apply_cpu_shims()
    _patch_megatron_warnings()
    if not dist.is_initialized():
        t = timeout_s or int(os.environ.get("NEH_DIST_TIMEOUT_S", "120"))
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=t))
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        create_gloo_process_groups=False,
    )
    torch.manual_seed(seed)
    mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def _patch_megatron_warnings() -> None:
    """megatron-core 0.15.3's model_parallel_config.py calls ``warnings.warn`` for TP x EP
    without sequence parallel but never imports ``warnings`` (a NameError)."""
    import warnings

    from megatron.core import model_parallel_config as mpc

    if not hasattr(mpc, "warnings"):
        mpc.warnings = warnings


def config_overrides(layout: Layout) -> dict:
    kw = dict(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        sequence_parallel=layout.sequence_parallel,
    )
    if layout.vpp:
        kw["virtual_pipeline_model_parallel_size"] = layout.vpp
    if layout.etp:
        kw["expert_tensor_parallel_size"] = layout.etp
    if layout.pp > 1:
        kw["pipeline_dtype"] = torch.float32
    return kw


class _CudaIsCpu:
    """Megatron's tied-embedding setup for PP>1 moves the weight to CUDA to all-reduce it
    across the embedding group; on CPU that call is made a no-op (gloo reduces on CPU)."""

    def __enter__(self):
        self._orig = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *a, **k: t
        return self

    def __exit__(self, *exc):
        torch.Tensor.cuda = self._orig


def build_chunks(model_key: str, layout: Layout, seed: int = 1234) -> list:
    """This rank's model chunks (one per virtual stage) for ``layout``."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec

    _, spec = SPECS[model_key]
    cfg = transformer_config(spec, **config_overrides(layout))
    chunks = []
    for vp in range(layout.vpp or 1):
        vp_stage = vp if layout.vpp else None
        torch.manual_seed(seed)
        if spec.num_experts and spec.moe_layer_freq != 1:
            layer_spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization=spec.normalization, vp_stage=vp_stage)
        else:
            layer_spec = get_gpt_layer_local_spec(num_experts=spec.num_experts, moe_grouped_gemm=False, qk_layernorm=spec.qk_layernorm, normalization=spec.normalization)
        kw = {"vp_stage": vp_stage} if vp_stage is not None else {}
        with _CudaIsCpu():
            m = GPTModel(
                config=cfg,
                transformer_layer_spec=layer_spec,
                vocab_size=spec.vocab_size,
                max_sequence_length=spec.max_seq_len,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                share_embeddings_and_output_weights=spec.tie_embeddings,
                position_embedding_type="rope",
                rotary_base=spec.rotary_base,
                **kw,
            )
        chunks.append(m)
    return chunks


# -- reference weights -> this rank's slices -------------------------------------------------
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def reference_name(chunk, name: str) -> str:
    """Megatron name in this chunk -> name in the world-size-1 model (global ids)."""
    m = _LAYER.match(name)
    if m:
        layer = chunk.decoder.layers[int(m.group(1))]
        name = f"decoder.layers.{layer.layer_number - 1}." + name[m.end():]
        e = _EXPERT.search(name)
        if e:
            g = layer.mlp.local_expert_indices[int(e.group(1))]  # Megatron's own numbering
            name = name[: e.start()] + f".local_experts.{g}." + name[e.end():]
    if name == "output_layer.weight" and chunk.share_embeddings_and_output_weights:
        name = "embedding.word_embeddings.weight"
    return name


def _slice(full: torch.Tensor, local: torch.Tensor, name: str, gated: bool) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if full.shape == local.shape:
        return full
    if not getattr(local, "tensor_model_parallel", False):
        raise AssertionError(f"{name}: {tuple(full.shape)} vs local {tuple(local.shape)} but not TP-split")
    dim = local.partition_dim
    expert = ".experts." in name
    size = ps.get_expert_tensor_parallel_world_size() if expert else ps.get_tensor_model_parallel_world_size()
    r = ps.get_expert_tensor_parallel_rank() if expert else ps.get_tensor_model_parallel_rank()
    if gated and dim == 0 and "linear_fc1" in name:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[r], up.chunk(size, dim=0)[r]], dim=0)
    return full.chunk(size, dim=dim)[r]


def load_reference(chunks: list, ref_file: Path) -> None:
    """Copy the world-size-1 weights (a safetensors file of Megatron names) into this
    rank's chunks; every local tensor must be covered."""
    from safetensors import safe_open

    with safe_open(str(ref_file), "pt") as f, torch.no_grad():
        keys = set(f.keys())
        for chunk in chunks:
            gated = bool(chunk.config.gated_linear_unit)
            for name, t in list(chunk.named_parameters()) + [(n, b) for n, b in chunk.named_buffers() if n.endswith("expert_bias")]:
                ref = reference_name(chunk, name)
                if ref not in keys:
                    raise KeyError(f"{name} (reference {ref}) not in {ref_file}")
                full = f.get_tensor(ref)
                t.copy_(_slice(full, t, name, gated))


def save_reference_state(model, path: Path) -> None:
    from safetensors.torch import save_file

    state = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    state.update({n: b.detach().contiguous() for n, b in model.named_buffers() if n.endswith("expert_bias")})
    save_file(state, str(path))


# -- parallel forward -----------------------------------------------------------------------
def parallel_logits(chunks: list, tokens: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Forward the parallel model; the full [b, s, vocab] float32 logits on every rank.

    Pipeline stages are run in order with point-to-point send/recv of the hidden states
    (virtual stage v of pipeline rank p is global stage v*pp + p)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    apply_cpu_shims()
    b, s = tokens.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    pp, pp_rank = layout.pp, ps.get_pipeline_model_parallel_rank()
    pp_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()) if pp > 1 else [dist.get_rank()]
    tp_size = ps.get_tensor_model_parallel_world_size()
    h = chunks[0].config.hidden_size
    hidden_shape = (s // tp_size if layout.sequence_parallel else s, b, h)
    nstages = pp * (layout.vpp or 1)
    out = None
    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        for stage in range(nstages):
            v, p = divmod(stage, pp)
            if p != pp_rank:
                continue
            chunk = chunks[v]
            if stage > 0:
                buf = torch.empty(hidden_shape)
                dist.recv(buf, src=pp_ranks[(p - 1) % pp])
                chunk.set_input_tensor(buf)
            y = chunk(input_ids=tokens if stage == 0 else None, position_ids=pos, attention_mask=mask)
            if stage < nstages - 1:
                dist.send(y.contiguous(), dst=pp_ranks[(p + 1) % pp])
            else:
                out = y
    # logits live on the last pipeline rank, vocab-split across its TP group
    vocab = int(chunks[0].vocab_size)
    full = torch.empty(b, s, vocab)
    if out is not None:
        out = out.float().contiguous()
        if tp_size > 1:
            parts = [torch.empty_like(out) for _ in range(tp_size)]
            dist.all_gather(parts, out, group=ps.get_tensor_model_parallel_group())
            out = torch.cat(parts, dim=-1)
        full.copy_(out)
    if pp > 1:  # every rank of the last stage holds the result: broadcast from one of them
        dist.broadcast(full, src=min(_all_last_stage_ranks()))
    return full


def _all_last_stage_ranks() -> list[int]:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    flag = torch.tensor([1 if ps.is_pipeline_last_stage() else 0])
    flags = [torch.zeros(1, dtype=flag.dtype) for _ in range(dist.get_world_size())]
    dist.all_gather(flags, flag)
    return [i for i, f in enumerate(flags) if f.item()]


# -- memory accounting ---------------------------------------------------------------------
class AllocTracker:
    """Count every tensor storage allocated while active (through PyTorch's dispatcher,
    so views, gathers, casts and copies are all seen) that is not one of ``exclude``'s
    storages (the model's own weights); ``peak`` is the most bytes alive at once.

    Frees are noticed at the next dispatched op (a storage is alive while any tensor
    references it), so ``peak`` can only over-estimate."""

    def __init__(self, exclude=()):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode

        self._ref = StorageWeakRef
        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._sweep()
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker._note(t)
                return out

        self._mode = _Mode()
        self._external = {t.untyped_storage().data_ptr() for t in exclude if t.numel()}
        self._live: dict[int, tuple] = {}
        self.current = 0
        self.peak = 0
        self.total = 0

    def _note(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        s = t.untyped_storage()
        ptr, n = s.data_ptr(), s.nbytes()
        if n == 0 or ptr in self._external:
            return
        known = self._live.get(ptr)
        if known is not None and not known[0].expired():
            return
        self._live[ptr] = (self._ref(s), n)
        self.current += n
        self.total += n
        self.peak = max(self.peak, self.current)

    def _sweep(self) -> None:
        dead = [p for p, (ref, _) in self._live.items() if ref.expired()]
        for p in dead:
            self.current -= self._live.pop(p)[1]

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self._sweep()


def model_tensors(chunks) -> list[torch.Tensor]:
    out = []
    for c in chunks:
        out += [p for _, p in c.named_parameters()]
        out += [b for _, b in c.named_buffers()]
    return out


def local_bytes(chunks) -> int:
    seen, n = set(), 0
    for t in model_tensors(chunks):
        p = t.untyped_storage().data_ptr()
        if p not in seen:
            seen.add(p)
            n += t.untyped_storage().nbytes()
    return n


def tensors_differing(ref_hf: Path, out: Path) -> list[str]:
    """HF names only one of the two exports holds, or whose tensors are not equal."""
    from safetensors import safe_open

    ref_idx = json.loads((ref_hf / "model.safetensors.index.json").read_text())["weight_map"]
    idx = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    diff = []
    for key in sorted(set(ref_idx) | set(idx)):
        if key not in ref_idx or key not in idx:
            diff.append(key)
            continue
        with safe_open(str(ref_hf / ref_idx[key]), "pt") as f, safe_open(str(out / idx[key]), "pt") as g:
            if not torch.equal(f.get_tensor(key), g.get_tensor(key)):
                diff.append(key)
    return diff


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


# -- layouts ---------------------------------------------------------------------------------
LAYOUTS: dict[str, Layout] = {
    l.name: l
    for l in [
        # world size 2
        Layout("tp2", tp=2),
        Layout("ep2", ep=2),
        Layout("ep2_te_grouped", ep=2, experts="te_grouped"),
        Layout("pp2", pp=2),
        Layout("pp2_vpp2", pp=2, vpp=2),
        Layout("tp2_dense_tied", model="dense_tied", tp=2),
        Layout("pp2_dense_tied", model="dense_tied", pp=2),
        # world size 4
        Layout("tp2_ep2", tp=2, ep=2, world=4),
        Layout("ep4", ep=4, world=4),
        Layout("tp2_ep2_etp1", tp=2, ep=2, etp=1, world=4),
        Layout("ep2_etp2", ep=2, etp=2, world=4),
        Layout("ep2_pp2_legacy_grouped", ep=2, pp=2, experts="legacy_grouped", world=4),
        Layout("tp2_ep2_legacy_grouped", tp=2, ep=2, experts="legacy_grouped", world=4),
        Layout("tp2_ep2_te_grouped", tp=2, ep=2, experts="te_grouped", world=4),
        Layout("tp2_pp2_llama", model="llama", tp=2, pp=2, world=4),
    ]
}


def make_reference(model_key: str, out: Path) -> Path:
    """World-size-1 reference for ``model_key`` (call with Megatron initialised at world size 1):
    ``megatron.safetensors`` (Megatron names), ``hf/`` (its export, float32) and
    ``logits.safetensors`` (the Megatron forward on :func:`tokens_for`)."""
    from safetensors.torch import save_file

    from nemo_export_hooks import export_to_hf
    from nemo_export_hooks.testing.cpu import build_gpt, megatron_logits

    arch, spec = SPECS[model_key]
    out = Path(out) / model_key
    out.mkdir(parents=True, exist_ok=True)
    model = build_gpt(spec)
    save_reference_state(model, out / "megatron.safetensors")
    tokens = tokens_for(spec.vocab_size)
    save_file({"tokens": tokens, "logits": megatron_logits(model, tokens)}, str(out / "logits.safetensors"))
    export_to_hf(model, out / "hf", arch=arch, dtype=torch.float32, max_shard_size="64KB")
    return out
