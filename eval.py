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

``pip install .`` installs this command as ``focalnet-eval`` (same overrides, any directory); both run
:func:`focalnet.cli.evaluate`.
"""

from focalnet.cli import evaluate

if __name__ == "__main__":
    evaluate()
