#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with mdm-scale, DeepSpeed, the test
# tools and lm-eval (the optional extra `lm-eval`, which the tests use). Safe to re-run (it only installs what
# changed). On a machine without a GPU it pins the CPU build of torch first, so no other package pulls a
# multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.mdm-scale-setup
want=$(cat pyproject.toml tools/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if ! command -v nvidia-smi >/dev/null 2>&1 && ! python -c 'import torch' 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[dev,lm-eval]"
echo "$want" > "$stamp"
echo "setup: .venv ready ($(python -c 'import torch, deepspeed; print("torch", torch.__version__, "/ deepspeed", deepspeed.__version__)'))"
