#!/usr/bin/env bash
# The A/B/C variance decomposition of a briefly trained 1.1B MDM on one GPU (docs/variance.md; ~5 min on an
# H100): 30 steps of configs/pretrain_1b.yaml on the synthetic pretraining text, then `mdm-scale variance
# measure` on that checkpoint for every MDM estimator. Extra arguments go to `mdm-scale variance measure`.
#   bash launch/variance_1b.sh [--methods standard,mirror]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/variance_1b}
[ -f data/synth/pretrain.jsonl ] || python3 -m mdm_scale.cli data synth --out data/synth --pretrain 20000
if [ ! -f "$OUT/train/checkpoints/latest" ]; then
  deepspeed --num_gpus 1 --module mdm_scale.cli train --config configs/pretrain_1b.yaml \
    --set train.max_steps=30 --set train.eval_every=0 --set train.output_dir="$OUT/train"
fi
# '#' (id 6 of the character vocabulary) is the "####" answer delimiter of the synthetic task: ISAD's boosted id.
deepspeed --num_gpus 1 --module mdm_scale.cli variance measure --config configs/pretrain_1b.yaml \
  --checkpoint "$OUT/train" --out "$OUT/report.json" --set 'variance.isad.token_ids=[6]' \
  --methods "${METHODS:-standard,mirror,ppots,ppots+mirror,strats,syrm,isad,clipped}" \
  --x0 32 --t-draws 3 --masks 2 --grad-dim 4093 --strats-batch 8 "$@"
