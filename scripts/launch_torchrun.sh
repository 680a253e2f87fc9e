#!/usr/bin/env bash
# Launch train.py under torchrun on one node or on several, with ONE run directory shared by every rank.
#
# Each torchrun rank composes its own Hydra config, so anything time-based in the run directory name would
# give one directory per rank or per node (HYDRA.md pitfall 1). This script exports FOCALNET_RUN_ID, which
# train.py's ${run_id:} resolver uses verbatim, so every rank on every node writes to
# ${paths.output_root}/${FOCALNET_RUN_ID}. Relaunching with the same id continues the same run directory, and
# trainer.resume=auto (the default) resumes exactly from its checkpoints/last.pt.
#
# One node, all its GPUs (standalone rendezvous):
#   scripts/launch_torchrun.sh experiment=in1k_focalnet_tiny_lrf data.root=/data/imagenet
# N nodes: run the same command on every node (c10d rendezvous; the endpoint is any one of the nodes):
#   NNODES=4 RDZV_ENDPOINT=node0.cluster:29500 RDZV_ID=tiny_lrf_run1 \
#     scripts/launch_torchrun.sh experiment=in1k_focalnet_tiny_lrf data.root=/data/imagenet
#
# Environment (all optional on one node):
#   NNODES          number of nodes (default 1)
#   NPROC_PER_NODE  processes per node (default: the number of visible GPUs, or 1 without GPUs)
#   RDZV_ENDPOINT   host:port of the c10d rendezvous (required when NNODES > 1)
#   RDZV_ID         rendezvous id, identical on all nodes (default $SLURM_JOB_ID; required when NNODES > 1)
#   FOCALNET_RUN_ID run directory name (default: RDZV_ID on several nodes, else <date>_<time>_<random>)
#   MAX_RESTARTS    torchrun --max-restarts: restarted workers resume from last.pt (default 0)
#   SHUTDOWN_TIMEOUT seconds torchrun's agent lets the ranks finish their update and save last.pt after a stop
#                   signal before it SIGKILLs them (torchrun --shutdown-timeout; torch's default is 30; here 120)
#   PYTHON          interpreter with torch and this project installed (default: .venv/bin/python, else python)
# Never pass -m (multirun) through this script: every rank would run the whole sweep (HYDRA.md pitfall 5);
# sweep from outside torchrun (python train.py -m ..., or hydra/launcher=slurm).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi

for arg in "$@"; do
  if [[ "$arg" == "-m" || "$arg" == "--multirun" ]]; then
    echo "launch_torchrun.sh: -m/--multirun inside torchrun runs the whole sweep on every rank;" \
         "launch sweeps with 'python train.py -m ...' instead" >&2
    exit 2
  fi
done

NNODES="${NNODES:-1}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE="$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
MAX_RESTARTS="${MAX_RESTARTS:-0}"

if [[ "$NNODES" == 1 && -z "${RDZV_ENDPOINT:-}" ]]; then
  # One node: a private rendezvous on a free local port.
  if [[ -z "${FOCALNET_RUN_ID:-}" ]]; then
    FOCALNET_RUN_ID="$(date +%Y-%m-%d_%H-%M-%S)_$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')"
  fi
  RDZV_ARGS=(--standalone)
else
  RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-}}"
  if [[ -z "${RDZV_ENDPOINT:-}" || -z "$RDZV_ID" ]]; then
    echo "launch_torchrun.sh: NNODES=$NNODES needs RDZV_ENDPOINT=host:port and RDZV_ID (the same on every node)" >&2
    exit 2
  fi
  # Every node must agree on the run directory without talking to each other first: derive it from the
  # rendezvous id, which is by definition the same on all nodes.
  FOCALNET_RUN_ID="${FOCALNET_RUN_ID:-$RDZV_ID}"
  RDZV_ARGS=(--nnodes="$NNODES" --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="$RDZV_ID")
fi
export FOCALNET_RUN_ID

# Stop signals: torchrun's agent forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to every rank's process group, but by
# default dies on SIGUSR1/SIGUSR2 (the SLURM/submitit time-limit signals) without telling the ranks, which run
# in sessions of their own. Have it forward those too; the ranks save last.pt and exit 75.
SIGNALS=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2
echo "launch_torchrun.sh: run id $FOCALNET_RUN_ID, $NNODES node(s) x $NPROC_PER_NODE process(es)" >&2
exec "$PYTHON" -m torch.distributed.run "${RDZV_ARGS[@]}" --nproc_per_node="$NPROC_PER_NODE" \
  --max_restarts="$MAX_RESTARTS" --signals_to_handle="$SIGNALS" --shutdown_timeout="${SHUTDOWN_TIMEOUT:-120}" \
  "$ROOT/train.py" "$@"
