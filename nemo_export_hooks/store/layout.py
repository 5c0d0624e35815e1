"""Every name and marker of an export directory: the manifest, the index, the producer,
the hidden staging and trash names, the ``latest`` pointers.

Why one module: a reader (``verify``, retention, a resumed run) recognises an export, a
crash's leftovers or the ``latest`` pointer only by these names; a name spelled twice is
a name that drifts.
"""

from __future__ import annotations

import re
import uuid

__all__ = [
    "MANIFEST_NAME",
    "INDEX_NAME",
    "SINGLE_SHARD_NAME",
    "CONFIG_NAME",
    "GENERATION_CONFIG_NAME",
    "PRODUCER_NAME",
    "PRODUCER_NAMES",
    "LATEST_LINK",
    "LATEST_TXT",
    "RESERVED_NAMES",
    "STAGING_MARKER",
    "TRASH_MARKER",
    "STAGING_OVERHEAD",
    "LATEST_TMP_RE",
    "staging_name",
    "staging_prefix",
    "trash_name",
    "is_staging_name",
    "is_trash_name",
]

MANIFEST_NAME = "export_manifest.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_SHARD_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"

# The producer written into every manifest: the distribution name.  Manifests that spell
# it with an underscore (the Python package name, as ``hf_quant_config.json`` does) are
# recognised too, so that no export this library wrote stops being ours.
PRODUCER_NAME = "nemo-export-hooks"
PRODUCER_NAMES = (PRODUCER_NAME, "nemo_export_hooks")

LATEST_LINK = "latest"
LATEST_TXT = "latest.txt"
RESERVED_NAMES = (LATEST_LINK, LATEST_TXT)  # an export may not be called like the pointers

STAGING_MARKER = ".staging-"
TRASH_MARKER = ".trash-"
_STAGING_RE = re.compile(r"^\.(?P<final>.+)" + re.escape(STAGING_MARKER) + r"[0-9a-f]{8}$")
_TRASH_RE = re.compile(r"^\.(?P<final>.+)" + re.escape(TRASH_MARKER) + r"[0-9a-f]{8}$")
LATEST_TMP_RE = re.compile(r"^\.latest(\.txt)?\.tmp-[0-9a-f]{8}$")
# The longest name made from an export's name is its hidden staging sibling
# ``.{name}.staging-{8 hex}``: it must fit the file system too.
STAGING_OVERHEAD = len(".") + len(STAGING_MARKER) + 8


def staging_name(final_name: str) -> str:
    """Hidden staging name for an export called ``final_name``: ``.{name}.staging-{8 hex}``."""
    return f"{staging_prefix(final_name)}{uuid.uuid4().hex[:8]}"


def staging_prefix(final_name: str) -> str:
    """What every staging name of ``final_name`` starts with: ``.{name}.staging-``."""
    return f".{final_name}{STAGING_MARKER}"


def trash_name(final_name: str) -> str:
    """Hidden name an export is renamed to just before it is deleted: ``.{name}.trash-{8 hex}``."""
    return f".{final_name}{TRASH_MARKER}{uuid.uuid4().hex[:8]}"


def is_staging_name(name: str) -> bool:
    return bool(_STAGING_RE.match(name))


def is_trash_name(name: str) -> bool:
    return bool(_TRASH_RE.match(name))
