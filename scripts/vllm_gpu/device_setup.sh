#!/usr/bin/env bash
# PREPARED, NOT RUN. On the device after the .gpu/vK copies: join the pieces in /root/vllm and install
# every wheel without dependencies into /root/vllm_site (the image's torch 2.11 stays the one used).
set -euo pipefail
cd /root/vllm
for first in *.whl.part.00; do
  w=${first%.part.00}
  [ -f "$w" ] || cat "$w".part.* > "$w"
done
python3 -m pip install -q --no-deps --no-index --target /root/vllm_site ./*.whl
PYTHONPATH=/root/site:/root/vllm_site python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
