"""Benchmark: time to accuracy on GTSRB, cnnpipe side by side with what users would pick instead, in one run.

Contenders, each in its own process on the same machine, the same split (one `cnnpipe ingest` of the real
GTSRB training set: whole 32x32 frames, val and test held out by track) and the same thread count:
  1. keras: the seeds' own way, Keras 3 on TensorFlow CPU: the CIFAR-10 study's CNN (conv 32-64-128 with
     max-pools, dense 256, dropout 0.5, Adam 1e-3, batch 64) fed by `ImageDataGenerator` (rotation 10,
     shifts 0.1, zoom 0.1, brightness 0.7-1.3), `model.fit`;
  2. torch: a plain PyTorch script: a Dataset of PIL images, torchvision.transforms.v2 per image
     (RandomAffine, ColorJitter) in DataLoader workers, training the recipe's net (train.arch) with the default
     recipe's optimizer and schedule, as users write it (`torch_worker`'s "users"; its "same" variant, with
     cnnpipe's augmentation through tv_tensors.BoundingBoxes, is what benchmarks/budget.py also runs);
  3. cnnpipe's recipes, configs/gtsrb-fast.yaml and configs/gtsrb.yaml (benchmarks/recipes.py's worker).
Per contender: time from the start of training to the end of the first epoch whose validation accuracy
reaches 95 / 98 / 98.84 % (validation time counted), final test accuracy (whole frames), peak RSS of its
process group. Peers stop after --budget seconds or their epoch count. Needs the `bench` extra.

    .venv/bin/python -m benchmarks.peers [--budget 480]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.harness import earlier_results, load_average, record
from benchmarks.recipes import GTSRB_ZIP, RECIPES, THRESHOLDS, errors, prepare, spawn

ROOT = Path(__file__).resolve().parents[1]
PEER_EPOCHS = 30  # upper bound; the time budget usually ends a peer first


def _emit(epoch: int, elapsed: float, val_accuracy: float) -> None:
    print(json.dumps({"epoch": epoch, "elapsed_s": elapsed, "val_accuracy": float(val_accuracy)}), flush=True)


def keras_worker(processed: Path, budget: float, threads: int) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras
    import numpy as np
    import tensorflow as tf
    from keras import layers
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    from cnnpipe.data.store import read_dataset

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    keras.utils.set_random_seed(0)
    ds = read_dataset(processed)
    tr, va, te = (ds.splits[s] for s in ("train", "val", "test"))
    classes = len(ds.classes)
    model = keras.Sequential([
        keras.Input((32, 32, 3)), layers.Rescaling(1 / 255),
        layers.Conv2D(32, 3, padding="same", activation="relu"), layers.MaxPooling2D(),
        layers.Conv2D(64, 3, padding="same", activation="relu"), layers.MaxPooling2D(),
        layers.Conv2D(128, 3, padding="same", activation="relu"), layers.MaxPooling2D(),
        layers.Flatten(), layers.Dense(256, activation="relu"), layers.Dropout(0.5),
        layers.Dense(classes, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    gen = ImageDataGenerator(rotation_range=10, width_shift_range=0.1, height_shift_range=0.1, zoom_range=0.1,
                             brightness_range=(0.7, 1.3))
    t0 = [0.0]

    class Clock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):  # noqa: ANN001, ANN201
            t0[0] = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):  # noqa: ANN001, ANN201
            elapsed = time.perf_counter() - t0[0]
            _emit(epoch + 1, elapsed, logs["val_accuracy"])
            if elapsed > budget:
                self.model.stop_training = True

    x_train = tr.images.astype(np.float32)  # ImageDataGenerator works on float arrays
    model.fit(gen.flow(x_train, tr.labels, batch_size=64, seed=0), epochs=PEER_EPOCHS,
              validation_data=(va.images.astype(np.float32), va.labels), callbacks=[Clock()], verbose=0)
    train_s = time.perf_counter() - t0[0]
    _, test_acc = model.evaluate(te.images.astype(np.float32), te.labels, batch_size=512, verbose=0)
    print(json.dumps({"test_accuracy": round(float(test_acc), 5), "train_s": round(train_s, 1),
                      "parameters": model.count_params(), "versions": {"tensorflow": tf.__version__,
                                                                       "keras": keras.__version__}}), flush=True)


def torch_worker(processed: Path, budget: float, threads: int, augment: str = "users", epochs: int = 0,
                 seed: int = 0) -> None:
    """A plain PyTorch script training fastnet. `augment`: "users" = RandomAffine + ColorJitter per image, fp32,
    the default recipe's epochs and schedule, stopped after `budget` seconds (the script as users write it);
    "same" = cnnpipe's augmentation of configs/gtsrb-fast.yaml through torchvision v2 (class-aware flips, crops
    between the sign's box and the frame on tv_tensors.BoundingBoxes, the same affine and colour ranges), its
    optimizer, one-cycle schedule, EMA, precision (bf16 where the CPU has it) and conv_init, over `epochs` epochs: engine
    against engine. Not given: progressive resizing, border padding (v2's affine fills black)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from torch.utils.data import DataLoader, Dataset
    from torchvision import tv_tensors
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    from cnnpipe.augment.policy import BOX_EDGE_JITTER, flip_tables
    from cnnpipe.config import AugmentConfig, TrainConfig, load_block, read_params
    from cnnpipe.data.store import read_dataset
    from cnnpipe.engine.device import autocast
    from cnnpipe.engine.loop import lr_factor, make_optimizer
    from cnnpipe.models import build_model
    from cnnpipe.models.init import CONV_INITS

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    recipe = RECIPES["fast" if augment == "same" else "default"]
    raw = read_params(recipe)
    cfg = load_block(TrainConfig, "train", raw, {}, recipe)
    aug = load_block(AugmentConfig, "augment", raw, {}, recipe)
    epochs = epochs or cfg.epochs
    ds = read_dataset(processed)
    mean, std = ds.manifest["mean"], ds.manifest["std"]
    size = ds.splits["train"].images.shape[1:3]
    by_name = flip_tables(ds.classes, aug.flip)  # class -> class after each flip, -1 = never (cnnpipe's tables)
    flips = {"hflip": (TF.horizontal_flip,), "vflip": (TF.vertical_flip,),
             "rot180": (TF.horizontal_flip, TF.vertical_flip)}
    tables = [(np.array(by_name[name]), ops) for name, ops in flips.items() if max(by_name[name]) >= 0]
    rng = np.random.default_rng(seed)

    def box_crop(image: tv_tensors.Image, box: tv_tensors.BoundingBoxes):  # noqa: ANN202
        """cnnpipe's box crop: every edge from the box towards the frame by one share s ~ U(0, 1) plus its own
        +-BOX_EDGE_JITTER, then resized back to the image size (image and box together)."""
        share = np.clip(rng.uniform() + rng.uniform(-BOX_EDGE_JITTER, BOX_EDGE_JITTER, 4), 0, 1)
        frame = np.array([0, 0, size[1], size[0]], dtype=np.float64)
        x1, y1, x2, y2 = np.asarray(box[0], dtype=np.float64) + (frame - np.asarray(box[0])) * share
        top, left = int(round(y1)), int(round(x1))
        height, width = max(1, int(round(y2)) - top), max(1, int(round(x2)) - left)
        return (TF.resized_crop(image, top, left, height, width, list(size), antialias=True),
                TF.resized_crop(box, top, left, height, width, list(size)))

    class Images(Dataset):
        def __init__(self, split, transform, train: bool):  # noqa: ANN001
            self.images = [Image.fromarray(a) for a in split.images]
            self.boxes = split.boxes
            self.labels = split.labels.tolist()
            self.transform, self.train = transform, train

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, i: int):  # noqa: ANN204
            label = self.labels[i]
            if not (self.train and augment == "same"):
                return self.transform(self.images[i]), label
            image = tv_tensors.Image(TF.pil_to_tensor(self.images[i]))
            box = tv_tensors.BoundingBoxes(self.boxes[i : i + 1], format="XYXY", canvas_size=tuple(size))
            for table, flip in tables:
                if table[label] >= 0 and rng.uniform() < 0.5:
                    for f in flip:
                        image, box = f(image), f(box)
                    label = int(table[label])
            image, box = box_crop(image, box)
            return self.transform(image, box)[0], label

    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if augment == "same":
        train_tf = v2.Compose([v2.RandomAffine(degrees=aug.rotate, translate=(aug.translate, aug.translate),
                                               scale=(1 - aug.scale, 1 + aug.scale)),
                               v2.ColorJitter(brightness=aug.brightness, contrast=aug.contrast), *to_tensor])
    else:
        train_tf = v2.Compose([v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
                               v2.ColorJitter(brightness=0.3, contrast=0.3), *to_tensor])

    def seed_worker(worker: int) -> None:  # each DataLoader worker its own augmentation stream (fork copies rng)
        rng.bit_generator.state = np.random.default_rng([worker, torch.initial_seed()]).bit_generator.state

    train = DataLoader(Images(ds.splits["train"], train_tf, train=True), batch_size=cfg.batch_size, shuffle=True,
                       num_workers=threads, persistent_workers=True, drop_last=False, worker_init_fn=seed_worker)
    val = DataLoader(Images(ds.splits["val"], v2.Compose(to_tensor), False), batch_size=512, num_workers=threads)
    test = DataLoader(Images(ds.splits["test"], v2.Compose(to_tensor), False), batch_size=512, num_workers=threads)
    model = build_model(cfg.arch, 3, len(ds.classes), 32, cfg.width)
    if augment == "same" and cfg.conv_init != "default":
        CONV_INITS[cfg.conv_init](model)
    model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    total = epochs * len(train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg.schedule, s, total))
    mixed, precision = autocast(torch.device("cpu"), cfg.precision if augment == "same" else "fp32")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) \
        if augment == "same" and cfg.ema else None

    def predictions(loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
        """One-hot predictions of the model evaluated (the EMA's where there is one) and the labels."""
        net = ema.module if ema is not None else model
        net.eval()
        predicted, labels = [], []
        with torch.no_grad(), mixed():
            for x, y in loader:
                predicted.append(net(x.contiguous(memory_format=torch.channels_last)).argmax(1))
                labels.append(y)
        return F.one_hot(torch.cat(predicted), len(ds.classes)).numpy(), torch.cat(labels).numpy()

    def accuracy(loader: DataLoader) -> float:
        predicted, labels = predictions(loader)
        return float((predicted.argmax(1) == labels).mean())

    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        for x, y in train:
            with mixed():
                loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y,
                                       label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
        val_accuracy = accuracy(val)
        _emit(epoch, time.perf_counter() - t0, val_accuracy)
        if time.perf_counter() - t0 > budget:
            break
    train_s = time.perf_counter() - t0
    scored = errors(*predictions(test))  # where the errors are, as benchmarks.budget records cnnpipe's
    print(json.dumps({"test_accuracy": scored["accuracy"], "test_errors": scored["errors"],
                      "top_confusions": scored["top_confusions"], "train_s": round(train_s, 1),
                      "epochs_run": epoch, "epochs_planned": epochs, "precision": precision}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zip", type=Path, default=GTSRB_ZIP)
    parser.add_argument("--budget", type=float, default=480, help="seconds of training per peer (default 480)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--only", nargs="+", default=["keras", "torch", "fast", "default"])
    parser.add_argument("--merge", action="store_true", help="keep the results file's other contenders")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnpipe-peers"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/peers_gtsrb.json")
    parser.add_argument("--augment", choices=["users", "same"], default="users", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=2, metavar=("PEER", "PROCESSED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        peer, processed = args.worker
        if peer == "torch":
            torch_worker(Path(processed), args.budget, args.threads, args.augment, args.epochs, args.seed)
        else:
            keras_worker(Path(processed), args.budget, args.threads)
        return
    if not args.zip.exists():
        sys.exit(f"GTSRB zip not found: {args.zip}")
    load_before = load_average()
    processed = prepare(args.zip, args.work)
    # --merge: re-run only --only's contenders, keep the others' results from the results file
    results = earlier_results(args.out).get("results", {}) if args.merge else {}
    for name in args.only:
        print(f"{name} ...", file=sys.stderr, flush=True)
        if name in RECIPES:
            cmd = [sys.executable, "-m", "benchmarks.recipes", "--worker", str(RECIPES[name]),
                   str(processed), str(args.work / name), "0"]
        else:
            cmd = [sys.executable, "-m", "benchmarks.peers", "--budget", str(args.budget), "--threads", str(args.threads),
                   "--worker", name, str(processed)]
        results[name] = {**spawn(cmd, env={"OMP_NUM_THREADS": str(args.threads)}), "date": time.strftime("%Y-%m-%d %H:%M"),
                         "load_average_before": load_average()}
    cnnpipe = [results[n] for n in RECIPES if n in results]
    peers = [results[n] for n in ("keras", "torch") if n in results]
    speedup, at_least = {}, {}
    for t in THRESHOLDS:
        key = f"{t:.2%}"
        ours = [r["time_to_val"][key] for r in cnnpipe if r["time_to_val"][key] is not None]
        theirs = [r["time_to_val"][key] for r in peers if r["time_to_val"][key] is not None]
        speedup[key] = round(min(theirs) / min(ours), 2) if ours and theirs else None
        if ours and not theirs and peers:  # no peer got there before it stopped: a lower bound
            at_least[key] = round(min(r["epochs"][-1]["elapsed_s"] for r in peers) / min(ours), 2)
    # the same, under names a README placeholder can address
    speedup_named = {f"to_{t * 100:g}".replace(".", "_"): speedup[f"{t:.2%}"] for t in THRESHOLDS}
    at_least_named = {f"to_{float(k[:-1]):g}".replace(".", "_"): v for k, v in at_least.items()}
    labels = {"keras": "Keras 3 / TF-CPU, ImageDataGenerator (the seeds' way)",
              "torch": "plain PyTorch, DataLoader + torchvision v2 (fastnet)",
              "fast": "cnnpipe, configs/gtsrb-fast.yaml", "default": "cnnpipe, configs/gtsrb.yaml"}

    def secs(v: float | None) -> str:
        return "not reached" if v is None else f"{v:.0f} s"

    rows = ["| contender | to 95 % val | to 98 % val | to 98.84 % val | epochs | test accuracy | peak RSS |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        t = r["time_to_val"]
        rows.append(f"| {labels[name]} | {' | '.join(secs(t[k]) for k in t)} | {len(r['epochs'])} | "
                    f"{100 * r['test_accuracy']:.2f} % | {r['peak_rss_mb']:,.0f} MB |")
    args.out.with_suffix(".md").write_text("\n".join(rows) + "\n")
    record(args.out, {
        "benchmark": "time to validation accuracy on GTSRB (one split: whole 32x32 frames, val/test held out by track); "
                     "every contender in its own process, one after another, same threads",
        "budget_s": args.budget, "threads": args.threads, "results": results,
        "speedup_best_cnnpipe_over_best_peer": speedup, "speedup": speedup_named,
        # thresholds no peer reached: the peers' whole run time over cnnpipe's time to it
        "speedup_at_least": at_least_named,
        "load_average_before": load_before, "load_average_after": load_average(),
    })


if __name__ == "__main__":
    main()
