"""evaluate: a model + the processed dataset -> metrics.json, the confusion matrix in every form, the
analyses of a careful practitioner (curves, grids, calibration, filters, feature maps, t-SNE), a report.

Metrics cover the val and the test split (labelled); the figures describe the test split. Each split
is scored on the served protocol: the stored images through the very preprocessing a server applies
to a request (the serving Predictor's preprocess), as `val` and `test`; when the dataset has boxes
(whole frames + GTSRB's ROI), also on the ROI protocol: each image cropped to its box as a request
with a box is, as `val_roi` and `test_roi`.

Calibration (evaluate.calibrate): one temperature T is fitted on the val split's served-protocol logits (NLL);
every protocol's scores are those of the calibrated probabilities softmax(logits / T), the model as registered
and served, with `ece_uncalibrated` and `loss_uncalibrated` (T = 1) beside them. T goes to calibration.json in
this folder (never into train's), which register packages with the model, with the flip tables of the augment
policy the model was trained with (train records them): the views test-time augmentation averages. Averaging
views that disagree softens the probabilities, so TTA gets its own temperature, fitted (NLL) on the log of val's
averaged probabilities (calibration/temperature_tta): every TTA path (serve --tta, ONNX, SageMaker) applies it.
A model trained on the val split too (train.train_on_val) is not calibrated (T = 1, said): a temperature fitted on
images the model learned would only sharpen it. Its val scores, of training images, are named `val_trained` (and
`val_trained_roi`), so no headline, run view or register gate takes them for held-out ones.

Test-time augmentation (evaluate.tta): each protocol is scored again with the probabilities averaged over the
original and every class-aware flipped view (contract.tta_probabilities), as `*_tta`, with the batched inference
time per image with and without it (`ms_per_image`, `ms_per_image_tta`). A model whose classes no flip keeps
(digits) has no TTA: said in one line, and nothing `*_tta` is reported.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cnnpipe.calibration import Calibration
from cnnpipe.config import EvaluateConfig, TrackingConfig
from cnnpipe.data.split import stratified_split
from cnnpipe.data.store import Dataset, few_val_images, read_dataset
from cnnpipe.engine.checkpoint import ModelSpec, load_model
from cnnpipe.engine.device import resolve_device
from cnnpipe.engine.inference import normalize, predict_logits, stats_tensors, to_nchw_uint8
from cnnpipe.engine.model_folder import MODEL_FILE, read_history, read_train_config
from cnnpipe.engine.predictor import Predictor
from cnnpipe.errors import CnnpipeError
from cnnpipe.evaluation import explain, figures, introspect
from cnnpipe.evaluation.folder import (
    CALIBRATION_FILE,
    CONFUSION_CSV,
    CONFUSION_JSON,
    CONFUSION_PNG,
    HEADLINE_FILE,
    METRICS_FILE,
    MOST_CONFUSED_FILE,
    PREDICTIONS_FILE,
    TRAINED_VAL,
    per_class_file,
)
from cnnpipe.evaluation.metrics import classification_metrics
from cnnpipe.evaluation.report import Report
from cnnpipe.fsio import atomic_dir, ensure_writable_parent
from cnnpipe.imaging import as_requests
from cnnpipe.models import count_parameters
from cnnpipe.tracking import HEADLINE_METRICS

SPLITS = ("val", "test")
MAX_MAP_LAYERS = 16  # rows of the feature-map figure
ROI_SUFFIX = "_roi"  # metrics.json key and MLflow prefix of a split's ROI-protocol scores
UNCALIBRATED_SCORES = ("ece", "loss")  # reported at T = 1 too, as <name>_uncalibrated
TRAINED_ON_VAL = "The model was trained on the val split too (train.train_on_val)"


def protocol_note(ds: Dataset) -> str:
    """What `val`/`test` measure on this dataset, for the report and the run's tags."""
    if ds.manifest.get("whole_frames", True):
        return "served: whole images, as a server receives them" + \
            ("; *_roi: cropped to the object's box" if ds.has_boxes else "")
    return "ROI crops (ingest.roi_crop): the served protocol (whole frames) is not measured on this dataset"


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _check_match(spec: ModelSpec, ds: Dataset, model_path: Path, data: Path) -> None:
    if (ds.classes, ds.image_size, ds.channels) != (spec.classes, spec.image_size, spec.in_channels):
        raise CnnpipeError(
            f"model '{model_path}' does not match dataset '{data}': model takes {spec.num_classes} classes, "
            f"{spec.image_size}x{spec.image_size}x{spec.in_channels}; dataset has {len(ds.classes)} classes, "
            f"{ds.image_size}x{ds.image_size}x{ds.channels}")


def _figures(folder: Path, model: torch.nn.Module, spec: ModelSpec, images: np.ndarray, x: torch.Tensor,
             result: dict, uncalibrated: dict, temperature: float, history: list[dict], cfg: EvaluateConfig,
             mean: torch.Tensor, std: torch.Tensor) -> list[tuple]:
    """Every PNG of the analysis; returns (file, caption) in report order."""
    rng = np.random.default_rng(cfg.seed)
    classes, y_true, y_pred, conf = spec.classes, result["y_true"], result["y_pred"], result["confidence"]
    made = []

    def short(i: int) -> str:
        return classes[i] if len(classes[i]) <= 18 else classes[i][:17] + "…"

    figures.confusion_matrix_png(result["confusion"], classes, folder / CONFUSION_PNG, "test")
    made.append((CONFUSION_PNG, "Confusion matrix on the test split: counts and row-normalized"))
    if history:
        figures.training_curves_png(history, folder / "training_curves.png")
        made.append(("training_curves.png", "Loss and accuracy per epoch, train vs validation"))
    for name, mask, color, what in (("misclassified.png", y_true != y_pred, "red", "Misclassified"),
                                    ("correct.png", y_true == y_pred, "blue", "Correctly classified")):
        idx = np.flatnonzero(mask)
        idx = np.sort(rng.choice(idx, min(cfg.grid_images, len(idx)), replace=False)) if len(idx) else idx
        titles = [f"{short(y_pred[i])} ({short(y_true[i])})" for i in idx]
        figures.labelled_grid_png(images[idx], titles, color, folder / name, f"{what} test images: predicted (true)")
        made.append((name, f"{what} test images, titled predicted (true)"))
        if name == "misclassified.png" and len(idx):
            skipped = explain.unavailable_reason(model)
            if skipped:
                print(f"evaluate: no Grad-CAM figure: {skipped}", file=sys.stderr)
                continue
            cams = explain.overlays(model, normalize(x[idx], mean, std), images[idx], y_pred[idx])
            figures.labelled_grid_png(cams, titles, color, folder / "gradcam_misclassified.png",
                                      "Grad-CAM of the predicted class, misclassified test images: predicted (true)")
            made.append(("gradcam_misclassified.png", "Grad-CAM: where the network looked for the class it "
                                                      "wrongly predicted (same images as above)"))
    correct = y_true == y_pred
    figures.confidence_histogram_png(conf, correct, folder / "confidence_histogram.png")
    made.append(("confidence_histogram.png", "Confidence of correct and incorrect predictions"))
    figures.reliability_png([("uncalibrated (T = 1)", uncalibrated["calibration"], uncalibrated["scalars"]["ece"]),
                             (f"calibrated (T = {temperature:.3f})", result["calibration"], result["scalars"]["ece"])],
                            folder / "reliability_diagram.png")
    made.append(("reliability_diagram.png", "Reliability diagram of the test split: accuracy per confidence bin, "
                                            "before and after temperature scaling"))
    weights = introspect.first_conv(model)
    if weights is not None:
        figures.filters_png(weights.numpy(), folder / "first_layer_filters.png")
        made.append(("first_layer_filters.png", "First-layer convolution filters"))
        sample = int(np.flatnonzero(correct)[0]) if correct.any() else 0
        maps = introspect.feature_maps(model, normalize(x[sample:sample + 1], mean, std))
        shown = maps[::-(-len(maps) // MAX_MAP_LAYERS)]  # a deep backbone: evenly spaced layers, one row each
        figures.feature_maps_png(images[sample], [(n, m.numpy()) for n, m in shown], folder / "feature_maps.png")
        which = "every" if len(shown) == len(maps) else f"{len(shown)} of the {len(maps)}"
        made.append(("feature_maps.png", f"Feature maps of {which} conv layers for one test image "
                                         f"({classes[y_true[sample]]})"))
    if cfg.tsne_samples and len(y_true) >= 5:
        from sklearn.manifold import TSNE

        share = min(1.0, cfg.tsne_samples / len(y_true))
        pick = np.arange(len(y_true)) if share >= 1 else \
            stratified_split(y_true, {"sample": share}, cfg.seed)["sample"][:cfg.tsne_samples]
        emb = introspect.penultimate(model, normalize(x[pick], mean, std)).cpu().numpy()
        points = TSNE(n_components=2, init="pca", random_state=cfg.seed,
                      perplexity=min(30.0, (len(pick) - 1) / 3)).fit_transform(emb)
        figures.tsne_png(points, y_true[pick], classes, folder / "tsne.png")
        made.append(("tsne.png", f"t-SNE of penultimate-layer embeddings, {len(pick):,} test images (stratified)"))
    return made


WORST_CLASSES = 10  # rows of the report's worst-classes table (the full per-class table follows further down)


def _report(folder: Path, ds: Dataset, spec: ModelSpec, n_params: int, train_cfg: dict, metrics: dict,
            results: dict, made: list[tuple], temperature: float, calibrate: bool, tta_note: str,
            trained_on_val: bool) -> None:
    """Top-down: the headline (accuracy per protocol, calibration, the confusion matrix, the worst classes), then
    the details, the data and the model; the training params folded at the end."""
    r = Report("cnnpipe evaluation report")
    figures_of = dict(made)
    r.heading("Headline")
    r.text(f"Protocol: {protocol_note(ds)}." + (f" {TRAINED_ON_VAL}: its {TRAINED_VAL} rows score training images, "
                                                 f"only the test rows held-out ones." if trained_on_val else ""))
    r.table(["split", "accuracy", "top-5 accuracy", "F1 macro", "ECE", "loss"],
            [[split, m["accuracy"], m["top5_accuracy"], m["f1_macro"], m["ece"], m["loss"]] for split, m in metrics.items()])
    r.heading("Calibration")
    few = few_val_images(ds.manifest["counts"]["val"]["total"])
    if calibrate:
        said = (f"Temperature T = {temperature:.4f}, fitted on the val split (NLL): the registered and served model "
                f"answers softmax(logits / T); accuracy is unchanged.")
    elif trained_on_val:
        said = "Not calibrated (train.train_on_val: no held-out split to fit a temperature on): T = 1."
    else:
        said = "Not calibrated (evaluate.calibrate: false): T = 1."
    r.text(said + (f" Note: {few}." if few and not trained_on_val else ""))
    r.table(["split", "ECE before", "ECE after", "NLL before", "NLL after"],
            [[split, m["ece_uncalibrated"], m["ece"], m["loss_uncalibrated"], m["loss"]] for split, m in metrics.items()])
    if "reliability_diagram.png" in figures_of:
        r.image("reliability_diagram.png", figures_of.pop("reliability_diagram.png"))
    r.heading("Confusion matrix (test)")
    r.image(CONFUSION_PNG, figures_of.pop(CONFUSION_PNG))
    r.heading("Worst classes (test)")
    worst = sorted(results["test"]["per_class"], key=lambda c: (c["f1"], c["class"]))[:WORST_CLASSES]
    r.table(["class", "f1", "precision", "recall", "support"],
            [[c["class"], c["f1"], c["precision"], c["recall"], c["support"]] for c in worst])
    r.heading("Most confused pairs (test)")
    r.table(["true", "predicted", "count"], [[p["true"], p["predicted"], p["count"]] for p in results["test"]["most_confused"]])
    r.heading("Test-time augmentation")
    r.text(tta_note)
    if "accuracy_tta" in next(iter(metrics.values())):
        r.table(["split", "accuracy", "accuracy TTA", "ECE", "ECE TTA", "ms / image", "ms / image TTA"],
                [[split, m["accuracy"], m["accuracy_tta"], m["ece"], m["ece_tta"], m["ms_per_image"],
                  m["ms_per_image_tta"]] for split, m in metrics.items()])
    r.heading("Every metric")
    names = list(next(iter(metrics.values())))
    r.table(["split", *names], [[split, *m.values()] for split, m in metrics.items()])
    r.heading("Figures")
    for file, caption in figures_of.items():
        r.image(file, caption)
    r.heading("Per class (test)")
    r.table(["class", "precision", "recall", "f1", "support"],
            [[c["class"], c["precision"], c["recall"], c["f1"], c["support"]] for c in results["test"]["per_class"]])
    r.heading("Data")
    src = ds.manifest["source"]
    r.text(f"Source {src['name']}" + (f" ({src['path']})" if src.get("path") else "") +
           f"; {len(ds.classes)} classes; {ds.image_size}x{ds.image_size}, {ds.channels} channel(s).")
    r.table(["split", "images"], [[k, v["total"]] for k, v in ds.manifest["counts"].items()])
    r.heading("Model")
    r.text(f"{spec.arch}, width {spec.width}: {n_params:,} parameters.")
    if train_cfg:
        r.table(["train param", "value"], [[k, str(v)] for k, v in train_cfg.get("train", {}).items()],
                folded="Training params")
    r.write(folder)


def _seconds(predictor: Predictor, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    probs = predictor.probabilities(x, batch_size)
    return probs, time.perf_counter() - start


def _tta(metrics: dict, cfg: EvaluateConfig, calibration: Calibration, plain: Predictor, tta: Predictor,
         tensors: dict, labels: dict, classes: list[str]) -> str:
    """Score every protocol with test-time augmentation into `metrics` (*_tta, and the ms per image with and
    without); returns the one line that says what was done."""
    if not cfg.tta:
        return "TTA off (evaluate.tta: false)"
    if not tta.tta:
        return "TTA off: the augment policy the model was trained with flips no class into itself or another"
    for key, x in tensors.items():
        _, without = _seconds(plain, x, cfg.batch_size)  # timed here, back to back with TTA: the same conditions
        probs, elapsed = _seconds(tta, x, cfg.batch_size)
        # log p as logits: classification_metrics' softmax gives p back, its loss is p's NLL
        scores = classification_metrics(probs.clamp_min(1e-12).log(), labels[key], classes)["scalars"]
        metrics[key] |= {f"{k}_tta": round(scores[k], 6) for k in ("accuracy", "ece", "loss")}
        metrics[key] |= {"ms_per_image": round(1000 * without / len(x), 4),
                         "ms_per_image_tta": round(1000 * elapsed / len(x), 4)}
    views = 1 + len(calibration.tta_flips)
    return f"TTA on: {views} views (original, {', '.join(calibration.tta_flips)}), averaged per class over the views " \
           f"that keep it defined" + (f"; TTA temperature {calibration.tta_temperature:.4f} (fitted on val's averages)"
                                      if calibration.tta_temperature is not None else "")


def run(*, cfg: EvaluateConfig, model: Path, data: Path, evaluation: Path, tracking: TrackingConfig | None) -> dict:
    """Score the model folder `model` on `data`'s val and test splits; write the evaluation folder `evaluation`."""
    model_dir, out = model, evaluation
    ensure_writable_parent(out)
    device = resolve_device(cfg.device)
    model, spec = load_model(model_dir / MODEL_FILE, device)
    ds = read_dataset(data, splits=SPLITS)
    _check_match(spec, ds, model_dir / MODEL_FILE, data)
    for name in SPLITS:
        if len(ds.splits[name].labels) == 0:
            raise CnnpipeError(f"dataset '{data}': the '{name}' split is empty")
    tracker = None
    if tracking is not None:  # connect before the work: an unreachable store fails fast
        from cnnpipe.tracking import Tracker

        tracker = Tracker.resume(tracking, model_dir)
    mean, std = stats_tensors(spec.mean, spec.std, device)
    server = Predictor(model, spec, device)
    logits, labels, tensors, test_images = {}, {}, {}, None
    for name in SPLITS:
        split = ds.splits[name]
        for key, use_boxes in ((name, False), (name + ROI_SUFFIX, True)):
            if use_boxes and not ds.has_boxes:
                continue
            images = server.preprocess(as_requests(split.images, split.boxes if use_boxes else None))
            test_images = images if key == "test" else test_images
            tensors[key] = to_nchw_uint8(images, device)
            logits[key] = predict_logits(model, tensors[key], mean, std, cfg.batch_size)
            labels[key] = torch.from_numpy(split.labels).to(device)
    train_cfg = read_train_config(model_dir)
    trained_on_val = bool((train_cfg.get("train") or {}).get("train_on_val"))
    calibrate = cfg.calibrate and not trained_on_val
    # T from the served protocol's val logits (the images a server gets); the flips of the policy the model was
    # trained with travel beside it
    try:  # the flip tables checked before TTA's temperature is fitted with them
        Calibration(flips=train_cfg.get("flips")).check(spec.num_classes, f"model folder '{model_dir}'")
        calibration = Calibration.fit(
            logits["val"], labels["val"], train_cfg.get("flips"),
            lambda plain: Predictor(model, spec, device, plain, tta=True).probabilities(tensors["val"], cfg.batch_size),
            calibrate)
    except ValueError as e:
        raise CnnpipeError(f"model folder '{model_dir}': {e}") from None
    temperature = calibration.temperature
    uncalibrated = {key: classification_metrics(z, labels[key], ds.classes) for key, z in logits.items()}
    results = {key: classification_metrics(z, labels[key], ds.classes, temperature) for key, z in logits.items()}
    metrics = {name: {k: round(v, 6) for k, v in r["scalars"].items()} |
               {f"{k}_uncalibrated": round(uncalibrated[name]["scalars"][k], 6) for k in UNCALIBRATED_SCORES}
               for name, r in results.items()}
    tta_note = _tta(metrics, cfg, calibration, Predictor(model, spec, device, calibration),
                    Predictor(model, spec, device, calibration, tta=True), tensors, labels, ds.classes)
    if trained_on_val:  # scores of training images: named so, never read as held-out val ones (headline, register)
        metrics = {name.replace("val", TRAINED_VAL, 1): m for name, m in metrics.items()}
    history = read_history(model_dir)
    test = results["test"]
    names = np.asarray(ds.classes)
    logged = {f"{split}/{k}": v for split, m in metrics.items() for k, v in m.items()} | \
        {"calibration/temperature": temperature} | \
        ({"calibration/temperature_tta": calibration.tta_temperature} if calibration.tta_temperature is not None else {})
    headline: dict[str, dict[str, float]] = {}
    for key in HEADLINE_METRICS:  # nested, as `dvc metrics show` and `dvc exp show` name them: test.accuracy
        if key in logged:
            group, name = key.split("/")
            headline.setdefault(group, {})[name] = round(logged[key], 6)
    with atomic_dir(out) as tmp:
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / HEADLINE_FILE).write_text(json.dumps(headline, indent=2) + "\n")
        calibration.write(tmp / CALIBRATION_FILE, fitted_on="val (NLL)" if calibrate else None)
        _write_csv(tmp / CONFUSION_CSV, ["true \\ predicted", *ds.classes],
                   [[c, *row] for c, row in zip(ds.classes, test["confusion"].tolist())])
        # the form KFP's ClassificationMetrics.log_confusion_matrix(categories, matrix) takes
        (tmp / CONFUSION_JSON).write_text(json.dumps(
            {"split": "test", "categories": ds.classes, "matrix": test["confusion"].tolist()}) + "\n")
        # one row per test image, the layout DVC's `confusion` plot template reads
        _write_csv(tmp / PREDICTIONS_FILE, ["actual", "predicted"],
                   np.stack([names[test["y_true"]], names[test["y_pred"]]], 1).tolist())
        for split, r in results.items():
            _write_csv(tmp / per_class_file(split), ["class", "precision", "recall", "f1", "support"],
                       [[c["class"], c["precision"], c["recall"], c["f1"], c["support"]] for c in r["per_class"]])
        _write_csv(tmp / MOST_CONFUSED_FILE, ["true", "predicted", "count"],
                   [[p["true"], p["predicted"], p["count"]] for p in test["most_confused"]])
        made = _figures(tmp, model, spec, test_images, tensors["test"], test, uncalibrated["test"], temperature,
                        history, cfg, mean, std)
        _report(tmp, ds, spec, count_parameters(model), train_cfg, metrics, results, made, temperature, calibrate,
                tta_note, trained_on_val)
        if tracker is not None:
            # at the last epoch's step, so val/* continues train's curves instead of restarting at 0
            tracker.log_metrics(logged, step=len(history))
            tracker.set_tags({"evaluate.protocol": protocol_note(ds), "evaluate.tta": tta_note,
                              **({"evaluate.val": f"trained on: scored as {TRAINED_VAL}"} if trained_on_val else {})})
            tracker.log_artifact(tmp, "evaluate")
    why = "" if calibrate else " (train.train_on_val)" if trained_on_val else " (evaluate.calibrate: false)"
    print(f"calibration: temperature {temperature:.4f}{why}" +
          (f", with TTA {calibration.tta_temperature:.4f}" if calibration.tta_temperature is not None else ""),
          file=sys.stderr)
    print(f"evaluate: {tta_note}", file=sys.stderr)
    if trained_on_val:
        print(f"evaluate: {TRAINED_ON_VAL}: its {TRAINED_VAL} scores are of training images", file=sys.stderr)
    for name, m in metrics.items():
        print(f"{name}: accuracy {m['accuracy']:.4f}  loss {m['loss_uncalibrated']:.4f} -> {m['loss']:.4f}  "
              f"f1_macro {m['f1_macro']:.4f}  ece {m['ece_uncalibrated']:.4f} -> {m['ece']:.4f}", file=sys.stderr)
    return metrics
