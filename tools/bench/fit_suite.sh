#!/usr/bin/env bash
# Issue 24 in one GPU job of about 6 minutes: the memory plan (training/memory_plan.py) against the measured peak,
# and LoRA on the 8B shape on one 80 GB GPU (configs/llada_8b_lora.yaml).
#   8b part: LoRA at seq 2048, micro-batch 4, stage 0 (tokens/s, TFLOP/s and MFU with 4 N + 2 T FLOPs per token,
#            peak memory and the plan's estimate); the same with activation checkpointing; full fine-tuning with
#            checkpointing at micro-batch 2 (the plan refuses it on one 80 GB card in seconds, naming the fixes;
#            on a 141 GB H200 it runs and its peak is measured);
#   1b part: the 1.1B shape (micro-batch 8, seq 2048) at ZeRO-3 and ZeRO-0, peak against the plan.
# Each part is bounded by a timeout and writes its JSON/markdown as subjects finish (a part cut short keeps what
# it measured); the markdown tables are printed at the end ("peak mem GiB (plan)").
#   bash tools/bench/fit_suite.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-fit_out}
mkdir -p "$out"
run="bash tools/bench/run_gpu.sh python3 -m tools.bench.throughput --gpus 1 --breakdown-steps 0"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv > "$out/gpu.txt" 2>&1
free -g >> "$out/gpu.txt" 2>&1
timeout 200 $run --preset 8b --seq-len 2048 --micro-batch 4 --warmup 3 --steps 6 \
  --config configs/llada_8b_lora.yaml --out "$out/8b" --subjects "uniform[train.zero_stage=0],\
uniform[train.zero_stage=0;model.activation_checkpointing=true],\
uniform[model.lora.rank=0;train.zero_stage=3;model.activation_checkpointing=true;train.micro_batch_size=2]" \
  > "$out/log_8b.txt" 2>&1
timeout 160 $run --preset 1b --seq-len 2048 --micro-batch 8 --warmup 2 --steps 3 --out "$out/1b" \
  --subjects "uniform,uniform[train.zero_stage=0]" > "$out/log_1b.txt" 2>&1
cat "$out/gpu.txt"
for f in "$out"/8b.md "$out"/1b.md; do [ -f "$f" ] && cat "$f"; done
grep -h "mdm-scale: error\|memory plan:" "$out"/log_*.txt | head -5
