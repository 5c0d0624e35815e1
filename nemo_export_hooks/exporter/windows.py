"""Sliding-window attention per HF layer, computed the way megatron-core computes it.

Megatron decides per *Megatron* layer: ``is_layer_window_attention(window_size,
window_attn_skip_freq, layer_number)`` (``transformer/utils.py``, the same in megatron-core
0.15.3, 0.16.1 and 0.19.2; ``DotProductAttention`` and ``TEDotProductAttention`` both call
it with their 1-based global ``layer_number``).  An int ``N`` windows every layer whose number
is not a multiple of ``N``, a list holds one 0/1 per Megatron layer, ``None`` windows all.

In a ``HybridModel`` written as a transformer (``*E*E...``) attention sits in Megatron layers
``0, 2, 4, ...`` (numbers ``1, 3, 5, ...``) and HF layer ``k`` is Megatron layers ``2k, 2k+1``:
so ``window_attn_skip_freq=2`` windows *every* HF layer there, and the list ``[1,0,0,0,1,0,0,0]``
windows HF layers 0 and 2.  Rules must read windows from :func:`hf_windows`, never by
applying the frequency to HF layer indices.
"""

from __future__ import annotations

from typing import Optional

from .rules.base import ModelInfo


def _is_windowed(window_size, skip_freq, layer_number: int) -> bool:
    """megatron-core's own ``is_layer_window_attention`` (layer_number 1-based); the copy
    below is used only where megatron-core is not importable (it is the same function)."""
    try:
        from megatron.core.transformer.utils import is_layer_window_attention
    except ImportError:  # pragma: no cover - megatron-core is present wherever a model is
        if not window_size:
            return False
        if skip_freq is None:
            return True
        if isinstance(skip_freq, int):
            return layer_number % skip_freq != 0
        return bool(list(skip_freq)[layer_number - 1])
    freq = list(skip_freq) if isinstance(skip_freq, tuple) else skip_freq
    return bool(is_layer_window_attention(window_size, freq, layer_number))


def attention_layers(info: ModelInfo) -> list[tuple[int, int]]:
    """``(Megatron global layer index, HF layer index)`` of every layer that holds attention:
    every layer of a ``GPTModel``; the ``*`` layers of a hybrid stack."""
    if info.layer_types is None:
        return [(i, i) for i in range(info.num_layers)]
    hf_of = info.hf_layer_of if info.hf_layer_of is not None else list(range(len(info.layer_types)))
    return [(i, hf_of[i]) for i, t in enumerate(info.layer_types) if t == "*"]


def hf_windows(info: ModelInfo) -> list[Optional[tuple[int, int]]]:
    """The attention window of every HF layer (``None``: full attention, or no attention)."""
    c = info.config
    ws = getattr(c, "window_size", None)
    freq = getattr(c, "window_attn_skip_freq", None)
    out: list[Optional[tuple[int, int]]] = [None] * info.num_layers
    if not ws:
        return out
    n_megatron = len(info.layer_types) if info.layer_types is not None else info.num_layers
    if freq is not None and not isinstance(freq, int) and len(list(freq)) != n_megatron:
        from .rules.base import ArchMismatchError

        raise ArchMismatchError(
            f"window_attn_skip_freq={list(freq)!r} has {len(list(freq))} entries; the model has {n_megatron} Megatron layers"
        )
    for meg, hf in attention_layers(info):
        if _is_windowed(ws, freq, meg + 1):
            out[hf] = (int(ws[0]), int(ws[1]))
    return out


def hf_windowed_layers(info: ModelInfo) -> list[int]:
    """HF indices of the layers Megatron runs with a sliding window."""
    return [i for i, w in enumerate(hf_windows(info)) if w is not None]
