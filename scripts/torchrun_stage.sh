#!/usr/bin/env bash
# Run one v2m stage under torchrun on this machine, then record its outputs in dvc.lock (`dvc commit`), so that
# `dvc repro` and `dvc push` carry on from there as if DVC had run it. embed and tokenize split their shards over the
# processes (rank r writes shards s % world == r; rank 0 writes the manifest); train@SYSTEM is DDP (NCCL on GPUs,
# gloo on CPU). Run from the repo root with the venv active (`source .venv/bin/activate`).
#
#   scripts/torchrun_stage.sh embed                    # one process per GPU (per core without one)
#   NPROC=8 scripts/torchrun_stage.sh train@full        # 8 processes
#   NO_COMMIT=1 scripts/torchrun_stage.sh tokenize      # leave dvc.lock alone
#   TORCHRUN_ARGS="--nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HEAD:29500 --rdzv-id ID" \
#     NO_COMMIT=1 scripts/torchrun_stage.sh embed       # one node of several: start it on every node, then run
#                                                       # `dvc commit -f embed` once (scripts/slurm/v2m.sbatch does)
set -euo pipefail
stage=${1:?usage: scripts/torchrun_stage.sh embed|tokenize|train@full|train@no_motion}
case "$stage" in
  embed | tokenize) module=(-m "pipeline.$stage") ;;
  train@*) module=(-m pipeline.train --system "${stage#train@}") ;;
  *) echo "$0: '$stage' does not scale out; embed, tokenize and train@SYSTEM do (run the others with dvc repro)" >&2
     exit 2 ;;
esac
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of options
torchrun ${TORCHRUN_ARGS:---standalone --nproc_per_node "${NPROC:-auto}"} "${module[@]}"
if [[ "${NO_COMMIT:-0}" != 1 ]]; then
  dvc commit --force "$stage"
fi
