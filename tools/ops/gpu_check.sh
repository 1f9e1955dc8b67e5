#!/usr/bin/env bash
# GPU check of the cluster-operations features (docs/operations.md) on 2 GPUs, bf16, NCCL:
#   1. an uninterrupted 2-GPU reference run;
#   2. the same run, SIGUSR1 to its process group after step 50: every rank checkpoints and exits 75; run again,
#      it resumes and should end with the reference's final eval loss (up to GPU non-determinism);
#   3. the reference's step-200 checkpoint resumed on 1 GPU (universal checkpoint, grad_accum 2): its final eval
#      loss must be close to the reference's.
#   bash tools/ops/gpu_check.sh [OUT_DIR]      (about 5 minutes; prints the three final losses)
set -uo pipefail
cd "$(dirname "$0")/../.."
bash tools/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
OUT=${1:-runs/ops_gpu_check}
rm -rf "$OUT" && mkdir -p "$OUT"
[ -f data/synth/train.jsonl ] || mdm-scale data synth --out data/synth
common=(--config configs/quickstart.yaml --set train.max_steps=300 --set train.save_every=100
        --set train.keep_last=5 --set train.eval_every=0 --set train.log_every=10 --set logging.progress_bar=never)
final() { grep '^{"final"' "$1" | tail -n 1; }

deepspeed --num_gpus 2 --master_port 29601 --module mdm_scale.cli train "${common[@]}" \
  --set train.output_dir="$OUT/ref" > "$OUT/ref.log" 2>&1 || { echo "reference run failed: $OUT/ref.log"; exit 1; }

setsid bash -c 'trap "" USR1; exec deepspeed --num_gpus 2 --master_port 29602 --module mdm_scale.cli train "$@"' \
  _ "${common[@]}" --set train.output_dir="$OUT/stop" > "$OUT/stop.log" 2>&1 &
group=$!
until grep -q '\[train step 50\]' "$OUT/stop.log" || ! kill -0 "$group" 2>/dev/null; do sleep 0.5; done
kill -USR1 -- "-$group"
wait "$group"; rc=$?
echo "stopped run: exit status $rc (expected 75)"
deepspeed --num_gpus 2 --master_port 29603 --module mdm_scale.cli train "${common[@]}" \
  --set train.output_dir="$OUT/stop" > "$OUT/resume.log" 2>&1 || { echo "resume failed: $OUT/resume.log"; exit 1; }

mkdir -p "$OUT/elastic/checkpoints"
cp -r "$OUT/ref/checkpoints/step_00000200" "$OUT/elastic/checkpoints/"
cp -r "$OUT/ref/tokenizer" "$OUT/ref/run.json" "$OUT/elastic/"
deepspeed --num_gpus 1 --master_port 29604 --module mdm_scale.cli train "${common[@]}" --set train.grad_accum=2 \
  --set train.output_dir="$OUT/elastic" > "$OUT/elastic.log" 2>&1 || { echo "elastic failed: $OUT/elastic.log"; exit 1; }

echo "reference: $(final "$OUT/ref.log")"
echo "resumed:   $(final "$OUT/resume.log")   (eval_loss should match the reference's up to GPU non-determinism)"
echo "1 GPU:     $(final "$OUT/elastic.log")   (eval_loss close to the reference's)"
grep -h "stopped by\|resumed from\|universal" "$OUT"/*.log
