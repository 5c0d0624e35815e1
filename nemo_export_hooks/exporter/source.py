"""Find the Megatron-Core model chunks inside whatever the trainer hands us, and describe
what this rank holds of them.

Training code wraps a ``GPTModel`` in layers of its own: DDP, ``Float16Module``, NeMo's
``MegatronParallel`` (a list of virtual-pipeline chunks), a LightningModule whose ``module``
is the model.  The exporter only ever needs the Megatron-Core model chunks, so unwrapping is
done here, once, by structure (attribute names), without importing any of those wrappers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

_MODEL_CLASS_NAMES = {"GPTModel", "MambaModel", "MCoreGPTModel", "MCoreMambaModel"}


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


def model_attrs(chunks: list[torch.nn.Module]) -> dict:
    """Model-level attributes that ``TransformerConfig`` lacks (vocab, rotary base...)."""
    first = chunks[0]
    return {
        "vocab_size": int(getattr(first, "vocab_size")),
        "max_sequence_length": int(getattr(first, "max_sequence_length", 4096)),
        "rotary_base": float(getattr(first, "rotary_base", 10000)),
        "rotary_percent": float(getattr(first, "rotary_percent", 1.0)),
        "position_embedding_type": getattr(first, "position_embedding_type", "rope"),
        "tie_word_embeddings": bool(getattr(first, "share_embeddings_and_output_weights", False)),
        "rope_scaling": bool(getattr(first, "rotary_scaling", False)),
    }


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
