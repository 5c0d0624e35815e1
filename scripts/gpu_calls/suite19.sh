#!/usr/bin/env bash
# Device call: the GPU tests on megatron-core 0.19.2 (with TE 2.11): the 0.18+/0.19 layouts,
# Qwen3-Next on the TE spec, the TE layouts. Logs: $OUT/suite19.tgz.
# GPU_STACK=mc19te: with the TE >= 2.14 of stream c (runs the single-grouped-weight test).
cd "$(dirname "$0")/../.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
mkdir -p /tmp/s19
OUT=/tmp/s19 GPU_STACK=${GPU_STACK:-mc19} GPU_SUITE_TIMEOUT=${SUITE_TIMEOUT:-200} bash scripts/gpu_suite.sh \
  tests/gpu/test_gpu_mcore19.py tests/gpu/test_gpu_qwen3_next.py tests/gpu/test_gpu_te_layouts.py tests/gpu/test_gpu_te_moe.py 2>&1 | tail -40
tar czf "$OUT/suite19.tgz" -C /tmp/s19 .
