#!/usr/bin/env bash
# The one-H200 measurements of docs/benchmarks.md (issue 15) in one job: 1.1B throughput against the plain
# reference, packed against padded SFT rows, and the 8B shape. Each part is bounded by a timeout and writes
# its JSON as subjects finish, so a part that runs out of time keeps what it measured.
#   bash tools/bench/h200_suite.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-bench_out}
mkdir -p "$out"
run="bash tools/bench/run_gpu.sh python3 tools/bench/throughput.py --gpus 1"
auto="train.zero_stage=auto"
timeout 300 $run --preset 1b --warmup 3 --steps 8 --breakdown-steps 1 --out "$out/b1" --subjects \
  "plain,uniform[$auto],ppots_mirror[$auto],uniform,plain_zero2" \
  > "$out/log_1b.txt" 2>&1
timeout 130 $run --preset 1b --data sft --grad-accum 4 --warmup 2 --steps 6 --breakdown-steps 0 --out "$out/b2" \
  --subjects "uniform[$auto],uniform[$auto;data.packing=true]" > "$out/log_sft.txt" 2>&1
PYTORCH_ALLOC_CONF=expandable_segments:True timeout 150 $run --preset 8b --micro-batch 2 --warmup 2 --steps 3 \
  --breakdown-steps 1 --set model.activation_checkpointing=true --out "$out/b3" \
  --subjects "uniform[train.grad_accum=4],uniform" > "$out/log_8b.txt" 2>&1
for f in "$out"/b*.md; do cat "$f"; done
