#!/usr/bin/env bash
# compressed-tensors 0.20 removed actorder "group" (weight_g_idx); 0.12.2, the last release line
# that writes and reads it, judges jquant's import of such files
# (tests/io/test_compressed_tensors.py). It is installed apart, beside the test environment's
# torch, and run in a subprocess. Prints the JQUANT_CT_LEGACY_PATH.
set -euo pipefail
dest="${1:-.ci-cache/compressed-tensors-0.12.2}"
mkdir -p "$dest"
if [ ! -d "$dest/site/compressed_tensors" ]; then
  python -m pip install -q --no-deps --target "$dest/site" compressed-tensors==0.12.2
fi
echo "$(cd "$dest" && pwd)/site"
