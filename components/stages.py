"""One KFP v2 component per stage (no `from __future__ import annotations` here: KFP reads the
artifact types of each signature at runtime). Each reads its block of the pipeline's params (the text of a
params.yaml), applies the pipeline parameters as overrides, and calls the same `cnnpipe.stages.*.run`
the CLI calls, on typed artifacts: Dataset for data, Model, Metrics, ClassificationMetrics, HTML.

Every component names the one image (IMAGE below; set CNNPIPE_IMAGE when compiling), with cnnpipe and
kfp installed in it, so nothing is installed at run time.
"""


import os

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

IMAGE = os.environ.get("CNNPIPE_IMAGE", "localhost/cnnpipe:0.1.0")


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest(params: str, source: str, path: str, dvc_repo: str, dvc_rev: str, dataset: Output[Dataset],
           report: Output[Artifact]):
    from pathlib import Path

    import yaml

    from cnnpipe.config import IngestConfig, load_block
    from cnnpipe.stages import ingest as stage

    overrides = {"source": source or None, "path": path or None, "dvc_repo": dvc_repo or None, "dvc_rev": dvc_rev or None}
    cfg = load_block(IngestConfig, "ingest", yaml.safe_load(params), overrides)
    summary = stage.run(cfg, Path(dataset.path), Path(report.path))
    dataset.metadata.update({"images": summary["images"], "classes": summary["classes"], "source": cfg.source,
                             **({"dvc_commit": summary["dvc"]["commit"]} if "dvc" in summary else {})})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def augment(params: str, data: Input[Dataset], augmented: Output[Dataset]):
    from pathlib import Path

    import yaml

    from cnnpipe.config import AugmentConfig, load_block
    from cnnpipe.stages import augment as stage

    summary = stage.run(load_block(AugmentConfig, "augment", yaml.safe_load(params), {}), Path(data.path),
                        Path(augmented.path))
    augmented.metadata.update(summary)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(params: str, arch: str, epochs: int, batch_size: int, lr: float, tracking_uri: str,
          data: Input[Dataset], augmented: Input[Dataset], model: Output[Model]):
    from pathlib import Path

    import yaml

    from cnnpipe.config import TrainConfig, load_block, tracking_settings
    from cnnpipe.stages import train as stage

    p = yaml.safe_load(params)
    cfg = load_block(TrainConfig, "train", p, {"arch": arch, "epochs": epochs, "batch_size": batch_size, "lr": lr})
    tracking = tracking_settings(p, tracking_uri or None)
    result = stage.run(cfg, Path(data.path), Path(augmented.path), Path(model.path), tracking)
    model.metadata.update({k: v for k, v in result.items() if v is not None})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(params: str, tracking_uri: str, model: Input[Model], data: Input[Dataset], evaluation: Output[Artifact],
             metrics: Output[Metrics], classification: Output[ClassificationMetrics], report: Output[HTML]):
    import json
    import shutil
    from pathlib import Path

    import yaml

    from cnnpipe.config import EvaluateConfig, load_block, tracking_settings
    from cnnpipe.stages import evaluate as stage

    p = yaml.safe_load(params)
    tracking = tracking_settings(p, tracking_uri or None)
    scores = stage.run(load_block(EvaluateConfig, "evaluate", p, {}), Path(model.path), Path(data.path),
                       Path(evaluation.path), tracking)
    for split, values in scores.items():
        for name, value in values.items():
            metrics.log_metric(f"{split}/{name}", value)
    cm = json.loads((Path(evaluation.path) / "confusion_matrix.json").read_text())
    classification.log_confusion_matrix(cm["categories"], cm["matrix"])
    shutil.copy(Path(evaluation.path) / "report.html", report.path)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(params: str, model_name: str, promotion_metric: str, min_delta: float, tracking_uri: str,
             model: Input[Model], data: Input[Dataset], evaluation: Input[Artifact], registered: Output[Artifact]) -> str:
    from pathlib import Path

    import yaml

    from cnnpipe.config import RegisterConfig, load_block, tracking_settings
    from cnnpipe.stages import register as stage

    p = yaml.safe_load(params)
    cfg = load_block(RegisterConfig, "register", p, {"model_name": model_name, "promotion_metric": promotion_metric,
                                                     "min_delta": min_delta})
    record = stage.run(cfg, Path(model.path), Path(data.path), Path(evaluation.path), Path(registered.path),
                       tracking_settings(p, tracking_uri or None))
    return record["model_uri"]
