"""The HF ``config.json`` generated from the model alone, and the key set it implies.

No reference HF directory is needed: the rule's builder reads ``TransformerConfig`` and the
model's own attributes; ``hf_config_overrides`` may replace any field.  When
``transformers`` is importable, the HF class is instantiated on the meta device from that
config to list the exact keys ``from_pretrained`` will expect, so a naming mistake fails
the export instead of producing a checkpoint with missing weights.
"""

from __future__ import annotations

import contextlib
import functools
import json
from typing import Optional

import torch

from .plan import ExportPlan


def build_hf_config(plan: ExportPlan, dtype: torch.dtype, overrides: Optional[dict] = None) -> dict:
    cfg = plan.rule.build_config(plan.info)
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    for k, v in (overrides or {}).items():
        cfg[k] = v
    return cfg


def expected_hf_keys(cfg: dict) -> Optional[set[str]]:
    """State-dict keys of the HF model class for ``cfg`` (None if transformers is missing).

    Cached by config: the training callback checks the same config at setup and at every
    export, and rank 0 should not rebuild the model skeleton each time."""
    return _expected_hf_keys(json.dumps(cfg, sort_keys=True, default=str))


@functools.lru_cache(maxsize=8)
def _expected_hf_keys(cfg_json: str) -> Optional[set[str]]:
    cfg = json.loads(cfg_json)
    try:
        import transformers
    except ImportError:  # pragma: no cover - optional dependency
        return None
    c = {k: v for k, v in cfg.items() if k not in ("quantization_config", "architectures", "model_type")}
    config = transformers.AutoConfig.for_model(cfg["model_type"], **c)
    config.architectures = cfg.get("architectures")
    cls = getattr(transformers, cfg["architectures"][0], None)
    if cls is None:
        return None
    with torch.device("meta"), _no_init_weights():
        model = cls(config)
    state = model.state_dict()
    try:  # transformers >= 5 fuses experts in memory; list the names save_pretrained writes
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x: in-memory names are the on-disk names
        revert_weight_conversion = None
    if revert_weight_conversion is not None:
        state = revert_weight_conversion(model, state)
    keys = set(state.keys())
    if getattr(config, "tie_word_embeddings", False):
        keys.discard("lm_head.weight")
    return frozenset(keys)


def _no_init_weights():
    """Skip weight initialisation: only the names matter (its place moved in transformers 5)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:  # pragma: no cover
            return contextlib.nullcontext()
    return no_init_weights()


def generation_config(cfg: dict) -> dict:
    out = {"_from_model_config": True}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if cfg.get(k) is not None:
            out[k] = cfg[k]
    return out
