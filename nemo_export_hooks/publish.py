"""Deprecated: the export directory now lives in :mod:`nemo_export_hooks.store` (names in
``store.layout``, file-system helpers in ``store.fs``, the manifest and ownership in
``store.manifest``, staging/publish/latest/retention in ``store.commit``, the reader in
``store.verify``; the public ``verify_export`` in :mod:`nemo_export_hooks.verify`).

This module re-exports the old names for one release so that imports in tests, recipes
and users' code keep working; new code imports from ``store/``.
"""

from __future__ import annotations

import uuid  # noqa: F401  (tests patch ``publish.uuid.uuid4``)

from .store.commit import (  # noqa: F401
    LATEST_LOCK_TIMEOUT_S,
    apply_retention,
    clean_stale_staging,
    make_staging_dir,
    publish,
    update_latest,
)
from .store.commit import _latest_target  # noqa: F401
from .store.fs import (  # noqa: F401
    CONFIG_MAX_BYTES,
    JSON_MAX_BYTES,
    JSON_MAX_DEPTH,
    TREE_MAX_DEPTH,
    TREE_MAX_ENTRIES,
    PathLike,
    release_staging,
    staging_in_use,
)
from .store.fs import BadJSON as _BadJSON  # noqa: F401
from .store.fs import atomic_write_text as _atomic_write_text  # noqa: F401
from .store.fs import dir_lock as _dir_lock  # noqa: F401
from .store.fs import fsync_dir as _fsync_dir  # noqa: F401
from .store.fs import fsync_tree as _fsync_tree  # noqa: F401
from .store.fs import read_json as _read_json  # noqa: F401
from .store.fs import remove_tree as _remove_tree  # noqa: F401
from .store.fs import sha256_file as _sha256  # noqa: F401
from .store.layout import (  # noqa: F401
    INDEX_NAME,
    LATEST_LINK,
    LATEST_TXT,
    MANIFEST_NAME,
    PRODUCER_NAME,
    STAGING_MARKER,
    TRASH_MARKER,
    is_staging_name,
    is_trash_name,
    staging_name,
    trash_name,
)
from .store.manifest import (  # noqa: F401
    Ownership,
    deletable_export,
    is_our_export,
    new_run_id,
    ownership,
    read_manifest,
    write_manifest,
)
from .store.manifest import manifest_digest as _manifest_digest  # noqa: F401
from .store.manifest import manifest_step as _manifest_step  # noqa: F401
from .verify import verify_export  # noqa: F401

__all__ = [
    "MANIFEST_NAME",
    "PRODUCER_NAME",
    "STAGING_MARKER",
    "TRASH_MARKER",
    "staging_name",
    "trash_name",
    "is_staging_name",
    "is_trash_name",
    "make_staging_dir",
    "release_staging",
    "staging_in_use",
    "clean_stale_staging",
    "write_manifest",
    "read_manifest",
    "is_our_export",
    "publish",
    "verify_export",
    "update_latest",
    "apply_retention",
    "deletable_export",
    "new_run_id",
]
