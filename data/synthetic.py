"""``data=synthetic``: deterministic per-index tensors with a learnable class signal (tests, benchmarks)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from focalnet.data.loaders import EpochLoader, Loaders
from focalnet.schema import AugConfig, SyntheticData


class SyntheticImages(Dataset):
    """Image ``i`` has label ``i % num_classes``; pixels are seeded noise plus a fixed per-class pattern.

    The same index always gives the same tensor (whatever the rank, worker or epoch), so two runs that see
    the same indices see the same data. ``signal`` scales the class pattern against unit noise.
    """

    def __init__(self, size: int, num_classes: int, img_size: int, *, offset: int = 0, signal: float = 1.0,
                 channels: int = 3):
        self.size, self.num_classes, self.img_size, self.offset = size, num_classes, img_size, offset
        g = torch.Generator().manual_seed(12345)
        self.patterns = torch.randn(num_classes, channels, img_size, img_size, generator=g) * signal
        self.channels = channels

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        label = index % self.num_classes
        g = torch.Generator().manual_seed(self.offset + index)
        noise = torch.randn(self.channels, self.img_size, self.img_size, generator=g)
        return noise + self.patterns[label], label


def build(data: SyntheticData, aug: AugConfig, *, rank: int = 0, world_size: int = 1, seed: int = 0,
          pin_memory: bool = False) -> Loaders:
    """Float pixels (not 8-bit images): handed over as float32, with nothing to finish."""
    train_ds = SyntheticImages(data.train_size, data.num_classes, data.img_size, signal=data.signal)
    val_ds = SyntheticImages(data.val_size, data.num_classes, data.img_size, offset=10_000_000, signal=data.signal)
    common = dict(batch_size=data.batch_size, rank=rank, world_size=world_size, seed=seed,
                  num_workers=data.num_workers, pin_memory=pin_memory)
    return Loaders(
        train=EpochLoader(train_ds, train=True, **common),
        val=EpochLoader(val_ds, train=False, **common),
        num_classes=data.num_classes,
        info={"train_size": len(train_ds), "val_size": len(val_ds)},
    )
