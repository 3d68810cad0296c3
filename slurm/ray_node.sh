#!/bin/bash
# One Ray node of a SLURM job, on the machine this runs on. slurm/ray_train.sh uses it:
#
#   ray_node.sh address  print ip:port the head's GCS has when this node is the head
#   ray_node.sh ports    print this job's ports, one "name=port" a line (what head/worker use)
#   ray_node.sh gpus     print how many GPUs SLURM gave this node
#   ray_node.sh memory   print the ray start memory options SLURM's memory limit gives
#   ray_node.sh head     run the head node in the foreground (`ray start --head --block`)
#   ray_node.sh worker   run a worker node in the foreground, joined to RAY_HEAD_ADDRESS
#
# Foreground (--block) on purpose: this script owns exactly this job's Ray processes on this
# machine, whereas `ray stop` would stop every Ray on it, other jobs' included.
#
# Signals (head and worker):
#   SIGTERM  is SLURM's preemption notice (to the job's steps, i.e. the worker nodes): this node raises
#            the run's stop request (cluster/stop_request.py, through the head's GCS) and keeps
#            Ray running, so the run can checkpoint within the grace time. Ray's own processes
#            are started with SIGTERM blocked: SLURM signals every process of a job step, and
#            Ray's would otherwise shut down at once.
#   SIGUSR2  stops this node (what slurm/ray_train.sh sends when the job is done; srun passes
#            it on to the worker nodes); SLURM's SIGKILL at the end of a job does the rest.
#
# Settings (environment; ray_train.sh exports them and srun passes them on):
#   VENV              the virtualenv with ray (default: .venv of this checkout)
#   RAY_PORT_BASE     first of this job's 15 ports (default: from SLURM_JOB_ID, see below)
#   RAY_TEMP_DIR      Ray's temp/log folder, node-local (default: /tmp/ray-$SLURM_JOB_ID, removed
#                     when the node stops; a folder you set is kept, Ray's logs with it)
#   RAY_NODE_IFACE    network interface whose IPv4 address Ray uses (e.g. ib0, eth1); default:
#                     the address Ray picks itself (the one of the default route). A loopback
#                     address (127.*, what a node without a default route falls back to) is
#                     refused unless RAY_NODE_IFACE names the loopback interface itself.
#   RAY_HEAD_ADDRESS  ip:port of the head's GCS (worker role)
#   RAY_AUTH_TOKEN    this job's Ray token (RAY_AUTH_MODE=token)
#   RAY_RUN_NAME      the run a SIGTERM asks to stop
#
# Ports: every port Ray would otherwise take from a fixed default or pick itself before binding
# (GCS 6379, client server 10001, dashboard 8265, dashboard agent 52365, node/object manager,
# metrics, runtime env agent) comes from one per-job base, below Linux's ephemeral range
# (32768-60999) so that no outgoing connection can hold one:
#   RAY_PORT_BASE = 20000 + 15 * (SLURM_JOB_ID % 800)      (20000..31985)
#   head:   base+0 GCS, +1 client server, +2 dashboard, +3 dashboard agent, +4 agent gRPC,
#           +5 node manager, +6 object manager, +7 metrics, +8 runtime env agent
#   worker: base+9 dashboard agent, +10 agent gRPC, +11 node manager, +12 object manager,
#           +13 metrics, +14 runtime env agent
# (head and worker use different ones so that both roles can share one machine, as in tests).
# Jobs whose ids differ by a multiple of 800 would share them: set RAY_PORT_BASE for one.
# Worker processes bind ports the kernel assigns (--min/max-worker-port=0): free by
# construction, never shared between jobs.
set -euo pipefail

# This job's ports in order, from RAY_PORT_BASE on (the table above).
PORT_NAMES=(gcs client_server dashboard head_agent head_agent_grpc head_node_manager head_object_manager
    head_metrics head_runtime_env worker_agent worker_agent_grpc worker_node_manager
    worker_object_manager worker_metrics worker_runtime_env)
PORTS_PER_JOB=${#PORT_NAMES[@]}

main() {  # read whole before it runs: editing this file cannot disturb running nodes
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$repo/.venv}
job=${SLURM_JOB_ID:?ray_node.sh runs inside a SLURM job}
base=${RAY_PORT_BASE:-$((20000 + PORTS_PER_JOB * (job % 800)))}
if ! [[ $base =~ ^[0-9]+$ ]] || ((base < 1024 || base + PORTS_PER_JOB - 1 > 32767)); then
    echo "ray_node.sh: RAY_PORT_BASE=$base: expected 1024..$((32767 - PORTS_PER_JOB + 1)) (this job's" \
        "$PORTS_PER_JOB ports must stay below the ephemeral range, 32768 and up)" >&2
    exit 2
fi
temp_dir=${RAY_TEMP_DIR:-/tmp/ray-$job}

node_ip() {
    local address
    if [[ -n ${RAY_NODE_IFACE:-} ]]; then
        address=$(ip -4 -o addr show dev "$RAY_NODE_IFACE" | awk '{split($4, a, "/"); print a[1]; exit}')
        if [[ -z $address ]]; then
            echo "ray_node.sh: interface RAY_NODE_IFACE=$RAY_NODE_IFACE has no IPv4 address on $(hostname)" >&2
            return 1
        fi
        echo "$address"
        return
    fi
    address=$("$venv/bin/python" -c "import ray.util; print(ray.util.get_node_ip_address())" 2>/dev/null)
    if [[ $address == 127.* ]]; then
        # No default route: Ray fell back to the host name, which Debian-style hosts map to
        # 127.0.1.1. Other nodes cannot reach that.
        echo "ray_node.sh: $(hostname) has no default route and Ray would use the loopback address" \
            "$address, which other nodes cannot reach; set RAY_NODE_IFACE to the interface the" \
            "nodes reach each other on (interfaces here: $(ip -o link show | awk -F": " '{printf "%s ", $2}'))" >&2
        return 1
    fi
    echo "$address"
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

# Ray sizes its memory resource and object store (shared memory, charged to the job) from the
# whole machine unless told: from the job's limit instead, 30% for the object store as Ray's
# default. SLURM_MEM_PER_NODE (--mem) or SLURM_MEM_PER_CPU (--mem-per-cpu) x CPUs, in MiB.
memory_options() {
    local mib=0
    if [[ -n ${SLURM_MEM_PER_NODE:-} ]]; then
        mib=$SLURM_MEM_PER_NODE
    elif [[ -n ${SLURM_MEM_PER_CPU:-} ]]; then
        mib=$((SLURM_MEM_PER_CPU * ${SLURM_CPUS_ON_NODE:-1}))
    fi
    ((mib > 0)) || return 0  # --mem=0 (the whole node) or no limit: Ray's own sizing is right
    local bytes=$((mib * 1024 * 1024))
    echo "--memory=$((bytes * 7 / 10))"
    echo "--object-store-memory=$((bytes * 3 / 10))"
}

port() {  # port NAME: this job's port for NAME (see the table at the top)
    local i
    for i in "${!PORT_NAMES[@]}"; do
        [[ ${PORT_NAMES[i]} == "$1" ]] && { echo $((base + i)); return; }
    done
    echo "ray_node.sh: no port named $1" >&2
    return 1
}

role=${1:?usage: ray_node.sh address|ports|gpus|memory|head|worker}
case $role in
    address) ip=$(node_ip) && echo "$ip:$(port gcs)"; exit ;;
    ports)
        for name in "${PORT_NAMES[@]}"; do
            echo "$name=$(port "$name")"
        done
        exit ;;
    gpus) node_gpus; exit ;;
    memory) memory_options; exit ;;
esac

# The job stops its nodes only once the training is over: nothing to drain (Ray would wait 30 s).
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}
ip=$(node_ip)
mapfile -t memory < <(memory_options)
args=(
    --block
    --node-ip-address="$ip"
    --num-cpus="${SLURM_CPUS_ON_NODE:-$(nproc)}"
    --num-gpus="$(node_gpus)"
    "${memory[@]}"
    --temp-dir="$temp_dir"
    --min-worker-port=0 --max-worker-port=0
    --disable-usage-stats
)
case $role in
    head)
        args+=(--head --port="$(port gcs)" --dashboard-host=127.0.0.1 --dashboard-port="$(port dashboard)"
            --dashboard-agent-listen-port="$(port head_agent)" --dashboard-agent-grpc-port="$(port head_agent_grpc)"
            --node-manager-port="$(port head_node_manager)" --object-manager-port="$(port head_object_manager)"
            --metrics-export-port="$(port head_metrics)" --runtime-env-agent-port="$(port head_runtime_env)")
        # Ray's client server (default 10001) runs where ray[client] is installed (grpcio); it
        # refuses a port when it is not.
        if "$venv/bin/python" -c "import grpc" 2>/dev/null; then
            args+=(--ray-client-server-port="$(port client_server)")
        fi
        ;;
    worker)
        args+=(--address="${RAY_HEAD_ADDRESS:?worker nodes need RAY_HEAD_ADDRESS}"
            --dashboard-agent-listen-port="$(port worker_agent)" --dashboard-agent-grpc-port="$(port worker_agent_grpc)"
            --node-manager-port="$(port worker_node_manager)" --object-manager-port="$(port worker_object_manager)"
            --metrics-export-port="$(port worker_metrics)" --runtime-env-agent-port="$(port worker_runtime_env)")
        ;;
    *)
        echo "ray_node.sh: unknown role $role (expected address, ports, gpus, memory, head or worker)" >&2
        exit 2
        ;;
esac
echo "ray_node.sh: Ray $role on $(hostname) at $ip, ports from $base, temp dir $temp_dir" >&2

# SIGTERM blocked for Ray and everything it starts (a blocked signal stays pending, whatever
# handler a process installs, and the mask is inherited); SIGINT back to its default, which
# background jobs of a script ignore, so that `ray start` stops its node on SIGINT.
# Its output also goes to a file: did this node ever start?
start_log=$temp_dir/ray-start-$role-$$.log
mkdir -p "$temp_dir"
start_ray() {
    "$venv/bin/python" -c '
import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
signal.signal(signal.SIGINT, signal.SIG_DFL)
os.execv(sys.argv[1], sys.argv[1:])
' "$venv/bin/ray" start "${args[@]}" > >(tee "$start_log" >&2) 2>&1 &
    ray_pid=$!
}
stopping=0
on_preemption() {
    ((stopping == 0)) && [[ -n ${RAY_RUN_NAME:-} && -n ${RAY_HEAD_ADDRESS:-} ]] || return 0
    echo "ray_node.sh: SIGTERM on $(hostname) (preemption?): asking run $RAY_RUN_NAME to checkpoint and stop" >&2
    timeout 60 "$venv/bin/python" -m cluster.stop_request --address "$RAY_HEAD_ADDRESS" --run "$RAY_RUN_NAME" >&2 || true
}
trap on_preemption TERM
trap 'stopping=1; kill -INT "$ray_pid" 2>/dev/null || true' USR2
trap '' INT  # a Ctrl-C reaches `ray start` itself (an interactive srun): once is enough
# Ray gives a starting node 30 s to register with the GCS; many nodes joining at once (or an
# overloaded machine) can miss that: a node that fails before it started tries again, up to 3
# times. A node that exits later is lost: ray_train.sh notices and requeues the job.
for attempt in 1 2 3; do
    start_ray
    while true; do  # `wait` returns whenever a trapped signal arrives: wait until Ray is gone
        status=0
        wait "$ray_pid" || status=$?
        kill -0 "$ray_pid" 2>/dev/null || break
    done
    ((stopping == 0 && status != 0)) && ! grep -q "Ray runtime started" "$start_log" || break
    echo "ray_node.sh: Ray did not start on $(hostname) (attempt $attempt, status $status)" >&2
    sleep 5
done
((stopping)) && status=0  # stopped on request: whatever Ray's exit status says
[[ -n ${RAY_TEMP_DIR:-} ]] || rm -rf "$temp_dir"
exit "$status"
}

main "$@"
