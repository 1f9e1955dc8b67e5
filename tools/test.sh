#!/usr/bin/env bash
# The test command of README.md (and of CI, through .ci/run): set up .venv if needed, lint, run pytest.
# Extra arguments go to pytest, e.g.  bash tools/test.sh -m "not distributed" -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
ruff check mdm_scale tests tools
# A one-node SLURM on localhost for tests/test_cluster.py (root and apt needed; without them that test skips
# and says why).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  bash tools/slurm_local.sh start || echo "test.sh: could not start SLURM; the SLURM test will skip"
fi
# pytest exits non-zero (5) when it collects no test, so an empty run fails too.
python -m pytest -q -rs -p no:cacheprovider "$@"
