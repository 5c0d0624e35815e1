"""Plan an export: walk this rank's model chunks once and turn every tensor into a job.

A :class:`Job` knows where its tensor lives, how it is split across ranks, which HF names it
becomes and whether this rank writes it, but holds no data of its own.  Planning is cheap
and has no collectives, so the whole model can be checked against the architecture (and
the HF key set) before a single byte is written; running the jobs then gathers, packs and
yields tensors one at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from . import mappings as mk
from .experts import _num_local_experts, detect_layout, iter_experts
from .parallel import Group, ParallelLayout
from .semantics import check_semantics
from .rules.base import IGNORED_SUFFIXES, ArchMismatchError, ArchRule, Entry, ModelInfo
from .source import LayerRef, final_norm, hybrid_layer_types, iter_layers, model_attrs, named_tensors

log = logging.getLogger(__name__)

# Parameters of a model chunk that the plan maps (the layers, embedding, final norm, output).
_MAPPED_PREFIXES = ("embedding.word_embeddings.", "decoder.layers.", "decoder.final_layernorm.", "decoder.final_norm.", "output_layer.")


@dataclass
class Job:
    source: str  # Megatron name, for messages
    targets: tuple[str, ...]  # full HF names
    kind: mk.MappingKind
    tensor: torch.Tensor  # this rank's local tensor
    tp_dim: Optional[int]  # dim split across `group` (None: replicated)
    group: Group
    glu: bool  # fc1 of a gated MLP: [gate_shard; up_shard] per rank
    owner: bool  # this rank writes the result
    quant_module: Optional[torch.nn.Module] = None
    quant_index: Optional[int] = None
    keep_fp32: bool = False
    transform: Optional[mk.ValueTransform] = None  # applied to each HF output (unquantized only)
    # An expert stack: this rank's experts of one layer, stacked on a new dim 0 only when the
    # job runs (``tensor`` is then a meta tensor of the stacked shape, for planning)
    parts: Optional[list] = None

    @property
    def is_weight(self) -> bool:
        return self.targets[0].endswith(".weight")

    def local_tensor(self) -> torch.Tensor:
        """The tensor this rank contributes (an expert stack is assembled here, one layer's
        local experts at a time)."""
        if self.parts is None:
            return self.tensor
        return torch.stack([p.detach() for p in self.parts])


@dataclass
class ExportPlan:
    rule: ArchRule
    info: ModelInfo
    layout: ParallelLayout
    jobs: list[Job] = field(default_factory=list)
    chunks: list = field(default_factory=list)

    def owned_names(self) -> list[str]:
        return [t for j in self.jobs if j.owner for t in j.targets]


def _has_quantizer(module: Optional[torch.nn.Module]) -> bool:
    q = getattr(module, "weight_quantizer", None)
    return q is not None and isinstance(q, torch.nn.Module)


def _tp_dim(t: torch.Tensor) -> Optional[int]:
    if getattr(t, "tensor_model_parallel", False):
        return int(getattr(t, "partition_dim", 0))
    return None


def _is_moe_layer(layer: torch.nn.Module) -> bool:
    """Layer ``layer``'s MLP is a ``MoELayer`` (by structure: a router and experts)."""
    mlp = getattr(layer, "mlp", None)
    return hasattr(mlp, "experts") and hasattr(mlp, "router")


def moe_placement(cfg, layers: list[LayerRef]) -> list[int]:
    """Global indices of the MoE layers, read from the modules.

    ``moe_layer_freq`` only says where MoE layers sit if the layer spec honoured it
    (``get_gpt_decoder_block_spec`` does; a single MoE layer spec puts experts in every
    layer whatever it says).  So the modules decide: when this rank holds every layer, their
    placement is the model's; a pipeline stage, which sees only its own layers, keeps
    ``moe_layer_freq`` for the others and refuses in one line if its own layers disagree with it.
    """
    n = int(cfg.num_layers)
    if getattr(cfg, "num_moe_experts", None):
        freq = getattr(cfg, "moe_layer_freq", 1)
        from_freq = [i for i in range(n) if i % freq == 0] if isinstance(freq, int) else [i for i, f in enumerate(list(freq)) if f]
    else:
        freq, from_freq = None, []
    held = {ref.index: _is_moe_layer(ref.module) for ref in layers}
    from_modules = sorted(i for i, moe in held.items() if moe)
    if sorted(held) == list(range(n)):
        if from_modules != from_freq:
            log.info("HF export: MoE layers %s from the modules (moe_layer_freq=%s says %s)", from_modules, freq, from_freq)
        return from_modules
    wrong = sorted(i for i, moe in held.items() if moe != (i in from_freq))
    if wrong:
        raise ArchMismatchError(
            f"MoE placement disagrees with moe_layer_freq={freq!r} at layers {wrong}: the modules have MoE layers "
            f"{from_modules} of this stage's {sorted(held)} (build the layer spec with get_gpt_decoder_block_spec)"
        )
    return from_freq


def pair_hybrid_layers(layer_types: list[str], model_type: str, mixers: tuple[str, ...] = ("*",)) -> list[int]:
    """HF layer index of every layer of a hybrid stack exported to a transformer arch.

    megatron-core 0.19's ``HybridModel`` (``GPTModel`` is deprecated) writes a transformer as
    separate attention and MLP/MoE layers: a Qwen3-MoE is ``*E*E...``.  An HF transformer layer
    is one token-mixer layer (``mixers``, the rule's ``hybrid_mixers``: attention ``*``, and
    for Qwen3-Next also Gated DeltaNet ``G``) followed by its MLP (``-``) or MoE (``E``) layer;
    layer names inside them are the ``TransformerLayer`` names the GPT form uses.  Anything
    else (Mamba, a lone mixer or MLP layer, other mixers) has no place in the HF model:
    refused, naming the position."""
    pattern = "".join(layer_types)
    fits = [(t in mixers) if i % 2 == 0 else (t in ("-", "E")) for i, t in enumerate(layer_types)]
    if len(layer_types) % 2 or not all(fits):
        bad = fits.index(False) if not all(fits) else len(layer_types)
        pairs = " / ".join(f"'{m}-' / '{m}E'" for m in mixers)
        raise ArchMismatchError(
            f"arch {model_type!r} is a transformer ({' or '.join(map(repr, mixers))} then MLP/MoE in every layer); the model's "
            f"hybrid layer pattern {pattern!r} does not pair into {pairs} layers (layer {bad}"
            + (f" is {layer_types[bad]!r})" if bad < len(layer_types) else " is missing its MLP/MoE)")
        )
    return [i // 2 for i in range(len(layer_types))]


def model_info(chunks: list, layers: list[LayerRef], rule: Optional[ArchRule] = None) -> ModelInfo:
    cfg = chunks[0].config
    attrs = model_attrs(chunks)
    moe_layers: list[int]
    layer_types = hybrid_layer_types(chunks)
    if layer_types is not None and rule is not None and not rule.hybrid_native:
        # HybridModel as a transformer: HF layer k = Megatron layers 2k (attention), 2k+1 (MLP/MoE)
        hf_of = pair_hybrid_layers(layer_types, rule.model_type, rule.hybrid_mixers)
        moe_layers = sorted({hf_of[i] for i, t in enumerate(layer_types) if t == "E"})
        has_shared = bool(getattr(cfg, "moe_shared_expert_intermediate_size", None))
        has_bias = bool(getattr(cfg, "moe_router_enable_expert_bias", False))
        return ModelInfo(cfg, attrs, moe_layers, len(layer_types) // 2, has_shared, has_bias,
                         layer_types=layer_types, hf_layer_of=hf_of)
    if layer_types is not None:  # MambaModel: MoE exactly where the hybrid pattern says "E"
        moe_layers = [i for i, t in enumerate(layer_types) if t == "E"]
    else:
        moe_layers = moe_placement(cfg, layers)
    has_shared = bool(getattr(cfg, "moe_shared_expert_intermediate_size", None))
    has_bias = bool(getattr(cfg, "moe_router_enable_expert_bias", False))
    return ModelInfo(cfg, attrs, moe_layers, cfg.num_layers, has_shared, has_bias, layer_types=layer_types)


def build_plan(chunks: list, rule: ArchRule, layout: ParallelLayout) -> ExportPlan:
    layers = list(iter_layers(chunks))
    info = model_info(chunks, layers, rule)
    if info.moe_layers and not rule.supports_moe:
        raise ArchMismatchError(
            f"arch {rule.model_type!r} has no experts, but the model has MoE layers {info.moe_layers}"
        )
    if rule.check is not None:
        rule.check(info)
    # the semantics ledger: every forward-changing megatron-core field is mapped, checked or refused
    check_semantics(info, rule.model_type, rule.semantics)
    _check_shared_expert_interleave(info)
    plan = ExportPlan(rule, info, layout, chunks=chunks)
    dense_owner = layout.owns_dense
    for chunk in chunks:
        if getattr(chunk, "pre_process", True) and getattr(chunk, "embedding", None) is not None:
            w = chunk.embedding.word_embeddings.weight
            plan.jobs.append(Job("embedding.word_embeddings.weight", (rule.embedding,), mk.rename, w, _tp_dim(w), layout.tp, False, dense_owner))
    _check_unmapped(chunks)
    for ref in layers:
        _plan_layer(plan, ref)
    for chunk in chunks:
        if not getattr(chunk, "post_process", True):
            continue
        fl, fl_name = final_norm(chunk.decoder)
        if fl is not None:
            plan.jobs.append(Job(f"{fl_name}.weight", (rule.final_norm,), mk.rename, fl.weight, None, layout.tp, False, dense_owner,
                                 transform=_applies(rule.final_norm_transform, info)))
            if getattr(fl, "bias", None) is not None:
                plan.jobs.append(Job(f"{fl_name}.bias", (rule.final_norm_bias,), mk.rename, fl.bias, None, layout.tp, False, dense_owner))
        out = getattr(chunk, "output_layer", None)
        if out is not None and not info.attrs.tie_word_embeddings:
            w = out.weight
            plan.jobs.append(Job("output_layer.weight", (rule.output,), mk.rename, w, _tp_dim(w), layout.tp, False, dense_owner))
    return plan


def _applies(transform: Optional[mk.ValueTransform], info: ModelInfo) -> Optional[mk.ValueTransform]:
    return transform if transform is not None and transform.when(info) else None


def _check_transform(job: Job) -> None:
    """A quantized weight is written packed: a value transform that cannot apply to packed
    data is refused here, before anything is written."""
    t = job.transform
    if t is not None and job.quant_module is not None and not t.packed and _has_quantizer(job.quant_module):
        raise ArchMismatchError(
            f"{job.source}: the export applies `{t.name}` to this tensor, which cannot be applied to "
            "its quantized (packed) form; export it unquantized (exclude it from quantization)"
        )


def _check_shared_expert_interleave(info: ModelInfo) -> None:
    """megatron-core 0.19 ``moe_shared_expert_glu_interleave_size``: the fused shared-expert
    path keeps ``mlp.shared_experts.linear_fc1`` rows in gate/up blocks (Megatron-Bridge
    de-interleaves them when it saves).  Not exported: refused by name, not guessed."""
    c = info.config
    size = getattr(c, "moe_shared_expert_glu_interleave_size", None)
    if size and info.has_shared_experts and c.gated_linear_unit:
        raise ArchMismatchError(
            f"mlp.shared_experts.linear_fc1 rows are interleaved in blocks of "
            f"moe_shared_expert_glu_interleave_size={size}; exporting interleaved shared experts is not supported"
        )


def _check_unmapped(chunks: list) -> None:
    """Nothing is dropped silently: multi-token-prediction layers (HF ignores ``mtp.*``) and
    any other parameter outside the mapped parts are named in a warning.  (Learned absolute
    position embeddings never get here: every rule's check requires rotary positions.)"""
    unmapped = sorted({n for c in chunks for n, _ in c.named_parameters() if not n.startswith(_MAPPED_PREFIXES)})
    mtp = [n for n in unmapped if n.startswith("mtp.")]
    other = [n for n in unmapped if not n.startswith("mtp.")]
    if mtp:
        log.warning("HF export: %d multi-token-prediction parameters (mtp.*) are not exported (HF models ignore them)", len(mtp))
    if other:
        log.warning("HF export: parameters outside the mapped layers are not exported: %s%s", other[:8], "..." if len(other) > 8 else "")


def _plan_layer(plan: ExportPlan, ref: LayerRef) -> None:
    rule, layout, cfg = plan.rule, plan.layout, plan.info.config
    hf_index = plan.info.hf_layer_of[ref.index] if plan.info.hf_layer_of is not None else ref.index
    prefix = rule.layer_prefix.format(L=hf_index)
    layer = ref.module
    gated = bool(cfg.gated_linear_unit)
    experts_mod = getattr(getattr(layer, "mlp", None), "experts", None)
    for name, tensor in named_tensors(layer):
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if experts_mod is not None and name.startswith("mlp.experts."):
            continue  # mapped once per expert below
        entry: Entry = rule.entry(name)
        targets = tuple(prefix + t for t in entry.targets)
        module_name, _, leaf = name.rpartition(".")
        module = layer.get_submodule(module_name) if module_name else layer
        quant_mod = module if leaf == "weight" and _has_quantizer(module) else None
        glu = entry.kind is mk.glu_split
        if glu and not gated:
            raise ArchMismatchError(f"layer {ref.index}: `{name}` is not gated but arch {rule.model_type!r} expects gate/up")
        tp_dim = _tp_dim(tensor)
        if tp_dim is None and entry.tp_split is not None and layout.tp.size > 1:
            tp_dim = entry.tp_split
        kind = entry.kind
        bind = getattr(kind, "bind_tp", None)
        if bind is not None:
            # a kind whose row order depends on how the tensor is split (fused projections
            # whose every TP shard holds a slice of each part, e.g. Mamba's in_proj)
            kind = bind(plan.info, layout.tp.size if tp_dim is not None else 1)
        plan.jobs.append(
            Job(
                f"layer {ref.index} {name}",
                targets,
                kind,
                tensor,
                tp_dim,
                layout.tp,
                glu,
                layout.owns_dense,
                quant_module=quant_mod,
                keep_fp32=name.endswith("expert_bias"),
                transform=_applies(entry.transform, plan.info),
            )
        )
        _check_transform(plan.jobs[-1])
    if experts_mod is not None:
        if rule.expert_stack:
            _plan_expert_stack(plan, ref, experts_mod, prefix, gated)
        else:
            _plan_experts(plan, ref, experts_mod, prefix, gated)


def _glu_interleave(plan: ExportPlan, ref: LayerRef, experts, views, gated: bool) -> Optional[int]:
    """``moe_mlp_glu_interleave_size`` where it changes the stored row order: only megatron-core's
    ``TEGroupedMLP`` (per-expert or single grouped weight) applies it, ``SequentialMLP`` experts
    are plain ``MLP`` modules that never read it (megatron-core 0.19.2 ``moe/experts.py``).
    Every expert-TP shard's gate and up halves must be whole blocks; refused here otherwise."""
    size = getattr(plan.info.config, "moe_mlp_glu_interleave_size", None)
    if not gated or not size or detect_layout(experts) != "te_grouped":
        return None
    size = int(size)
    for v in views:
        local = int(v.fc1.weight.shape[0])
        if local % (2 * size):
            raise ArchMismatchError(
                f"layer {ref.index} expert {v.global_index} ({v.fc1.name}): {local} fc1 rows on this rank "
                f"do not split into gate/up blocks of moe_mlp_glu_interleave_size={size}"
            )
    return size


def _plan_experts(plan: ExportPlan, ref: LayerRef, experts, prefix: str, gated: bool) -> None:
    rule, layout = plan.rule, plan.layout
    names = rule.expert_names
    # EP rank r holds global experts r*n .. r*n+n-1 (errors name the global id too)
    offset = layout.ep.rank * _num_local_experts(experts, detect_layout(experts))
    views = list(iter_experts(experts, ref.index, offset, "mlp.experts"))
    interleave = _glu_interleave(plan, ref, experts, views, gated)
    for v in views:
        g = offset + v.local_index
        if gated:
            if "gate" not in names:
                raise ArchMismatchError(f"arch {rule.model_type!r} has non-gated experts; layer {ref.index} experts are gated")
            fc1_targets = (prefix + names["gate"].format(E=g), prefix + names["up"].format(E=g))
            # interleaved blocks: a plain gather (each shard keeps its own blocks), then the
            # TP-aware row selection; otherwise the gate/up-aware gather and a half split
            kind = mk.glu_interleaved(interleave, layout.etp.size) if interleave else mk.glu_split
        else:
            if "gate" in names:
                raise ArchMismatchError(f"arch {rule.model_type!r} needs gated experts; layer {ref.index} experts are not gated")
            fc1_targets = (prefix + names["up"].format(E=g),)
            kind = mk.rename
        fc2_targets = (prefix + names["down"].format(E=g),)
        for lin, targets, k in ((v.fc1, fc1_targets, kind), (v.fc2, fc2_targets, mk.rename)):
            qmod = lin.module if _has_quantizer(lin.module) else None
            where = f"layer {ref.index} expert {g} ({lin.name})"
            plan.jobs.append(
                Job(where, targets, k, lin.weight, lin.tp_dim if layout.etp.size > 1 else None, layout.etp,
                    k is mk.glu_split, layout.owns_experts, quant_module=qmod, quant_index=lin.quant_index)
            )
            bias = _expert_bias(lin, where)
            if bias is not None:
                btargets = tuple(t[: -len("weight")] + "bias" for t in targets)
                bdim = 0 if lin.tp_dim == 0 and layout.etp.size > 1 else None
                plan.jobs.append(Job(where + " bias", btargets, k, bias, bdim, layout.etp, k is mk.glu_split, layout.owns_experts))


def _plan_expert_stack(plan: ExportPlan, ref: LayerRef, experts, prefix: str, gated: bool) -> None:
    """One job per projection (and bias) of the layer: the local experts stacked on dim 0,
    gathered over the expert-parallel group to its rank 0, which alone writes the layer's
    HF tensor (so no rank holds more than one layer's experts at a time)."""
    rule, layout = plan.rule, plan.layout
    where0 = f"layer {ref.index} experts"
    if layout.etp.size > 1:
        raise ArchMismatchError(
            f"{where0}: arch {rule.model_type!r} stores all experts of a layer in one tensor; exporting it "
            f"with expert tensor parallelism ({layout.etp.size} ranks) is not supported"
        )
    offset = layout.ep.rank * _num_local_experts(experts, detect_layout(experts))
    views = list(iter_experts(experts, ref.index, offset, "mlp.experts"))
    if _glu_interleave(plan, ref, experts, views, gated):
        raise ArchMismatchError(f"{where0}: moe_mlp_glu_interleave_size is not supported with stacked experts")
    owner = layout.owns_experts and layout.ep.rank == 0
    for proj in ("fc1", "fc2"):
        stack = rule.expert_stack.get(proj)
        if stack is None:
            raise ArchMismatchError(f"arch {rule.model_type!r} has no stacked-expert place for {proj}")
        lins = [getattr(v, proj) for v in views]
        quantized = [lin.name for lin in lins if _has_quantizer(lin.module)]
        if quantized:
            raise ArchMismatchError(
                f"{where0}: arch {rule.model_type!r} stacks experts into one tensor, which the quantized "
                f"export does not pack; {quantized[0]} is quantized (exclude the experts from quantization)"
            )
        weights = [lin.weight for lin in lins]
        _stack_job(plan, f"{where0} {proj}", prefix + stack.target, weights, stack.transform, owner)
        biases = [_expert_bias(lin, f"layer {ref.index} expert {offset + v.local_index} ({lin.name})") for v, lin in zip(views, lins)]
        if any(b is not None for b in biases):
            if stack.bias_target is None or any(b is None for b in biases):
                raise ArchMismatchError(f"{where0}: {proj} has biases, which arch {rule.model_type!r} has no place for")
            _stack_job(plan, f"{where0} {proj} bias", prefix + stack.bias_target, biases, stack.bias_transform, owner)


def _stack_job(plan: ExportPlan, where: str, target: str, parts: list, transform, owner: bool) -> None:
    shapes = {tuple(p.shape) for p in parts}
    if len(shapes) != 1:
        raise ArchMismatchError(f"{where}: experts have different shapes {sorted(shapes)}; they cannot be stacked")
    meta = torch.empty((len(parts), *shapes.pop()), dtype=parts[0].dtype, device="meta")
    ep = plan.layout.ep
    plan.jobs.append(Job(where, (target,), mk.rename, meta, 0 if ep.size > 1 else None, ep, False, owner,
                         transform=transform, parts=parts))


def _expert_bias(lin, where: str) -> Optional[torch.Tensor]:
    """The expert linear's bias, or None when it has none.

    Transformer Engine's linears built without bias keep ``bias`` as an empty tensor of
    shape ``(0,)`` (a plain attribute, ``use_bias=False``), not None: that placeholder is
    no bias.  Any other bias must have one value per output row."""
    b = lin.bias
    if b is None:
        return None
    registered = getattr(lin.module, "_parameters", {}).get("bias") is b
    if b.numel() == 0 and not registered and not getattr(lin.module, "use_bias", False):
        return None
    if tuple(b.shape) != (lin.weight.shape[0],):
        raise ArchMismatchError(f"{where}: bias has shape {tuple(b.shape)}, expected ({lin.weight.shape[0]},) for weight {tuple(lin.weight.shape)}")
    return b


def attention_shape(cfg) -> mk.AttentionShape:
    return mk.AttentionShape(
        num_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups or cfg.num_attention_heads,
        head_dim=cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads,
    )
