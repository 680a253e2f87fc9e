"""Evaluation metrics beyond top-1/top-5/loss (which ``loop.validate`` computes): ImageNet-ReaL scores,
per-class accuracy, and accuracy without a class (ImageNet-1K class 850 for 22K-pretrained heads), from each
rank's ranked predictions, summed exactly over ranks."""

from __future__ import annotations

import torch

from focalnet.data.eval_sets import EvalSet
from focalnet.engine import distributed as D

# ImageNet-1K class 850 (n04399382, teddy bear) is in the imagenet22k_ms layout but has no ImageNet-22K images.
MISSING_22K_CLASS = 850


def _first_k_without(preds: torch.Tensor, cls: int, k: int) -> torch.Tensor:
    """(N, m) ranked predictions -> (N, k) ranked predictions that never name ``cls`` (m > k)."""
    keep = preds != cls
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept entries first, ranks preserved
    return preds.gather(1, order)[:, :k]


def extra_metrics(preds: torch.Tensor, targets: torch.Tensor, es: EvalSet, *, missing: int | None,
                  per_class: bool, device: torch.device) -> dict:
    """ReaL, per-class and class-850-excluded scores from this rank's (N, k) ranked predictions, summed over ranks."""
    out: dict = {}
    n_cls = es.num_classes
    top1 = preds[:, 0].eq(targets)
    top5 = preds[:, :5].eq(targets[:, None]).any(1)
    sums = []
    if missing is not None:
        others = targets.ne(missing)
        p = _first_k_without(preds, missing, min(5, preds.shape[1] - 1))
        sums += [(p[:, 0].eq(targets) & others).sum(), (p.eq(targets[:, None]).any(1) & others).sum(),
                 others.sum(), (~others).sum()]
    if es.real_labels is not None:
        if len(es.real_labels) != len(targets):
            raise RuntimeError(f"ReaL labels for {len(es.real_labels)} samples, {len(targets)} evaluated")
        r1 = r5 = rn = 0
        for row, labels in zip(preds.tolist(), es.real_labels, strict=True):
            if labels:
                rn += 1
                r1 += row[0] in labels
                r5 += any(p in labels for p in row[:5])
        sums += [torch.tensor(r1), torch.tensor(r5), torch.tensor(rn)]
    if sums:
        totals = D.all_reduce_sum(torch.stack([torch.as_tensor(s) for s in sums]).to(torch.float64).to(device))
        totals = [int(v) for v in totals.tolist()]
    if missing is not None:
        c1, c5, n, n_missing = totals[:4]
        totals = totals[4:]
        out.update(top1_excl_850=100.0 * c1 / max(n, 1), top5_excl_850=100.0 * c5 / max(n, 1), count_excl_850=n,
                   count_class_850=n_missing)
    if es.real_labels is not None:
        r1, r5, rn = totals
        out.update(real_top1=100.0 * r1 / max(rn, 1), real_top5=100.0 * r5 / max(rn, 1), real_count=rn)
    if per_class:
        counts = torch.zeros(3, n_cls, dtype=torch.float64)  # images, top-1 correct, top-5 correct
        counts[0].index_add_(0, targets, torch.ones(len(targets), dtype=torch.float64))
        counts[1].index_add_(0, targets, top1.to(torch.float64))
        counts[2].index_add_(0, targets, top5.to(torch.float64))
        counts = D.all_reduce_sum(counts.to(device)).cpu()
        names = es.class_names or [None] * n_cls
        rows = [{"class": c, "name": names[c], "count": int(counts[0, c]),
                 "top1": 100.0 * counts[1, c].item() / counts[0, c].item() if counts[0, c] else None,
                 "top5": 100.0 * counts[2, c].item() / counts[0, c].item() if counts[0, c] else None}
                for c in range(n_cls)]
        seen = [r["top1"] for r in rows if r["top1"] is not None]
        out["per_class_mean_top1"] = sum(seen) / max(len(seen), 1)
        out["per_class"] = rows
    return out
