#!/usr/bin/env bash
# Run on your own machine, from the project root, after ../shared/gpu/stage.sh (the TE stack).
# Downloads NeMo 2.7.3 and exactly what the device image lacks for `import nemo.collections.llm,
# nemo.lightning` + llm.pretrain (scripts/nemo_gpu/nemo-wheels.txt), for Python 3.12 x86_64,
# --no-deps, into .gpu/nemo/n0 (git-ignored through /.gpu/), and checks the carry limit.
# Idempotent: files already there are kept.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
here=scripts/nemo_gpu
mkdir -p .git/info
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
dst=.gpu/nemo/n0
mkdir -p "$dst"
# Older glibc tags first (pip prefers the first platform that has a wheel); 2_34 only where a
# package (cryptography, bcrypt, PyNaCl) has nothing older for cp312.
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64
      --platform any)
reqs=$(grep -v '^#' $here/nemo-wheels.txt | grep -v '^wget==' | grep .)
python3 -m pip download -q --no-deps "${plat[@]}" -d "$dst" $reqs
# wget 3.2 is an sdist only (one pure-Python module): build its wheel here, so the device needs no
# setuptools and installs nothing from source
ls "$dst"/wget-3.2-*.whl >/dev/null 2>&1 || python3 -m pip wheel -q --no-deps -w "$dst" wget==3.2
rm -f "$dst"/wget-3.2.zip
cp $here/device_nemo.sh "$dst/"
n=$(ls "$dst" | grep -cE '\.whl$')
want=$(grep -v '^#' $here/nemo-wheels.txt | grep -c .)
[ "$n" -eq "$want" ] || { echo "expected $want distributions in $dst, found $n:" >&2; ls "$dst" >&2; exit 1; }
du -sh "$dst"
tree=$(git ls-files -z -co --exclude-standard | xargs -0 -r du -cm 2>/dev/null | tail -1 | cut -f1)
[ $(( $(du -sm "$dst" | cut -f1) + ${tree:-0} )) -lt 63 ] || { echo "$dst plus the working tree is over the 64 MiB carry limit" >&2; exit 1; }
echo "staged $n distributions in $dst (working tree ${tree} MiB)"
