#!/bin/bash
# The body of slurm/train_ucf101.sh and slurm/train_hmdb51.sh: a Ray cluster over the job's
# nodes, `stresnet train` on it, preemption handled. Not submitted directly: the wrappers carry
# the #SBATCH settings and `exec` this script (so SLURM's warning signal reaches it).
#
# Settings (environment variables; the wrappers set the defaults):
#   CONFIG          run config (YAML), relative to the submit folder or absolute
#   OVERRIDES       config overrides, space-separated key=value (no spaces inside a value); the
#                   script's arguments are overrides too and win:
#                     OVERRIDES="train.epochs=2" sbatch slurm/train_ucf101.sh data.batch_size_per_worker=4
#   STRESNET_DIR    the checkout (default: the folder sbatch was run in)
#   VENV            virtualenv with stresnet installed (default: $STRESNET_DIR/.venv)
#   RAY_NODE_IFACE  network interface for Ray, NCCL and Gloo, e.g. ib0 (default: the default
#                   route's); also sets NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME unless they are set
#   RAY_PORT_BASE, RAY_TEMP_DIR: per-job ports and temp folder, see slurm/ray_node.sh
#   RAY_JOIN_TIMEOUT seconds to wait for every node to join Ray (default 300)
#
# What it does:
#   1. checks the config (before any node is touched) and picks the run name: the config's
#      train.run_name, else "$SLURM_JOB_NAME-$SLURM_JOB_ID" (stable across requeues);
#   2. starts the Ray head here (the first node) and a Ray worker on every other node via srun,
#      each with the CPUs/GPUs SLURM allocated there, waits until all joined;
#   3. runs `python -m cluster.train` against it; with GPUs, one Ray Train worker per GPU;
#   4. on SLURM's warning signal (USR1, see --signal in the wrappers) it tells the driver to
#      checkpoint and stop (SIGUSR1, handled by cluster/train.py), stops Ray and requeues the
#      job; the requeued job (SLURM_RESTART_COUNT > 0) passes train.resume=true and continues
#      that run from its checkpoint;
#   5. stops its Ray processes (never other jobs' on the same node) and exits with the
#      driver's status.
#
# Everything is inside main(), which bash reads whole before running it: a `git pull` while a
# job runs cannot change the lines that job has yet to execute.
set -euo pipefail

main() {

repo=$(cd "${STRESNET_DIR:-${SLURM_SUBMIT_DIR:-.}}" && pwd)
export VENV=${VENV:-$repo/.venv}
python=$VENV/bin/python
: "${CONFIG:?set CONFIG to a run config (YAML)}"
: "${SLURM_JOB_ID:?slurm/ray_train.sh runs inside a SLURM job (sbatch slurm/train_ucf101.sh)}"
read -r -a overrides <<<"${OVERRIDES:-}"
overrides+=("$@")
nodes=${SLURM_JOB_NUM_NODES:-1}
restarts=${SLURM_RESTART_COUNT:-0}
EXIT_STOPPED=75  # cluster/train.py: checkpointed and stopped on request; resume later

log() { echo "ray_train.sh [$(date -u +%H:%M:%S)] $*"; }

# What this job started; `cleanup` stops it on any exit (normal, error, scancel, requeue).
head_pid="" workers_pid="" driver_pid="" preempted=0

stop_process() {  # SIGTERM, up to 60 s to finish, then SIGKILL
    local pid=$1
    [[ -n $pid ]] && kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    stop_process "$driver_pid"
    stop_process "$workers_pid"
    stop_process "$head_pid"
    driver_pid="" workers_pid="" head_pid=""
}
trap cleanup EXIT
trap 'exit 143' TERM INT  # scancel, or the kill after a requeue: clean up on the way out

on_warning() {
    preempted=1
    log "SLURM warning signal: asking the training to checkpoint and stop"
    if [[ -n $driver_pid ]]; then
        kill -USR1 "$driver_pid" 2>/dev/null || true
    fi
}
trap on_warning USR1

# 1. The config must load before anything starts; its run name is what a requeue resumes.
if ! configured_name=$("$python" - "$CONFIG" "${overrides[@]}" <<'EOF'
import sys
from stresnet.config import ConfigError, load_config
try:
    print(load_config(sys.argv[1], sys.argv[2:]).train.run_name or "")
except ConfigError as err:
    sys.exit(f"ray_train.sh: {err}")
EOF
); then
    exit 2
fi
run_name=${configured_name:-$SLURM_JOB_NAME-$SLURM_JOB_ID}
log "job $SLURM_JOB_ID (restart $restarts): config $CONFIG, run $run_name, $nodes node(s)"

# 2. Ray: one token per job (nodes only accept their own job's processes), this job's ports.
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$("$python" -c "import secrets; print(secrets.token_hex(32))")
export RAY_AUTH_TOKEN RAY_USAGE_STATS_ENABLED=0
if [[ -n ${RAY_NODE_IFACE:-} ]]; then
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$RAY_NODE_IFACE}
    export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$RAY_NODE_IFACE}
fi
RAY_HEAD_ADDRESS=$(bash "$repo/slurm/ray_node.sh" address)
export RAY_HEAD_ADDRESS

bash "$repo/slurm/ray_node.sh" head &
head_pid=$!
if ((nodes > 1)); then
    step=(srun --nodes=$((nodes - 1)) --ntasks=$((nodes - 1)) --ntasks-per-node=1
        --exclude="$SLURMD_NODENAME" --kill-on-bad-exit=0)
    # srun does not inherit --cpus-per-task from sbatch (SLURM >= 22.05).
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && step+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    "${step[@]}" bash "$repo/slurm/ray_node.sh" worker &
    workers_pid=$!
fi
local join_timeout=${RAY_JOIN_TIMEOUT:-300}
# `timeout` as well: one connection attempt to a GCS that never comes up can itself take a minute.
if ! timeout --kill-after=10 $((join_timeout + 90)) "$python" -m cluster.ray_nodes \
    --address "$RAY_HEAD_ADDRESS" --nodes "$nodes" --timeout "$join_timeout" --watch-pid "$head_pid"; then
    exit 1
fi

# 3. The driver, with what this job decides appended (later overrides win).
job_overrides=(cluster.address="$RAY_HEAD_ADDRESS" train.run_name="$run_name")
gpus=$(bash "$repo/slurm/ray_node.sh" gpus)
if ((gpus > 0)); then  # one Ray Train worker per GPU of the allocation
    job_overrides=(cluster.use_gpu=true cluster.num_workers=$((nodes * gpus)) "${job_overrides[@]}")
fi
((restarts > 0)) && job_overrides+=(train.resume=true)

status=0
if ((preempted == 0)); then  # a warning during start-up: requeue straight away
    log "starting: python -m cluster.train --config $CONFIG ${overrides[*]} ${job_overrides[*]}"
    "$python" -m cluster.train --config "$CONFIG" "${overrides[@]}" "${job_overrides[@]}" &
    driver_pid=$!
    # `wait` returns early when a trapped signal arrives; wait again until the driver is done.
    while true; do
        status=0
        wait "$driver_pid" || status=$?
        kill -0 "$driver_pid" 2>/dev/null || break
    done
    driver_pid=""
fi

# 4./5. Stop Ray first: a requeue ends this script.
cleanup
if ((status == EXIT_STOPPED)) || { ((preempted)) && ((status != 0)); }; then
    log "training stopped at a checkpoint (status $status): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    sleep 60  # the requeue makes SLURM end this script (SIGTERM) within seconds: wait for it
    exit "$status"
fi
log "training finished with status $status"
exit "$status"
}

main "$@"
