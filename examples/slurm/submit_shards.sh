#!/bin/bash
# Submit an array job of SHARDS tasks (shards.sbatch) and a merge (merge.sbatch) that starts once
# every task has ended, whatever its exit code: the merge itself checks that all shards finished.
#
#   INPUT=/data/prompts.parquet OUT=/data/out MODEL=/models/my-model SHARDS=8 \
#   GENERATE_ARGS="--max-tokens 512" examples/slurm/submit_shards.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${INPUT:?set INPUT to the prompts file}"
export OUT=${OUT:-tokenmill-out} SHARDS=${SHARDS:-8}
mkdir -p "$OUT"
array=$(sbatch --parsable --array=0-$((SHARDS - 1)) "$here/shards.sbatch")
array=${array%%;*}  # --parsable prints JOBID[;CLUSTER]
merge=$(sbatch --parsable --dependency=afterany:"$array" "$here/merge.sbatch")
echo "submitted array job ${array} (${SHARDS} shards) and merge job ${merge%%;*}"
