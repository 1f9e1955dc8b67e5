#!/usr/bin/env bash
# Issue 28's optimizer-step measurements in one GPU job (at most 8 minutes on one H100):
#   1. opt_check.py: the compiled fused AdamW update against its eager formula, and the speed of the fused step's
#      three passes (update, norm, concatenation) at the 1.1B parameter count against a plain bf16 copy;
#   2. throughput.py at the 1.1B shape (seq 2048, micro-batch 8, bf16): the plain reference (its ZeRO-3 loop), then
#      mdm-scale's uniform-t training at ZeRO-0 / 3 / 2 with train.optimizer fused and deepspeed (most important first), each
#      with tokens/s, MFU against the measured bf16 peak, the synchronised optimizer section, and engine.step()
#      split into its pieces plus its top operators (opt_profile.py), one JSON line per subject in results.jsonl as
#      it finishes; no subject starts after BUDGET seconds (default 280) and each is bounded by 100 s, so the job
#      ends within 8 minutes (wheels ~20 s + check 60 + 280 + 100 + summary), skipping the last subjects if the
#      first ones are slow (they are listed as skipped; SUBJECTS=... runs the rest in a second call);
#   3. opt_summary.py: the table, the two paths' losses side by side, the targets (summary.md).
# Without DeepSpeed installed (the lent GPU image) it re-runs itself under run_gpu.sh. CPU check at a tiny shape:
#   PRESET=tiny SEQ=64 MICRO=2 bash tools/bench/opt_suite.sh /tmp/opt_cpu
#   bash tools/bench/opt_suite.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:${PYTHONPATH:-}
if ! python3 -c 'import deepspeed' 2>/dev/null; then
  exec bash tools/bench/run_gpu.sh bash tools/bench/opt_suite.sh "$@"
fi
out=${1:-opt_out}
mkdir -p "$out"
preset=${PRESET:-1b} seq=${SEQ:-2048} micro=${MICRO:-8} budget=${BUDGET:-280}
z() { echo "uniform[train.zero_stage=$1;train.optimizer=$2]"; }
subjects=${SUBJECTS:-plain,$(z 0 fused),$(z 3 fused),$(z 0 deepspeed),$(z 3 deepspeed),$(z 2 fused),$(z 2 deepspeed)}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv > "$out/gpu.txt" 2>&1
timeout 60 python3 -m tools.bench.opt_check --preset "$preset" --out "$out/check.json" > "$out/log_check.txt" 2>&1
timeout $((budget + 105)) python3 -m tools.bench.throughput --gpus 1 --preset "$preset" --seq-len "$seq" \
  --micro-batch "$micro" --warmup 3 --steps 6 --breakdown-steps 1 --opt-profile-steps 2 --subject-timeout 160 \
  --budget "$budget" --jsonl "$out/results.jsonl" --out "$out/b1" --subjects "$subjects" \
  > "$out/log_throughput.txt" 2>&1
timeout 20 python3 -m tools.bench.opt_summary "$out"
