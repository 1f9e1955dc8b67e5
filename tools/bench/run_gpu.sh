#!/usr/bin/env bash
# Prepare a GPU machine that has torch/transformers but no DeepSpeed (the lent H100/H200 image), then run
# the given command. Wheels come from .whl/ (DeepSpeed and its pure-Python needs built as wheels on a machine with PyPI, plus
# datasets/dill/multiprocess); the op builder needs TORCH_CUDA_ARCH_LIST=9.0 on Hopper.
#   bash tools/bench/run_gpu.sh python3 -m tools.bench.throughput --gpus 1 --preset 1b
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! python3 -c 'import deepspeed' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PWD:/tmp/site:${PYTHONPATH:-} PATH=/tmp/site/bin:$PATH
fi
export TORCH_CUDA_ARCH_LIST=9.0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD:${PYTHONPATH:-}
"$@"
