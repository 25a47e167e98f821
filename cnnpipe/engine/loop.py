"""The training loop: uint8 batches augmented and normalized on the device.

The batches come from the device path (the whole training split held on the device as uint8, no
DataLoader workers: each step gathers a batch by index) or from a stream of shards (cnnpipe.engine.stream);
either way each step augments its batch with one batched call and normalizes it on the fly.

Every random stream (shuffling, augmentation, mixing, dropout) is reseeded at the start of each epoch from
(seed, rank, epoch), so an epoch's randomness depends on nothing that came before it: a run resumed
from a checkpoint repeats the uninterrupted run exactly on CPU.
"""

from __future__ import annotations

import copy
import functools
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cnnpipe.augment import AugmentPolicy, apply_policy, mix_batch
from cnnpipe.config import TrainConfig
from cnnpipe.engine.budget import BudgetKeeper, BudgetState, Plan, Progress, validated
from cnnpipe.engine.device import autocast
from cnnpipe.engine.distributed import Dist, all_sum, barrier
from cnnpipe.engine.inference import normalize, predict_logits
from cnnpipe.errors import CnnpipeError
from cnnpipe.models import head


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # uint8 N x C x H x W, int64 labels, float boxes


class BatchSource(Protocol):
    """This process's training batches, epoch by epoch; every rank takes the same number of steps."""

    def steps(self, epoch: int) -> int: ...

    def seen(self, epoch: int) -> int: ...  # images all ranks train on in the epoch

    def epoch(self, epoch: int) -> Iterator[Batch]: ...


@dataclass
class TrainData:
    """Tensors on the training device: uint8 N x C x H x W images and int64 labels. With `train_stream`, the
    training batches come from it and the train_* tensors are None."""

    train_images: torch.Tensor | None
    train_labels: torch.Tensor | None
    val_images: torch.Tensor
    val_labels: torch.Tensor
    mean: torch.Tensor  # 1 x C x 1 x 1
    std: torch.Tensor
    train_boxes: torch.Tensor | None = None  # float N x 4, for the policy's box crops
    train_stream: BatchSource | None = None


class DeviceBatches:
    """The training split held on the device: one permutation per epoch, the same on every rank, each rank
    taking its slice of every batch."""

    def __init__(self, data: TrainData, batch_size: int, seed: int, dist: Dist):
        self.data, self.batch_size, self.seed, self.dist = data, batch_size, seed, dist
        self.n = len(data.train_labels)

    def steps(self, epoch: int) -> int:
        return math.ceil(self.n / self.batch_size)

    def seen(self, epoch: int) -> int:
        return self.n

    def epoch(self, epoch: int) -> Iterator[Batch]:
        d, bs = self.data, self.batch_size
        g = torch.Generator(device=d.train_images.device).manual_seed(epoch_seed(self.seed, 0, epoch, 1))
        order = torch.randperm(self.n, generator=g, device=d.train_images.device)
        for i in range(self.steps(epoch)):
            idx = order[i * bs:(i + 1) * bs][self.dist.rank::self.dist.world]
            yield d.train_images[idx], d.train_labels[idx], None if d.train_boxes is None else d.train_boxes[idx]


@dataclass
class FitResult:
    history: list[dict[str, float]]
    model: nn.Module  # the weights to keep: the EMA's or the model's, of the best or the last epoch (cfg.keep)
    best_epoch: int  # 0: no validation (train.train_on_val)
    kept_epoch: int
    stopped_early: bool
    budget: dict | None = None  # a budgeted run's plan, costs, re-plans and actual seconds (BudgetKeeper.record)
    warnings: list[str] = field(default_factory=list)  # said on stderr as they happened; the stage also tags the run


CHANCE_EPOCHS = 3  # epochs in a row with validation accuracy at chance before training warns


def chance_ceiling(labels: torch.Tensor, num_classes: int) -> float:
    """The validation accuracy a network that learned nothing reaches: the larger of always answering the
    commonest class and guessing uniformly, plus two standard errors of guessing on these many images."""
    n = len(labels)
    chance = max(torch.bincount(labels, minlength=num_classes).max().item() / n, 1 / num_classes)
    return chance + 2 * math.sqrt(chance * (1 - chance) / n)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Head groups first (their lr is the one logged), then the backbone's at lr x backbone_lr."""
    head_ids = {id(p) for p in head(model).parameters()}
    groups = []
    for in_head, scale in ((True, 1.0), (False, cfg.backbone_lr)):
        params = [p for p in model.parameters() if (id(p) in head_ids) == in_head]
        # no weight decay on BatchNorm weights and biases: decaying them only fights the normalization
        groups += [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay, "lr": cfg.lr * scale},
                   {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": cfg.lr * scale}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))
    return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier of the peak learning rate at `step` of `total`."""
    t = step / max(total, 1)
    if schedule == "onecycle":  # linear warm-up over the first 20%, then linear decay to zero
        return t / 0.2 if t < 0.2 else max(0.0, (1 - t) / 0.8)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "step":  # x0.1 at one third and at two thirds
        return 0.1 ** math.floor(3 * t)
    return 1.0


class EMA:
    """Exponential moving average of the weights and of the BatchNorm statistics (timm's ModelEma, torch's
    AveragedModel(use_buffers=True)): averaged weights evaluated with the current model's statistics would mix
    two models. The decay ramps up with the steps taken, min(decay, (1 + n) / (10 + n)) (TensorFlow's
    num_updates rule): a run shorter than the average's horizon (~1 / (1 - decay) steps) still ships trained
    weights, not its initial ones."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, steps: int) -> None:
        """Average in `model` after its `steps`-th step (counted over the whole run, resumes included)."""
        decay = min(self.decay, (1 + steps) / (10 + steps))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            if e.is_floating_point():
                e.lerp_(b, 1 - decay)
            else:  # counters (BatchNorm's num_batches_tracked)
                e.copy_(b)


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, partners: torch.Tensor, lam: float,
                        smoothing: float) -> torch.Tensor:
    """Cross-entropy of a batch mixed by MixUp/CutMix: lam of it is `labels`, the rest `partners` (lam 1: plain)."""
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
    if lam == 1:
        return loss
    return lam * loss + (1 - lam) * F.cross_entropy(logits.float(), partners, label_smoothing=smoothing)


def batch_loss(net: nn.Module, x: torch.Tensor, labels: torch.Tensor, partners: torch.Tensor, lam: float,
               smoothing: float, mixed: Callable) -> torch.Tensor:
    """The training loss of one batch, forward pass included (SAM's second pass)."""
    with mixed():
        return mixed_cross_entropy(net(x), labels, partners, lam, smoothing)


SAM_EPS = 1e-12  # keeps a zero gradient's perturbation finite


def sharpness_aware_gradients(model: nn.Module, rho: float, loss_at_perturbed: Callable[[], torch.Tensor]) -> None:
    """SAM (Foret et al., 2021): replace the gradients in `model` with those at the weights moved `rho` along the
    current gradient, normalized (the worst weights nearby, to first order); the weights are then put back, and so
    are the buffers the second pass moved (BatchNorm's running statistics count each step's batch once)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))
    weights = [p.detach().clone() for p in params]  # put back exactly (w + e - e is not w in floating point)
    scale = rho / (norm + SAM_EPS)  # a tensor: no host sync
    with torch.no_grad():
        for p in params:
            p.add_(p.grad * scale)
    for p in params:
        p.grad = None
    buffers = [(b, b.clone()) for b in model.buffers()]
    try:
        loss_at_perturbed().backward()
    finally:
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
            for b, before in buffers:
                b.copy_(before)


def evaluate_split(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor,
                   std: torch.Tensor) -> tuple[float, float]:
    """(loss, accuracy) of `model` on a split held on the device."""
    logits = predict_logits(model, images, mean, std)
    if len(labels) == 0:
        return float("nan"), float("nan")
    loss = F.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()


def epoch_seed(seed: int, rank: int, epoch: int, stream: int) -> int:
    """The seed of one random stream in one epoch. Streams: 0 dropout and the like, 1 the device path's shuffle,
    2 augmentation, 3 the shard plan and 4 the shard buffer (cnnpipe.engine.stream), 5 MixUp/CutMix shares."""
    return (seed * 1_000_003 + rank * 10_007 + epoch * 101 + stream) % (2**63 - 1)


def freeze_backbone(model: nn.Module, frozen: bool, bn_eval: bool) -> None:
    """Stop (or restart) gradients to everything but the head; with `bn_eval`, frozen BatchNorm layers
    also stop updating their running statistics. Call after model.train()."""
    head_ids = {id(p) for p in head(model).parameters()}
    for p in model.parameters():
        if id(p) not in head_ids:
            p.requires_grad_(not frozen)
    if frozen and bn_eval:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _check_low_res(model: nn.Module, size: int, channels: int, device: torch.device) -> None:
    """A CnnpipeError when the net cannot take size x size images (a fixed-size head: cnn3, lenet5, mlp)."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, channels, size, size, device=device))
    except RuntimeError as e:
        raise CnnpipeError(f"train.low_res {size}: this net takes only its own image size ({str(e).splitlines()[0]}); "
                           f"expected a size-agnostic arch (fastnet, resnet18, library nets) or low_res: 0") from None
    finally:
        model.train(was_training)


def _validation_seconds(model: nn.Module, data: TrainData, mixed: Callable, now: Callable[[], float]) -> float:
    """A validation pass's seconds: a slice of the split timed after a warm-up batch, scaled to the whole."""
    n = len(data.val_labels)
    if n == 0:
        return 0.0
    part = min(n, 2048)
    with mixed():
        predict_logits(model, data.val_images[:512], data.mean, data.std)
        start = now()
        predict_logits(model, data.val_images[:part], data.mean, data.std)
        return (now() - start) * n / part


def _better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if metric == "val/accuracy" else value < best


def fit(model: nn.Module, data: TrainData, cfg: TrainConfig, policy: AugmentPolicy | None,
        on_epoch: Callable[[dict[str, float]], None] | None = None,
        checkpoint: Callable[[dict], None] | None = None, resume: dict | None = None,
        dist: Dist | None = None, started: float | None = None, can_narrow: bool = False) -> FitResult:
    """Train `model` in place; returns the history and the weights to keep.

    `checkpoint(state)` is called after every epoch with everything `resume` needs to continue. With a budget,
    `started` (time.perf_counter()) is when its clock started (default: once the run is set up, every rank ready
    to take its first step); `can_narrow`: raise NarrowerNet (cnnpipe.engine.budget, with that clock) when fewer
    than train.budget_min_epochs epochs fit, found before any epoch ended.
    """
    dist = dist or Dist()  # one process
    device = data.val_images.device
    source = data.train_stream if data.train_stream is not None else DeviceBatches(data, cfg.batch_size, cfg.seed, dist)
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=memory)
    net = model
    if dist.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    mixed = autocast(device, cfg.precision)[0]
    low_res_active = bool(cfg.low_res and cfg.low_res_epochs and cfg.low_res < data.val_images.shape[-1])
    if cfg.low_res and cfg.low_res_epochs:
        _check_low_res(model, cfg.low_res, data.val_images.shape[1], device)
    plan = Plan(cfg.epochs, source.steps(cfg.epochs), cfg.low_res_epochs)  # a budget re-plans it
    progress = Progress(sum(source.steps(epoch) for epoch in range(1, cfg.epochs + 1)))
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg.schedule, progress.at(s), 1))
    ema = EMA(model, cfg.ema) if cfg.ema else None
    history: list[dict[str, float]] = []
    best_value, best_epoch, best_state = None, 0, None
    start_epoch = 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        if ema is not None:
            ema.model.load_state_dict(resume["ema"])
        history = resume["history"]
        best_value, best_epoch, best_state = resume["best_value"], resume["best_epoch"], resume["best_state"]
        start_epoch = resume["epoch"] + 1
    keeper = None
    if cfg.budget_s:
        budget = BudgetState.from_dict(resume["budget"]) if resume is not None else BudgetState(cfg.budget_s)
        if budget.plan is not None:  # a resumed run keeps its plan and the schedule's progress along it
            plan = budget.plan
            progress.__dict__.update(budget.schedule.__dict__)
        budget.schedule = progress
        # the clock starts after the set-up (a process's first DDP or optimizer imports torch._dynamo, 3-5 s;
        # docs/budget.md) and once every rank is ready (rank 0's clock would count a slower rank's set-up)
        barrier(dist)
        keeper = BudgetKeeper(budget, max_epochs=cfg.epochs,
                              low_res_share=min(cfg.low_res_epochs / cfg.epochs, 1.0) if low_res_active else 0.0,
                              full_over_low_pixels=(data.val_images.shape[-1] / cfg.low_res) ** 2 if low_res_active
                              else 1.0, dist=dist, device=device, started=started,
                              narrow_below=min(cfg.budget_min_epochs, cfg.epochs) if can_narrow else 0.0,
                              val_every=cfg.val_every)

    def adopt(new: Plan, where: str) -> None:
        """Follow `new` from here: the schedule's remaining progress spread over its remaining steps."""
        nonlocal plan
        first, old = keeper.state.replans == 0, plan
        plan = new
        progress.retarget(sched.last_epoch, sum(source.steps(e) for e in range(1, new.epochs))
                          + new.steps_in(new.epochs, source.steps(new.epochs)))
        # every plan is counted (the record); a re-plan is said when it changes the epochs by 5 % (tiny epochs
        # re-plan by a few every few epochs: hundreds of lines), the low-resolution phase or whether it fits
        said = (abs(new.epochs - old.epochs) >= max(1, old.epochs // 20), old.low_res_epochs != new.low_res_epochs,
                old.fits != new.fits)
        if dist.is_main and (first or any(said)):
            c = keeper.state.costs
            low = f", {new.low_res_epochs} at {cfg.low_res} px ({c.low_res_step_s * 1000:.0f} ms a step)" \
                if low_res_active else ""
            print(f"train.budget_s {cfg.budget_s:g}: {'planned' if first else 're-planned'} {where} at "
                  f"{keeper.elapsed():.1f} s: {c.step_s * 1000:.0f} ms a step, {c.val_s:.1f} s a validation -> "
                  f"{new.epochs} epoch{'s' if new.epochs > 1 else ''}{low}, {progress.total} steps"
                  + ("" if new.last_epoch_steps >= source.steps(new.epochs)
                     else f" (one epoch does not fit: {new.last_epoch_steps} of its {source.steps(1)} steps)"
                     if new.epochs == 1 else
                     f" (the last {new.last_epoch_steps} of its {source.steps(new.epochs)} steps)")
                  + ("" if new.fits else ": the budget is spent, stopping as soon as possible"),
                  file=sys.stderr, flush=True)

    def time_validation(epoch: int) -> float:
        seconds = _validation_seconds(ema.model if ema is not None else model, data, mixed, keeper.now)
        if cfg.freeze_epochs:  # predict_logits put every layer back in training mode
            freeze_backbone(model, epoch <= cfg.freeze_epochs, cfg.frozen_bn_eval)
        return seconds

    g_aug = torch.Generator(device=device)
    tty = sys.stderr.isatty() and dist.is_main
    stopped_early = False
    warnings: list[str] = []
    validating = len(data.val_labels) > 0  # train.train_on_val: nothing held out, no validation pass
    if not validating and (cfg.keep != "last" or cfg.early_stopping_patience):
        raise CnnpipeError("train: no val split to keep the best epoch or stop early by: expected train.keep last and "
                           "train.early_stopping_patience 0")
    if cfg.early_stopping_patience and cfg.val_every == 0:
        raise CnnpipeError("train.early_stopping_patience: train.val_every 0 validates the last epoch only, so nothing "
                           "can stop early; expected train.val_every >= 1 or train.early_stopping_patience 0")
    ceiling = chance_ceiling(data.val_labels, head(model).out_features) if validating else -1.0
    epoch = start_epoch
    while epoch <= plan.epochs:
        torch.manual_seed(epoch_seed(cfg.seed, dist.rank, epoch, 0))  # dropout and the like
        g_aug.manual_seed(epoch_seed(cfg.seed, dist.rank, epoch, 2))
        mix_rng = random.Random(epoch_seed(cfg.seed, dist.rank, epoch, 5))  # MixUp/CutMix shares: host scalars
        model.train()
        if cfg.freeze_epochs:
            freeze_backbone(model, epoch <= cfg.freeze_epochs, cfg.frozen_bn_eval)
        low_res = cfg.low_res if low_res_active and epoch <= plan.low_res_epochs else 0
        steps_per_epoch = source.steps(epoch)
        if keeper is not None:
            keeper.epoch_started()
        start = time.perf_counter()
        sums = torch.zeros(3, device=device)  # loss * count, correct, count (the ranks' counts add up)
        bar = tqdm(source.epoch(epoch), total=steps_per_epoch, desc=f"epoch {epoch}/{plan.epochs}", unit="step",
                   disable=not tty, leave=False, file=sys.stderr)
        steps = 0
        for i, (images, y, boxes) in enumerate(bar):
            size = low_res
            if keeper is not None:
                keeper.before_step(epoch, i)
                size = 0 if keeper.probing_full_res(epoch, i, bool(low_res)) else low_res
            x = images.float().div_(255.0)
            if policy is not None and not policy.is_identity:
                x, y = apply_policy(x, y, policy, g_aug, boxes)
            partners, lam = y, 1.0
            if cfg.mixup or cfg.cutmix:
                x, partners, lam = mix_batch(x, y, cfg.mixup, cfg.cutmix, g_aug, mix_rng)
            if size:
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            x = normalize(x, data.mean, data.std).contiguous(memory_format=memory)
            with mixed():
                logits = net(x)
                loss = mixed_cross_entropy(logits, y, partners, lam, cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.sam_rho:
                sharpness_aware_gradients(model, cfg.sam_rho, functools.partial(
                    batch_loss, net, x, y, partners, lam, cfg.label_smoothing, mixed))
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model, sched.last_epoch)  # the scheduler counts the run's steps, resumes included
            # no host sync per step
            predicted = logits.argmax(1)
            correct = (predicted == y).sum() * lam + (predicted == partners).sum() * (1 - lam)  # mixed: by share
            sums += torch.stack([loss.detach() * len(y), correct, torch.tensor(len(y), device=device)])
            steps = i + 1
            if tty and i % 10 == 0:
                done = (i + 1) * cfg.batch_size
                bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{done / (time.perf_counter() - start):.0f}")
            if keeper is not None:
                new = keeper.after_step(epoch=epoch, step=steps, low_res=bool(size), epoch_low_res=bool(low_res),
                                        steps_per_epoch=steps_per_epoch, time_val=functools.partial(time_validation, epoch))
                if new is not None:
                    adopt(new, f"in epoch {epoch} after step {steps}")
            if steps >= plan.steps_in(epoch, steps_per_epoch):
                break  # a planned partial last epoch
        bar.close()
        seconds = time.perf_counter() - start
        loss_sum, correct, counted = all_sum(sums, dist).tolist()
        n = source.seen(epoch) if steps == steps_per_epoch else counted
        evaluated = ema.model if ema is not None else model
        if keeper is not None:
            keeper.after_training_steps(steps=steps, low_res=bool(low_res))
        # train.val_every: this epoch validates when it is every N-th or the plan's last, or when a budget has no
        # pass's cost yet (a fresh run's epoch shorter than the first measurements; a resumed run has its checkpoint's)
        validate = validating and (validated(epoch, plan.epochs, cfg.val_every)
                                   or (keeper is not None and keeper.val_s is None and keeper.state.costs is None))
        replanned = False
        if keeper is not None and not validate:  # no pass to wait for: re-plan now; a run that ends here validates
            keeper.after_validation(None)
            new = keeper.after_epoch(epoch=epoch, low_res=bool(low_res), steps_per_epoch=source.steps(epoch + 1))
            if new is not None:
                adopt(new, f"after epoch {epoch}")
            replanned, validate = True, validating and epoch >= plan.epochs
        val: dict[str, float] = {}
        if validate:
            val_start = time.perf_counter()
            with mixed():  # validation in the training's precision (bf16: half its time here); evaluate scores in fp32
                val["val/loss"], val["val/accuracy"] = evaluate_split(evaluated, data.val_images, data.val_labels,
                                                                      data.mean, data.std)
            if keeper is not None:
                keeper.after_validation(keeper.now() - val_start)
        # checked once per epoch (a check per step would sync the device); the last step's update only shows
        # in the validation loss
        diverged = next((v for v in (loss_sum, *val.values()) if not math.isfinite(v)), None)
        if diverged is not None:
            raise CnnpipeError(f"train: the loss became {diverged} in epoch {epoch} (diverged: lower train.lr, or "
                               f"check the data); no model was written")
        stats = {
            "epoch": epoch,
            "train/loss": loss_sum / n,
            "train/accuracy": correct / n,
            **val,
            "lr": opt.param_groups[0]["lr"],
            "train/images_per_s": n / seconds,
            "train/epoch_seconds": seconds,
        }
        history.append(stats)
        scored = [h for h in history if "val/accuracy" in h]  # the validated epochs (train.val_every)
        at_chance = next((i for i, h in enumerate(reversed(scored)) if h["val/accuracy"] > ceiling), len(scored))
        if val and at_chance == CHANCE_EPOCHS:
            warnings.append(f"train: validation accuracy has stayed at chance (<= {ceiling:.3f}) for {CHANCE_EPOCHS} "
                            f"validations in a row (epochs {', '.join(str(h['epoch']) for h in scored[-CHANCE_EPOCHS:])}): "
                            f"the network is not learning (try train.pretrained imagenet, another train.lr, or check "
                            f"the labels)")
            if dist.is_main:
                print(warnings[-1], file=sys.stderr, flush=True)
        watched = stats.get(cfg.early_stopping_metric)
        if watched is not None and _better(cfg.early_stopping_metric, watched, best_value):
            best_value, best_epoch = watched, epoch
            if cfg.keep == "best":
                best_state = {k: v.detach().clone() for k, v in evaluated.state_dict().items()}
        if dist.is_main:
            print(f"epoch {epoch}/{plan.epochs}  train loss {stats['train/loss']:.4f} acc {stats['train/accuracy']:.4f}  "
                  + (f"val loss {val['val/loss']:.4f} acc {val['val/accuracy']:.4f}  " if val else "")
                  + f"{stats['train/images_per_s']:.0f} img/s "
                  f"({seconds:.1f} s)", file=sys.stderr, flush=True)
            if on_epoch is not None:
                on_epoch(stats)
        if keeper is not None and not replanned:  # before the checkpoint, which keeps the plan the rest follows
            new = keeper.after_epoch(epoch=epoch, low_res=bool(low_res), steps_per_epoch=source.steps(epoch + 1))
            if new is not None:
                adopt(new, f"after epoch {epoch}")
        if dist.is_main and checkpoint is not None:
            checkpoint({"epoch": epoch, "config": asdict(cfg), "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "ema": ema.model.state_dict() if ema is not None else None, "history": history,
                        "best_value": best_value, "best_epoch": best_epoch, "best_state": best_state,
                        "budget": {**keeper.state.to_dict(), "used_s": keeper.elapsed()} if keeper else None})
        if val and cfg.early_stopping_patience and epoch - best_epoch >= cfg.early_stopping_patience:
            stopped_early = epoch < plan.epochs
            if dist.is_main:
                print(f"early stopping: {cfg.early_stopping_metric} has not improved for "
                      f"{cfg.early_stopping_patience} epochs (best: epoch {best_epoch})", file=sys.stderr)
            break
        epoch += 1
    kept = ema.model if ema is not None else model
    if not validating and not all(t.isfinite().all() for t in kept.state_dict().values() if t.is_floating_point()):
        # what the validation loss would have shown: the last steps' updates made the weights non-finite
        raise CnnpipeError(f"train: the weights became non-finite by the end of epoch {len(history)} (diverged: lower "
                           f"train.lr, or check the data); no model was written")
    kept_epoch = len(history)
    if cfg.keep == "best" and best_state is not None:
        kept.load_state_dict(best_state)
        kept_epoch = best_epoch
    return FitResult(history, kept.to(memory_format=torch.contiguous_format), best_epoch, kept_epoch, stopped_early,
                     keeper.record() if keeper is not None else None, warnings)
