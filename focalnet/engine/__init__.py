"""The training engine: ``train(cfg)`` and the pieces it is made of (reusable by evaluation and scripts).

Modules: ``config`` (validation, derived LRs), ``distributed`` (process group, run id), ``build`` (model,
optimizer, schedule, loss), ``amp`` (the AMP optimizer step), ``checkpointing``, ``loggers``, ``loop``
(``train_one_epoch``, ``validate``), ``trainer`` (``train``).
"""

from focalnet.engine.amp import NonFiniteLossError
from focalnet.engine.checkpointing import CheckpointWriteError
from focalnet.engine.config import ConfigError, validate_config
from focalnet.engine.evaluate import evaluate  # eval.py entry point
from focalnet.engine.trainer import EXIT_DIVERGED, EXIT_PREEMPTED, TrainingPreempted, train

__all__ = ["EXIT_DIVERGED", "EXIT_PREEMPTED", "CheckpointWriteError", "ConfigError", "NonFiniteLossError", "TrainingPreempted", "evaluate",
           "train", "validate_config"]
