"""Turn a model's ``SequentialMLP`` experts into the two grouped layouts, on CPU.

* ``TEGroupedMLP`` needs Transformer Engine, which cannot exist on CPU.  ``GroupedLinearStandIn``
  reproduces the state layout of TE's ``GroupedLinear`` exactly (``weight{i}``, ``bias{i}``,
  ``num_gemms``, ``use_bias``, ``_extra_state``) and computes the same function, so the
  exporter's grouped path is exercised with real values.  The real module is tested on the
  device (tests/gpu).
* ``SequentialMLP`` built with the TE spec (``moe_grouped_gemm=False``) holds one TE ``Linear``
  per expert projection.  ``TELinearStandIn`` reproduces its state: ``weight``, ``use_bias``,
  ``_extra_state``, and -- built without bias -- ``bias`` as an empty ``(0,)`` tensor that is a
  plain attribute, not a parameter (what TE does instead of ``None``).
* Legacy ``GroupedMLP`` is Megatron-Core's own class; only its CUDA kernel (grouped_gemm's
  ``gmm``) is replaced by a loop of matmuls.

* megatron-core >= 0.19, ``moe_single_grouped_weight`` (TE >= 2.14): TE's ``GroupedLinear``
  holds one ``weight`` ``[E_local, out, in]`` (a TE ``GroupedTensor``, which forbids indexing and
  exposes its per-expert views as ``quantized_tensors`` / ``split_into_quantized_tensors()``) and
  registers ``weight0..N-1`` as ``None``.  :class:`GroupedTensorStandIn` and
  ``GroupedLinearStandIn(single_grouped_weight=True)`` reproduce exactly that.
* :func:`to_mcore_te_grouped` builds megatron-core's *own* ``TEGroupedMLP`` (its forward, its
  ``moe_mlp_glu_interleave_size`` de-interleaving) around the GroupedLinear stand-in, so a
  layout's row order is checked against Megatron's code, not ours.

Weights are copied from the sequential experts, so the converted model computes the same
logits as before conversion.
"""

from __future__ import annotations

import io
import types

import torch

from .cpu import apply_cpu_shims


LEGACY_GROUPED_REMOVED = "megatron-core >= 0.17 removed the legacy GroupedMLP (supported on <= 0.16)"


def have_legacy_grouped() -> bool:
    """Whether this megatron-core still has the legacy ``GroupedMLP`` (removed in 0.17)."""
    try:
        from megatron.core.transformer.moe.experts import GroupedMLP  # noqa: F401
    except ImportError:
        return False
    return True


class GroupedTensorStandIn(torch.Tensor):
    """TE ``GroupedTensor`` (unquantized) as a ``single_grouped_weight`` parameter holds it:
    logical shape ``[num_tensors, *member_shape]``, indexing refused (TE: "GroupedTensor does
    not support indexing"), the members -- views of the same storage -- in
    ``quantized_tensors`` and from ``split_into_quantized_tensors()``."""

    @staticmethod
    def __new__(cls, data: torch.Tensor, members: list[torch.Tensor] | None = None):
        t = torch.Tensor._make_subclass(cls, data, data.requires_grad)
        t.quantized_tensors = members if members is not None else list(data.detach().unbind(0))
        return t

    def __getitem__(self, index):
        raise TypeError("TE GroupedTensor does not support indexing; use its quantized_tensors")

    def split_into_quantized_tensors(self) -> list[torch.Tensor]:
        return list(self.quantized_tensors)

    def detach(self):  # nn.Parameter(...) detaches: keep the members (TE's tensor does too)
        return GroupedTensorStandIn(torch.Tensor._make_subclass(torch.Tensor, self).detach(), self.quantized_tensors)


class GroupedLinearStandIn(torch.nn.Module):
    """CPU stand-in for TE ``GroupedLinear``: same parameter names and shapes.

    ``single_grouped_weight`` / ``single_grouped_bias`` (TE >= 2.14): one ``weight``
    ``[E, out, in]`` / ``bias`` ``[E, out]`` :class:`GroupedTensorStandIn` parameter, and
    ``weight{i}`` / ``bias{i}`` registered as ``None``, as TE's ``make_grouped_weights`` leaves
    them."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor] | None,
                 single_grouped_weight: bool = False, single_grouped_bias: bool = False):
        super().__init__()
        self.num_gemms = len(weights)
        self.use_bias = biases is not None
        self.single_grouped_weight = single_grouped_weight
        self.single_grouped_bias = bool(single_grouped_bias and biases is not None)
        self._register("weight", weights, single_grouped_weight)
        if biases is not None:
            self._register("bias", biases, self.single_grouped_bias)

    def _register(self, kind: str, tensors: list[torch.Tensor], single: bool) -> None:
        if single:
            stacked = torch.stack([t.detach() for t in tensors]).clone()
            self.register_parameter(kind, torch.nn.Parameter(GroupedTensorStandIn(stacked)))
            for i in range(len(tensors)):
                self.register_parameter(f"{kind}{i}", None)
        else:
            for i, t in enumerate(tensors):
                self.register_parameter(f"{kind}{i}", torch.nn.Parameter(t.detach().clone()))

    def expert_tensor(self, kind: str, i: int) -> torch.Tensor:
        single = self.single_grouped_weight if kind == "weight" else self.single_grouped_bias
        return getattr(self, kind).quantized_tensors[i] if single else getattr(self, f"{kind}{i}")

    def get_extra_state(self):  # TE stores fp8 metadata here; an empty buffer when unused
        return io.BytesIO()

    def set_extra_state(self, state):
        pass

    def forward(self, x: torch.Tensor, m_splits: list[int]) -> torch.Tensor:
        outs = []
        for i, chunk in enumerate(torch.split(x, m_splits)):
            y = chunk @ self.expert_tensor("weight", i).t()
            if self.use_bias:
                y = y + self.expert_tensor("bias", i)
            outs.append(y)
        return torch.cat(outs) if outs else x.new_zeros(0, self.expert_tensor("weight", 0).shape[0])


class TEGroupedLinearStandIn(GroupedLinearStandIn):
    """Megatron's ``TEGroupedLinear`` wrapper around the stand-in: built by megatron-core's own
    ``TEGroupedMLP`` (same constructor arguments), returns ``(output, bias)`` like the wrapper
    (``bias`` only with ``skip_bias_add``: one tensor per expert)."""

    SINGLE_GROUPED_WEIGHT = False

    def __init__(self, num_gemms, input_size, output_size, *, config, init_method=None, bias=False,
                 skip_bias_add=False, is_expert=True, **_groups_and_names):
        # _groups_and_names: tp_comm_buffer_name, tp_group (<= 0.16) / pg_collection, name (0.19)
        single_grouped_weight = self.SINGLE_GROUPED_WEIGHT
        dtype = config.params_dtype
        weights = [torch.empty(output_size, input_size, dtype=dtype) for _ in range(num_gemms)]
        for w in weights:
            if init_method is not None:
                init_method(w)
        biases = [torch.zeros(output_size, dtype=dtype) for _ in range(num_gemms)] if bias else None
        super().__init__(weights, biases, single_grouped_weight=single_grouped_weight)
        self.skip_bias_add = skip_bias_add

    def forward(self, x, m_splits):
        if self.skip_bias_add and self.use_bias:
            outs = [c @ self.expert_tensor("weight", i).t() for i, c in enumerate(torch.split(x, m_splits))]
            return torch.cat(outs), [self.expert_tensor("bias", i) for i in range(self.num_gemms)]
        return super().forward(x, m_splits), None


class TEGroupedLinearSingleStandIn(TEGroupedLinearStandIn):
    """The same with ``moe_single_grouped_weight`` (one grouped ``weight``)."""

    SINGLE_GROUPED_WEIGHT = True


class TEGroupedMLPStandIn(torch.nn.Module):
    """Module with ``TEGroupedMLP``'s attribute and state names (``linear_fc1``/``linear_fc2``)."""

    def __init__(self, seq_experts, config):
        super().__init__()
        self.config = config
        self.num_local_experts = len(seq_experts.local_experts)
        fc1 = [e.linear_fc1.weight for e in seq_experts.local_experts]
        fc2 = [e.linear_fc2.weight for e in seq_experts.local_experts]
        b1 = b2 = None
        if config.add_bias_linear:
            b1 = [e.linear_fc1.bias for e in seq_experts.local_experts]
            b2 = [e.linear_fc2.bias for e in seq_experts.local_experts]
        self.linear_fc1 = GroupedLinearStandIn(fc1, b1)
        self.linear_fc2 = GroupedLinearStandIn(fc2, b2)
        for name in ("linear_fc1", "linear_fc2"):
            _carry_quantizers([getattr(e, name) for e in seq_experts.local_experts], getattr(self, name))
        self.activation_func = seq_experts.local_experts[0].activation_func

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        splits = tokens_per_expert.tolist()
        h = self.linear_fc1(permuted_local_hidden_states, splits)
        c = self.config
        if c.gated_linear_unit:
            # TEGroupedMLP's unfused glu (megatron-core 0.15 moe/experts.py): clamped, offset
            gate, up = torch.chunk(h, 2, dim=-1)
            val = getattr(c, "activation_func_clamp_value", None)
            if val is not None:
                gate, up = gate.clamp(min=None, max=val), up.clamp(min=-val, max=val)
            h = c.activation_func(gate) * (up + getattr(c, "glu_linear_offset", 0.0))
        else:
            h = c.activation_func(h)
        probs = permuted_probs.unsqueeze(-1)
        h = (h * probs).to(h.dtype)
        fc2 = self.linear_fc2
        if not fc2.use_bias:
            return fc2(h, splits), None
        # TEGroupedMLP adds fc2's bias after the GEMM, weighted by the routing probability
        # (skip_bias_add, then _apply_bias), as SequentialMLP's experts do
        outs = []
        for i, (chunk, p) in enumerate(zip(torch.split(h, splits), torch.split(probs, splits))):
            outs.append(chunk @ fc2.expert_tensor("weight", i).t() + fc2.expert_tensor("bias", i) * p)
        return torch.cat(outs), None


class TELinearStandIn(torch.nn.Module):
    """CPU stand-in for the TE ``Linear`` inside Megatron's ``TEColumnParallelLinear`` /
    ``TERowParallelLinear`` (one expert projection of a TE-spec ``SequentialMLP``)."""

    def __init__(self, linear: torch.nn.Module):
        super().__init__()
        self.weight = torch.nn.Parameter(linear.weight.detach().clone())
        for attr in ("tensor_model_parallel", "partition_dim", "allreduce"):
            if hasattr(linear.weight, attr):
                setattr(self.weight, attr, getattr(linear.weight, attr))
        b = getattr(linear, "bias", None)
        self.use_bias = isinstance(b, torch.Tensor)
        if self.use_bias:
            self.bias = torch.nn.Parameter(b.detach().clone())
        else:  # TE: `bias = torch.Tensor().to(dtype=params_dtype, device=device); setattr(self, name, bias)`
            self.bias = torch.Tensor().to(dtype=self.weight.dtype)

    def get_extra_state(self):
        return io.BytesIO()

    def set_extra_state(self, state):
        pass

    def forward(self, x: torch.Tensor):
        y = torch.nn.functional.linear(x, self.weight)
        return y, (self.bias if self.use_bias else None)


def to_te_sequential(model) -> None:
    """Give every SequentialMLP expert TE-spec linears (same weights; no-bias state as TE keeps it)."""
    for layer in model.decoder.layers:
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        if experts is None or not hasattr(experts, "local_experts"):
            continue
        for e in experts.local_experts:
            e.linear_fc1 = TELinearStandIn(e.linear_fc1)
            e.linear_fc2 = TELinearStandIn(e.linear_fc2)


def _carry_quantizers(expert_linears: list, grouped: torch.nn.Module) -> None:
    """Give the stand-in the quantizer layout ModelOpt gives a TE ``GroupedLinear``: one
    ``GroupedQuantizer`` (a ModuleList, ``weight_quantizer.{i}``) holding each expert's own
    calibrated weight quantizer, and one shared ``input_quantizer``."""
    if not hasattr(expert_linears[0], "weight_quantizer"):
        return
    import copy

    from modelopt.torch.quantization.nn import GroupedQuantizer

    grouped.weight_quantizer = GroupedQuantizer(*(copy.deepcopy(lin.weight_quantizer) for lin in expert_linears))
    grouped.input_quantizer = copy.deepcopy(expert_linears[0].input_quantizer)


def interleave_glu_rows(t: torch.Tensor, size: int) -> torch.Tensor:
    """``cat(gate, up)`` rows (dim 0) -> blocks of ``size``: ``[g0, u0, g1, u1, ...]``, the
    layout ``TEGroupedMLP`` expects when ``moe_mlp_glu_interleave_size=size`` (checked against
    its ``_remove_glu_interleaving`` by the forward pass, tests/test_mcore19_layouts.py)."""
    rows = t.shape[0]
    return t.reshape(2, rows // (2 * size), size, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def to_mcore_te_grouped(model, single_grouped_weight: bool = False) -> None:
    """Replace every layer's SequentialMLP experts with megatron-core's real ``TEGroupedMLP``
    whose ``linear_fc1``/``linear_fc2`` are :class:`TEGroupedLinearStandIn` (per-expert
    ``weight{i}``, or one single grouped ``weight``), holding the same weights.  With
    ``config.moe_mlp_glu_interleave_size`` set, fc1 rows are stored interleaved, as a model
    trained with that option holds them."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    try:  # megatron-core >= 0.19
        from megatron.core.transformer.moe.experts import GroupedMLPSubmodules
    except ImportError:  # <= 0.18: TEGroupedMLP takes the dense MLP's submodules
        from megatron.core.transformer.mlp import MLPSubmodules as GroupedMLPSubmodules

    apply_cpu_shims()
    builder = TEGroupedLinearSingleStandIn if single_grouped_weight else TEGroupedLinearStandIn
    for layer in model.decoder.layers:
        mlp = getattr(layer, "mlp", None)
        experts = getattr(mlp, "experts", None)
        if experts is None or not hasattr(experts, "local_experts"):
            continue
        cfg = layer.config
        size = getattr(cfg, "moe_mlp_glu_interleave_size", None) if cfg.gated_linear_unit else None
        grouped = TEGroupedMLP(
            len(experts.local_experts), cfg, GroupedMLPSubmodules(linear_fc1=builder, linear_fc2=builder),
            pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        )
        with torch.no_grad():
            for i, e in enumerate(experts.local_experts):
                w1 = e.linear_fc1.weight
                grouped.linear_fc1.expert_tensor("weight", i).copy_(interleave_glu_rows(w1, size) if size else w1)
                grouped.linear_fc2.expert_tensor("weight", i).copy_(e.linear_fc2.weight)
        mlp.experts = grouped


def to_te_grouped(model) -> None:
    """Replace every layer's SequentialMLP experts with the TEGroupedMLP stand-in (same weights)."""
    for layer in model.decoder.layers:
        mlp = getattr(layer, "mlp", None)
        experts = getattr(mlp, "experts", None)
        if experts is not None and hasattr(experts, "local_experts"):
            mlp.experts = TEGroupedMLPStandIn(experts, layer.config)


class _GroupedGemmOps:
    """Stand-in for grouped_gemm's CUDA kernel: ``gmm(a, b, batch_sizes, trans_b)``."""

    @staticmethod
    def gmm(a, b, batch_sizes, trans_b=False):
        outs = []
        for i, chunk in enumerate(torch.split(a, batch_sizes.tolist())):
            w = b[i].t() if trans_b else b[i]
            outs.append(chunk @ w)
        return torch.cat(outs)


def _install_grouped_gemm_standin() -> None:
    from megatron.core.transformer.moe import grouped_gemm_util as gg

    if gg.grouped_gemm is None:
        gg.grouped_gemm = types.SimpleNamespace(ops=_GroupedGemmOps())
        gg.ops = gg.grouped_gemm.ops


def to_legacy_grouped(model) -> None:
    """Replace SequentialMLP experts with Megatron-Core's real legacy ``GroupedMLP``,
    copying each expert into its ``weight1``/``weight2`` view."""
    try:
        from megatron.core.transformer.moe.experts import GroupedMLP
    except ImportError:
        raise ImportError(LEGACY_GROUPED_REMOVED) from None

    apply_cpu_shims()
    _install_grouped_gemm_standin()
    for layer in model.decoder.layers:
        mlp = getattr(layer, "mlp", None)
        experts = getattr(mlp, "experts", None)
        if experts is None or not hasattr(experts, "local_experts"):
            continue
        n = len(experts.local_experts)
        kwargs = {}
        if hasattr(experts, "ep_group"):
            from megatron.core.process_groups_config import ProcessGroupCollection

            kwargs["pg_collection"] = ProcessGroupCollection.use_mpu_process_groups()
        grouped = GroupedMLP(n, layer.config, **kwargs)
        hidden = layer.config.hidden_size
        with torch.no_grad():
            w1 = grouped.weight1.view(n, hidden, -1)
            w2 = grouped.weight2.view(n, -1, hidden)
            for i, e in enumerate(experts.local_experts):
                w1[i].copy_(e.linear_fc1.weight.t())
                w2[i].copy_(e.linear_fc2.weight.t())
        mlp.experts = grouped
