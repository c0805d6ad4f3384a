#!/usr/bin/env bash
# 100 CT image + label pairs as a 10-task Slurm array: `sbatch examples/slurm_generate.sh`.
#
# Every task runs the same command. `maisi generate` reads SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT and writes
# only the samples k with k mod COUNT = ID (`--shard I/N` on the command line beats the variables). Sample k's seed
# derives from (--seed, k), so the 10 tasks together write the same files as one unsharded run would.
#
# Re-running is safe and cheap: a sample is complete once its sidecar (sample_NNNN.json, written last) exists, and
# complete samples are skipped; a task with nothing left to do exits in seconds without loading a network. After a
# node failure, a time-out or `scancel`, submit the same script again: only the missing samples are made, and they
# are byte-identical to what the first submission would have written. To re-run only some tasks, keep the count
# (a sub-array changes SLURM_ARRAY_TASK_COUNT): `sbatch --array=3,7 --export=ALL,SHARDS=10 examples/slurm_generate.sh`.
# Each sample is written under a lock (OUT/.sample_NNNN.lock): a job never writes a sample another live job is
# writing ("locked" in its report), and the lock file a killed job leaves behind holds nothing.
#
# Each task prints one JSON run report (written, skipped, locked, failed samples, QC, timings) to its .out file
# (create logs/ before submitting: Slurm opens the log files before the script runs).
#SBATCH --job-name=maisi-generate
#SBATCH --array=0-9
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=04:00:00
#SBATCH --output=logs/maisi-generate-%A_%a.out
#SBATCH --error=logs/maisi-generate-%A_%a.err

set -euo pipefail

OUT=${OUT:-$PWD/maisi-out}
# Weights: fetched once beforehand on a login node (`maisi weights download rflow-ct`), or a folder of them.
# export MAISI_WEIGHTS_DIR=/shared/maisi/weights

mkdir -p logs "$OUT"
SHARD=()   # default: the shard comes from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT
if [[ -n "${SHARDS:-}" ]]; then
    SHARD=(--shard "$SLURM_ARRAY_TASK_ID/$SHARDS")
fi

maisi --json generate \
    --model rflow-ct \
    --profile auto \
    --size 512x512x512 \
    -n 100 \
    --seed 0 \
    --out "$OUT" \
    ${SHARD[@]+"${SHARD[@]}"}
