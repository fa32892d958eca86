#!/usr/bin/env bash
# One command for the GPU machine (no Rust toolchain there): checks the engine on CUDA against
# every conformance fixture, then prints the kernel table and the end-to-end bench. Build the binary here first:
#   CUDARC_CUDA_VERSION=13000 cargo build --release -p gemma4-server --features cuda
#   mkdir -p dist && cp target/release/gemma4 dist/ && strip dist/gemma4
# then run this script on the device with `dist` carried.
set -uo pipefail
BIN="${BIN:-dist/gemma4}"
OUT="${OUT:-/tmp/device-check}"
mkdir -p "$OUT"
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
for dir in fixtures/*/; do
    [ -f "$dir/reference.json" ] || continue
    echo "== check --device cuda $dir"
    "$BIN" check --device cuda --model "$dir" 2>&1 | tee -a "$OUT/check.log" || status=1
done
for dir in fixtures/*/; do
    [ -f "$dir/reference.json" ] || continue
    echo "== bench --device cuda $dir"
    "$BIN" bench --device cuda --model "$dir" --prompt-len 256 --decode-tokens 128 --repeats 5 2>&1 | tee -a "$OUT/bench.log" || status=1
    echo "== bench --device cpu $dir (same machine, for the ratio)"
    "$BIN" bench --device cpu --model "$dir" --prompt-len 256 --decode-tokens 128 --repeats 3 2>&1 | tee -a "$OUT/bench.log" || status=1
done
echo "== kernels at the 31B shapes, --device cuda (prefill 2048 rows, 4k context)"
timeout 120 "$BIN" bench-kernels --device cuda --prefill-rows 2048 --context 4096 --repeats 10 2>&1 | tee -a "$OUT/kernels.log" || status=1
echo "== synth 31b-6l (real 31B layer shapes, 6 layers) and bench --device cuda (4k prefill, batch 1 and 64)"
"$BIN" synth --preset 31b-6l --out /tmp/synth-31b-6l 2>&1 | tail -1 || status=1
timeout 180 "$BIN" bench --device cuda --model /tmp/synth-31b-6l --prompt-len 4096 --decode-tokens 32 --repeats 3 --batch 64 2>&1 | tee -a "$OUT/bench.log" || status=1
exit $status
