#!/usr/bin/env bash
# On the device, from the project root. Keeps the chunk a carried folder holds, and once all of a
# stream's chunks are there, unpacks and installs it (scripts/gpu_stage_all.sh made the chunks).
#   bash scripts/gpu_unpack.sh keep .gpu/chunks/a01        copy one chunk to /root/chunks
#   bash scripts/gpu_unpack.sh a N                         stream a (N chunks): TE build + Bridge (+ mamba)
#   bash scripts/gpu_unpack.sh b N                         stream b (N chunks): vLLM into /root/vllm_site
#   bash scripts/gpu_unpack.sh c N                         stream c (N chunks): TE >= 2.14 into /root/site_te
# Installs: TE 2.11 / ModelOpt / megatron-core 0.16.1 in /root/site (../shared/gpu/device_setup.sh),
# megatron-core 0.19.2 + Bridge in /root/site19 (scripts/bridge_gpu/device_setup.sh), vLLM in
# /root/vllm_site; mamba's wheels wait in /root/stage_a/mamba (MAMBA_WHEELS= for scripts/mamba_gpu).
set -uo pipefail
root=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
cd "$root"
mkdir -p /root/chunks
case "${1:-}" in
  keep)
    shift
    for d in "$@"; do cp "$d"/* /root/chunks/; done
    ls /root/chunks | tr '\n' ' '; echo
    ;;
  a|b|c)
    s=$1 n=$2
    have=$(ls /root/chunks/$s.* 2>/dev/null | wc -l)
    [ "$have" -eq "$n" ] || { echo "stream $s: $have of $n chunks in /root/chunks"; exit 2; }
    t=$(date +%s)
    mkdir -p /root/stage_$s && cat /root/chunks/$s.* | tar xf - -C /root/stage_$s && rm -f /root/chunks/$s.*
    echo "stream $s unpacked in $(( $(date +%s) - t )) s"
    if [ "$s" = a ]; then
      mkdir -p /root/gpu && cp /root/stage_a/gpu/* /root/gpu/
      t=$(date +%s); bash /root/gpu/device_setup.sh 2>&1 | tail -6; echo "TE stack: $(( $(date +%s) - t )) s"
      t=$(date +%s); BRIDGE_WHEELS=/root/stage_a/bridge_whl bash scripts/bridge_gpu/device_setup.sh 2>&1 | tail -6
      echo "Bridge stack: $(( $(date +%s) - t )) s"
      # mamba (NemotronH) is unpacked in /root/stage_a/mamba and installed by the NemotronH call
      # (scripts/mamba_gpu/device_setup.sh), so that the other suites do not run its tests
    elif [ "$s" = c ]; then
      TE_WHEELS=/root/stage_c/te bash scripts/te_gpu/device_setup.sh 2>&1 | tail -6
    else
      t=$(date +%s)
      python3 -m pip install -q --no-deps --no-index --no-compile --no-cache-dir --target /root/vllm_site \
        /root/stage_b/vllm/*.whl 2>&1 | grep -v -E "^WARNING: (Target directory|Running pip)" | tail -5
      PYTHONPATH=/root/site:/root/vllm_site python3 -c "import vllm, torch; from vllm import LLM; print('vllm', vllm.__version__, 'torch', torch.__version__)"
      echo "vLLM install: $(( $(date +%s) - t )) s"
    fi
    ;;
  *) echo "usage: $0 keep DIR... | a N | b N | c N" >&2; exit 2 ;;
esac
