#!/bin/bash
# One Ray node of a SLURM job, on the machine this runs on. slurm/ray_train.sh uses it:
#
#   ray_node.sh address  print ip:port the head's GCS has when this node is the head
#   ray_node.sh gpus     print how many GPUs SLURM gave this node
#   ray_node.sh head     run the head node in the foreground (`ray start --head --block`)
#   ray_node.sh worker   run a worker node in the foreground, joined to RAY_HEAD_ADDRESS
#
# Foreground (--block) on purpose: stopping this script (SIGTERM) stops exactly this job's Ray
# processes (and removes its default temp folder), whereas `ray stop` would stop every Ray on
# the machine, other jobs' included.
#
# Settings (environment; ray_train.sh exports them and srun passes them on):
#   VENV              the virtualenv with ray (default: .venv of this checkout)
#   RAY_PORT_BASE     first of this job's ports (default: from SLURM_JOB_ID, see below)
#   RAY_TEMP_DIR      Ray's temp/log folder, node-local (default: /tmp/ray-$SLURM_JOB_ID, removed
#                     when the node stops; a folder you set is kept, Ray's logs with it)
#   RAY_NODE_IFACE    network interface whose IPv4 address Ray uses (e.g. ib0, eth1); default:
#                     the address Ray picks itself (the one of the default route)
#   RAY_HEAD_ADDRESS  ip:port of the head's GCS (worker role)
#   RAY_AUTH_TOKEN    this job's Ray token (RAY_AUTH_MODE=token)
#
# Ports: Ray picks free ones itself for most of its processes; the ones it would otherwise take
# from a fixed default (GCS 6379, dashboard 8265, dashboard agent 52365, worker ports
# 10002-19999) are derived from the job id, so that two jobs on one node do not collide (jobs
# whose ids differ by a multiple of 1000 could; set RAY_PORT_BASE in that case):
#   RAY_PORT_BASE = 20000 + 10 * (SLURM_JOB_ID % 1000)   (20000..29999)
#   head:   GCS base+0, dashboard base+1, dashboard agent base+2, worker ports W+0..99
#   worker: dashboard agent base+3, worker ports W+100..199
#   W = 30000 + 200 * (SLURM_JOB_ID % 150)                (30000..59999)
# (Head and worker use different ones so that both roles can share one machine, as in tests.)
set -euo pipefail

main() {  # read whole before it runs: editing this file cannot disturb running nodes
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$repo/.venv}
job=${SLURM_JOB_ID:?ray_node.sh runs inside a SLURM job}
base=${RAY_PORT_BASE:-$((20000 + 10 * (job % 1000)))}
workers_from=$((30000 + 200 * (job % 150)))
temp_dir=${RAY_TEMP_DIR:-/tmp/ray-$job}

node_ip() {
    if [[ -n ${RAY_NODE_IFACE:-} ]]; then
        local address
        address=$(ip -4 -o addr show dev "$RAY_NODE_IFACE" | awk '{split($4, a, "/"); print a[1]; exit}')
        if [[ -z $address ]]; then
            echo "ray_node.sh: interface RAY_NODE_IFACE=$RAY_NODE_IFACE has no IPv4 address on $(hostname)" >&2
            return 1
        fi
        echo "$address"
    else
        "$venv/bin/python" -c "import ray.util; print(ray.util.get_node_ip_address())"
    fi
}

# GPUs SLURM gave this node: SLURM_GPUS_ON_NODE, else the devices it made visible, else none.
node_gpus() {
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        local devices
        IFS=, read -r -a devices <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#devices[@]}"
    else
        echo 0
    fi
}

role=${1:?usage: ray_node.sh address|gpus|head|worker}
case $role in
    address) ip=$(node_ip) && echo "$ip:$base"; exit ;;
    gpus) node_gpus; exit ;;
esac

# The job stops its nodes only once the training is over: nothing to drain (Ray would wait 30 s).
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}
ip=$(node_ip)
args=(
    --block
    --node-ip-address="$ip"
    --num-cpus="${SLURM_CPUS_ON_NODE:-$(nproc)}"
    --num-gpus="$(node_gpus)"
    --temp-dir="$temp_dir"
    --disable-usage-stats
)
case $role in
    head)
        args+=(--head --port=$((base + 0)) --dashboard-host=127.0.0.1 --dashboard-port=$((base + 1))
            --dashboard-agent-listen-port=$((base + 2))
            --min-worker-port="$workers_from" --max-worker-port=$((workers_from + 99)))
        ;;
    worker)
        args+=(--address="${RAY_HEAD_ADDRESS:?worker nodes need RAY_HEAD_ADDRESS}"
            --dashboard-agent-listen-port=$((base + 3))
            --min-worker-port=$((workers_from + 100)) --max-worker-port=$((workers_from + 199)))
        ;;
    *)
        echo "ray_node.sh: unknown role $role (expected address, gpus, head or worker)" >&2
        exit 2
        ;;
esac
echo "ray_node.sh: Ray $role on $(hostname) at $ip, temp dir $temp_dir" >&2
"$venv/bin/ray" start "${args[@]}" &
ray_pid=$!
trap 'kill -TERM "$ray_pid" 2>/dev/null || true' TERM INT
status=0
wait "$ray_pid" || status=$?
if kill -0 "$ray_pid" 2>/dev/null; then  # woken by the trap: let Ray shut its processes down
    wait "$ray_pid" || status=$?
fi
[[ -n ${RAY_TEMP_DIR:-} ]] || rm -rf "$temp_dir"
exit "$status"
}

main "$@"
