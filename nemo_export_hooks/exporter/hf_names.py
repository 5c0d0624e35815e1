"""The Hugging Face name and shape check: the union of every rank's planned HF names and
shapes against the state dict of the ``transformers`` class built from the final config.

Why a module of its own, beside ``hf_config.py``: it is the HF side of an export (what the
HF class declares), not the driver.  ``api.prepare_export`` runs it in the foreground and
``api.export_to_hf`` beside the write; both through :class:`NameCheck`.  Quantized
exports add scale tensors beside each ``<module>.weight``; their name endings come from the
quantization formats' registry (``quant.tensor_suffixes``).
"""

from __future__ import annotations

from typing import Optional

from . import parallel, quant
from .hf_config import _no_init_weights, expected_hf_shapes, hf_model_class
from .plan import ExportPlan, attention_shape

__all__ = ["NameCheck", "check_names"]


def check_names(plan: ExportPlan, hf_config: dict) -> None:
    """Compare the union of all ranks' HF names *and shapes* with the state dict of the HF
    class built from the final config (overrides applied) on the meta device: zero missing,
    zero unexpected, every shape equal, or raise on every rank.  A mismatch names the
    overrides that differ from the model's own values: ``transformers`` would refuse such a
    checkpoint with size mismatches, or load it with weights left random."""
    problem = NameCheck(plan, hf_config, background=False).result()
    if problem:
        raise ValueError(problem)


class NameCheck:
    """The HF-name check of :func:`check_names`, optionally on a thread of rank 0.

    Building the HF class on the meta device takes seconds for a large MoE (about 2 s for
    4,719 tensors on the H200 host, 7 s on a 2-core CPU) and is cached per config, so it
    slowed only the first export of a process; ``api.export_to_hf`` runs it beside the
    write (``background=True``) and refuses before publishing.  The constructor gathers the
    planned names (a collective); :meth:`result` broadcasts rank 0's verdict (a collective)."""

    def __init__(self, plan: ExportPlan, hf_config: dict, background: bool):
        import threading

        self.problem: Optional[str] = None
        self._thread = None
        problem = None
        try:
            shapes = _planned_shapes(plan)
        except Exception as e:  # reported to every rank by result()
            shapes, problem = [], f"cannot compute the exported shapes: {type(e).__name__}: {e}"
        all_shapes = parallel.gather_objects((shapes, problem))
        if all_shapes is None or parallel.current_layout().world_rank != 0:
            return
        if background:  # import the class here: transformers' lazy imports are not thread-safe
            try:
                hf_model_class(hf_config)
            except Exception:  # noqa: BLE001 - run() reports it
                pass
            try:
                _no_init_weights()  # its imports (the thread enters a fresh one)
                import transformers.core_model_loading  # noqa: F401
            except ImportError:
                pass

        def run():
            self.problem = _names_problem(all_shapes, plan, hf_config)

        if background:
            self._thread = threading.Thread(target=run, daemon=True, name="hf-name-check")
            self._thread.start()
        else:
            run()

    def result(self) -> Optional[str]:
        if self._thread is not None:
            self._thread.join()
        return parallel.broadcast_object(self.problem)


def _names_problem(all_shapes: list, plan: ExportPlan, hf_config: dict) -> Optional[str]:
    """Rank 0: the first problem of the gathered ``(shapes, problem)`` per rank, or None."""
    try:
        problem = next((p for _, p in all_shapes if p), None)
        ours: dict[str, tuple] = {}
        dup = set()
        for r, _ in all_shapes:
            for n, shape in r:
                if n in ours:
                    dup.add(n)
                ours[n] = tuple(shape)
        if problem is not None:
            return problem
        try:
            expected = expected_hf_shapes(hf_config)
        except Exception as e:  # reported to every rank: raising here would strand them
            return f"cannot list the HF keys of {hf_config.get('architectures')}: {type(e).__name__}: {e}"
        if dup:
            return f"several tensors map to the same HF names: {sorted(dup)[:5]}"
        if expected is not None:
            return _names_shapes_problem(ours, expected, hf_config, _overridden(plan, hf_config))
        return None
    except Exception as e:  # noqa: BLE001 - a thread must hand back, not die
        return f"HF name check failed: {type(e).__name__}: {e}"


def _planned_shapes(plan: ExportPlan) -> list[tuple[str, tuple]]:
    """``(HF name, shape)`` of every tensor this rank will write, from the plan alone (no
    data moved): the TP-gathered shape, split by the job's row selection.  Quantized
    weights get their logical (unpacked) shape, which is what the HF class declares."""
    att = attention_shape(plan.info.config)
    out = []
    for j in plan.jobs:
        if not j.owner:
            continue
        full = list(j.tensor.shape)
        if j.tp_dim is not None and j.group.size > 1:
            full[j.tp_dim] *= j.group.size
        if not full:  # a scalar
            out.extend((t, ()) for t in j.targets)
            continue
        for target, rows in j.kind(j.targets, full[0], att):
            shape = (full[0] if rows is None else int(rows.numel()), *full[1:])
            out.append((target, tuple(j.transform.shape(shape)) if j.transform is not None else shape))
    return out


def _overridden(plan: ExportPlan, hf_config: dict) -> dict:
    """``{key: (final value, the model's value)}`` for config keys the overrides changed."""
    generated = plan.rule.build_config(plan.info)
    skip = ("torch_dtype", "quantization_config")
    return {k: (v, generated.get(k)) for k, v in hf_config.items() if k not in skip and generated.get(k, object()) != v}


def _names_shapes_problem(ours: dict, expected: dict, hf_config: dict, overridden: dict) -> Optional[str]:
    base = {n: s for n, s in ours.items() if not n.endswith(quant.tensor_suffixes())}
    missing = sorted(set(expected) - set(base))
    unexpected = sorted(set(base) - set(expected))
    wrong = sorted(n for n in set(base) & set(expected) if expected[n] is not None and tuple(base[n]) != tuple(expected[n]))
    if not (missing or unexpected or wrong):
        return None
    cls = hf_config["architectures"][0]
    parts = []
    if missing or unexpected:
        parts.append(
            f"exported names do not match {cls}: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    if wrong:
        shown = ", ".join(f"{n} is {list(base[n])} in the export, {list(expected[n])} in {cls}" for n in wrong[:4])
        parts.append(f"shapes do not match {cls} built from the config: {shown}{' ...' if len(wrong) > 4 else ''} ({len(wrong)} tensor(s))")
    if overridden:
        why = ", ".join(f"{k}={v!r} (the model has {m!r})" for k, (v, m) in sorted(overridden.items()))
        parts.insert(0, f"hf_config_overrides contradict the model's structure: {why}")
    return "; ".join(parts)
