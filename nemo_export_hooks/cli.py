"""Command line: ``nemo-export-hooks <command>``.

Subcommands register themselves in :func:`build_parser` through an ``add_*_parser``
function that sets ``func`` (a callable taking the parsed args and returning an exit code),
so new commands (``export``, ``bench``) slot in without touching the others.  Heavy imports
(torch, Megatron) happen inside the command functions, keeping ``--help`` fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]


def _cmd_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .store.manifest import read_manifest
    from .verify import verify_export

    path = Path(args.dir)
    try:
        problems = verify_export(path, load_config=args.load_config)
    except (Exception, RecursionError) as e:  # any input ends in a one-line reason, never a traceback
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        print(f"FAILED: {path}: verify could not finish: {type(e).__name__}: {msg}")
        return 1
    if problems:
        print(f"FAILED: {path}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  - {p[:2000]}")
        return 1
    files = (read_manifest(path) or {}).get("files", {})
    nbytes = sum(int(info.get("bytes", 0)) for info in files.values())
    loaded = ", config loads in transformers" if args.load_config else ""
    print(f"OK: {path}: {len(files)} files, {nbytes} bytes ({nbytes / 1e9:.3f} GB) match the manifest{loaded}")
    return 0


def add_verify_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "verify",
        help="check an export against its manifest, index and config",
        description="Check sizes and sha256 of every file in the manifest (and that no file is "
        "unlisted), the safetensors index against the shard headers (both ways, and total_size), "
        "and load config.json with transformers' AutoConfig (offline).  Exit code 0 if good, 1 if not.",
    )
    p.add_argument("dir", metavar="DIR", help="export directory (or a 'latest' link to one)")
    p.add_argument(
        "--no-load-config",
        dest="load_config",
        action="store_false",
        help="only check that config.json is a JSON object; do not import transformers",
    )
    p.set_defaults(func=_cmd_verify)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemo-export-hooks",
        description="Export Megatron-Core models to Hugging Face checkpoints and check the results.",
    )
    try:
        from ._version import __version__ as version
    except Exception:  # pragma: no cover
        version = "0+unknown"
    parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_verify_parser(sub)
    # add_export_parser(sub)  -- the export subcommand registers here
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
