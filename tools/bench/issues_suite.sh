#!/usr/bin/env bash
# The GPU measurements of issues 23, 24 and 28 (docs/benchmarks.md, 2026-12-06) in jobs of under 10 minutes each,
# one DeepSpeed install per job. PARTS picks the parts (comma-separated); each part is bounded by a timeout and
# writes its JSON / markdown as subjects finish, so a part cut short keeps what it measured.
#   opt     1.1B shape (seq 2048, micro-batch 8, bf16, one GPU): the plain reference (its ZeRO-3 loop), mdm-scale's
#           uniform-t training at ZeRO-0 and ZeRO-3 with train.optimizer fused and deepspeed, and the same model
#           read from a LLaDA-format checkpoint (random bf16 shards) at the fastest setting: tokens/s, MFU, the
#           optimizer section, engine.step() split into its pieces, and each run's peak memory against the
#           memory plan's estimate (issues 28, 23, 24);
#   fit8b   the 8B shape with LoRA (configs/llada_8b_lora.yaml: rank 16 on every linear layer, seq 2048,
#           micro-batch 4, stage 0) built-in and read from a LLaDA-format checkpoint, and with activation
#           checkpointing: tokens/s, MFU at 4N + 2T FLOPs per token, peak memory against the plan (issues 24, 23);
#   decode  decoding speed of the 1b preset (random weights, bf16, prompt 64, block 32): the fixed schedule against
#           the threshold and the prefix / dual caches, and k tokens per forward, at batch 1 and 32 and answer
#           lengths 256 and 1,024 (issue 28).
#   PARTS=opt,decode bash tools/bench/run_gpu.sh bash tools/bench/issues_suite.sh OUT_DIR
# OPT_SUBJECTS replaces part opt's subjects (throughput.py --subjects); DECODE_ARGS adds to decode_speed.py's.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-issues_out}
parts=${PARTS:-opt}
mkdir -p "$out"
ckpt=${CKPT_DIR:-/tmp/mdm_llada_ckpt}
bench="python3 -m tools.bench.throughput --gpus 1"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv > "$out/gpu.txt" 2>&1
free -g >> "$out/gpu.txt" 2>&1
z() { echo "$1[train.zero_stage=$2;train.optimizer=$3]"; }
opt_subjects="plain,$(z uniform 0 fused),$(z uniform 3 fused),$(z uniform 0 deepspeed),$(z uniform 3 deepspeed)"
opt_subjects+=",$(z llada 0 fused)"
if [[ ",$parts," == *,opt,* ]]; then
  timeout "${OPT_S:-420}" $bench --preset 1b --seq-len 2048 --micro-batch 8 --warmup 3 --steps 6 --breakdown-steps 1 \
    --opt-profile-steps 2 --subject-timeout 160 --budget "${OPT_BUDGET:-300}" --jsonl "$out/results.jsonl" \
    --checkpoint-dir "$ckpt/1b" --out "$out/opt" > "$out/log_opt.txt" 2>&1 --subjects "${OPT_SUBJECTS:-$opt_subjects}"
fi
if [[ ",$parts," == *,fit8b,* ]]; then
  timeout "${FIT_S:-400}" $bench --preset 8b --seq-len 2048 --micro-batch 4 --warmup 2 --steps 4 --breakdown-steps 0 \
    --config configs/llada_8b_lora.yaml --subject-timeout 200 --checkpoint-dir "$ckpt/8b" --out "$out/fit8b" \
    --subjects "uniform,llada,uniform[model.activation_checkpointing=true]" > "$out/log_fit8b.txt" 2>&1
fi
if [[ ",$parts," == *,decode,* ]]; then
  timeout "${DECODE_S:-200}" python3 -m tools.bench.decode_speed --seconds 4 --out "$out/decode" ${DECODE_ARGS:-} \
    > "$out/log_decode.txt" 2>&1
fi
cat "$out/gpu.txt"
for f in "$out"/opt.md "$out"/fit8b.md "$out"/decode/decode_speed.md; do [ -f "$f" ] && cat "$f"; done
[ -f "$out/results.jsonl" ] && timeout 20 python3 -m tools.bench.opt_summary "$out" 2>&1 | tail -40
exit 0
