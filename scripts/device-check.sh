#!/usr/bin/env bash
# One command for the GPU machine (no Rust toolchain there): checks the engine on CUDA against
# every conformance fixture in bf16 (the serving dtype) first, then in f32, then prints the kernel
# table and the end-to-end benches (bf16, with f32 beside them). Fits 10 minutes of device time.
# Build the binary here first:
#   CUDARC_CUDA_VERSION=13000 cargo build --release -p gemma4-server --features cuda
#   mkdir -p dist && cp target/release/gemma4 dist/ && strip dist/gemma4
# then run this script on the device with `dist` carried.
set -uo pipefail
BIN="${BIN:-dist/gemma4}"
OUT="${OUT:-/tmp/device-check}"
mkdir -p "$OUT"
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
for dtype in bfloat16 float32; do
    for dir in fixtures/*/; do
        [ -f "$dir/reference.json" ] || continue
        echo "== check --device cuda --dtype $dtype $dir"
        timeout 120 "$BIN" check --device cuda --dtype "$dtype" --model "$dir" 2>&1 | tee -a "$OUT/check.log" || status=1
    done
done
for dir in fixtures/*/; do
    [ -f "$dir/reference.json" ] || continue
    echo "== bench --device cuda --dtype bfloat16 $dir"
    timeout 60 "$BIN" bench --device cuda --dtype bfloat16 --model "$dir" --prompt-len 256 --decode-tokens 128 --repeats 5 2>&1 | tee -a "$OUT/bench.log" || status=1
done
for dtype in bfloat16 float32; do
    echo "== kernels at the 31B shapes, --device cuda --dtype $dtype (prefill 2048 rows, 4k context)"
    timeout 120 "$BIN" bench-kernels --device cuda --dtype "$dtype" --prefill-rows 2048 --context 4096 --repeats 10 --no-reference 2>&1 | tee -a "$OUT/kernels.log" || status=1
done
echo "== synth 31b-6l (real 31B layer shapes, 6 layers) and bench --device cuda (4k prefill, batch 1 and 64)"
"$BIN" synth --preset 31b-6l --out /tmp/synth-31b-6l 2>&1 | tail -1 || status=1
for dtype in bfloat16 float32; do
    timeout 150 "$BIN" bench --device cuda --dtype "$dtype" --model /tmp/synth-31b-6l --prompt-len 4096 --decode-tokens 32 --repeats 3 --batch 64 2>&1 | tee -a "$OUT/bench.log" || status=1
done
exit $status
