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
#   RAY_NODE_LOSS_GRACE seconds the training gets to checkpoint and stop after one of the job's
#                   Ray nodes died (default 60); then it is stopped and the job requeued
#
# What it does:
#   1. checks the config (before any node is touched) and picks the run name: the config's
#      train.run_name, else "$SLURM_JOB_NAME-$SLURM_JOB_ID" (stable across requeues);
#   2. starts the Ray head here (the first node) and a Ray worker on every other node via srun
#      (--export=ALL: sites that default to --export=NONE would otherwise start it without this
#      job's settings), each with the CPUs, GPUs and memory SLURM allocated there, waits until
#      all joined;
#   3. runs `python -m cluster.train` against it; with GPUs, one Ray Train worker per GPU of the
#      joined cluster, each with the CPUs of its node divided among that node's GPUs
#      (cluster.cpus_per_worker, data.loader_workers: see cluster/ray_nodes.py);
#   4. on SLURM's warning signal (USR1, see --signal in the wrappers) or a SIGTERM to this
#      script (a one-node job's preemption at some sites) it tells the driver to checkpoint and stop (SIGUSR1,
#      handled by cluster/train.py), stops Ray and requeues the job; the worker nodes raise the
#      same request when SLURM's preemption SIGTERM reaches them (slurm/ray_node.sh). The
#      requeued job (SLURM_RESTART_COUNT > 0) passes train.resume=true and continues that run
#      from its checkpoint;
#   5. if a Ray node dies while the training runs (its raylet crashed, killed, out of memory),
#      it asks the training to checkpoint and stop, stops it after RAY_NODE_LOSS_GRACE seconds
#      if it cannot, and requeues the job: it resumes from the last checkpoint instead of
#      waiting for the lost node until the time limit;
#   6. stops its Ray processes (never other jobs' on the same node) and exits with the
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
head_pid="" workers_pid="" driver_pid="" preempted=0 requeued=0

stop_process() {  # stop_process PID SIGNAL...: the signals 1 s apart, up to 60 s to end, SIGKILL
    local pid=$1 sig
    shift
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    for sig in "$@"; do
        kill "-$sig" "$pid" 2>/dev/null || true
        sleep 1
    done
    for _ in $(seq 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    # The driver takes a first SIGTERM as a stop request, a second one as the end.
    stop_process "$driver_pid" TERM TERM
    # SIGUSR2 stops a Ray node (slurm/ray_node.sh; SIGTERM means preemption there); srun passes
    # it on to the worker nodes.
    stop_process "$workers_pid" USR2
    stop_process "$head_pid" USR2
    driver_pid="" workers_pid="" head_pid=""
}
trap cleanup EXIT

lost_node() {  # prints which of the job's Ray nodes exited, if one did
    if ! kill -0 "$head_pid" 2>/dev/null; then
        echo "the Ray head node ($SLURMD_NODENAME)"
    elif [[ -n $workers_pid ]] && ! kill -0 "$workers_pid" 2>/dev/null; then
        echo "a Ray worker node (the srun step)"
    fi
}

job_state() { scontrol show job --oneliner "$SLURM_JOB_ID" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2; }

on_warning() {  # on_warning WHAT: checkpoint, stop, requeue (see 4. above)
    preempted=1
    log "$1: asking the training to checkpoint and stop"
    if [[ -n $driver_pid ]]; then
        kill -USR1 "$driver_pid" 2>/dev/null || true
    fi
}
on_term() {
    # After our own requeue, or when the job was cancelled: end now (cleanup on the way out).
    if ((requeued)) || [[ $(job_state) == CANCELLED ]]; then
        exit 143
    fi
    on_warning "SIGTERM (preemption?)"
}
trap 'on_warning "SLURM warning signal (USR1)"' USR1
trap on_term TERM
trap 'exit 130' INT

# 1. The config must load before anything starts; its run name is what a requeue resumes.
if ! configured_name=$("$python" - "$CONFIG" "${overrides[@]}" <<'EOF'
import sys
from cluster.config import load_config
from stresnet.config import ConfigError
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
export RAY_RUN_NAME=$run_name  # the run a node's SIGTERM asks to stop (slurm/ray_node.sh)
if [[ -n ${RAY_NODE_IFACE:-} ]]; then
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$RAY_NODE_IFACE}
    export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$RAY_NODE_IFACE}
fi
RAY_HEAD_ADDRESS=$(bash "$repo/slurm/ray_node.sh" address)
# RAY_ADDRESS as well: Ray's own processes that look a cluster up (Ray Train's placement-group
# cleaner) would otherwise find every Ray on the node, other jobs' included, and give up.
export RAY_HEAD_ADDRESS RAY_ADDRESS=$RAY_HEAD_ADDRESS

bash "$repo/slurm/ray_node.sh" head &
head_pid=$!
if ((nodes > 1)); then
    # --export=ALL: this script's environment (the head address, token, VENV, NCCL settings),
    # also where the site or the user submitted with --export=NONE (SLURM_EXPORT_ENV=NONE,
    # which srun would otherwise obey).
    step=(srun --export=ALL --nodes=$((nodes - 1)) --ntasks=$((nodes - 1)) --ntasks-per-node=1
        --exclude="$SLURMD_NODENAME" --kill-on-bad-exit=0)
    # srun does not inherit --cpus-per-task from sbatch (SLURM >= 22.05).
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && step+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    "${step[@]}" bash "$repo/slurm/ray_node.sh" worker &
    workers_pid=$!
fi
local join_timeout=${RAY_JOIN_TIMEOUT:-300}
# `timeout` as well: one connection attempt to a GCS that never comes up can itself take a minute.
# It prints the workers the joined cluster has room for (GPU jobs: see cluster/ray_nodes.py).
if ! plan=$(timeout --kill-after=10 $((join_timeout + 90)) "$python" -m cluster.ray_nodes \
    --address "$RAY_HEAD_ADDRESS" --nodes "$nodes" --timeout "$join_timeout" --watch-pid "$head_pid" ${workers_pid:+--watch-pid "$workers_pid"} --plan); then
    exit 1
fi

# 3. The driver. Overrides in order, later ones win: the workers' CPUs from the allocation (yours
# may change them), yours, then what this job decides (Ray address, run name, GPU workers).
read -r -a planned <<<"$plan"
derived=() job_overrides=(cluster.address="$RAY_HEAD_ADDRESS" train.run_name="$run_name")
for override in "${planned[@]}"; do
    case $override in
        cluster.use_gpu=* | cluster.num_workers=*) job_overrides=("$override" "${job_overrides[@]}") ;;
        *) derived+=("$override") ;;
    esac
done
((restarts > 0)) && job_overrides+=(train.resume=true)

status=0 lost=""
if ((preempted == 0)); then  # a warning during start-up: requeue straight away
    log "starting: python -m cluster.train --config $CONFIG ${derived[*]} ${overrides[*]} ${job_overrides[*]}"
    "$python" -m cluster.train --config "$CONFIG" "${derived[@]}" "${overrides[@]}" "${job_overrides[@]}" &
    driver_pid=$!
    # Watch the Ray nodes as well as the driver: Ray Train waits without limit for a lost node's
    # resources, so a dead node would otherwise hang the job until its time limit.
    grace=${RAY_NODE_LOSS_GRACE:-60} lost_at=0 status=""
    while [[ -z $status ]]; do
        if ! kill -0 "$driver_pid" 2>/dev/null; then
            # Its status (`wait` also returns when a trapped signal arrives: then look again).
            ended=0
            wait "$driver_pid" || ended=$?
            kill -0 "$driver_pid" 2>/dev/null || status=$ended
        elif [[ -z $lost ]]; then
            lost=$(lost_node)
            if [[ -n $lost ]]; then
                lost_at=$SECONDS
                on_warning "$lost exited"
            fi
        elif ((SECONDS - lost_at >= grace)); then
            log "the training did not stop within ${grace}s of losing a node: stopping it"
            stop_process "$driver_pid" TERM TERM  # a second SIGTERM ends the driver
            status=1
        fi
        sleep 1
    done
    driver_pid=""
    # The driver may have failed on its own before the loop saw the node go: look again.
    if ((status != 0)) && [[ -z $lost ]]; then
        sleep 3
        lost=$(lost_node)
        [[ -z $lost ]] || preempted=1
    fi
fi

# 4.-6. Stop Ray first: a requeue ends this script.
cleanup
if ((status == EXIT_STOPPED)) || { ((preempted)) && ((status != 0)); }; then
    if [[ $(job_state) == CANCELLED ]]; then
        log "training stopped (status $status); job $SLURM_JOB_ID was cancelled: not requeueing"
        exit "$status"
    fi
    if [[ -n $lost ]]; then
        log "$lost was lost (status $status): requeueing job $SLURM_JOB_ID to resume from the last checkpoint"
    else
        log "training stopped at a checkpoint (status $status): requeueing job $SLURM_JOB_ID"
    fi
    requeued=1
    scontrol requeue "$SLURM_JOB_ID"
    sleep 60  # the requeue makes SLURM end this script (SIGTERM) within seconds: wait for it
    exit "$status"
fi
log "training finished with status $status"
exit "$status"
}

main "$@"
