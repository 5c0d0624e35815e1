#!/usr/bin/env bash
# Run on your own machine, from the project root (the checkout whose tree the device calls carry),
# after ../shared/gpu/stage.sh (TE 2.11 stack, .gpu/p0..p3). Downloads megatron-core 0.19.2,
# megatron-bridge 0.6.2 and what they need that the device image lacks (bridge-wheels.txt), cp312
# x86_64 wheels, --no-deps, into .gpu-bridge/p0 (git-ignored via .git/info/exclude), and checks
# the 64 MiB carry limit. Idempotent: files already there are kept.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
here=$(cd "$(dirname "$0")" && pwd)
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpu-bridge/' "$exclude" 2>/dev/null || echo '/.gpu-bridge/' >> "$exclude"
dst=.gpu-bridge/p0
mkdir -p "$dst"
PY=${PY:-python3}
# Older glibc tags first (pip takes the first platform with a wheel); nvidia-resiliency-ext 0.6.0
# exists only as manylinux_2_39 (the device is Ubuntu 24.04: Python 3.12.3, glibc 2.39).
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64
      --platform manylinux1_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64
      --platform manylinux_2_35_x86_64 --platform manylinux_2_39_x86_64 --platform any)
reqs=$(grep -v '^#' "$here/bridge-wheels.txt" | grep .)
$PY -m pip download -q --no-deps "${plat[@]}" -d "$dst" $reqs
cp "$here/device_setup.sh" "$here/bridge-wheels.txt" "$dst/"
n=$(ls "$dst" | grep -cE '\.whl$')
want=$(echo "$reqs" | wc -l)
[ "$n" -eq "$want" ] || { echo "expected $want wheels in $dst, found $n:" >&2; ls "$dst" >&2; exit 1; }
du -sh "$dst"
tree=$(git ls-files -z -co --exclude-standard | xargs -0 -r du -cm 2>/dev/null | tail -1 | cut -f1)
[ $(( $(du -sm "$dst" | cut -f1) + ${tree:-0} )) -lt 63 ] || { echo "$dst plus the working tree is over the 64 MiB carry limit" >&2; exit 1; }
echo "staged $n wheels in $dst (working tree ${tree} MiB)"
