#!/usr/bin/env bash
# GPTQModel's own packing code judges jquant's GPTQ/AWQ layouts (tests/io/test_gptq_awq.py).
# Its sdist cannot be pip-installed on a CPU machine with this torch (it asks for torch >=
# 2.14 and its license metadata is refused by setuptools), so its source is unpacked and run
# as it is, with its pure-Python dependencies beside it. Prints the JQUANT_GPTQMODEL_PATH.
set -euo pipefail
dest="${1:-.ci-cache/gptqmodel}"
mkdir -p "$dest"
if [ ! -d "$dest/gptqmodel-7.7.0" ]; then
  python -m pip download -q --no-deps --no-binary :all: -d "$dest" gptqmodel==7.7.0
  tar -xzf "$dest/gptqmodel-7.7.0.tar.gz" -C "$dest"
fi
if [ ! -d "$dest/site" ]; then
  python -m pip install -q --no-deps --target "$dest/site" logbar==0.4.15 device-smi==0.5.7 \
    tokenicer==0.0.14 defuser==0.0.28 threadpoolctl==3.8.0
fi
echo "$(cd "$dest" && pwd)/gptqmodel-7.7.0:$(cd "$dest" && pwd)/site"
