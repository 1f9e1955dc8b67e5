#!/usr/bin/env bash
# The study of docs/results.md on one GPU: two synthetic reasoning families, every method x seed under both
# protocols of run.py (--budget batch,rows), and the A/B/C variance decomposition of Standard's checkpoints
# early, middle and late. Re-running resumes (finished runs are skipped).
#   bash tools/bench/run_gpu.sh bash tools/experiments/family_gpu.sh
# - sort (from scratch): sort 1-12 digits, tools/experiments/configs/family_sort.yaml;
# - lookup (pretrain, then fine-tune): variable chains of 1-8 hops; pretraining on lookup text (no eval prompt),
#   export, then fine-tuning per run (configs/family_lookup_{pretrain,finetune}.yaml).
# Knobs: OUT, FAMILIES (sort,lookup), METHODS, SEEDS, PARALLEL, SORT_LIMIT_S / LOOKUP_LIMIT_S (time bound of each
# family's runs: what is unfinished then is reported as such and resumed by the next invocation), NO_VARIANCE=1,
# EXTRA (more --set items for every training run, e.g. EXTRA="--set train.max_steps=4" for a smoke test),
# VARIANCE_ARGS (sample sizes of mdm-scale variance; default --x0 64 --t-draws 4 --masks 4).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-results/families}
FAMILIES=${FAMILIES:-sort,lookup}
METHODS=${METHODS:-Standard,Standard 2x,Clipped,P-POTS,MIRROR,P-POTS+MIRROR,P-POTS+StraTS,auto}
SEEDS=${SEEDS:-42,731,20231,1,2}
PARALLEL=${PARALLEL:-12}
PY=${PYTHON:-python3}
CONFIGS=tools/experiments/configs
start=$SECONDS

# [family]="data synth args|config|micro-batch|gen length|steps of the early and middle checkpoints"
declare -A SPEC=(
  [sort]="--min-ops 1 --max-ops 12|$CONFIGS/family_sort.yaml|64|18|50 200"
  [lookup]="--min-ops 1 --max-ops 8 --pretrain 100000|$CONFIGS/family_lookup_finetune.yaml|32|28|50 150"
)

one_rank() { RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$((29500 + RANDOM % 1000)) "$@"; }

pretrain_lookup() {  # pretraining on lookup text, export, and the starting point's own accuracy
  local dir=$1
  [ -f "$dir/pretrained/config.json" ] && return 0
  one_rank $PY -m mdm_scale.cli train --config $CONFIGS/family_lookup_pretrain.yaml \
    --set data.train_file="$dir/data/pretrain.jsonl" --set train.output_dir="$dir/pretrain" ${EXTRA:-} \
    > "$dir/pretrain.log" 2>&1
  one_rank $PY -m mdm_scale.cli export --checkpoint "$dir/pretrain" --out "$dir/pretrained" >> "$dir/pretrain.log" 2>&1
  one_rank $PY -m mdm_scale.cli eval --checkpoint "$dir/pretrained" --data "$dir/data/eval.jsonl" \
    --out "$dir/pretrained_pred.jsonl" --gen-length 28 --steps 28 --batch-size 500 2>>"$dir/pretrain.log" \
    | tail -1 > "$dir/pretrained_eval.json"
}

study() {  # every method x seed of one family, bounded by LIMIT seconds
  local family=$1 limit=$2 dir=$OUT/$1
  IFS='|' read -r synth config micro gen _ <<< "${SPEC[$family]}"
  local init=()
  if [ "$family" = lookup ]; then
    pretrain_lookup "$dir" || { echo "lookup pretraining failed: $dir/pretrain.log"; return 1; }
    init=(--init "$dir/pretrained")
  fi
  timeout --kill-after 20 "$limit" $PY tools/experiments/run.py --config "$config" "${init[@]}" \
    --set data.train_file="$dir/data/train.jsonl" --set data.eval_file="$dir/data/eval.jsonl" \
    --set train.save_every=50 --set train.keep_last=8 ${EXTRA:-} \
    --methods "$METHODS" --seeds "$SEEDS" --budget batch,rows --rows "$micro" \
    --eval-data "$dir/data/eval.jsonl" --out "$dir" --parallel "$PARALLEL" \
    --eval-arg=--gen-length="$gen" --eval-arg=--steps="$gen" --eval-arg=--batch-size=500 \
    > "$dir/study.log" 2>&1
  echo "$family study: exit $? at $((SECONDS - start)) s"; tail -3 "$dir/study.log"
}

variance() {  # A/B/C of the checkpoints of Standard's first seed: early, middle, late (final)
  local family=$1 dir=$OUT/$1
  IFS='|' read -r _ config micro _ early <<< "${SPEC[$family]}"
  local run=$dir/runs/standard/mb_$micro/seed_${SEEDS%%,*}/train init=()
  [ "$family" = lookup ] && init=(--set model.path="$dir/pretrained" --set data.tokenizer="$dir/pretrained")
  local last
  last=$(ls -d "$run"/checkpoints/step_* 2>/dev/null | tail -1)
  [ -n "$last" ] || { echo "$family: no checkpoints for A/B/C"; return 1; }
  for ckpt in $early "${last##*step_}"; do
    local path
    path=$(printf "%s/checkpoints/step_%08d" "$run" "$((10#$ckpt))")
    [ -d "$path" ] || { echo "$family: missing $path"; continue; }
    one_rank $PY -m mdm_scale.cli variance --config "$config" "${init[@]}" \
      --set data.train_file="$dir/data/train.jsonl" --set data.eval_file="$dir/data/eval.jsonl" \
      --checkpoint "$path" --out "$dir/variance/step_$((10#$ckpt)).json" \
      --methods standard,mirror,ppots,ppots+mirror ${VARIANCE_ARGS:---x0 64 --t-draws 4 --masks 4} \
      > "$dir/variance/step_$((10#$ckpt)).log" 2>&1 &
  done
  wait
}

IFS=',' read -r -a families <<< "$FAMILIES"
for family in "${families[@]}"; do
  IFS='|' read -r synth _ <<< "${SPEC[$family]}"
  mkdir -p "$OUT/$family/variance"
  # shellcheck disable=SC2086  # synth holds several arguments
  [ -f "$OUT/$family/data/eval.jsonl" ] || $PY -m mdm_scale.cli data synth --family "$family" $synth \
    --out "$OUT/$family/data" --train 20000 --eval 500 --seed 0 > /dev/null
done
# Family 1's runs first; family 2's pretraining shares the GPU meanwhile.
if [[ ",$FAMILIES," == *,lookup,* ]]; then (pretrain_lookup "$OUT/lookup"; echo "lookup pretraining: done at $((SECONDS - start)) s") & fi
[[ ",$FAMILIES," == *,sort,* ]] && study sort "${SORT_LIMIT_S:-3000}"
wait
if [ "${NO_VARIANCE:-0}" != 1 ] && [[ ",$FAMILIES," == *,sort,* ]]; then variance sort & fi
[[ ",$FAMILIES," == *,lookup,* ]] && study lookup "${LOOKUP_LIMIT_S:-3000}"
[ "${NO_VARIANCE:-0}" != 1 ] && [[ ",$FAMILIES," == *,lookup,* ]] && variance lookup
wait
echo "total: $((SECONDS - start)) s"
