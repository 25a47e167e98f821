"""Benchmark: what trained models see in test frames they all misread (issue 27: the track between 99.4 and 99.5 %).

A GTSRB track is ~30 frames of one physical sign; on split 0 every recipe run reads one 60 km/h track as 80 km/h.
This takes kept model folders (benchmarks/budget.py's --work/budget-<B>-<mode>-<seed>/model) and the frames of class
--true that every one of them reads as --predicted, then asks three questions without training anything:

- probes: is it the frame's light, colour, framing or shape? Each frame is changed (contrast stretched, brightened,
  gamma, grey, cropped to its box, squeezed or stretched, sheared) and the frames read as --true are counted, with the
  same change's accuracy on the class's other test frames beside it (a change that wrecks every frame says nothing);
- neighbours: the classes of the training frames nearest to these frames in each model's last features (the head's
  input, cosine similarity): the misreading seen from inside the model (a frame read as B sits among B's frames
  there almost by construction); and nearest in pixels after local contrast normalization, which no model
  decides: whether the frames look like the other class's training frames at all;
- occlusion: where in the frame the evidence for --predicted is: a square patch painted with the frame's median
  colour at each position, the position that lowers the --predicted probability most (mean over the frames).

    .venv/bin/python -m benchmarks.misread --processed /tmp/cnnpipe-recipes/processed --true 3 --predicted 5 \\
        --models /tmp/cnnpipe-recipes/budget-600-native-{0,1,2}/model

Writes benchmarks/results/misread_gtsrb.json and .md (figures only: no frame of the dataset is stored).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.harness import RESULTS, record

NEIGHBOURS = 10  # nearest training frames per misread frame
PATCH = 8  # occlusion square's side (pixels at 32 x 32: a digit's height is ~10)
STRIDE = 2


def resampled(images: np.ndarray, theta: torch.Tensor) -> np.ndarray:
    """uint8 N x H x W x C frames through the affine maps `theta` (N x 2 x 3, output -> input, normalized), bilinear,
    edges repeated (as augment does)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def affine(images: np.ndarray, sx: float = 1.0, sy: float = 1.0, shear: float = 0.0) -> np.ndarray:
    """Frames scaled by (sx, sy) about their centre and sheared."""
    return resampled(images, torch.tensor([[1 / sx, shear, 0.0], [0.0, 1 / sy, 0.0]]).expand(len(images), 2, 3))


def to_box(images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Each frame cropped to its sign's box (x1 y1 x2 y2, pixel edges) and resized back to the frame's size."""
    from cnnpipe.augment.policy import box_theta

    return resampled(images, box_theta(torch.from_numpy(boxes).float(), images.shape[1], images.shape[2]))


def stretched(images: np.ndarray) -> np.ndarray:
    lo = images.min(axis=(1, 2, 3), keepdims=True).astype(np.float32)
    hi = images.max(axis=(1, 2, 3), keepdims=True).astype(np.float32)
    return ((images - lo) / np.maximum(hi - lo, 1) * 255).round().astype(np.uint8)


def scaled_light(images: np.ndarray, gain: float = 1.0, gamma: float = 1.0) -> np.ndarray:
    return (255 * np.clip(gain * images / 255.0, 0, 1) ** gamma).round().astype(np.uint8)


def grey(images: np.ndarray) -> np.ndarray:
    return images.mean(axis=3, keepdims=True).repeat(images.shape[3], axis=3).round().astype(np.uint8)


# name (a results key: no spaces or dots) -> (what it does, change(frames, their boxes))
PROBES: dict[str, tuple[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]] = {
    "as-is": ("none", lambda a, b: a),
    "stretched": ("contrast stretched to 0-255 per frame", lambda a, b: stretched(a)),
    "brighter": ("3x brighter (clipped)", lambda a, b: scaled_light(a, gain=3.0)),
    "gamma": ("gamma 0.5 (dark tones lifted)", lambda a, b: scaled_light(a, gamma=0.5)),
    "grey": ("grey (the channels' mean)", lambda a, b: grey(a)),
    "box-crop": ("cropped to the sign's box, resized back", to_box),
    "narrower": ("squeezed to 0.8 of its width", lambda a, b: affine(a, sx=0.8)),
    "wider": ("stretched to 1.2 of its width", lambda a, b: affine(a, sx=1.2)),
    "shorter": ("squeezed to 0.85 of its height", lambda a, b: affine(a, sy=0.85)),
    "shear-plus": ("sheared by +0.15", lambda a, b: affine(a, shear=0.15)),
    "shear-minus": ("sheared by -0.15", lambda a, b: affine(a, shear=-0.15)),
}


class Scorer:
    """One model folder: probabilities and last features (the head's input) for uint8 N x H x W x C frames."""

    def __init__(self, folder: Path):
        from cnnpipe.engine.checkpoint import load_model
        from cnnpipe.engine.inference import stats_tensors
        from cnnpipe.engine.model_folder import MODEL_FILE
        from cnnpipe.models import head

        self.net, spec = load_model(folder / MODEL_FILE)
        self.mean, self.std = stats_tensors(spec.mean, spec.std, torch.device("cpu"))
        self.features: list[torch.Tensor] = []
        head(self.net).register_forward_hook(lambda module, args, out: self.features.append(args[0].float()))

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from cnnpipe.engine.inference import predict_logits, to_nchw_uint8

        self.features.clear()
        probs = predict_logits(self.net, to_nchw_uint8(images, torch.device("cpu")), self.mean, self.std).softmax(1)
        return probs.numpy(), F.normalize(torch.cat(self.features), dim=1).numpy()


def contrast_normalized(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    """Frames as unit vectors after fastnet-lcn's first layers: the dataset's standardization (`mean`, `std`:
    1 x C x 1 x 1, of pixels in [0, 1]), then local contrast normalization (no parameters): a likeness of
    pixels that no trained model decides."""
    from cnnpipe.models.contrast import LocalContrastNorm

    lcn = LocalContrastNorm(images.shape[3])
    with torch.no_grad():
        out = [lcn((torch.from_numpy(images[i:i + 4096]).permute(0, 3, 1, 2).float() / 255 - mean) / std).flatten(1)
               for i in range(0, len(images), 4096)]
    return F.normalize(torch.cat(out), dim=1).numpy()


def nearest_classes(wanted: np.ndarray, pool: np.ndarray, pool_labels: np.ndarray) -> dict:
    """Classes of the NEIGHBOURS pool vectors most like (cosine) each wanted one, counted over all of them."""
    nearest = np.argsort(-(wanted @ pool.T), axis=1)[:, :NEIGHBOURS]
    counts = Counter(pool_labels[nearest].ravel().tolist())
    return {"k": NEIGHBOURS, "of": int(nearest.size), "classes": dict(counts.most_common())}


def occlusion(scorer: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], images: np.ndarray, predicted: int) -> dict:
    """The patch (its rows and columns, end excluded) whose painting lowers P(predicted) most, averaged over the
    frames."""
    n, h, w, _ = images.shape
    positions = [(y, x) for y in range(0, h - PATCH + 1, STRIDE) for x in range(0, w - PATCH + 1, STRIDE)]
    median = np.median(images.reshape(n, -1, images.shape[3]), axis=1).astype(np.uint8)
    base = scorer(images)[0][:, predicted].mean()
    drops = []
    for y, x in positions:
        painted = images.copy()
        painted[:, y:y + PATCH, x:x + PATCH] = median[:, None, None, :]
        drops.append(base - scorer(painted)[0][:, predicted].mean())
    best = int(np.argmax(drops))
    y, x = positions[best]
    return {"patch": PATCH, "rows": [y, y + PATCH], "columns": [x, x + PATCH], "p_predicted": round(float(base), 3),
            "p_predicted_occluded": round(float(base - drops[best]), 3)}


def measure(models: list[Path], processed: Path, true: int, predicted: int) -> dict:
    from cnnpipe.data.store import read_dataset

    data = read_dataset(processed, splits=("train", "test")).splits
    test, train = data["test"], data["train"]
    if test.boxes is None:
        raise SystemExit(f"{processed}: its test split has no boxes (the crop probe needs them: ingest GTSRB's zip)")
    images, labels, boxes = np.asarray(test.images), np.asarray(test.labels), np.asarray(test.boxes)
    train_images, train_labels = np.asarray(train.images), np.asarray(train.labels)
    scorers = [Scorer(m) for m in models]
    reads = np.stack([s(images)[0].argmax(1) for s in scorers])
    frames = np.flatnonzero((labels == true) & (reads == predicted).all(axis=0))
    if not len(frames):
        raise SystemExit(f"no test frame of class {true} is read as {predicted} by every model")
    others = np.flatnonzero((labels == true) & ~np.isin(np.arange(len(labels)), frames))
    result = {"true": true, "predicted": predicted, "models": [m.parent.name for m in models],
              "frames": len(frames), "test_indices": frames.tolist(),
              "pixel_mean": round(float(images[frames].mean()), 1),
              "class_others_pixel_mean": round(float(images[others].mean()), 1), "probes": {}}
    for name, (what, change) in PROBES.items():
        track, rest = change(images[frames], boxes[frames]), change(images[others], boxes[others])
        result["probes"][name] = {
            "change": what,
            "read_as_true": [int((s(track)[0].argmax(1) == true).sum()) for s in scorers],
            "others_accuracy": [round(float((s(rest)[0].argmax(1) == true).mean()), 4) for s in scorers]}
    mean, std = scorers[0].mean, scorers[0].std  # one dataset: the models' standardization is the same
    result["pixel_neighbours"] = nearest_classes(contrast_normalized(images[frames], mean, std),
                                                 contrast_normalized(train_images, mean, std), train_labels)
    result["neighbours"], result["occlusion"] = [], []
    for s in scorers:
        result["neighbours"].append(nearest_classes(s(images[frames])[1], s(train_images)[1], train_labels))
        result["occlusion"].append(occlusion(s, images[frames], predicted))
    return result


def table(result: dict) -> str:
    rows = [f"| the {result['frames']} frames, changed | read as class {result['true']} (of {result['frames']}, per model) | "
            f"class {result['true']}'s other test frames: accuracy per model |", "| --- | ---: | ---: |"]
    for probe in result["probes"].values():
        rows.append(f"| {probe['change']} | {', '.join(map(str, probe['read_as_true']))} | "
                    f"{', '.join(f'{100 * a:.1f} %' for a in probe['others_accuracy'])} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="kept model folders")
    parser.add_argument("--processed", type=Path, required=True,
                        help="the ingested dataset the models were trained on (its train and test splits)")
    parser.add_argument("--true", type=int, required=True, help="the frames' class")
    parser.add_argument("--predicted", type=int, required=True, help="the class every model reads them as")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "misread_gtsrb.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = measure(args.models, args.processed, args.true, args.predicted)
    record(args.out, {"benchmark": "misread", **result})
    args.out.with_suffix(".md").write_text(table(result))


if __name__ == "__main__":
    main()
