#!/usr/bin/env bash
# Device call: the Megatron-Bridge QAT recipe (NVFP4, FP8) with the callback; exports stay in
# /tmp/bridge_qat_smoke/<fmt>/ckpt/iter_*/hf for vLLM (vllm.sh serves them).
cd "$(dirname "$0")/../.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PYTHONPATH=/root/site19:/root/site:$PWD timeout ${QAT_TIMEOUT:-330} python3 tests/gpu/bridge_qat_smoke.py \
  --budget $(( ${QAT_TIMEOUT:-330} - 20 )) --work /tmp/bridge_qat_smoke > /tmp/bqat.log 2>&1
echo "bridge_qat_smoke exit $?"; grep -v -E "^\s*$" /tmp/bqat.log | cut -c1-3000 | tail -30
