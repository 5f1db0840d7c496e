#!/usr/bin/env bash
# Reproduce every figure in docs/BENCHMARKS.md.
#
#   bash scripts/benchmarks.sh [WORK_DIR]      (default: data/bench-work; needs ~90 GB free: the checkpoints are kept for the peers)
#
# 1. the shipped model under a 50% budget (its cache dir is made on first use);
# 2. synthetic OPT-1.3B, OPT-6.7B and Llama-2-7B (ReLU, gated FFN) stores (float16, 2.6, 13
#    and 13.5 GB), driven by an activity trace of the shipped model's predictors mapped onto
#    their shapes;
# 3. the engine's row reads (TensorStore, io_uring) against bare preads.
# Each bench also measures the storage's random-read limit (O_DIRECT, 4 KiB..1 MiB x 1..64
# reads in flight, from threads and through io_uring, random reads over the store's own shard
# files) in the same run, and after each row-set configuration the device's rate for batches
# of its own size; docs/bench/*/device_limit.png are the curves, docs/bench/*/table.md the tables.
# Heavy steps run one after another: run nothing else meanwhile, the timings are CPU-bound.
set -euo pipefail
WORK=${1:-data/bench-work}
OUT=docs/bench
mkdir -p "$WORK" "$OUT"
SHIPPED=$(python -c "from flashjax.shipped import default_model_dir; print(default_model_dir())")
HELDOUT=${HELDOUT:-data/corpus/heldout.txt}  # the held-out split of scripts/make_corpus.py

flashjax bench "$SHIPPED" --dram-budget 50% --tokens 32 --device-seconds 1.5 \
    --json "$OUT/shipped.json" --plots "$OUT/shipped"

declare -A ARGS=([opt-1.3b]="--tokens 8 --windows 1,4,8 --device-seconds 1.5" [opt-6.7b]="--tokens 6 --windows 1,4"
                 [llama-2-7b]="--tokens 6 --windows 1,4")
for preset in opt-1.3b opt-6.7b llama-2-7b; do
    dir="$WORK/$preset"
    if [ ! -f "$dir/fj/manifest.json" ]; then
        python scripts/make_random_opt.py "$dir/hf" --preset "$preset" --shard-layers 2
        flashjax convert "$dir/hf" "$dir/fj"  # the checkpoint stays: the peers run on it
    fi
    python scripts/make_activity_trace.py "$SHIPPED" --text "$HELDOUT" --for "$dir/fj" \
        --out "$WORK/trace-$preset.npz" --tokens 256
    cp "$WORK/trace-$preset.npz.json" "$OUT/trace-$preset.json"
    flashjax bench "$dir/fj" --dram-budget 50% --trace "$WORK/trace-$preset.npz" \
        --prompt-tokens 2 ${ARGS[$preset]} --json "$OUT/$preset.json" \
        --plots "$OUT/$preset"
done
# naive against predictor+window with checked and unchecked reads, and the checks' own cost
for preset in llama-2-7b opt-6.7b; do
    python scripts/headline_ab.py "$WORK/$preset/fj" --trace "$WORK/trace-$preset.npz" \
        --json "$OUT/headline-$preset.json"
done
python scripts/verify_cost.py "$WORK/opt-1.3b/fj" --trace "$WORK/trace-opt-1.3b.npz" \
    --dram-budget 50% --tokens 8 --rounds 3
python scripts/reader_overhead.py "$WORK/opt-6.7b/fj" --rows 8,32,128,375,1024 > "$OUT/reader_overhead.txt"
python scripts/reader_overhead.py "$WORK/opt-1.3b/fj" --rows 8,32,128,208,512 > "$OUT/reader_overhead-opt-1.3b.txt"
python scripts/reader_overhead.py "$SHIPPED" --rows 8,24,48,128,512 > "$OUT/reader_overhead-shipped.txt"
{ python scripts/reader_overhead.py "$WORK/opt-6.7b/fj" --rows 128,375 --reps 20
  python scripts/reader_overhead.py "$WORK/opt-6.7b/fj" --rows 128,375 --reps 20 --beside-compute
} > "$OUT/reader_overhead-beside-compute.txt"
python scripts/profile_memory.py "$SHIPPED" > "$OUT/profile_memory-shipped.txt"
{ for n in 1000000 4; do python scripts/reader_overhead.py "$SHIPPED" --rows 24,39,64 --reps 200 --submit-every $n; done
  for n in 1000000 4; do python scripts/reader_overhead.py "$WORK/opt-6.7b/fj" --rows 128,375 --reps 30 --submit-every $n; done
} > "$OUT/reader_overhead-submit.txt"
# quantized FFN rows: quality on the shipped model, the OPT-6.7B-shape stores in one session,
# and where rows are decoded
python scripts/quant_quality.py --heldout "$HELDOUT" --train "${TRAIN:-data/corpus/train.txt}" \
    --tokens 4096 --out "$OUT/quant"
for q in "int8 fj-int8" "int4 fj-int4" "int4 fj-int4-row --scales row"; do
    set -- $q
    [ -f "$WORK/opt-6.7b/$2/manifest.json" ] || \
        flashjax quantize "$WORK/opt-6.7b/fj" "$WORK/opt-6.7b/$2" --ffn-dtype "$1" "${@:3}"
done
python scripts/bench_quant.py "$WORK/opt-6.7b/fj" "$WORK/opt-6.7b/fj-int8" "$WORK/opt-6.7b/fj-int4" \
    "$WORK/opt-6.7b/fj-int4-row" --trace "$WORK/trace-opt-6.7b.npz" --dram-budget 50% --tokens 6 \
    --rounds 4 --naive-tokens 2 --out "$OUT/quant-opt-6.7b"
python scripts/dequant_cost.py --rows 32,128,375,1024 --reps 20 > "$OUT/quant-decode.txt"
# against the peers, each configuration in its own memory cgroup (needs the peers extra and a
# writable cgroup tree; tables and plots land in data/peers-*, docs/bench/peers-* hold copies)
PEERS="--prompt-tokens 2 --tokens 6 --no-device-limit"
flashjax bench "$WORK/opt-6.7b/fj" --peers "$WORK/opt-6.7b/hf" --trace "$WORK/trace-opt-6.7b.npz" \
    $PEERS --dram-budget 5.7GB --memory-limit 6.7GB --only naive,predictor+window,mmap \
    --json data/peers-6.7b.json --plots data/peers-6.7b
flashjax bench "$WORK/opt-6.7b/fj" --peers "$WORK/opt-6.7b/hf" --trace "$WORK/trace-opt-6.7b.npz" \
    $PEERS --dram-budget 5.7GB --memory-limit 6.7GB --only naive,accelerate-offload \
    --json data/peers-6.7b-accelerate.json --plots data/peers-6.7b-accelerate
for only in naive,predictor+window,mmap naive,accelerate-offload; do
    flashjax bench "$WORK/llama-2-7b/fj" --peers "$WORK/llama-2-7b/hf" \
        --trace "$WORK/trace-llama-2-7b.npz" $PEERS --dram-budget 5.85GB --memory-limit 6.74GB \
        --only "$only" --json "data/peers-llama-$only.json" --plots "data/peers-llama-$only"
done
for run in "1.4GB 2.4GB" "50% auto"; do
    set -- $run
    flashjax bench "$WORK/opt-1.3b/fj" --peers "$WORK/opt-1.3b/hf" --trace "$WORK/trace-opt-1.3b.npz" \
        $PEERS --dram-budget "$1" --memory-limit "$2" \
        --only naive,predictor+window,accelerate-offload,mmap \
        --json "data/peers-1.3b-$2.json" --plots "data/peers-1.3b-$2"
done

# neuron placement (docs/BENCHMARKS.md "Neuron placement"): the shipped model placed from its
# collected true activity, and the OPT-1.3B-shape store from a 2048-token trace (fitted on the
# first three quarters, benched on the held-out quarter)
cp -a "$SHIPPED" "$WORK/shipped"
flashjax collect "$WORK/shipped" --text data/corpus/train.txt --out "$WORK/shipped-acts" --tokens 24576
flashjax place "$WORK/shipped" --data "$WORK/shipped-acts" --out "$WORK/shipped-placed" --gap 16384 \
    --scores "$OUT/place-shipped/scores.json"
python scripts/bench_place.py "$WORK/shipped" "$WORK/shipped-placed" --data "$WORK/shipped-acts" \
    --out "$OUT/place-shipped" --rounds 5 --tokens 48
python scripts/make_activity_trace.py "$SHIPPED" --text "$HELDOUT" --for "$WORK/opt-1.3b/fj" \
    --out "$WORK/trace-opt-1.3b-2k.npz" --tokens 2048
python -c "from flashjax.bench.activity import ActivityTrace as T; t = T.load('$WORK/trace-opt-1.3b-2k.npz'); T(meta={**t.meta, 'held_out_from': 1536}, bits=t.bits[1536:], n_neurons=t.n_neurons).save('$WORK/trace-opt-1.3b-heldout.npz')"
flashjax place "$WORK/opt-1.3b/fj" --trace "$WORK/trace-opt-1.3b-2k.npz" --out "$WORK/opt-1.3b/fj-placed" \
    --methods frequency,greedy,greedy-cosine --gap 16384 --scores "$OUT/place-opt-1.3b/scores.json"
python scripts/bench_place.py "$WORK/opt-1.3b/fj" "$WORK/opt-1.3b/fj-placed" \
    --trace "$WORK/trace-opt-1.3b-heldout.npz" --out "$OUT/place-opt-1.3b" --rounds 3 --tokens 8

# what crosses host to device per token, and the accelerator's transfer path on CPU
# (docs/BENCHMARKS.md "What crosses to the compute device"); next-layer prefetch estimate
python scripts/bench_transfers.py "$WORK/opt-1.3b/fj" --trace "$WORK/trace-opt-1.3b-heldout.npz" \
    --tokens 8 --rounds 3 --out "$OUT/transfers-opt-1.3b"
python scripts/prefetch_estimate.py --tokens 4096 --out "$OUT/prefetch"
# the prepared GPU run (scripts/gpu_check.sh: the flash tests there, then naive and
# predictor+window at OPT-6.7B shape with `flashjax bench --device gpu`), here on the CPU
DEVICE=cpu TESTS=0 TOKENS=6 WORK="$WORK/opt-6.7b" bash scripts/gpu_check.sh "$OUT/gpu-check-cpu-opt-6.7b"
# on a lent GPU: bash scripts/gpu_check.sh "$OUT/gpu-check-opt-6.7b"
