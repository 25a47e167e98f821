"""train.data_mode stream: training batches from a dataset's shards, decoded in DataLoader worker processes.

Every epoch the shard list is permuted from (seed, epoch); rank r of `world` takes every world-th shard. The
sampler hands that list, in the main process, to the loader's workers, which decode each shard whole and persist
across epochs (a worker's copy of the dataset dates from its start: the epoch reaches it through the sampler's
indexes, never through the dataset). A DataLoader returns its workers' items in the sampler's order, so the
shards arrive in the epoch's order whatever the number of workers: the batches depend on (seed, epoch, rank,
world), never on loader_workers. On the training device a shuffle buffer mixes the images of consecutive shards;
the batches are uint8 N x C x H x W, augmented and normalized by the training loop exactly as the device path's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cnnpipe import remote
from cnnpipe.data.shards import Shard, read_shard, shard_list
from cnnpipe.engine.device import available_cores
from cnnpipe.engine.distributed import Dist
from cnnpipe.engine.loop import Batch, epoch_seed
from cnnpipe.errors import CnnpipeError


class _ShardReader(Dataset):
    """Item i: shard i decoded whole (uint8 N x H x W x C images, labels, boxes if any), or the one line saying
    why it cannot be (a worker's exception would arrive wrapped in a traceback)."""

    def __init__(self, base: remote.Location, shards: list[Shard], shape: tuple[int, int, int], num_classes: int,
                 boxes: bool):
        self.base, self.shards, self.shape, self.num_classes, self.boxes = base, shards, shape, num_classes, boxes

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...] | str:
        try:
            d = read_shard(self.base, self.shards[i], shape=self.shape, num_classes=self.num_classes, boxes=self.boxes)
        except CnnpipeError as e:
            return str(e)
        return (torch.from_numpy(d.images), torch.from_numpy(d.labels)) + \
            ((torch.from_numpy(d.boxes),) if d.boxes is not None else ())


class _EpochShards(Sampler[int]):
    """This rank's shards of the coming epoch, in order, set before the epoch starts."""

    def __init__(self) -> None:
        self.order: list[int] = []

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def _draw(pool: list[torch.Tensor], filled: int, count: int, g: torch.Generator) -> list[torch.Tensor]:
    """`count` random images (and their labels, boxes) of the pool's first `filled`, copied out; the last
    `count` places move into the emptied ones, so every image is copied once in and once out."""
    drawn = torch.randperm(filled, generator=g, device=g.device)[:count]
    batch = [p[drawn] for p in pool]
    tail = filled - count
    kept = torch.ones(count, dtype=torch.bool, device=g.device)
    kept[drawn[drawn >= tail] - tail] = False
    holes, movers = drawn[drawn < tail], torch.arange(tail, filled, device=g.device)[kept]
    for p in pool:
        p[holes] = p[movers]
    return batch


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
        self.order = _EpochShards()
        import torchvision.io  # noqa: F401 - read_shard's PNG decoder, loaded once here: forked workers inherit it
        self.loader = self._loader()

    def _loader(self) -> DataLoader:
        # a generator of its own for the workers' seeds: the global RNG, seeded per epoch by the training loop,
        # stays untouched (a persistent loader draws once, in its first epoch, and resume must repeat the run)
        return DataLoader(self.reader, batch_size=None, sampler=self.order, num_workers=self.workers,
                          persistent_workers=self.workers > 0, pin_memory=self.device.type == "cuda",
                          prefetch_factor=2 if self.workers else None, generator=torch.Generator().manual_seed(self.seed))

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
        self.order.order = self._plans(epoch)[self.dist.rank]
        g = torch.Generator(device=self.device).manual_seed(epoch_seed(self.seed, self.dist.rank, epoch, 4))
        steps, b = self.steps(epoch), self.batch
        pool: list[torch.Tensor] = []  # the shuffle buffer, of room for every image it can hold at once
        filled = done = 0
        for item in self.loader:
            if isinstance(item, str):
                # a new loader, so the workers stop now: the error's traceback keeps this source, and a loader
                # freed later by the cycle collector can stall seconds joining its workers
                self.loader = self._loader()
                raise CnnpipeError(item)
            # uint8 N x H x W x C over the (pinned, on CUDA) host link
            item = [t.to(self.device, non_blocking=True) for t in item]
            if not pool:
                room = self.buffer + b + max(s.count for s in self.shards)
                pool = [torch.empty((room, *t.shape[1:]), dtype=t.dtype, device=self.device) for t in item]
            for p, t in zip(pool, item):
                p[filled:filled + len(t)] = t
            filled += len(item[0])
            while filled >= self.buffer + b and done < steps:
                images, labels, *boxes = _draw(pool, filled, b, g)
                filled, done = filled - b, done + 1
                yield images.permute(0, 3, 1, 2), labels, boxes[0] if boxes else None
            if done == steps:
                return
        while filled and done < steps:  # the last shard's images and the buffer's
            count = min(b, filled)
            images, labels, *boxes = _draw(pool, filled, count, g)
            filled, done = filled - count, done + 1
            yield images.permute(0, 3, 1, 2), labels, boxes[0] if boxes else None
