"""Find the Megatron-Core model chunks inside whatever the trainer hands us, and describe
what this rank holds of them.

Training code wraps a ``GPTModel`` in layers of its own: DDP, ``Float16Module``, NeMo's
``MegatronParallel`` (a list of virtual-pipeline chunks), a LightningModule whose ``module``
is the model.  The exporter only ever needs the Megatron-Core model chunks, so unwrapping is
done here, once, by structure (attribute names), without importing any of those wrappers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

_MODEL_CLASS_NAMES = {"GPTModel", "MambaModel", "HybridModel", "MCoreGPTModel", "MCoreMambaModel"}


def _looks_like_mcore_model(m) -> bool:
    """A Megatron-Core language model: has a ``decoder`` block and a ``config``."""
    if not isinstance(m, torch.nn.Module):
        return False
    if type(m).__name__ in _MODEL_CLASS_NAMES:
        return True
    return hasattr(m, "decoder") and hasattr(m, "config") and hasattr(m.decoder, "layers")


def unwrap_model(model) -> list[torch.nn.Module]:
    """Return the Megatron-Core model chunks (one per virtual pipeline stage), in order.

    Accepts a model, a list/tuple/ModuleList of chunks, or any wrapper that exposes the
    model as ``.module`` (DDP, Float16Module, NeMo's MCore wrappers, LightningModules).
    """
    if isinstance(model, (list, tuple)) or type(model).__name__ in {"ModuleList", "MegatronParallel"}:
        chunks: list[torch.nn.Module] = []
        for item in model:
            chunks.extend(unwrap_model(item))
        if not chunks:
            raise ValueError("no Megatron-Core model chunks found in an empty model list")
        return chunks
    seen = 0
    m = model
    while not _looks_like_mcore_model(m):
        inner = getattr(m, "module", None)
        if inner is None or seen > 16:
            raise TypeError(
                f"cannot find a Megatron-Core GPTModel inside {type(model).__name__}: expected a "
                "GPTModel, a list of chunks, or a wrapper exposing it as `.module`"
            )
        if isinstance(inner, (list, tuple, torch.nn.ModuleList)):
            return unwrap_model(inner)
        m = inner
        seen += 1
    return [m]


@dataclass
class LayerRef:
    """One transformer layer of this rank, with its global (0-based) index."""

    index: int
    module: torch.nn.Module


def iter_layers(chunks: list[torch.nn.Module]) -> Iterator[LayerRef]:
    """Yield this rank's layers with global indices.

    Megatron-Core numbers layers globally (``layer.layer_number`` is 1-based and already
    includes the pipeline-stage and virtual-chunk offset), so no offset arithmetic is
    repeated here.
    """
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            yield LayerRef(index=int(layer.layer_number) - 1, module=layer)


@dataclass(frozen=True)
class ModelAttrs:
    """Model-level facts that ``TransformerConfig`` lacks, read from the model chunk.

    Typed fields; ``attrs["name"]`` still works (rules written against the earlier dict)."""

    vocab_size: int
    max_sequence_length: int
    rotary_base: float
    rotary_percent: float
    position_embedding_type: str
    tie_word_embeddings: bool
    rope_scaling: bool  # GPTModel's rotary_scaling (Llama-3.1 style); not exported
    mamba: Optional[dict]  # mamba_dims(), None without Mamba layers

    def __getitem__(self, key: str):
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default=None):
        return getattr(self, key, default) if key in self.__dataclass_fields__ else default


def model_attrs(chunks: list[torch.nn.Module]) -> ModelAttrs:
    """Model-level attributes that ``TransformerConfig`` lacks (vocab, rotary base...)."""
    first = chunks[0]
    rotary_base, rotary_percent = rotary_attrs(first)
    return ModelAttrs(
        vocab_size=int(getattr(first, "vocab_size")),
        max_sequence_length=int(getattr(first, "max_sequence_length", 4096)),
        rotary_base=rotary_base,
        rotary_percent=rotary_percent,
        position_embedding_type=getattr(first, "position_embedding_type", "rope"),
        tie_word_embeddings=bool(getattr(first, "share_embeddings_and_output_weights", False)),
        rope_scaling=bool(getattr(first, "rotary_scaling", False)),
        mamba=mamba_dims(chunks),
    )


def rotary_attrs(model: torch.nn.Module) -> tuple[float, float]:
    """``(rotary_base, rotary_percent)`` of a model chunk.

    ``GPTModel`` keeps both as attributes.  megatron-core 0.19's ``HybridModel`` keeps neither:
    they are recovered from its ``rotary_pos_emb.inv_freq`` (``base ** -(2k/dim)``, ``dim =
    kv_channels * rotary_percent``), from the last frequency (the least amplified error), then
    the nearest integer base (``HybridModel`` takes an int) if it reproduces Megatron's float32
    frequencies exactly.  A model without rotary embeddings gets Megatron's defaults."""
    base = getattr(model, "rotary_base", None)
    if base is not None:
        return float(base), float(getattr(model, "rotary_percent", 1.0))
    inv = getattr(getattr(model, "rotary_pos_emb", None), "inv_freq", None)
    if not isinstance(inv, torch.Tensor) or inv.numel() == 0:
        return 10000.0, float(getattr(model, "rotary_percent", 1.0))
    inv = inv.detach().float().cpu()
    dim = 2 * inv.numel()
    kv = model.config.kv_channels or model.config.hidden_size // model.config.num_attention_heads
    if inv.numel() == 1:
        # two rotary dims: the one frequency is base ** 0 == 1 whatever the base, so any base
        # computes the same; the fraction is still 2 / kv (not 1.0: found by the config fuzzer)
        return 10000.0, dim / kv
    est = float(inv[-1].double() ** (-dim / (dim - 2)))
    for cand in (float(round(est)), est):
        again = 1.0 / (cand ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        if torch.allclose(again, inv, rtol=1e-6, atol=0.0):
            return cand, dim / kv
    return est, dim / kv


def hybrid_layer_types(chunks: list[torch.nn.Module]) -> Optional[list[str]]:
    """The type of every global layer of a hybrid ``MambaModel`` / ``HybridModel`` (``"M"``
    Mamba, ``"*"`` attention, ``"-"`` MLP, ``"E"`` MoE, ...), or None for a model without a
    hybrid stack.

    Read from the model's ``hybrid_layer_pattern`` (0.19) or ``hybrid_override_pattern``
    (``"|"`` pipeline separators dropped,
    anything after ``"/"`` -- multi-token-prediction layers -- ignored), else recomputed from
    its attention/MLP ratios by Megatron's own allocator: a pipeline stage holds only its
    slice in ``decoder.layer_type_list``."""
    first = chunks[0]
    dec = getattr(first, "decoder", None)
    if dec is None or not hasattr(dec, "layer_type_list"):
        return None
    n = int(first.config.num_layers)
    pattern = (
        getattr(first, "hybrid_layer_pattern", None)  # megatron-core >= 0.19 HybridModel
        or getattr(first, "hybrid_override_pattern", None)
        or getattr(dec, "hybrid_override_pattern", None)
    )
    if pattern:
        types = [c for c in str(pattern).split("/")[0] if c != "|"]
    elif len(chunks) == 1 and len(dec.layer_type_list) == n:
        types = list(dec.layer_type_list)
    else:
        from megatron.core.ssm.mamba_hybrid_layer_allocation import allocate_layers

        types = list(allocate_layers(n, dec.hybrid_attention_ratio, dec.hybrid_mlp_ratio, None))
    if len(types) != n:
        raise ValueError(f"hybrid layer pattern {pattern!r} has {len(types)} layers, the model {n}")
    return types


def mamba_dims(chunks: list[torch.nn.Module]) -> Optional[dict]:
    """Shape of the model's Mamba mixers, read from the first ``MambaMixer`` this rank holds
    (by structure); ranks without one derive it from ``TransformerConfig`` and the mixer's
    defaults (``"from_config": True``).  None for a model without Mamba layers."""
    types = hybrid_layer_types(chunks)
    if not types or "M" not in types:
        return None
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            m = getattr(layer, "mixer", None)
            conv_w, conv_b = _mamba_conv(m)
            if m is not None and hasattr(m, "A_log") and conv_w is not None:
                norm = getattr(m, "norm", None)
                return {
                    "nheads": int(m.nheads),
                    "headdim": int(m.headdim),
                    "ngroups": int(m.ngroups),
                    "d_state": int(m.d_state),
                    "d_inner": int(m.d_inner),
                    "d_conv": int(m.d_conv),
                    "chunk_size": int(getattr(m, "chunk_size", 128)),
                    "conv_bias": conv_b is not None,
                    "rmsnorm": bool(getattr(m, "rmsnorm", True)),
                    "norm_before_gate": bool(getattr(m, "norm_before_gate", False)),
                    "D_has_hdim": bool(getattr(m, "D_has_hdim", False)),
                    "norm_eps": float(getattr(norm, "eps", 1e-5)) if norm is not None else None,
                    "from_config": False,
                }
    c = chunks[0].config
    headdim = int(c.mamba_head_dim)
    nheads = int(c.mamba_num_heads or c.hidden_size * 2 // headdim)
    return {
        "nheads": nheads, "headdim": headdim, "ngroups": int(c.mamba_num_groups), "d_state": int(c.mamba_state_dim),
        "d_inner": nheads * headdim, "d_conv": 4, "chunk_size": 128, "conv_bias": True, "rmsnorm": True,
        "norm_before_gate": False, "D_has_hdim": False, "norm_eps": 1e-5, "from_config": True,
    }


def _mamba_conv(mixer) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """A Mamba mixer's conv weight and bias: an ``nn.Conv1d`` ``conv1d`` (megatron-core <= 0.18)
    or the mixer's own ``conv1d_weight`` / ``conv1d_bias`` parameters (0.19)."""
    if mixer is None:
        return None, None
    conv = getattr(mixer, "conv1d", None)
    if isinstance(conv, torch.nn.Module):
        return conv.weight, conv.bias
    w = getattr(mixer, "conv1d_weight", None)
    return (w, getattr(mixer, "conv1d_bias", None)) if isinstance(w, torch.Tensor) else (None, None)


def final_norm(decoder: torch.nn.Module) -> tuple[Optional[torch.nn.Module], str]:
    """The decoder's final norm and its Megatron name: ``final_layernorm`` (``TransformerBlock``)
    or ``final_norm`` (``MambaStack``)."""
    for name in ("final_layernorm", "final_norm"):
        m = getattr(decoder, name, None)
        if m is not None:
            return m, f"decoder.{name}"
    return None, "decoder.final_layernorm"


def named_tensors(module: torch.nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers, without calling ``state_dict()``.

    ``state_dict()`` would serialise Transformer Engine / ModelOpt extra state (ModelOpt's
    hook calls ``torch.cuda.synchronize()``); the export needs only the tensors themselves.
    Quantizer buffers (``*_quantizer.*``) are read separately by the quant module.
    """
    for name, p in module.named_parameters(prefix=prefix):
        yield name, p
    for mod_name, mod in module.named_modules(prefix=prefix):
        non_persistent = getattr(mod, "_non_persistent_buffers_set", set())
        for bname, buf in mod.named_buffers(recurse=False):
            if buf is None or bname in non_persistent:
                continue
            full = f"{mod_name}.{bname}" if mod_name else bname
            if "_quantizer" in full:
                continue
            yield full, buf
