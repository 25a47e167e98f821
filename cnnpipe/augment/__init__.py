"""Batched, per-sample augmentation in plain torch, on whatever device the batch lives on."""

from cnnpipe.augment.policy import AugmentPolicy, apply_policy, flip_tables, no_flips

__all__ = ["AugmentPolicy", "apply_policy", "flip_tables", "no_flips"]
