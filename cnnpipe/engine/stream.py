"""train.data_mode stream: training batches from a dataset's shards, decoded in DataLoader worker processes.

Every epoch the shard list is permuted from (seed, epoch); rank r of `world` takes every world-th shard, and
worker w of its loader decodes every workers-th of those, yielding each shard whole. A DataLoader returns its
workers' items round-robin and in order, so the shards arrive in the epoch's order whatever the number of
workers: the batches depend on (seed, epoch, rank, world), never on loader_workers. On the training device a
shuffle buffer mixes the images of consecutive shards; the batches are uint8 N x C x H x W, augmented and
normalized by the training loop exactly as the device path's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cnnpipe import remote
from cnnpipe.data.shards import Shard, read_shard, shard_list
from cnnpipe.engine.device import available_cores
from cnnpipe.engine.distributed import Dist
from cnnpipe.engine.loop import Batch, epoch_seed
from cnnpipe.errors import CnnpipeError


class _ShardReader(IterableDataset):
    """Decodes the shards `order` names (set before each epoch), this worker's share of them, whole."""

    def __init__(self, base: remote.Location, shards: list[Shard], shape: tuple[int, int, int], num_classes: int,
                 boxes: bool):
        self.base, self.shards, self.shape, self.num_classes, self.boxes = base, shards, shape, num_classes, boxes
        self.order: list[int] = []

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...] | str]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in self.order[worker::workers]:
            try:
                d = read_shard(self.base, self.shards[i], shape=self.shape, num_classes=self.num_classes,
                               boxes=self.boxes)
            except CnnpipeError as e:  # passed on as its one line (a worker's exception arrives with a traceback)
                yield str(e)
                return
            yield (torch.from_numpy(d.images), torch.from_numpy(d.labels)) + \
                ((torch.from_numpy(d.boxes),) if d.boxes is not None else ())


class StreamBatches:
    """One rank's training batches from the shards of the dataset at `base` (a local folder or a URL)."""

    def __init__(self, base: remote.Location, manifest: dict[str, Any], *, batch_size: int, shuffle_buffer: int,
                 workers: int, seed: int, dist: Dist, device: torch.device):
        self.shards = shard_list(manifest, "train", str(base))
        if len(self.shards) < dist.world:
            raise CnnpipeError(f"train.data_mode stream: {len(self.shards)} shard(s) in '{base}' cannot feed {dist.world} "
                               f"processes (ingest.shard_images smaller gives more shards)")
        side, channels = manifest["image_size"], manifest["channels"]
        self.reader = _ShardReader(base, self.shards, (side, side, channels), manifest["num_classes"],
                                   bool(manifest.get("boxes")))
        self.workers = workers or max(1, available_cores() // dist.world // 2)  # the rest compute the model
        self.batch = math.ceil(batch_size / dist.world)  # the device path's share of a batch, rounded up
        self.buffer, self.seed, self.dist, self.device = shuffle_buffer, seed, dist, device

    def _plans(self, epoch: int) -> list[list[int]]:
        """Every rank's shards this epoch (all ranks compute all plans: the step count must agree)."""
        g = torch.Generator().manual_seed(epoch_seed(self.seed, 0, epoch, 3))
        order = torch.randperm(len(self.shards), generator=g).tolist()
        return [order[r::self.dist.world] for r in range(self.dist.world)]

    def _counts(self, epoch: int) -> list[int]:
        return [sum(self.shards[i].count for i in plan) for plan in self._plans(epoch)]

    def steps(self, epoch: int) -> int:
        """Steps of every rank: that of the rank with the fewest images (DDP steps together; with several
        processes the others leave their last images out of this epoch)."""
        return min(math.ceil(n / self.batch) for n in self._counts(epoch))

    def seen(self, epoch: int) -> int:
        steps = self.steps(epoch)
        return sum(min(n, steps * self.batch) for n in self._counts(epoch))

    def epoch(self, epoch: int) -> Iterator[Batch]:
        self.reader.order = self._plans(epoch)[self.dist.rank]
        g = torch.Generator(device=self.device).manual_seed(epoch_seed(self.seed, self.dist.rank, epoch, 4))
        loader = DataLoader(self.reader, batch_size=None, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", prefetch_factor=2 if self.workers else None)
        steps, b = self.steps(epoch), self.batch
        pool: list[torch.Tensor] | None = None
        done = 0

        def drain(keep: int) -> Iterator[Batch]:
            nonlocal pool, done
            perm = torch.randperm(len(pool[0]), generator=g, device=self.device)
            pool = [t[perm] for t in pool]
            take = len(perm) - keep if keep else len(perm)
            if keep:
                take = take // b * b
            for start in range(0, take, b):
                if done == steps:
                    return
                done += 1
                yield pool[0][start:start + b], pool[1][start:start + b], \
                    pool[2][start:start + b] if len(pool) > 2 else None
            pool = [t[take:] for t in pool]

        for item in loader:
            if isinstance(item, str):
                raise CnnpipeError(item)
            # uint8 N x H x W x C over the (pinned, on CUDA) host link, then N x C x H x W on the device
            item = [t.to(self.device, non_blocking=True) for t in item]
            item[0] = item[0].permute(0, 3, 1, 2)
            pool = item if pool is None else [torch.cat([p, t]) for p, t in zip(pool, item)]
            if len(pool[0]) >= self.buffer + b:
                yield from drain(self.buffer)
            if done == steps:
                return
        if pool is not None and len(pool[0]):
            yield from drain(0)
