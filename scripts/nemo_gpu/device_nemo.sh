#!/usr/bin/env bash
# Run on the device machine, from the project root, after the TE staging (../shared/gpu: .gpu/p0..p3
# copied to /root/gpu, device_setup.sh) with .gpu/nemo/n0 carried. Installs NeMo 2.7.3 + the extras
# the image lacks into /root/nemo_site (--no-index --no-deps), then runs tests/gpu/nemo_smoke.py.
# Extra arguments go to the smoke (e.g. --set checkpoint.async_save=false). Writes $OUT/nemo_smoke.log
# and $OUT/nemo_smoke.json. Exit status: the smoke's (0 only on success).
set -uo pipefail
root=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
cd "$root"
OUT=${OUT:-/tmp/nemo_out}; mkdir -p "$OUT"; export OUT
W=${NEMO_WHEELS:-$root/.gpu/nemo/n0}
SITE=${TE_SITE:-/root/site}; NSITE=${NEMO_SITE:-/root/nemo_site}; PY=${PY:-python3}
log() { echo "device_nemo: $*"; }
# 1. TE + megatron-core in /root/site (the shared staging); build it here if only the parts came.
if [ -n "${NEMO_SMOKE_CPU_DRYRUN:-}" ]; then log "CPU dry run: not checking TE"
elif ! $PY -c "import sys; sys.path.insert(0, '$SITE'); import transformer_engine.pytorch, megatron.core" 2>/dev/null; then
  if [ -f /root/gpu/device_setup.sh ] && [ -f /root/gpu/te.part.3 ]; then
    log "TE not installed yet: running /root/gpu/device_setup.sh"; bash /root/gpu/device_setup.sh || exit 1
  else
    log "no TE/megatron-core in /root/site and no staged parts in /root/gpu: do the TE staging calls first"; exit 2
  fi
fi
# 2. NeMo set into /root/nemo_site (once per machine)
if [ ! -f $NSITE/.nemo_smoke_installed ]; then
  [ -d "$W" ] || { log "$W missing: carry .gpu/nemo/n0 (bash scripts/nemo_gpu/stage_nemo.sh here first)"; exit 2; }
  t=$(date +%s)
  rm -rf "$NSITE"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$NSITE" "$W"/*.whl 2>&1 | grep -v "^WARNING: Target directory" || true
  [ -d "$NSITE/nemo" ] || { log "pip install into $NSITE failed"; exit 1; }
  touch $NSITE/.nemo_smoke_installed
  log "NeMo set installed in $NSITE in $(( $(date +%s) - t )) s"
fi
# 3. the smoke. /root/site (TE, mcore 0.16.1) first, then /root/nemo_site (NeMo, lightning 2.4.0,
#    which shadows the image's lightning 2.6), then the project; the image's site-packages last.
export PYTHONPATH=$SITE:$NSITE:$root
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
$PY -c "import torch, sys; print('device_nemo: python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
timeout ${NEMO_SMOKE_TIMEOUT:-480} $PY tests/gpu/nemo_smoke.py --log-dir "${NEMO_SMOKE_LOG_DIR:-/root/nemo_smoke_run.$(date +%s)}" "$@" 2>&1 | tee "$OUT/nemo_smoke.log"
rc=${PIPESTATUS[0]}
grep '^NEMO-SMOKE ' "$OUT/nemo_smoke.log" | tail -1 > "$OUT/nemo_smoke_line.json" || true
log "exit $rc"
exit $rc
