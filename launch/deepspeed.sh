#!/usr/bin/env bash
# Multi-node training through the deepspeed launcher and a hostfile (launch/hostfile.example).
#
#   HOSTFILE=launch/hostfile bash launch/deepspeed.sh --config configs/pretrain_8b.yaml [--set key=value ...]
#
# Run it on the first node of the hostfile. The launcher starts every node's ranks over passwordless ssh
# (pdsh when installed); every node needs the same repository path, .venv and data (a shared filesystem).
# Without ssh between nodes, run it on every node at once with NODE_RANK=0,1,... (the launcher's --no_ssh).
# The ranks ignore SIGUSR1 until mdm-scale installs its handler: a SIGUSR1 or SIGTERM then makes every rank
# checkpoint at the next step and exit with status 75; running the same command again resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=${HOSTFILE:-launch/hostfile}
[ -f "$HOSTFILE" ] || { echo "deepspeed.sh: hostfile '$HOSTFILE' not found (see launch/hostfile.example)" >&2; exit 2; }
# shellcheck disable=SC1091
. .venv/bin/activate
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}
args=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
if [ -n "${NODE_RANK:-}" ]; then
  args+=(--no_ssh --node_rank "$NODE_RANK")
fi
trap '' USR1  # inherited by the launcher; the training ranks install their own handler
exec deepspeed "${args[@]}" --module mdm_scale.cli train "$@"
