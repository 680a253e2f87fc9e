"""Train and validate an Ultralytics detector, stock or with FocalModulation, as ``conf/detect.yaml`` says.

    python scripts/train_detector.py                                   # yolov8n_focal on the generated shapes set
    python scripts/train_detector.py detector=yolov8n                  # the stock YOLOv8n, same data and budget
    python scripts/train_detector.py detector=rtdetr_l_focal data.yaml=/data/coco/coco.yaml train.imgsz=640
    python scripts/train_detector.py hydra.run.dir=outputs/detect/run1 train.resume=true   # continue a run

Ultralytics' own trainer and validator do the work (``focalnet.integrations.ultralytics_train``), offline: model
YAMLs, weights and datasets must be local files. Run directory: ``${paths.output_root}/detect/<run id>``
(``FOCALNET_RUN_ID`` or ``hydra.run.dir`` fix it) with our ``config.yaml``, ``provenance.json``,
``metrics.jsonl``, ``wandb/`` and Ultralytics' ``args.yaml``, ``results.csv``, ``weights/{last,best}.pt``.
Exit codes: 0 done; 2 a config value or input to fix (one line naming it); 1 other errors.
"""

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's focalnet/ and data/ when run from a checkout

from focalnet.engine.distributed import register_resolvers  # noqa: E402

register_resolvers()  # ${run_id:} in conf/detect.yaml's hydra section


@hydra.main(version_base="1.3", config_path="../conf", config_name="detect")
def main(cfg: DictConfig) -> float | None:
    from focalnet.engine.config import ConfigError
    from focalnet.integrations.ultralytics import UltralyticsIntegrationError
    from focalnet.integrations.ultralytics_train import DetectorConfigError, train_detector

    OmegaConf.resolve(cfg)
    OmegaConf.set_readonly(cfg, True)
    try:
        result = train_detector(cfg)
    except (DetectorConfigError, UltralyticsIntegrationError, ConfigError) as e:  # says what to change (ConfigError: run dir locked)
        logging.getLogger("train_detector").error("%s", e)
        sys.exit(2)
    return result.get("final/mAP50-95")  # what a Hydra sweeper would maximize


if __name__ == "__main__":
    main()
