#!/usr/bin/env bash
# Run every GPU test (tests/gpu, pytest marker `gpu`) in one go on the device machine and print
# a short results table last.  From the repository root, on a machine with CUDA:
#
#   bash scripts/gpu_suite.sh
#
# Transformer Engine 2.11 + megatron-core 0.16.1 + ModelOpt 0.47 must be installed in /root/site
# (see ../shared/gpu/README.md: stage .gpu/p0..p3, then /root/gpu/device_setup.sh); if they are
# not but the staged parts are in /root/gpu, this script runs device_setup.sh first.
# Writes under $OUT (default /tmp/gpu_out): gpu_suite.log, junit.xml, results.jsonl,
# te_names.txt, quant_scales.txt, table.txt.  Exit status: pytest's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
# GPU_STACK=mc19: megatron-core 0.19.2 (staged by scripts/bridge_gpu into /root/site19) ahead of
# the TE 2.11 stack's 0.16.1; default: megatron-core 0.16.1.
# GPU_STACK=mc19te: the same with the newer TE of stream c (/root/site_te, scripts/te_gpu) ahead of 2.11.
if [ "${GPU_STACK:-mc16}" = mc19 ]; then
  export PYTHONPATH=/root/site19:/root/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
elif [ "${GPU_STACK:-mc16}" = mc19te ]; then
  export PYTHONPATH=/root/site19:/root/site_te:/root/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=/root/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export GPU_RESULTS=$OUT/results.jsonl GPU_ARTIFACTS=$OUT
# fp32 comparisons without TF32 in cuBLAS (TE's GEMMs ignore torch's allow_tf32 flag): with it,
# a router's top-k can flip and glm4_moe's logits were 0.071 off on megatron-core 0.19.2; without,
# 4.2e-7 on both stacks (H200, 2026-12-03).  bf16 tests are unaffected.
export NVIDIA_TF32_OVERRIDE=${NVIDIA_TF32_OVERRIDE:-0}
rm -f "$GPU_RESULTS" "$OUT/te_names.txt" "$OUT/quant_scales.txt" "$OUT/junit.xml"

if ! python3 -c "import transformer_engine.pytorch, megatron.core" >/dev/null 2>&1; then
  if [ -f /root/gpu/device_setup.sh ]; then
    t0=$(date +%s)
    bash /root/gpu/device_setup.sh 2>&1 | tail -5
    echo "device_setup.sh: $(( $(date +%s) - t0 )) s"
  else
    echo "Transformer Engine / megatron-core missing and /root/gpu/device_setup.sh absent: GPU tests will skip" >&2
  fi
fi

python3 - <<'PY' 2>&1 | grep -v -i warn | tee "$OUT/versions.txt"
import importlib, torch
print("gpu:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
      "| torch", torch.__version__, "| cuda", torch.version.cuda)
for name, mod in (("transformer_engine", "transformer_engine"), ("megatron-core", "megatron.core"),
                  ("modelopt", "modelopt"), ("transformers", "transformers")):
    try:
        m = importlib.import_module(mod)
        print(f"{name}: {getattr(m, '__version__', '?')}")
    except Exception as e:
        print(f"{name}: not importable ({type(e).__name__}: {str(e)[:120]})")
PY

t0=$(date +%s)
timeout --signal=INT "${GPU_SUITE_TIMEOUT:-420}" python3 -m pytest -m gpu -q tests/gpu -rA -p no:cacheprovider \
  --junitxml="$OUT/junit.xml" -o junit_family=xunit1 "$@" 2>&1 | tee "$OUT/gpu_suite.log"
rc=${PIPESTATUS[0]}
echo "pytest exit $rc after $(( $(date +%s) - t0 )) s"
python3 tests/gpu/gpu_report.py "$OUT/junit.xml" "$GPU_RESULTS" | tee "$OUT/table.txt"
exit "$rc"
