#!/usr/bin/env bash
# One staging script for every GPU stack (issue 22, item 4). Run here, from the project root, after
# the per-stack download scripts have filled their folders:
#   bash ../shared/gpu/stage.sh         TE 2.11 + megatron-core 0.16.1 + ModelOpt 0.47   -> .gpu/p0..p3
#   bash scripts/bridge_gpu/stage.sh    megatron-core 0.19.2 + Megatron-Bridge 0.6.2       -> .gpu-bridge/p0
#   bash scripts/mamba_gpu/stage.sh     mamba-ssm / causal-conv1d (NemotronH), if present  -> .gpu-mamba
#   bash scripts/vllm_gpu/stage.sh      vLLM 0.26.0 and what `from vllm import LLM` needs   -> .gpu/vdl
#   bash scripts/te_gpu/stage.sh        TE >= 2.14 (2.20.2) for megatron-core 0.19.2, optional -> .gpu-te
# It packs them into two tar streams and cuts each into chunks of CHUNK bytes, one folder per
# chunk (.gpu/chunks/aNN, .gpu/chunks/bNN), so that every device call carries one full chunk:
#   a: the training stacks (TE, ModelOpt, megatron-core 0.16.1 and 0.19.2, Bridge, mamba)
#   b: vLLM
#   c: the newer TE (only if .gpu-te exists): the single grouped expert weight on megatron-core 0.19.2
# A folder per call is the fewest calls the 64 MiB carry limit allows (the old per-wheel folders
# left each call 20-40% empty). On the device, scripts/gpu_unpack.sh joins and unpacks them.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
CHUNK=${CHUNK:-60000000}
tree=$(git ls-files -z -co --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
limit=$((64 * 1024 * 1024 - ${tree:-0} - 1024 * 1024))
[ "$CHUNK" -le "$limit" ] || { echo "CHUNK=$CHUNK plus the working tree ($tree bytes) is over the carry limit" >&2; exit 1; }
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu/chunks .gpu/stream
mkdir -p .gpu/chunks .gpu/stream/a/gpu .gpu/stream/a/bridge_whl .gpu/stream/a/mamba .gpu/stream/b/vllm
streams="a b"
if [ -d .gpu-te ]; then mkdir -p .gpu/stream/c/te && ln -f .gpu-te/* .gpu/stream/c/te/ && streams="a b c"; fi
# hard links: no copies of 700 MB
for p in .gpu/p0 .gpu/p1 .gpu/p2 .gpu/p3; do ln -f "$p"/* .gpu/stream/a/gpu/; done
[ -d .gpu-bridge/p0 ] && ln -f .gpu-bridge/p0/* .gpu/stream/a/bridge_whl/
[ -d .gpu-mamba ] && find .gpu-mamba -maxdepth 1 -type f -exec ln -f {} .gpu/stream/a/mamba/ \;
ln -f .gpu/vdl/*.whl .gpu/stream/b/vllm/
for s in $streams; do
  (cd .gpu/stream/$s && tar cf - --sort=name .) | split -b "$CHUNK" -d -a 2 - ".gpu/chunks/$s."
  for f in .gpu/chunks/$s.*; do n=${f##*.}; mkdir -p ".gpu/chunks/$s$n"; mv "$f" ".gpu/chunks/$s$n/$s.$n"; done
done
for d in .gpu/chunks/*/; do printf '%s %s\n' "$(du -sb "$d" | cut -f1)" "$d"; done
echo "calls: $(ls -d .gpu/chunks/a* | wc -l) for stream a, $(ls -d .gpu/chunks/b* | wc -l) for stream b, $(ls -d .gpu/chunks/c* 2>/dev/null | wc -l) for stream c (working tree $tree bytes)"
