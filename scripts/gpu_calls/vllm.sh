#!/usr/bin/env bash
# Device call: vLLM 0.26 serves QAT'd exports: the smoke's own FP8 / NVFP4 models (log-probs vs the
# fake-quantized Megatron forward) with `vllm.sh smoke`; the Bridge QAT recipe's last exports (vs the
# dequantized twin) with `vllm.sh serve`.
cd "$(dirname "$0")/../.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
P=/root/site:/root/vllm_site:$PWD
if [ "${1:-smoke}" = smoke ]; then
mkdir -p /tmp/vllm_q
PYTHONPATH=$P timeout ${VLLM_TIMEOUT:-300} python3 tests/gpu/vllm_quant_smoke.py --out /tmp/vllm_q > /tmp/vllm_q/smoke.log 2>&1
echo "smoke exit $?"
grep -E "VLLM-|backend|Error" /tmp/vllm_q/smoke.log | cut -c1-2500 | tail -25; echo ---; tail -15 /tmp/vllm_q/smoke.log | cut -c1-400
gzip -c /tmp/vllm_q/smoke.log > "$OUT/vllm_smoke.log.gz"
fi
if [ "${1:-smoke}" = serve ]; then
serve=$(ls -d /tmp/bridge_qat_smoke/*/ckpt/iter_*/hf 2>/dev/null | sort | awk -F/ '{k=$4} {last[k]=$0} END {for (k in last) print last[k]}' | paste -sd,)
echo "serving Bridge exports: $serve"
mkdir -p /tmp/vllm_q
[ -n "$serve" ] && PYTHONPATH=$P timeout ${SERVE_TIMEOUT:-200} python3 tests/gpu/vllm_quant_smoke.py --out /tmp/vllm_q --serve "$serve" > /tmp/vllm_q/serve.log 2>&1
echo "serve exit $?"
grep -E "VLLM-|backend|Error" /tmp/vllm_q/serve.log | cut -c1-2500 | tail -20; echo ---; tail -12 /tmp/vllm_q/serve.log | cut -c1-400
gzip -c /tmp/vllm_q/serve.log > "$OUT/vllm_serve.log.gz"
fi
cp /tmp/vllm_q/*.json "$OUT"/ 2>/dev/null; true
