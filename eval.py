"""Evaluate a checkpoint (top-1/top-5/loss) or measure a model's throughput: compose -> engine.evaluate(cfg).

    python eval.py checkpoint=PATH data=imagenet1k data.root=/path/to/imagenet      # our / official / timm file
    python eval.py checkpoint=PATH weights=ema per_class=true ...                   # EMA weights, per-class table
    python eval.py checkpoint=in22k.pth data=imagenet1k data.root=...               # 22K head: logits[:, :1000]
    python eval.py checkpoint=PATH eval_set=real data.root=/path/to/imagenet        # ImageNet-ReaL labels
    python eval.py checkpoint=PATH eval_set=a eval_root=/path/to/imagenet-a         # also v2, r
    python eval.py checkpoint=PATH data.img_size=384 aug.test_crop=false ...        # a 384 fine-tune
    torchrun --nproc_per_node=8 eval.py checkpoint=PATH ...                         # exact counts over ranks
    python eval.py mode=throughput model=focalnet_tiny_srf throughput.batch_size=128

The model comes from ``model=NAME`` when given, else from the checkpoint's stored config (our checkpoints),
else it is the FocalNet variant whose weights the file holds. Results are printed and written to
``<run dir>/eval.json`` (``throughput.json``); the run dir is ``${paths.output_root}/eval/<run id>``.
Exit codes: 0 done; 2 bad config, checkpoint or data (the message names the key or file); 1 other errors.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from focalnet.engine.distributed import adopt_launch_env, register_resolvers

adopt_launch_env(exit_on_error=True)  # `srun python eval.py`: ranks and rendezvous from SLURM's environment
register_resolvers()  # ${run_id:} and ${rank_suffix:} are used by conf/eval.yaml's hydra section


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    from data.folder import DataConfigError
    from focalnet.engine import ConfigError, evaluate
    from focalnet.models.checkpoint import CheckpointError

    OmegaConf.resolve(cfg)
    OmegaConf.set_readonly(cfg, True)
    try:
        result = evaluate(cfg)
    except (ConfigError, CheckpointError, DataConfigError) as e:  # the message says what to change
        logging.getLogger("eval").error("%s", e)
        sys.exit(2)
    return result.get("top1")  # what a Hydra sweeper would maximize


if __name__ == "__main__":
    main()
