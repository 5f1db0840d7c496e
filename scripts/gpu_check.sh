#!/usr/bin/env bash
# The engine's GPU checks as one run, sized for a few minutes of a lent accelerator.
#
#   bash scripts/gpu_check.sh [OUT_DIR]       (default OUT_DIR: $OUT, else data/gpu-check)
#
# Environment: SHAPE (make_random_opt preset, default opt-6.7b), DEVICE (gpu or cpu, default
# gpu), TOKENS (generated per configuration, default 8), WORK (scratch for the store, default
# /tmp/flashjax-gpu; needs 2x the store: 27 GB at opt-6.7b), TESTS=0 skips the tests,
# HELDOUT (text for the activity trace, default data/corpus/heldout.txt).
#
# 1. The flash tests on the device (transfers, engine, reader), float32 matmuls at full
#    precision (TF32 would move logits past the tests' tolerances).
# 2. A random store of SHAPE's shapes, and an activity trace of the shipped model's
#    predictors mapped onto it (as in scripts/benchmarks.sh).
# 3. `flashjax bench --device $DEVICE` at a 50% budget, trace-driven: naive and
#    predictor+window, ms per token and their ratio, and what crossed host to device.
# Python packages the image lacks travel as wheels in .whl/ (see the device notes); the
# script installs them first when .whl/ is there. The H200 image (Python 3.12, jax 0.11 with
# CUDA 13) lacked google-crc32c when last listed:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 -d .whl google-crc32c
# and carry .whl and data/corpus/heldout.txt with the run.
set -euo pipefail
OUT=${1:-${OUT:-data/gpu-check}}
SHAPE=${SHAPE:-opt-6.7b}
DEVICE=${DEVICE:-gpu}
TOKENS=${TOKENS:-8}
WORK=${WORK:-/tmp/flashjax-gpu}
HELDOUT=${HELDOUT:-data/corpus/heldout.txt}
export PYTHONUNBUFFERED=1
export JAX_PLATFORMS=$([ "$DEVICE" = gpu ] && echo cuda || echo cpu)
mkdir -p "$OUT" "$WORK"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
start=$SECONDS
stamp() { echo "[$((SECONDS - start)) s] $*"; }

python3 -c "import flashjax" || { echo "flashjax does not import here: carry the missing \
packages as wheels in .whl/ (see the top of this script)"; exit 1; }
stamp "devices" | tee "$OUT/devices.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/devices.txt"
command -v nvidia-smi >/dev/null && nvidia-smi -L | tee -a "$OUT/devices.txt" || true

if [ "${TESTS:-1}" != 0 ]; then
    stamp "tests"
    JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${TEST_TIMEOUT:-300}" \
        python3 -m pytest -q -x -p no:cacheprovider tests/test_transfer.py tests/test_engine.py \
        tests/test_reader.py 2>&1 | tee "$OUT/tests.log" | tail -5 || true
fi

stamp "store: $SHAPE"
SHIPPED=$(python3 -c "from flashjax.shipped import default_model_dir; print(default_model_dir(progress=False))")
if [ ! -f "$WORK/fj/manifest.json" ]; then
    python3 scripts/make_random_opt.py "$WORK/hf" --preset "$SHAPE" --shard-layers 2
    python3 -m flashjax convert "$WORK/hf" "$WORK/fj"
    rm -rf "$WORK/hf"
fi
stamp "trace"
python3 scripts/make_activity_trace.py "$SHIPPED" --text "$HELDOUT" --for "$WORK/fj" \
    --out "$WORK/trace.npz" --tokens 64
stamp "bench on $DEVICE"
python3 -m flashjax bench "$WORK/fj" --device "$DEVICE" --dram-budget 50% \
    --trace "$WORK/trace.npz" --prompt-tokens 2 --tokens "$TOKENS" \
    --only naive,predictor+window --windows 4 --no-device-limit \
    --json "$OUT/bench.json" --plots "$OUT/plots" | tee "$OUT/bench.txt"
python3 - "$OUT/bench.json" <<'EOF' | tee -a "$OUT/bench.txt"
import json, sys
r = json.load(open(sys.argv[1]))
c = r["configs"]
naive, ours = c["naive"]["ms_per_token"], c["predictor+window"]["ms_per_token"]
print(f"on {r['compute_device']['device_kind']}: naive {naive:.1f} ms/token, "
      f"predictor+window {ours:.1f} ms/token: {naive / ours:.1f}x (the paper's OPT-6.7B GPU "
      f"figure: 2218 / 84 ms, 26x)")
EOF
stamp "done"
