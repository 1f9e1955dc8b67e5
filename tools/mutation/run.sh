#!/usr/bin/env bash
# Mutation testing of the estimator path: mdm_scale/diffusion/ and models/masked_head.py, against the fast
# estimator tests ([tool.mutmut] in pyproject.toml). Not part of CI; docs/testing.md records the score and reviews
# every surviving mutant. Needs the `mutation` extra (pip install -e ".[mutation]").
# Usage: bash tools/mutation/run.sh [time limit in seconds, default 3600] [mutant name globs...]
set -uo pipefail
cd "$(dirname "$0")/../.."
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
limit=${1:-3600}
shift || true
timeout "$limit" mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "$@"
mutmut results --all true > mutants/results.txt 2>&1 || mutmut results > mutants/results.txt 2>&1
grep -c ": killed" mutants/results.txt | sed 's/^/killed: /'
grep -v ": killed" mutants/results.txt
