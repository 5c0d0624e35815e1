#!/usr/bin/env bash
# On the device (no network): install the Mamba kernels staged by scripts/mamba_gpu/stage.sh
# into /root/site (beside TE 2.11 / megatron-core 0.16.1 / ModelOpt 0.47 of ../shared/gpu), and
# check that megatron-core's MambaMixer sees them.  Run from the project root, after the TE
# staging, with the staged folder carried (carry=[".gpu-mamba"]):
#
#   bash scripts/mamba_gpu/device_setup.sh            # MAMBA_WHEELS=<dir> (default .gpu-mamba)
#   CAUSAL_CONV1D_CUDA=1 bash scripts/mamba_gpu/device_setup.sh   # also build causal_conv1d's
#                                   # CUDA extension (MAX_JOBS=16, sm_90; not needed by the test)
#
# mamba-ssm is the pure-Python (Triton) build: its package __init__ imports the CUDA-only
# selective_scan_cuda (and Mamba-3's tilelang), which would make `import mamba_ssm.ops.triton...`
# fail and megatron-core set HAVE_MAMBA_SSM=False.  So the installed __init__.py is replaced by
# one that keeps __version__ and imports those top-level names only where they import
# (original kept as __init__.py.orig).  megatron-core imports only mamba_ssm.ops.triton.*.
set -uo pipefail
cd "$(dirname "$0")/../.."
SITE=${SITE:-/root/site}
WHEELS=${MAMBA_WHEELS:-$PWD/.gpu-mamba}
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
t0=$(date +%s)
mkdir -p "$SITE"
if ! python3 -c "import mamba_ssm.ops.triton.ssd_combined" >/dev/null 2>&1; then
  [ -f "$WHEELS/mamba_ssm-2.3.2.post1-py3-none-any.whl" ] || { echo "no $WHEELS/mamba_ssm-2.3.2.post1-py3-none-any.whl (carry .gpu-mamba)" >&2; exit 2; }
  (cd "$WHEELS" && sha256sum -c SHA256SUMS --quiet) || { echo "staged Mamba files do not match SHA256SUMS" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS/mamba_ssm-2.3.2.post1-py3-none-any.whl" 2>&1 | grep -v -i "warn" || true
  init=$SITE/mamba_ssm/__init__.py
  [ -f "$init.orig" ] || cp "$init" "$init.orig"
  python3 - "$init" <<'PY'
import sys
path = sys.argv[1]
lines = open(path + ".orig").read().splitlines()
out = ['"""mamba_ssm, Triton-only build (MAMBA_SKIP_CUDA_BUILD): scripts/mamba_gpu/device_setup.sh',
       'guards the top-level imports that need selective_scan_cuda / tilelang (see __init__.py.orig)."""']
for ln in lines:
    if ln.startswith("from ") or ln.startswith("import "):
        out += ["try:", "    " + ln, "except Exception:  # ImportError, or a kernel package failing at import", "    pass"]
    else:
        out.append(ln)
open(path, "w").write("\n".join(out) + "\n")
PY
fi
if [ "${CAUSAL_CONV1D_CUDA:-0}" = 1 ] && ! python3 -c "import causal_conv1d_cuda" >/dev/null 2>&1; then
  t1=$(date +%s)
  tmp=$(mktemp -d)
  tar xzf "$WHEELS/causal_conv1d-1.7.0.tar.gz" -C "$tmp"
  (cd "$tmp/causal_conv1d-1.7.0" && CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=9.0 \
     timeout 600 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" . 2>&1 | tail -5)
  echo "causal_conv1d CUDA build: $(( $(date +%s) - t1 )) s"
fi
python3 - <<'PY' 2>&1 | grep -v -i "warn"
import importlib
import mamba_ssm
print("mamba_ssm", mamba_ssm.__version__, mamba_ssm.__file__)
for mod in ("causal_conv1d", "causal_conv1d_cuda", "selective_scan_cuda", "triton", "einops"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod}: {getattr(m, '__version__', 'ok')}")
    except Exception as e:
        print(f"{mod}: not importable ({type(e).__name__}: {str(e)[:100]})")
try:
    import megatron.core.ssm.mamba_mixer as mm
    print("megatron.core.ssm.mamba_mixer: HAVE_MAMBA_SSM", mm.HAVE_MAMBA_SSM, "HAVE_EINOPS", mm.HAVE_EINOPS,
          "causal_conv1d_fn", "present" if mm.causal_conv1d_fn is not None else "None (nn.Conv1d fallback)")
except Exception as e:
    print(f"megatron-core mamba_mixer not importable ({type(e).__name__}: {e})")
PY
echo "mamba device_setup.sh: $(( $(date +%s) - t0 )) s"
