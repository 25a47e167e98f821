"""The online augmentation policy (a versioned JSON) and its batched application.

Every transform draws its own random parameters per sample, and the whole batch goes through one
`affine_grid` + `grid_sample` call, so augmenting costs a few kernel launches per batch on any
device, not a Python loop per image.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from cnnpipe.config import AugmentConfig
from cnnpipe.errors import CnnpipeError

POLICY_VERSION = 1
POLICY_FILE = "policy.json"  # in the augmented dataset: what train applies online
PREVIEW_FILE = "preview.png"  # in the augmented dataset: a grid of augmented samples


def no_flips(num_classes: int) -> list[int]:
    """A flip table in which no class is ever flipped (-1 = never flip this class)."""
    return [-1] * num_classes


CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# GTSRB (class ids of the official order). Mirror-invariant signs flip into themselves, mirror pairs
# flip into each other (keep left <-> keep right), and signs with text or arrows never flip.
GTSRB_HFLIP_SAME = (11, 12, 13, 15, 17, 18, 22, 26, 30, 35)
GTSRB_HFLIP_PAIRS = ((19, 20), (33, 34), (36, 37), (38, 39))
GTSRB_VFLIP_SAME = (1, 5, 12, 15, 17)  # "30", "80", the diamond, the empty circle, no entry
GTSRB_ROT180_SAME = (12, 15, 17, 32, 40)  # also the diagonal bar and the roundabout


def flip_tables(classes: list[str], mode: str) -> dict[str, list[int]]:
    """Class-aware flip tables: entry i is the class an image of class i becomes, -1 = never flipped.

    `auto`: known by their class names: GTSRB's 43 signs (and the tutorial pickles that use its names) and
    CIFAR-10 (every class mirror-invariant horizontally). Anything else is never flipped: a flipped
    digit or letter is not the same class. `horizontal`: the user says every class is mirror-invariant
    (photos of animals, flowers, objects): each may flip left-right into itself.
    """
    from cnnpipe.data.sources.gtsrb import CLASSES as GTSRB

    n = len(classes)
    tables = {"hflip": no_flips(n), "vflip": no_flips(n), "rot180": no_flips(n)}
    if mode == "none":
        return tables
    if mode == "horizontal":
        tables["hflip"] = list(range(n))
        return tables
    if classes == GTSRB:
        for c in GTSRB_HFLIP_SAME:
            tables["hflip"][c] = c
        for a, b in GTSRB_HFLIP_PAIRS:
            tables["hflip"][a], tables["hflip"][b] = b, a
        for c in GTSRB_VFLIP_SAME:
            tables["vflip"][c] = c
        for c in GTSRB_ROT180_SAME:
            tables["rot180"][c] = c
    elif classes == CIFAR10:
        tables["hflip"] = list(range(n))
    return tables


@dataclass
class AugmentPolicy:
    translate: float
    rotate: float
    scale: float
    shear: float
    brightness: float
    contrast: float
    saturation: float
    cutout: float
    box_crop: float = 0.0  # chance of a random crop between an image's box and its whole frame
    crop_scale: float = 0.0  # random-resized crops: the smallest share of the image's area kept (0 = off)
    hflip: list[int] = field(default_factory=list)  # class -> class after a horizontal flip, -1 = never
    vflip: list[int] = field(default_factory=list)  # ... after a vertical flip
    rot180: list[int] = field(default_factory=list)  # ... after a half turn
    interpolation: str = "bilinear"  # grid_sample's mode for the one resampling: bilinear | bicubic | nearest
    version: int = POLICY_VERSION

    def __post_init__(self) -> None:
        self._device_tables: dict[torch.device, list[tuple[torch.Tensor, tuple[int, ...]]]] = {}  # not a field

    def flip_tables(self, device: torch.device) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        """The flips that apply to some class, as (class -> class table on `device`, dims to flip): made once per
        device, not per batch (a host-to-device copy each step would stall a GPU)."""
        if device not in self._device_tables:
            self._device_tables[device] = [
                (torch.tensor(table, device=device), dims)
                for table, dims in ((self.hflip, (-1,)), (self.vflip, (-2,)), (self.rot180, (-2, -1)))
                if table and any(t >= 0 for t in table)]
        return self._device_tables[device]

    def flips(self) -> dict[str, list[int]]:
        """The flip tables by name (hflip, vflip, rot180), as the model folder records them for test-time
        augmentation."""
        return {"hflip": self.hflip, "vflip": self.vflip, "rot180": self.rot180}

    @classmethod
    def from_config(cls, cfg: AugmentConfig, tables: dict[str, list[int]]) -> AugmentPolicy:
        return cls(cfg.translate, cfg.rotate, cfg.scale, cfg.shear, cfg.brightness, cfg.contrast,
                   cfg.saturation, cfg.cutout, cfg.box_crop, cfg.crop_scale, **tables, interpolation=cfg.interpolation)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> AugmentPolicy:
        if d.get("version") != POLICY_VERSION:
            raise CnnpipeError(f"{where}: expected policy version {POLICY_VERSION}, got {d.get('version')!r}")
        try:
            return cls(**d)
        except TypeError as e:
            raise CnnpipeError(f"{where}: not an augmentation policy ({e})") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def is_identity(self) -> bool:
        geometric = self.translate or self.rotate or self.scale or self.shear
        photometric = self.brightness or self.contrast or self.saturation or self.cutout
        flips = any(t >= 0 for t in (*self.hflip, *self.vflip, *self.rot180))
        return not (self.box_crop or self.crop_scale or geometric or photometric or flips)


def _uniform(n: int, bound: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=g, device=device) * 2 - 1) * bound


BOX_EDGE_JITTER = 0.25  # each edge of a box crop moves up to this share of its gap on its own: offset jitter


def box_crop_theta(boxes: torch.Tensor, h: int, w: int, p: float, g: torch.Generator) -> torch.Tensor:
    """N x 2 x 3 affine maps (output -> input, normalized) of random crops between each box and the whole frame.

    One share s ~ U(0, 1) per image moves every edge from the box (s = 0) towards the frame's edge (s = 1):
    scale jitter; each edge adds its own +-BOX_EDGE_JITTER, clamped to [0, 1]: offset jitter. An image
    drawn with chance 1 - p keeps the whole frame.
    """
    n, dev = len(boxes), boxes.device
    share = torch.rand(n, 1, generator=g, device=dev) + _uniform(4 * n, BOX_EDGE_JITTER, g, dev).view(n, 4)
    share = share.clamp(0, 1)
    share = torch.where((torch.rand(n, 1, generator=g, device=dev) < p), share, torch.ones_like(share))
    frame = torch.tensor([0.0, 0.0, w, h], device=dev)
    return box_theta(boxes + (frame - boxes) * share, h, w)


def box_theta(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """N x 2 x 3 affine maps (output -> input, normalized) that fill an h x w output with each box (x1 y1 x2 y2,
    pixel edges)."""
    x1, y1, x2, y2 = boxes.unbind(1)
    # pixel edges -> grid_sample's normalized coordinates (align_corners=False: -1 and 1 are the outer edges)
    zero = torch.zeros_like(x1)
    return torch.stack([torch.stack([(x2 - x1) / w, zero, (x1 + x2) / w - 1], 1),
                        torch.stack([zero, (y2 - y1) / h, (y1 + y2) / h - 1], 1)], 1)


CROP_RATIO = (3 / 4, 4 / 3)  # random-resized crops' aspect ratios (torchvision's RandomResizedCrop default)


def resized_crop_theta(n: int, min_area: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """N x 2 x 3 affine maps (output -> input, normalized) of random-resized crops: an area share in
    [min_area, 1] and an aspect ratio log-uniform in CROP_RATIO, anywhere inside the image."""
    area = min_area + (1 - min_area) * torch.rand(n, generator=g, device=device)
    low, high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratio = torch.exp(low + (high - low) * torch.rand(n, generator=g, device=device))
    w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)  # shares of the side
    cx, cy = _uniform(n, 1, g, device) * (1 - w), _uniform(n, 1, g, device) * (1 - h)
    zero = torch.zeros_like(w)
    return torch.stack([torch.stack([w, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)


def _then_crop(theta: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
    """`theta` applied inside the window `crop` (diagonal scale + offset): the crop's frame is theta's input."""
    scale = torch.stack([crop[:, 0, 0], crop[:, 1, 1]], 1).unsqueeze(-1)
    return theta * scale + F.pad(crop[:, :, 2:], (2, 0))


def _flip_boxes(boxes: torch.Tensor, flip: torch.Tensor, dims: tuple[int, ...], h: int, w: int) -> torch.Tensor:
    flipped = boxes.clone()
    if -1 in dims:
        flipped[:, 0], flipped[:, 2] = w - boxes[:, 2], w - boxes[:, 0]
    if -2 in dims:
        flipped[:, 1], flipped[:, 3] = h - boxes[:, 3], h - boxes[:, 1]
    return torch.where(flip.view(-1, 1), flipped, boxes)


def apply_policy(x: torch.Tensor, labels: torch.Tensor, policy: AugmentPolicy, g: torch.Generator,
                 boxes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a float batch N x C x H x W in [0, 1]; flips may remap labels, so both come back.

    `boxes` (float N x 4, x1 y1 x2 y2 in pixels) enable the policy's box crops; the crop and the affine
    transform are one resampling.
    """
    n, c, h, w = x.shape
    dev = x.device
    for table, dims in policy.flip_tables(dev):
        target = table[labels]
        flip = (torch.rand(n, generator=g, device=dev) < 0.5) & (target >= 0)
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(dims), x)
        labels = torch.where(flip, target, labels)
        if boxes is not None:
            boxes = _flip_boxes(boxes, flip, dims, h, w)

    crop = policy.box_crop and boxes is not None
    if policy.translate or policy.rotate or policy.scale or policy.shear or crop or policy.crop_scale:
        angle = _uniform(n, math.radians(policy.rotate), g, dev)
        shear = _uniform(n, math.radians(policy.shear), g, dev)
        zoom = 1 + _uniform(n, policy.scale, g, dev)
        tx, ty = _uniform(n, 2 * policy.translate, g, dev), _uniform(n, 2 * policy.translate, g, dev)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # theta maps output to input coordinates; dividing by zoom > 1 magnifies the image
        theta = torch.stack([
            torch.stack([cos / zoom, (-sin + torch.tan(shear) * cos) / zoom, tx], 1),
            torch.stack([sin / zoom, (cos + torch.tan(shear) * sin) / zoom, ty], 1),
        ], 1)
        if crop:  # the crop's frame is the affine transform's input: crop after (compose) the affine map
            theta = _then_crop(theta, box_crop_theta(boxes, h, w, policy.box_crop, g))
        if policy.crop_scale:  # ... and a random-resized crop of whatever frame that leaves
            theta = _then_crop(theta, resized_crop_theta(n, policy.crop_scale, g, dev))
        grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
        # border padding repeats the edge: no black wedges that a model could learn as a cue
        x = F.grid_sample(x, grid, mode=policy.interpolation, padding_mode="border", align_corners=False)

    if policy.brightness:
        x = x * (1 + _uniform(n, policy.brightness, g, dev)).view(n, 1, 1, 1)
    if policy.contrast:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (1 + _uniform(n, policy.contrast, g, dev)).view(n, 1, 1, 1) + mean
    if policy.saturation and c == 3:
        gray = (x * torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)).sum(1, keepdim=True)
        x = (x - gray) * (1 + _uniform(n, policy.saturation, g, dev)).view(n, 1, 1, 1) + gray
    if policy.cutout:
        side = max(1, round(policy.cutout * min(h, w)))
        cy = torch.randint(0, h, (n, 1, 1), generator=g, device=dev)
        cx = torch.randint(0, w, (n, 1, 1), generator=g, device=dev)
        ys = torch.arange(h, device=dev).view(1, h, 1)
        xs = torch.arange(w, device=dev).view(1, 1, w)
        hole = ((ys - cy).abs() <= side // 2) & ((xs - cx).abs() <= side // 2)
        x = x.masked_fill(hole.unsqueeze(1), 0.0)
    return x.clamp_(0, 1), labels


def mix_batch(x: torch.Tensor, labels: torch.Tensor, mixup: float, cutmix: float, g: torch.Generator,
              rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, float]:
    """MixUp (Zhang et al., 2018) or CutMix (Yun et al., 2019) of a batch with itself in a shuffled order.

    One share `lam` ~ Beta(alpha, alpha) per batch (timm's batch mode): MixUp blends every image with its partner,
    CutMix pastes a box of the partner's covering 1 - lam of the image (lam is then the area actually kept, the box
    clipped at the edges). With both alphas set, each batch is one or the other with equal chance. Returns the mixed
    batch, the partners' labels and lam: the loss is lam * loss(labels) + (1 - lam) * loss(partners).
    """
    n, _, h, w = x.shape
    partner = torch.randperm(n, generator=g, device=x.device)
    cut = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    alpha = cutmix if cut else mixup
    lam = rng.betavariate(alpha, alpha)
    if not cut:
        return x * lam + x[partner] * (1 - lam), labels[partner], lam
    side_h, side_w = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
    cy, cx = rng.randrange(h), rng.randrange(w)
    y1, y2 = max(cy - side_h // 2, 0), min(cy + side_h - side_h // 2, h)
    x1, x2 = max(cx - side_w // 2, 0), min(cx + side_w - side_w // 2, w)
    mixed = x.clone()
    mixed[:, :, y1:y2, x1:x2] = x[partner, :, y1:y2, x1:x2]
    return mixed, labels[partner], 1 - (y2 - y1) * (x2 - x1) / (h * w)
