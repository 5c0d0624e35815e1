"""``export_to_hf``: Megatron-Core model in memory -> Hugging Face checkpoint on disk.

The path of one export (see ARCHITECTURE.md): plan (no data, no collectives; every check
that can fail does so here, before anything is written) -> run jobs (TP gather inside each
group, pack, split) -> stream into this rank's shards in a staging directory -> rank 0
commits (index, config, manifest) -> atomic publish.  It is a collective: every rank calls
it with the same arguments.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

from . import parallel
from .execute import run_jobs
from .hf_config import build_hf_config, generation_config
from .hf_names import NameCheck, check_names
from .plan import ExportPlan, build_plan
from .rules import get_rule
from .source import unwrap_model
from ..store.layout import PRODUCER_NAME
from ..store.manifest import ownership

log = logging.getLogger("nemo_export_hooks")

_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def resolve_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"unsupported export dtype {dtype}; use bfloat16, float16 or float32")
        return dtype
    try:
        return _DTYPES[str(dtype).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unsupported export dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


@dataclass
class ExportResult:
    path: Path
    num_tensors: int
    total_bytes: int
    seconds: float
    files: list[str] = field(default_factory=list)
    quant_algo: Optional[str] = None
    # seconds per phase of the calling thread, which add up to at most ``seconds``: plan
    # (export_to_hf only), reserve (host pool; async), convert (gathers, casts, splits,
    # packing), copy (device->host), write (in the writer: writing, or waiting for its
    # threads), commit (index, config, manifest, publish); for a host snapshot, reserve,
    # convert and copy are the snapshot's (inside ``seconds`` when ``t0`` precedes it).  Then
    # the writer threads' busy seconds (mean per thread, beside the above, not added to
    # it): pwrite, hash, fsync, rename.
    phases: dict = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        return self.total_bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class PreparedExport:
    """A validated export: what will be written, before any tensor is touched."""

    plan: ExportPlan
    arch: str
    dtype: torch.dtype
    hf_config: dict
    quant_algo: Optional[str]
    quant_exclude: list[str] = field(default_factory=list)
    _layout: Optional[list] = field(default=None, repr=False, compare=False)

    def layout(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """``[(HF name, dtype, shape)]`` this rank will write, in order (from the plan, no data)."""
        if self._layout is None:
            from .execute import describe

            self._layout = describe(self.plan, self.dtype)
        return self._layout

    def _on_cuda(self) -> bool:
        return any(j.owner and j.tensor.device.type == "cuda" for j in self.plan.jobs)

    def tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        """Gather/pack/split this rank's tensors (a collective generator), converted on the
        weights' device and handed over on the host.  A tensor of a CPU model may share the
        model's storage: write it (or copy it) before the model changes.  Timed: ``.phases``."""
        from .snapshot import HostStream

        return HostStream(run_jobs(self.plan, self.dtype))

    def reserve_host(self) -> None:
        """Allocate (and page-lock, on a GPU) the host snapshot buffer now, e.g. at setup,
        so that the first ``host_snapshot`` does not pay for it.  Optional."""
        from . import snapshot

        snapshot.reserve(snapshot.layout_bytes(self.layout()), pin=self._on_cuda())

    def host_snapshot(self) -> list[tuple[str, torch.Tensor]]:
        """Materialise this rank's owned tensors in host memory (for async writes): one
        reused, page-locked buffer filled by non-blocking copies (``exporter/snapshot.py``).
        A collective; returns once every copy is complete.  The tensors are valid until the
        snapshot is written by ``write_prepared`` (which releases it) or ``.release()``-d."""
        from . import snapshot

        return snapshot.take(run_jobs(self.plan, self.dtype), self.layout(), on_cuda=self._on_cuda())


def prepare_export(model, arch: str, dtype=torch.bfloat16, hf_config_overrides: Optional[dict] = None, check_hf_keys: bool = True) -> PreparedExport:
    """Unwrap, plan and validate.  Raises before anything is written if the model does not
    fit ``arch``.  Collective only when ``check_hf_keys`` (a small gather of names)."""
    # Planning can fail on some ranks only (one stage's layers, one EP rank's experts): agree
    # before the first collective, so that every rank raises and none waits for the others.
    error = None
    try:
        rule = get_rule(arch)
        dtype = resolve_dtype(dtype)
        chunks = unwrap_model(model)
        layout = parallel.current_layout()
        plan = build_plan(chunks, rule, layout)
    except Exception as e:
        error = e
    parallel.raise_if_any_failed(error)
    parallel.raise_if_any_failed(parallel.check_gathers_aligned(plan.jobs, layout, as_error=True))
    quant_algo, quant_exclude = _quant_summary(plan)
    hf_config = build_hf_config(plan, dtype, hf_config_overrides)
    if check_hf_keys:
        check_names(plan, hf_config)
    return PreparedExport(plan, arch, dtype, hf_config, quant_algo, quant_exclude)


def _quant_summary(plan: ExportPlan) -> tuple[Optional[str], list[str]]:
    """Read every quantizer once at planning time, so errors (uncalibrated, unsupported
    format, mixed formats) surface before anything is written.  Returns the algorithm and
    the HF modules exported unquantized (the rule's patterns plus every linear weight
    without a quantizer), which readers must be told to skip."""
    algos: set[str] = set()
    plain: set[str] = set()
    error = None  # a quantizer can be bad on some ranks only (an uncalibrated expert)
    try:
        for j in plan.jobs:
            if not (j.owner and j.is_weight):
                continue
            spec = None
            if j.quant_module is not None:
                from . import quant  # lazy: only when quantizers exist

                spec = quant.read_quant_spec(j.quant_module, j.source, expert_index=j.quant_index)
            if spec is not None:
                algos.add(spec.algo)
                _check_packable(j, spec)
            elif j.tensor.dim() == 2:
                plain.update(t[: -len(".weight")] for t in j.targets)
    except Exception as e:
        error = e
    parallel.raise_if_any_failed(error)
    gathered = parallel.gather_objects((sorted(algos), sorted(plain))) or []
    summary = None
    if gathered:
        all_algos = sorted({a for g in gathered for a in g[0]})
        all_plain = sorted({m for g in gathered for m in g[1]})
        summary = (all_algos, all_plain)
    all_algos, all_plain = parallel.broadcast_object(summary)
    if not all_algos:
        return None, []
    if len(all_algos) > 1:
        raise ValueError(f"mixed quantization formats {all_algos} in one model are not supported yet")
    patterns = list(plan.rule.quant_exclude)
    exclude = patterns + [m for m in all_plain if not any(fnmatch.fnmatchcase(m, p) for p in patterns)]
    return all_algos[0], exclude


def _check_packable(job, spec) -> None:
    """The format's shape check on the *gathered* weight, at planning time, so a bad shape
    (NVFP4: an input dim that is no multiple of 16) fails before staging."""
    from . import quant
    from .execute import full_shape

    quant.check_packable(spec, full_shape(job))


def export_to_hf(
    model,
    out_dir: Union[str, Path],
    arch: str,
    dtype=torch.bfloat16,
    tokenizer: Any = None,
    hf_config_overrides: Optional[dict] = None,
    max_shard_size: Union[str, int] = "5GB",
    overwrite: bool = False,
    manifest_extra: Optional[dict] = None,
    writers: Optional[int] = None,
) -> ExportResult:
    """Export a Megatron-Core model to a Hugging Face checkpoint directory ``out_dir``.

    A collective: every rank calls it with the same arguments; each rank writes only the
    tensors it owns.  ``out_dir`` appears atomically (staging directory + rename); it must
    not exist unless ``overwrite=True`` and it holds an earlier export.  ``writers``:
    parallel part files (and threads) per rank, default :func:`writer.default_writers`.
    A model that does not fit ``arch`` raises ``ValueError`` before any tensor is
    converted, except for the comparison with the ``transformers`` class (names and
    shapes), which runs beside the write and raises before publishing.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    # The HF-name check (rank 0 builds the HF class on the meta device) runs beside the write
    # and refuses before anything is published; every other check has raised by now.
    prepared = prepare_export(model, arch, dtype, hf_config_overrides, check_hf_keys=False)
    names = NameCheck(prepared.plan, prepared.hf_config, background=True)
    return write_prepared(prepared, prepared.tensors(), out_dir, tokenizer, max_shard_size, overwrite, manifest_extra,
                          t0=t0, writers=writers, name_check=names, prepare_s=time.perf_counter() - t0)


def write_prepared(
    prepared: PreparedExport,
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: Path,
    tokenizer: Any = None,
    max_shard_size: Union[str, int] = "5GB",
    overwrite: bool = False,
    manifest_extra: Optional[dict] = None,
    t0: Optional[float] = None,
    group: Any = None,
    log_level: int = logging.INFO,
    writers: Optional[int] = None,
    name_check: Optional["NameCheck"] = None,
    prepare_s: Optional[float] = None,
    create_parent: bool = True,
) -> ExportResult:
    """Stream ``tensors`` into shards, commit on rank 0 and publish ``out_dir``.  Collective
    over ``group`` (default: the world); a background writer passes a group of its own.
    ``tensors`` may be a generator that gathers (sync) or a host snapshot (async; released
    once written).  ``writers``: parallel part files (and threads) per rank; default
    :func:`default_writers`.  ``name_check``: a :class:`NameCheck` running beside the
    write (world group only); its problem raises ``ValueError`` before publishing.
    ``create_parent=False``: ``out_dir``'s parent must exist (an export inside a checkpoint
    never re-creates a checkpoint directory that was rotated away)."""
    from ..store.commit import make_staging_dir, publish
    from ..store.manifest import write_manifest
    from .writer import STREAM_INFLIGHT_BYTES, ShardWriter, default_writers, final_shard_names, finalize_shards, parse_size

    t0 = time.perf_counter() if t0 is None else t0
    t_write = time.perf_counter()
    out_dir = Path(out_dir)
    layout = prepared.plan.layout
    rank0 = layout.world_rank == 0
    max_bytes = parse_size(max_shard_size)

    # One sequence, the same rounds on every rank whatever happens: (1) the coordinator opens
    # the staging directory; (2) every rank writes its own parts there; (3) each rank's report
    # (its {tensor: part}, bytes, part digests, or its failure) goes to the coordinator; (4) the
    # coordinator commits, or refuses naming the failed ranks, and every rank learns which.
    def open_staging() -> str:
        _check_out_dir(out_dir, overwrite)
        return str(make_staging_dir(out_dir, create_parent=create_parent))

    staging = Path(parallel.on_coordinator(open_staging, f"cannot export to {out_dir}", group))

    key_to_part: dict[str, str] = {}
    nbytes = 0
    # A write failure (disk full, permissions) on one rank must not leave the other ranks
    # waiting in a tensor-parallel gather: keep draining the (collective) generator without
    # writing; the failure travels in this rank's report.
    failure: Optional[BaseException] = None
    writer = None
    in_memory = hasattr(tensors, "release")  # a host snapshot: its tensors stay in memory anyway
    try:
        writer = ShardWriter(
            staging, max_bytes, prefix=f"rank{layout.world_rank:05d}", layout=prepared.layout(),
            writers=writers or default_writers(), max_inflight_bytes=None if in_memory else STREAM_INFLIGHT_BYTES,
        )
    except Exception as e:
        failure = e
    try:
        for name, t in tensors:
            if failure is None:
                try:
                    writer.add(name, t)
                except Exception as e:
                    failure = e
        if failure is None:
            key_to_part = writer.close()
            nbytes = writer.total_bytes
    except Exception as e:  # raised by the generator itself
        failure = failure or e
    try:
        if failure is not None:
            if writer is not None:
                writer.abort()  # no temporary part left behind, no writer thread still reading
            log.error("HF export failed while writing %s: rank %d: %s: %s", out_dir, layout.world_rank,
                      type(failure).__name__, failure)
            if parallel._world(group) == 1:
                shutil.rmtree(staging, ignore_errors=True)
                raise failure
    finally:
        if in_memory:
            tensors.release()  # nothing reads the snapshot any more: its buffer serves the next export
    t_commit = time.perf_counter()
    if name_check is not None:
        problem = name_check.result()  # a collective, reached by every rank (the loop above drains)
        if problem:
            if rank0:
                shutil.rmtree(staging, ignore_errors=True)
            raise ValueError(problem)

    # Small metadata only: each rank's {tensor: part file}, its byte count and the sha256 of
    # the parts it wrote (hashed while writing), so the coordinator never reads other ranks'
    # shards back; or the rank's failure.
    error = None if failure is None else f"rank {layout.world_rank}: {type(failure).__name__}: {failure}"
    reports = parallel.gather_objects(
        (error, key_to_part, nbytes, dict(writer.digests) if writer is not None and error is None else {}), group=group)

    def commit() -> tuple[int, int, list[str]]:
        try:
            failed = [r[0] for r in reports if r[0] is not None]
            if failed:  # each already names its rank and error
                raise parallel.RanksFailed("; ".join(failed))
            merged: dict[str, str] = {}
            digests: dict[str, dict] = {}
            total = 0
            for _, m, b, d in reports:
                merged.update(m)
                digests.update(d)
                total += b
            renamed = final_shard_names(merged.values())
            known = {renamed[part]: d for part, d in digests.items() if part in renamed}
            finalize_shards(staging, merged, total_size=total)
            _write_side_files(staging, prepared, tokenizer)
            manifest = {
                "arch": prepared.arch,
                "dtype": str(prepared.dtype).replace("torch.", ""),
                "num_tensors": len(merged),
                "total_bytes": total,
                "world_size": layout.world_size,
                "quant_algo": prepared.quant_algo,
                **(manifest_extra or {}),
            }
            write_manifest(staging, manifest, known=known)
            publish(staging, out_dir, overwrite=overwrite)
            return len(merged), total, sorted(p.name for p in out_dir.iterdir())
        except Exception:
            shutil.rmtree(staging, ignore_errors=True)  # nothing half-written where a reader looks
            raise

    n, total, files = parallel.on_coordinator(commit, f"HF export to {out_dir} failed", group)
    end = time.perf_counter()
    seconds = end - t0
    made = dict(getattr(tensors, "phases", None) or {})  # HostStream / HostSnapshot: reserve, convert, copy
    stream_s = 0.0 if in_memory else sum(made.values())  # a stream's work happened inside the write
    phases = {"plan_s": prepare_s, **made, "write_s": max(0.0, t_commit - t_write - stream_s),
              "commit_s": end - t_commit, **(writer.timings if writer is not None else {})}
    res = ExportResult(out_dir, n, total, seconds, files, prepared.quant_algo,
                       {k: round(v, 4) for k, v in phases.items() if v is not None})
    if rank0:
        log.log(log_level, "HF export %s: %d tensors, %.3f GB in %.2f s (%.2f GB/s; %s)", out_dir, n, total / 1e9, seconds,
                res.gb_per_s, ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in res.phases.items()))
    return res


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Before anything is written: ``out_dir`` can be published by renaming a staging
    directory onto it.  A symlink (dangling or not) is refused up front: the rename would
    replace the link itself, not write where it points, and publish would only find out
    after every shard was written."""
    if out_dir.is_symlink():
        target = os.readlink(out_dir)
        what = "a dangling symlink" if not out_dir.exists() else "a symlink"
        raise FileExistsError(
            f"{out_dir} is {what} (to {target}); an export is published by renaming a directory into place, "
            f"which would replace the link: remove it, or give the real directory ({os.path.realpath(out_dir)})"
        )
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a directory")
        try:
            entries = any(out_dir.iterdir())
        except OSError as e:
            raise _named(e, out_dir, "cannot list the export directory") from e
        if entries:
            if not overwrite:
                raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True to replace an earlier export)")
            if not ownership(out_dir).ours:
                raise FileExistsError(f"{out_dir} is not an export made by {PRODUCER_NAME}; refusing to overwrite it")
        else:
            try:
                out_dir.rmdir()  # an empty directory is replaced by the atomic rename
            except OSError as e:
                raise _named(e, out_dir, "cannot remove the empty export directory") from e


def _named(e: OSError, path: Path, what: str) -> OSError:
    """``e`` again, naming ``path`` and what was being done (a bare ENOSPC names no file)."""
    err = type(e)(e.errno, f"{what} {path}: {e.strerror or e}") if e.errno is not None else type(e)(f"{what} {path}: {e}")
    return err


def _write_text(path: Path, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise _named(e, path, "cannot write") from e


def _write_side_files(staging: Path, prepared: PreparedExport, tokenizer: Any) -> None:
    """config.json, generation_config.json, hf_quant_config.json and the tokenizer; every
    I/O error names its file."""
    cfg = dict(prepared.hf_config)
    if prepared.quant_algo:
        from . import quant
        from .._version import __version__

        hf_quant, qcfg = quant.quant_config_files(prepared.quant_algo, prepared.quant_exclude, __version__)
        _write_text(staging / "hf_quant_config.json", json.dumps(hf_quant, indent=2) + "\n")
        cfg["quantization_config"] = qcfg
    if tokenizer is not None:
        try:
            _save_tokenizer(tokenizer, staging)
        except OSError as e:
            raise _named(e, staging, f"cannot save the tokenizer ({getattr(e, 'filename', None) or type(tokenizer).__name__}) into") from e
    _write_text(staging / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    _write_text(staging / "generation_config.json", json.dumps(generation_config(cfg), indent=2) + "\n")


def _save_tokenizer(tokenizer: Any, staging: Path) -> None:
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(staging))
        return
    src = Path(tokenizer)
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer {tokenizer!r} is neither a tokenizer object nor a directory")
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json")
    copied = 0
    for n in names:
        if (src / n).is_file():
            shutil.copy2(src / n, staging / n)
            copied += 1
    if not copied:
        raise FileNotFoundError(f"no tokenizer files in {src} (looked for {', '.join(names)})")
