"""The training and evaluation loader: uint8 images kept as one tensor on the device, batches
normalized there, augmentation (random crop after padding, flip) done on the whole batch, every
random number derived from (seed, epoch, batch) so an interrupted epoch resumes exactly."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch.nn import functional as F


def _seed(*keys: int) -> int:
    return int.from_bytes(hashlib.blake2b(repr(tuple(map(int, keys))).encode(), digest_size=8).digest()) >> 1


class DeviceLoader:
    """Batches of normalized float images from uint8 images kept on `device` (one copy, made
    here). Random numbers come from CPU generators (identical on every device): the epoch's
    permutation from (seed, epoch), the augmentation of batch i from (seed, epoch, i), so
    `epoch(e, start_batch=i)` yields exactly what an uninterrupted `epoch(e)` yields from batch i.
    Augmentation (when `augment`): random crop after zero padding by `pad` pixels in pixel space
    (pad=0: none) and random horizontal flip (`flip`), two gathers over the batch.
    Iterating the loader itself is an evaluation pass: data-set order, no augmentation."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean, std, batch_size: int,
                 shuffle: bool = False, augment: bool = False, pad: int = 4, flip: bool = True,
                 drop_last: bool = False, seed: int = 0, device=None):
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"want uint8 (N, C, H, W) images, got {x.dtype} {tuple(x.shape)}")
        if batch_size < 1 or pad < 0 or len(x) != len(y):
            raise ValueError(f"bad batch_size {batch_size}, pad {pad} or {len(x)}/{len(y)} labels")
        self.device = torch.device(device) if device is not None else x.device
        self.x = x.to(self.device)
        self.y = torch.as_tensor(y).to(self.device, torch.int64)
        c = x.shape[1]
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1).expand(c)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1).expand(c)
        self.scale = (1 / (255 * std)).view(1, c, 1, 1).to(self.device)
        self.shift = (-mean / std).view(1, c, 1, 1).to(self.device)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.pad, self.flip, self.drop_last, self.seed = pad, flip, drop_last, seed

    def __len__(self) -> int:
        n, b = len(self.x), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def epoch(self, e: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training pass `e` from batch `start_batch` (shuffled/augmented as configured)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} outside 0..{len(self)}")
        order = None
        if self.shuffle:
            g = torch.Generator().manual_seed(_seed(self.seed, e))
            order = torch.randperm(len(self.x), generator=g).to(self.device)
        return self._batches(order, e, start_batch, self.augment)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._batches(None, 0, 0, False)

    def _batches(self, order, e, start, augment):
        b = self.batch_size
        for i in range(start, len(self)):
            idx = slice(i * b, (i + 1) * b) if order is None else order[i * b:(i + 1) * b]
            x, y = self.x[idx], self.y[idx]
            if augment:
                x = self._augment(x, torch.Generator().manual_seed(_seed(self.seed, e, i)))
            yield self.normalize(x), y

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, C, H, W) -> normalized float32, (x / 255 - mean) / std in one op."""
        return torch.addcmul(self.shift, x.float(), self.scale)

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.pad
        off = torch.randint(0, 2 * p + 1, (2, n), generator=g).to(self.device)
        flip = (torch.rand(n, generator=g) < 0.5).to(self.device) & self.flip
        if p:
            x = F.pad(x, (p, p, p, p))
        rh = torch.arange(h, device=self.device)
        rw = torch.arange(w, device=self.device)
        rows = (off[0, :, None] + rh)[:, None, :, None].expand(n, c, h, w + 2 * p)
        x = torch.gather(x, 2, rows)  # (n, c, h, w + 2p): the crop's rows
        cols = off[1, :, None] + torch.where(flip[:, None], w - 1 - rw, rw)  # flip = reversed
        return torch.gather(x, 3, cols[:, None, None, :].expand(n, c, h, w))
