"""One dataclass per params.yaml block: load, override from flags, validate.

Every field carries its help text, so `cnnpipe <stage> --help` and params.yaml describe the same
knobs. A field named `image_size` in block `ingest` is `ingest.image_size` in params.yaml and
`--image-size` on the command line; a flag wins over params.yaml.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cnnpipe.errors import CnnpipeError

DEFAULT_PARAMS = Path("params.yaml")


def knob(default: Any, help: str, choices: tuple | None = None, minimum: float | None = None,
         maximum: float | None = None, affects_result: bool = True) -> Any:
    """A config field with its help text and its valid range. `affects_result=False` marks a knob of how a
    stage runs (device, cache folder), not of what it makes: dvc.yaml leaves it out of the stage's params."""
    meta = {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum, "affects_result": affects_result}
    return field(default=default, metadata=meta)


@dataclass
class IngestConfig:
    source: str = knob("auto", "dataset source: auto (digits without a path, else told from what the path holds), "
                               "digits (embedded), gtsrb, cifar10, imagefolder, pickle")
    path: str | None = knob(None, "the source's files: an archive, a folder or an http(s) URL (unused for digits)")
    test_path: str | None = knob(None, "official test images: GTSRB_Final_Test_Images.zip (gtsrb) or a test root (imagefolder)")
    test_labels: str | None = knob(None, "gtsrb: GT-final_test.csv or GTSRB_Final_Test_GT.zip, the test split's labels")
    dvc_repo: str | None = knob(None, "a DVC repository (git URL or local path): path, test_path and test_labels are "
                                      "read from it, at dvc_rev, through its DVC remote")
    dvc_rev: str | None = knob(None, "dvc_repo's git revision (tag, branch or commit; default: its default branch)")
    sha256: str | None = knob(None, "expected sha256 of a downloaded `path` (official archives' checksums are built in)")
    cache_dir: str = knob("data/downloads", "where downloads are kept (and resumed)", affects_result=False)
    download_deadline_s: float = knob(3600.0, "a download of `path` (a URL) not finished within this many seconds "
                                              "is abandoned (kept to resume when the server serves ranges); its size "
                                              "is bounded by max_total_mb", minimum=1.0, affects_result=False)
    image_size: int = knob(16, "images are resized to image_size x image_size", minimum=4, maximum=1024)
    channels: int = knob(1, "1 = grayscale, 3 = RGB", choices=(1, 3))
    resize: str = knob("squash", "how a photo becomes image_size x image_size: squash (stretch the whole image), "
                                 "center_crop (the central square) or letterbox (the whole image, padded black); "
                                 "serving applies the same", choices=("squash", "center_crop", "letterbox"))
    roi_crop: bool = knob(True, "gtsrb: true = crop each image to the sign's box from the CSV (fixed crops); false = keep "
                                "the whole frame and store the box (for augment.box_crop and evaluate's ROI protocol)")
    val_fraction: float = knob(0.1, "fraction of each class held out for validation (when the source has no official one)",
                               minimum=0.0, maximum=0.5)
    test_fraction: float = knob(0.2, "fraction of each class held out for test (when the source has no official one)",
                                minimum=0.0, maximum=0.5)
    max_bad_fraction: float = knob(0.01, "fail when more than this fraction of the files are unusable; else skip them",
                                   minimum=0.0, maximum=1.0)
    max_member_mb: float = knob(256.0, "an archive member (or file) that inflates to more than this is not read "
                                       "(an image: listed as a bad file)", minimum=1.0)
    max_compression_ratio: float = knob(100.0, "an archive member over 1 MiB that inflates more than this many times "
                                               "its packed size is not read (a tar.gz: the archive is refused)", minimum=1.0)
    max_total_mb: float = knob(8192.0, "an archive whose members declare more than this in all is refused "
                                       "(a tar's members are held in memory)", minimum=1.0)
    max_members: int = knob(100_000, "a zip or tar with more entries than this (folders and empty files count) is "
                                     "refused; a folder on disk is not limited", minimum=1)
    shards: str = knob("auto", "also write every split as WebDataset tar shards, which train.data_mode stream reads: "
                               "auto = when the decoded training split exceeds shard_threshold_mb",
                       choices=("auto", "always", "never"))
    shard_threshold_mb: float = knob(1024.0, "ingest.shards auto: write shards past this decoded training split size (MiB)",
                                     minimum=0.0)
    shard_images: int = knob(2048, "images per shard, and per chunk decoded at a time (with or without shards)", minimum=1)
    workers: int = knob(0, "decoding processes (0 = the cores really available: affinity, cgroup quota; 1 = in this "
                           "process); the output does not depend on it", minimum=0, affects_result=False)
    seed: int = knob(0, "seed of the stratified split (and of the order the carved splits are stored in)")


@dataclass
class AugmentConfig:
    balance_to: int = knob(0, "oversample every training class below this count with augmented copies (0 = off)", minimum=0)
    translate: float = knob(0.1, "max shift, as a fraction of the image side", minimum=0.0, maximum=0.5)
    rotate: float = knob(10.0, "max rotation in degrees", minimum=0.0, maximum=180.0)
    scale: float = knob(0.1, "max zoom in or out, as a fraction", minimum=0.0, maximum=0.9)
    shear: float = knob(0.0, "max shear in degrees", minimum=0.0, maximum=45.0)
    brightness: float = knob(0.2, "max brightness change, as a fraction", minimum=0.0, maximum=1.0)
    contrast: float = knob(0.2, "max contrast change, as a fraction", minimum=0.0, maximum=1.0)
    saturation: float = knob(0.0, "max saturation change, as a fraction (RGB only)", minimum=0.0, maximum=1.0)
    cutout: float = knob(0.0, "side of the square cut out of each image, as a fraction of the side (0 = off)",
                         minimum=0.0, maximum=1.0)
    box_crop: float = knob(0.0, "chance that a training image with a box (ingest.roi_crop: false) is cropped to a random "
                                "box between its box and the whole frame, scale and offset jittered (0 = off)",
                           minimum=0.0, maximum=1.0)
    crop_scale: float = knob(0.0, "random-resized crops (photos): each training image cropped to a random window of "
                                  "this share of its area or more, aspect 3:4 to 4:3, resized back (0 = off)",
                             minimum=0.0, maximum=1.0)
    interpolation: str = knob("bilinear", "resampling of the geometric transforms and crops: bilinear (smooth), "
                                          "bicubic (sharper), nearest (no blur, jagged edges)",
                              choices=("bilinear", "bicubic", "nearest"))
    flip: str = knob("auto", "auto: the dataset's class-aware flip tables (GTSRB, CIFAR-10; others never flip); "
                             "horizontal: every class is mirror-invariant (your choice: true of cats, flowers, cars; "
                             "not of text, digits, left/right signs), each flips left-right into itself; none",
                     choices=("auto", "horizontal", "none"))
    seed: int = knob(0, "seed of class balancing and of the preview")


@dataclass
class TrainConfig:
    arch: str = knob("cnn3", "architecture: cnnpipe's own (cnn3, resnet18, ...), a torchvision classifier "
                             "(torchvision/resnet18, mobilenet_v3_small, ...) or timm/<name>")
    pretrained: str | None = knob(None, "starting weights: imagenet (the library's own), a state dict .pt / "
                                        ".safetensors file, or a registered model models:/<name>@<alias>")
    freeze_epochs: int = knob(0, "train only the classifier head for this many first epochs (backbone frozen)",
                              minimum=0)
    backbone_lr: float = knob(1.0, "learning-rate multiplier of every layer but the head (0.1 is usual when "
                                   "fine-tuning)", minimum=0.0)
    frozen_bn_eval: bool = knob(True, "keep BatchNorm statistics fixed (eval mode) while the backbone is frozen")
    width: int = knob(16, "base width (channels of the first conv layer; hidden units for mlp)", minimum=1)
    conv_init: str = knob("default", "default: the net as built; dirac: in fastnet (and the fastnet* archs), every "
                                     "convolution after the stem starts with identity filters, airbench's init "
                                     "(from scratch only; measured in docs/budget.md)",
                          choices=("default", "dirac"))
    epochs: int = knob(12, "training epochs (with budget_s: the most epochs the plan may have)", minimum=1)
    budget_s: float = knob(0.0, "wall-clock budget of training + validation in seconds (0 = off: train.epochs epochs): "
                                "the step and validation costs measured on the first steps plan the epochs, the "
                                "low-res epochs and the schedule to end within it, re-planned when the speed drifts",
                           minimum=0.0)
    budget_min_epochs: float = knob(0.0, "with budget_s: when the first plan fits fewer epochs than this at `width` "
                                         "(a partial last epoch counted by its share of the steps), the net starts "
                                         "again at half the width (down to 16) on the same clock, as often as needed "
                                         "(0 = never; cnnpipe's own archs, not with pretrained weights)", minimum=0.0)
    batch_size: int = knob(64, "images per step", minimum=1)
    optimizer: str = knob("sgd", "sgd (Nesterov), adamw or adam", choices=("sgd", "adamw", "adam"))
    lr: float = knob(0.05, "peak learning rate", minimum=0.0)
    momentum: float = knob(0.9, "SGD momentum / Adam beta1", minimum=0.0, maximum=1.0)
    weight_decay: float = knob(5e-4, "weight decay", minimum=0.0)
    schedule: str = knob("onecycle", "learning-rate schedule", choices=("onecycle", "cosine", "step", "constant"))
    label_smoothing: float = knob(0.0, "label smoothing of the cross-entropy loss", minimum=0.0, maximum=0.5)
    augment: bool = knob(True, "apply the augment stage's online policy every epoch")
    sam_rho: float = knob(0.0, "sharpness-aware minimization: each step's gradient taken at the weights moved this far "
                               "along the normalized gradient, a second forward and backward pass a step (0 = off; "
                               "0.05 is usual)", minimum=0.0)
    mixup: float = knob(0.0, "MixUp: each batch blended with itself shuffled, the share ~ Beta(mixup, mixup) per "
                             "batch, the loss mixed alike (0 = off; 0.2 is usual)", minimum=0.0)
    cutmix: float = knob(0.0, "CutMix: a box of each batch's shuffled partner pasted in, its area ~ Beta(cutmix, "
                              "cutmix) per batch, the loss mixed by area (0 = off; 1.0 is usual); with mixup, each "
                              "batch one or the other", minimum=0.0)
    ema: float = knob(0.0, "decay of the exponential moving average of weights and BatchNorm statistics evaluated and "
                           "saved (0 = off); it ramps up over the first steps ((1 + n) / (10 + n)), so short runs "
                           "average trained weights",
                      minimum=0.0, maximum=0.99999)
    low_res: int = knob(0, "progressive resizing: the first low_res_epochs epochs train on the augmented images "
                           "downscaled to low_res x low_res (cheaper steps; the last epochs at full size fix the "
                           "scale); 0 = off; needs a size-agnostic net (fastnet, resnet*, library nets)", minimum=0)
    low_res_epochs: int = knob(0, "epochs trained at low_res", minimum=0)
    val_every: int = knob(1, "validate every N epochs, the last always (0 = the last only; under a budget also an "
                             "epoch 1 shorter than the first measurements, to time a pass): a pass a short budgeted "
                             "run does not spend buys it training steps; keep best chooses among the validated "
                             "epochs, early stopping (patience in epochs) is checked on them", minimum=0)
    early_stopping_patience: int = knob(0, "stop after this many epochs without improvement (0 = off)", minimum=0)
    early_stopping_metric: str = knob("val/accuracy", "what early stopping watches",
                                      choices=("val/accuracy", "val/loss"))
    keep: str = knob("best", "the weights saved: best = the epoch with the best early_stopping_metric, last = the "
                              "final epoch", choices=("best", "last"))
    train_on_val: bool = knob(False, "also train on the val split, a final fit on every image but the test split's: "
                                     "nothing is held out, so no validation pass (needs keep last and no early "
                                     "stopping), no per-epoch val metrics, and evaluate does not calibrate (T = 1); "
                                     "not with data_mode stream, tune or a Katib search")
    channels_last: bool = knob(True, "NHWC memory layout (faster convolutions on CPU and on tensor cores: "
                                              "benchmarks/results/train_throughput.json)")
    precision: str = knob("auto", "training arithmetic: auto (bf16 autocast on CUDA, fp32 on CPU: CPU runs repeat "
                                  "exactly), fp32, or bf16 (autocast where the hardware has bf16: CUDA, CPUs with "
                                  "AVX512-BF16/AMX, faster there: benchmarks/results/precision_cpu.json; fp32 elsewhere)",
                          choices=("auto", "fp32", "bf16"))
    compile: bool = knob(False, "torch.compile the model (pays a compile time up front; worth it on long GPU runs)")
    data_mode: str = knob("auto", "where training batches come from: device = the whole decoded training split held on the "
                             "training device; stream = the augmented dataset's shards, decoded by loader processes; "
                             "auto = device when the split fits device_budget_mb (or has no shards)",
                     choices=("auto", "device", "stream"))
    device_budget_mb: float = knob(2048.0, "train.data_mode auto: the largest decoded training split (MiB) kept on the device",
                                   minimum=0.0)
    shuffle_buffer: int = knob(8192, "train.data_mode stream: images mixed by the shuffle buffer (held on the training "
                                     "device); shards are also shuffled every epoch", minimum=0)
    loader_workers: int = knob(0, "train.data_mode stream: decoding processes (0 = from the available cores); the batches "
                                  "do not depend on it", minimum=0, affects_result=False)
    device: str = knob("auto", "auto (CUDA when present), cpu, cuda or cuda:N", affects_result=False)
    threads: int = knob(0, "CPU threads for torch (0 = the cores this process may use, from its affinity and cgroup "
                           "quota, shared among DDP processes)", minimum=0, affects_result=False)
    seed: int = knob(0, "seed of initialization, shuffling and augmentation")


@dataclass
class EvaluateConfig:
    batch_size: int = knob(512, "images per inference step", minimum=1, affects_result=False)
    grid_images: int = knob(32, "images in each of the misclassified / correct grids", minimum=1, maximum=256)
    tsne_samples: int = knob(2000, "test images in the t-SNE plot (a stratified sample; 0 = no t-SNE)",
                             minimum=0, maximum=20000)
    seed: int = knob(0, "seed of the samples the figures show")
    calibrate: bool = knob(True, "fit a temperature on the validation split (NLL); the registered and served model "
                                 "applies it (false: T = 1)")
    tta: bool = knob(False, "also score with test-time augmentation over the augment policy's class-aware flips: "
                            "accuracy, ECE and ms per image with and without it")
    device: str = knob("auto", "auto (CUDA when present), cpu, cuda or cuda:N", affects_result=False)


@dataclass
class RegisterConfig:
    model_name: str = knob("cnnpipe-digits", "name in the MLflow Model Registry")
    top_k: int = knob(5, "classes the served model returns per image (a request may ask for another k)", minimum=1)
    auto_promote: bool = knob(True, "after registering (alias `challenger`), run promotion against `champion`")
    promotion_metric: str = knob("accuracy", "test-split metric that decides promotion",
                                 choices=("accuracy", "f1_macro", "top5_accuracy", "loss"))
    min_delta: float = knob(0.001, "the challenger must beat the champion by at least this much", minimum=0.0)
    promotion_protocol: str = knob("served", "test images promotion scores on: served = whole frames, as a server gets "
                                             "them; roi = crops to the dataset's boxes", choices=("served", "roi"))
    min_accuracy: float = knob(0.5, "refuse to register a model whose validation accuracy (test accuracy for one "
                                    "trained on val) is below this (and always below chance, 1 / classes)",
                               minimum=0.0, maximum=1.0)


@dataclass
class ServeConfig:
    backend: str = knob("torch", "inference engine: torch, or onnxruntime (the ONNX graph registered with the model; no torch)",
                        choices=("torch", "onnxruntime"))
    workers: int = knob(1, "server processes, each with its own copy of the model", minimum=1, maximum=64)
    max_body_bytes: int = knob(6 * 1024 * 1024, "request body limit, enforced while reading (413 past it)",
                               minimum=1024)
    max_pixels: int = knob(4096 * 4096, "pixels per image, checked from its header before decoding (413 past it)",
                           minimum=64)
    max_request_pixels: int = knob(2 * 4096 * 4096, "pixels of all of a request's images together, checked from "
                                                     "their headers before any is decoded (413 past it)", minimum=64)
    max_images: int = knob(256, "images per request, counted before any is decoded (413 past it)", minimum=1)
    max_json_containers: int = knob(100_000, "JSON arrays and objects in a request body, counted before it is parsed "
                                             "(413 past it): parsing holds the worker's event loop; a pixel array "
                                             "costs one per pixel", minimum=16)
    max_decode_seconds: float = knob(1.0, "CPU seconds reading and decoding one image may take (408 past it)",
                                     minimum=0.01)
    batch_size: int = knob(64, "images of a request decoded and predicted at a time: bounds the memory one request "
                               "holds", minimum=1)
    max_pending: int = knob(32, "requests with a complete body a worker holds at once (queued, predicting), and the "
                                "bytes of bodies being read, in full bodies; past either a 503 with Retry-After",
                            minimum=1)
    header_timeout: float = knob(10.0, "seconds a client has to send a request's headers (408, then the "
                                       "connection is closed)", minimum=0.1)
    body_timeout: float = knob(30.0, "seconds a client has to send a request's body (408)", minimum=0.1)
    min_upload_rate: int = knob(4096, "bytes a second a request body must average once upload_grace has passed "
                                      "(408 below it, so that trickling clients hold nothing for long; 0: no minimum)",
                                minimum=0)
    upload_grace: float = knob(2.0, "seconds a request body may take before min_upload_rate applies", minimum=0.0)
    keep_alive: float = knob(5.0, "seconds an idle kept-alive connection stays open", minimum=0.1)
    shutdown_timeout: float = knob(30.0, "seconds SIGTERM waits for in-flight requests before closing them",
                                   minimum=0.0)
    tta: bool = knob(False, "test-time augmentation: average the probabilities over the class-aware flips the model "
                            "carries (one more forward pass per flip; off, with a note, when it carries none)")


@dataclass
class TrackingConfig:
    uri: str = knob("sqlite:///mlflow.db", "MLflow tracking URI (the MLFLOW_TRACKING_URI environment variable overrides it)")
    experiment: str = knob("cnnpipe", "MLflow experiment name")


@dataclass
class TuneConfig:
    study: str = knob("cnnpipe-tune", "Optuna study name (also the MLflow parent run's name); the same name resumes it")
    storage: str | None = knob(None, "Optuna RDB storage URL (default: sqlite optuna.db beside a sqlite MLflow store, "
                                     "else in the working directory)")
    sampler: str = knob("tpe", "how trials are chosen: tpe (Bayesian), random, or grid (every combination)",
                        choices=("tpe", "random", "grid"))
    grid_points: int = knob(3, "grid sampler: values per uniform / log_uniform dimension", minimum=2)
    metric: str = knob("val/accuracy", "per-epoch validation metric that is optimized and fed to the pruner",
                       choices=("val/accuracy", "val/loss"))
    direction: str = knob("maximize", "maximize or minimize `metric`", choices=("maximize", "minimize"))
    n_trials: int = knob(20, "budget: finished (complete or pruned) trials of the study (0 = no limit)", minimum=0)
    timeout: float = knob(0.0, "budget: seconds this command may start trials for (0 = no limit)", minimum=0.0)
    pruner: str = knob("median", "stops unpromising trials early: median, successive_halving or none",
                       choices=("median", "successive_halving", "none"))
    startup_trials: int = knob(5, "trials finished before the median pruner prunes (and TPE's random start)", minimum=0)
    warmup_epochs: int = knob(1, "epochs every trial runs before it may be pruned", minimum=1)
    jobs: int = knob(1, "parallel trial processes sharing the study's storage", minimum=1)
    seed: int = knob(0, "seed of the sampler")
    space: dict = field(default_factory=lambda: {  # the same as params.yaml's (a mapping has no flag: -S tune.space=...)
        "train.lr": {"log_uniform": [0.01, 0.3]}, "train.width": {"choice": [8, 16, 32]},
        "augment.rotate": {"uniform": [0, 20]}},
        metadata={"help": "block.field: {uniform: [low, high]} | {log_uniform: [low, high]} | {choice: [v1, ...]}",
                  "choices": None, "minimum": None, "maximum": None, "affects_result": True})


BLOCKS: dict[str, type] = {
    "ingest": IngestConfig,
    "augment": AugmentConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "register": RegisterConfig,
    "serve": ServeConfig,
    "tracking": TrackingConfig,
    "tune": TuneConfig,
}

T = TypeVar("T")


def field_type(cls: type, name: str) -> tuple[type, bool]:
    """(the scalar type, whether None is allowed) of field `name`, e.g. `str | None` -> (str, True)."""
    annotation = typing.get_type_hints(cls)[name]
    args = typing.get_args(annotation)
    if args:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], len(non_none) != len(args)
    return annotation, False


def coerce(value: Any, kind: type, optional: bool, where: str) -> Any:
    """`value` (from YAML, a flag or a `-p key=value`) as `kind`, or a one-line error naming `where`."""
    if value is None:
        if optional:
            return None
        raise CnnpipeError(f"{where}: expected {kind.__name__}, got null")
    if kind is dict:
        if isinstance(value, dict):
            return value
        raise CnnpipeError(f"{where}: expected a mapping, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise CnnpipeError(f"{where}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise CnnpipeError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise CnnpipeError(f"{where}: expected an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise CnnpipeError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise CnnpipeError(f"{where}: expected a number, got {value!r}") from None
    if not isinstance(value, str):
        raise CnnpipeError(f"{where}: expected a string, got {value!r}")
    return value


def _validate(cfg: Any, block: str) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        where = f"{block}.{f.name}"
        meta = f.metadata
        if meta.get("choices") and value not in meta["choices"]:
            expected = ", ".join(str(c) for c in meta["choices"])
            raise CnnpipeError(f"{where}: expected one of {expected}, got {value!r}")
        if value is None or isinstance(value, (str, bool)):
            continue
        if meta.get("minimum") is not None and value < meta["minimum"]:
            raise CnnpipeError(f"{where}: expected >= {meta['minimum']}, got {value!r}")
        if meta.get("maximum") is not None and value > meta["maximum"]:
            raise CnnpipeError(f"{where}: expected <= {meta['maximum']}, got {value!r}")


def read_params(path: Path) -> dict[str, Any]:
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CnnpipeError(f"params file '{path}' not found") from None
    except OSError as e:
        raise CnnpipeError(f"params file '{path}' cannot be read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise CnnpipeError(f"params file '{path}' is not valid YAML{where}: {problem}") from None
    if not isinstance(params, dict):
        raise CnnpipeError(f"params file '{path}': expected a mapping of blocks at the top level")
    return params


def parse_assignments(items: Iterable[str], where: str = "--set", one_per_item: bool = False) -> dict[str, Any]:
    """`block.key=value` assignments, the syntax of `dvc exp run -S`, as {"block.key": value}. Unless
    `one_per_item` (a KFP list), an item may hold several separated by spaces (shell quoting applies), so one
    MLproject parameter can carry many. A value is read as YAML (`5`, `0.1`, `true`, `null`, text)."""
    out: dict[str, Any] = {}
    for item in items:
        try:
            words = [item] if one_per_item else shlex.split(item)
        except ValueError as e:
            raise CnnpipeError(f"{where} {item!r}: {e}") from None
        for word in words:
            key, sep, text = word.partition("=")
            block, dot, name = key.partition(".")
            if not (sep and dot and block and name):
                raise CnnpipeError(f"{where} {word!r}: expected block.key=value (e.g. train.epochs=5)")
            try:
                out[key] = yaml.safe_load(text) if text else ""
            except yaml.YAMLError:
                out[key] = text
    return out


def apply_overrides(params: dict[str, Any], assignments: dict[str, Any], where: str = "--set") -> dict[str, Any]:
    """A copy of `params` with `assignments` ({"train.epochs": 5}) applied; an unknown block or key is an
    error naming it, so a typo never silently trains the default."""
    out = {name: dict(block or {}) if isinstance(block, dict) else block for name, block in params.items()}
    for key, value in assignments.items():
        block, _, name = key.partition(".")
        if block not in BLOCKS:
            raise CnnpipeError(f"{where} {key}: unknown block {block!r} (expected one of: {', '.join(BLOCKS)})")
        fields = [f.name for f in dataclasses.fields(BLOCKS[block])]
        if name not in fields:
            raise CnnpipeError(f"{where} {key}: {block} has no field {name!r} (expected one of: {', '.join(fields)})")
        if not isinstance(out.get(block), dict):
            out[block] = {}
        out[block][name] = value
    return out


def result_keys(block: str) -> list[str]:
    """The `block.field` names whose change changes what the stage makes (what dvc.yaml lists as params)."""
    return [f"{block}.{f.name}" for f in dataclasses.fields(BLOCKS[block]) if f.metadata["affects_result"]]


def load_block(cls: type[T], block: str, params: dict[str, Any], overrides: dict[str, Any],
               params_path: Path = DEFAULT_PARAMS) -> T:
    """Build `cls` from `params[block]`, then apply the non-None `overrides`, then validate."""
    if block not in params:
        raise CnnpipeError(f"params file '{params_path}': missing block '{block}'")
    raw = params[block] or {}
    if not isinstance(raw, dict):
        raise CnnpipeError(f"params file '{params_path}': block '{block}' must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise CnnpipeError(f"params file '{params_path}': {block}.{unknown[0]} is not a known field "
                           f"(expected one of: {', '.join(fields)})")
    values = {name: coerce(v, *field_type(cls, name), f"{block}.{name}") for name, v in raw.items()}
    for name, v in overrides.items():
        if v is not None and name in fields:
            values[name] = coerce(v, *field_type(cls, name), f"--{name.replace('_', '-')}")
    cfg = cls(**values)
    _validate(cfg, block)
    return cfg


def add_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """One flag per field, all defaulting to None so params.yaml decides unless a flag is given."""
    group = parser.add_argument_group(f"params ({cls.__name__}; default from params.yaml)")
    for f in dataclasses.fields(cls):
        kind, _ = field_type(cls, f.name)
        if kind is dict:  # a mapping (tune.space) is set in the params file or with -S
            continue
        flag = f"--{prefix}{f.name.replace('_', '-')}"
        dest = f"{prefix.replace('-', '_')}{f.name}"
        help_text = f.metadata["help"]
        if kind is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=dest, type=kind, default=None, metavar=kind.__name__.upper(),
                               choices=f.metadata.get("choices"), help=help_text)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI (None for any other store)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def params_schema() -> dict[str, Any]:
    """The JSON schema of a params file, made from the dataclasses: types by pydantic, each field's help,
    choices and range from its knob. params.yaml names the committed copy on its first line, so editors
    (the YAML language server) complete and check it; scripts/params_schema.py writes it."""
    from pydantic import TypeAdapter

    blocks = {}
    for name, cls in BLOCKS.items():
        schema = TypeAdapter(cls).json_schema()
        schema.update(title=name, additionalProperties=False)
        for f in dataclasses.fields(cls):
            prop = schema["properties"][f.name]
            prop.pop("title", None)
            prop["description"] = f.metadata["help"]
            value = prop if "type" in prop else next(p for p in prop["anyOf"] if p.get("type") != "null")
            for key, meta in (("enum", "choices"), ("minimum", "minimum"), ("maximum", "maximum")):
                if f.metadata.get(meta) is not None:
                    value[key] = list(f.metadata[meta]) if key == "enum" else f.metadata[meta]
        blocks[name] = schema
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "cnnpipe params.yaml",
            "description": "One block per stage; `cnnpipe <stage> --help` explains each field.", "type": "object",
            "properties": blocks, "additionalProperties": False}
