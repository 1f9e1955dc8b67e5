#!/usr/bin/env bash
# The GPU experiment of docs/results.md: pretrain a 27M-parameter MDM briefly on synthetic text, export it, then
# fine-tune it on the synthetic arithmetic reasoning task with every method x seed (several runs share the GPU)
# and evaluate exact-match accuracy with greedy low-confidence-remasking decoding. Re-running resumes.
#   bash tools/bench/run_gpu.sh bash tools/experiments/synthetic_gpu.sh          # on the lent H100
# Environment knobs: OUT, METHODS, SEEDS, PARALLEL, PRETRAIN_STEPS, PRETRAIN_BATCH, PRETRAIN_TEXTS, FINETUNE_STEPS,
# MIN_OPS, MAX_OPS; PRETRAIN_ONLY=1 stops after pretraining (the next invocation goes on from there).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-results/synth_gpu}
METHODS=${METHODS:-standard,mirror,ppots,ppots+mirror}
SEEDS=${SEEDS:-42,731,20231,1,2}
PARALLEL=${PARALLEL:-6}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-1000}
PRETRAIN_BATCH=${PRETRAIN_BATCH:-64}
PRETRAIN_TEXTS=${PRETRAIN_TEXTS:-40000}
FINETUNE_STEPS=${FINETUNE_STEPS:-300}
MIN_OPS=${MIN_OPS:-2}
MAX_OPS=${MAX_OPS:-4}
PY=${PYTHON:-python3}
DECODE=(--gen-length 72 --steps 36 --block-length 24 --batch-size 500)
export RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=${MASTER_PORT:-29517}
start=$SECONDS

[ -f "$OUT/data/eval.jsonl" ] || $PY -m mdm_scale.cli data synth --out "$OUT/data" --train 20000 --eval 500 \
  --seed 0 --min-ops "$MIN_OPS" --max-ops "$MAX_OPS" --pretrain "$PRETRAIN_TEXTS"
if [ ! -f "$OUT/pretrained/config.json" ]; then
  $PY -m mdm_scale.cli train --config tools/experiments/configs/synth_pretrain.yaml \
    --set data.train_file="$OUT/data/pretrain.jsonl" --set train.output_dir="$OUT/pretrain" \
    --set train.max_steps="$PRETRAIN_STEPS" --set train.micro_batch_size="$PRETRAIN_BATCH" | tail -3
  $PY -m mdm_scale.cli export --checkpoint "$OUT/pretrain" --out "$OUT/pretrained"
  # The starting point's own accuracy (pretraining saw the problems only as text, never the prompt format).
  $PY -m mdm_scale.cli eval --checkpoint "$OUT/pretrained" --data "$OUT/data/eval.jsonl" \
    --out "$OUT/pretrained_pred.jsonl" "${DECODE[@]}" | tail -1 | tee "$OUT/pretrained_eval.json"
fi
echo "pretraining + export: $((SECONDS - start)) s"
[ "${PRETRAIN_ONLY:-0}" = 1 ] && exit 0
unset RANK LOCAL_RANK WORLD_SIZE MASTER_ADDR MASTER_PORT  # the harness gives every run its own

eval_args=()
for a in "${DECODE[@]}"; do eval_args+=("--eval-arg=$a"); done
$PY -m mdm_scale.cli experiment run --config tools/experiments/configs/synth_finetune.yaml --init "$OUT/pretrained" \
  --set data.train_file="$OUT/data/train.jsonl" --set data.eval_file="$OUT/data/eval.jsonl" \
  --set train.max_steps="$FINETUNE_STEPS" --methods "$METHODS" --seeds "$SEEDS" \
  --eval-data "$OUT/data/eval.jsonl" --out "$OUT" --parallel "$PARALLEL" "${eval_args[@]}"
echo "total: $((SECONDS - start)) s"
cat "$OUT/results.md"
