#!/usr/bin/env bash
# Device call: the GPU suite on TE 2.11 + megatron-core 0.16.1, then the gpt_oss TE diagnosis.
# Logs under $OUT (suite16.tgz holds the suite's files, gpt_oss_diag.json the diagnosis).
cd "$(dirname "$0")/../.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
mkdir -p /tmp/s16
OUT=/tmp/s16 GPU_STACK=mc16 GPU_SUITE_TIMEOUT=${SUITE_TIMEOUT:-260} bash scripts/gpu_suite.sh 2>&1 | tail -45
tar czf "$OUT/suite16.tgz" -C /tmp/s16 .
PYTHONPATH=/root/site:$PWD timeout ${DIAG_TIMEOUT:-150} python3 tests/gpu/diag_gpt_oss_te.py 2>&1 | grep -E "^\{|Error|error" | cut -c1-1500
