#!/usr/bin/env bash
# Stage a newer Transformer Engine for the megatron-core 0.19.2 stack (issue 22, item 1): the
# single grouped expert weight (``moe_single_grouped_weight``) needs transformer-engine >= 2.14, and
# the shared staging (../shared/gpu) brings 2.11.  Run here, from the project root (network):
#
#   bash scripts/te_gpu/stage.sh                 # TE_VERSION=2.20.2 by default
#
# Output: .gpu-te/ (ignored by git): the CUDA 13 core wheel (276 MB for 2.20.2), the
# ``transformer-engine`` meta wheel, the ``transformer_engine_torch`` sdist (its extension is built
# on the device against the image's torch: scripts/te_gpu/device_setup.sh), SHA256SUMS.
# scripts/gpu_stage_all.sh packs it as stream c (about 5 chunks), installed by
# ``scripts/gpu_unpack.sh c N`` into /root/site_te; ``GPU_STACK=mc19te`` puts it ahead of TE 2.11.
# The sdist is fetched by URL: ``pip download`` would prepare its metadata, which installs torch.
set -euo pipefail
cd "$(dirname "$0")/../.."
V=${TE_VERSION:-2.20.2}
DEST=.gpu-te
common=$(git rev-parse --git-common-dir 2>/dev/null || echo .git)
mkdir -p "$common/info" "$DEST"
grep -qxF "/.gpu-te/" "$common/info/exclude" 2>/dev/null || echo "/.gpu-te/" >> "$common/info/exclude"
rm -f "$DEST"/*
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$DEST" \
  "transformer-engine-cu13==$V" "transformer-engine==$V" 2>&1 | grep -v "^WARNING: Location" || true
url=$(curl -fsS "https://pypi.org/simple/transformer-engine-torch/" | grep -o "https://[^\"#]*/transformer_engine_torch-$V.tar.gz" | head -1)
[ -n "$url" ] || { echo "no sdist transformer_engine_torch-$V.tar.gz on the index" >&2; exit 1; }
curl -fsS -o "$DEST/transformer_engine_torch-$V.tar.gz" "$url"
n=$(ls "$DEST" | wc -l)
[ "$n" -eq 3 ] || { echo "expected 3 files in $DEST, got $n: $(ls "$DEST")" >&2; exit 1; }
(cd "$DEST" && echo "$V" > VERSION && sha256sum ./*.whl ./*.tar.gz > SHA256SUMS)
echo "staged TE $V in $DEST ($(du -sh "$DEST" | cut -f1)):"; ls -la "$DEST"
