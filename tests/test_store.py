"""The export directory package (``nemo_export_hooks/store``): the one ownership answer,
the names it owns, and the import rules that keep the layers apart (checked by parsing
every module's imports, lazy ones included, so that they stay true)."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

import nemo_export_hooks
from nemo_export_hooks.store import layout
from nemo_export_hooks.store.manifest import Ownership, ownership, write_manifest

PKG = Path(nemo_export_hooks.__file__).parent


def _manifest(d: Path, producer="nemo-export-hooks", **meta) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    write_manifest(d, meta)
    if producer != layout.PRODUCER_NAME:
        m = json.loads((d / layout.MANIFEST_NAME).read_text())
        m["producer"]["name"] = producer
        (d / layout.MANIFEST_NAME).write_text(json.dumps(m))
    return d


def test_ownership_ours_with_run_and_step(tmp_path):
    o = ownership(_manifest(tmp_path / "e", run_id="r1", step=7))
    assert o.ours and o.run_id == "r1" and o.step == 7 and o.of_run("r1") and not o.of_run("r2")
    assert o.manifest["producer"]["name"] == layout.PRODUCER_NAME == "nemo-export-hooks"


def test_ownership_reads_both_producer_spellings(tmp_path):
    """Manifests spelling the producer with an underscore (the package name) stay ours."""
    o = ownership(_manifest(tmp_path / "e", producer="nemo_export_hooks", run_id="r1", step=3))
    assert o.ours and o.step == 3 and o.of_run("r1")


def test_ownership_refuses_foreign_missing_symlink_and_odd_steps(tmp_path):
    foreign = ownership(_manifest(tmp_path / "f", producer="someone-else", run_id="r1", step=1))
    assert not foreign.ours and foreign.run_id is None and foreign.step is None and "not written by nemo-export-hooks" in foreign.why_not
    (tmp_path / "plain").mkdir()
    assert "no readable export_manifest.json" in ownership(tmp_path / "plain").why_not
    assert ownership(tmp_path / "absent") == Ownership(False, None, "it is not a directory")
    os.symlink(tmp_path / "f", tmp_path / "link")
    _manifest(tmp_path / "ours", run_id="r1", step=1)
    os.symlink(tmp_path / "ours", tmp_path / "link2")
    assert not ownership(tmp_path / "link2").ours  # a link to our export is not our export
    assert ownership(_manifest(tmp_path / "b", step=True)).step is None  # a bool is no step
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / layout.MANIFEST_NAME).write_text("[1, 2")
    assert not ownership(tmp_path / "bad").ours


def test_one_staging_name_format():
    name = layout.staging_name("step=10-hf")
    assert name.startswith(layout.staging_prefix("step=10-hf")) and layout.is_staging_name(name)
    assert len(name) == len("step=10-hf") + layout.STAGING_OVERHEAD
    assert layout.is_trash_name(layout.trash_name("x")) and not layout.is_staging_name(layout.trash_name("x"))


def test_shims_reexport_the_store():
    from nemo_export_hooks import publish as P
    from nemo_export_hooks import targets as T
    from nemo_export_hooks.exporter import writer as W
    from nemo_export_hooks.store import commit, fs

    assert P.make_staging_dir is commit.make_staging_dir and P.INDEX_NAME == W.INDEX_NAME == layout.INDEX_NAME
    assert T.check_target is commit.check_target_dir and P.is_our_export("/nonexistent") is False
    assert W.read_safetensors_header is fs.read_safetensors_header and W.known_digest is fs.known_digest


# -- import rules -------------------------------------------------------------------------
def _imports(path: Path, root: Path = PKG.parent) -> set:
    """Every ``nemo_export_hooks`` module (or name in one) that ``path`` (a file of the
    package under ``root``) imports, anywhere in the file, as absolute dotted names."""
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    pkg = parts if parts[-1] == "__init__" else parts[:-1]
    pkg = [p for p in pkg if p != "__init__"]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in out if m == "nemo_export_hooks" or m.startswith("nemo_export_hooks.")}


def _modules(sub: str = "") -> dict:
    root = PKG / sub if sub else PKG
    return {p: _imports(p) for p in sorted(root.rglob("*.py"))}


def _offences(mods: dict, allowed) -> list:
    return [f"{p.relative_to(PKG)} imports {m}" for p, ms in mods.items() for m in sorted(ms) if not allowed(m)]


def _under(m: str, *prefixes: str) -> bool:
    return any(m == p or m.startswith(p + ".") for p in prefixes)


def test_store_imports_nothing_above_it():
    mods = _modules("store")
    assert mods and _offences(mods, lambda m: _under(m, "nemo_export_hooks.store", "nemo_export_hooks._version")) == []


def test_config_imports_no_exporter_nor_adapter():
    mods = {PKG / "config.py": _imports(PKG / "config.py")}
    bad = ("nemo_export_hooks.exporter", "nemo_export_hooks.integrations", "nemo_export_hooks.scheduler", "nemo_export_hooks.publish")
    assert _offences(mods, lambda m: not _under(m, *bad)) == []


def test_placement_imports_only_the_store():
    """Path policy sits between the config schema (which reads its name checks) and the
    store: it imports neither the config, the scheduler, the adapters nor the exporter."""
    mods = {PKG / "placement.py": _imports(PKG / "placement.py")}
    assert _offences(mods, lambda m: _under(m, "nemo_export_hooks.store")) == []


def test_exporter_imports_only_itself_the_store_and_the_version():
    """No exporter module imports the package ``__init__`` (for the version or anything
    else), the config, the scheduler or an adapter."""
    mods = _modules("exporter")
    allowed = ("nemo_export_hooks.exporter", "nemo_export_hooks.store", "nemo_export_hooks._version")
    assert mods and _offences(mods, lambda m: _under(m, *allowed)) == []


def test_import_rule_parser_sees_relative_and_lazy_imports(tmp_path):
    """The checker itself: a lazy ``from .. import __version__`` in an exporter module and a
    ``from ..exporter.writer import x`` in store/ are seen."""
    probe = tmp_path / "nemo_export_hooks" / "exporter" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    from .. import __version__\n    from ..store.fs import x\n")
    assert _imports(probe, tmp_path) == {"nemo_export_hooks", "nemo_export_hooks.__version__", "nemo_export_hooks.store.fs", "nemo_export_hooks.store.fs.x"}
