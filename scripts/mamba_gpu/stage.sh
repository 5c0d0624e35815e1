#!/usr/bin/env bash
# Stage the Mamba kernels megatron-core's MambaMixer needs on the device (issue 26), on THIS
# machine (network), into .gpu-mamba/ of the project root (ignored by git: added to
# .git/info/exclude).  Run from the project root:
#
#   bash scripts/mamba_gpu/stage.sh            # PY=<python with torch> to override
#
# What megatron-core 0.16.1 (ssm/mamba_mixer.py) imports, and what is built:
# * mamba_ssm.ops.triton.{layernorm_gated.RMSNorm, ssd_combined.mamba_chunk_scan_combined,
#   selective_state_update}: Triton only.  HAVE_MAMBA_SSM needs these imports to succeed.
#   -> mamba-ssm 2.3.2.post1 built here as a pure-Python wheel (MAMBA_SKIP_CUDA_BUILD=TRUE; no
#   selective_scan_cuda).  MAMBA_FORCE_BUILD=TRUE stops its setup.py from trying to download
#   a prebuilt wheel from GitHub (its CachedWheelsCommand does that unless FORCE_BUILD).
# * causal_conv1d (causal_conv1d_fn / _update): optional.  Without it (ImportError) the mixer's
#   non-memory-efficient path (use_mamba_mem_eff_path=False, what the GPU test uses) runs the
#   conv as the mixer's own nn.Conv1d.  The memory-efficient path
#   (mamba_split_conv1d_scan_combined) needs causal_conv1d's CUDA extension; not staged by default.
#   The sdist travels too, so device_setup.sh can build its extension (CAUSAL_CONV1D_CUDA=1).
# * einops: on the device image already.
# Output: .gpu-mamba/{mamba_ssm-2.3.2.post1-py3-none-any.whl, causal_conv1d-1.7.0.tar.gz,
#   causal_conv1d-1.7.0-py3-none-any.whl, SHA256SUMS}, well under one call's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DEST=$ROOT/.gpu-mamba
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || { echo "no python at $PY: set PY= to a python with torch (make test builds .venv)" >&2; exit 2; }
MAMBA_SDIST_SHA=104cc47e9101e5401a675fa2b784f2952b9b037f3b1dd83b5ac544394e95d028
CONV_SDIST_SHA=3202758494eaa7b597ce1c282dfa188889506bfcb92cad3c407d26736bfcd32b

mkdir -p "$DEST"
# the exclude file git reads ($ROOT/.git is a file in a worktree: use the common git dir)
common=$(git rev-parse --git-common-dir 2>/dev/null || echo "$ROOT/.git")
mkdir -p "$common/info"
grep -qxF "/.gpu-mamba/" "$common/info/exclude" 2>/dev/null || echo "/.gpu-mamba/" >> "$common/info/exclude"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# build tools for --no-build-isolation, beside (not inside) the project venv
"$PY" -m pip install -q --target "$work/bt" "wheel==0.45.1" "setuptools>=70,<80" 2>&1 | grep -v -i "warn\|dependency\|requires" || true
cd "$work"
for spec in "mamba-ssm 2.3.2.post1 mamba_ssm $MAMBA_SDIST_SHA" "causal-conv1d 1.7.0 causal_conv1d $CONV_SDIST_SHA"; do
  set -- $spec
  url=$(curl -fsS "https://pypi.org/simple/$1/" | grep -o "https://[^\"#]*/$3-$2.tar.gz" | head -1)
  [ -n "$url" ] || { echo "no sdist $3-$2.tar.gz on the index" >&2; exit 1; }
  curl -fsS -o "$3-$2.tar.gz" "$url"
  echo "$4  $3-$2.tar.gz" | sha256sum -c - >/dev/null || { echo "sha256 mismatch: $3-$2.tar.gz" >&2; exit 1; }
done
t0=$(date +%s)
PYTHONPATH=$work/bt MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
  CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
  "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$work/wh" \
  "./mamba_ssm-2.3.2.post1.tar.gz" "./causal_conv1d-1.7.0.tar.gz" 2>&1 | grep -v -i "warn\|pynvml" || true
if unzip -l "$work/wh/mamba_ssm-2.3.2.post1-py3-none-any.whl" | grep -q '\.so'; then
  echo "mamba_ssm wheel holds a compiled extension; expected pure Python" >&2; exit 1
fi
cp "$work/wh/"*.whl causal_conv1d-1.7.0.tar.gz "$DEST/"
cd "$DEST" && sha256sum ./*.whl ./*.tar.gz > SHA256SUMS
echo "staged in $DEST ($(du -sh "$DEST" | cut -f1), wheels built in $(( $(date +%s) - t0 )) s):"
ls -la "$DEST"
