#!/usr/bin/env bash
# Device call: vLLM 0.26 serves QAT'd exports: the smoke's own FP8 / NVFP4 models (log-probs vs the
# fake-quantized Megatron forward), then the Bridge QAT recipe's last exports (vs the dequantized twin).
cd "$(dirname "$0")/../.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
P=/root/site:/root/vllm_site:$PWD
PYTHONPATH=$P timeout ${VLLM_TIMEOUT:-300} python3 tests/gpu/vllm_quant_smoke.py --out /tmp/vllm_q 2>&1 \
  | grep -E "VLLM-|Error|error|backend|Traceback" | cut -c1-2500 | tail -30
serve=$(ls -d /tmp/bridge_qat_smoke/*/ckpt/iter_*/hf 2>/dev/null | sort | awk -F/ '{k=$4} {last[k]=$0} END {for (k in last) print last[k]}' | paste -sd,)
echo "serving Bridge exports: $serve"
[ -n "$serve" ] && PYTHONPATH=$P timeout ${SERVE_TIMEOUT:-200} python3 tests/gpu/vllm_quant_smoke.py --out /tmp/vllm_q --serve "$serve" 2>&1 \
  | grep -E "VLLM-|Error|error|Traceback" | cut -c1-2500 | tail -20
cp /tmp/vllm_q/*.json "$OUT"/ 2>/dev/null; true
