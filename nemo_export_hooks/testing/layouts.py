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

Weights are copied from the sequential experts, so the converted model computes the same
logits as before conversion.
"""

from __future__ import annotations

import io
import types

import torch

from .cpu import apply_cpu_shims


class GroupedLinearStandIn(torch.nn.Module):
    """CPU stand-in for TE ``GroupedLinear``: same parameter names and shapes."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor] | None):
        super().__init__()
        self.num_gemms = len(weights)
        self.use_bias = biases is not None
        for i, w in enumerate(weights):
            self.register_parameter(f"weight{i}", torch.nn.Parameter(w.detach().clone()))
            if biases is not None:
                self.register_parameter(f"bias{i}", torch.nn.Parameter(biases[i].detach().clone()))

    def get_extra_state(self):  # TE stores fp8 metadata here; an empty buffer when unused
        return io.BytesIO()

    def set_extra_state(self, state):
        pass

    def forward(self, x: torch.Tensor, m_splits: list[int]) -> torch.Tensor:
        outs = []
        for i, chunk in enumerate(torch.split(x, m_splits)):
            y = chunk @ getattr(self, f"weight{i}").t()
            if self.use_bias:
                y = y + getattr(self, f"bias{i}")
            outs.append(y)
        return torch.cat(outs) if outs else x.new_zeros(0, getattr(self, "weight0").shape[0])


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
        if self.config.gated_linear_unit:
            gate, up = torch.chunk(h, 2, dim=-1)
            h = self.config.activation_func(gate) * up
        else:
            h = self.config.activation_func(h)
        h = (h * permuted_probs.unsqueeze(-1)).to(h.dtype)
        return self.linear_fc2(h, splits), None


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
    from megatron.core.transformer.moe.experts import GroupedMLP

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
