"""train: the augmented training split + the validation split -> a model file, per-epoch history.
With train.train_on_val the val split's images are trained on too, and nothing is validated.

With `tracking` given, the stage starts the pipeline's MLflow run (params, per-epoch metrics, the
data manifest and the augmentation preview) and writes the run id next to the model; with None it
needs no MLflow at all (a bare GPU box, benchmarks).

The datasets may be local folders or URLs (s3://, gs://, http(s)://): their small files (and the arrays the
run holds in memory) are copied to a temporary folder; with train.data_mode stream the training shards are read
from where they are, one at a time.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cnnpipe.augment import POLICY_FILE, PREVIEW_FILE, AugmentPolicy
from cnnpipe.config import TrackingConfig, TrainConfig
from cnnpipe.data.store import (FIGURES_DIR, MANIFEST_FILE, Dataset, Split, decoded_mb, fetch_dataset,
                                 few_val_images, read_dataset)
from cnnpipe.engine.checkpoint import ModelSpec, load_checkpoint, save_checkpoint, save_model
from cnnpipe.engine.device import autocast, resolve_device, set_threads
from cnnpipe.engine.distributed import barrier, init_distributed
from cnnpipe.engine.inference import stats_tensors, to_nchw_uint8
from cnnpipe.engine.budget import NarrowerNet
from cnnpipe.engine.loop import TrainData, fit
from cnnpipe.engine.model_folder import CONFIG_FILE, HISTORY_FILE, MODEL_FILE, write_history
from cnnpipe.engine.stream import StreamBatches
from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import atomic_dir, ensure_writable_parent, read_json
from cnnpipe.models import MODELS, build_model, check_input_size, count_parameters, is_library_arch
from cnnpipe.models.init import CONV_INITS
from cnnpipe.engine.pretrained import adapt_stats, fit_weights, load_pretrained
from cnnpipe.remote import Location


MIN_WIDTH = 16  # train.budget_min_epochs narrows no further: narrower nets trained more epochs on GTSRB and still
                # scored far below width 16 on the same clock (docs/budget.md)


def _conv_init_refused(cfg: TrainConfig) -> CnnpipeError:
    source = f" from {cfg.pretrained}" if cfg.pretrained else ""
    return CnnpipeError(f"train.conv_init: {cfg.conv_init} initializes fastnet's convolutions (the fastnet* archs, "
                        f"trained from scratch), not {cfg.arch}{source}: expected default")


def _build_net(cfg: TrainConfig, channels: int, classes: int, image_size: int, width: int) -> torch.nn.Module:
    """The net to train, initialized as train.conv_init asks (seeded by the caller)."""
    net = build_model(cfg.arch, channels, classes, image_size, width)
    if cfg.conv_init != "default" and not CONV_INITS[cfg.conv_init](net):
        raise _conv_init_refused(cfg)
    return net


def _check_same_data(processed: Dataset, augmented: Dataset, data: Path, aug: Path) -> None:
    for what in ("classes", "image_size", "channels"):
        a, b = getattr(processed, what), getattr(augmented, what)
        if a != b:
            raise CnnpipeError(f"augmented dataset '{aug}' does not match dataset '{data}': {what} {b!r} vs {a!r} "
                               f"(re-run `cnnpipe augment`)")


def _with_val(train: Split, val: Split) -> Split:
    """The training split with the val split's images appended (train.train_on_val); a dataset has boxes for
    every split or for none (cnnpipe.data.store)."""
    return Split(np.concatenate([train.images, val.images]), np.concatenate([train.labels, val.labels]),
                 None if train.boxes is None else np.concatenate([train.boxes, val.boxes]))


def _empty(split: Split) -> Split:
    return Split(split.images[:0], split.labels[:0], None if split.boxes is None else split.boxes[:0])


def data_path(cfg: TrainConfig, manifest: dict) -> str:
    """`device` or `stream`: train.data_mode, with auto resolved from the decoded training split's size."""
    if cfg.data_mode == "auto":
        return "stream" if manifest.get("shards") and decoded_mb(manifest, "train") > cfg.device_budget_mb else "device"
    return cfg.data_mode


def run(*, cfg: TrainConfig, data: Location, augmented: Location, model: Path, tracking: TrackingConfig | None,
        checkpoint: Path | None = None, resume: bool = False, run_tags: dict[str, str] | None = None,
        on_epoch: Callable[[dict[str, float]], None] | None = None, allow_unverified: bool = False) -> dict:
    """Train on `augmented`'s training split, validate on `data`'s val split (train.train_on_val: train on it too,
    validate on nothing), write the model folder `model`.
    With `checkpoint`, the full state is saved there after every epoch and removed on success, and `resume`
    continues from it (into the same MLflow run). `on_epoch(stats)` sees every epoch's metrics after they are
    logged (a tuner's pruner raises from it to stop the run). `allow_unverified`: train.pretrained may name a
    registered model nothing vouches for (see cnnpipe.serving.trusted)."""
    ensure_writable_parent(model)
    with tempfile.TemporaryDirectory(prefix="cnnpipe-train-") as tmp:  # copies of remote datasets' files
        local_data = fetch_dataset(data, Path(tmp) / "data", ("val",))
        local_aug = fetch_dataset(augmented, Path(tmp) / "augmented", (), (POLICY_FILE, PREVIEW_FILE))
        stream = data_path(cfg, read_dataset(local_aug, splits=()).manifest) == "stream"
        if not stream:
            local_aug = fetch_dataset(augmented, Path(tmp) / "augmented", ("train",), (POLICY_FILE, PREVIEW_FILE))
        return _train(cfg=cfg, data=local_data, augmented=local_aug, shards=augmented if stream else None, model=model,
                      tracking=tracking, checkpoint=checkpoint, resume=resume, run_tags=run_tags, on_epoch=on_epoch,
                      allow_unverified=allow_unverified)


def _train(*, cfg: TrainConfig, data: Path, augmented: Path, shards: Location | None, model: Path,
           tracking: TrackingConfig | None, checkpoint: Path | None, resume: bool, run_tags: dict[str, str] | None,
           on_epoch: Callable[[dict[str, float]], None] | None, allow_unverified: bool) -> dict:
    """run() on local copies; the training batches stream from the shards at `shards` when it is given."""
    dist = init_distributed()
    if dist.world > 1 and cfg.freeze_epochs:  # DDP reduces every parameter's gradient; frozen ones never come
        raise CnnpipeError("train.freeze_epochs: not supported with several processes (torchrun); use 0")
    if cfg.train_on_val and (cfg.keep != "last" or cfg.early_stopping_patience):
        raise CnnpipeError("train.train_on_val: no split is held out to pick an epoch or stop early by: expected "
                           f"train.keep last and train.early_stopping_patience 0, got {cfg.keep} and "
                           f"{cfg.early_stopping_patience}")
    if cfg.conv_init != "default" and (is_library_arch(cfg.arch) or cfg.pretrained):  # before any download
        raise _conv_init_refused(cfg)
    if cfg.train_on_val and shards is not None:
        raise CnnpipeError("train.train_on_val: not with training batches streamed from shards (the val split is not "
                           "in them): expected train.data_mode device")
    processed = read_dataset(data, splits=("val",))
    aug = read_dataset(augmented, splits=() if shards is not None else ("train",))
    _check_same_data(processed, aug, data, augmented)
    policy = AugmentPolicy.from_dict(read_json(augmented / POLICY_FILE, "augmentation policy"),
                                     str(augmented / POLICY_FILE)) if cfg.augment else None
    device = dist.device(resolve_device(cfg.device))
    threads = set_threads(cfg.threads, dist.world)
    state = load_checkpoint(checkpoint, dataclasses.asdict(cfg)) if resume and checkpoint else None
    if checkpoint and not resume and checkpoint.exists() and dist.is_main:
        print(f"train: a checkpoint of an interrupted run is at '{checkpoint}': starting afresh replaces it "
              f"(`--resume` would continue it)", file=sys.stderr)
    width = state.get("width", cfg.width) if state is not None else cfg.width  # a budget may have narrowed it
    torch.manual_seed(cfg.seed)
    net = _build_net(cfg, aug.channels, len(aug.classes), aug.image_size, width)
    if is_library_arch(cfg.arch):
        check_input_size(net, cfg.arch, aug.channels, aug.image_size)
    mean, std = aug.manifest["mean"], aug.manifest["std"]
    lineage: dict[str, str] = {}
    if cfg.pretrained and state is None:  # a resumed run takes its weights from the checkpoint
        pre = load_pretrained(cfg.pretrained, cfg.arch, tracking, allow_unverified=allow_unverified)
        loaded = fit_weights(net, pre, aug.classes)
        if pre.mean is not None:  # normalize as the weights were trained
            mean, std = adapt_stats(pre.mean, aug.channels), adapt_stats(pre.std, aug.channels)
        lineage = pre.lineage
        if dist.is_main:
            print(f"pretrained: {loaded['tensors_loaded']} tensors from {cfg.pretrained}, "
                  f"{'head kept' if loaded['head_loaded'] else 'new head'}", file=sys.stderr)
    elif state is not None:
        mean, std, lineage = state.get("mean", mean), state.get("std", std), state.get("lineage", {})
    net = net.to(device)
    n_params = count_parameters(net)
    n_train, val_split = aug.manifest["counts"]["train"]["total"], processed.splits["val"]
    train_split = aug.splits["train"] if shards is None else None
    if cfg.train_on_val:  # the val split joins the training images; nothing is validated on
        train_split, val_split = _with_val(train_split, val_split), _empty(val_split)
        n_train = len(train_split.labels)

    tracker = None  # started once every input is known good, so a bad input leaves no failed run behind
    if tracking is not None and dist.is_main:
        from cnnpipe.tracking import Tracker

        if state is not None and state.get("run_id"):
            tracker = Tracker.reopen(tracking, state["run_id"], str(checkpoint), running=True)
        else:
            tracker = Tracker.start(tracking, run_name=(run_tags or {}).get("mlflow.runName",
                                                                            f"{aug.manifest['source']['name']}-{cfg.arch}"),
                                    tags={"cnnpipe.source": aug.manifest["source"]["name"], **lineage,
                                          **(run_tags or {})})
            tracker.log_params(dataclasses.asdict(cfg), prefix="train.")
            tracker.log_params({k: v for k, v in policy.to_dict().items() if not k.endswith("flip")} if policy else {},
                               prefix="augment.")
            tracker.log_params({"source": aug.manifest["source"]["name"], "image_size": aug.image_size,
                                "channels": aug.channels, "num_classes": len(aug.classes),
                                "train_images": n_train, "val_images": len(val_split.labels),
                                "world_size": dist.world}, prefix="data.")
            tracker.set_tags(tracker.source_tags(processed.manifest))
    run_id = tracker.run_id if tracker else None

    def save_state(st: dict) -> None:
        save_checkpoint(checkpoint, {**st, "run_id": run_id, "mean": mean, "std": std, "lineage": lineage,
                                     "width": width})

    save = save_state if checkpoint and dist.is_main else None
    try:
        if dist.is_main:
            print(f"{cfg.arch}: {n_params:,} parameters, {n_train:,} training images"
                  + (" streamed from shards" if shards is not None else "")
                  + (" (the val split's among them: no validation)" if cfg.train_on_val
                     else f", {len(val_split.labels):,} validation images")
                  + f", device {device}, {threads} CPU threads"
                  + (f", {dist.world} processes" if dist.world > 1 else "")
                  + (f", resuming after epoch {state['epoch']}" if state else ""), file=sys.stderr)
            if autocast(device, cfg.precision)[1] != cfg.precision != "auto":  # said once, not per narrowed net
                print(f"train.precision: {cfg.precision} asked for, but {device} has no native bf16: training in fp32",
                      file=sys.stderr)
        mean_t, std_t = stats_tensors(mean, std, device)
        val = dict(val_images=to_nchw_uint8(val_split.images, device),
                   val_labels=torch.from_numpy(val_split.labels).to(device), mean=mean_t, std=std_t)
        if shards is not None:
            tensors = TrainData(None, None, **val, train_stream=StreamBatches(
                shards, aug.manifest, batch_size=cfg.batch_size, shuffle_buffer=cfg.shuffle_buffer,
                workers=cfg.loader_workers, seed=cfg.seed, dist=dist, device=device))
        else:
            tensors = TrainData(to_nchw_uint8(train_split.images, device), torch.from_numpy(train_split.labels).to(device),
                                **val, train_boxes=None if train_split.boxes is None
                                else torch.from_numpy(train_split.boxes).to(device))

        def each_epoch(stats: dict[str, float]) -> None:
            if tracker is not None:
                tracker.log_metrics(stats, step=int(stats["epoch"]))
            if on_epoch is not None:
                on_epoch(stats)

        few = None if cfg.train_on_val else few_val_images(len(val_split.labels))
        if few and dist.is_main:
            print(f"train: {few}", file=sys.stderr)
        started = None  # a budget's clock: fit starts it, a narrower net's start does not reset it
        while True:
            try:
                result = fit(net, tensors, cfg, policy, on_epoch=each_epoch, checkpoint=save, resume=state, dist=dist,
                             started=started, can_narrow=bool(cfg.budget_min_epochs and cfg.arch in MODELS
                                                               and not cfg.pretrained and width // 2 >= MIN_WIDTH))
                break
            except NarrowerNet as e:  # raised in the first epoch, before anything was logged or saved
                started = e.started
                torch.manual_seed(cfg.seed)
                net = _build_net(cfg, aug.channels, len(aug.classes), aug.image_size, width // 2).to(device)
                if dist.is_main:
                    print(f"train.budget_min_epochs {cfg.budget_min_epochs:g}: {e} at width {width}: starting again "
                          f"at width {width // 2} "
                          f"({count_parameters(net):,} parameters; {time.perf_counter() - started:.1f} s of the budget "
                          f"spent)", file=sys.stderr, flush=True)
                width //= 2
        n_params = count_parameters(net)
        best_epoch = result.best_epoch or None  # None: nothing validated (train.train_on_val)
        if result.budget is not None:
            result.budget["width"] = width
        warnings = ([f"train: {few}"] if few else []) + result.warnings
        if tracker is not None:  # after training: a budget may have narrowed the net
            tracker.log_params({"parameters": n_params}, prefix="data.")
        if dist.is_main:
            with atomic_dir(model) as tmp:
                spec = ModelSpec(cfg.arch, width, aug.channels, len(aug.classes), aug.image_size,
                                 aug.classes, mean, std, processed.manifest.get("resize", "squash"))
                save_model(tmp / MODEL_FILE, result.model, spec)
                write_history(tmp / HISTORY_FILE, result.history)
                (tmp / CONFIG_FILE).write_text(json.dumps({"train": dataclasses.asdict(cfg), "parameters": n_params,
                                                           "best_epoch": best_epoch,
                                                           "kept_epoch": result.kept_epoch, "lineage": lineage,
                                                           "budget": result.budget,
                                                           # what test-time augmentation may average over
                                                           "flips": policy.flips() if policy else None},
                                                          indent=2) + "\n")
                if tracker is not None:
                    tracker.write_run_file(tmp)
                    tracker.log_metrics({**({"train/best_epoch": best_epoch} if best_epoch else {}),
                                         "train/kept_epoch": result.kept_epoch,
                                         **{f"budget/{k}": float(v) for k, v in (result.budget or {}).items()}})
                    if warnings:  # beside the run's numbers, where whoever compares runs looks
                        tracker.set_tags({"cnnpipe.warnings": " | ".join(warnings)})
                    tracker.log_artifact(tmp / HISTORY_FILE, "train")
                    tracker.log_artifact(data / MANIFEST_FILE, "data")
                    if (data / FIGURES_DIR).is_dir():  # written by ingest; a hand-made dataset may lack them
                        tracker.log_artifact(data / FIGURES_DIR, f"data/{FIGURES_DIR}")
                    tracker.log_artifact(augmented / POLICY_FILE, "augment")
                    tracker.log_artifact(augmented / PREVIEW_FILE, "augment")
        barrier(dist)
    except BaseException:
        if tracker is not None:
            tracker.finish(ok=False)
        raise
    if tracker is not None:
        tracker.finish(ok=True)
    if save is not None:
        checkpoint.unlink(missing_ok=True)  # the model file is the result; a stale state must not be resumed
    kept = result.history[result.kept_epoch - 1]
    return {"epochs": len(result.history), "best_epoch": best_epoch, "kept_epoch": result.kept_epoch,
            "stopped_early": result.stopped_early, "val_accuracy": kept.get("val/accuracy"),
            "val_loss": kept.get("val/loss"),
            "parameters": n_params, "run_id": run_id, "warnings": warnings,
            **({"budget": result.budget} if result.budget else {})}
