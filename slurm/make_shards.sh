#!/bin/bash
# Videos -> WebDataset shards as a SLURM job array: task i writes partition i of N, and a
# finalize job, submitted by the first task with --dependency=afterok on the whole array, writes
# manifest.json once every task succeeded (if one fails, it is cancelled). Submit from the
# checkout:
#
#   sbatch slurm/make_shards.sh                                         # 8 partitions of UCF101
#   sbatch --array=0-15 slurm/make_shards.sh                            # 16 partitions
#   CONFIG=configs/shards/hmdb51.yaml sbatch slurm/make_shards.sh shards.flow=farneback
#
# Settings you may change:
#   --array=0-(N-1)   number of partitions N (always 0-based and contiguous: task i writes i)
#   --cpus-per-task   decoding/flow processes per task (shards.processes follows it)
#   --time, --partition, ...   other sbatch options
#   CONFIG            shards config (default: configs/shards/ucf101.yaml)
#   OVERRIDES         space-separated key=value config overrides; script arguments are too
#   VENV              virtualenv (default: .venv of the checkout); STRESNET_DIR: the checkout
# Logs: logs/<job name>-<array job id>_<task>.out and logs/<job name>-finalize-<job id>.out.
# A re-submitted array skips the shards already written (see pipelines/shard_planning.py).
#
#SBATCH --job-name=stresnet-shards
#SBATCH --array=0-7
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail

repo=$(cd "${STRESNET_DIR:-${SLURM_SUBMIT_DIR:-.}}" && pwd)
venv=${VENV:-$repo/.venv}
config=${CONFIG:-configs/shards/ucf101.yaml}
read -r -a overrides <<<"${OVERRIDES:-}"
overrides+=("$@")

: "${SLURM_ARRAY_TASK_ID:?submit as a job array: sbatch --array=0-7 slurm/make_shards.sh}"
count=$SLURM_ARRAY_TASK_COUNT
if ((SLURM_ARRAY_TASK_MIN != 0 || SLURM_ARRAY_TASK_MAX != count - 1)); then
    echo "make_shards.sh: --array must be 0-$((count - 1)) (got tasks $SLURM_ARRAY_TASK_MIN..$SLURM_ARRAY_TASK_MAX" \
        "of $count): task i writes partition i of $count" >&2
    exit 2
fi
partitioning=(shards.num_partitions="$count")

# The first task submits the finalize job once (not again if it is itself requeued).
if ((SLURM_ARRAY_TASK_ID == 0)) && ((${SLURM_RESTART_COUNT:-0} == 0)); then
    finalize=$(sbatch --parsable --job-name="$SLURM_JOB_NAME-finalize" --ntasks=1 --cpus-per-task=1 \
        --time=01:00:00 --output="logs/%x-%j.out" --chdir="$PWD" \
        --dependency="afterok:$SLURM_ARRAY_JOB_ID" --kill-on-invalid-dep=yes \
        "$venv/bin/stresnet" shards --config "$config" --finalize "${overrides[@]}" "${partitioning[@]}")
    echo "make_shards.sh: finalize job $finalize runs after every task of array $SLURM_ARRAY_JOB_ID succeeded"
fi

echo "make_shards.sh: task $SLURM_ARRAY_TASK_ID writes partition $SLURM_ARRAY_TASK_ID of $count ($config)"
exec "$venv/bin/stresnet" shards --config "$config" shards.processes="${SLURM_CPUS_PER_TASK:-1}" \
    "${overrides[@]}" "${partitioning[@]}" shards.partition="$SLURM_ARRAY_TASK_ID"
