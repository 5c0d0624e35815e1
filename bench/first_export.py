"""First against later exports of one process (the writer's header-first layout, issue 17).

    .venv/bin/python bench/first_export.py [--root CHECKOUT] [--layers 4] [--repeat 3] [--out DIR]

Builds the Qwen3-MoE-shaped bench model (``bench/common.build_model``), exports a tiny model
first (imports and first-call costs a trainer has paid long before its first export), then
exports the bench model ``--repeat`` times into the same directory (removed, dirty pages
written back, before each), printing every export's seconds.  ``--root`` runs another
checkout's package (e.g. ``git archive <commit> | tar -x -C /tmp/old``) for a before/after.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench_out/first_export"))
    args = ap.parse_args(argv)
    root = args.root.resolve()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(root))
    from common import build_model, drop_dirty, quiet_env, rmtree

    quiet_env()
    from nemo_export_hooks import export_to_hf
    from nemo_export_hooks.testing.cpu import TinySpec, build_gpt, init_single_process

    init_single_process()
    out = args.out.resolve()
    warm = out.with_name(out.name + "-warm")
    export_to_hf(build_gpt(TinySpec()), warm, arch="qwen3_moe", dtype="bfloat16")
    rmtree(warm)
    model = build_model(args.layers)
    times = []
    for _ in range(args.repeat):
        rmtree(out)
        drop_dirty()
        t0 = time.perf_counter()
        res = export_to_hf(model, out, arch="qwen3_moe", dtype="bfloat16")
        times.append(time.perf_counter() - t0)
    shards = len(list(out.glob("*.safetensors")))
    rmtree(out)
    print(f"{root}: {res.total_bytes / 1e9:.2f} GB, {shards} shard(s); exports (first first): " + ", ".join(f"{t:.2f} s" for t in times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
