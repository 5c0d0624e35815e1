"""The HF ``config.json`` generated from the model alone, and the tensors it implies.

No reference HF directory is needed: the rule's builder reads ``TransformerConfig`` and the
model's own attributes; ``hf_config_overrides`` are merged in after :func:`check_overrides`
refused those that contradict the model.  When ``transformers`` is importable, the HF class
is instantiated on the meta device from the final config to list the exact keys and shapes
``from_pretrained`` will expect (:func:`expected_hf_shapes`), so a naming mistake or an
override that changes the structure fails the export instead of producing a checkpoint
with missing or mis-sized weights; ``verify`` uses the same on a written ``config.json``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from typing import Mapping, Optional

import torch

from .plan import ExportPlan


def build_hf_config(plan: ExportPlan, dtype: torch.dtype, overrides: Optional[dict] = None) -> dict:
    """The generated config with ``overrides`` applied, after :func:`check_overrides`
    (cheap, local, the same on every rank: it raises on all of them alike)."""
    cfg = plan.rule.build_config(plan.info)
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    check_overrides(cfg, overrides)
    for k, v in (overrides or {}).items():
        cfg[k] = v
    return cfg


# Keys that do not change a tensor's name or shape but change what the exported weights
# compute: an override that differs from the model's value contradicts the model.  (Keys
# that change names or shapes are caught by the name and shape check, which names them.)
MODEL_DETERMINED = ("model_type", "num_experts_per_tok", "norm_topk_prob", "hidden_act", "rms_norm_eps", "tie_word_embeddings")
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")


def check_overrides(generated: dict, overrides: Optional[Mapping]) -> None:
    """Refuse ``hf_config_overrides`` that cannot describe this model, naming the key, the
    override and the model's value: a ``model_type``, ``architectures`` or behaviour key
    (:data:`MODEL_DETERMINED`) that differs from the model, an unknown ``architectures``, a
    value of the wrong type for its key, an out-of-range value.  Why: ``transformers`` loads
    many such configs without a word (missing weights left random, a wrong top-k) or fails
    only in the forward pass."""
    if overrides is None:
        return
    if not isinstance(overrides, Mapping):
        raise ValueError(f"hf_config_overrides must be a mapping, got {type(overrides).__name__}")
    problems = []
    for k, v in overrides.items():
        model_v = generated.get(k)
        if k == "architectures":
            p = _architectures_problem(v, generated)
            if p:
                problems.append(p)
            continue
        if k == "quantization_config":
            problems.append("quantization_config: written from the model's quantizers; it cannot be overridden")
            continue
        if k in generated:
            p = value_type_problem(k, v, model_v)
            if p:
                problems.append(f"{k}={short_repr(v)}: {p} (the model's value is {model_v!r})")
                continue
        if k in MODEL_DETERMINED and k in generated and v != model_v:
            problems.append(f"{k}={v!r} contradicts the model, whose value is {model_v!r}")
    final = {**generated, **dict(overrides)}
    changed = [str(k) for k in overrides]  # the generated values are the model's own
    problems += [p for p in range_problems(final) if p.split("=", 1)[0] in changed or "experts" in p and any(c in changed for c in _EXPERT_COUNTS)]
    if problems:
        raise ValueError("hf_config_overrides do not fit the model: " + "; ".join(dict.fromkeys(problems)))


def _architectures_problem(value, generated: dict) -> Optional[str]:
    model_v = generated.get("architectures")
    if value == model_v:
        return None
    if not (isinstance(value, list) and len(value) == 1 and isinstance(value[0], str)):
        return f"architectures={value!r} must be a list of one class name (the model's is {model_v!r})"
    try:
        import transformers
    except ImportError:  # cannot check another class: only the generated one is accepted
        return f"architectures={value!r}: cannot check a class other than the model's {model_v!r} without transformers"
    cls = getattr(transformers, value[0], None)
    if not isinstance(cls, type):
        return f"architectures={value!r}: transformers has no class {value[0]!r} (the model's is {model_v!r})"
    mt = getattr(getattr(cls, "config_class", None), "model_type", None)
    if mt != generated.get("model_type"):
        return f"architectures={value!r}: {value[0]} is a {mt!r} class, the model is {generated.get('model_type')!r} (the model's is {model_v!r})"
    return None


def value_type_problem(key: str, value, reference) -> Optional[str]:
    """Why ``value`` cannot stand for ``key`` whose known value is ``reference`` (None: fine)."""
    if reference is None or value is None:  # null is judged by the checks that follow
        return None
    if isinstance(reference, bool):
        ok = isinstance(value, bool)
        want = "a bool"
    elif isinstance(reference, int) and _is_count(key):
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "an int"
    elif isinstance(reference, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value)
        want = "a finite number"
    elif isinstance(reference, str):
        ok, want = isinstance(value, str), "a string"
    elif isinstance(reference, (list, tuple)):
        ok, want = isinstance(value, (list, tuple)), "a list"
    elif isinstance(reference, Mapping):
        ok, want = value is None or isinstance(value, Mapping), "a mapping or null"
    else:
        return None
    return None if ok else f"must be {want}, got {type(value).__name__}"


def _finite(value) -> bool:
    """A number a float can hold (an int beyond 1.8e308 cannot: ``math.isfinite`` raises)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def short_repr(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (a 400-digit int stays readable)."""
    r = repr(value)
    return r if len(r) <= limit else f"{r[:limit]}... ({len(r)} characters)"


def _is_count(key: str) -> bool:
    """A size or a count: an int, positive."""
    return key in ("vocab_size", "head_dim", "num_experts_per_tok") or key.endswith(("_size", "_heads", "_layers")) or key in _EXPERT_COUNTS


def range_problems(cfg: Mapping) -> list[str]:
    """Values no model can have: non-positive sizes and counts, a top-k above the expert
    count, a non-positive epsilon."""
    out = []
    for k, v in cfg.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if _is_count(k) and isinstance(v, int) and v <= 0:
            out.append(f"{k}={v!r} must be positive")
        if k.endswith(("_eps", "_epsilon")) and not (v > 0):
            out.append(f"{k}={v!r} must be positive")
    k = cfg.get("num_experts_per_tok")
    n = next((cfg[c] for c in _EXPERT_COUNTS if isinstance(cfg.get(c), int) and not isinstance(cfg.get(c), bool)), None)
    if isinstance(k, int) and not isinstance(k, bool):
        if k <= 0:
            out.append(f"num_experts_per_tok={k!r} must be positive")
        elif n is not None and k > n:
            out.append(f"num_experts_per_tok={k!r} is more than the {n} experts")
    return out


def expected_hf_keys(cfg: dict) -> Optional[set[str]]:
    """State-dict keys of the HF model class for ``cfg`` (None if transformers is missing)."""
    shapes = expected_hf_shapes(cfg)
    return None if shapes is None else frozenset(shapes)


def expected_hf_shapes(cfg: dict) -> Optional[dict[str, tuple]]:
    """``{state-dict key: shape}`` of the HF model class for ``cfg``, built on the meta
    device (None if transformers is missing).  Raises ``ValueError`` for a class
    transformers does not have.

    Cached by config: the training callback checks the same config at setup and at every
    export, and rank 0 should not rebuild the model skeleton each time."""
    shapes = _expected_hf_shapes(json.dumps(cfg, sort_keys=True, default=str))
    return None if shapes is None else dict(shapes)


def hf_model_class(cfg: dict):
    """The ``transformers`` class named by ``cfg["architectures"]`` (None if transformers is
    missing); ``ValueError`` if transformers has no such class.  Importing it is not safe
    beside another thread's imports (transformers' lazy modules): call it on the thread that
    imports, before handing the build to another (``hf_names.NameCheck`` does)."""
    try:
        import transformers
    except ImportError:  # pragma: no cover - optional dependency
        return None
    arch = (cfg.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if not isinstance(cls, type):
        raise ValueError(f"transformers {transformers.__version__} has no model class {arch!r} (architectures in config.json)")
    transformers.AutoConfig.for_model(cfg["model_type"])  # imports the config class too
    return cls


@functools.lru_cache(maxsize=8)
def _expected_hf_shapes(cfg_json: str) -> tuple:
    cfg = json.loads(cfg_json)
    cls = hf_model_class(cfg)
    if cls is None:  # pragma: no cover - optional dependency
        return None
    import transformers

    c = {k: v for k, v in cfg.items() if k not in ("quantization_config", "architectures", "model_type")}
    config = transformers.AutoConfig.for_model(cfg["model_type"], **c)
    config.architectures = cfg.get("architectures")
    with torch.device("meta"), _no_init_weights():
        model = cls(config)
    state = model.state_dict()
    try:  # transformers >= 5 fuses experts in memory; list the names save_pretrained writes
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x: in-memory names are the on-disk names
        revert_weight_conversion = None
    if revert_weight_conversion is not None:
        state = revert_weight_conversion(model, state)
    # a converted entry without a plain shape (a transformers-5 conversion we cannot read
    # on the meta device) is checked by name only (None)
    shapes = {k: (tuple(v.shape) if isinstance(getattr(v, "shape", None), torch.Size) else None) for k, v in state.items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return tuple(sorted(shapes.items()))


def config_problems(cfg: dict) -> list[str]:
    """Problems of a written ``config.json`` that transformers would accept but no model can
    have: values of the wrong type for their key (judged by the config class's defaults)
    and out-of-range values (:func:`range_problems`)."""
    problems = []
    try:
        import transformers

        defaults = transformers.AutoConfig.for_model(cfg["model_type"]).to_dict()
    except Exception:
        defaults = {}
    for k, v in cfg.items():
        skip = k in ("architectures", "model_type", "torch_dtype", "dtype", "transformers_version") or k.endswith("_token_id")
        if k in defaults and not skip:
            p = value_type_problem(k, v, defaults[k])
            if p:
                problems.append(f"config.json {k}={short_repr(v)}: {p}")
    problems += [f"config.json {p}" for p in range_problems(cfg)]
    return problems


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
