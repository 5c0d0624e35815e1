"""The semantics ledger (issue 21 part 1, ``nemo_export_hooks/exporter/semantics.py``), on the
installed megatron-core (this file runs on 0.15.3, 0.16.1 and 0.19.2):

* every field of megatron-core's config dataclasses is either in the central "does not change
  the forward" list or, changing the forward, is handled by each rule: declared (mapped,
  required, refused) or refused by the generic path when it is off its dataclass default;
* an unknown field -- a megatron-core option no rule has heard of -- off its default is refused
  at planning, naming the field and value, before anything is written;
* representative refusals name field and value (a window on a Llama, Sinkhorn routing and
  token dropping on a Qwen3-MoE), where the old exporter wrote a model that computes something else.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import hf_logits, load_hf, tokens_for
from nemo_export_hooks import export_to_hf
from nemo_export_hooks.exporter import semantics as S
from nemo_export_hooks.exporter.rules import ArchMismatchError, all_rules
from nemo_export_hooks.exporter.rules.base import ModelInfo
from nemo_export_hooks.testing.cpu import TinySpec, build_gpt, megatron_logits


def _configs():
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    return TransformerConfig, MLATransformerConfig


def _bare(cls):
    """An instance of ``cls`` holding every dataclass default (no ``__post_init__``)."""
    obj = object.__new__(cls)
    for f in dataclasses.fields(cls):
        d = S.field_default(f)
        object.__setattr__(obj, f.name, None if d is S._NO_DEFAULT else d)
    return obj


def test_every_field_is_neutral_or_forward_changing_and_handled_by_every_rule():
    """Each megatron-core field is in exactly one place: the central list, or the forward
    fields.  For every rule and every forward field it does not declare, the generic path
    refuses a non-default value naming the field (shown with a sentinel value per field)."""
    import megatron.core

    counts = {}
    for cls in _configs():
        cfg = _bare(cls)
        object.__setattr__(cfg, "num_moe_experts", 8)  # moe_* fields are read (see semantics.inert)
        fields = S.megatron_fields(cfg)
        forward = S.forward_fields(cfg)
        assert set(forward) | (set(fields) & set(S.NEUTRAL)) == set(fields)
        assert not set(forward) & set(S.NEUTRAL)
        counts[cls.__name__] = len(forward)
        for name, rule in all_rules().items():
            assert not set(rule.semantics) & set(S.NEUTRAL), f"{name} declares fields of the central list"
            assert all(h.kind in ("mapped", "required", "refused") for h in rule.semantics.values())
            for field in forward:
                if field in rule.semantics:
                    continue
                sentinel = object()
                old = getattr(cfg, field)
                object.__setattr__(cfg, field, sentinel)
                try:
                    assert (field, sentinel) in S.undeclared_non_default(cfg, rule.semantics), (name, field)
                finally:
                    object.__setattr__(cfg, field, old)
    # megatron-core keeps adding options; the ledger sees each version's own list
    print(f"megatron-core {megatron.core.__version__}: forward-changing fields {counts}")
    assert counts["TransformerConfig"] > 50


def test_new_megatron_option_is_refused_by_name(mcore, tmp_path):
    """A field a future megatron-core adds (here: a subclass defined in a megatron.core module)
    with a non-default value is refused at planning, naming it; nothing is written."""
    TransformerConfig, _ = _configs()
    future = dataclasses.make_dataclass("FutureConfig", [("future_router_trick", bool, dataclasses.field(default=False))],
                                        bases=(TransformerConfig,), namespace={"__module__": "megatron.core.transformer.future"})
    m = build_gpt(TinySpec(num_experts=None))
    m.config.__class__ = future
    m.config.future_router_trick = False
    export_to_hf(m, tmp_path / "ok", arch="qwen3", dtype=torch.float32)  # at its default: exported
    m.config.future_router_trick = True
    with pytest.raises(ArchMismatchError, match=r"arch 'qwen3' does not export future_router_trick=True: megatron-core option"):
        export_to_hf(m, tmp_path / "hf", arch="qwen3", dtype=torch.float32)
    assert not (tmp_path / "hf").exists()


def test_window_on_llama_is_refused(mcore, tmp_path):
    """The llama family writes no window: a sliding-window model (which the old exporter wrote
    as full attention) is refused by name."""
    spec = TinySpec(num_experts=None, qk_layernorm=False, extra=dict(window_size=(3, 0)))
    m = build_gpt(spec)
    tokens = tokens_for(spec.vocab_size)
    ref = megatron_logits(m, tokens)
    # the window matters: the same weights without it compute something else
    m.config.window_size = None
    export_to_hf(m, tmp_path / "full", arch="llama", dtype=torch.float32)
    hf, _ = load_hf(tmp_path / "full")
    assert (hf_logits(hf, tokens) - ref).abs().max().item() > 1e-3
    m.config.window_size = (3, 0)
    with pytest.raises(ArchMismatchError, match=r"arch 'llama' cannot express window_size=\(3, 0\): .*no sliding window"):
        export_to_hf(m, tmp_path / "hf", arch="llama", dtype=torch.float32)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("moe_router_load_balancing_type", "sinkhorn", r"cannot express moe_router_load_balancing_type='sinkhorn': Sinkhorn routing"),
        ("moe_expert_capacity_factor", 1.0, r"does not export moe_expert_capacity_factor=1.0"),
        ("moe_router_group_topk", 1, r"does not export moe_router_group_topk=1"),
    ],
)
def test_unsupported_router_option_names_field_and_value(mcore, tmp_path, field, value, match):
    m = build_gpt(TinySpec())
    setattr(m.config, field, value)
    with pytest.raises(ArchMismatchError, match=match):
        export_to_hf(m, tmp_path / "hf", arch="qwen3_moe", dtype=torch.float32)
    assert not (tmp_path / "hf").exists()


def test_required_values_are_enforced_by_the_ledger():
    """A ``required`` declaration with values is enforced by the ledger itself."""
    TransformerConfig, _ = _configs()
    cfg = _bare(TransformerConfig)
    info = ModelInfo(cfg, None, [], 2, False, False)
    declared = {n: S.mapped() for n, _ in S.undeclared_non_default(cfg, {})}  # the fields without a default
    declared["qk_layernorm"] = S.required(True)
    with pytest.raises(ArchMismatchError, match=r"arch 'x' needs qk_layernorm=True; the model has qk_layernorm=False"):
        S.check_semantics(info, "x", declared)
    declared["qk_layernorm"] = S.required(False)
    S.check_semantics(info, "x", declared)


def test_provider_subclass_default_does_not_hide_a_field(mcore, tmp_path):
    """A NeMo / Megatron-Bridge provider subclass may change a field's default (here
    ``rotary_interleaved=True``): the ledger compares with megatron-core's default, so the
    field is still seen; the provider's own extra fields are build options, not checked."""
    TransformerConfig, _ = _configs()
    provider = dataclasses.make_dataclass(
        "MyProvider", [("rotary_interleaved", bool, dataclasses.field(default=True)), ("seq_length", int, dataclasses.field(default=7))],
        bases=(TransformerConfig,), namespace={"__module__": "my_training_framework.providers"})
    m = build_gpt(TinySpec(num_experts=None))
    m.config.__class__ = provider
    m.config.seq_length = 4096
    export_to_hf(m, tmp_path / "ok", arch="qwen3", dtype=torch.float32)  # extra provider field: not a megatron-core option
    m.config.rotary_interleaved = True
    with pytest.raises(ArchMismatchError, match=r"arch 'qwen3' cannot express rotary_interleaved=True: HF rotates halves"):
        export_to_hf(m, tmp_path / "hf", arch="qwen3", dtype=torch.float32)
    assert not (tmp_path / "hf").exists()


def test_moe_options_of_a_dense_model_are_inert(mcore, tmp_path):
    """A training config may carry router options for a model without experts (no router is
    built): not refused.  With experts, the same option is (tests above)."""
    m = build_gpt(TinySpec(num_experts=None))
    m.config.moe_expert_capacity_factor = 1.0
    export_to_hf(m, tmp_path / "hf", arch="qwen3", dtype=torch.float32)
