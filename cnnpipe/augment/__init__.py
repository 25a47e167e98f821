"""Batched, per-sample augmentation in plain torch, on whatever device the batch lives on."""

from cnnpipe.augment.policy import AugmentPolicy, apply_policy, no_flips

__all__ = ["AugmentPolicy", "apply_policy", "no_flips"]
