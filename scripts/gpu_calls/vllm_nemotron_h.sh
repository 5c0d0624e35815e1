#!/usr/bin/env bash
# Device call: vLLM 0.26 serves the NemotronH exports (issue 26) that scripts/gpu_calls/nemotron_h.sh
# left in /tmp/nemotron_h_exports (bf16 vs transformers bf16; FP8 / NVFP4 vs Megatron's fake quant),
# one child process per format (VLLM_NH_FORMAT_TIMEOUT s each).  Needs vLLM in /root/vllm_site.
cd "$(dirname "$0")/../.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p /tmp/vllm_nh
PYTHONPATH=/root/site:/root/vllm_site:$PWD timeout ${VLLM_NH_TIMEOUT:-560} python3 tests/gpu/vllm_nemotron_h_smoke.py \
  --out /tmp/vllm_nh --timeout ${VLLM_NH_FORMAT_TIMEOUT:-180} ${VLLM_NH_ARGS:-} > /tmp/vllm_nh/smoke.log 2>&1
echo "vllm nemotron_h exit $?"
grep -E "^VLLM-NEMOTRON-H" /tmp/vllm_nh/smoke.log | cut -c1-1500
for f in /tmp/vllm_nh/vllm_nemotron_h_*.log; do [ -f "$f" ] && { echo "--- $f"; grep -E "Error|error|backend|Traceback" "$f" | tail -6 | cut -c1-300; }; done
tar czf "$OUT/vllm_nemotron_h.tgz" -C /tmp/vllm_nh .
