"""register: log the model as an MLflow pyfunc (raw images in) into the pipeline's run and register it.

A model whose validation accuracy (served protocol, from evaluate; the test split's for a model trained on val
too) is below `register.min_accuracy`, or no better than chance (1 / classes), is refused before anything is
logged: a collapsed run never reaches the registry.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

import cnnpipe
from cnnpipe import calibration, verified_model
from cnnpipe.calibration import Calibration
from cnnpipe.config import RegisterConfig, TrackingConfig
from cnnpipe.data.store import read_dataset
from cnnpipe.engine.model_folder import MODEL_FILE, read_train_config
from cnnpipe.engine.predictor import Predictor
from cnnpipe.errors import CnnpipeError
from cnnpipe.evaluation.folder import CALIBRATION_FILE, METRICS_FILE, TRAINED_VAL
from cnnpipe.fsio import ensure_writable_parent, read_json, write_json
from cnnpipe.promotion import promote
from cnnpipe.serving import trusted
from cnnpipe.serving.onnx_runtime import ONNX_FILE
from cnnpipe.tracking import CHALLENGER, CHAMPION, STATE_TAG, Registry, Tracker, owner_tags, quiet_mlflow

CLASSES_TAG = "classes_sha256"  # on every version: the next registration compares its classes without a download
ONNX_CHECK_IMAGES = 64  # test images the exported graph must answer like torch on before it is registered


def _png_base64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def check_quality(cfg: RegisterConfig, metrics: dict, num_classes: int, where: Path) -> float:
    """The validation accuracy (the test split's for a model trained on val: its val scores are of training
    images), or a CnnpipeError when it is below the floor or not above chance."""
    split, what = ("test", "test") if TRAINED_VAL in metrics else ("val", "validation")
    accuracy = (metrics.get(split) or {}).get("accuracy")
    if not isinstance(accuracy, (int, float)):
        raise CnnpipeError(f"evaluation metrics '{where}': expected {split}.accuracy (re-run `cnnpipe evaluate`)")
    chance = 1 / num_classes
    if accuracy <= chance or accuracy < cfg.min_accuracy:
        why = f"no better than chance (1/{num_classes} = {chance:.4f})" if accuracy <= chance else \
            f"below register.min_accuracy {cfg.min_accuracy}"
        raise CnnpipeError(f"register: {what} accuracy {accuracy:.4f} ('{where}') is {why}: the model is not "
                           f"registered")
    return accuracy


def classes_digest(classes: list[str]) -> str:
    return hashlib.sha256(json.dumps(classes).encode()).hexdigest()


def _listed(classes: list[str]) -> str:
    return f"{len(classes)} classes: {', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}"


def check_classes(registry: Registry, name: str, classes: list[str]) -> None:
    """A CnnpipeError naming register.model_name when `name`'s champion (else its latest version) predicts
    other classes than `classes`: another dataset's model never becomes a version of it."""
    versions = registry.client.search_model_versions(f"name = '{name}'")
    if not versions:
        return
    ref = registry.alias_version(name, CHAMPION) or str(max(int(v.version) for v in versions))
    version = registry.version(name, ref)
    digest = version.tags.get(CLASSES_TAG)
    if digest is None:  # registered before the tag existed: read the model itself
        # only its class list is read: a version that old may predate the digest tags too (a mismatch still fails)
        theirs = trusted.load(registry, f"models:/{name}/{ref}", allow_unverified=True)[0].spec.classes
        digest, known = classes_digest(theirs), f" ({_listed(theirs)})"
    else:
        known = ""
    if digest != classes_digest(classes):
        raise CnnpipeError(f"register.model_name {name!r}: its version {ref}{known} predicts other classes than this "
                           f"model ({_listed(classes)}); expected a new register.model_name for this dataset: "
                           "no version created")


def run(*, cfg: RegisterConfig, model: Path, data: Path, evaluation: Path, record: Path,
        tracking: TrackingConfig) -> dict:
    """Log the model folder `model` as a pyfunc into its pipeline run, with the calibration `evaluation` holds,
    register it (alias challenger), promote when asked; the registration is written to `record`."""
    model_dir, out = model, record
    from cnnpipe.serving.onnx_model import registered_graph

    with quiet_mlflow():  # MLflow checks the pyfunc's class as it is defined
        from cnnpipe.serving import pyfunc_model
        from cnnpipe.serving.pyfunc import predict_frame

    ensure_writable_parent(out)
    calibrated = Calibration.read(evaluation / CALIBRATION_FILE)  # served with the model: softmax(logits / T)
    # fail here, not inside MLflow, on a bad model file
    predictor = Predictor.from_file(model_dir / MODEL_FILE, calibration=calibrated)
    metrics = read_json(evaluation / METRICS_FILE, "evaluation metrics")
    check_quality(cfg, metrics, predictor.spec.num_classes, evaluation / METRICS_FILE)
    ds = read_dataset(data, splits=("test",))
    tracker = Tracker.resume(tracking, model_dir)

    registry = Registry(tracking.uri)
    test = metrics.get("test", {})
    version = registry.run_version(cfg.model_name, tracker.run_id)
    if version is None:
        check_classes(registry, cfg.model_name, predictor.spec.classes)
    if version is not None:  # a re-run (or one killed after registering): the run's version, not an orphan beside it
        print(f"{cfg.model_name} version {version} is already registered from run {tracker.run_id}: reusing it",
              file=sys.stderr)
        model_uri = registry.version(cfg.model_name, version).source
    else:
        example = pd.DataFrame({"image": [_png_base64(np.asarray(img)) for img in ds.splits["test"].images[:2]]})
        with tempfile.TemporaryDirectory(prefix="cnnpipe-onnx-") as tmp:
            # exported once, here: `serve --backend onnxruntime` and the lean image run it without torch
            graph = registered_graph(predictor, cfg.top_k, Path(tmp) / ONNX_FILE,
                                     np.asarray(ds.splits["test"].images[:ONNX_CHECK_IMAGES]))
            model_uri = tracker.log_pyfunc_model(
                "model", example, predict_frame(predictor, example, cfg.top_k), {"top_k": cfg.top_k},
                python_model=str(Path(pyfunc_model.__file__)),  # models from code: nothing pickled
                artifacts={verified_model.CHECKPOINT: str(model_dir / MODEL_FILE),
                           calibration.ARTIFACT: str(evaluation / CALIBRATION_FILE),
                           **({verified_model.ONNX: str(graph)} if graph is not None else {})},
                code_paths=[str(Path(cnnpipe.__file__).parent)],  # the model loads where cnnpipe is not installed
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}",
                                  f"pandas=={pd.__version__}", f"pillow=={Image.__version__}"],
            )
        with tempfile.TemporaryDirectory(prefix="cnnpipe-model-") as tmp:  # hash what the store holds
            folder, _, _ = registry.model_files(model_uri, Path(tmp))
            hashes = verified_model.digests(folder)
        lineage = read_train_config(model_dir).get("lineage", {})  # the pretrained source, when fine-tuned
        tags = {"run_id": tracker.run_id, "arch": predictor.spec.arch, **lineage, **Tracker.source_tags(ds.manifest, data),
                **{f"test.{k}": v for k, v in test.items()},
                **{f"test_roi.{k}": v for k, v in metrics.get("test_roi", {}).items()},
                calibration.TEMPERATURE_TAG: calibrated.temperature, CLASSES_TAG: classes_digest(predictor.spec.classes),
                **hashes, **owner_tags(),
                STATE_TAG: "registering"}
        version = tracker.register_model(model_uri, cfg.model_name, tags)
    registry.set_alias(cfg.model_name, CHALLENGER, version)
    registry.tag_version(cfg.model_name, version, {STATE_TAG: "registered"})  # killed before this: `gc` deletes it
    print(f"registered {cfg.model_name} version {version} as {CHALLENGER} "
          f"(test accuracy {test.get('accuracy', float('nan')):.4f}); the runs in MLflow's UI: "
          f"{tracking.uri.rstrip('/') if tracking.uri.startswith('http') else '<mlflow ui>'}{tracker.view_page()}",
          file=sys.stderr)
    promotion = promote(cfg, tracking, cfg.model_name, version, data) if cfg.auto_promote else None
    registration = {"name": cfg.model_name, "version": version, "model_uri": f"models:/{cfg.model_name}/{version}",
              "logged_model_uri": model_uri, "run_id": tracker.run_id, "tracking_uri": tracking.uri,
              "test": test, "temperature": calibrated.temperature, "promotion": promotion}
    write_json(out, registration)
    return registration
