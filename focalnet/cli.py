"""The commands: ``focalnet-train`` (= ``python train.py``) and ``focalnet-eval`` (= ``python eval.py``).

Hydra composes the config from :data:`focalnet.layout.CONF_DIR` (the checkout's ``conf/``, or the copy installed
in the package), resolves it once and makes it read-only, then one library function runs: the entry points stay
thin. ``train.py`` and ``eval.py`` document the commands; ``pip install .`` installs the same two as console
scripts, which take the same overrides from any directory.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from focalnet.engine.distributed import adopt_launch_env, register_resolvers
from focalnet.layout import CONF_DIR

# `srun python train.py` / `srun focalnet-train`: ranks and rendezvous from SLURM's environment, before Hydra
# composes (the run directory's ${rank_suffix:} reads RANK)
adopt_launch_env(exit_on_error=True)
register_resolvers()  # ${run_id:} and ${rank_suffix:} are used by the hydra sections of conf/config.yaml, eval.yaml


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def train(cfg: DictConfig) -> float | None:
    from focalnet.engine import (
        EXIT_DIVERGED,
        EXIT_PREEMPTED,
        CheckpointWriteError,
        ConfigError,
        NonFiniteLossError,
        TrainingPreempted,
    )
    from focalnet.engine import train as run_training
    from focalnet.models.checkpoint import CheckpointError

    try:
        OmegaConf.resolve(cfg)      # ${hydra:...} and interpolations (data=folder counts classes), once, here
        OmegaConf.set_readonly(cfg, True)
        result = run_training(cfg)
    except (ConfigError, CheckpointError, CheckpointWriteError, InterpolationResolutionError) as e:
        # Fixable by the user (config, data, checkpoint, run directory, disk): one line naming the key or path.
        if isinstance(e, InterpolationResolutionError):  # a resolver's error (data=folder's class count)
            e = e.__cause__ or e.__context__
            if not isinstance(e, ConfigError):
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


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def evaluate(cfg: DictConfig) -> float | None:
    from focalnet.engine import ConfigError
    from focalnet.engine import evaluate as run_evaluation
    from focalnet.models.checkpoint import CheckpointError

    OmegaConf.resolve(cfg)
    OmegaConf.set_readonly(cfg, True)
    try:
        result = run_evaluation(cfg)
    except (ConfigError, CheckpointError) as e:  # the message says what to change (data errors are ConfigErrors)
        logging.getLogger("eval").error("%s", e)
        sys.exit(2)
    return result.get("top1")  # what a Hydra sweeper would maximize
