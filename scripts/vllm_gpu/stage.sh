#!/usr/bin/env bash
# PREPARED, NOT RUN. On your own machine, from the project root: download vllm==0.26.0 (cu13, 304 MB)
# and the packages of tests/gpu/vllm-0.26.0-stage.txt for Python 3.12 x86_64, and split them into
# folders .gpu/v0..vN, each well under the 64 MiB a device call carries (like ../../shared/gpu/stage.sh
# does for Transformer Engine).  Then, on one warm device machine, one call per folder:
#   run(command="mkdir -p /root/vllm && cp .gpu/vK/* /root/vllm/", carry=[".gpu/vK"])
# and last: run(command="bash scripts/vllm_gpu/device_setup.sh && export PYTHONPATH=/root/site:/root/vllm_site:$PWD &&
#   python3 tests/gpu/vllm_quant_smoke.py --out $OUT", carry=[".gpu/vN"])
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
mkdir -p .gpu/vdl
# the device has glibc 2.39: newer manylinux tags too (llguidance 1.7.6 ships manylinux_2_3x only)
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none)
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
         manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do plat+=(--platform ${p}_x86_64); done
plat+=(--platform any)
grep -v '^#' tests/gpu/vllm-0.26.0-stage.txt | sed 's/ *#.*//' | grep . > .gpu/vdl/req.txt
python3 -m pip download -q --no-deps "${plat[@]}" -d .gpu/vdl -r .gpu/vdl/req.txt
# every file cut into 45 MB pieces, pieces dealt into folders of at most 45 MB
(cd .gpu/vdl && rm -f *.part.* && for f in *.whl; do split -b ${PART_BYTES:-58000000} -d -a 2 "$f" "$f.part."; done)
n=0; used=0; rm -rf .gpu/v[0-9]*; mkdir -p .gpu/v0
for p in .gpu/vdl/*.part.*; do
  s=$(stat -c %s "$p")
  if [ $(( used + s )) -gt ${PART_BYTES:-58000000} ]; then n=$((n+1)); used=0; mkdir -p .gpu/v$n; fi
  mv "$p" .gpu/v$n/; used=$((used + s))
done
echo "folders .gpu/v0..v$n"; du -sh .gpu/v*
