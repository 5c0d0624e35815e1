#!/usr/bin/env bash
# Run on the device, from the project root, with .gpu-bridge/p0 carried, after the shared TE staging
# (../shared/gpu: .gpu/p0..p3 copied to /root/gpu, /root/gpu/device_setup.sh -> TE 2.11, ModelOpt,
# omegaconf, hydra in /root/site). Installs megatron-core 0.19.2 + megatron-bridge 0.6.2 + the
# wheels of bridge-wheels.txt into /root/site19 (--no-index --no-deps), so that
#   PYTHONPATH=/root/site19:/root/site:$PWD
# gives megatron-core 0.19.2 (site19 shadows the 0.16.1 in /root/site), Bridge, TE and ModelOpt.
# Idempotent (a marker holds the wheel list); prints the versions it resolves.
set -euo pipefail
root=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
cd "$root"
W=${BRIDGE_WHEELS:-$root/.gpu-bridge/p0}
SITE=${TE_SITE:-/root/site}; S19=${BRIDGE_SITE:-/root/site19}; PY=${PY:-python3}
log() { echo "bridge_setup: $*"; }
# 1. TE 2.11 + ModelOpt in /root/site (shared staging); build it here if only its parts came.
#    BRIDGE_SETUP_DRYRUN=1 (CPU check of the install step only) skips steps 1 and 3.
DRY=${BRIDGE_SETUP_DRYRUN:-}
if [ -n "$DRY" ]; then log "dry run: not checking TE"
elif ! $PY -c "import sys; sys.path.insert(0, '$SITE'); import transformer_engine.pytorch, modelopt.torch.quantization" >/dev/null 2>&1; then
  if [ -f /root/gpu/device_setup.sh ] && [ -f /root/gpu/te.part.3 ]; then
    log "TE not installed yet: running /root/gpu/device_setup.sh"; bash /root/gpu/device_setup.sh
  else
    log "no TE in $SITE and no staged parts in /root/gpu: do the shared TE staging calls (p0..p3) first"; exit 2
  fi
fi
# 2. the Bridge set into /root/site19 (once per machine)
want=$(cat "$W/bridge-wheels.txt" 2>/dev/null || true)
if [ -f "$S19/.bridge_installed" ] && [ "$(cat "$S19/.bridge_installed")" = "$want" ]; then
  log "already installed in $S19"
else
  [ -d "$W" ] || { log "$W missing: carry .gpu-bridge/p0 (bash scripts/bridge_gpu/stage.sh here first)"; exit 2; }
  t=$(date +%s); rm -rf "$S19"
  # explicit tags: accept the manylinux_2_39 wheel (nvidia-resiliency-ext) whatever this pip's own probe says
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$S19" \
    --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    $(for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
      manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do echo --platform ${p}_x86_64; done) \
    --platform any "$W"/*.whl 2>&1 | grep -v -E "^WARNING: (Target directory|Running pip)" || true
  [ -d "$S19/megatron/bridge" ] && [ -d "$S19/megatron/core" ] || { log "pip install into $S19 failed"; exit 1; }
  echo "$want" > "$S19/.bridge_installed"
  log "installed $(ls "$W"/*.whl | wc -l) wheels into $S19 in $(( $(date +%s) - t )) s"
fi
# Bridge's initialize_megatron() calls megatron.core.datasets.utils.compile_helpers(), which runs
# `make -C megatron/core/datasets`; the 0.19.2 wheel ships the built helpers_cpp but no Makefile,
# so make fails and training exits (seen on the H200, 2026-12-01). An empty default target lets
# the prebuilt module be used.
mk="$S19/megatron/core/datasets/Makefile"
if [ -z "$DRY" ] && [ ! -f "$mk" ] && ls "$S19"/megatron/core/datasets/helpers_cpp*.so >/dev/null 2>&1; then
  printf 'all:\n\t@true\n' > "$mk"; log "wrote an empty $mk (prebuilt helpers_cpp)"
fi
# 3. versions, from the path the smoke uses
[ -n "$DRY" ] && { log "dry run: $(ls "$S19" | wc -l) entries in $S19"; exit 0; }
PYTHONPATH=$S19:$SITE:$root $PY - <<'PY'
import importlib.metadata as md, sys
import megatron.core, transformer_engine, torch, transformers
print("bridge_setup: python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__)
for d in ("megatron-core", "megatron-bridge", "transformer-engine", "nvidia-modelopt", "nvidia-resiliency-ext", "megatron-energon", "omegaconf", "hydra-core"):
    try:
        print(f"bridge_setup: {d} {md.version(d)}")
    except md.PackageNotFoundError:
        print(f"bridge_setup: {d} MISSING")
print("bridge_setup: megatron.core from", megatron.core.__file__)
import time
t = time.perf_counter()  # fail here, once, rather than in every smoke process
from megatron.bridge.training.pretrain import pretrain  # noqa: F401
from megatron.bridge.training.model_load_save import load_megatron_model  # noqa: F401
from megatron.core.dist_checkpointing.strategies.torch import HAVE_NVRX
print(f"bridge_setup: megatron.bridge.training.pretrain imports ({time.perf_counter() - t:.1f} s); nvrx async: {HAVE_NVRX}")
PY
