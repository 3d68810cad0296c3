#!/bin/bash
# ST-ResNet on HMDB51 with Ray Train over N nodes x G GPUs. Submit from the checkout:
#
#   sbatch slurm/train_hmdb51.sh                                   # the defaults below
#   sbatch --nodes=4 --gpus-per-node=8 slurm/train_hmdb51.sh       # sbatch options win over #SBATCH
#   CONFIG=configs/hmdb51/motion_base.yaml sbatch slurm/train_hmdb51.sh train.epochs=2
#
# Settings you may change (details in slurm/ray_train.sh and docs/cluster.md):
#   --nodes, --gpus-per-node, --cpus-per-task, --mem, --time, --partition ...   sbatch options
#   CONFIG        run config (default: configs/hmdb51/stresnet_stage1.yaml)
#   OVERRIDES     space-separated key=value config overrides; script arguments are overrides too
#   VENV          virtualenv (default: .venv of the checkout); STRESNET_DIR: the checkout
#   RAY_NODE_IFACE network interface for Ray/NCCL/Gloo (e.g. ib0); RAY_JOIN_TIMEOUT
# The log is logs/<job name>-<job id>.out in the submit folder (the checkout has logs/; sbatch
# does not create it); a requeued job appends to the same file. 300 s before the time limit
# SLURM sends USR1, on preemption SIGTERM (with the partition's GraceTime to react): the run
# checkpoints and the job requeues itself, resuming the same run. Checkpoint-and-requeue a job
# by hand: scancel --signal=USR1 --batch JOBID.
# --mem is per node: Ray's object store and memory are sized from it (slurm/ray_node.sh).
#
#SBATCH --job-name=stresnet-hmdb51
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --mem=128G
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
export CONFIG=${CONFIG:-configs/hmdb51/stresnet_stage1.yaml}
exec bash "${STRESNET_DIR:-$SLURM_SUBMIT_DIR}/slurm/ray_train.sh" "$@"
