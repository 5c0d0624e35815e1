#!/usr/bin/env bash
# Device call: Megatron-Bridge kill-and-resume with the callback (issue 24, item 1): two retention
# cases, each a run killed after iteration 6 and a resume from iteration 2 with another data order;
# every export inside iter_N must hold iter_N's weights and the run keep its identity.
cd "$(dirname "$0")/../.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
mkdir -p /tmp/bres
OUT=/tmp/bres PYTHONPATH=/root/site19:/root/site:$PWD timeout ${RESUME_TIMEOUT:-450} python3 tests/gpu/bridge_resume_smoke.py \
  --budget $(( ${RESUME_TIMEOUT:-450} - 20 )) > /tmp/bres/driver.log 2>&1
echo "bridge_resume_smoke exit $?"; grep -v -E "^\s*$" /tmp/bres/driver.log | cut -c1-2000 | tail -25
tar czf "$OUT/bridge_resume.tgz" -C /tmp/bres .
