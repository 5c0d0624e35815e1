"""CPU builders for Megatron-Core's hybrid ``MambaModel`` (NemotronH-style stacks), from local
modules, for tests.

Megatron-Core's own ``mamba_stack_spec`` (``models/mamba/mamba_layer_specs.py``) is built from
Transformer Engine modules only, so it cannot be built on CPU.  :func:`local_mamba_stack_spec`
composes the same ``MambaStackSubmodules`` structure (Mamba / attention / MLP / MoE layers)
from Megatron-Core's local modules instead: ``ColumnParallelLinear`` / ``RowParallelLinear``
with the norm as a separate module (``norm``, ``input_layernorm``, ``pre_mlp_layernorm``).
:func:`to_te_fused_norms` then moves those norms into the following linear the way Transformer
Engine's ``LayerNormColumnParallelLinear`` names them (``mixer.in_proj.layer_norm_weight``,
``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``), so the
exporter's table is exercised with both naming schemes; the real TE modules are checked on the
GPU device.

Stand-ins, each only for what cannot exist on this CPU-only machine (none is used by the export
path, which never imports this module):

* ``triton`` (an import-level stub, only while ``megatron.core.ssm.mamba_mixer`` is first
  imported, then removed from ``sys.modules`` again): ``mamba_mixer`` imports Megatron's
  dynamic-inference Triton kernels at module level; they are never called here.
* ``mamba_ssm`` / ``einops`` (while a model is constructed): ``MambaMixer.__init__`` refuses to
  run without them (``HAVE_MAMBA_SSM``, ``HAVE_EINOPS``), and its gated norm class comes from
  ``mamba_ssm.ops.triton.layernorm_gated.RMSNorm``.  :class:`GatedRMSNormStandIn` has that
  class's state layout (``weight`` ``[d_inner_local]``, no bias) and computes the same function
  (``norm_before_gate=False``: ``rmsnorm_per_group(x * silu(z)) * weight``).  Megatron's Mamba
  *forward* still needs mamba_ssm's CUDA/Triton scan kernels and einops, so models with Mamba
  layers are built (real ``MambaMixer`` parameters, shapes, TP attributes) but not run.
* ``TENorm`` (``MambaStack.final_norm`` is hard-wired to it): the local ``WrappedTorchNorm``,
  same state name (``final_norm.weight``).
* ``TELinear`` (``MoELayer``'s latent projections ``fc1_latent_proj`` / ``fc2_latent_proj``, which
  megatron-core 0.16 builds only with TE, ``parallel_mode="duplicated"``): :class:`TELinearStandIn`,
  same state names (``weight``, ``bias``), not tensor-parallel, same function.
* ``TENorm`` with ``layernorm_zero_centered_gamma`` (Qwen3-Next): :class:`TENormStandIn`, TE's
  state (``weight``, zeros-initialised) and function (``x_hat * (1 + weight)``); Megatron's local
  norms refuse zero-centred gamma.
* ``fla`` (Gated DeltaNet, megatron-core 0.19; Triton only): the ``HAVE_FLA`` flag and ``l2norm``
  (:func:`install_gdn_cpu_standins`).  The layer's conv and delta rule are megatron-core's own
  torch code (``deterministic_mode=True``), so its forward is Megatron's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from .cpu import TinySpec, _randomise_norms_and_biases, apply_cpu_shims, transformer_config

# ---------------------------------------------------------------------------------------------
# import-level stand-in: triton
# ---------------------------------------------------------------------------------------------


class _Anything:
    """Placeholder for ``triton.language`` attributes used in kernel signatures."""

    def __getattr__(self, name):
        return self

    def __call__(self, *a, **k):
        return self


def _triton_stub() -> tuple[types.ModuleType, types.ModuleType]:
    triton = types.ModuleType("triton")
    tl = types.ModuleType("triton.language")
    tl.__getattr__ = lambda name: _Anything()  # PEP 562 module __getattr__
    triton.language = tl

    def jit(fn=None, **kwargs):
        return fn if fn is not None else (lambda f: f)

    triton.jit = jit
    triton.autotune = lambda *a, **k: (lambda f: f)
    triton.heuristics = lambda *a, **k: (lambda f: f)
    triton.Config = lambda *a, **k: None
    triton.cdiv = lambda a, b: -(-a // b)
    triton.next_power_of_2 = lambda n: 1 << max(0, int(n) - 1).bit_length()
    return triton, tl


def import_mamba_mixer():
    """Import ``megatron.core.ssm.mamba_mixer`` on a machine without triton.

    The stub lives in ``sys.modules`` only during this import, so that nothing else (torch,
    transformers) is led to believe triton is installed."""
    name = "megatron.core.ssm.mamba_mixer"
    if name in sys.modules:
        return sys.modules[name]
    if importlib.util.find_spec("triton") is not None:
        return importlib.import_module(name)
    triton, tl = _triton_stub()
    sys.modules["triton"], sys.modules["triton.language"] = triton, tl
    try:
        return importlib.import_module(name)
    finally:
        for k in ("triton", "triton.language"):
            if sys.modules.get(k) in (triton, tl):
                del sys.modules[k]


# ---------------------------------------------------------------------------------------------
# construction-time stand-ins
# ---------------------------------------------------------------------------------------------


class GatedRMSNormStandIn(torch.nn.Module):
    """``mamba_ssm.ops.triton.layernorm_gated.RMSNorm`` state layout and function, in torch."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x, z=None):
        dtype = x.dtype
        x = x.float()
        if z is not None and not self.norm_before_gate:
            x = x * F.silu(z.float())
        g = self.group_size or x.shape[-1]
        xg = x.view(*x.shape[:-1], x.shape[-1] // g, g)
        xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + self.eps)
        out = xg.view_as(x) * self.weight.float()
        if z is not None and self.norm_before_gate:
            out = out * F.silu(z.float())
        return out.to(dtype)


class TELinearStandIn(torch.nn.Module):
    """TE ``Linear`` as Megatron's ``TELinear`` wraps it with ``parallel_mode="duplicated"``:
    ``weight`` ``[out, in]`` (+ ``bias``), replicated on every rank; returns ``(out, None)``."""

    def __init__(self, input_size, output_size, *, parallel_mode=None, config=None, init_method=None, bias=False,
                 skip_bias_add=False, skip_weight_param_allocation=False, is_expert=False, **kwargs):
        super().__init__()
        assert parallel_mode == "duplicated", parallel_mode
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype))
        if init_method is not None:
            init_method(self.weight)
        self.bias = torch.nn.Parameter(torch.zeros(output_size, dtype=config.params_dtype)) if bias else None
        self.skip_bias_add = skip_bias_add

    def get_extra_state(self):
        return None

    def set_extra_state(self, state):
        pass

    def forward(self, x):
        if self.skip_bias_add:
            return F.linear(x, self.weight), self.bias
        return F.linear(x, self.weight, self.bias), None


class TENormStandIn(torch.nn.Module):
    """Transformer Engine's ``RMSNorm`` as Megatron's ``TENorm`` builds it, in torch: state
    ``weight`` ``[hidden]``; with ``config.layernorm_zero_centered_gamma`` TE stores ``gamma - 1``
    (initialised to zeros) and computes ``x_hat * (1 + weight)``, else ``x_hat * weight``.
    Megatron's local norms refuse zero-centred gamma (``WrappedTorchNorm`` asserts it off), so a
    CPU model with zero-centred norms needs this stand-in wherever the TE spec has a ``TENorm``
    (or a norm fused into ``TELayerNormColumnParallelLinear``)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        assert config.normalization == "RMSNorm", config.normalization
        self.eps = eps
        self.zero_centered_gamma = bool(config.layernorm_zero_centered_gamma)
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.float() + 1 if self.zero_centered_gamma else self.weight.float()
        return (h * w).to(x.dtype)


def fla_l2norm_standin(x: torch.Tensor, eps: float = 1e-6, output_dtype=None) -> torch.Tensor:
    """``fla.modules.l2norm.l2norm`` (a Triton kernel) in torch: ``x * rsqrt(sum(x^2) + eps)``
    over the last dim, in float32."""
    h = x.float()
    y = h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) + eps)
    return y.to(output_dtype or x.dtype)


def install_gdn_cpu_standins() -> None:
    """What megatron-core 0.19's ``GatedDeltaNet`` takes from ``fla`` (flash-linear-attention,
    Triton kernels only): the import flag ``HAVE_FLA`` its constructor checks, and ``l2norm``,
    which its forward applies to q and k.  fla's other two kernels are not needed: with
    ``deterministic_mode=True`` the layer runs megatron-core's own torch paths (``F.conv1d`` and
    ``torch_chunk_gated_delta_rule``).  Installed for the process (idempotent); a real fla is
    left alone."""
    from megatron.core.ssm.gated_delta_net import common

    if not common.HAVE_FLA:
        common.HAVE_FLA = True
        common.l2norm = fla_l2norm_standin


def _local_norm_cls():
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return WrappedTorchNorm


@contextlib.contextmanager
def _construction_standins(final_norm=None) -> Iterator[None]:
    """Patch the module globals listed in the module docstring, and restore them
    (``final_norm``: the class standing in for the stack's ``TENorm``, default the local norm)."""
    from megatron.core.ssm.mamba_block import MambaStack
    from megatron.core.transformer.moe import moe_layer

    # megatron-core >= 0.19 defines the stack in models/hybrid/hybrid_block.py and re-exports it
    # from ssm/mamba_block.py: patch the module the class reads its globals from.
    mamba_block = sys.modules[MambaStack.__module__]

    mixer = import_mamba_mixer()
    from megatron.core.ssm import mamba_context_parallel as mcp

    missing = object()
    patches = [
        (mixer, "HAVE_MAMBA_SSM", True),
        (mixer, "HAVE_EINOPS", True),
        (mcp, "HAVE_EINOPS", True),
        (mixer, "ExtendedRMSNorm", GatedRMSNormStandIn),
        (mamba_block, "TENorm", final_norm or _local_norm_cls()),
    ]
    if not getattr(moe_layer, "HAVE_TE", False):
        patches += [(moe_layer, "HAVE_TE", True), (moe_layer, "TELinear", TELinearStandIn)]
    if getattr(mixer, "HAVE_MAMBA_SSM", False):  # real mamba_ssm and einops: keep them
        patches = [p for p in patches if p[0] not in (mixer, mcp)]
    saved = [(m, k, getattr(m, k, missing)) for m, k, _ in patches]
    try:
        for m, k, v in patches:
            setattr(m, k, v)
        yield
    finally:
        for m, k, v in saved:
            if v is missing:
                delattr(m, k)
            else:
                setattr(m, k, v)


# ---------------------------------------------------------------------------------------------
# the local hybrid stack spec and the model builder
# ---------------------------------------------------------------------------------------------


def local_mamba_stack_spec(num_experts: Optional[int], qk_layernorm: bool = False, norm=None, gdn: bool = False):
    """``MambaStackSubmodules`` of ``mamba_stack_spec`` with local modules (see module doc).

    ``qk_layernorm``: attention layers get local q/k norms (``self_attention.q_layernorm`` /
    ``k_layernorm``), as ``get_gpt_layer_local_spec`` gives them; megatron-core >= 0.19 refuses
    ``qk_layernorm=True`` without them instead of falling back to ``TENorm``.

    ``norm``: the class of every norm (default the local ``WrappedTorchNorm``;
    :class:`TENormStandIn` for zero-centred norms).  ``gdn``: add megatron-core 0.19's Gated
    DeltaNet layer (symbol ``G``), built like ``hybrid_stack_spec.gdn_layer`` -- a
    ``TransformerLayer`` whose ``self_attention`` is ``GatedDeltaNet`` -- with local linears and
    the pre-norm separate (``input_layernorm``) instead of fused into ``in_proj``."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    try:
        from megatron.core.transformer.transformer_layer import MoETransformerLayer
    except ImportError:  # megatron-core < 0.16
        MoETransformerLayer = TransformerLayer

    mixer_mod = import_mamba_mixer()
    norm = norm or _local_norm_cls()
    qk_norms = dict(q_layernorm=norm, k_layernorm=norm) if qk_layernorm else {}
    moe_layer = None
    if num_experts:
        moe_layer = ModuleSpec(
            module=MoETransformerLayer,
            submodules=TransformerLayerSubmodules(
                pre_mlp_layernorm=norm,
                mlp=get_moe_module_spec(use_te=False, num_experts=num_experts, moe_grouped_gemm=False),
                mlp_bda=get_bias_dropout_add,
            ),
        )
    sub = MambaStackSubmodules(
        mamba_layer=ModuleSpec(
            module=MambaLayer,
            submodules=MambaLayerSubmodules(
                norm=norm,
                mixer=ModuleSpec(
                    module=mixer_mod.MambaMixer,
                    submodules=mixer_mod.MambaMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
                ),
                mamba_bda=get_bias_dropout_add,
            ),
        ),
        attention_layer=ModuleSpec(
            module=TransformerLayer,
            submodules=TransformerLayerSubmodules(
                input_layernorm=norm,
                self_attention=ModuleSpec(
                    module=SelfAttention,
                    params={"attn_mask_type": AttnMaskType.causal},
                    submodules=SelfAttentionSubmodules(
                        linear_qkv=ColumnParallelLinear,
                        core_attention=DotProductAttention,
                        linear_proj=RowParallelLinear,
                        **qk_norms,
                    ),
                ),
                self_attn_bda=get_bias_dropout_add,
            ),
        ),
        mlp_layer=ModuleSpec(
            module=MLPLayer,
            submodules=TransformerLayerSubmodules(
                pre_mlp_layernorm=norm,
                mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
                mlp_bda=get_bias_dropout_add,
            ),
        ),
    )
    if moe_layer is not None:
        sub.moe_layer = moe_layer
    if gdn:
        from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules

        sub.gdn_layer = ModuleSpec(
            module=TransformerLayer,
            submodules=TransformerLayerSubmodules(
                input_layernorm=norm,
                self_attention=ModuleSpec(
                    module=GatedDeltaNet,
                    submodules=GatedDeltaNetSubmodules(in_proj=ColumnParallelLinear, out_norm=norm, out_proj=RowParallelLinear),
                ),
                self_attn_bda=get_bias_dropout_add,
            ),
        )
    return ModuleSpec(module=MambaStack, submodules=sub)


def nemotron_h_spec(pattern: str, **kw) -> TinySpec:
    """A tiny NemotronH-like model: squared-ReLU non-gated MLPs and experts, no rope, no
    qk-norm, RMSNorm eps 1e-5 (Mamba's gated norm is hard-wired to it), sigmoid router with
    expert bias, shared experts, 8 Mamba heads of 8 in 2 groups with state 16."""
    extra = dict(mamba_state_dim=16, mamba_head_dim=8, mamba_num_groups=2, mamba_num_heads=8,
                 use_mamba_mem_eff_path=False, init_method_std=0.1)
    extra.update(kw.pop("extra", {}))
    base = dict(
        num_layers=len(pattern),
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=8,
        ffn_hidden_size=48,
        vocab_size=96,
        num_experts=4,
        moe_ffn_hidden_size=24,
        moe_router_topk=2,
        moe_shared_expert_intermediate_size=40,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=2.0,
        qk_layernorm=False,
        gated_linear_unit=False,
        activation="squared_relu",
        layernorm_epsilon=1e-5,
        extra=extra,
    )
    base.update(kw)
    return TinySpec(**base)


def build_mamba(spec: TinySpec, pattern: str, seed: int = 1234, position_embedding_type: str = "none", **config_overrides):
    """Build a real Megatron-Core ``MambaModel`` with ``hybrid_override_pattern=pattern`` from
    the local stack spec, on CPU.  Parallel state must be initialised.  Norms, biases, the
    Mamba ``A_log`` / ``D`` / ``dt_bias`` and the router expert bias get distinct values, so a
    swapped tensor cannot go unnoticed."""
    from megatron.core.models.mamba import MambaModel

    apply_cpu_shims()
    cfg = transformer_config(spec, **config_overrides)
    stack = local_mamba_stack_spec(spec.num_experts if "E" in pattern else None, qk_layernorm=spec.qk_layernorm)
    torch.manual_seed(seed)
    with _construction_standins():
        model = MambaModel(
            config=cfg,
            mamba_stack_spec=stack,
            vocab_size=spec.vocab_size,
            max_sequence_length=spec.max_seq_len,
            hybrid_override_pattern=pattern,
            share_embeddings_and_output_weights=spec.tie_embeddings,
            position_embedding_type=position_embedding_type,
            rotary_base=int(spec.rotary_base),
        )
    _randomise_norms_and_biases(model, seed)
    g = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


def build_hybrid(spec: TinySpec, pattern: str, seed: int = 1234, position_embedding_type: str = "rope", **config_overrides):
    """Build megatron-core 0.19's ``HybridModel`` (the successor of the deprecated ``GPTModel``)
    with ``hybrid_layer_pattern=pattern`` from the local stack spec, on CPU; a transformer is
    the pattern ``*E*E...`` / ``*-*-...`` (attention and MLP/MoE as separate layers).  Parallel
    state must be initialised.

    Gated DeltaNet layers (``G``, a Qwen3-Next is ``GEGEGE*E...``) get the fla stand-ins
    (:func:`install_gdn_cpu_standins`; pass ``deterministic_mode=True`` to run them on CPU), and
    ``layernorm_zero_centered_gamma=True`` gets :class:`TENormStandIn` for every norm.  The
    spec's ``rotary_percent`` is the model's (partial rotary embeddings)."""
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    apply_cpu_shims()
    # a hybrid stack's num_layers counts its pattern's layers (attention and MoE separately)
    config_overrides.setdefault("num_layers", len(pattern.split("/")[0].replace("|", "")))
    cfg = transformer_config(spec, **config_overrides)
    norm = TENormStandIn if cfg.layernorm_zero_centered_gamma else None
    gdn = "G" in pattern
    if gdn:
        install_gdn_cpu_standins()
    stack = local_mamba_stack_spec(spec.num_experts if "E" in pattern else None, qk_layernorm=spec.qk_layernorm, norm=norm, gdn=gdn)
    torch.manual_seed(seed)
    with _construction_standins(final_norm=norm):
        model = HybridModel(
            config=cfg,
            hybrid_stack_spec=stack,
            vocab_size=spec.vocab_size,
            max_sequence_length=spec.max_seq_len,
            hybrid_layer_pattern=pattern,
            share_embeddings_and_output_weights=spec.tie_embeddings,
            position_embedding_type=position_embedding_type,
            rotary_base=int(spec.rotary_base),
            rotary_percent=spec.rotary_percent,
        )
    _randomise_norms_and_biases(model, seed)
    return model


def build_gpt_linear_attention(spec: TinySpec, seed: int = 1234, **config_overrides):
    """Build the ``GPTModel`` form of a Gated DeltaNet model (megatron-core 0.19; Megatron-Bridge's
    Qwen3-Next provider): ``experimental_attention_variant="gated_delta_net"`` with
    ``linear_attention_freq`` picking each layer's mixer, ``moe_layer_freq`` its MLP, one
    ``TransformerLayer`` per layer.  megatron-core's own builder
    (``get_transformer_layer_with_experimental_attention_variant_spec``) accepts only the TE
    backend, so the same per-layer structure is composed here from the local modules of
    :func:`local_mamba_stack_spec` (the layer patterns come from megatron-core's own
    ``get_linear_attention_pattern`` / ``get_moe_layer_pattern``).  Parallel state must be
    initialised."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.experimental_attention_variant_module_specs import (
        get_linear_attention_pattern,
        get_moe_layer_pattern,
    )
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    apply_cpu_shims()
    cfg = transformer_config(spec, **config_overrides)
    norm = TENormStandIn if cfg.layernorm_zero_centered_gamma else _local_norm_cls()
    install_gdn_cpu_standins()
    sub = local_mamba_stack_spec(spec.num_experts, qk_layernorm=spec.qk_layernorm, norm=norm, gdn=True).submodules
    linear = get_linear_attention_pattern(cfg)
    moe = get_moe_layer_pattern(cfg) if cfg.num_moe_experts else [0] * cfg.num_layers
    layers = []
    for la, is_moe in zip(linear, moe):
        mixer = (sub.gdn_layer if la else sub.attention_layer).submodules.self_attention
        mlp = (sub.moe_layer if is_moe else sub.mlp_layer).submodules.mlp
        layers.append(ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=norm, self_attention=mixer, self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm, mlp=mlp, mlp_bda=get_bias_dropout_add)))
    torch.manual_seed(seed)
    model = GPTModel(
        config=cfg,
        transformer_layer_spec=TransformerBlockSubmodules(layer_specs=layers, layer_norm=norm),
        vocab_size=spec.vocab_size,
        max_sequence_length=spec.max_seq_len,
        share_embeddings_and_output_weights=spec.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=spec.rotary_base,
        rotary_percent=spec.rotary_percent,
    )
    _randomise_norms_and_biases(model, seed)
    return model


def copy_gpt_into_hybrid(gpt, hybrid) -> None:
    """Give a ``*E*E`` / ``*-*-`` ``HybridModel`` exactly the weights of a ``GPTModel``: GPT
    layer k's attention part (``input_layernorm``, ``self_attention.*``) goes to hybrid layer
    2k, its MLP part (``pre_mlp_layernorm``, ``mlp.*``) to layer 2k+1, ``final_layernorm`` to
    ``final_norm``.  Every hybrid parameter and buffer must be assigned exactly once."""
    src = dict(gpt.named_parameters())
    src.update({n: b for n, b in gpt.named_buffers() if b is not None})
    dst = dict(hybrid.named_parameters())
    dst.update({n: b for n, b in hybrid.named_buffers() if b is not None and n.endswith(("expert_bias",))})
    done = set()
    with torch.no_grad():
        for name, t in src.items():
            if name.startswith("decoder.layers."):
                k, rest = name[len("decoder.layers."):].split(".", 1)
                attn = rest.startswith(("input_layernorm.", "self_attention."))
                target = f"decoder.layers.{2 * int(k) + (0 if attn else 1)}.{rest}"
            elif name.startswith("decoder.final_layernorm."):
                target = "decoder.final_norm." + name[len("decoder.final_layernorm."):]
            else:
                target = name
            if target not in dst:
                if name.endswith(("local_tokens_per_expert",)) or t.dim() == 0:
                    continue
                raise KeyError(f"GPT tensor {name} has no place {target} in the hybrid model")
            dst[target].copy_(t)
            done.add(target)
    missing = sorted(set(dst) - done)
    if missing:
        raise KeyError(f"hybrid tensors not assigned from the GPT model: {missing}")


# ---------------------------------------------------------------------------------------------
# Transformer Engine naming of the fused norms
# ---------------------------------------------------------------------------------------------


class LayerNormLinearStandIn(torch.nn.Module):
    """State names of TE ``LayerNormColumnParallelLinear`` (RMSNorm): ``layer_norm_weight`` and
    the linear's ``weight`` (+ ``bias``), with the linear's tensor-parallel attributes; computes
    ``linear(rmsnorm(x))`` (zero-centred, ``x_hat * (1 + w)``, when the norm it replaces is) and
    returns ``(out, None)`` like Megatron's wrapper."""

    def __init__(self, norm: torch.nn.Module, linear: torch.nn.Module):
        super().__init__()
        self.config = getattr(linear, "config", None)
        self.eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-5)))
        self.layer_norm_weight = torch.nn.Parameter(norm.weight.detach().clone())
        self.zero_centered_gamma = bool(getattr(norm, "zero_centered_gamma", False))
        w = torch.nn.Parameter(linear.weight.detach().clone())
        for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
            if hasattr(linear.weight, attr):
                setattr(w, attr, getattr(linear.weight, attr))
        self.weight = w
        b = getattr(linear, "bias", None)
        self.bias = torch.nn.Parameter(b.detach().clone()) if isinstance(b, torch.Tensor) else None
        self.skip_bias_add = bool(getattr(linear, "skip_bias_add", False))

    def get_extra_state(self):
        return None

    def set_extra_state(self, state):
        pass

    def forward(self, x, *args, **kwargs):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.layer_norm_weight.float()
        h = (h * (w + 1 if self.zero_centered_gamma else w)).to(x.dtype)
        if self.skip_bias_add:
            return F.linear(h, self.weight), self.bias
        return F.linear(h, self.weight, self.bias), None


def to_te_fused_norms(model) -> list[str]:
    """Move each layer's pre-norm into the following linear the way the TE hybrid spec holds
    it (Mamba ``norm`` -> ``mixer.in_proj.layer_norm_weight``, attention ``input_layernorm`` ->
    ``self_attention.linear_qkv.layer_norm_weight``, Gated DeltaNet ``input_layernorm`` ->
    ``self_attention.in_proj.layer_norm_weight``, MLP-layer ``pre_mlp_layernorm`` ->
    ``mlp.linear_fc1.layer_norm_weight``); MoE layers keep their separate ``pre_mlp_layernorm``
    (``TENorm`` in the TE spec).  Same function.  Returns the new Megatron names."""
    from megatron.core.transformer.identity_op import IdentityOp

    names = []
    for layer in model.decoder.layers:
        i = int(layer.layer_number) - 1
        mixer = getattr(layer, "mixer", None)
        attn = getattr(layer, "self_attention", None)
        mlp = getattr(layer, "mlp", None)
        if mixer is not None and not isinstance(layer.norm, IdentityOp):
            mixer.in_proj = LayerNormLinearStandIn(layer.norm, mixer.in_proj)
            layer.norm = IdentityOp()
            names.append(f"{i}: mixer.in_proj.layer_norm_weight")
        elif attn is not None and hasattr(attn, "linear_qkv") and not isinstance(layer.input_layernorm, IdentityOp):
            attn.linear_qkv = LayerNormLinearStandIn(layer.input_layernorm, attn.linear_qkv)
            layer.input_layernorm = IdentityOp()
            names.append(f"{i}: self_attention.linear_qkv.layer_norm_weight")
        elif attn is not None and hasattr(attn, "in_proj") and not isinstance(layer.input_layernorm, IdentityOp):
            attn.in_proj = LayerNormLinearStandIn(layer.input_layernorm, attn.in_proj)
            layer.input_layernorm = IdentityOp()
            names.append(f"{i}: self_attention.in_proj.layer_norm_weight")
        elif mlp is not None and not hasattr(mlp, "experts") and not isinstance(layer.pre_mlp_layernorm, IdentityOp):
            mlp.linear_fc1 = LayerNormLinearStandIn(layer.pre_mlp_layernorm, mlp.linear_fc1)
            layer.pre_mlp_layernorm = IdentityOp()
            names.append(f"{i}: mlp.linear_fc1.layer_norm_weight")
    return names
