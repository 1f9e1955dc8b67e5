#!/usr/bin/env bash
# Quickstart: set up (once), write the synthetic arithmetic task, and train the quickstart model with
# 2 ZeRO-3 ranks through the deepspeed launcher (on CPU here, on 2 GPUs when there are GPUs).
# Extra arguments go to `mdm-scale train`, e.g.  bash launch/quickstart.sh --set train.max_steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
[ -f data/synth/train.jsonl ] || mdm-scale data synth --out data/synth
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.device_count() >= 2 else 1)'; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
fi
exec deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29500}" \
  --module mdm_scale.cli train --config configs/quickstart.yaml "$@"
