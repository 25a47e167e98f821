import numpy as np
import torch

import random

import pytest

from cnnpipe.augment import AugmentPolicy, apply_policy, mix_batch, no_flips
from cnnpipe.data.store import Split
from cnnpipe.stages.augment import balance
from tests.helpers import make_images


def policy(**kw) -> AugmentPolicy:
    base = dict(translate=0, rotate=0, scale=0, shear=0, brightness=0, contrast=0, saturation=0, cutout=0,
                hflip=no_flips(3))
    return AugmentPolicy(**{**base, **kw})


def batch(n=16, c=3, size=12):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, c, size, size, generator=g), torch.arange(n) % 3


def test_identity_policy_changes_nothing():
    x, y = batch()
    out, labels = apply_policy(x.clone(), y, policy(), torch.Generator().manual_seed(0))
    assert policy().is_identity and torch.equal(out, x) and torch.equal(labels, y)


def test_every_transform_is_per_sample_and_seeded():
    x, y = batch()
    p = policy(translate=0.2, rotate=20, scale=0.2, shear=10, brightness=0.3, contrast=0.3, saturation=0.3, cutout=0.3)
    a, _ = apply_policy(x.clone(), y, p, torch.Generator().manual_seed(1))
    b, _ = apply_policy(x.clone(), y, p, torch.Generator().manual_seed(1))
    c, _ = apply_policy(x.clone(), y, p, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    # per sample: two copies of the same image come out different in one batch
    twins = x[:1].repeat(2, 1, 1, 1)
    t, _ = apply_policy(twins, y[:2], p, torch.Generator().manual_seed(3))
    assert not torch.equal(t[0], t[1])


def test_translation_moves_content():
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 8, 8] = 1.0
    out, _ = apply_policy(x.clone(), torch.zeros(1, dtype=torch.long), policy(translate=0.25, hflip=[-1]),
                          torch.Generator().manual_seed(0))
    assert out.argmax() != x.argmax()


def test_cutout_zeroes_a_square():
    x = torch.ones(4, 1, 16, 16)
    out, _ = apply_policy(x, torch.zeros(4, dtype=torch.long), policy(cutout=0.25, hflip=[-1]),
                          torch.Generator().manual_seed(0))
    zeros = (out == 0).flatten(1).sum(1)
    assert (zeros > 0).all() and (zeros <= 25).all()


def test_flip_table_remaps_labels_and_never_flips_forbidden_classes():
    # class 0 flips into itself, 1 <-> 2 swap, class 3 never flips
    x = torch.arange(4 * 1 * 2 * 4, dtype=torch.float).view(4, 1, 2, 4).repeat(50, 1, 1, 1) / 32
    y = torch.arange(4).repeat(50)
    out, labels = apply_policy(x.clone(), y, policy(hflip=[0, 2, 1, -1]), torch.Generator().manual_seed(0))
    flipped = (out != x).flatten(1).any(1)
    assert flipped.any() and not flipped[y == 3].any()
    assert torch.equal(labels[flipped & (y == 1)], torch.full_like(labels[flipped & (y == 1)], 2))
    assert torch.equal(labels[~flipped], y[~flipped])
    assert torch.equal(out[flipped], x[flipped].flip(-1))


def test_balance_tops_up_rare_classes_with_new_images():
    images, labels = make_images(10, 3, 8, 1)
    keep = np.concatenate([np.arange(10), np.arange(10, 14), np.arange(20, 30)])  # class 1 has 4 images
    split = Split(images[keep], labels[keep])
    out, added = balance(split, 10, policy(rotate=15, translate=0.1), torch.Generator().manual_seed(0))
    assert np.bincount(out.labels).tolist() == [10, 10, 10] and added == {1: 6}
    new = out.images[len(split.labels):]
    assert not any(np.array_equal(n, o) for n in new for o in split.images)  # augmented, not duplicated


def test_flip_tables_are_class_aware():
    from cnnpipe.augment import flip_tables
    from cnnpipe.augment.policy import CIFAR10
    from cnnpipe.data.sources.gtsrb import CLASSES

    g = flip_tables(CLASSES, "auto")
    name = CLASSES.index
    assert g["hflip"][name("Keep right")] == name("Keep left") and g["hflip"][name("Turn left ahead")] == name("Turn right ahead")
    assert g["hflip"][name("Yield")] == name("Yield")
    assert g["hflip"][name("Stop")] == -1 and g["vflip"][name("Stop")] == -1 and g["rot180"][name("Stop")] == -1
    thirty = name("Speed limit (30km/h)")
    assert g["hflip"][thirty] == -1 and g["vflip"][thirty] == thirty
    assert g["rot180"][name("End of all speed and passing limits")] == name("End of all speed and passing limits")
    assert flip_tables(CIFAR10, "auto")["hflip"] == list(range(10))
    assert flip_tables([str(d) for d in range(10)], "auto") == {k: [-1] * 10 for k in ("hflip", "vflip", "rot180")}
    assert flip_tables(CLASSES, "none")["hflip"] == [-1] * 43


def test_rotation_by_half_turn_table():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float).view(2, 1, 3, 3).repeat(40, 1, 1, 1) / 18
    y = torch.tensor([0, 1]).repeat(40)
    out, labels = apply_policy(x.clone(), y, policy(hflip=[], rot180=[0, -1]), torch.Generator().manual_seed(0))
    turned = (out != x).flatten(1).any(1)
    assert turned[y == 0].any() and not turned[y == 1].any()
    assert torch.equal(out[turned], x[turned].flip((-2, -1))) and torch.equal(labels, y)


def test_horizontal_flips_every_class_into_itself():
    from cnnpipe.augment import flip_tables

    assert flip_tables(["cat", "dog", "fox"], "horizontal") == {"hflip": [0, 1, 2], "vflip": [-1] * 3, "rot180": [-1] * 3}
    x = torch.arange(3 * 2 * 4, dtype=torch.float).view(3, 1, 2, 4).repeat(20, 1, 1, 1) / 24
    y = torch.arange(3).repeat(20)
    out, labels = apply_policy(x.clone(), y, policy(hflip=[0, 1, 2]), torch.Generator().manual_seed(0))
    flipped = (out != x).flatten(1).any(1)
    assert flipped[y == 0].any() and flipped[y == 2].any() and torch.equal(labels, y)
    assert torch.equal(out[flipped], x[flipped].flip(-1))


def test_random_resized_crops_zoom_into_a_window_of_at_least_the_asked_area():
    """A gradient image: a crop spans less of the gradient (its range shrinks) by at most sqrt of the area share."""
    ramp = torch.linspace(0, 1, 64).view(1, 1, 1, 64).repeat(200, 1, 64, 1)
    labels = torch.zeros(200, dtype=torch.long)
    out, _ = apply_policy(ramp.clone(), labels, policy(hflip=[-1], crop_scale=0.25), torch.Generator().manual_seed(0))
    span = out[:, 0, 32].amax(1) - out[:, 0, 32].amin(1)  # the share of the width each crop kept (~)
    assert span.max() <= 1.0 + 1e-6 and span.min() >= (0.25 * 3 / 4) ** 0.5 - 0.05
    assert span.std() > 0.05  # the windows differ per image
    a, _ = apply_policy(ramp[:4].clone(), labels[:4], policy(hflip=[-1], crop_scale=0.25), torch.Generator().manual_seed(1))
    b, _ = apply_policy(ramp[:4].clone(), labels[:4], policy(hflip=[-1], crop_scale=0.25), torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not policy(crop_scale=0.25).is_identity


def test_interpolation_nearest_only_moves_pixels_and_bicubic_stays_in_range():
    x, y = batch()
    p = dict(rotate=20, scale=0.2, translate=0.1)
    near, _ = apply_policy(x.clone(), y, policy(**p, interpolation="nearest"), torch.Generator().manual_seed(0))
    smooth, _ = apply_policy(x.clone(), y, policy(**p), torch.Generator().manual_seed(0))
    cubic, _ = apply_policy(x.clone(), y, policy(**p, interpolation="bicubic"), torch.Generator().manual_seed(0))
    # nearest copies input pixels (no new values, no blur); bilinear makes new in-between values
    assert torch.isin(near, x).all() and not torch.isin(smooth, x).all()
    assert not torch.equal(cubic, smooth) and cubic.min() >= 0 and cubic.max() <= 1
    # blur lowers the spread of values: bilinear's is the lowest, bicubic's above it
    assert smooth.std() < cubic.std() < near.std() + 1e-6


def test_mixup_blends_each_image_with_its_partner_by_one_share():
    x, _ = batch(n=32)
    y = torch.arange(32)  # a label per image: the partner's label names it
    g = torch.Generator().manual_seed(0)
    mixed, partners, lam = mix_batch(x, y, mixup=0.4, cutmix=0.0, g=g, rng=random.Random(0))
    assert 0 < lam < 1
    # the partner of image i is the image whose label partners[i] came from: find it by the blend
    for i in range(len(x)):
        j = [k for k in range(len(x)) if torch.allclose(mixed[i], x[i] * lam + x[k] * (1 - lam), atol=1e-6)]
        assert j and partners[i] == y[j[0]]


def test_cutmix_pastes_one_box_of_the_partner_and_returns_the_area_kept():
    x = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 3, 20, 20).contiguous()  # image i: all i
    y = torch.arange(8)
    boxes = 0
    for seed in range(20):
        mixed, partners, lam = mix_batch(x, y, mixup=0.0, cutmix=1.0, g=torch.Generator().manual_seed(seed),
                                         rng=random.Random(seed))
        for i in range(8):
            pasted = mixed[i] != i  # the box (an image's partner is itself now and then: nothing shows)
            if partners[i] != i:
                assert (mixed[i][pasted] == partners[i]).all()
                assert 1 - pasted.float().mean().item() == pytest.approx(lam)
                rows, cols = pasted[0].any(1).nonzero(), pasted[0].any(0).nonzero()
                assert pasted[0].sum() == len(rows) * len(cols)  # one rectangle
                boxes += bool(pasted.any())
        assert 0 <= lam <= 1
    assert boxes > 20 * 8 // 2  # most images get a box (not: none pasted and lam 1, which the checks above allow)


def test_mixup_and_cutmix_together_pick_one_per_batch():
    x = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 1, 10, 10).contiguous()
    kinds = set()
    rng = random.Random(0)
    for seed in range(30):
        mixed, partners, lam = mix_batch(x, torch.arange(8), 0.4, 1.0, torch.Generator().manual_seed(seed), rng)
        moved = partners != torch.arange(8)
        whole = (mixed[moved] == mixed[moved][:, :1, :1, :1]).flatten(1).all(1)  # blended: one value everywhere
        kinds.add("mixup" if whole.all() else "cutmix")
    assert kinds == {"mixup", "cutmix"}
