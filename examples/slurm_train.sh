#!/usr/bin/env bash
# Train the diffusion UNet on several nodes with torchrun: `sbatch examples/slurm_train.sh`.
#
# One Slurm task per node; each runs torchrun, which starts 8 processes (one per GPU). The rendezvous (c10d) is on the
# first node of the allocation. maisi takes the global rank from RANK and the GPU from LOCAL_RANK, so DDP spans all
# nodes (NCCL); only rank 0 writes DIR/diff_unet.pt and DIR/train_state.pt.
#
# To continue after a time-out or a failure, submit again with RESUME=1: `--resume` restores the optimiser, the
# learning-rate schedule, the epoch and the RNG from train_state.pt (the first submission must run without it).
# Create logs/ before submitting: Slurm opens the log file before the script runs.
#SBATCH --job-name=maisi-train
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --output=logs/maisi-train-%j.out

set -euo pipefail

DATA=${DATA:-$PWD/data/latents/embeddings.json}   # from `maisi data embed`
RUN=${RUN:-$PWD/runs/unet}
RESUME_FLAG=()
if [[ "${RESUME:-0}" == 1 ]]; then
    RESUME_FLAG=(--resume)
fi

mkdir -p logs "$RUN"
MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

srun torchrun \
    --nnodes "$SLURM_NNODES" \
    --nproc_per_node 8 \
    --rdzv_id "$SLURM_JOB_ID" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$MASTER:29500" \
    -m maisi_cli train diffusion \
    --data "$DATA" \
    --out "$RUN" \
    --epochs 100 \
    --batch-size 1 \
    ${RESUME_FLAG[@]+"${RESUME_FLAG[@]}"}
