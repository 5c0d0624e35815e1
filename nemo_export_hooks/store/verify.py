"""An HF-format reader: checks a published export against its manifest, its index, its
shard headers and (given the exporter's checks) the HF model class built from its
``config.json``.

Why here and not in the exporter: a checkpoint is read long after the exporter ran, by
the CLI and by tests, and the reader must not depend on how it was written.  What only
the exporter knows is passed in: the tensor-name suffixes of quantized formats
(``known_suffixes``: scales stored beside a weight, not in the HF class) and the
HF-class checks (:class:`ConfigChecks`).  Public callers use
:func:`nemo_export_hooks.verify.verify_export`, which passes both.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .fs import (
    CONFIG_MAX_BYTES,
    JSON_MAX_BYTES,
    TREE_MAX_DEPTH,
    TREE_MAX_ENTRIES,
    BadJSON,
    PathLike,
    read_json,
    read_safetensors_header,
    sha256_file,
)
from .layout import INDEX_NAME, MANIFEST_NAME, SINGLE_SHARD_NAME
from .manifest import manifest_digest

__all__ = ["ConfigChecks", "verify_export"]


@dataclass(frozen=True)
class ConfigChecks:
    """The checks of ``config.json`` against the HF model class, which need the exporter
    (and transformers): ``config_problems(cfg)`` (values of the wrong type or out of
    range), ``expected_hf_shapes(cfg)`` (``{name: shape}`` of the class built on the meta
    device, or ``None`` when it cannot be built) and ``short_repr`` for messages."""

    config_problems: Callable[[dict], list]
    expected_hf_shapes: Callable[[dict], Optional[dict]]
    short_repr: Callable[[Any], str] = repr
    # (safetensors dtype, stored shape) -> the shape the HF class declares (a packed format
    # stores two values a byte, say); the exporter's quantization formats know it
    logical_shape: Callable[[str, tuple], tuple] = lambda dtype, shape: tuple(shape)


def _tree(path: Path) -> tuple[list[Path], Optional[str]]:
    """Every entry under ``path`` (sorted; symlinks listed, not followed), walked without
    recursion, and why the walk stopped early (too deep, too many entries), or ``None``."""
    out: list[Path] = []
    stack = [(path, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            return sorted(out), f"{d.relative_to(path).as_posix() or '.'} cannot be listed: {e.strerror or e}"
        for e in entries:
            p = Path(e.path)
            out.append(p)
            if len(out) > TREE_MAX_ENTRIES:
                return sorted(out), f"it holds more than {TREE_MAX_ENTRIES} entries"
            if e.is_dir(follow_symlinks=False):
                if depth + 1 >= TREE_MAX_DEPTH:
                    return sorted(out), f"{p.relative_to(path).as_posix()}/: directories nested deeper than {TREE_MAX_DEPTH} levels"
                stack.append((p, depth + 1))
    return sorted(out), None


def verify_export(
    path: PathLike,
    load_config: bool = True,
    *,
    known_suffixes: Sequence[str] = (),
    config_checks: Optional[ConfigChecks] = None,
) -> list[str]:
    """Check an export; return human-readable problems (an empty list means it is good).

    Checks: the manifest exists and parses; every listed file exists with the recorded size
    and sha256; no file (but hidden ones) is missing from the manifest; the index is
    complete: every file it names exists and holds every key it maps there, every tensor of
    every shard is in the index (under that shard), ``total_size`` is the shards' tensor
    bytes, and the manifest's ``num_tensors`` / ``total_bytes`` agree with it; every JSON file
    parses and ``config.json`` is an object.  By default (``load_config=True``, what the CLI
    ``nemo-export-hooks verify`` does) it also loads the config with
    ``transformers.AutoConfig`` (offline), as a reader would, and builds the model class on
    the meta device to compare every tensor's name and shape with the shards (and refuses
    values of the wrong type or out of range), so that an export that passes loads: a
    ``config.json`` that contradicts its tensors is a problem here too.  ``load_config=False``
    (the CLI's ``--no-load-config``) checks files and index only, without transformers.
    No file may be a symlink.

    ``config_checks`` does the class comparison (none without it); ``known_suffixes``
    (``".weight_scale"``, ...) name the tensors of quantized formats that sit beside a
    weight and are not in the class.
    """
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a directory"]
    problems: list[str] = []
    tree, too_big = _tree(path)
    if too_big is not None:
        return [f"{path} is not an export: {too_big}"]
    # An export holds only regular files and directories: a symlink (a shard replaced by a
    # link to a file elsewhere) is content the manifest does not vouch for, and would change
    # when its target does.  (``path`` itself may be a link, e.g. ``latest``.)  A FIFO, a
    # socket or a device is never read.
    import stat

    for p in tree:
        rel = p.relative_to(path).as_posix()
        if p.is_symlink():
            problems.append(f"{rel}: is a symlink (to {os.readlink(p)}); an export holds only regular files")
            continue
        try:
            mode = p.lstat().st_mode
        except OSError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            problems.append(f"{rel}: is not a regular file; an export holds only regular files")

    manifest = None
    mpath = path / MANIFEST_NAME
    if not mpath.is_file():
        problems.append(f"{MANIFEST_NAME} is missing")
    else:
        try:
            manifest = read_json(mpath)
        except BadJSON as e:
            problems.append(f"{MANIFEST_NAME} {e}")
        except OSError as e:
            problems.append(f"{MANIFEST_NAME} cannot be read: {e}")
        if manifest is not None and not (isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)):
            problems.append(f"{MANIFEST_NAME} has no 'files' table")
            manifest = None
        if manifest is not None and "manifest_sha256" in manifest and manifest["manifest_sha256"] != manifest_digest(manifest):
            problems.append(f"{MANIFEST_NAME} was modified after it was written (its manifest_sha256 does not match)")

    listed: dict = manifest["files"] if manifest else {}
    for rel, info in sorted(listed.items()):
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            problems.append(f"{rel}: manifest entry points outside the export")
            continue
        fp = path / rel
        if fp.is_symlink():
            continue  # reported above
        if not fp.is_file():
            problems.append(f"{rel}: listed in the manifest but missing")
            continue
        if not isinstance(info, dict):
            problems.append(f"{rel}: malformed manifest entry {info!r}")
            continue
        size = fp.stat().st_size
        if size != info.get("bytes"):
            problems.append(f"{rel}: size is {size} bytes, manifest says {info.get('bytes')}")
            continue
        digest = sha256_file(fp)
        if digest != info.get("sha256"):
            problems.append(f"{rel}: sha256 is {digest}, manifest says {info.get('sha256')}")
    if manifest is not None:
        for p in tree:
            rel = p.relative_to(path).as_posix()
            if rel in listed or rel == MANIFEST_NAME or p.is_dir() or any(s.startswith(".") for s in Path(rel).parts):
                continue
            kind = "safetensors file" if p.name.endswith(".safetensors") else "file"
            problems.append(f"{rel}: {kind} not listed in the manifest")

    index_problems, counts = _check_index(path)
    problems.extend(index_problems)
    if manifest is not None and counts is not None:
        n_tensors, total = counts
        if isinstance(manifest.get("num_tensors"), int) and manifest["num_tensors"] != n_tensors:
            problems.append(f"{MANIFEST_NAME} says {manifest['num_tensors']} tensors, the shards hold {n_tensors}")
        if isinstance(manifest.get("total_bytes"), int) and manifest["total_bytes"] != total:
            problems.append(f"{MANIFEST_NAME} says {manifest['total_bytes']} tensor bytes, the shards hold {total}")

    for p in tree:
        if p.parent != path or not p.name.endswith(".json") or p.name in (MANIFEST_NAME, INDEX_NAME, "config.json"):
            continue
        if p.is_symlink():
            continue  # reported above
        try:
            read_json(p, CONFIG_MAX_BYTES if p.name == "generation_config.json" else JSON_MAX_BYTES)
        except BadJSON as e:
            problems.append(f"{p.name} {e}")
        except OSError as e:
            problems.append(f"{p.name} cannot be read: {e}")
    cpath = path / "config.json"
    if not os.path.lexists(cpath):
        problems.append("config.json is missing")
    elif not cpath.is_symlink():
        cfg = None
        try:
            cfg = read_json(cpath, CONFIG_MAX_BYTES)
        except BadJSON as e:
            problems.append(f"config.json {e}")
        except OSError as e:
            problems.append(f"config.json cannot be read: {e}")
        if cfg is not None and not isinstance(cfg, dict):
            problems.append("config.json is not a JSON object")
        elif cfg is not None and load_config:
            loaded = _load_config(path)
            problems.extend(loaded)
            if not loaded:
                problems.extend(_check_against_config(path, cfg, tuple(known_suffixes), config_checks))
    return problems


def _load_config(path: Path) -> list[str]:
    try:
        from transformers import AutoConfig
    except ImportError:
        return ['config.json cannot be loaded: transformers is not installed (pip install "nemo-export-hooks[hf]", or use --no-load-config)']
    try:
        AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        return [f"config.json does not load in transformers: {type(e).__name__}: {e}"]
    return []


def _shard_entries(fp: Path) -> dict:
    """The tensors of a safetensors file, ``{name: (dtype, shape, bytes)}``, after the
    library validated it (offsets inside the file, no gaps or overlaps)."""
    from safetensors import safe_open

    with safe_open(str(fp), framework="pt") as f:  # reads and validates the header only
        keys = set(f.keys())
    header = read_safetensors_header(fp)
    return {k: (v["dtype"], tuple(v["shape"]), v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items() if k in keys}


def _shard_header(fp: Path) -> dict:
    """The tensors of a safetensors file, ``{name: bytes}`` (see :func:`_shard_entries`)."""
    return {k: e[2] for k, e in _shard_entries(fp).items()}


def _check_against_config(path: Path, cfg: dict, known_suffixes: tuple, checks: Optional[ConfigChecks]) -> list[str]:
    """Names and shapes of the shards against the HF class built from ``config.json`` on
    the meta device, plus values transformers accepts but no model can have (wrong types,
    out of range).  Why: ``from_pretrained`` refuses a size mismatch, but leaves missing
    weights random without raising, and a bad value fails only in the forward pass.  A
    checkpoint that passes loads.  Nothing is checked without ``checks`` (the caller has no
    transformers)."""
    if checks is None:
        return []
    try:
        problems = checks.config_problems(cfg)
    except Exception as e:  # a value transformers' own config class chokes on
        return [f"config.json cannot be checked: {type(e).__name__}: {e}"]
    have: dict = {}
    files = [path / SINGLE_SHARD_NAME] if not (path / INDEX_NAME).is_file() else sorted(path.glob("*.safetensors"))
    for fp in files:
        if fp.is_symlink() or not fp.is_file():
            return problems  # reported above
        try:
            have.update(_shard_entries(fp))
        except Exception:
            return problems  # reported by the index check
    claimed = _claimed_counts_problems(cfg, have, checks.short_repr)
    if claimed:  # building the class from these counts could take minutes and gigabytes
        return problems + claimed
    try:
        expected = checks.expected_hf_shapes(cfg)
    except Exception as e:
        return problems + [f"config.json does not build a transformers model: {type(e).__name__}: {e}"]
    if expected is None:
        return problems
    cls = cfg["architectures"][0]
    base = {n: e for n, e in have.items() if not (known_suffixes and n.endswith(known_suffixes))}
    missing = sorted(set(expected) - set(base))
    unexpected = sorted(set(base) - set(expected))
    if missing:
        problems.append(f"{len(missing)} tensor(s) {cls} needs are in no shard (transformers would leave them random): {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) in the shards are not in {cls} built from config.json: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    wrong = []
    for n in sorted(set(base) & set(expected)):
        dtype, shape, _ = base[n]
        logical = checks.logical_shape(dtype, tuple(shape)) if checks is not None else tuple(shape)
        if expected[n] is not None and tuple(logical) != tuple(expected[n]):
            wrong.append(f"{n} is {list(logical)}, config.json gives {list(expected[n])}")
    if wrong:
        problems.append(f"{len(wrong)} tensor shape(s) do not match {cls} built from config.json: " + "; ".join(wrong[:4]) + (" ..." if len(wrong) > 4 else ""))
    return problems


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"\.experts\.(\d+)\.")
_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers")
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")


def _claimed_counts_problems(cfg: dict, have: dict, short_repr: Callable[[Any], str] = repr) -> list[str]:
    """config.json's layer and expert counts against the shard headers, before the model
    class is built from them: a count above what the shards hold would build a huge class
    (``num_hidden_layers: 100000``: minutes, gigabytes) only to report the tensors missing."""
    out = []
    layers = {int(m.group(1)) for n in have for m in [_LAYER_RE.search(n)] if m}
    experts = {int(m.group(1)) for n in have for m in [_EXPERT_RE.search(n)] if m}
    for keys, found, what in ((_LAYER_COUNTS, layers, "layer"), (_EXPERT_COUNTS, experts, "expert")):
        for k in keys:
            v = cfg.get(k)
            if not isinstance(v, int) or isinstance(v, bool):
                continue
            if what == "expert" and not found:
                continue  # experts stored fused (one tensor for all): their shapes are checked
            n = max(found) + 1 if found else 0
            if v > n:
                out.append(
                    f"config.json says {k}={short_repr(v)}, the shards hold {n} {what}(s)"
                    + (f" ({what} indices 0..{n - 1})" if n else "")
                    + f": transformers would leave the other {what}s random (the model class was not built from it)"
                )
    return out


def _shard_keys(fp: Path) -> set:
    return set(_shard_header(fp))


def _check_index(path: Path) -> tuple[list[str], Optional[tuple[int, int]]]:
    """Problems of the weights, and (tensors, tensor bytes) when they could be counted."""
    problems: list[str] = []
    ipath = path / INDEX_NAME
    if not ipath.is_file():
        if (path / SINGLE_SHARD_NAME).is_file():
            try:
                tensors = _shard_header(path / SINGLE_SHARD_NAME)
                return problems, (len(tensors), sum(tensors.values()))
            except Exception as e:
                problems.append(f"model.safetensors cannot be opened: {e}")
        else:
            problems.append(f"no weights: neither {INDEX_NAME} nor model.safetensors exists")
        return problems, None
    try:
        index = read_json(ipath)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise ValueError("'weight_map' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{INDEX_NAME} is not a valid index: {type(e).__name__}: {e}"], None
    by_file: dict[str, list[str]] = {}
    for key, fname in weight_map.items():
        by_file.setdefault(str(fname), []).append(key)
    n_tensors, total, complete = 0, 0, True
    for fname, keys in sorted(by_file.items()):
        fp = path / fname
        if Path(fname).name != fname or not fp.is_file():
            problems.append(f"{INDEX_NAME} maps {len(keys)} tensor(s) to {fname}, which does not exist")
            complete = False
            continue
        try:
            have = _shard_header(fp)
        except Exception as e:
            problems.append(f"{fname} cannot be opened as safetensors: {e}")
            complete = False
            continue
        n_tensors += len(have)
        total += sum(have.values())
        missing = sorted(set(keys) - set(have))
        if missing:
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            problems.append(f"{fname} lacks {len(missing)} key(s) the index maps to it: {missing[:5]}{more}")
        unindexed = sorted(k for k in have if weight_map.get(k) != fname)
        if unindexed:
            more = f" (+{len(unindexed) - 5} more)" if len(unindexed) > 5 else ""
            problems.append(f"{fname} holds {len(unindexed)} tensor(s) the index does not map to it: {unindexed[:5]}{more}")
    for p in sorted(path.glob("*.safetensors")):
        if p.name not in by_file:
            problems.append(f"{p.name}: safetensors file not referenced by {INDEX_NAME}")
    if not complete:
        return problems, None
    declared = (index.get("metadata") or {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
    if declared is not None and declared != total:
        problems.append(f"{INDEX_NAME} says total_size {declared}, the shards hold {total} tensor bytes")
    return problems, (n_tensors, total)

