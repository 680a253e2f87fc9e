"""Train a FocalNet (or any timm model) as the Hydra config says: compose -> resolve -> engine.train(cfg).

    python train.py model=focalnet_tiny data=imagenet1k data.root=/path/to/imagenet
    python train.py experiment=in1k_focalnet_tiny_lrf data.root=...      # a paper recipe (total batch 8 x 128)
    python train.py -m optimizer.lr=5e-4,1e-3                            # sweep: one run dir + W&B run per job
    python train.py -m hydra/launcher=slurm hydra.launcher.nodes=2 experiment=...   # SLURM via submitit

Multi-node with torchrun (the same command on every node; HOST is any one of them, JOB_ID any shared string):

    torchrun --standalone --nproc_per_node=8 train.py experiment=in1k_focalnet_tiny_lrf   # 1 node x 8 GPUs
    torchrun --nnodes=N --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        --rdzv_id=JOB_ID train.py experiment=in1k_focalnet_tiny_lrf                    # N nodes x 8 GPUs
    NNODES=N RDZV_ENDPOINT=HOST:29500 RDZV_ID=JOB_ID scripts/launch_torchrun.sh experiment=...  # run dir pinned

On fewer GPUs keep a recipe's total batch with trainer.accum_steps (LR x batch x world x accum / 512).

Run directory: ``${paths.output_root}/<YYYY-MM-DD_HH-MM-SS>_<random>`` (``multirun/<id>/<job>`` for sweeps),
identical on every torchrun rank (rank 0 picks it and broadcasts). ``FOCALNET_RUN_ID=name`` fixes it, so
a requeued/restarted job finds its ``checkpoints/last.pt`` again with ``trainer.resume=auto`` (the default);
``scripts/launch_torchrun.sh`` exports FOCALNET_RUN_ID (the rendezvous id on several nodes), so relaunching resumes.
Sweep from outside torchrun: ``-m`` inside torchrun makes every rank run the whole sweep.

Exit codes: 0 done; 1 error (Hydra: unknown override key); 2 a problem the user can fix, in one line naming the
key or path (invalid config, data root, corrupt or unusable checkpoint, run directory in use, a resume that
changes the run, a full disk); 3 training diverged (NaN/inf); 75 (EX_TEMPFAIL) stopped by
SIGTERM/SIGINT/SIGUSR1/SIGUSR2 after saving ``checkpoints/last.pt`` — relaunch the same command to continue exactly.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from focalnet.engine.distributed import adopt_launch_env, register_resolvers

adopt_launch_env(exit_on_error=True)  # `srun python train.py`: ranks and rendezvous from SLURM's environment
register_resolvers()  # ${run_id:} and ${rank_suffix:} are used by conf/config.yaml's hydra section


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from data.folder import DataConfigError
    from focalnet.engine import (
        EXIT_DIVERGED,
        EXIT_PREEMPTED,
        CheckpointWriteError,
        ConfigError,
        NonFiniteLossError,
        TrainingPreempted,
        train,
    )
    from focalnet.models.checkpoint import CheckpointError

    try:
        OmegaConf.resolve(cfg)      # ${hydra:...} and interpolations (data=folder counts classes), once, here
        OmegaConf.set_readonly(cfg, True)
        result = train(cfg)
    except (ConfigError, DataConfigError, CheckpointError, CheckpointWriteError, InterpolationResolutionError) as e:
        # Fixable by the user (config, data, checkpoint, run directory, disk): one line naming the key or path.
        if isinstance(e, InterpolationResolutionError):  # a resolver's error (data=folder's class count)
            e = e.__cause__ or e.__context__
            if not isinstance(e, DataConfigError):
                raise
        logging.getLogger("train").error("%s", e)
        sys.exit(2)
    except NonFiniteLossError as e:
        logging.getLogger("train").error("%s", e)
        sys.exit(EXIT_DIVERGED)
    except TrainingPreempted as e:
        logging.getLogger("train").warning("%s", e)
        sys.exit(EXIT_PREEMPTED)
    return result.get("val/top1")  # the value a Hydra sweeper (e.g. Optuna) maximizes


if __name__ == "__main__":
    main()
