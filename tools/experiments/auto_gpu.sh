#!/usr/bin/env bash
# Issue 26's re-measurement of `variance.masks: auto` (docs/results.md) in one GPU call, within 9 minutes on one
# H100 at PARALLEL=16:
#   bash tools/bench/run_gpu.sh bash tools/experiments/auto_gpu.sh
# - the study (python -m tools.experiments.auto_study): sort, missing and minmax from scratch, 5 seeds; Standard,
#   auto and MIRROR 0.5x at 64 rows per micro-batch first, then MIRROR at equal batch and Standard 2x while LIMIT_S
#   allows; per family OUT/<family>/: results.md/.csv/.png (accuracy, held-out NELBO), auto_decisions.csv and
#   auto_summary.md (auto's decisions along training with both sides of the rule and their SEs), online_abc.png,
#   and every run's final checkpoint (runs/standard/mb_64/seed_*/train: what tools.bench.decode_accuracy reads);
# - the online A/B/C figure of docs/variance.md remade with the current estimators: that section's run (the
#   `small` preset on the synthetic task, variance.masks auto, 400 steps) with its TensorBoard files, then
#   `mdm-scale variance plot-online` -> OUT/figure/online_abc_small_gpu.png (drawn from whatever steps it logged,
#   also when the run is cut short by FIGURE_S).
# Knobs: OUT (results/auto), PARALLEL (16), LIMIT_S (330: no study run starts after it; 0 rewrites the reports of
# the finished runs only), STUDY_S (500: the study's hard time bound; cut there, it writes no report: run again
# with LIMIT_S=0), SEEDS, FAMILIES, FIGURE_S (420: the figure run's time bound), FIGURE_STEPS (400), EXTRA (more
# arguments of auto_study for every study run, e.g. EXTRA="--set train.max_steps=4" for a smoke test),
# FIGURE_EXTRA (more --set items for the figure run), COPY_TO (a directory: the reports, decisions, figures, logs
# and every run's result.json and logs, the auto runs' and the figure run's TensorBoard files are copied there at
# the end; checkpoints stay under OUT).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-results/auto}
PY=${PYTHON:-python3}
mkdir -p "$OUT/figure"
start=$SECONDS

figure() {
  [ -f "$OUT/figure/data/eval.jsonl" ] || $PY -m mdm_scale.cli data synth --out "$OUT/figure/data" > /dev/null
  # shellcheck disable=SC2086  # FIGURE_EXTRA holds several arguments
  RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$((29500 + RANDOM % 1000)) \
    timeout --kill-after 20 "${FIGURE_S:-420}" $PY -m mdm_scale.cli train --config configs/quickstart.yaml \
    --set model.preset=small --set data.train_file="$OUT/figure/data/train.jsonl" \
    --set data.eval_file="$OUT/figure/data/eval.jsonl" --set train.max_steps="${FIGURE_STEPS:-400}" \
    --set train.micro_batch_size=32 --set variance.masks=auto --set variance.monitor.every=20 \
    --set variance.probe.every=10 --set train.eval_every=100 --set train.zero_stage=auto --set train.save_every=0 \
    --set train.output_dir="$OUT/figure/run" ${FIGURE_EXTRA:-} > "$OUT/figure/train.log" 2>&1
  echo "figure run: exit $? at $((SECONDS - start)) s"
  $PY -m mdm_scale.cli variance plot-online "$OUT/figure/run/tensorboard" --out "$OUT/figure/online_abc_small_gpu.png" \
    --title "small preset, synthetic task, variance.masks auto" >> "$OUT/figure/train.log" 2>&1
  grep -h "variance.masks=auto\|\[variance step" "$OUT/figure/train.log" | tail -3
}

figure &
extra=()
read -r -a extra <<< "${EXTRA:-}"
timeout --kill-after 20 "${STUDY_S:-500}" $PY -m tools.experiments.auto_study --out "$OUT" \
  --families "${FAMILIES:-sort,missing,minmax}" --seeds "${SEEDS:-42,731,20231,1,2}" --parallel "${PARALLEL:-16}" \
  --limit-s "${LIMIT_S:-330}" "${extra[@]}" > "$OUT/study.log" 2>&1
echo "study: exit $? at $((SECONDS - start)) s"; tail -4 "$OUT/study.log"
wait
IFS=',' read -r -a families <<< "${FAMILIES:-sort,missing,minmax}"
for family in "${families[@]}"; do
  [ -f "$OUT/$family/auto_summary.md" ] && { echo "== $family"; cat "$OUT/$family/auto_summary.md"; }
done
if [ -n "${COPY_TO:-}" ]; then
  (cd "$OUT" && find . -maxdepth 2 \( -name '*.md' -o -name '*.csv' -o -name '*.png' -o -name '*.log' \) -print0 \
     | xargs -0 -r cp --parents -t "$COPY_TO"
   find . -path '*/runs/*' \( -name result.json -o -name train.log -o -name eval.log \) -print0 \
     | xargs -0 -r cp --parents -t "$COPY_TO"
   find . \( -path './*/runs/auto/*/tensorboard/*' -o -path './figure/run/tensorboard/*' \) -type f -print0 \
     | xargs -0 -r cp --parents -t "$COPY_TO")
fi
echo "total: $((SECONDS - start)) s"
