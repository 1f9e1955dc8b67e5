#!/usr/bin/env bash
# The studies of docs/results.md on one GPU: synthetic reasoning tasks, every method x seed under both protocols of
# `mdm-scale experiment run --budget batch,rows`, and the A/B/C variance decomposition (`mdm-scale variance measure`)
# of Standard's checkpoints early, middle and late. Re-running resumes (finished runs, a finished pretraining are
# skipped).
#   bash tools/bench/run_gpu.sh bash tools/experiments/family_gpu.sh
# Studies (SPEC below; a study names a generator family, its sizes and configs, all in tools/experiments/configs):
# - sort (from scratch): sort 1-8 digits, family_sort.yaml;
# - missing (from scratch): the digits 0-9 that a list of 1-6 digits lacks, family_missing.yaml;
# - sort_ft (pretrain, then fine-tune): pretraining on sort text (no eval prompt), export, then fine-tuning per
#   run (family_pretrain.yaml, family_sort_finetune.yaml);
# - count, lookup (pretrain, then fine-tune; not in the default FAMILIES: at chance / at the floor for this
#   model size): family_pretrain.yaml + family_count_finetune.yaml, family_lookup_{pretrain,finetune}.yaml.
# Knobs: OUT, FAMILIES (studies; default sort,sort_ft,missing), PARTS (study,variance: the study's runs, the A/B/C of
# Standard's checkpoints; variance alone re-measures the checkpoints a study left), METHODS, SEEDS, PARALLEL,
# LIMIT_S (time bound of each study's runs: what is unfinished then is reported as such and resumed by the next
# invocation), EXTRA (more --set items for every training run, e.g. EXTRA="--set train.max_steps=4" for a smoke
# test), VARIANCE_ARGS (sample sizes of mdm-scale variance measure; default --x0 64 --t-draws 4 --masks 4).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-results/families}
FAMILIES=${FAMILIES:-sort,sort_ft,missing}
PARTS=${PARTS:-study,variance}
METHODS=${METHODS:-standard,standard 2x,clipped,ppots,mirror,ppots+mirror,ppots+strats,auto}
SEEDS=${SEEDS:-42,731,20231,1,2}
PARALLEL=${PARALLEL:-12}
PY=${PYTHON:-python3}
CONFIGS=tools/experiments/configs
start=$SECONDS

# [study]="generator family|data synth args|config|micro-batch|gen length|steps of the early and middle checkpoints|
# pretraining config, or - for a study trained from scratch"
declare -A SPEC=(
  [sort]="sort|--min-ops 1 --max-ops 8|$CONFIGS/family_sort.yaml|64|18|50 200|-"
  [missing]="missing|--min-ops 1 --max-ops 6|$CONFIGS/family_missing.yaml|64|18|50 200|-"
  [sort_ft]="sort|--min-ops 1 --max-ops 8 --pretrain 100000|$CONFIGS/family_sort_finetune.yaml|64|18|50 200|$CONFIGS/family_pretrain.yaml"
  [count]="count|--min-ops 1 --max-ops 12 --pretrain 100000|$CONFIGS/family_count_finetune.yaml|64|8|50 150|$CONFIGS/family_pretrain.yaml"
  [lookup]="lookup|--min-ops 1 --max-ops 8 --pretrain 100000|$CONFIGS/family_lookup_finetune.yaml|32|28|50 150|$CONFIGS/family_lookup_pretrain.yaml"
)

one_rank() { RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$((29500 + RANDOM % 1000)) "$@"; }

pretrain() {  # pretraining on the family's text, export, and the starting point's own accuracy
  local family=$1 dir=$OUT/$1
  IFS='|' read -r _ _ _ _ gen _ config <<< "${SPEC[$family]}"
  [ -f "$dir/pretrained/config.json" ] && return 0
  one_rank $PY -m mdm_scale.cli train --config "$config" \
    --set data.train_file="$dir/data/pretrain.jsonl" --set train.output_dir="$dir/pretrain" ${EXTRA:-} \
    > "$dir/pretrain.log" 2>&1
  one_rank $PY -m mdm_scale.cli export --checkpoint "$dir/pretrain" --out "$dir/pretrained" >> "$dir/pretrain.log" 2>&1
  one_rank $PY -m mdm_scale.cli eval --checkpoint "$dir/pretrained" --data "$dir/data/eval.jsonl" \
    --out "$dir/pretrained_pred.jsonl" --gen-length "$gen" --steps "$gen" --batch-size 500 2>>"$dir/pretrain.log" \
    | tail -1 > "$dir/pretrained_eval.json"
  [ -f "$dir/pretrained/config.json" ]
}

study() {  # every method x seed of one family, bounded by LIMIT_S seconds
  local family=$1 dir=$OUT/$1
  IFS='|' read -r _ _ config micro gen _ pre <<< "${SPEC[$family]}"
  local init=()
  [ "$pre" != - ] && init=(--init "$dir/pretrained")
  timeout --kill-after 20 "${LIMIT_S:-3000}" $PY -m mdm_scale.cli experiment run --config "$config" "${init[@]}" \
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
  IFS='|' read -r _ _ config micro _ early pre <<< "${SPEC[$family]}"
  local run=$dir/runs/standard/mb_$micro/seed_${SEEDS%%,*}/train init=()
  [ "$pre" != - ] && init=(--set model.path="$dir/pretrained" --set data.tokenizer="$dir/pretrained")
  local last
  last=$(ls -d "$run"/checkpoints/step_* 2>/dev/null | tail -1)
  [ -n "$last" ] || { echo "$family: no checkpoints for A/B/C"; return 1; }
  for ckpt in $early "${last##*step_}"; do
    local path
    path=$(printf "%s/checkpoints/step_%08d" "$run" "$((10#$ckpt))")
    [ -d "$path" ] || { echo "$family: missing $path"; continue; }
    one_rank $PY -m mdm_scale.cli variance measure --config "$config" "${init[@]}" \
      --set data.train_file="$dir/data/train.jsonl" --set data.eval_file="$dir/data/eval.jsonl" \
      --checkpoint "$path" --out "$dir/variance/step_$((10#$ckpt)).json" \
      --methods standard,mirror,ppots,ppots+mirror ${VARIANCE_ARGS:---x0 64 --t-draws 4 --masks 4} \
      > "$dir/variance/step_$((10#$ckpt)).log" 2>&1 &
  done
  wait
}

IFS=',' read -r -a families <<< "$FAMILIES"
declare -A pretraining=()
for family in "${families[@]}"; do
  IFS='|' read -r generator synth _ _ _ _ pre <<< "${SPEC[$family]}"
  mkdir -p "$OUT/$family/variance"
  # shellcheck disable=SC2086  # synth holds several arguments
  [ -f "$OUT/$family/data/eval.jsonl" ] || $PY -m mdm_scale.cli data synth --family "$generator" $synth \
    --out "$OUT/$family/data" --train 20000 --eval 500 --seed 0 > /dev/null
  # Pretraining shares the GPU with the studies of the families before it.
  if [ "$pre" != - ] && [[ ",$PARTS," == *,study,* ]]; then
    (pretrain "$family"; echo "$family pretraining: exit $? at $((SECONDS - start)) s") &
    pretraining[$family]=$!
  fi
done
for family in "${families[@]}"; do
  if [[ ",$PARTS," == *,study,* ]]; then
    if [ -n "${pretraining[$family]:-}" ]; then
      wait "${pretraining[$family]}"
      [ -f "$OUT/$family/pretrained/config.json" ] ||
        { echo "$family: pretraining failed: $OUT/$family/pretrain.log"; continue; }
    fi
    study "$family"
  fi
  [[ ",$PARTS," == *,variance,* ]] && variance "$family" &  # shares the GPU with the next family's study
done
wait
echo "total: $((SECONDS - start)) s"
