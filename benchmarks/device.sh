#!/usr/bin/env bash
# The kernel checks that need the accelerator, in one go, from the repository root of a GPU
# or TPU machine that has jax (with its CUDA/TPU plugin), flax, pyyaml, rich, tqdm, pytest:
#
#     bash benchmarks/device.sh [OUT_DIR]       # default: ./device-out
#
# 1. the kernel tests, run natively (tests/kernels picks the device, not interpret mode),
# 2. the speed table (benchmarks/kernels.py -> OUT_DIR/kernels.json, also a dispatch
#    table: JQUANT_DISPATCH_TABLE=OUT_DIR/kernels.json),
# 3. the paged-attention timings, XLA against the kernel (benchmarks/paged_attention.py ->
#    OUT_DIR/paged_attention.json; ATTN_ARGS are passed to it),
# 4. the MoE grouped-matmul timings, XLA against the kernel (benchmarks/moe_gmm.py ->
#    OUT_DIR/moe_gmm.json; GMM_ARGS are passed to it),
# 5. the block-size sweep (benchmarks/tune_blocks.py -> OUT_DIR/tune.json).
# Each step logs to OUT_DIR; a failing step is reported and the next one still runs.
# When the kernel tests and the speed table both succeeded in this run, the table is also
# copied to OUT_DIR/measured/<backend>.json, and the paged-attention and grouped-matmul rows
# are added to it when the tests and their step succeeded: commit it as
# kernels/measured/<backend>.json and
# "auto" uses the kernels on that backend (without a measured table it never does).
# The full table compiles ~1150 programs; where one call has a time limit, split it with
# BENCH_ARGS="--kinds int4,int8" (passed to benchmarks/kernels.py) and STEPS="bench"
# (steps: tests bench attn gmm tune).
set -u -o pipefail
out="${1:-device-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# The installed layout, without pip: jquant.kernels and jquant.configs live in kernels/
# and configs/ (pyproject maps them), so assemble the package in a temporary directory.
src="$(mktemp -d)"
cp -r jquant "$src/" && cp -r kernels "$src/jquant/kernels" && cp -r configs "$src/jquant/configs"
export PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee "$out/device.txt"
status=0
tests_ok=0
steps="${STEPS:-tests bench attn gmm tune}"
[[ " $steps " == *" tests "* ]] && { python3 -m pytest -q -p no:cacheprovider tests/kernels \
  2>&1 | tee "$out/kernel_tests.log" && tests_ok=1 \
  || { echo "kernel tests FAILED"; status=1; }; }
if [[ " $steps " == *" bench "* ]]; then
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
  if python3 benchmarks/kernels.py ${BENCH_ARGS:-} --out "$out/kernels.json" 2>&1 \
      | tee "$out/kernels.log"; then
    if [[ $tests_ok == 1 ]]; then
      backend="$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["backend"])' \
        "$out/kernels.json")"
      mkdir -p "$out/measured" && cp "$out/kernels.json" "$out/measured/$backend.json"
      echo "measured dispatch table (kernel tests passed): $out/measured/$backend.json"
    else
      echo "no measured dispatch table: the kernel tests did not pass in this run"
    fi
  else
    echo "benchmarks/kernels.py FAILED"; status=1
  fi
fi
# merge_rows KIND JSON: replace the measured table's KIND rows by those of JSON (a
# benchmark's --out), when the kernel tests passed in this run.
merge_rows() {
  if [[ $tests_ok != 1 ]]; then
    echo "$1 rows not added to a measured table: the kernel tests did not pass"; return
  fi
  python3 - "$1" "$2" "$out/measured" <<'PY'
import json, os, sys
kind, new = sys.argv[1], json.load(open(sys.argv[2]))
path = os.path.join(sys.argv[3], new["backend"] + ".json")
table = json.load(open(path)) if os.path.exists(path) else dict(new, rows=[])
table["rows"] = [r for r in table["rows"] if r.get("kind") != kind]
table["rows"] += [r for r in new["rows"] if r.get("kind") == kind]
os.makedirs(sys.argv[3], exist_ok=True)
with open(path, "w") as f:
    json.dump(table, f, indent=1)
print(f"{kind} rows added to the measured dispatch table {path}")
PY
}
if [[ " $steps " == *" attn "* ]]; then
  # shellcheck disable=SC2086  # ATTN_ARGS is a list of arguments
  if python3 benchmarks/paged_attention.py ${ATTN_ARGS:-} --out "$out/paged_attention.json" \
      2>&1 | tee "$out/paged_attention.log"; then
    merge_rows paged_attention "$out/paged_attention.json"
  else
    echo "benchmarks/paged_attention.py FAILED"; status=1
  fi
fi
if [[ " $steps " == *" gmm "* ]]; then
  # shellcheck disable=SC2086  # GMM_ARGS is a list of arguments
  if python3 benchmarks/moe_gmm.py ${GMM_ARGS:-} --out "$out/moe_gmm.json" \
      2>&1 | tee "$out/moe_gmm.log"; then
    merge_rows grouped_matmul "$out/moe_gmm.json"
  else
    echo "benchmarks/moe_gmm.py FAILED"; status=1
  fi
fi
[[ " $steps " == *" tune "* ]] && { python3 benchmarks/tune_blocks.py --out "$out/tune.json" \
  2>&1 | tee "$out/tune.log" || { echo "benchmarks/tune_blocks.py FAILED"; status=1; }; }
exit $status
