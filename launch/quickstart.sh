#!/usr/bin/env bash
# Quickstart: set up (once), write the synthetic arithmetic task, and train the quickstart model with
# 2 ZeRO-3 ranks through the deepspeed launcher (on CPU here, on 2 GPUs when there are GPUs).
# Extra arguments go to `mdm-scale train`, e.g.  bash launch/quickstart.sh --set train.max_steps=50
# Environment knobs (the test suite uses them): QUICKSTART_DATA=DIR puts the synthetic task in DIR instead of
# data/synth; QUICKSTART_SETUP=0 skips tools/setup.sh and runs with the Python environment already on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${QUICKSTART_DATA:-data/synth}
if [ "${QUICKSTART_SETUP:-1}" != 0 ]; then
  bash tools/setup.sh
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
[ -f "$data/train.jsonl" ] || mdm-scale data synth --out "$data"
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.device_count() >= 2 else 1)'; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
fi
exec deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29500}" \
  --module mdm_scale.cli train --config configs/quickstart.yaml \
  --set "data.train_file=$data/train.jsonl" --set "data.eval_file=$data/eval.jsonl" "$@"
