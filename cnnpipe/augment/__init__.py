"""Batched, per-sample augmentation in plain torch, on whatever device the batch lives on."""

from cnnpipe.augment.policy import POLICY_FILE, PREVIEW_FILE, AugmentPolicy, apply_policy, flip_tables, mix_batch, \
    no_flips

__all__ = ["POLICY_FILE", "PREVIEW_FILE", "AugmentPolicy", "apply_policy", "flip_tables", "mix_batch", "no_flips"]
