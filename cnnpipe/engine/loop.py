"""The training loop: data held on the device as uint8, augmented and normalized per batch.

Images never leave the device between epochs and no DataLoader workers are involved: each step
gathers a batch by index, augments it with one batched call and normalizes it on the fly.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cnnpipe.augment import AugmentPolicy, apply_policy
from cnnpipe.config import TrainConfig
from cnnpipe.engine.inference import normalize, predict_logits


@dataclass
class TrainData:
    """Tensors on the training device: uint8 N x C x H x W images and int64 labels."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    mean: torch.Tensor  # 1 x C x 1 x 1
    std: torch.Tensor


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # no weight decay on BatchNorm weights and biases: decaying them only fights the normalization
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
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


def evaluate_split(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor,
                   std: torch.Tensor) -> tuple[float, float]:
    """(loss, accuracy) of `model` on a split held on the device."""
    logits = predict_logits(model, images, mean, std)
    if len(labels) == 0:
        return float("nan"), float("nan")
    loss = F.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()


def fit(model: nn.Module, data: TrainData, cfg: TrainConfig, policy: AugmentPolicy | None,
        on_epoch: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Train `model` in place for cfg.epochs; returns one dict of metrics per epoch."""
    device = data.train_images.device
    torch.manual_seed(cfg.seed)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    n = len(data.train_labels)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg.schedule, s, total))
    tty = sys.stderr.isatty()
    history = []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(n, generator=g, device=device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", unit="step",
                   disable=not tty, leave=False, file=sys.stderr)
        for i in bar:
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            x = data.train_images[idx].float().div_(255.0)
            y = data.train_labels[idx]
            if policy is not None and not policy.is_identity:
                x, y = apply_policy(x, y, policy, g)
            logits = model(normalize(x, data.mean, data.std))
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            if tty and i % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{(i + 1) * cfg.batch_size / (time.perf_counter() - start):.0f}")
        bar.close()
        seconds = time.perf_counter() - start
        val_loss, val_acc = evaluate_split(model, data.val_images, data.val_labels, data.mean, data.std)
        stats = {
            "epoch": epoch,
            "train/loss": loss_sum.item() / n,
            "train/accuracy": correct.item() / n,
            "val/loss": val_loss,
            "val/accuracy": val_acc,
            "lr": opt.param_groups[0]["lr"],
            "train/images_per_s": n / seconds,
            "train/epoch_seconds": seconds,
        }
        history.append(stats)
        print(f"epoch {epoch}/{cfg.epochs}  train loss {stats['train/loss']:.4f} acc {stats['train/accuracy']:.4f}  "
              f"val loss {val_loss:.4f} acc {val_acc:.4f}  {stats['train/images_per_s']:.0f} img/s",
              file=sys.stderr, flush=True)
        if on_epoch is not None:
            on_epoch(stats)
    return history
