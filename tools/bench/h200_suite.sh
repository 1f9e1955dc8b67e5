#!/usr/bin/env bash
# The one-H200 measurements of docs/benchmarks.md (issues 13 and 15) in one job: 1.1B throughput against the
# plain reference (its ZeRO-3 loop) for mdm-scale at ZeRO stages 3, 2 and 0, packed against padded SFT rows,
# and the P-POTS start against a 1,500-step run of the `small` preset. Each part is bounded by a timeout and
# writes its JSON as subjects finish, so a part that runs out of time keeps what it measured. PARTS (default
# 1b,sft,start) picks parts. The 8B rows of docs/benchmarks.md come from an earlier job of this script (its
# third part then: `--preset 8b --micro-batch 2 --set model.activation_checkpointing=true --subjects
# "uniform[train.grad_accum=4],uniform"`).
# Parts native_1b and native_8b (issue 23, not in the default PARTS): the built-in preset against the same shape
# read from a LLaDA-format checkpoint (random bf16 weights in sharded safetensors, written once per machine to
# CKPT_DIR, default /tmp/mdm_llada_ckpt) by the native loader, in one throughput.py job each. The 8B shape needs
# 16 bytes per parameter of model states over the GPUs (128 GB on one card) plus activations: one H200, or
# GPUS=2 MICRO_8B=1 on 80 GB H100s (64 GB of model states each); activation checkpointing is on.
#   [PARTS=1b] bash tools/bench/h200_suite.sh OUT_DIR
#   PARTS=native_1b bash tools/bench/h200_suite.sh OUT_DIR; PARTS=native_8b bash tools/bench/h200_suite.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-bench_out}
parts=${PARTS:-1b,sft,start}
mkdir -p "$out"
run="bash tools/bench/run_gpu.sh python3 -m tools.bench.throughput --gpus 1"
native="bash tools/bench/run_gpu.sh python3 -m tools.bench.throughput --gpus ${GPUS:-1} --subjects uniform,llada"
ckpt=${CKPT_DIR:-/tmp/mdm_llada_ckpt}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv > "$out/gpu.txt" 2>&1
[[ ",$parts," == *,1b,* ]] && timeout 560 $run --preset 1b --warmup 4 --steps 12 --breakdown-steps 1 --out "$out/b1" \
  --subjects "plain,uniform,uniform[train.zero_stage=2],uniform[train.zero_stage=0],ppots_mirror,ppots_mirror[train.zero_stage=0]" \
  > "$out/log_1b.txt" 2>&1
[[ ",$parts," == *,sft,* ]] && timeout 190 $run --preset 1b --data sft --grad-accum 4 --warmup 2 --steps 4 \
  --breakdown-steps 0 --out "$out/b2" --subjects "uniform[data.packing=true],uniform" > "$out/log_sft.txt" 2>&1
[[ ",$parts," == *,start,* ]] && timeout 110 bash tools/bench/run_gpu.sh python3 -m tools.bench.ppots_start \
  --preset small --seq-len 192 --micro-batch 64 --out "$out/ppots_start" > "$out/log_ppots_start.txt" 2>&1
[[ ",$parts," == *,native_1b,* ]] && timeout 570 $native --preset 1b --warmup 3 --steps 8 --breakdown-steps 1 \
  --checkpoint-dir "$ckpt/1b" --out "$out/native_1b" > "$out/log_native_1b.txt" 2>&1
[[ ",$parts," == *,native_8b,* ]] && timeout 570 $native --preset 8b --micro-batch "${MICRO_8B:-2}" --grad-accum 2 \
  --warmup 2 --steps 3 --breakdown-steps 0 --set model.activation_checkpointing=true \
  --checkpoint-dir "$ckpt/8b" --out "$out/native_8b" > "$out/log_native_8b.txt" 2>&1
for f in "$out"/b*.md "$out"/native_*.md; do [ -f "$f" ] && cat "$f"; done
[ -f "$out/log_ppots_start.txt" ] && tail -n 2 "$out/log_ppots_start.txt"
