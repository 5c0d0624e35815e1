#!/usr/bin/env bash
# On the device (no network), from the project root: install the TE staged by
# scripts/te_gpu/stage.sh into /root/site_te and build its PyTorch extension for sm_90 against the
# image's torch (TE 2.11's build took 92-110 s on 16 cores).  Then
#   PYTHONPATH=/root/site19:/root/site_te:/root/site:$PWD     (scripts/gpu_suite.sh GPU_STACK=mc19te)
# gives megatron-core 0.19.2 + Bridge, this TE, and ModelOpt / the rest from the TE 2.11 site.
# TE_WHEELS=<dir> (default /root/stage_c/te, where gpu_unpack.sh c puts stream c).  Idempotent.
set -uo pipefail
cd "$(dirname "$0")/../.."
W=${TE_WHEELS:-/root/stage_c/te}
S=${TE_NEW_SITE:-/root/site_te}
if PYTHONPATH=$S python3 -c "import transformer_engine.pytorch" >/dev/null 2>&1; then
  echo "TE already in $S: $(PYTHONPATH=$S python3 -c 'import transformer_engine as t; print(t.__version__)' 2>/dev/null)"; exit 0
fi
(cd "$W" && sha256sum -c SHA256SUMS --quiet) || { echo "staged TE files in $W do not match SHA256SUMS" >&2; exit 2; }
V=$(cat "$W/VERSION")
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$S" \
  "$W"/transformer_engine_cu13-"$V"-*.whl "$W"/transformer_engine-"$V"-*.whl 2>&1 | grep -v -E "^WARNING: (Target directory|Running pip)" || true
b=$(mktemp -d)
tar xzf "$W/transformer_engine_torch-$V.tar.gz" -C "$b" --strip-components 1
(cd "$b" && PYTHONPATH=$S NVTE_CUDA_ARCHS=90 MAX_JOBS=16 NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_FRAMEWORK=pytorch \
  CUDNN_PATH=$(python3 -c 'import nvidia.cudnn,os;print(os.path.dirname(nvidia.cudnn.__file__))' 2>/dev/null || echo /opt/torch/.venv/lib/python3.12/site-packages/nvidia/cudnn) \
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$S-build" . > /tmp/te_new_build.log 2>&1) \
  || { tail -40 /tmp/te_new_build.log; exit 1; }
cp -r "$S-build"/transformer_engine/wheel_lib/* "$S"/transformer_engine/wheel_lib/ 2>/dev/null || cp -r "$S-build"/* "$S"/
cp -r "$S-build"/transformer_engine_torch-*.dist-info "$S"/ 2>/dev/null || true
echo "TE $V build + install: $(( $(date +%s) - t0 )) s"
PYTHONPATH=/root/site19:$S:/root/site python3 -c "import transformer_engine as t, transformer_engine.pytorch, megatron.core as m; print('TE', t.__version__, '+ megatron-core', m.__version__, 'ready')"
